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
from hydra.utils import get_class
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .. import schemas
from ..config import ConfigError, config_targets, instantiate, plain, trusted_file
from ..data.modules import collate_items, limited
from ..explain import FameConfig
from ..explain.objectives import VERIFICATION_MODES
from ..explain.registry import MethodResult, get_method
from ..lightning.checkpoints import load_module_checkpoint
from ..lightning.explain import ExplainMethod, ExplainModule, ExplainProgressBar, MapWriter, MissingRows
from ..provenance import checkpoint_digest, environment
from ..schemas import ExplainConfig, check, fame_options
from ..store import MapStore, StoreBusy, StoreClaim
from .common import build_datamodule, split_dataset

SIDES = ("probe", "gallery")
#: Loader settings that do not change any map: left out of the store's identity.
LOADER_KEYS = ("batch_size", "num_workers", "pin_memory")
#: FAME's speed settings: in the store's identity only when they differ from the engine's defaults,
#: so stores begun before configs/explainer/fame.yaml listed them still resume.
FAME_SPEED_KEYS = ("precision", "channels_last", "compile")

def selected_methods(config: DictConfig) -> Dict[str, Any]:
    """The methods to run: the ``explainer`` entries with a ``name`` (:func:`fame.schemas.selected_methods`)."""
    return schemas.selected_methods(config.get("explainer"))


def check_explain_config(config: DictConfig) -> None:
    """Validate the explain config (:class:`fame.schemas.ExplainConfig`: every key, method name and
    FAME option) and that the checkpoint exists, before building anything."""
    check(ExplainConfig, config)
    if config.checkpoint is not None and not Path(config.checkpoint).is_file():
        raise ConfigError(f"checkpoint={config.checkpoint!r}: no such file; run train.py first, or set "
                          "checkpoint=null to explain the model built from the model config")


def method_options(options: Any) -> Dict[str, Any]:
    """The options a method function receives: its config file without ``name``."""
    values = dict(plain(options) or {})
    values.pop("name", None)
    return values


def method_identity(options: Any, key: str) -> Dict[str, Any]:
    """A method's config as the store records it: FAME's speed settings only where not the default."""
    values = plain(options)
    if values.get("name") != "fame":
        return values
    chosen, defaults = fame_options(values, key), FameConfig()
    return {name: value for name, value in values.items()
            if name not in FAME_SPEED_KEYS or getattr(chosen, name) != getattr(defaults, name)}


def without_loader_keys(node: Any) -> Any:
    """A plain config with batch sizes and worker counts removed (they change no map)."""
    if isinstance(node, dict):
        return {k: without_loader_keys(v) for k, v in node.items() if k not in LOADER_KEYS}
    if isinstance(node, list):
        return [without_loader_keys(v) for v in node]
    return node


def explained_dataset(config: DictConfig):
    """The dataset whose samples are explained: a split of a classification datamodule, or the pairs."""
    if config.data.task == "verification":
        if "pairs" not in config.data:
            raise ConfigError("data.pairs is missing: a verification data config names the pairs to explain")
        return split_dataset(instantiate(config.data.pairs, "data.pairs"), "predict")
    return limited(split_dataset(build_datamodule(config), config.split), config.limit)


def explained_model(config: DictConfig) -> nn.Module:
    """The network whose decisions are explained: the classifier (or face embedder) of a train.py
    checkpoint, or the model built from ``config.model`` when ``checkpoint`` is null.

    The checkpoint is data (:func:`fame.lightning.checkpoints.load_module_checkpoint`): it must hold
    a ``module._target_`` of the task, and its specs name the project's builders or targets this
    config names, unless the user trusts it (``trust=[PATH]``).
    """
    if config.checkpoint is None:
        return instantiate(config.model, "model").eval()
    module = load_module_checkpoint(get_class(config.module._target_), config.checkpoint,
                                    trust=trusted_file(config, config.checkpoint),
                                    named_targets=config_targets(config.model, config.module))
    network = module.embedder if config.data.task == "verification" else module.model
    classes = config.data.get("num_classes") if config.data.task == "classification" else None
    outputs = [layer.out_features for layer in network.modules() if isinstance(layer, nn.Linear)][-1:]
    if classes is not None and outputs and outputs[0] != classes:
        raise ConfigError(f"checkpoint={config.checkpoint} holds a classifier of {outputs[0]} classes, but the data has "
                          f"data.num_classes={classes}; give the checkpoint of a model trained on this data, or the "
                          "experiment= it was trained with")
    return network.eval()


