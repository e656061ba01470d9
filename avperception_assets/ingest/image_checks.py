"""Image container checks: is this JPEG or PNG whole, and how large, without decoding pixels.

They catch what a file transfer breaks (truncation, zero-filled tails, damaged headers, PNG bit
errors via chunk CRCs) at a few microseconds a frame. Damage inside a JPEG's entropy-coded data
passes them; the curation stage, which decodes every new frame anyway, catches that.
"""

from __future__ import annotations

import zlib


class NotAnImageError(ValueError):
    """Bytes that are neither JPEG nor PNG."""


class CorruptImageError(ValueError):
    """A JPEG or PNG whose structure is broken: truncated, half-copied or damaged."""


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (they carry the size); C4, C8 and CC are not SOFs.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Walk the marker segments up to the scan, then find the EOI marker that closes the image
    data: a copy cut short has none (byte stuffing keeps FF D9 out of the data itself)."""
    size, i = None, 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise CorruptImageError(f"JPEG marker expected at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > len(data):
            raise CorruptImageError(f"JPEG segment 0x{marker:02X} at byte {i} overruns the file")
        if marker in _JPEG_SOF:
            components = data[i + 9] if length >= 8 else 0
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            if length != 8 + 3 * components or components not in (1, 3, 4) or not (width and height):
                raise CorruptImageError(f"JPEG frame header is invalid ({width}x{height}, {components} components)")
            size = (width, height)
        elif marker == 0xDA:  # start of scan: entropy-coded data follows up to EOI
            if size is None:
                raise CorruptImageError("JPEG scan starts before any frame header")
            scan = i + 2 + length
            # Nearly every file ends with EOI (maybe zero-padded): look there first; only a file
            # with a trailer after its EOI needs the search through the image data.
            tail = data.rstrip(b"\x00")
            end = len(tail) - 2 if tail.endswith(b"\xff\xd9") else data.find(b"\xff\xd9", scan)
            if end < 0:
                raise CorruptImageError("JPEG has no EOI marker after its image data (truncated or half-copied)")
            if end <= scan:
                raise CorruptImageError("JPEG has no image data after its scan header")
            return size
        elif marker == 0xD9:
            break
        i += 2 + length
    raise CorruptImageError("JPEG has no image data (no start-of-scan marker)")


def _png_size(data: bytes) -> tuple[int, int]:
    """Walk the chunks checking every CRC; IHDR first, IDAT present, IEND last."""
    view = memoryview(data)  # slices without copying the pixel data
    i, size, has_data = len(_PNG_SIGNATURE), None, False
    while i + 12 <= len(data):
        length = int.from_bytes(data[i:i + 4], "big")
        kind, end = data[i + 4:i + 8], i + 12 + length
        if end > len(data):
            raise CorruptImageError(f"PNG chunk {kind!r} at byte {i} overruns the file (truncated)")
        if zlib.crc32(view[i + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise CorruptImageError(f"PNG chunk {kind!r} at byte {i} fails its CRC")
        if size is None:
            if kind != b"IHDR" or length != 13:
                raise CorruptImageError("PNG does not start with an IHDR chunk")
            size = (int.from_bytes(data[i + 8:i + 12], "big"), int.from_bytes(data[i + 12:i + 16], "big"))
            if not all(size):
                raise CorruptImageError(f"PNG header gives an empty {size[0]}x{size[1]} image")
        has_data |= kind == b"IDAT"
        if kind == b"IEND":
            if not has_data:
                raise CorruptImageError("PNG has no IDAT chunk")
            return size
        i = end
    raise CorruptImageError("PNG ends before its IEND chunk (truncated or half-copied)")


def inspect_image(data: bytes) -> tuple[str, int, int]:
    """Format and size of an image, verifying its container structure without decoding pixels.

    Pixel-level damage inside a JPEG's entropy-coded data is left to the curation stage
    (`curation_udfs.dhash`), which quarantines the frames that fail to decode.
    """
    if data.startswith(b"\xff\xd8\xff"):
        return ("jpeg", *_jpeg_size(data))
    if data.startswith(_PNG_SIGNATURE):
        return ("png", *_png_size(data))
    raise NotAnImageError(f"neither JPEG nor PNG (starts with {data[:8]!r})")

