"""What Lightning's resume leaves out: the random states, and the loader position mid-epoch.

Lightning checkpoints restore the weights, optimizer, schedulers, loop counters and callback states,
but not the global random generators that dropout (and anything else calling ``torch.rand`` and
friends in the training process) draws from; and the position of a stateful training loader is
restored only when Lightning builds the loader after the loop state, which it does not when
``configure_optimizers`` asks for ``estimated_stepping_batches`` (every per-step schedule here).
:class:`ExactResume` adds both. Together with the training loaders of :mod:`fame.data.modules`
(order from seed and epoch, flips keyed by sample id, position in the checkpoint) a run killed and
resumed from its last checkpoint, at an epoch boundary or mid-epoch, ends with the weights an
uninterrupted run would have.
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn


def capture_random_state() -> Dict[str, Any]:
    """This process's python, numpy, torch and (initialised) CUDA generator states as plain values
    (tuples, lists, ints, byte tensors) that ``torch.load(weights_only=True)`` reads back."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_random_state(state: Dict[str, Any]) -> None:
    """Set the generators to a :func:`capture_random_state` result (CUDA ones when initialised here
    and captured on as many devices)."""
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_initialized() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class ExactResume(L.Callback):
    """Every rank's random generator states in each checkpoint, restored when fit resumes from it;
    and the training loader's position of a mid-epoch checkpoint, loaded before its first batch.

    The states are those at the moment the checkpoint is written (the end of an epoch, or of a
    training step for ``every_n_train_steps`` checkpoints). They are set back in
    ``on_train_start``, after the sanity check (whose loaders draw from the generators too) and
    after the ``on_train_start`` of callbacks listed before this one, right before the first
    resumed training batch. Writing a checkpoint gathers the states of all ranks (a collective:
    Lightning writes checkpoints from every rank); a run resumed on another number of processes
    keeps its own states, with a warning.

    A mid-epoch checkpoint holds the position of a stateful training loader (Lightning saves
    ``state_dict()`` of :class:`~fame.data.modules.ResumableLoader`); when Lightning built the
    loader before restoring the loop (``estimated_stepping_batches``) and so skipped loading it,
    it is loaded here, by Lightning's own loader, before the iteration starts.
    """

    def __init__(self) -> None:
        self.loaded: Optional[List[Dict[str, Any]]] = None

    def state_dict(self) -> Dict[str, Any]:
        local = capture_random_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, local)
            return {"ranks": ranks}
        return {"ranks": [local]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.loaded = list(state_dict["ranks"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop._load_combined_loader_states()  # a no-op unless restarting with states not loaded yet
        if self.loaded is None:
            return
        ranks, self.loaded = self.loaded, None
        if len(ranks) != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the random states of {len(ranks)} processes, this run has "
                f"{trainer.world_size}: they are not restored, so the resumed run differs from an uninterrupted one"
            )
            return
        restore_random_state(ranks[trainer.global_rank])
