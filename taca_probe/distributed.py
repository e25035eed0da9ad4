"""Running one command on several processes (``torchrun`` or ``accelerate launch``).

Both launchers set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``);
nothing here is a scheduler of its own. The process group is used for barriers only, on gloo,
which works whatever the device; the data never travels between ranks: each rank writes its own
samples into the shared store.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import TacaProbeError

__all__ = ["Ranks", "ranks_from_env"]


@dataclass
class Ranks:
    """This process's place among the launched ones."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's share of ``items``: every ``world``-th, starting at ``rank``."""
        return items[self.rank :: self.world]

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local rank; the CPU stays the CPU."""
        if device.type == "cuda" and device.index is None and self.world > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self, timeout_s: float = 3600.0) -> None:
        if self.world > 1:
            if not dist.is_initialized():
                # Joined lazily, after the model is loaded: libraries that see an initialized
                # group save weights on rank 0 only, which breaks the cache build of an embedded
                # model that every rank may be doing at once.
                dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=2))
                self._group = True
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)

    def close(self) -> None:
        if self._group:
            dist.destroy_process_group()
            self._group = False


def ranks_from_env() -> Ranks:
    """The launcher's ranks (one process when launched plainly); the group is joined at the first barrier.

    Values set by hand that no launcher would set are a :class:`TacaProbeError` naming the variable:
    a rank outside 0..WORLD_SIZE-1 would wait at the first barrier for ranks that never come.
    """
    world = _env_int("WORLD_SIZE", "1", 1)
    if world <= 1:
        return Ranks()
    rank = _env_int("RANK", None, 0)
    if rank >= world:
        raise TacaProbeError(f"environment variable RANK={rank} is not below WORLD_SIZE={world}; "
                             "start the processes with torchrun or accelerate launch")
    return Ranks(rank=rank, world=world, local_rank=_env_int("LOCAL_RANK", str(rank), 0))


def _env_int(name: str, default: str | None, least: int) -> int:
    value = os.environ.get(name, default)
    if value is None:
        raise TacaProbeError(f"environment variable {name} is not set, but WORLD_SIZE is above 1; "
                             "start the processes with torchrun or accelerate launch")
    try:
        number = int(value)
    except ValueError:
        number = least - 1
    if number < least:
        raise TacaProbeError(f"environment variable {name}={value!r} is not an integer >= {least}; "
                             "start the processes with torchrun or accelerate launch")
    return number
