"""File names as text: what is shown on a terminal or written into a JSON, HTML or log file.

A file name is bytes; one that is not UTF-8 (Latin-1 or CP437 names from Windows zip archives) reaches Python
with surrogate escapes, which no UTF-8 writer accepts ("surrogates not allowed"). Such bytes are written as
``\\xNN`` instead; everything else is left as it is.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a file name written as ``\\xNN`` (``caf\\xe9.jpeg``); unchanged
    when it is valid Unicode already."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the file name's own bytes back
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte (e.g. from a JSON \ud800)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
