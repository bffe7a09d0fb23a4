"""File names as featpipe records them. A name that is not valid UTF-8 (Python decodes it with
lone surrogates, one per undecodable byte) is written into chunks, img_list.json and reports with
each such byte as the text `\\udcXX`, so every output stays valid UTF-8; `name_bytes` turns the
recorded text back into the bytes the filesystem holds."""

from __future__ import annotations

import re

_ESCAPED_BYTE = re.compile(r"\\udc([89a-fA-F][0-9a-fA-F])")


def clean_text(text: str) -> str:
    """Text that can be written as UTF-8: a lone surrogate (from JSON's \\ud800 or an undecodable
    tar member name) becomes its backslash escape instead of failing the chunk write."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_escaped(text: str) -> bool:
    """True when recorded text stands for a name that is not valid UTF-8."""
    return _ESCAPED_BYTE.search(text) is not None


def name_bytes(text: str) -> bytes:
    """The raw bytes of a recorded name: UTF-8, with each `\\udcXX` back to the byte XX."""
    parts, last = [], 0
    for m in _ESCAPED_BYTE.finditer(text):
        parts += [text[last : m.start()].encode("utf-8", "surrogateescape"), bytes([int(m.group(1), 16)])]
        last = m.end()
    parts.append(text[last:].encode("utf-8", "surrogateescape"))
    return b"".join(parts)
