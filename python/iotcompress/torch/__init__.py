"""PyTorch faces of iotcompress.

* :func:`compression_hook` with :class:`CompressionState`: a DDP communication hook
  (``ddp_model.register_comm_hook(state, compression_hook)``) for threshold, top-k and DGC
  compression over gloo or NCCL.
* :func:`register_gradient_hooks` and :func:`apply_messages`: per-parameter compression
  without DDP (parameter servers, federated rounds, custom transports).
* :class:`RankStates`: every rank's hook state in one checkpoint, each rank restoring its own.
* :class:`SettingsMismatchError` (the ranks' settings differ, found on the first step) and
  :class:`RankFailedError` (another rank's hook failed in this step): what the hook raises
  instead of waiting out the process group's timeout.

Example (the DGC recipe: momentum correction in the hook, plain SGD in the optimizer)::

    from iotcompress.torch import CompressionState, compression_hook
    state = CompressionState(density=0.001, quant="int8", momentum=0.9, warmup_steps=200, clip_norm=5.0)
    ddp_model.register_comm_hook(state, compression_hook)
    optimizer = torch.optim.SGD(ddp_model.parameters(), lr=0.1, momentum=0.0)
"""

from .grad_hooks import GradientHooks, apply_messages, register_gradient_hooks
from .hook import CompressionState, RankFailedError, SettingsMismatchError, compression_hook, warmup_density
from .checkpoint import RankStates

__all__ = [
    "CompressionState",
    "compression_hook",
    "warmup_density",
    "RankStates",
    "GradientHooks",
    "register_gradient_hooks",
    "apply_messages",
    "RankFailedError",
    "SettingsMismatchError",
]
