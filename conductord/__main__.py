"""Process entry point for `conductord` and `python -m conductord`.

gevent must patch the standard library before requests (and through it socket, ssl and
threading) is imported anywhere, so this module patches first and imports the CLI after.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402


def main() -> int:
    from conductord.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
