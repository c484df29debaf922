"""Framing of several messages into one blob: each message is preceded by its length as an
unsigned LEB128 varint (the wire format's own varint), so a bucket of parameters travels as
one variable-size byte string."""

from __future__ import annotations

from typing import List, Sequence

from iotcompress.errors import DecodeError


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def join_frames(messages: Sequence[bytes]) -> bytes:
    """Concatenates ``messages``, each behind its varint length."""
    return b"".join(_varint(len(m)) + m for m in messages)


def split_frames(data: bytes, count: int) -> List[bytes]:
    """Splits a blob made by :func:`join_frames` into exactly ``count`` messages; anything
    malformed raises :class:`iotcompress.DecodeError`."""
    frames, pos = [], 0
    for _ in range(count):
        length, shift = 0, 0
        while True:
            if pos >= len(data) or shift > 28:
                raise DecodeError("bucket framing is truncated or has an overlong length")
            b = data[pos]
            pos += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if pos + length > len(data):
            raise DecodeError("bucket framing: a message runs past the end")
        frames.append(data[pos : pos + length])
        pos += length
    if pos != len(data):
        raise DecodeError("bucket framing has trailing bytes")
    return frames
