"""Send only what is new: the novelty filter for sensor streams.

A device's own data is mostly repetition (overlapping accelerometer windows, a power trace
flat for hours). :class:`NoveltyFilter` keeps a sample only if its *view* (each channel
averaged over blocks of ``pool`` values; for ``metric="cosine"`` each channel centred and the
view scaled to unit length) is at least ``threshold`` away (L2) from every one of the last
``capacity`` views it kept. The threshold is fixed (``threshold=``: no two remembered kept
samples are closer than it) or adapts to keep a fraction (``keep=``) or a byte budget
(``budget_bytes=``). It is the core's filter (``iotcompress_core::novelty``, also in the C API
for firmware): the same decisions in Python, Rust and C, in fixed memory.

:func:`select_novel` filters an array; :class:`NoveltyFilter` a stream; ``NovelSampler`` and
``NovelIterableDataset`` (torch, imported on first use) wrap datasets for training loops.
``docs/novelty.md`` has the evaluation (accuracy against kept fraction on real sensor data).

Example::

    import numpy as np
    from iotcompress.data import select_novel
    windows = np.random.randn(1000, 3, 64).astype(np.float32)   # (samples, axes, time)
    idx = select_novel(windows, keep=0.2)                        # about 200 indices, ascending
    train_x = windows[idx]
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from . import _iotcompress
from ._core import _check_fraction

__all__ = ["select_novel", "NoveltyFilter", "METRICS", "NovelSampler", "NovelIterableDataset"]

#: Metrics of the filter's views.
METRICS = ("euclidean", "cosine")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class NoveltyFilter:
    """A streaming novelty filter over samples of a fixed shape.

    ``shape`` is a sample's shape: ``(time,)`` or ``(channels, time)`` (pooling stays within a
    channel). Give ``threshold`` (a distance between views; fixed), or ``keep`` (a fraction in
    (0, 1]) or ``budget_bytes`` with ``expected_samples`` (the fraction those bytes buy) for an
    adaptive threshold, which then starts at ``threshold`` (or at the first distance measured).
    The memory is fixed: ``(capacity + 1)`` views of ``channels * ceil(time / pool)`` floats.

    Example::

        f = NoveltyFilter((3, 64), keep=0.1, pool=4)
        for window in sensor_windows():
            if f.offer(window):
                send(window)
        print(f.kept, "of", f.seen)
    """

    __slots__ = ("shape", "dim", "_inner")

    def __init__(
        self,
        shape: Any,
        *,
        keep: Optional[float] = None,
        threshold: Optional[float] = None,
        budget_bytes: Optional[int] = None,
        expected_samples: Optional[int] = None,
        metric: str = "euclidean",
        pool: int = 1,
        capacity: int = 256,
        rate: float = 0.05,
    ):
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        if len(shape) not in (1, 2) or min(shape) < 1:
            raise ValueError(f"shape must be (time,) or (channels, time) of positive sizes, got {shape}")
        channels = shape[0] if len(shape) == 2 else 1
        dim = int(np.prod(shape))
        if budget_bytes is not None:
            if keep is not None:
                raise ValueError("give keep or budget_bytes, not both")
            if expected_samples is None:
                raise ValueError("budget_bytes needs expected_samples (the samples it is spread over)")
            total = 4 * dim * _positive_int(expected_samples, "expected_samples")
            keep = min(1.0, _positive_int(budget_bytes, "budget_bytes") / total)
        if keep is None and threshold is None:
            raise ValueError("give threshold (a fixed distance), keep (a fraction) or budget_bytes")
        keep_f = 0.0 if keep is None else _check_fraction(keep, "keep")
        thr = 0.0 if threshold is None else float(threshold)
        if not (np.isfinite(thr) and thr >= 0.0):
            raise ValueError(f"threshold must be a finite distance >= 0, got {threshold!r}")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        if not (0.0 < rate < 1.0):
            raise ValueError(f"rate must be in (0, 1), got {rate!r}")
        pool = _positive_int(pool, "pool")
        capacity = _positive_int(capacity, "capacity")
        self.shape, self.dim = shape, dim
        self._inner = _iotcompress.Novelty(dim, channels, pool, capacity, metric, thr, keep_f, float(rate))

    def _rows(self, x: Any) -> np.ndarray:
        a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        if a.shape[-len(self.shape):] != self.shape:
            raise ValueError(f"samples must have shape {self.shape}, got {a.shape}")
        return a.reshape(-1, self.dim)

    def offer(self, sample: Any) -> bool:
        """True if ``sample`` is new (it is then remembered). NaN or infinity raises
        :class:`~iotcompress.CompressError` and changes nothing."""
        a = self._rows(sample)
        if a.shape[0] != 1:
            raise ValueError(f"offer takes one sample of shape {self.shape}, got {np.shape(sample)}")
        return bool(self._inner.offer(a[0]))

    def mask(self, samples: Any) -> np.ndarray:
        """Offers the samples (an array of shape ``(n, *shape)``) in order: the keep mask. All
        or nothing: a NaN anywhere raises before any sample is offered."""
        return self._inner.offer_many(self._rows(samples))

    def __call__(self, items: Iterable[Any], key: Optional[Callable[[Any], Any]] = None) -> Iterator[Any]:
        """Yields the new items of a stream; ``key(item)`` is the sample (default: the item, or
        its first element for tuples such as ``(x, y)``)."""
        for item in items:
            if self.offer(_numpy((key or _first)(item))):
                yield item

    @property
    def threshold(self) -> float:
        """The current threshold (a distance between views)."""
        return float(self._inner.threshold)

    @property
    def seen(self) -> int:
        """Samples offered."""
        return int(self._inner.seen)

    @property
    def kept(self) -> int:
        """Samples kept."""
        return int(self._inner.kept)

    @property
    def nbytes(self) -> int:
        """Bytes of the filter's memory (its bank of views)."""
        return 4 * int(self._inner.bank_len)


