"""Commands of the CLI layer that are clients of something else (`status`, `fleet`).

Each module offers `main(argv, env) -> int` (the exit status) and is imported lazily by
`conductord.cli`, so that `config`, `checklist` and `help` never pay for its imports. The daemon
and the servers never import from here.
"""
