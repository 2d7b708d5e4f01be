"""Reading text files the same way everywhere: UTF-8, a leading byte-order mark (U+FEFF) accepted
and dropped; anything else is a DataError naming the file, the line and the byte offset, and
the ``iconv`` command that converts it."""

from __future__ import annotations

import codecs
from pathlib import Path

from ..errors import DataError

UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def read_utf8(path: Path) -> str:
    """The text of ``path`` (UTF-8, optional BOM stripped); DataError for any other encoding."""
    data = Path(path).read_bytes()
    if data.startswith(UTF16_BOMS):
        raise DataError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); files must be UTF-8: "
                        f"convert it with `iconv -f utf-16 -t utf-8 {path} > converted.txt`")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at byte offset {err.start}); files must be UTF-8: "
            f"if it is Latin-1, convert it with `iconv -f latin1 -t utf-8 {path} > converted.txt`"
        ) from None
