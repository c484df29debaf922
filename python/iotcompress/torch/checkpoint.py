"""Every rank's hook state in one checkpoint.

A :class:`CompressionState` is per rank: each rank keeps the residuals and velocities of
what *it* has not sent yet. A checkpoint written by rank 0 alone (what trainers do) must
therefore carry every rank's state, and each rank must restore its own.
:class:`RankStates` does both; the Lightning strategy and the Accelerate helper use it, and
it is the recipe for a hand-written loop::

    from iotcompress.torch import RankStates
    hook_states = RankStates(state)
    ...
    gathered = hook_states.state_dict()          # on every rank (a collective)
    if dist.get_rank() == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hook": gathered}, "ckpt.pt")
    ...
    ckpt = torch.load("ckpt.pt")                 # every rank; torch.load's defaults accept it
    hook_states.load_state_dict(ckpt["hook"])    # each rank takes its own

Everything in it is tensors and plain types (what :meth:`CompressionState.state_dict` gives).
"""

from typing import Any, Dict, Optional

import torch.distributed as dist

from .hook import CompressionState

__all__ = ["RankStates"]


class RankStates:
    """A checkpointable view of ``state`` on every rank of its process group.

    :meth:`state_dict` gathers every rank's :meth:`CompressionState.state_dict` to rank
    ``dst`` (a collective: call it on every rank, between steps) and returns
    ``{"world_size": N, "ranks": [state of rank 0, ..., state of rank N-1]}`` there and
    ``None`` on the other ranks. :meth:`load_state_dict` takes that dict on any rank and
    restores this rank's entry; it raises :class:`ValueError` when the checkpoint was written
    by a different number of ranks (the residuals of the missing or extra ranks cannot be
    placed), and leaves ``state`` as it was.

    Example::

        accelerator.register_for_checkpointing(RankStates(state))   # what iotcompress.accelerate does
    """

    __slots__ = ("state", "dst")

    def __init__(self, state: CompressionState, dst: int = 0) -> None:
        if not isinstance(state, CompressionState):
            raise ValueError(f"RankStates needs a CompressionState, got {type(state).__name__}")
        self.state = state
        self.dst = dst

    def _group(self) -> Any:
        return self.state.process_group if self.state.process_group is not None else dist.group.WORLD

    def state_dict(self) -> Optional[Dict[str, Any]]:
        group = self._group()
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        gathered = [None] * world if rank == self.dst else None
        dist.gather_object(self.state.state_dict(), gathered, dst=dist.get_global_rank(group, self.dst), group=group)
        return {"world_size": world, "ranks": gathered} if gathered is not None else None

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        group = self._group()
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if not isinstance(saved, dict) or "ranks" not in saved:
            raise ValueError("not a RankStates checkpoint: expected {'world_size': N, 'ranks': [...]}")
        if saved.get("world_size") != world or len(saved["ranks"]) != world:
            raise ValueError(
                f"the checkpoint holds the hook states of {saved.get('world_size')} ranks, this group has {world}: "
                "each rank's residuals belong to that rank, so resume with the same number of ranks"
            )
        self.state.load_state_dict(saved["ranks"][rank])
