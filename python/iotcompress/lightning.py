"""PyTorch Lightning: a DDP strategy that compresses gradients with :func:`compression_hook`
and keeps every rank's hook state in Lightning's checkpoints.

Lightning's own ``DDPStrategy(ddp_comm_hook=..., ddp_comm_state=...)`` registers a comm
hook only when the model is on CUDA: on CPU (gloo) the hook is silently never called.
:class:`CompressionStrategy` registers it on every device, and its checkpoints hold the
hook state of every rank (residuals, velocities, step counts), so
``Trainer.fit(ckpt_path=...)`` resumes bit-identically, with ``torch.load``'s defaults.

Example::

    import lightning as L
    from iotcompress.lightning import CompressionStrategy
    from iotcompress.torch import CompressionState

    state = CompressionState(density=0.001, quant="int8", momentum=0.9, warmup_steps=200)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=CompressionStrategy(state))
    trainer.fit(model, data)                          # buckets travel compressed
    print(state.stats["total_bytes_sent"])
    trainer.fit(model, data, ckpt_path="last.ckpt")   # resumes residuals and momentum too

Works with the ``lightning`` package (``lightning.pytorch``) and, where that is missing,
the standalone ``pytorch_lightning``.
"""

from typing import Any, Callable, Dict, Optional

try:
    from lightning.pytorch.strategies import DDPStrategy
except ImportError:  # pragma: no cover - the standalone package
    from pytorch_lightning.strategies import DDPStrategy

from .torch.checkpoint import RankStates
from .torch.hook import CompressionState, compression_hook

__all__ = ["CompressionStrategy", "CHECKPOINT_KEY"]

#: Where the hook states of every rank live in a Lightning checkpoint.
CHECKPOINT_KEY = "iotcompress_hook_states"


class CompressionStrategy(DDPStrategy):
    """``DDPStrategy`` with :func:`iotcompress.torch.compression_hook` registered on CPU and
    GPU alike, and the hook state of every rank saved in and restored from checkpoints.

    ``state`` is this process's :class:`iotcompress.torch.CompressionState` (each rank makes
    its own, with the same options); ``hook`` defaults to :func:`compression_hook`. Every
    other keyword goes to ``DDPStrategy`` (``find_unused_parameters``, ``start_method``,
    ``process_group_backend``, ``bucket_cap_mb``, ...); ``ddp_comm_hook`` and
    ``ddp_comm_state`` are this class's job and are refused.

    Saving (``trainer.save_checkpoint``, ``ModelCheckpoint``; Lightning calls it on every
    rank) gathers every rank's hook state to rank 0, which writes them under
    :data:`CHECKPOINT_KEY`. Loading gives each rank its own; a checkpoint written by another
    number of ranks is refused with :class:`ValueError`. A checkpoint without hook states
    (written by plain DDP) loads and starts the hook afresh.

    Example::

        trainer = L.Trainer(accelerator="cpu", devices=2, max_epochs=4,
                            strategy=CompressionStrategy(CompressionState(density=0.01, quant="int8")))
    """

    strategy_name = "iotcompress_ddp"

    def __init__(self, state: CompressionState, hook: Callable = compression_hook, **kwargs: Any) -> None:
        if not isinstance(state, CompressionState):
            raise ValueError(f"CompressionStrategy needs a CompressionState, got {type(state).__name__}")
        for refused in ("ddp_comm_hook", "ddp_comm_state"):
            if refused in kwargs:
                raise ValueError(f"CompressionStrategy registers the hook itself: leave out {refused}=")
        super().__init__(ddp_comm_state=state, ddp_comm_hook=hook, **kwargs)
        self.compression = state
        self._rank_states = RankStates(state)

    def _register_ddp_hooks(self) -> None:
        # DDPStrategy does this only for CUDA models; a comm hook works on gloo as well.
        assert self.model is not None
        self.model.register_comm_hook(self._ddp_comm_state, self._ddp_comm_hook)

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        gathered = self._rank_states.state_dict()  # on every rank: Lightning calls this on every rank
        if gathered is not None:
            checkpoint = {**checkpoint, CHECKPOINT_KEY: gathered}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> Dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if CHECKPOINT_KEY in checkpoint:
            self._rank_states.load_state_dict(checkpoint[CHECKPOINT_KEY])
        return checkpoint
