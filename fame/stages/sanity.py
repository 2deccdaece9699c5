"""The model-randomisation sanity check (Adebayo et al., NeurIPS 2018) of the evaluate stage.

Each method of a classification store is re-run on the first ``sanity.samples`` scored samples,
with the settings its maps were made with (method options, ``target``, ``input_space``), while
the blocks of a copy of the model are randomized one after the other from the output down
(:func:`fame.metrics.sanity.cascading_randomization`): re-initialised (``sanity.randomization:
reinit``, Adebayo et al. and Quantus) or redrawn from their own mean / std (``redraw``). Every
step gives long-table rows

    method=<entry>, metric="sanity_spearman" | "sanity_ssim", level=<step 1..L>, value, sample_id

("sanity_redraw_spearman" | "sanity_redraw_ssim" for ``redraw``, so scores name their protocol)

comparing the maps after step l (blocks ``layers[:l]`` randomized) with the intact model's maps;
:func:`sanity_records` also returns the layer name of each step (``layer_names[l - 1]``), which
:func:`fame.report.figures.plot_sanity` puts under the x axis. A method whose maps reflect the
model falls towards 0; one that stays near 1 (the "random", "centre" and "sobel" floors by
construction) does not depend on the model's weights.

Config keys read: ``sanity.randomization`` (reinit or redraw, default reinit),
``sanity.samples`` (int >= 1, default 8), ``sanity.layers`` (null: the blocks
of :func:`fame.metrics.sanity.layer_blocks` of the model the method sees, else a list of module
names of that model), ``seed`` (the randomized weights; the same for every method) and
``batch_size`` (samples per method call; null or absent: all at once).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import ConfigError, Rule, lookup
from ..data.modules import collate_items
from ..explain.registry import get_method
from ..metrics.sanity import (RANDOMIZATION_METRICS, RANDOMIZATIONS, cascading_randomization, holds_parameters,
                              layer_blocks)
from .explain import method_options, predicted_classes

DEFAULT_RANDOMIZATION = "reinit"
DEFAULT_SAMPLES = 8
#: Candidate module names listed in full in an unknown-layer error up to this many.
LISTED_NAMES = 40


def sanity_options(config: Any) -> Tuple[int, Optional[List[str]], str]:
    """(``sanity.samples``, ``sanity.layers``, ``sanity.randomization``) of the config, checked;
    defaults 8, null and reinit."""
    randomization = lookup(config, "sanity.randomization", default=DEFAULT_RANDOMIZATION)
    Rule(str, choices=RANDOMIZATIONS, help="reinit: reset_parameters() and BatchNorm statistics reset; redraw: "
         "parameters redrawn from their own mean / std").check("sanity.randomization", randomization)
    samples = lookup(config, "sanity.samples", default=DEFAULT_SAMPLES)
    Rule(int, minimum=1).check("sanity.samples", samples)
    layers = lookup(config, "sanity.layers", default=None)
    if layers is not None and (not isinstance(layers, list) or not layers
                               or not all(isinstance(name, str) for name in layers)):
        raise ConfigError(f"config key 'sanity.layers' has the value {layers!r}; allowed: null (the model's blocks, "
                          "output first) or a non-empty list of module names, e.g. [fc, layer4, layer3]")
    return samples, layers, randomization


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
        f"holding parameters is valid: {listed}")


def _plan(model: nn.Module, images: Tensor, labels: Tensor, settings: Dict[str, Any], entry: str,
          layers: Optional[List[str]]) -> Dict[str, Any]:
    """What re-running ``entry`` needs: method, options, inputs, targets and the model it sees."""
    method_config = settings.get("method") or {}
    name = method_config.get("name")
    try:
        method = get_method(str(name), "classification")
    except ValueError as error:
        raise ConfigError(f"the maps of {entry!r} were made with method {name!r}, which cannot be re-run: "
                          f"{error}") from None
    target, input_space = settings.get("target", "label"), settings.get("input_space", "pixels")
    targets = labels
    if target == "prediction":  # the intact model's class, as when the maps were made
        targets = predicted_classes(model, images)
    inputs, seen = images, model
    if input_space == "normalized":
        with torch.no_grad():
            inputs = model.normalize(images)
        seen = model.net
    steps = list(layers) if layers is not None else layer_blocks(seen)
    check_layers(seen, steps, entry, input_space)
    return {"entry": entry, "method": method, "options": method_options(method_config), "inputs": inputs,
            "targets": targets, "model": seen, "layers": steps}


def sanity_records(config: Any, model: nn.Module, store, entries: Sequence[str], dataset, rows: np.ndarray,
                   device: Union[str, torch.device]) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Long-table rows of the cascading randomization of every entry, and the layer name of each step.

    ``rows`` are the dataset indices scored (complete in every entry); the first ``sanity.samples``
    are used. Returns ``(records, layer_names)``: records have metric "sanity_spearman" or
    "sanity_ssim" ("sanity_redraw_..." with ``sanity.randomization: redraw``), level = cascade step l (1.0 .. L) and the Spearman / SSIM of each sample's map
    after step l with its map from the intact model (Spearman 0 where the new map is constant, NaN
    where the intact one is);
    ``layer_names[l - 1]`` is the module randomized at step l (names of the model the method sees;
    entries seeing different models get their names joined with " / "). Every entry faces the
    same randomized weights (a CPU generator seeded with ``config.seed``); the caller's model is
    left as it is. Raises ConfigError for a store that is not a classification store and for
    ``sanity.layers`` naming modules the model lacks (before running anything).
    """
    task = store.meta.get("task")
    if task != "classification":
        raise ConfigError(f"the sanity check needs a classification store; {store.path} holds {task} maps "
                          "(leave the sanity check off for face verification)")
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
    plans = [_plan(model, images, labels, store.method_settings(entry), entry, layers) for entry in entries]

    records: List[Dict[str, Any]] = []
    with tqdm(total=sum(len(plan["layers"]) + 1 for plan in plans), desc="sanity", unit="map") as bar:
        for plan in plans:
            def explain_fn(network: nn.Module, inputs: Tensor, targets: Tensor, plan=plan) -> Tensor:
                parts = [plan["method"](network, inputs[start:start + chunk], targets[start:start + chunk],
                                        ids=ids[start:start + chunk], **plan["options"]).maps[""].detach()
                         for start in range(0, inputs.shape[0], chunk)]
                bar.update(1)
                return torch.cat(parts)

            bar.set_postfix_str(plan["entry"])
            generator = torch.Generator().manual_seed(int(config.seed))
            result = cascading_randomization(plan["model"], explain_fn, plan["inputs"], plan["targets"], generator,
                                             layers=plan["layers"], randomization=randomization)
            for metric, values in zip(RANDOMIZATION_METRICS[randomization], (result.spearman, result.ssim)):
                values = values.double().cpu()
                records += [{"method": plan["entry"], "metric": metric, "level": float(step + 1),
                             "value": float(values[step, b]), "sample_id": sid}
                            for b, sid in enumerate(ids) for step in range(values.shape[0])]
    length = max(len(plan["layers"]) for plan in plans)
    layer_names = [" / ".join(dict.fromkeys(plan["layers"][step] for plan in plans if step < len(plan["layers"])))
                   for step in range(length)]
    return records, layer_names
