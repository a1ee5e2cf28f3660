"""Keep secrets and broken Unicode out of every text the node writes (SPEC §3 Secrets, §9).

`redact(text, secrets)` replaces every occurrence of a secret by `***`, and also every run of
the text made of pieces of a secret at least `min_piece` characters long: a server that echoes
the token back, whole or cut short, leaks no part of it that long. Redact first and cut
afterwards: a cut made first can leave the start of a token at its end, which no longer
matches the whole token (the bug of issue 15).

How: a character is covered when some `min_piece`-character window of the text around it is
also a window of a secret; each maximal covered run becomes `***`. Every piece of a secret of
`min_piece` characters or more is made of such windows, so none survives; text that merely
shares fewer than `min_piece` characters with a secret stays as it is. A secret shorter than
`min_piece` is only removed where it occurs whole. The scan costs one substring search per
window of the secret when nothing matches (the usual case), and one set lookup per character
of the text when something does.

`holds_secret(text, secret)` is the same test as a yes/no answer: does `text` hold the secret,
or a piece of it that `redact` would mask? (The `--exec` child's environment drops every
variable whose value does.)

`safe_text(text)` replaces lone surrogates (a JSON string may carry `"\\ud800"`, which cannot
be encoded as UTF-8) by U+FFFD, so a server's string can be logged, served and printed.

`server_text(text, secrets, limit)` is a server's text made printable: valid, redacted, then
cut to `limit` characters (looking a little beyond the cut, so redaction sees what it cuts).

`safe_str(value)` is `str(value)` made valid, or a placeholder when `str()` raises.

A secret's windows are built once (a small cache keyed by the secret), not once per string:
the log sanitizer redacts every string of every line.

`clean(document, secrets)` is both at once for a whole JSON-like document: every string
(keys included) made valid and redacted, every value made JSON-safe. Everything the node
writes or serves goes through it: log lines, `/v1/status` and the other status bodies, the
`--run-once` and `diagnose` documents, so a server that names the token as a lease holder
cannot get it printed either.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "MASK",
    "MIN_PIECE",
    "clean",
    "holds_secret",
    "redact",
    "safe_str",
    "safe_text",
    "server_text",
]

MASK = "***"
MIN_PIECE = 8
_CUT_SLACK = 1024  # characters looked at beyond a cut, so redaction sees what the cut leaves
_MAX_DEPTH = 32  # deeper values become their str(); a cycle ends here too
_JSON_KEYS = (str, int, float, bool, type(None))

_SURROGATE = re.compile("[\ud800-\udfff]")


def safe_text(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD (valid text is returned as is)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def redact(text: str, secrets: Iterable[str | None], min_piece: int = MIN_PIECE) -> str:
    """`text` without any secret, nor any piece of one of `min_piece` characters or more."""
    for secret in secrets:
        if not secret:
            continue
        if len(secret) < min_piece:
            text = text.replace(secret, MASK)
            continue
        # Each pass shortens the text (a run of >= min_piece characters becomes three), so
        # this ends; a second pass only matters for a secret that itself contains the mask.
        while True:
            redacted = _mask_pieces(text, secret, min_piece)
            if redacted is text:
                break
            text = redacted
    return text


def holds_secret(text: str, secret: str | None, min_piece: int = MIN_PIECE) -> bool:
    """True when `redact(text, [secret])` would mask something: `text` holds the secret, or a
    piece of it of `min_piece` characters or more (a secret shorter than that: only whole)."""
    if not secret:
        return False
    if len(secret) < min_piece:
        return secret in text
    return any(window in text for window in _windows(secret, min_piece))


@functools.lru_cache(maxsize=16)
def _windows(secret: str, size: int) -> frozenset[str]:
    """Every `size`-character window of `secret`: built once per secret, not per string."""
    return frozenset(secret[i : i + size] for i in range(len(secret) - size + 1))


def _mask_pieces(text: str, secret: str, size: int) -> str:
    windows = _windows(secret, size)
    if not any(window in text for window in windows):
        return text
    covered_until = -1  # the text is covered up to (excluding) this index
    runs: list[tuple[int, int]] = []
    for start in range(len(text) - size + 1):
        if text[start : start + size] in windows:
            end = start + size
            if runs and start <= covered_until:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((start, end))
            covered_until = end
    parts: list[str] = []
    position = 0
    for start, end in runs:
        parts.append(text[position:start])
        parts.append(MASK)
        position = end
    parts.append(text[position:])
    return "".join(parts)


def server_text(text: str, secrets: Iterable[str | None], limit: int) -> str:
    """A server's `text`, valid Unicode and redacted, then cut to `limit` characters.

    Redacted before the cut (a cut made first could leave a piece of the token at the end);
    only `limit` + 1024 characters are looked at, so a runaway text costs little.
    """
    return redact(safe_text(text[: limit + _CUT_SLACK]), secrets)[:limit]


def safe_str(value: Any) -> str:
    """`str(value)` as valid Unicode; a placeholder naming the type when `str()` raises."""
    try:
        return safe_text(str(value))
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def clean(value: Any, secrets: Iterable[str | None] = (), *, _depth: int = 0) -> Any:
    """A JSON-safe copy of `value` with every string valid Unicode and redacted."""
    kept = tuple(s for s in secrets if s)

    def text(item: str) -> str:
        item = safe_text(item)
        return redact(item, kept) if kept else item

    def walk(item: Any, depth: int) -> Any:
        if isinstance(item, str):
            return text(item)
        if item is None or isinstance(item, bool | int):
            return item
        if isinstance(item, float):
            return item if math.isfinite(item) else str(item)  # NaN is not JSON
        if depth < _MAX_DEPTH:
            if isinstance(item, dict):
                return {
                    walk(k, depth + 1) if isinstance(k, _JSON_KEYS) else text(safe_str(k)): walk(
                        v, depth + 1
                    )
                    for k, v in item.items()
                }
            if isinstance(item, list | tuple | set | frozenset):
                return [walk(v, depth + 1) for v in item]
        return text(safe_str(item))

    return walk(value, _depth)
