"""explain.py: every configured method over a dataset through ``Trainer.predict``, into a resumable map store.

Classification datasets yield {"image", "label", "id", ...}; verification pair datasets yield
{"gallery", "probe", "same", "id", ...} and every method explains both sides of each pair (the
other side's embedding frozen), written as ``<method>/probe.similar``, ``<method>/gallery.similar``,
and so on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from ..config import ConfigError, instantiate, plain
from ..data.modules import collate_items
from ..explain import FameConfig
from ..lightning.explain import ExplainMethod, ExplainModule, ExplainProgressBar, MapWriter, MissingRows
from ..lightning.rank_zero import rank_zero_logger
from ..pipeline import (
    BUILD_KEYS,
    check_method_layers,
    explained_dataset,
    explained_model,
    method_options,
    selected_methods,
)
from ..provenance import checkpoint_digest, environment
from ..schemas import ExplainConfig, check, fame_options
from ..store import MapStore, StoreBusy, StoreClaim
from ..tasks import task_of

log = rank_zero_logger(__name__)

#: Loader settings that do not change any map: left out of the store's identity.
LOADER_KEYS = ("batch_size", "num_workers", "pin_memory")
#: FAME's speed settings: in the store's identity only when they differ from the engine's defaults,
#: so stores begun before configs/explainer/fame.yaml listed them still resume.
FAME_SPEED_KEYS = ("precision", "channels_last", "compile")


def check_explain_config(config: DictConfig) -> None:
    """Validate the explain config (:class:`fame.schemas.ExplainConfig`: every key, method name and
    option and FAME option) and that the checkpoint exists, before building anything."""
    check(ExplainConfig, config)
    if config.checkpoint is not None and not Path(config.checkpoint).is_file():
        raise ConfigError(
            f"checkpoint={config.checkpoint!r}: no such file; run train.py first, or set "
            "checkpoint=null to explain the model built from the model config"
        )


def method_identity(options: Any, key: str) -> Dict[str, Any]:
    """A method's config as the store records it: its ``name`` and options (not how it is built, so
    stores begun before the explainer configs had a ``_target_`` resume), FAME's speed settings only
    where not the default."""
    values = {name: value for name, value in plain(options).items() if name not in BUILD_KEYS}
    if values.get("name") != "fame":
        return values
    chosen, defaults = fame_options(values, key), FameConfig()
    return {
        name: value
        for name, value in values.items()
        if name not in FAME_SPEED_KEYS or getattr(chosen, name) != getattr(defaults, name)
    }


def without_loader_keys(node: Any) -> Any:
    """A plain config with batch sizes and worker counts removed (they change no map)."""
    if isinstance(node, dict):
        return {k: without_loader_keys(v) for k, v in node.items() if k not in LOADER_KEYS}
    if isinstance(node, list):
        return [without_loader_keys(v) for v in node]
    return node


def auto_batch_size(config: DictConfig, model: nn.Module, sample: Dict[str, Any]) -> int:
    """``batch_size=auto``: the largest batch of FAME iterations that fits the device's free memory
    (``fame.explain.batching.find_batch_size``), for the FAME settings of ``explainer.fame``.
    A verification sample costs one image per mode (e+ and e- run as one batch)."""
    from ..explain.batching import find_batch_size

    fame = selected_methods(config).get("fame")
    fame_config = fame_options(fame, "explainer.fame") if fame is not None else None
    task = task_of(config.data.task)
    image = sample[task.image_key]
    device = torch.device(
        "cuda" if torch.cuda.is_available() and config.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"
    )
    size = find_batch_size(
        model.to(device), tuple(image.shape), fame_config, device, images_per_sample=task.images_per_sample
    )
    model.cpu()
    log.info(f"batch_size=auto: {size} samples per batch on {device}")
    return size


def launched_rank() -> int:
    """This process's rank when a launcher (Lightning's DDP, torchrun, SLURM) started it as one of
    several processes of a run; 0 for the process that starts a run."""
    ranks = [os.environ.get(key) for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")]
    return max([int(rank) for rank in ranks if rank is not None and rank.isdigit()] or [0])


def claim_for_run(store: MapStore) -> Optional[StoreClaim]:
    """The store's run lock, taken by the process that starts the run (the ranks it launches write
    alongside it without the lock); a store another run holds is a ConfigError naming that run."""
    if launched_rank() != 0:
        return None
    try:
        return store.claim()
    except StoreBusy as error:
        raise ConfigError(str(error)) from None


def recompute_damaged(store: MapStore, methods: List[str]) -> None:
    """Mark maps whose bytes are missing, cut short or altered as missing, so this run recomputes them."""
    for method in methods:
        for entry in store.outputs(method):
            damaged = store.discard_damaged(entry)
            if damaged:
                log.info(
                    f"{entry}: {len(damaged)} stored maps are damaged (missing, cut short or failing their "
                    f"checksum), e.g. {', '.join(damaged[:5])}; recomputing them"
                )


def explain(config: DictConfig) -> MapStore:
    """Explain the dataset of ``config.data`` with every method of ``config.explainer``.

    Rows already in the store with the same settings are skipped; a store made with other settings
    is refused (or, with ``new_group=true``, the maps go to ``<method>@2``...). Returns the store.
    """
    check_explain_config(config)
    L.seed_everything(config.seed, workers=True, verbose=False)
    task = task_of(config.data.task)
    dataset = explained_dataset(config)
    first = dataset[0]
    size = task.image_size(first)
    model = explained_model(config)  # before the store: a refused checkpoint leaves nothing behind
    check_method_layers(config, model, first)  # every layer name before the store and the first map
    data_identity = without_loader_keys(plain(config.data))
    store = MapStore.create_or_open(
        config.store,
        num_samples=len(dataset),
        size=size,
        meta={"task": task.name, "data": data_identity, "split": config.split, "limit": config.limit},
    )
    claim = claim_for_run(store)  # another explain run on this store is refused while this one writes
    try:
        return explain_into(config, store, model, dataset, first)
    finally:
        if claim is not None:
            claim.release()


def explain_into(config: DictConfig, store: MapStore, model: nn.Module, dataset, first: Dict[str, Any]) -> MapStore:
    """The rest of :func:`explain`, once the store is open (and claimed by the run's first process)."""
    task = task_of(config.data.task)
    model_identity = (
        {"checkpoint_sha256": checkpoint_digest(config.checkpoint)}
        if config.checkpoint is not None
        else {"model": plain(config.model)}
    )
    provenance = {"checkpoint": config.checkpoint, "environment": environment(), "started": time.time()}
    batch_size = config.batch_size if config.batch_size != "auto" else auto_batch_size(config, model, first)
    methods = []
    for name, options in selected_methods(config).items():
        kwargs = method_options(options)
        built = {**plain(options)}
        settings = {
            "method": method_identity(options, f"explainer.{name}"),
            "target": config.target,
            "input_space": config.input_space,
            **model_identity,
        }
        derived = {}
        if kwargs.get("threshold") == "eer":  # FGGB's theta: the EER threshold of these pairs' clean scores
            # provenance, not identity: it follows from the data and model (both in the identity), and
            # the clean scores move by ~1e-7 with the batch size, which must not refuse a resumed store
            built["threshold"] = derived["eer_threshold"] = task.pair_threshold(model, dataset, batch_size)[0]
            log.info(f"{name}: threshold = EER threshold of the clean scores, {built['threshold']:.4f}")
        stored_name = store.begin_method(
            name, settings, outputs=list(task.outputs), new_group=config.new_group, provenance={**provenance, **derived}
        )
        method = task.build_method(built, f"explainer.{name}")
        methods.append(ExplainMethod(stored_name, task.batch_method(method, config.target, config.input_space)))
    recompute_damaged(store, [method.name for method in methods])
    rows = MissingRows(dataset, store, [method.name for method in methods])
    if len(rows) == 0:
        log.info(f"every map of {[m.name for m in methods]} is already in {store.path} with these settings")
        return store
    loader = DataLoader(
        rows, batch_size=batch_size, shuffle=False, collate_fn=collate_items, num_workers=config.get("num_workers", 0)
    )
    callbacks = [MapWriter(store.path)]
    if config.trainer.get("enable_progress_bar", True):
        callbacks.append(ExplainProgressBar())
    trainer = instantiate(config.trainer, "trainer", logger=False, enable_checkpointing=False, callbacks=callbacks)
    module = ExplainModule(model, methods, store.path)
    trainer.predict(module, loader, return_predictions=False)
    if trainer.is_global_zero:
        log.info(f"{len(rows)} samples explained with {', '.join(m.name for m in methods)}; maps in {store.path}")
    return store
