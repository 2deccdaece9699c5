"""What several stages share, built from a composed config: the device, the data module, the
explained dataset and model, the selected methods and their options, the check of every layer name
before the first map, W&B runs, and the model-randomisation sanity check's records (README, Evaluation).

The stages (``fame.stages``) import from here and never from each other; what differs by task is
asked of the task object (:func:`fame.tasks.task_of`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from hydra.utils import get_class
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import schemas
from .config import ConfigError, config_targets, instantiate, lookup, plain, trusted_file
from .data.modules import collate_items
from .explain.objectives import check_runs_once, resolve_layer
from .lightning.checkpoints import load_module_checkpoint
from .metrics.sanity import RANDOMIZATION_METRICS, cascading_randomization, holds_parameters, layer_blocks
from .models import name_target_layer, target_layer
from .schemas import sanity_options
from .tasks import Task, explained_inputs, predicted_classes, task_of

#: The keys of an explainer config that build the method rather than configure it.
BUILD_KEYS = ("_target_", "_partial_")
#: Candidate module names listed in full in an unknown-layer error up to this many.
LISTED_NAMES = 40


def build_datamodule(config: DictConfig):
    """The LightningDataModule of ``config.data.datamodule``."""
    return instantiate(config.data.datamodule, "data.datamodule")


def build_logger(config: DictConfig, job: str):
    """The logger of ``config.logger`` (``configs/logger/``) built from its ``_target_``, named after
    the stage ``job`` unless the config names it; None when ``logger.enabled`` is false. A W&B
    logger also records the job type and the whole config."""
    node = plain(config.get("logger")) or {}
    if not node.pop("enabled", True) or "_target_" not in node:
        return None
    node["name"] = node.get("name") or job
    if node["_target_"].endswith("WandbLogger"):  # the whole config as data: its _target_ nodes are not built
        node.update(job_type=job, config=plain(config), _recursive_=False)
    if node.get("save_dir") is not None:
        Path(node["save_dir"]).mkdir(parents=True, exist_ok=True)
    return instantiate(node, "logger")


def finish_wandb(logger: Any) -> None:
    """Close a W&B run so its offline files are complete (other loggers need no closing)."""
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()


def explained_dataset(config: DictConfig) -> Dataset:
    """The dataset whose samples are explained (``config.data``, ``split``, ``limit``)."""
    return task_of(config.data.task).explained_dataset(config.data, config.split, config.limit)


def explained_model(config: DictConfig) -> nn.Module:
    """The network whose decisions are explained: the classifier (or face embedder) of a train.py
    checkpoint, or the model built from ``config.model`` when ``checkpoint`` is null.

    The checkpoint is data (:func:`fame.lightning.checkpoints.load_module_checkpoint`): it must hold
    a ``module._target_`` of the task, and its specs name the project's builders or targets this
    config names, unless the user trusts it (``trust=[PATH]``). ``model.target_layer`` (any model,
    also ``model=custom``; never passed to the builder) names the layer that methods, the sanity check
    and the feature-map sheet use where they name none (:func:`fame.models.name_target_layer`).
    """
    node = plain(config.model) if config.get("model") is not None else {}
    layer = node.pop("target_layer", None) if isinstance(node, dict) else None
    if config.checkpoint is None:
        model = instantiate(node, "model").eval()
    else:
        task = task_of(config.data.task)
        module = load_module_checkpoint(
            get_class(config.module._target_),
            config.checkpoint,
            trust=trusted_file(config, config.checkpoint),
            named_targets=config_targets(config.model, config.module),
        )
        network = task.network(module, owner=f"checkpoint={config.checkpoint}")
        model = task.checked_network(network, config.data, config.checkpoint).eval()
    if layer is not None:  # model.target_layer: the layer of every method, check and sheet that names none
        try:
            name_target_layer(model, str(layer))
        except ValueError as error:
            raise ConfigError(f"model.target_layer={layer}: {error}") from None
    return model


def selected_methods(config: DictConfig) -> Dict[str, Any]:
    """The methods to run: the ``explainer`` entries with a ``name`` (:func:`fame.schemas.selected_methods`)."""
    return schemas.selected_methods(config.get("explainer"))


def method_options(options: Any) -> Dict[str, Any]:
    """The options a method function receives: its config without ``name``, ``_target_`` and ``_partial_``."""
    values = dict(plain(options) or {})
    for key in ("name", *BUILD_KEYS):
        values.pop(key, None)
    return values


def seen_network(model: nn.Module, sample: Dict[str, Any], task: Task, input_space: str) -> Tuple[Tensor, nn.Module]:
    """One sample's image (1, C, H, W) and the network as a method sees them in ``input_space``;
    ConfigError for ``input_space=normalized`` on a model that does not normalize inside."""
    image = torch.as_tensor(sample[task.image_key]).float().unsqueeze(0)
    normalizes_inside = hasattr(model, "normalize") and isinstance(getattr(model, "net", None), nn.Module)
    if input_space == "normalized" and not normalizes_inside:
        raise ConfigError(
            f"input_space=normalized needs a model that normalizes inside (normalize and net, as "
            f"fame.models.build_classifier gives); the {type(model).__name__} takes its input as it is: "
            "use input_space=pixels"
        )
    return explained_inputs(model, image, input_space)


def checked_layer(network: nn.Module, image: Tensor, name: Optional[str], key: str) -> nn.Module:
    """The layer ``name`` of ``network`` (its target layer when None), refused as a ConfigError naming
    ``key`` when the network lacks it (close names listed), when no layer is known for the network
    (how to name one) or when one forward pass of ``image`` runs it other than once."""
    try:
        layer = target_layer(network) if name is None else resolve_layer(network, name)
        check_runs_once(network, layer, image)
    except ValueError as error:
        shown = "null (the model's target layer)" if name is None else repr(name)
        raise ConfigError(f"{key}={shown}: {error}") from None
    return layer


def check_method_layers(config: DictConfig, model: nn.Module, sample: Dict[str, Any]) -> None:
    """Before the first map: the layer of every selected method that takes one (its ``layer`` option,
    else the model's target layer) exists and runs once per forward pass of ``sample``, in the input
    space the methods see (README "Your own model")."""
    task = task_of(config.data.task)
    image, network = seen_network(model, sample, task, config.input_space)
    for key, options in selected_methods(config).items():
        if "layer" in task.method(str(options["name"])).options:
            checked_layer(network, image, options.get("layer"), f"explainer.{key}.layer")


def _parameterized_names(model: nn.Module) -> List[str]:
    """Every submodule holding parameters (in its subtree), output side first."""
    return [name for name, module in model.named_modules() if name and holds_parameters(module)][::-1]


def check_layers(model: nn.Module, layers: Sequence[str], entry: str, input_space: str) -> None:
    """ConfigError naming the valid module names when ``layers`` holds names ``model`` lacks."""
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if not unknown:
        return
    names = _parameterized_names(model)
    listed = ", ".join(names[:LISTED_NAMES])
    if len(names) > LISTED_NAMES:
        listed += f", ... ({len(names) - LISTED_NAMES} more)"
    raise ConfigError(
        f"sanity.layers: {unknown} are not modules of the {type(model).__name__} that {entry!r} explains "
        f"(input_space={input_space}); its blocks are {layer_blocks(model)} (sanity.layers=null), and any module "
        f"holding parameters is valid: {listed}"
    )


def _plan(
    task: Task,
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    settings: Dict[str, Any],
    entry: str,
    layers: Optional[List[str]],
) -> Dict[str, Any]:
    """What re-running ``entry`` needs: method, options, inputs, targets and the model it sees.

    The method is looked up by the name its settings record (a ``_target_`` read from a store is
    never built: files are data)."""
    method_config = settings.get("method") or {}
    name = method_config.get("name")
    try:
        method = task.method(str(name))
    except ValueError as error:
        raise ConfigError(
            f"the maps of {entry!r} were made with method {name!r}, which cannot be re-run: {error}"
        ) from None
    target, input_space = settings.get("target", "label"), settings.get("input_space", "pixels")
    targets = labels
    if target == "prediction":  # the intact model's class, as when the maps were made
        targets = predicted_classes(model, images)
    inputs, seen = explained_inputs(model, images, input_space)
    steps = list(layers) if layers is not None else layer_blocks(seen)
    check_layers(seen, steps, entry, input_space)
    return {
        "entry": entry,
        "method": method,
        "options": method_options(method_config),
        "inputs": inputs,
        "targets": targets,
        "model": seen,
        "layers": steps,
    }


def sanity_records(
    config: Any,
    model: nn.Module,
    store,
    entries: Sequence[str],
    dataset,
    rows: np.ndarray,
    device: Union[str, torch.device],
) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Long-table rows of the cascading randomization (Adebayo et al., NeurIPS 2018) of every entry,
    and the layer name of each step.

    Each method is re-run with the settings its maps were made with (method options, ``target``,
    ``input_space``) while the blocks of a copy of the model are randomized one after the other
    from the output down (:func:`fame.metrics.sanity.cascading_randomization`), re-initialised
    (``sanity.randomization: reinit``) or redrawn from their own mean / std (``redraw``).
    ``rows`` are the dataset indices scored (complete in every entry); the first ``sanity.samples``
    are used. Returns ``(records, layer_names)``: records have metric "sanity_spearman" or
    "sanity_ssim" ("sanity_redraw_..." with ``redraw``), level = cascade step l (1.0 .. L) and the
    Spearman / SSIM of each sample's map after step l with its map from the intact model (Spearman
    0 where the new map is constant, NaN where the intact one is); ``layer_names[l - 1]`` is the
    module randomized at step l (names of the model the method sees; entries seeing different
    models get their names joined with " / "). Every entry faces the same randomized weights (a CPU
    generator seeded with ``config.seed``); the caller's model is left as it is. ``config.batch_size``
    samples go to one method call (null: all). Raises ConfigError for a store of a task without the
    sanity family and for ``sanity.layers`` naming modules the model lacks (before running anything).
    """
    task = task_of(store.meta.get("task"))
    if "sanity" not in task.families:
        raise ConfigError(
            f"the sanity check needs a classification store; {store.path} holds {task.name} maps "
            f"(leave the sanity check off for {task.name})"
        )
    samples, layers, randomization = sanity_options(config)
    chosen = np.asarray(rows, dtype=np.int64)[:samples]
    if len(chosen) == 0 or not entries:
        raise ConfigError(f"the sanity check has nothing to re-explain in {store.path}: no complete maps")
    batch = collate_items([dataset[int(row)] for row in chosen])
    images = batch["image"].to(device)
    labels = torch.as_tensor(batch["label"], device=device)
    ids = [str(sample_id) for sample_id in batch["id"]]
    chunk = lookup(config, "batch_size", default=None)
    chunk = chunk if isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1 else len(ids)
    plans = [_plan(task, model, images, labels, store.method_settings(entry), entry, layers) for entry in entries]

    records: List[Dict[str, Any]] = []
    with tqdm(total=sum(len(plan["layers"]) + 1 for plan in plans), desc="sanity", unit="map") as bar:
        for plan in plans:

            def explain_fn(network: nn.Module, inputs: Tensor, targets: Tensor, plan=plan) -> Tensor:
                parts = [
                    plan["method"](
                        network,
                        inputs[start : start + chunk],
                        targets[start : start + chunk],
                        ids=ids[start : start + chunk],
                        **plan["options"],
                    )
                    .maps[""]
                    .detach()
                    for start in range(0, inputs.shape[0], chunk)
                ]
                bar.update(1)
                return torch.cat(parts)

            bar.set_postfix_str(plan["entry"])
            generator = torch.Generator().manual_seed(int(config.seed))
            result = cascading_randomization(
                plan["model"],
                explain_fn,
                plan["inputs"],
                plan["targets"],
                generator,
                layers=plan["layers"],
                randomization=randomization,
            )
            for metric, values in zip(RANDOMIZATION_METRICS[randomization], (result.spearman, result.ssim)):
                values = values.double().cpu()
                records += [
                    {
                        "method": plan["entry"],
                        "metric": metric,
                        "level": float(step + 1),
                        "value": float(values[step, b]),
                        "sample_id": sid,
                    }
                    for b, sid in enumerate(ids)
                    for step in range(values.shape[0])
                ]
    length = max(len(plan["layers"]) for plan in plans)
    layer_names = [
        " / ".join(dict.fromkeys(plan["layers"][step] for plan in plans if step < len(plan["layers"])))
        for step in range(length)
    ]
    return records, layer_names
