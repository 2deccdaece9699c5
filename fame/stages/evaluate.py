"""evaluate.py: score every map of a store (localisation, ROAD, deletion/insertion, face verification,
the model-randomisation sanity check),
report mean and bootstrap CIs as CSV, markdown tables shaped like the paper's, curves and W&B.

Every score is one row of a long table (method, metric, level, value, sample_id): ``level`` is the
removal percentage / fraction of a curve, empty for scalar metrics.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ..config import ConfigError, check_file_data, config_targets, instantiate, lookup, plain, trusted_file
from ..data.modules import collate_items
from ..lightning.explain import ExplainProgressBar, Indexed
from ..lightning.rank_zero import rank_zero_logger
from ..lightning.score import ScoreModule, ScoreWriter
from ..metrics.localization import boxes_to_masks
from ..metrics.scoring import Scoring
from ..pipeline import build_logger, explained_dataset, explained_model, sanity_records
from ..provenance import checkpoint_digest
from ..schemas import SPLITS, EvaluateConfig, check
from ..store import DamagedMaps, MapStore
from ..sweeps import read_sweep
from ..tasks import task_of
from ..viz import save_comparison_sheet, save_overlay_grid

log = rank_zero_logger(__name__)


class MissingMapsWarning(UserWarning):
    """Some requested methods are absent from the store or not complete."""


def check_evaluate_config(config: DictConfig) -> None:
    """Validate the evaluate config (:class:`fame.schemas.EvaluateConfig`) before reading any store."""
    check(EvaluateConfig, config)


def deletion_protocol(config: DictConfig) -> str:
    """``deletion.protocol`` (checked by :class:`fame.schemas.DeletionKeys`): "fame" (black / blurred
    pixels at ``deletion.fractions``) or "rise" (Petsiuk et al.'s CausalMetric, see
    fame.metrics.faithfulness); absent means "fame"."""
    return lookup(config, "deletion.protocol", default="fame")


def store_config(config: DictConfig, store: MapStore) -> DictConfig:
    """The evaluate config with the data, split and limit the store's maps were made for.

    The store is data: its data config may name the project's builders and the targets of this
    config's ``data`` only (:func:`fame.config.check_file_data`), unless the user trusts the store,
    or the sweep folder that holds it, with ``trust=[PATH]``.
    """
    meta = store.meta
    data, split, limit = meta.get("data"), meta.get("split", "test"), meta.get("limit")
    trusted = trusted_file(config, store.path) or bool(config.get("sweep")) and trusted_file(config, config.sweep)
    check_file_data(data, store.path, "meta.data", trusted=trusted, named=config_targets(config.data))
    a_limit = limit is None or isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
    if not isinstance(data, dict) or split not in SPLITS or not a_limit:
        raise ConfigError(
            f"{store.path} records data={type(data).__name__}, split={split!r} and "
            f"limit={limit!r}; a store of explain.py holds a data config, a split of {', '.join(SPLITS)} "
            "and a limit >= 1 or null"
        )
    with open_dict(config):  # the store's data config may have keys the experiment's has not
        merged = OmegaConf.merge(config, {"data": data, "split": split, "limit": limit})
    OmegaConf.set_struct(merged, True)
    return merged


def complete_entries(store: MapStore, requested: Optional[Sequence[str]]) -> Tuple[List[str], List[str], np.ndarray]:
    """(entries to score, methods missing or incomplete, rows complete in every scored entry)."""
    methods = store.methods
    missing = [m for m in (requested or []) if m not in methods]
    chosen = [m for m in (requested or methods) if m in methods]
    entries, incomplete = [], []
    rows = np.ones(store.num_samples, dtype=bool)
    for method in chosen:
        outputs = store.outputs(method)
        done = np.all([store.completed(entry) for entry in outputs], axis=0)
        if not done.any():
            incomplete.append(method)
            continue
        if not done.all():
            incomplete.append(f"{method} ({int(done.sum())} of {len(done)} maps)")
        entries.extend(outputs)
        rows &= done
    if missing or incomplete:
        warnings.warn(
            f"the store {store.path} lacks maps: missing methods {missing or 'none'}, "
            f"incomplete {incomplete or 'none'}; "
            "the report scores the samples every remaining method has (rerun explain.py to complete it)",
            MissingMapsWarning,
            stacklevel=2,
        )
    return entries, missing + incomplete, np.flatnonzero(rows)


def check_checkpoint(config: DictConfig, store: MapStore, entries: Sequence[str]) -> None:
    """Refuse to score maps with a model other than the one they explain."""
    if config.checkpoint is None:
        return
    digest = checkpoint_digest(config.checkpoint)
    for entry in entries:
        recorded = store.method_settings(entry).get("checkpoint_sha256")
        if recorded is not None and recorded != digest:
            raise ConfigError(
                f"checkpoint={config.checkpoint} is not the model the maps of {entry!r} in {store.path} were made with "
                f"(sha256 {digest[:12]} vs {recorded[:12]}); pass that checkpoint, or re-explain with this one"
            )


def scoring_of(config: DictConfig) -> Scoring:
    """The score settings of the evaluate config as plain values."""
    return Scoring(
        families=tuple(config.families),
        localization_metrics=tuple(config.localization.metrics),
        mask_keys=tuple(config.data.get("mask_keys") or []),
        road_percentages=tuple(config.road.percentages),
        road_orders=tuple(config.road.orders),
        road_imputations=tuple(config.road.imputations),
        deletion_protocol=deletion_protocol(config),
        deletion_fractions=tuple(config.deletion.fractions),
        verification_percentages=tuple(config.verification.percentages),
        batch_size=config.batch_size,
        seed=config.seed,
    )


def select_samples(value: Any, keep: List[int], size: int) -> Any:
    """The entries ``keep`` of one batch field (a tensor or a per-sample list); other values as they are."""
    if isinstance(value, Tensor) and value.shape[:1] == (size,):
        return value[keep]
    if isinstance(value, (list, tuple)) and len(value) == size:
        return [value[k] for k in keep]
    return value


def scoring_trainer(config: DictConfig, writer: ScoreWriter) -> L.Trainer:
    """The Trainer that scores the maps (``Trainer.predict``): keyword arguments from the config's
    ``trainer`` group (configs/trainer/predict.yaml by default; trainer=cpu_ddp / ddp for several
    processes), ``precision`` included; ``device`` other than auto sets the accelerator (cpu, cuda,
    mps) and, for ``cuda:N``, the GPU."""
    options = plain(config.trainer)
    if config.device != "auto":
        device = torch.device(config.device)
        options["accelerator"] = device.type
        if device.index is not None:
            options["devices"] = [device.index]
    callbacks = [writer]
    if options.get("enable_progress_bar", True):
        callbacks.append(ExplainProgressBar())
    return instantiate(options, "trainer", logger=False, enable_checkpointing=False, callbacks=callbacks)


def store_key(store: MapStore) -> str:
    """A short name of the store's path, the same on every rank: the folder of its scores' rank files."""
    return hashlib.sha256(str(Path(store.path).resolve()).encode()).hexdigest()[:12]


def score_store(config: DictConfig, store: MapStore) -> Tuple[pd.DataFrame, Dict[str, Any]]:
    """The long table of every score of every complete entry of the store, and what was left out."""
    config = store_config(config, store)
    task = task_of(store.meta["task"])
    entries, missing, rows = complete_entries(store, config.methods)
    if not entries:
        raise ConfigError(f"the store {store.path} has no complete maps to evaluate (methods {store.methods})")
    check_checkpoint(config, store, entries)
    writer = ScoreWriter(Path(config.output_dir) / f".scores-{store_key(store)}")
    trainer = scoring_trainer(config, writer)
    device = trainer.strategy.root_device  # this process's device: the threshold and the sanity check run on it
    # as explain.py: every rank builds the same model, one of random initialisation (checkpoint=null) included
    L.seed_everything(config.seed, workers=True, verbose=False)
    dataset = explained_dataset(config)
    model = explained_model(config).to(device)
    excluded: Dict[str, List[str]] = {}
    if config.exclude_empty:  # every method is scored on the same samples: drop the union
        for entry in entries:
            stats = store.read_stats(entry)
            empty = stats[stats["iterations"] == 0]["id"].astype(str).tolist()
            if empty:
                excluded[entry] = empty
    left_out = sorted({sample for ids in excluded.values() for sample in ids})
    if len(left_out) == len(rows):
        raise ConfigError(
            f"FAME took no step on any of the {len(rows)} samples, so every one would be left out; "
            "pass exclude_empty=false to score them anyway"
        )
    loader = DataLoader(
        Subset(Indexed(dataset), rows.tolist()), batch_size=config.batch_size, collate_fn=collate_items, shuffle=False
    )
    threshold = None
    pair = task.pair_threshold(model, Subset(dataset, rows.tolist()), config.batch_size, device)
    if pair is not None:  # on every rank: each one's batches are scored at this threshold
        threshold, eer = pair
        log.info(f"clean EER {eer:.4f} at threshold {threshold:.4f} ({len(rows)} pairs)")
    scoring = scoring_of(config)
    records: List[Dict[str, Any]] = []
    sanity_layers: List[str] = []
    # first: its layer names are checked here; once, on the process that writes the reports (rank zero)
    if "sanity" in task.families and "sanity" in config.families and rank_zero_only.rank == 0:
        scored = rows[~np.isin(rows, store.rows(left_out))] if left_out else rows  # what every method is scored on
        records, sanity_layers = sanity_records(config, model, store, entries, dataset, scored, device)

    def score_batch(batch: Dict[str, Any]) -> List[Dict[str, Any]]:
        """The rows of one batch (on the device) of every entry."""
        device = batch["index"].device
        batch_records: List[Dict[str, Any]] = []
        ids = [str(i) for i in batch["id"]]
        targets_of = task.batch_targets(model, batch)
        for entry in entries:
            keep = [k for k, sid in enumerate(ids) if sid not in set(left_out)]
            if not keep:
                continue
            kept_ids = [ids[k] for k in keep]
            try:
                maps = torch.from_numpy(store.read(entry, kept_ids)).unsqueeze(1).to(device)
            except DamagedMaps as error:  # one line naming the rows and ids: explain.py recomputes them
                raise ConfigError(str(error)) from None
            part = {k: select_samples(v, keep, len(ids)) for k, v in batch.items()}
            batch_records += scoring.localization_rows(entry, maps, part, kept_ids, task.mask_side(entry))
            targets = targets_of(store.method_settings(entry).get("target", "label"))
            batch_records += task.score_rows(
                scoring, model, entry, maps, part, None if targets is None else targets[keep], threshold, kept_ids
            )
        return batch_records

    trainer.predict(ScoreModule(model, score_batch), loader, return_predictions=False)
    if trainer.is_global_zero:
        records += writer.merge(trainer.world_size, rows)
    frame = pd.DataFrame.from_records(records, columns=["method", "metric", "level", "value", "sample_id"])
    if left_out and trainer.is_global_zero:
        log.info(
            f"{len(left_out)} samples left out of every method's scores: FAME took no step on them "
            f"({', '.join(f'{k}: {len(v)}' for k, v in excluded.items())}); exclude_empty=false keeps them"
        )
    context = {
        "missing": missing,
        "excluded": {"every method": len(left_out)} if left_out else {},
        "entries": entries,
        "task": task.name,
        "threshold": threshold,
        "dataset": dataset,
        "rows": rows,
        "sanity_layers": sanity_layers,
        "reports": trainer.is_global_zero,
    }
    return frame, context


def evaluate(config: DictConfig) -> pd.DataFrame:
    """Score the store (or every store of a sweep folder) and write the reports; returns the long table."""
    check_evaluate_config(config)
    if config.get("sweep"):
        return evaluate_sweep(config)
    from .. import report

    store = MapStore(config.store)
    frame, context = score_store(config, store)
    if not context["reports"]:  # another rank of a DDP run: rank zero writes the reports
        return frame
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    frame.to_csv(output / "scores.csv", index=False)
    summary = report.summarize(
        frame, confidence=config.bootstrap.confidence, resamples=config.bootstrap.resamples, seed=config.seed
    )
    summary.to_csv(output / "summary.csv", index=False)
    table = report.markdown_table(summary, missing_methods=context["missing"], excluded=context["excluded"])
    (output / "metrics.md").write_text(table)
    figures = {}
    for prefix in (
        "road_morf",
        "road_lerf",
        "deletion",
        "insertion",
        "verification_deletion",
        "verification_insertion",
    ):
        if frame["metric"].str.startswith(prefix).any():
            figures[prefix] = report.plot_curves(summary, prefix, output / f"curves_{prefix}.png")
    if context["sanity_layers"]:
        figures["sanity"] = report.plot_sanity(summary, context["sanity_layers"], output / "sanity.png")
    figures["overlays"] = example_grid(config, store, context, output / "overlays.png")
    figures["comparison"] = example_grid(config, store, context, output / "comparison.png", save_comparison_sheet)
    log.info(table)
    log.info(f"wrote {output / 'scores.csv'}, summary.csv, metrics.md and {len(figures)} figures to {output}")
    log_to_wandb(config, summary, table, figures)
    return frame


def example_grid(
    config: DictConfig, store: MapStore, context: Dict[str, Any], path: Path, sheet=save_overlay_grid
) -> Optional[Path]:
    """Example maps of every scored entry on the first ``grid_rows`` samples, drawn by ``sheet``
    (:func:`fame.viz.save_overlay_grid`, or :func:`fame.viz.save_comparison_sheet`: FAME first, the
    pointing game's point marked) over each image with its evidence (a mask, or boxes as a mask)."""
    count = min(config.grid_rows, len(context["rows"]))
    if count == 0:
        return None
    dataset, rows, task = context["dataset"], context["rows"][:count], task_of(context["task"])
    items = [dataset[int(r)] for r in rows]
    ids = [str(item["id"]) for item in items]
    shown = task.shown_entries(context["entries"])
    images = [item[task.image_key] for item in items]
    mask_keys = list(store_config(config, store).data.get("mask_keys") or [])
    mask_key = next((k for k in (task.sample_mask_key(m) for m in mask_keys) if k in items[0]), None)
    masks = [item[mask_key] for item in items] if mask_key else None
    if masks is None and "box_mask" in mask_keys and "boxes" in items[0]:
        size = tuple(images[0].shape[-2:])
        masks = [boxes_to_masks([item["boxes"]], size)[0] for item in items]
    maps = {e: torch.from_numpy(store.read(e, ids)) for e in shown}
    return sheet(images, maps, path, row_titles=ids, masks=masks)


def log_to_wandb(config: DictConfig, summary: pd.DataFrame, table: str, figures: Dict[str, Optional[Path]]) -> None:
    """The summary table, the curves and the example grid to the W&B run of ``config.logger`` (offline
    by default); nothing when the logger is off or not W&B."""
    logger = build_logger(config, "evaluate")
    if not isinstance(logger, WandbLogger):
        return
    import wandb

    run = logger.experiment
    logged = {"summary": wandb.Table(dataframe=summary.astype({"level": str}))}
    logged.update({name: wandb.Image(str(path)) for name, path in figures.items() if path is not None})
    run.log(logged)
    run.summary["report"] = table
    run.finish()


def evaluate_sweep(config: DictConfig) -> pd.DataFrame:
    """Every store of a sweep folder scored; a table and a plot of each metric against the swept values."""
    from .. import report

    entries = read_sweep(config.sweep)
    if not entries:
        raise ConfigError(f"the sweep folder {config.sweep} holds no jobs; run explain.py -m first")
    varying = [
        key
        for key in dict.fromkeys(k for entry in entries for k in entry["overrides"])
        if len({str(entry["overrides"].get(key)) for entry in entries}) > 1
    ]
    parameter = varying[0] if len(varying) == 1 else "setting"
    frames, missing, reports = {}, {}, True
    for entry in entries:
        overrides = entry["overrides"]
        value = (
            overrides.get(parameter)
            if parameter != "setting"
            else ", ".join(f"{k}={overrides.get(k)}" for k in varying) or entry["store"]
        )
        frame, context = score_store(config, MapStore(entry["store"]))
        frames[value], reports = frame, context["reports"]
        if context["missing"]:
            missing[value] = context["missing"]
    if not reports:  # another rank of a DDP run: rank zero writes the reports
        return pd.concat([f.assign(**{parameter: value}) for value, f in frames.items()], ignore_index=True)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    table = report.sweep_table(
        frames,
        parameter,
        confidence=config.bootstrap.confidence,
        resamples=config.bootstrap.resamples,
        seed=config.seed,
    )
    table.to_csv(output / "sweep.csv", index=False)
    report.plot_sweep(table, parameter, output / "sweep.png")
    log.info(table.to_string())
    written = [output / "sweep.csv", output / "sweep.png"]
    if missing:  # points whose store lacks some methods: named next to the table
        notes = pd.DataFrame(
            [{parameter: value, "missing_methods": "; ".join(map(str, names))} for value, names in missing.items()]
        )
        notes.to_csv(output / "sweep_missing.csv", index=False)
        written.append(output / "sweep_missing.csv")
        log.info("methods missing from some sweep points:\n" + notes.to_string(index=False))
    log.info(f"wrote {', '.join(str(path) for path in written)}")
    return pd.concat([f.assign(**{parameter: value}) for value, f in frames.items()], ignore_index=True)
