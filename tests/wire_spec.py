"""An independent decoder of wire format v1, written from docs/wire-format.md alone (it
shares no code with the Rust implementation). tests/test_golden.py runs it over every
golden vector: if the spec and the implementation drift apart, it fails."""

from __future__ import annotations

import struct

import numpy as np

QUANTS = {0: "f32", 1: "f16", 2: "bf16", 3: "int8", 4: "int4", 5: "sign", 6: "ternary", 7: "qsgd"}
INDEX = {0: "dense", 1: "bitmap", 2: "rice"}


class SpecError(Exception):
    pass


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


class Bits:
    """LSB-first bit reader."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def bit(self) -> int:
        if self.pos >= 8 * len(self.data):
            raise SpecError("bit block ended early")
        b = (self.data[self.pos // 8] >> (self.pos % 8)) & 1
        self.pos += 1
        return b

    def field(self, n: int) -> int:
        return sum(self.bit() << j for j in range(n))

    def end(self) -> None:
        if (self.pos + 7) // 8 != len(self.data):
            raise SpecError("block has trailing bytes")
        while self.pos % 8:
            if self.bit():
                raise SpecError("non-zero padding")


def varint(msg: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(5):
        b = msg[pos]
        pos += 1
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if i > 0 and b == 0:
                raise SpecError("non-canonical varint")
            if value > 0xFFFFFFFF:
                raise SpecError("varint too large")
            return value, pos
    raise SpecError("varint longer than 5 bytes")


def f32(x: float) -> np.float32:
    return np.float32(x)


def decode(msg: bytes) -> dict:
    """Returns the header fields, the positions and the float32 values of a message."""
    if msg[:2] != b"IC" or msg[2] != 1:
        raise SpecError("magic/version")
    if crc32c(msg[:-4]) != struct.unpack("<I", msg[-4:])[0]:
        raise SpecError("checksum")
    codec = msg[3]
    if codec & 0xC0:
        raise SpecError("reserved codec bits")
    quant, index = QUANTS[codec & 0x0F], INDEX[codec >> 4]
    numel, pos = varint(msg, 4)
    nnz, pos = varint(msg, pos)
    h = {"numel": numel, "nnz": nnz, "quant": quant, "index": index, "rice_k": None, "levels": 0, "scale": 0.0, "stream": 0}
    if nnz > numel:
        raise SpecError("nnz > numel")
    if index == "rice":
        h["rice_k"] = msg[pos]
        pos += 1
        if h["rice_k"] > 31:
            raise SpecError("rice_k > 31")
    if quant == "qsgd":
        h["levels"] = msg[pos]
        pos += 1
        if h["levels"] == 0:
            raise SpecError("levels = 0")
    if quant not in ("f32", "f16", "bf16"):
        h["scale"] = np.frombuffer(msg[pos : pos + 4], "<f4")[0]
        pos += 4
        if not np.isfinite(h["scale"]) or np.signbit(h["scale"]):
            raise SpecError("bad scale")
    if quant in ("ternary", "qsgd"):
        h["stream"] = struct.unpack("<I", msg[pos : pos + 4])[0]
        pos += 4
    h["header_bytes"] = pos
    levels = h["levels"]
    b = levels.bit_length()
    code_bits = {"f32": 32, "f16": 16, "bf16": 16, "int8": 8, "int4": 4, "sign": 1, "qsgd": 1 + b}
    vbytes = (nnz + 4) // 5 if quant == "ternary" else (nnz * code_bits[quant] + 7) // 8
    body_end = len(msg) - 4
    if pos + vbytes > body_end:
        raise SpecError("blocks overlap the checksum")
    values_block = msg[body_end - vbytes : body_end]
    index_block = msg[pos : body_end - vbytes]

    if index == "dense":
        if index_block or nnz != numel:
            raise SpecError("dense index")
        positions = list(range(numel))
    elif index == "bitmap":
        if len(index_block) != (numel + 7) // 8:
            raise SpecError("bitmap size")
        positions = [i for i in range(8 * len(index_block)) if (index_block[i // 8] >> (i % 8)) & 1]
        if any(p >= numel for p in positions) or len(positions) != nnz:
            raise SpecError("bitmap content")
    else:
        bits, k, positions, nxt = Bits(index_block), h["rice_k"], [], 0
        for _ in range(nnz):
            q = 0
            while bits.bit():
                q += 1
            gap = (q << k) | bits.field(k)
            p = nxt + gap
            if p >= numel:
                raise SpecError("position out of range")
            positions.append(p)
            nxt = p + 1
        bits.end()

    scale = f32(h["scale"])
    values = []
    if quant == "ternary":
        for j in range(nnz):
            byte = values_block[j // 5]
            if byte >= 243:
                raise SpecError("ternary byte")
            t = (byte // 3 ** (j % 5)) % 3
            values.append(f32(t - 1) * scale)
    else:
        bits = Bits(values_block)
        for _ in range(nnz):
            c = bits.field(code_bits[quant])
            if quant == "f32":
                v = np.frombuffer(struct.pack("<I", c), "<f4")[0]
            elif quant == "f16":
                v = np.float32(np.frombuffer(struct.pack("<H", c), "<f2")[0])
            elif quant == "bf16":
                v = np.frombuffer(struct.pack("<I", c << 16), "<f4")[0]
            elif quant == "int8":
                v = f32(c - 256 if c >= 128 else c) * scale
            elif quant == "int4":
                v = f32(c - 16 if c >= 8 else c) * scale
            elif quant == "sign":
                v = -scale if c else scale
            else:
                level = f32(c & ((1 << b) - 1)) * (scale / f32(levels))
                v = -level if (c >> b) & 1 else level
            if not np.isfinite(v):
                raise SpecError("non-finite value")
            values.append(np.float32(v))
        bits.end()
    h["positions"] = positions
    h["values"] = np.array(values, dtype=np.float32)
    return h
