"""Exceptions raised by iotcompress."""

__all__ = ["IotCompressError", "DecodeError", "CompressError", "BusyError"]


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
    """A gradient cannot be compressed (it contains NaN or infinity, or its sum with the
    residual would overflow float32), or :meth:`Compressor.restore` has nothing to put back.
    The state is unchanged.

    Example::

        g[0] = float("nan")
        with pytest.raises(ic.CompressError):
            c.compress(g)
    """


class BusyError(IotCompressError, RuntimeError):
    """The buffer is being written by another call right now: two threads ran
    :func:`iotcompress.decode_add` into one buffer at once. This call changed nothing (the
    other one completes); retry, or take turns with a lock.

    Example::

        try:
            ic.decode_add(msg, total)
        except ic.BusyError:
            with lock:
                ic.decode_add(msg, total)
    """
