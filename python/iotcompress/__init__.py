"""iotcompress: gradient compression for distributed deep learning over slow, far-away,
unreliable links — error feedback, DGC momentum correction, threshold and top-k
sparsification, quantisation and a compact, versioned, checksummed wire format, from a
no_std Rust core that also runs on Cortex-M microcontrollers.

Example::

    import numpy as np, iotcompress as ic
    c = ic.Compressor(10_000, density=0.01, quant="int8")
    msg = c.compress(np.random.randn(10_000).astype(np.float32))
    print(ic.inspect(msg)["nbytes"], "bytes instead of", 4 * 10_000)
    dense = ic.decode(msg)

PyTorch users: see :mod:`iotcompress.torch`.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from ._core import DEFAULT_MAX_NUMEL, QUANTS, Compressor, decode, decode_add, inspect, simd_level
from ._network import NetworkProfile
from ._stream import STATE_FORMATS, STREAM_QUANTS, StreamingCompressor
from ._iotcompress import WIRE_VERSION
from .errors import BusyError, CompressError, DecodeError, IotCompressError

try:
    __version__ = _version("iotcompress")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Compressor",
    "StreamingCompressor",
    "NetworkProfile",
    "decode",
    "decode_add",
    "inspect",
    "simd_level",
    "IotCompressError",
    "DecodeError",
    "CompressError",
    "BusyError",
    "QUANTS",
    "STREAM_QUANTS",
    "STATE_FORMATS",
    "DEFAULT_MAX_NUMEL",
    "WIRE_VERSION",
    "__version__",
]
