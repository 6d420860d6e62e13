"""A cheap check of an encoded image's structure, before DALI's decoders see it.

DALI's decoders (nvImageCodec) stop the whole batch on a bad file and print their own
``[ERROR] [jpeg_parser] ...`` lines on stderr, which DALI offers no way to silence below the
error level. The failures seen in real datasets (a truncated download, a file of another kind
under an image name, a damaged header) are visible in the file's structure, so they are found here
and reported with the other unreadable files, the way the PyTorch loader reports what PIL cannot
decode. The check reads the headers (JPEG: every segment's length, the frame header, the Huffman
tables, the end-of-image marker; PNG: the header and end chunks), not the compressed data: a file
damaged only inside its compressed data still reaches the decoder (and is still replaced and
reported after it fails, with the decoder's own line before ours).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

JPEG, PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
# Leading bytes of the formats DALI's decoders read.
MAGIC_BYTES = (JPEG, PNG, b"BM", b"GIF8", b"II*\x00", b"MM\x00*", b"RIFF")

_SOS, _EOI, _DHT = 0xDA, 0xD9, 0xC4
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0..7: markers without a length
_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # SOFn


def _segment_problem(marker: int, segment: bytes) -> Optional[str]:
    """What a decoder would refuse in a frame header (SOFn) or Huffman table (DHT) segment."""
    if marker in _FRAMES:
        if len(segment) < 6 or segment[5] not in (1, 3, 4) or len(segment) != 6 + 3 * segment[5]:
            return "invalid JPEG frame header"
        if segment[3:5] == b"\x00\x00":  # width 0
            return "invalid JPEG frame header (width 0)"
    elif marker == _DHT:
        pos = 0
        while pos < len(segment):  # tables: class/id byte, 16 code counts, the symbols
            counts = segment[pos + 1:pos + 17]
            if len(counts) < 16 or sum(counts) > 256 or pos + 17 + sum(counts) > len(segment):
                return "invalid JPEG Huffman table"
            pos += 17 + sum(counts)
    return None


def _jpeg_problem(data: bytes) -> Optional[str]:
    """Walk the JPEG segments from SOI to the first scan (checking frame headers and Huffman tables);
    then the end-of-image marker must follow."""
    pos, frame = 2, False
    while True:
        while pos + 1 < len(data) and data[pos] == 0xFF and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 2 > len(data):
            return f"truncated JPEG header ({len(data)} bytes)"
        if data[pos] != 0xFF:
            return f"invalid JPEG marker at byte {pos}"
        marker = data[pos + 1]
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker < 0xC0 or marker in (0xD8, _EOI):
            return f"invalid JPEG marker 0x{marker:02X} at byte {pos}"
        if pos + 4 > len(data):
            return f"truncated JPEG header ({len(data)} bytes)"
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2:
            return f"invalid JPEG segment length {length} at byte {pos}"
        if pos + 2 + length > len(data):
            return f"truncated JPEG header ({len(data)} bytes)"
        segment = data[pos + 4:pos + 2 + length]
        problem = _segment_problem(marker, segment)
        if problem:
            return f"{problem} at byte {pos}"
        frame = frame or marker in _FRAMES
        if marker == _SOS:
            if not frame:
                return "JPEG without a frame header"
            # 0xFF in compressed data is followed by 0x00 or a restart marker, never by 0xD9.
            if data.rfind(b"\xff\xd9", pos + 2 + length) < 0:
                return f"truncated JPEG: no end-of-image marker in its {len(data)} bytes"
            return None
        pos += 2 + length


def _png_problem(data: bytes) -> Optional[str]:
    """The header chunk must come first and the end chunk must be present."""
    if data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return "invalid PNG header chunk"
    if data.rfind(b"IEND", 33) < 0:
        return f"truncated PNG: no end chunk in its {len(data)} bytes"
    return None


def encoded_problem(encoded: np.ndarray) -> Optional[str]:
    """What is wrong with an encoded image's structure, or None when a decoder may read it.

    Args:
        encoded: The file's bytes (1-D uint8).
    """
    head = encoded[:8].tobytes()
    if not head.startswith(MAGIC_BYTES):
        return f"not a recognised image format, {encoded.size} bytes"
    if head.startswith(JPEG):
        return _jpeg_problem(encoded.tobytes())
    if head.startswith(PNG):
        return _png_problem(encoded.tobytes())
    return None