def predicted_classes(model: nn.Module, images: Tensor) -> Tensor:
    """The model's top class per image (``target=prediction``), with any autocast of the caller
    (a ``Trainer(precision="bf16-mixed")``) switched off, so no precision setting changes it."""
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        return model(images).argmax(dim=1)


def classification_compute(method, options: Dict[str, Any], target: str, input_space: str):
    """``input_space="normalized"`` perturbs the mean/std-normalized tensor (the paper's ImageNet
    setting) through the wrapper's ``normalize`` and ``net``; "pixels" perturbs [0, 1] images.
    ``target="prediction"`` explains the model's top class (``predicted_classes``)."""

    def compute(model: nn.Module, batch: Dict[str, Any]):
        images = batch["image"]
        targets = torch.as_tensor(batch["label"], device=images.device)
        if target == "prediction":
            targets = predicted_classes(model, images)
        if input_space == "normalized":
            images, model = model.normalize(images), model.net
        return method(model, images, targets, ids=list(batch["id"]), **options)

    return compute


def verification_compute(method, options: Dict[str, Any]):
    """Both sides of each pair: the probe against the gallery's frozen embedding and vice versa,
    as outputs ``probe.<output>`` and ``gallery.<output>``."""

    def compute(model: nn.Module, batch: Dict[str, Any]):
        maps, stats = {}, {}
        ids = [str(i) for i in batch["id"]]
        for side, other in (("probe", "gallery"), ("gallery", "probe")):
            result = method(model, batch[side], batch[other], ids=[f"{i}/{side}" for i in ids], **options)
            maps.update({f"{side}.{output}": value for output, value in result.maps.items()})
            stats.update({f"{side}.{output}": value for output, value in result.stats.items()})
        return MethodResult(maps, stats)

    return compute


def pair_threshold(model: nn.Module, dataset, batch_size: int, device: torch.device = torch.device("cpu")):
    """(threshold, EER) of the clean cosine similarities of every pair of ``dataset``: FGGB's theta
    and the fixed decision threshold of the verification deletion / insertion protocol."""
    from ..metrics.verification import eer_threshold

    scores, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_items)
    with torch.no_grad():
        for batch in loader:
            pair = [model(batch[side].to(device)) for side in ("gallery", "probe")]
            scores.append(torch.nn.functional.cosine_similarity(*pair, dim=1).cpu())
            labels.append(torch.as_tensor(batch["same"]).bool())
    threshold, eer = eer_threshold(torch.cat(scores), torch.cat(labels))
    return float(threshold), float(eer)


def auto_batch_size(config: DictConfig, model: nn.Module, sample: Dict[str, Any]) -> int:
    """``batch_size=auto``: the largest batch of FAME iterations that fits the device's free memory
    (``fame.explain.batching.find_batch_size``), for the FAME settings of ``explainer.fame``.
    A verification sample costs one image per mode (e+ and e- run as one batch)."""
    from ..explain.batching import find_batch_size

    fame = selected_methods(config).get("fame")
    fame_config = fame_options(fame, "explainer.fame") if fame is not None else None
    verification = config.data.task == "verification"
    image = sample["probe" if verification else "image"]
    device = torch.device("cuda" if torch.cuda.is_available() and config.trainer.accelerator in ("auto", "gpu", "cuda")
                          else "cpu")
    size = find_batch_size(model.to(device), tuple(image.shape), fame_config, device,
                           images_per_sample=len(VERIFICATION_MODES) if verification else 1)
    model.cpu()
    print(f"batch_size=auto: {size} samples per batch on {device}")
    return size


