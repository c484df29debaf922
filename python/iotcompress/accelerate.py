"""Hugging Face Accelerate: register :func:`compression_hook` on a prepared model, with
every rank's hook state in ``accelerator.save_state`` / ``load_state``.

``DistributedDataParallelKwargs(comm_hook=...)`` cannot carry it: Accelerate looks the
value up in a fixed table of PyTorch's built-in hooks (fp16, bf16, PowerSGD) and registers
nothing for anything else, a function included, without a warning; ``comm_state_option``
only builds a ``PowerSGDState``. So the hook is registered on the DDP model that
``prepare()`` returns.

Example (run with ``accelerate launch`` or ``torchrun``)::

    from accelerate import Accelerator
    from iotcompress.accelerate import register_compression
    from iotcompress.torch import CompressionState

    accelerator = Accelerator()
    model, opt, data = accelerator.prepare(model, opt, data)
    state = register_compression(accelerator, model, CompressionState(density=0.001, quant="int8", momentum=0.9))
    ...
    accelerator.save_state("checkpoint")   # the hook state of every rank goes with it
    accelerator.load_state("checkpoint")   # each rank gets its own back
"""

from typing import Any, Callable

from torch.nn.parallel import DistributedDataParallel

from .torch.checkpoint import RankStates
from .torch.hook import CompressionState, compression_hook

__all__ = ["register_compression"]


def register_compression(accelerator: Any, model: Any, state: CompressionState,
                         hook: Callable = compression_hook) -> CompressionState:
    """Registers ``hook`` (default :func:`compression_hook`) with ``state`` on ``model``, a
    model returned by ``accelerator.prepare``, and registers the hook state of every rank for
    ``accelerator.save_state`` (gathered to the main process, which writes it; on
    ``load_state`` each rank restores its own: see :class:`iotcompress.torch.RankStates`).
    Call it once, after ``prepare`` and before ``load_state``. Returns ``state``.

    Raises :class:`ValueError` when ``model`` is not wrapped in DistributedDataParallel (a
    single process, or a model that did not go through ``prepare``: there is nothing to
    compress), or when ``state`` is not a :class:`CompressionState`.

    Example::

        state = register_compression(accelerator, model, CompressionState(density=0.01, quant="int8"))
    """
    if not isinstance(state, CompressionState):
        raise ValueError(f"register_compression needs a CompressionState, got {type(state).__name__}")
    if not isinstance(model, DistributedDataParallel):
        raise ValueError(
            f"the model is a {type(model).__name__}, not DistributedDataParallel: pass the model returned by "
            "accelerator.prepare() in a multi-process run (accelerate launch / torchrun)"
        )
    model.register_comm_hook(state, hook)
    accelerator.register_for_checkpointing(RankStates(state))
    return state
