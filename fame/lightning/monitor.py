"""Watch where a model looks while it trains: FAME maps of fixed probes, scored every few epochs.

:class:`ExplanationMonitor` explains a fixed set of validation samples (classification) or pairs
(verification) at the end of validation every ``every_n_epochs`` epochs and once more at the end
of ``fit``, with FAME and optionally a baseline, through the method registry
(:func:`fame.explain.registry.get_method`). Each check writes an overlay grid
``<dirpath>/monitor/epoch_XXX.png`` (also logged to W&B when a ``WandbLogger`` is attached) and
per-check scalars to every attached logger (CSV included):

    monitor/<method>/pointing_game/<mask>    Zhang et al.'s pointing game on each evidence mask
    monitor/<method>/relevance_mass/<mask>   share of the map's mass inside the mask (Arras et al.)
    monitor/<method>/deletion_auc            classification: normalized AUC of the target's softmax
                                             probability as the top-ranked pixels are zeroed (RISE
                                             deletion; lower = more faithful)
    monitor/<method>/similarity_drop         verification: cos(g, p) - cos(g, p with the top
                                             ``removal_fraction`` of e+ pixels zeroed)
    monitor/<method>/stability               mean Spearman rank correlation of each probe's map
                                             with its map at the previous check
    monitor/seconds                          wall time of the check

``<method>`` is ``fame`` or the baseline's name; ``<mask>`` the names given by ``mask_keys`` for
the masks the samples carry (``object`` and ``watermark`` on the shortcut shapes, ``identity`` on
synthetic face pairs).

Cost: a check runs ``iterations`` forward/backward passes over ``num_probes`` images (FAME),
one Grad-CAM pass, ``len(deletion_fractions)`` forward passes (deletion AUC) and draws the grid
(matplotlib, about half of a check's time at the defaults). It scales with ``num_probes`` x
``iterations`` and with 1 / ``every_n_epochs``. Measured on the shortcut shapes (SmallCNN widths
8-64, 3000 / 500 images of 64 px, batch 64, 6 epochs, CPU, one thread): the defaults (8 probes,
30 iterations, every 2 epochs) add 6.7 % CPU time (3.7 % wall time on a shared machine); every
epoch adds 17 % CPU time. A check costs about as much as 8 training steps of 64 images.

Under DDP rank r explains probes r, r + W, ...; the results are gathered with
``all_gather_object`` (every rank enters it, also with no probes), de-duplicated by sample id, and
rank zero writes and logs. Random number generator states (python, numpy, torch, CUDA once
initialised) are restored after each check (Lightning's ``isolate_rng``), the model is left as found
(train/eval flags, ``requires_grad``, gradients: :func:`fame.explain.explaining`), so training is the
same with and without the monitor.
The history (one record per check: ``epoch``, ``step``, ``metrics``, and ``explained``, the
``[id, rank]`` pairs gathered) and the last maps (the stability score's reference) are the
callback's state and travel in checkpoints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.seed import isolate_rng
from scipy.stats import spearmanr
from torch import Tensor, nn

from ..data.face_modules import spread_indices
from ..explain.guard import explaining
from ..metrics.localization import pointing_game, relevance_mass_accuracy
from ..tasks import Task, sample_task, task_names, task_of
from ..viz import save_overlay_grid

#: FAME settings of the monitor (FameConfig fields): 30 steps of 1/255 and the blur of the 64 px
#: shapes (the paper's 49 / 7.7 at 224 px scaled by 64 / 224). Scale the blur with the image size.
MONITOR_FAME = {"iterations": 30, "step_size": 1.0 / 255.0, "blur_kernel": 15, "blur_sigma": 2.2}
#: Item key of an evidence mask -> the name it has in the logged scalars.
MASK_NAMES = {"mask": "object", "watermark_mask": "watermark", "probe_mask": "identity"}
DELETION_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
TARGETS = ("prediction", "label")


@dataclass
class Probe:
    """One monitored sample: the explained image, its class (classification) or its pair's other
    image (verification), and its evidence masks by metric name."""

    id: str
    image: Tensor
    label: Optional[int] = None
    reference: Optional[Tensor] = None
    same: Optional[bool] = None
    masks: Dict[str, Tensor] = field(default_factory=dict)


def rank_correlation(current: np.ndarray, previous: np.ndarray) -> float:
    """Spearman's rho of two maps' pixels (ties get average ranks); NaN when either map is constant."""
    current, previous = current.astype(np.float64).ravel(), previous.astype(np.float64).ravel()
    if np.ptp(current) == 0 or np.ptp(previous) == 0:
        return math.nan
    return float(spearmanr(current, previous).statistic)


def first_validation_dataset(trainer: L.Trainer):
    """The dataset of the (first) validation dataloader of ``trainer``."""
    loaders = trainer.val_dataloaders
    if loaders is None and trainer.datamodule is not None:
        loaders = trainer.datamodule.val_dataloader()
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    dataset = getattr(loaders, "dataset", None)
    if dataset is None:
        raise RuntimeError(
            "ExplanationMonitor takes its probes from the validation data, but the trainer has no validation "
            "dataloader; give the datamodule a val_dataloader() (or pass val_dataloaders to fit/validate)"
        )
    return dataset


class ExplanationMonitor(L.Callback):
    """Explain fixed probes with FAME (and a baseline) during training and log where the evidence is.

    num_probes:          samples (or pairs) taken evenly spread over the validation set (8).
    probe_ids:           explicit sample ids to monitor instead (found by scanning the dataset).
    every_n_epochs:      check after every n-th validation epoch (2); a final check runs at the
                         end of fit, and one at the end of a standalone ``trainer.validate``.
    fame:                FameConfig fields for FAME (defaults :data:`MONITOR_FAME`; verification
                         stops at epsilon 0.01 unless given). ``iterations`` sets the cost.
    loss:                FAME's classification loss ("logit", "margin", ...; see
                         ``explain_classification``).
    target:              classification: explain the "prediction" (where the model looks for
                         what it says) or the "label".
    baseline:            a registered method name (``fame.explain.registry``) shown and scored
                         beside FAME ("gradcam"), or None.
    mask_keys:           item key of an evidence mask -> its name in the scalars.
    deletion_fractions:  the fractions of pixels zeroed for the deletion AUC (classification).
    removal_fraction:    the share of top e+ pixels zeroed for the similarity drop (verification).
    dirpath:             where ``monitor/epoch_XXX.png`` go (default: the run folder of the first
                         CSV / TensorBoard logger, else the trainer's log_dir).
    log_images:          also log the grid to W&B loggers.
    """

    def __init__(
        self,
        num_probes: int = 8,
        probe_ids: Optional[Sequence[str]] = None,
        every_n_epochs: int = 2,
        fame: Optional[Mapping[str, Any]] = None,
        loss: str = "logit",
        target: str = "prediction",
        baseline: Optional[str] = "gradcam",
        mask_keys: Optional[Mapping[str, str]] = None,
        deletion_fractions: Sequence[float] = DELETION_FRACTIONS,
        removal_fraction: float = 0.1,
        dirpath: Optional[str] = None,
        log_images: bool = True,
    ):
        super().__init__()
        if probe_ids is None and (isinstance(num_probes, bool) or int(num_probes) != num_probes or num_probes < 1):
            raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
        if isinstance(every_n_epochs, bool) or int(every_n_epochs) != every_n_epochs or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive integer, got {every_n_epochs!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(map(repr, TARGETS))}, got {target!r}")
        if not 0.0 < removal_fraction <= 1.0:
            raise ValueError(f"removal_fraction must be in (0, 1], got {removal_fraction!r}")
        fractions = [float(f) for f in deletion_fractions]
        if len(fractions) < 2 or fractions != sorted(fractions) or not 0.0 <= fractions[0] <= fractions[-1] <= 1.0:
            raise ValueError(
                f"deletion_fractions must be at least two increasing values in [0, 1], got {deletion_fractions!r}"
            )
        self.num_probes = int(num_probes)
        self.probe_ids = [str(i) for i in probe_ids] if probe_ids is not None else None
        self.every_n_epochs = int(every_n_epochs)
        self.fame_options = {  # plain values: a config's lists (clamp) become tuples
            key: tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
            for key, value in {**MONITOR_FAME, **dict(fame or {})}.items()
        }
        self.loss = loss
        self.target = target
        self.baseline = baseline
        self.mask_keys = dict(MASK_NAMES if mask_keys is None else mask_keys)
        self.deletion_fractions = fractions
        self.removal_fraction = float(removal_fraction)
        self.dirpath = dirpath
        self.log_images = log_images
        known = {name for task in task_names() for name in task_of(task).method_names()}
        if baseline is not None and baseline not in known:
            raise ValueError(f"unknown baseline {baseline!r}; registered methods: {', '.join(sorted(known))}")
        self.history: List[Dict[str, Any]] = []
        self.previous_maps: Dict[str, Dict[str, Tensor]] = {}
        self._probes: Optional[List[Probe]] = None
        self._task: Optional[Task] = None
        self._train_epoch = 0

    # -- Lightning hooks ---------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_epoch = trainer.current_epoch

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self.check(trainer, pl_module, trainer.current_epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module, self._train_epoch)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            num_probes=self.num_probes,
            probe_ids=self.probe_ids,
            every_n_epochs=self.every_n_epochs,
            baseline=self.baseline,
            dirpath=self.dirpath,
        )

    def state_dict(self) -> Dict[str, Any]:
        return {"history": self.history, "previous_maps": self.previous_maps}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.previous_maps = {method: dict(maps) for method, maps in state_dict["previous_maps"].items()}

    # -- one check ---------------------------------------------------------------------------

    @property
    def methods(self) -> List[str]:
        """FAME and the baseline, if any."""
        return ["fame"] + ([self.baseline] if self.baseline else [])

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> Optional[Dict[str, float]]:
        """Explain the probes, score and log the maps; once per training step (a validate right
        after fit, or several validations in one epoch, add nothing). Returns the logged scalars."""
        step = trainer.global_step
        if any(record["step"] == step for record in self.history):
            return None
        log_dir = self.output_dir(trainer)
        start = time.perf_counter()
        with isolate_rng(include_cuda=torch.cuda.is_initialized()), torch.inference_mode(False), torch.no_grad():
            probes = self.probes(trainer)
            share = probes[trainer.global_rank :: trainer.world_size]
            local = self.explain(pl_module, share) if share else []
            for result in local:
                result["rank"] = trainer.global_rank
        results = self.gather(trainer, local)
        by_id = {result["id"]: result for result in results}
        missing = [probe.id for probe in probes if probe.id not in by_id]
        if missing:
            raise RuntimeError(f"ExplanationMonitor: no result gathered for probes {missing}")
        ordered = [by_id[probe.id] for probe in probes]
        metrics = self.summarize(ordered)
        explained = [[result["id"], result["rank"]] for result in results]
        self.previous_maps = {
            method: {r["id"]: torch.from_numpy(r["maps"][method]) for r in ordered} for method in self.methods
        }
        if trainer.is_global_zero:
            grid = self.save_grid(Path(log_dir) / "monitor" / f"epoch_{epoch:03d}.png", probes, ordered)
        metrics["monitor/seconds"] = time.perf_counter() - start
        self.history.append({"epoch": int(epoch), "step": int(step), "metrics": metrics, "explained": explained})
        if trainer.is_global_zero:
            self.write_logs(trainer, metrics, epoch, grid)
        return metrics

    def output_dir(self, trainer: L.Trainer) -> str:
        """``dirpath``, else the run folder of the first CSV or TensorBoard logger, else the
        trainer's log_dir; rank zero's choice (a collective: every rank calls it)."""
        if self.dirpath is not None:
            return str(self.dirpath)
        versioned = [logger for logger in trainer.loggers if isinstance(logger, (CSVLogger, TensorBoardLogger))]
        folder = versioned[0].log_dir if versioned else trainer.log_dir or trainer.default_root_dir
        return trainer.strategy.broadcast(str(folder))

    def probes(self, trainer: L.Trainer) -> List[Probe]:
        """The probes, read from the validation data on first use (the same ones on every rank)."""
        if self._probes is None:
            dataset = first_validation_dataset(trainer)
            if self.probe_ids is None:
                positions = spread_indices(len(dataset), self.num_probes)
            else:
                positions = self.find_ids(dataset, self.probe_ids)
            self._probes = [self.read_probe(dataset[position], position) for position in positions]
        return self._probes

    @staticmethod
    def find_ids(dataset, wanted: Sequence[str]) -> List[int]:
        found: Dict[str, int] = {}
        for position in range(len(dataset)):
            sample_id = str(dataset[position].get("id", position))
            if sample_id in wanted:
                found[sample_id] = position
                if len(found) == len(set(wanted)):
                    break
        absent = [sample_id for sample_id in wanted if sample_id not in found]
        if absent:
            raise KeyError(
                f"ExplanationMonitor: probe ids {absent} are not in the validation dataset ({len(dataset)} samples)"
            )
        return [found[sample_id] for sample_id in wanted]

    def read_probe(self, item: Mapping[str, Any], position: int) -> Probe:
        masks = {name: torch.as_tensor(item[key]).float() for key, name in self.mask_keys.items() if key in item}
        sample_id = str(item.get("id", position))
        task = sample_task(item, f"ExplanationMonitor: validation sample {sample_id}")
        if self._task is not None and self._task is not task:
            raise ValueError(f"ExplanationMonitor: the validation samples mix {self._task.name} and {task.name} items")
        self._task = task
        return Probe(sample_id, masks=masks, **task.probe_fields(item, sample_id))

    def explain(self, pl_module: L.LightningModule, probes: List[Probe]) -> List[Dict[str, Any]]:
        """Maps and per-probe scores of this rank's ``probes`` (plain numbers and arrays, for gathering)."""
        task = self._task
        model = task.network(pl_module)
        device = pl_module.device
        images = torch.stack([probe.image for probe in probes]).to(device)
        ids = [probe.id for probe in probes]
        other, shown = task.monitor_inputs(model, probes, self.target, device)
        results: List[Dict[str, Any]] = [{"id": probe.id, "maps": {}, "scores": {}} for probe in probes]
        for method in self.methods:
            options = task.monitor_options(self.fame_options, self.loss) if method == "fame" else {}
            maps = task.method(method)(model, images, other, ids=ids, **options).maps[task.monitored_output].float()
            scores = self.score(model, images, other, maps, probes)
            for k, result in enumerate(results):
                result["maps"][method] = maps[k, 0].cpu().numpy().astype(np.float16)
                result["scores"].update(
                    {f"monitor/{method}/{name}": float(values[k]) for name, values in scores.items()}
                )
        for result, values in zip(results, shown):
            result.update(values)
        return results

    def score(
        self, model: nn.Module, images: Tensor, other: Tensor, maps: Tensor, probes: List[Probe]
    ) -> Dict[str, Tensor]:
        """Per-probe scores (name -> (B,)) of one method's maps; NaN where a probe lacks a mask."""
        scores: Dict[str, Tensor] = {}
        for name in dict.fromkeys(name for probe in probes for name in probe.masks):
            present = [k for k, probe in enumerate(probes) if name in probe.masks]
            masks = torch.stack([probes[k].masks[name] for k in present]).to(maps.device)
            for metric, function in (("pointing_game", pointing_game), ("relevance_mass", relevance_mass_accuracy)):
                values = torch.full((len(probes),), math.nan)
                values[present] = function(maps[present], masks).float().cpu()
                scores[f"{metric}/{name}"] = values
        with explaining(model), torch.no_grad():
            scores.update(
                self._task.monitor_scores(model, images, other, maps, self.deletion_fractions, self.removal_fraction)
            )
        return scores

    def gather(self, trainer: L.Trainer, local: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Every rank's results on every rank (each rank enters the collective, with or without probes)."""
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return local
        gathered: List[Optional[List[Dict[str, Any]]]] = [None] * trainer.world_size
        dist.all_gather_object(gathered, local)
        return [result for part in gathered for result in part]

    def summarize(self, results: List[Dict[str, Any]]) -> Dict[str, float]:
        """Means over probes of each score (NaN ignored), and the stability of each method's maps."""
        names = dict.fromkeys(name for result in results for name in result["scores"])
        metrics = {}
        for name in names:
            values = [result["scores"].get(name, math.nan) for result in results]
            finite = [v for v in values if not math.isnan(v)]
            if finite:
                metrics[name] = float(np.mean(finite))
        for method in self.methods:
            previous = self.previous_maps.get(method, {})
            rhos = [
                rank_correlation(result["maps"][method], previous[result["id"]].numpy())
                for result in results
                if result["id"] in previous
            ]
            rhos = [rho for rho in rhos if not math.isnan(rho)]
            if rhos:
                metrics[f"monitor/{method}/stability"] = float(np.mean(rhos))
        return metrics

    # -- output (rank zero) ------------------------------------------------------------------

    def save_grid(self, path: Path, probes: List[Probe], results: List[Dict[str, Any]]) -> Path:
        """probes x [image with its evidence masks outlined, one overlay per method]."""
        titles = [self._task.probe_title(probe, result) for probe, result in zip(probes, results)]
        outlines = [torch.stack(list(probe.masks.values())).amax(dim=0) if probe.masks else None for probe in probes]
        return save_overlay_grid(
            [probe.image for probe in probes],
            {method: [result["maps"][method] for result in results] for method in self.methods},
            path,
            row_titles=titles,
            masks=outlines if all(o is not None for o in outlines) else None,
        )

    def write_logs(self, trainer: L.Trainer, metrics: Dict[str, float], epoch: int, grid: Path) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({**metrics, "epoch": epoch}, step=trainer.global_step)
            if self.log_images and isinstance(logger, WandbLogger):
                logger.log_image("monitor/overlays", [str(grid)], step=trainer.global_step, caption=[f"epoch {epoch}"])
            logger.save()
