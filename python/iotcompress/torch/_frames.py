"""Framing of several messages into one blob: each message is preceded by its length as an
unsigned LEB128 varint (the wire format's own varint), so a bucket of parameters travels as
one variable-size byte string."""

from __future__ import annotations

from typing import List, NamedTuple, Sequence

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


def framed_len(messages: Sequence[bytes]) -> int:
    """The length of :func:`join_frames` of ``messages``, without joining them."""
    return sum(len(_varint(len(m))) + len(m) for m in messages)


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


# -- the per-bucket header every rank sends before its bytes (see docs/torch.md) -----------

HEADER_LEN = 128
REASON_LEN = HEADER_LEN - 9
MESSAGE, SAT_OUT, FAILED = 0, 1, 2
_KINDS = {MESSAGE: "message", SAT_OUT: "sat out", FAILED: "failed"}


class Header(NamedTuple):
    kind: int
    length: int
    reason: str


def encode_header(kind: int, length: int = 0, reason: str = "") -> bytes:
    """``kind`` (1 byte), the bucket's byte length (u64 LE), and for ``FAILED`` the reason
    (UTF-8, cut to ``REASON_LEN`` bytes at a character boundary), zero padded."""
    text = reason.encode("utf-8")[:REASON_LEN].decode("utf-8", errors="ignore").encode("utf-8")
    return (bytes([kind]) + length.to_bytes(8, "little") + text).ljust(HEADER_LEN, b"\0")


def decode_header(data: bytes, rank: int, max_length: int) -> Header:
    """Checks one rank's header: a known kind, a length in ``1..max_length`` for a message
    and 0 otherwise, padding of zeros; anything else raises :class:`DecodeError` naming
    ``rank``."""
    if len(data) != HEADER_LEN:
        raise DecodeError(f"rank {rank} sent a {len(data)}-byte bucket header, expected {HEADER_LEN}")
    kind, length, rest = data[0], int.from_bytes(data[1:9], "little"), data[9:]
    if kind not in _KINDS:
        raise DecodeError(f"rank {rank} sent a bucket header of unknown kind {kind}")
    if (kind == MESSAGE) != (length > 0) or length > max_length:
        raise DecodeError(f"rank {rank} sent a {_KINDS[kind]} header with length {length} (at most {max_length})")
    text, _, padding = rest.partition(b"\0")
    if padding.strip(b"\0") or (text and kind != FAILED):
        raise DecodeError(f"rank {rank} sent a bucket header with bytes after its end")
    return Header(kind, length, text.decode("utf-8", errors="replace"))