def _numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def select_novel(
    x: Any,
    *,
    keep: Optional[float] = None,
    threshold: Optional[float] = None,
    groups: Any = None,
    **options: Any,
) -> np.ndarray:
    """Indices (ascending, int64) of the samples of ``x`` that the filter keeps, offered in
    order as a device would see them. ``x`` is ``(n, time)`` or ``(n, channels, time)``.

    ``groups`` (one label per sample: the recording, device or class it belongs to) filters
    each group on its own, as each device filters its own stream: every group keeps about
    ``keep`` of its samples, so a quiet group is not crowded out by a busy one.

    ``threshold`` fixes the distance. ``keep`` (a fraction) searches the fixed threshold
    whose selection comes nearest ``keep * n`` samples (bisection, about 30 passes of the
    filter): the whole array is at hand, so every part of it is judged by the same
    threshold, and no two kept samples less than ``capacity`` keeps apart are closer than
    it. A stream that cannot be revisited uses :class:`NoveltyFilter` with ``keep=``
    instead (an adaptive threshold). Other options as for :class:`NoveltyFilter`.

    Example::

        idx = select_novel(windows, keep=0.1, pool=4)
        model.fit(windows[idx], labels[idx])
    """
    a = np.ascontiguousarray(np.asarray(_numpy(x), dtype=np.float32))
    if a.ndim not in (2, 3) or a.shape[0] == 0:
        raise ValueError(f"x must be (n, time) or (n, channels, time) with n > 0, got shape {a.shape}")
    if (keep is None) == (threshold is None):
        raise ValueError("give exactly one of keep (a fraction) and threshold (a distance)")
    if groups is not None:
        g = np.asarray(_numpy(groups))
        if g.shape != (a.shape[0],):
            raise ValueError(f"groups must have one label per sample ({a.shape[0]}), got shape {g.shape}")
        parts = [np.flatnonzero(g == v) for v in np.unique(g)]
        kept = [p[select_novel(a[p], keep=keep, threshold=threshold, **options)] for p in parts]
        return np.sort(np.concatenate(kept))
    if threshold is not None:
        return _kept(a, threshold, options)
    # At least one sample: the first is always kept.
    target = max(1.0, _check_fraction(keep, "keep") * a.shape[0])
    best = _kept(a, 0.0, options)
    if len(best) <= target:
        return best
    lo, hi = 0.0, 1.0
    while len(picked := _kept(a, hi, options)) > target:
        lo, hi = hi, 2.0 * hi
        if hi > 1e30:  # every remembered view is within any threshold: only the first is kept
            return picked
    best = picked
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        picked = _kept(a, mid, options)
        if abs(len(picked) - target) < abs(len(best) - target):
            best = picked
        lo, hi = (mid, hi) if len(picked) > target else (lo, mid)
    return best


def _kept(a: np.ndarray, threshold: float, options: dict) -> np.ndarray:
    f = NoveltyFilter(a.shape[1:], threshold=threshold, **options)
    return np.flatnonzero(f.mask(a)).astype(np.int64)


_TORCH_CLASSES: dict = {}


def _torch_classes() -> dict:
    """Builds the torch wrappers on first use (torch is imported only then)."""
    if _TORCH_CLASSES:
        return _TORCH_CLASSES
    import torch.utils.data as tud

    class NovelSampler(tud.Sampler):
        """Samples the indices of a map-style dataset that the novelty filter keeps, in
        order (one pass over ``dataset[i]`` on first use; the selection is then fixed).
        ``key(item)`` is the sample (default: the item, or its first element for tuples).
        Options as for :class:`NoveltyFilter`.

        Example::

            sampler = NovelSampler(train_set, keep=0.2, shape=(3, 64))
            loader = DataLoader(train_set, batch_size=32, sampler=sampler)
        """

        def __init__(self, dataset: Any, *, shape: Any, key: Optional[Callable[[Any], Any]] = None, **options: Any):
            self.dataset, self.shape, self.key, self.options = dataset, shape, key, options
            self._indices: Optional[list] = None

        def indices(self) -> list:
            if self._indices is None:
                f, key = NoveltyFilter(self.shape, **self.options), self.key or _first
                self._indices = [i for i in range(len(self.dataset)) if f.offer(_numpy(key(self.dataset[i])))]
            return self._indices

        def __iter__(self) -> Iterator[int]:
            return iter(self.indices())

        def __len__(self) -> int:
            return len(self.indices())

    class NovelIterableDataset(tud.IterableDataset):
        """The new items of an iterable dataset (a fresh filter per pass, so every epoch
        sees the same selection). With several DataLoader workers each filters its own
        shard. Options as for :class:`NoveltyFilter`.

        Example::

            loader = DataLoader(NovelIterableDataset(stream, keep=0.1, shape=(3, 64)), batch_size=32)
        """

        def __init__(self, source: Iterable[Any], *, shape: Any, key: Optional[Callable[[Any], Any]] = None, **options: Any):
            self.source, self.shape, self.key, self.options = source, shape, key, options
            NoveltyFilter(shape, **options)  # check the options now

        def __iter__(self) -> Iterator[Any]:
            return NoveltyFilter(self.shape, **self.options)(iter(self.source), key=self.key)

    _TORCH_CLASSES.update(NovelSampler=NovelSampler, NovelIterableDataset=NovelIterableDataset)
    return _TORCH_CLASSES


def _first(item: Any) -> Any:
    return item[0] if isinstance(item, tuple) else item


def __getattr__(name: str) -> Any:
    if name in ("NovelSampler", "NovelIterableDataset"):
        return _torch_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
