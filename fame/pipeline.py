"""The three stages behind train.py, explain.py and evaluate.py, as functions of a config.

config -> data -> model -> explainer -> map store -> metrics -> report. The entry points, the
tests and the notebooks call these same functions.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .data.modules import ClassificationDataModule, limited
from .data.shapes import ShapesDataset
from .explain import FameConfig, explain_classification
from .explain.baselines import CAM_METHODS, FLOORS, cam_maps, floor_maps
from .lightning.classifier import ImageClassifier, load_classifier
from .metrics.localization import LOCALIZATION_METRICS
from .models import target_layer
from .store import MapStore
from .viz import save_overlay_grid


def plain(config: Any) -> Any:
    """An OmegaConf node as plain Python containers (for checkpoints and attrs)."""
    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config


def build_dataset(data: Dict[str, Any], split: str):
    """The dataset of ``split`` ("train", "val", "test") described by a data config."""
    data = plain(data)
    if data["name"] != "shapes":
        raise ValueError(f"unknown dataset {data['name']!r}; this pipeline knows: 'shapes'")
    sizes = {"train": data["train_size"], "val": data["val_size"], "test": data["test_size"]}
    if split not in sizes:
        raise ValueError(f"unknown split {split!r}; choose train, val or test")
    return ShapesDataset(sizes[split], image_size=data["image_size"], seed=data["seeds"][split],
                         num_classes=data["num_classes"])


def wandb_logger(config: DictConfig, job: str):
    """An offline-by-default W&B logger writing under the output folder, or None when disabled."""
    if not config.logger.get("enabled", True):
        return None
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_MODE", config.logger.mode)
    save_dir = Path(config.paths.output_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=config.logger.project, name=f"{config.logger.get('name') or job}",
                       save_dir=str(save_dir), offline=config.logger.mode == "offline", job_type=job,
                       config=plain(config))


def train(config: DictConfig) -> Dict[str, float]:
    """Train the classifier of ``config.model`` on ``config.data``; save the checkpoint; return val metrics."""
    L.seed_everything(config.seed, workers=True)
    data = config.data
    datamodule = ClassificationDataModule(
        train=build_dataset(data, "train"), val=build_dataset(data, "val"), batch_size=data.batch_size,
        num_workers=data.num_workers, limit=config.get("limit"), seed=config.seed,
    )
    model_spec = dict(plain(config.model))
    model_spec.setdefault("num_classes", data.num_classes)
    module = ImageClassifier(model=model_spec, **plain(config.optim))
    logger = wandb_logger(config, "train")
    checkpoint = Path(config.checkpoint)
    resume_dir = checkpoint.parent / "resume"
    last = resume_dir / "last.ckpt"
    trainer = L.Trainer(logger=logger if logger is not None else False,
                        callbacks=[ModelCheckpoint(dirpath=resume_dir, save_last=True, save_top_k=0)],
                        **plain(config.trainer))
    resume = str(last) if config.resume and last.exists() else None
    if resume:
        print(f"resuming training from {resume}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    metrics = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()}
    trainer.save_checkpoint(checkpoint, weights_only=True)
    if logger is not None:
        logger.experiment.finish()
    print(f"validation accuracy {metrics.get('val/acc', float('nan')):.3f}; checkpoint written to {checkpoint}")
    return metrics


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fame_config(config: DictConfig) -> FameConfig:
    """The FameConfig described by the ``fame`` block of a config."""
    values = plain(config)
    if values.get("clamp") is not None:
        values["clamp"] = tuple(values["clamp"])
    return FameConfig(**values)


def compute_maps(method: str, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                 config: DictConfig, batch_offset: int = 0) -> torch.Tensor:
    """Maps (B, 1, H, W) of one explanation method for a batch."""
    if method == "fame":
        return explain_classification(model, images, targets, fame_config(config.fame),
                                      loss="abs_logit" if config.get("absolute_logit", False) else "logit")
    if method in CAM_METHODS:
        return cam_maps(model, target_layer(model), images, targets, method)
    if method in FLOORS:
        options = {"seed": config.seed + batch_offset} if method == "random" else {}
        return floor_maps(method, images, **options)
    raise ValueError(f"unknown method {method!r}; choose fame, {', '.join(CAM_METHODS)} or {', '.join(FLOORS)}")


def explain(config: DictConfig) -> MapStore:
    """Explain the test images with every method in ``config.methods``; resumes an interrupted run."""
    device = _device(config.device)
    classifier = load_classifier(config.checkpoint, map_location=str(device))
    model = classifier.model.to(device).eval()
    dataset = limited(build_dataset(config.data, config.split), config.limit)
    items = [dataset[i] for i in range(len(dataset))]
    ids = [item["id"] for item in items]
    size = tuple(items[0]["image"].shape[-2:])
    store = MapStore(config.store, ids=ids, size=size,
                     meta={"data": plain(config.data), "split": config.split, "limit": config.limit,
                           "checkpoint": str(config.checkpoint), "target": config.target})
    by_id = dict(zip(ids, items))
    timings: Dict[str, float] = {}
    for method in config.methods:
        missing = store.missing(method)
        if not missing:
            print(f"{method}: all {len(ids)} maps already in {config.store}")
            continue
        start = time.perf_counter()
        for offset in tqdm(range(0, len(missing), config.batch_size), desc=f"explain {method}", unit="batch"):
            batch_ids = missing[offset : offset + config.batch_size]
            images = torch.stack([by_id[i]["image"] for i in batch_ids]).to(device)
            labels = torch.tensor([by_id[i]["label"] for i in batch_ids], device=device)
            if config.target == "prediction":
                with torch.no_grad():
                    labels = model(images).argmax(dim=1)
            maps = compute_maps(method, model, images, labels, config, batch_offset=offset)
            store.write(method, batch_ids, maps)
        timings[method] = time.perf_counter() - start
        print(f"{method}: {len(missing)} maps in {timings[method]:.1f} s")
    return store


def evaluate(config: DictConfig) -> pd.DataFrame:
    """Score every method in the map store against the evidence masks; write CSV, markdown and a grid."""
    store = MapStore(config.store)
    meta = store.meta
    dataset = limited(build_dataset(meta["data"], meta["split"]), meta["limit"])
    items = [dataset[i] for i in range(len(dataset))]
    if [item["id"] for item in items] != store.ids:
        raise ValueError(f"the samples in {config.store} differ from the dataset its metadata describes")
    masks = torch.stack([item["mask"] for item in items])
    methods = [m for m in (config.methods or store.methods) if m in store.methods]
    rows: List[Dict[str, Any]] = []
    maps_by_method = {}
    for method in methods:
        maps = torch.from_numpy(store.read(method)).unsqueeze(1)
        maps_by_method[method] = maps
        scores = {name: LOCALIZATION_METRICS[name](maps, masks) for name in config.metrics}
        for k, sample_id in enumerate(store.ids):
            rows.append({"method": method, "id": sample_id, **{n: float(s[k]) for n, s in scores.items()}})
    per_sample = pd.DataFrame(rows)
    summary = per_sample.groupby("method", sort=False)[list(config.metrics)].agg(["mean", "sem"])
    table = pd.DataFrame({
        metric: [f"{summary.loc[m, (metric, 'mean')]:.3f} ± {summary.loc[m, (metric, 'sem')]:.3f}" for m in methods]
        for metric in config.metrics
    }, index=pd.Index(methods, name="method"))
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    per_sample.to_csv(output / "per_sample.csv", index=False)
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    summary.to_csv(output / "metrics.csv")
    markdown = table.to_markdown()
    (output / "metrics.md").write_text(
        f"Localisation of the evidence masks, {len(store.ids)} test images (mean ± s.e.m.)\n\n{markdown}\n"
    )
    shown = [m for m in config.grid_methods if m in maps_by_method]
    count = min(config.grid_rows, len(items))
    grid = save_overlay_grid(
        [item["image"] for item in items[:count]], {m: maps_by_method[m][:count] for m in shown},
        output / "overlays.png", masks=[item["mask"] for item in items[:count]],
        row_titles=[item["id"] for item in items[:count]],
    )
    print(markdown)
    print(f"wrote {output / 'metrics.csv'}, {output / 'metrics.md'}, {output / 'per_sample.csv'} and {grid}")
    _log_evaluation(config, table, grid)
    return per_sample


def _log_evaluation(config: DictConfig, table: pd.DataFrame, grid: Path) -> None:
    if not config.logger.get("enabled", True):
        return
    import wandb

    os.environ.setdefault("WANDB_MODE", config.logger.mode)
    run = wandb.init(project=config.logger.project, name="evaluate", job_type="evaluate",
                     dir=str(config.paths.output_dir), mode=config.logger.mode, config=plain(config))
    run.log({"localisation": wandb.Table(dataframe=table.reset_index()), "overlays": wandb.Image(str(grid))})
    run.finish()
