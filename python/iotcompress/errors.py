"""Exceptions raised by iotcompress."""

__all__ = ["IotCompressError", "DecodeError", "CompressError"]


class IotCompressError(Exception):
    """Base class of every error raised by iotcompress.

    Example::

        try:
            ic.decode(b"not a message")
        except ic.IotCompressError as e:
            print("rejected:", e)
    """


class DecodeError(IotCompressError, ValueError):
    """A message is malformed: truncated, corrupted (checksum), of an unknown version, or
    inconsistent. The output buffer of :func:`iotcompress.decode_add` is left unchanged.

    Example::

        with pytest.raises(ic.DecodeError):
            ic.decode(msg[:-1])
    """


class CompressError(IotCompressError, ValueError):
    """A gradient cannot be compressed (it contains NaN or infinity, or the accumulated
    residual overflowed float32). On a NaN or infinite gradient the state is unchanged.

    Example::

        g[0] = float("nan")
        with pytest.raises(ic.CompressError):
            c.compress(g)
    """
