"""The secret and Unicode rules of SPEC §3 and §9: `conductord.redact` and the log lines."""

from __future__ import annotations

import io
import json
import random

import pytest

from conductord import logs
from conductord.redact import MASK, redact, safe_text

TOKEN = "s3cr3t-T0KEN-0123456789-abcdefXYZ"


def pieces(text: str, secret: str = TOKEN, size: int = 8) -> list[str]:
    """Every piece of `secret` of `size` characters that occurs in `text`."""
    windows = (secret[i : i + size] for i in range(len(secret) - size + 1))
    return [window for window in windows if window in text]


def test_whole_secret_and_pieces_of_eight_or_more_are_masked():
    assert redact(f"Bearer {TOKEN}!", [TOKEN]) == f"Bearer {MASK}!"
    assert redact(f"head {TOKEN[:8]} tail", [TOKEN]) == f"head {MASK} tail"
    assert redact(f"cut {TOKEN[5:20]}", [TOKEN]) == f"cut {MASK}"
    assert redact(f"end at the cut: {TOKEN[:-1]}", [TOKEN]) == f"end at the cut: {MASK}"
    # Seven characters shared with the token are not a piece: ordinary text stays.
    assert redact(f"x{TOKEN[:7]}x", [TOKEN]) == f"x{TOKEN[:7]}x"
    assert redact("nothing here", [TOKEN]) == "nothing here"
    assert redact(f"{TOKEN}{TOKEN[3:12]}{TOKEN}", [TOKEN]) == MASK


def test_short_secrets_and_empty_ones():
    assert redact("a short pw here", ["pw"]) == f"a short {MASK} here"
    assert redact("text", ["", None]) == "text"


def test_a_secret_holding_the_mask_cannot_come_back():
    secret = "ab***cdefghij"
    text = f"x {secret} y ab*** cdef"
    out = redact(text, [secret])
    assert not pieces(out, secret)


def test_no_piece_survives_random_cuts_and_echoes():
    rng = random.Random(15)
    for _ in range(300):
        start = rng.randrange(len(TOKEN))
        end = rng.randrange(start, len(TOKEN) + 1)
        filler = "".join(rng.choice("ab -:*S3") for _ in range(rng.randrange(30)))
        text = filler + TOKEN[start:end] + filler + TOKEN[: rng.randrange(len(TOKEN))]
        assert not pieces(redact(text, [TOKEN])), text


def test_safe_text_replaces_lone_surrogates_only():
    assert safe_text("ok ünïcode 😀") == "ok ünïcode 😀"
    assert safe_text("a\ud800b\udfff") == "a\ufffdb\ufffd"
    safe_text("a\ud800").encode("utf-8")


# -- the log lines --------------------------------------------------------------------------------


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    __repr__ = __str__


@pytest.fixture
def log_lines():
    stream = io.StringIO()
    log = logs.configure(stream=stream, secrets=[TOKEN], node_id="n1")

    def lines() -> list[dict]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    yield log, lines, stream


def test_a_log_line_is_written_whatever_the_values(log_lines):
    log, lines, stream = log_lines
    circular: dict = {}
    circular["self"] = circular
    log.warning(
        "lease.renew_failed",
        error="holder \ud800 said no",
        nested={"k\udc00": ["\ud800", {"deep": "\udfff"}]},
        odd=Unprintable(),
        keys={(1, 2): "tuple key", Unprintable(): 1},
        loop=circular,
        ratio=float("nan"),
    )
    log.info("plain.event", value=Unprintable())
    stream.getvalue().encode("utf-8")  # everything is valid UTF-8 now
    first, second = lines()
    assert first["event"] == "lease.renew_failed"
    assert first["error"] == "holder \ufffd said no"
    assert first["nested"] == {"k\ufffd": ["\ufffd", {"deep": "\ufffd"}]}
    assert first["odd"] == "<unprintable Unprintable>"
    assert first["keys"] == {"(1, 2)": "tuple key", "<unprintable Unprintable>": 1}
    assert first["ratio"] == "nan"
    assert first["node_id"] == "n1"
    assert second["value"] == "<unprintable Unprintable>"


def test_log_lines_hold_no_piece_of_the_token(log_lines):
    log, lines, stream = log_lines
    echoed = "x" * 180 + "Bearer " + TOKEN  # a server error cut at 200 elsewhere: 13 characters
    log.warning("lease.renew_failed", error=echoed[:200], snapshot={"last_error": TOKEN[4:30]})
    log.info("x", exc=RuntimeError(f"boom {TOKEN[2:14]}"))
    assert not pieces(stream.getvalue())
    assert lines()[0]["error"].endswith(MASK)


def test_a_secrets_windows_are_built_once_not_per_string():
    # The log sanitizer redacts every string of every line: one set per secret, not per string.
    from conductord import redact as module

    module._windows.cache_clear()
    document = {f"key-{n}": [f"value {n}", f"{TOKEN[n % 9 : n % 9 + 10]}"] for n in range(200)}
    cleaned = module.clean(document, [TOKEN])
    assert not pieces(json.dumps(cleaned))
    info = module._windows.cache_info()
    assert (info.misses, info.currsize) == (1, 1)
    assert info.hits >= 400


def test_safe_str_is_written_once_and_server_text_redacts_before_the_cut():
    from conductord import redact as module

    assert not hasattr(logs, "_safe_str")  # logs uses redact.safe_str

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert module.safe_str(Unprintable()) == "<unprintable Unprintable>"
    assert module.safe_str("\ud800x") == "\ufffdx"
    # The cut falls inside the token: the piece before it is still masked.
    text = "x" * 190 + TOKEN
    assert module.server_text(text, [TOKEN], 200) == "x" * 190 + MASK
    assert module.server_text("\udc00" + "y" * 300, [], 10) == "\ufffd" + "y" * 9