def method_outputs(config: DictConfig) -> List[str]:
    if config.data.task == "classification":
        return [""]
    return [f"{side}.{output}" for side in SIDES for output in ("similar", "dissimilar")]


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
                print(f"{entry}: {len(damaged)} stored maps are damaged (missing, cut short or failing their "
                      f"checksum), e.g. {', '.join(damaged[:5])}; recomputing them")


def explain(config: DictConfig) -> MapStore:
    """Explain the dataset of ``config.data`` with every method of ``config.explainer``
    (or, when ``config.featuremap`` is set, run the feature-map experiment instead).

    Rows already in the store with the same settings are skipped; a store made with other settings
    is refused (or, with ``new_group=true``, the maps go to ``<method>@2``...). Returns the store.
    """
    if config.get("featuremap"):
        from .featuremap import featuremap

        return featuremap(config)
    check_explain_config(config)
    L.seed_everything(config.seed, workers=True, verbose=False)
    task = config.data.task
    dataset = explained_dataset(config)
    first = dataset[0]
    size = tuple(first["image" if task == "classification" else "probe"].shape[-2:])
    model = explained_model(config)  # before the store: a refused checkpoint leaves nothing behind
    data_identity = without_loader_keys(plain(config.data))
    store = MapStore.create_or_open(config.store, num_samples=len(dataset), size=size,
                                    meta={"task": task, "data": data_identity, "split": config.split,
                                          "limit": config.limit})
    claim = claim_for_run(store)  # another explain run on this store is refused while this one writes
    try:
        return explain_into(config, store, model, dataset, first)
    finally:
        if claim is not None:
            claim.release()


def explain_into(config: DictConfig, store: MapStore, model: nn.Module, dataset, first: Dict[str, Any]) -> MapStore:
    """The rest of :func:`explain`, once the store is open (and claimed by the run's first process)."""
    task = config.data.task
    model_identity = ({"checkpoint_sha256": checkpoint_digest(config.checkpoint)} if config.checkpoint is not None
                      else {"model": plain(config.model)})
    provenance = {"checkpoint": config.checkpoint, "environment": environment(), "started": time.time()}
    batch_size = config.batch_size if config.batch_size != "auto" else auto_batch_size(config, model, first)
    methods = []
    for name, options in selected_methods(config).items():
        function = get_method(options["name"], task)
        kwargs = method_options(options)
        settings = {"method": method_identity(options, f"explainer.{name}"), "target": config.target, "input_space": config.input_space,
                    **model_identity}
        derived = {}
        if kwargs.get("threshold") == "eer":  # FGGB's theta: the EER threshold of these pairs' clean scores
            # provenance, not identity: it follows from the data and model (both in the identity), and
            # the clean scores move by ~1e-7 with the batch size, which must not refuse a resumed store
            kwargs["threshold"] = derived["eer_threshold"] = pair_threshold(model, dataset, batch_size)[0]
            print(f"{name}: threshold = EER threshold of the clean scores, {kwargs['threshold']:.4f}")
        stored_name = store.begin_method(name, settings, outputs=method_outputs(config),
                                         new_group=config.new_group, provenance={**provenance, **derived})
        compute = (classification_compute(function, kwargs, config.target, config.input_space) if task == "classification"
                   else verification_compute(function, kwargs))
        methods.append(ExplainMethod(stored_name, compute))
    recompute_damaged(store, [method.name for method in methods])
    rows = MissingRows(dataset, store, [method.name for method in methods])
    if len(rows) == 0:
        print(f"every map of {[m.name for m in methods]} is already in {store.path} with these settings")
        return store
    loader = DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate_items,
                        num_workers=config.get("num_workers", 0))
    callbacks = [MapWriter(store.path)]
    if config.trainer.get("enable_progress_bar", True):
        callbacks.append(ExplainProgressBar())
    trainer = instantiate(config.trainer, "trainer", logger=False, enable_checkpointing=False, callbacks=callbacks)
    module = ExplainModule(model, methods, store.path)
    trainer.predict(module, loader, return_predictions=False)
    if trainer.is_global_zero:
        print(f"{len(rows)} samples explained with {', '.join(m.name for m in methods)}; maps in {store.path}")
    return store
