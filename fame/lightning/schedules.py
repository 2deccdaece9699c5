"""Learning-rate schedules of the Lightning modules, built from ``_partial_: true`` config nodes
(``configs/module/scheduler/``).

Each builder takes the optimizer and the run's length in optimizer steps (the Trainer's
``estimated_stepping_batches``) and returns Lightning's lr-scheduler config (the scheduler and
whether it steps per ``"step"`` or per ``"epoch"``), so a module calls
``scheduler(optimizer, total_steps=...)`` whatever the schedule.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import lightning as L
import torch
from hydra.utils import instantiate
from torch.optim import Optimizer

from ..files import plain


def polynomial_decay(step: int, total_steps: int, warmup_steps: int = 0, power: float = 2.0) -> float:
    """arcface_torch's PolyScheduler factor: ``step / warmup`` during warm-up, then
    ``(1 - (step - warmup) / (total - warmup)) ** power``, 0 from ``total_steps`` on."""
    if step < warmup_steps:
        return step / warmup_steps
    remaining = 1.0 - (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return max(remaining, 0.0) ** power


def _finite(total_steps: float, name: str) -> int:
    if total_steps == float("inf"):
        raise ValueError(f"the {name} schedule needs a finite run: set trainer max_steps or max_epochs")
    return int(total_steps)


def polynomial(optimizer: Optimizer, total_steps: float, power: float = 2.0, warmup_steps: int = 0) -> Dict[str, Any]:
    """arcface_torch's polynomial decay per step after ``warmup_steps`` of linear warm-up
    (:func:`polynomial_decay`)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    steps = _finite(total_steps, "polynomial")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: polynomial_decay(step, steps, warmup_steps, power)
    )
    return {"scheduler": schedule, "interval": "step"}


def one_cycle(optimizer: Optimizer, total_steps: float, warmup_fraction: float = 0.3) -> Dict[str, Any]:
    """One-cycle per step up to the optimizer's learning rate, warming up over ``warmup_fraction``
    of the run (torch's ``OneCycleLR``)."""
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[group["lr"] for group in optimizer.param_groups],
        total_steps=_finite(total_steps, "one-cycle"),
        pct_start=warmup_fraction,
    )
    return {"scheduler": schedule, "interval": "step"}


def cosine(optimizer: Optimizer, total_steps: float) -> Dict[str, Any]:
    """Cosine annealing per step from the optimizer's learning rate to 0 at the end of the run."""
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=_finite(total_steps, "cosine"))
    return {"scheduler": schedule, "interval": "step"}


def step_decay(optimizer: Optimizer, total_steps: float, step_epochs: int = 30, gamma: float = 0.1) -> Dict[str, Any]:
    """The learning rate times ``gamma`` every ``step_epochs`` epochs (``total_steps`` unused)."""
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_epochs, gamma=gamma)
    return {"scheduler": schedule, "interval": "epoch"}


def plain_specs(optimizer: Any, scheduler: Any) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """The optimizer and scheduler specs a module was given, as plain dicts for its hyper-parameters.

    Guards direct Python use of the modules (the entry points check these nodes in
    :class:`fame.schemas.TrainConfig`): each must be a mapping with a ``_target_``, the scheduler
    may be None.
    """
    optimizer, scheduler = plain(optimizer), plain(scheduler)
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("_target_"), str):
        raise ValueError(
            "optimizer must be one of the specs of configs/module/optimizer/ (a mapping with a _target_ "
            f"such as torch.optim.SGD, called as optimizer(params)), got {optimizer!r}"
        )
    if scheduler is not None and (not isinstance(scheduler, dict) or not isinstance(scheduler.get("_target_"), str)):
        raise ValueError(
            "scheduler must be None or one of the specs of configs/module/scheduler/ (a mapping with a "
            f"_target_ such as fame.lightning.schedules.cosine), got {scheduler!r}"
        )
    return optimizer, scheduler


def optimization(
    module: L.LightningModule, optimizer: Mapping[str, Any], scheduler: Optional[Mapping[str, Any]]
) -> Any:
    """What ``configure_optimizers`` returns for a module's plain optimizer and scheduler specs
    (``_partial_`` nodes, ``configs/module/optimizer/`` and ``configs/module/scheduler/``): the
    optimizer over the trainable parameters, ``optimizer(params)``, and with a scheduler spec its
    lr-scheduler config, ``scheduler(optimizer, total_steps=...)``; a null scheduler keeps the
    learning rate constant."""
    parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
    built = instantiate({**optimizer, "_partial_": True}, _convert_="all")(parameters)
    if scheduler is None:
        return built
    schedule = instantiate({**scheduler, "_partial_": True}, _convert_="all")
    return {"optimizer": built, "lr_scheduler": schedule(built, total_steps=module.trainer.estimated_stepping_batches)}


def legacy_optimization(hyperparameters: Mapping[str, Any], nesterov: bool) -> Dict[str, Any]:
    """The ``optimizer`` and ``scheduler`` specs of a checkpoint written before they were config
    nodes (``optimizer: "sgd" | "adamw"``, ``lr``, ``momentum``, ``weight_decay``, ``schedule`` and
    its options as separate hyper-parameters); {} for a checkpoint of today's layout."""
    name = hyperparameters.get("optimizer")
    if not isinstance(name, str):
        return {}
    optimizer: Dict[str, Any] = {
        "_partial_": True,
        "lr": hyperparameters.get("lr"),
        "weight_decay": hyperparameters.get("weight_decay"),
    }
    if name == "sgd":
        optimizer.update(_target_="torch.optim.SGD", momentum=hyperparameters.get("momentum"))
        if nesterov:
            optimizer["nesterov"] = hyperparameters.get("nesterov", False)
    else:
        optimizer["_target_"] = "torch.optim.AdamW"
    schedule = hyperparameters.get("schedule")
    options = {
        "onecycle": ("one_cycle", ("warmup_fraction",)),
        "cosine": ("cosine", ()),
        "step": ("step_decay", ("step_epochs", "gamma")),
        "polynomial": ("polynomial", ("power", "warmup_steps")),
    }
    if schedule not in options:  # "constant"
        return {"optimizer": optimizer, "scheduler": None}
    builder, keys = options[schedule]
    scheduler = {
        "_target_": f"{__name__}.{builder}",
        "_partial_": True,
        **{key: hyperparameters[key] for key in keys if key in hyperparameters},
    }
    return {"optimizer": optimizer, "scheduler": scheduler}
