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

`safe_text(text)` replaces lone surrogates (a JSON string may carry `"\\ud800"`, which cannot
be encoded as UTF-8) by U+FFFD, so a server's string can be logged, served and printed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MASK", "MIN_PIECE", "redact", "safe_text"]

MASK = "***"
MIN_PIECE = 8

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


def _mask_pieces(text: str, secret: str, size: int) -> str:
    windows = {secret[i : i + size] for i in range(len(secret) - size + 1)}
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
