"""PNG files of any declared size, built byte by byte (cheap even at 100 megapixels)."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bilevel_png(width: int, height: int, complete: bool = True) -> bytes:
    """A black 1-bit greyscale PNG with a well-formed header (valid CRCs). ``complete``: all its
    rows are there, so it decodes (100 megapixels of zeros compress to ~12 KB); otherwise a few
    bytes of data follow the header, and decoding fails."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    raw = b"\0" * ((1 + (width + 7) // 8) * height) if complete else b"\0" * 64  # filter byte + packed row
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))
