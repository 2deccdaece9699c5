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
:func:`plot_sanity` puts under the x axis. A method whose maps reflect the model falls towards 0;
one that stays near 1 (the "random", "centre" and "sobel" floors by construction) does not
depend on the model's weights.

Config keys read: ``sanity.randomization`` (reinit or redraw, default reinit),
``sanity.samples`` (int >= 1, default 8), ``sanity.layers`` (null: the blocks
of :func:`fame.metrics.sanity.layer_blocks` of the model the method sees, else a list of module
names of that model), ``seed`` (the randomized weights; the same for every method) and
``batch_size`` (samples per method call; null or absent: all at once).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import ConfigError, lookup
from ..data.modules import collate_items
from ..explain.registry import get_method
from ..metrics.sanity import cascading_randomization, holds_parameters, layer_blocks
from ..schemas import sanity_options
from .explain import method_options, predicted_classes

SANITY_METRICS = ("sanity_spearman", "sanity_ssim")
#: Metric names per randomization: re-initialisation keeps the plain names, the redraw is named.
RANDOMIZATION_METRICS = {"reinit": SANITY_METRICS, "redraw": ("sanity_redraw_spearman", "sanity_redraw_ssim")}
#: How the plot names each randomization.
RANDOMIZATION_LABELS = {"reinit": "layers re-initialised", "redraw": "layers redrawn from their own mean / std"}
#: Candidate module names listed in full in an unknown-layer error up to this many.
LISTED_NAMES = 40


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


def plot_sanity(summary_or_frame: pd.DataFrame, layer_names: Sequence[str], path: Union[str, Path],
                methods: Optional[Sequence[str]] = None, confidence: float = 0.95, resamples: int = 1000,
                seed: int = 0) -> Path:
    """PNG of the cascading randomization: two panels (Spearman, SSIM), one line per method.

    x = cascade step 1..L labelled with ``layer_names`` (the module randomized at that step, the
    steps before it kept), y = the mean over samples with its bootstrap band. Takes a
    :func:`fame.report.summarize` result or the long score table (summarized here with
    ``confidence``, ``resamples`` and ``seed``); rows of other metrics are ignored. The titles
    name the randomization of the rows (re-initialisation where both are present).
    """
    from .. import report

    present = set(summary_or_frame["metric"])
    randomization = next((kind for kind, names in RANDOMIZATION_METRICS.items() if present & set(names)), None)
    if randomization is None:
        known = [name for names in RANDOMIZATION_METRICS.values() for name in names]
        raise ValueError(f"no {' or '.join(known)} rows to plot; run the sanity check first")
    metrics = RANDOMIZATION_METRICS[randomization]
    table = summary_or_frame[summary_or_frame["metric"].isin(metrics)]
    if "mean" not in table.columns:
        table = report.summarize(table, confidence=confidence, resamples=resamples, seed=seed, curve_auc=False)
    table = table[table["level"].notna()]
    if table.empty:
        raise ValueError(f"no {' or '.join(metrics)} curve rows to plot; run the sanity check first")
    methods = list(methods) if methods is not None else list(dict.fromkeys(table["method"]))
    steps = int(table["level"].max())
    labels = [layer_names[k] if k < len(layer_names) else str(k + 1) for k in range(steps)]
    width = max(4.5, 0.55 * steps + 2.5)
    figure, axes = report.plt.subplots(1, 2, figsize=(2 * width, 4.0), squeeze=False)
    spearman, ssim = metrics
    titles = {spearman: f"Spearman rank correlation with the intact model's maps ({RANDOMIZATION_LABELS[randomization]})",
              ssim: f"SSIM with the intact model's maps ({RANDOMIZATION_LABELS[randomization]})"}
    colors = report.plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = {}
    for axis, metric in zip(axes.flat, metrics):
        lowest = 0.0
        for position, method in enumerate(methods):  # a method keeps its colour in both panels
            line = table[(table["metric"] == metric) & (table["method"] == method)].sort_values("level")
            if line.empty:
                continue
            color = colors[position % len(colors)]
            handles[method], = axis.plot(line["level"], line["mean"], marker="o", markersize=3, linewidth=1.4,
                                         color=color, label=method)
            axis.fill_between(line["level"], line["low"], line["high"], color=color, alpha=0.2, linewidth=0)
            lowest = min(lowest, float(np.nanmin(line["low"])))
        axis.axhline(0.0, color="0.5", linewidth=0.8, linestyle="--")
        axis.set_ylim(lowest - 0.05, 1.05)
        axis.set_xticks(range(1, steps + 1))
        axis.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        axis.set_xlim(0.7, steps + 0.3)
        axis.set_xlabel("randomized from the output down to")
        axis.set_title(titles[metric], fontsize=9)
        axis.grid(alpha=0.3)
    axes.flat[0].legend([handles[m] for m in methods if m in handles], [m for m in methods if m in handles], fontsize=7)
    return report._save(figure, path)
