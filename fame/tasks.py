"""What differs between the tasks fame explains, one object per task.

A task owns its samples' keys, the outputs its methods write, the targets and input space of a
map, how a registered method is called on a batch, how the network is taken from a train.py
module, which score families apply, and its explainer methods (``fame.explain.registry``).
:func:`task_of` maps the config's ``data.task`` to its object; nothing else compares task names.

A new task is one subclass registered with :func:`register_task`, its methods registered under its
name (:func:`fame.explain.registry.register_method`), and its config files.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .data.modules import collate_items, limited, split_dataset
from .explain.guard import explaining
from .explain.objectives import VERIFICATION_MODES
from .explain.registry import MethodResult, get_method, method_names
from .files import ConfigError, instantiate
from .metrics.faithfulness import curve_auc, deletion_curve, remove_top_pixels
from .metrics.verification import eer_threshold

#: A method called on one batch of samples: (model, batch) -> MethodResult with the task's outputs.
BatchMethod = Callable[[nn.Module, Dict[str, Any]], MethodResult]
INPUT_SPACES = ("pixels", "normalized")


def predicted_classes(model: nn.Module, images: Tensor) -> Tensor:
    """The model's top class per image (``target=prediction``), with any autocast of the caller
    (a ``Trainer(precision="bf16-mixed")``) switched off, so no precision setting changes it."""
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        return model(images).argmax(dim=1)


def explained_inputs(model: nn.Module, images: Tensor, input_space: str) -> Tuple[Tensor, nn.Module]:
    """The images and the network a map is made on: [0, 1] pixels and the model ("pixels"), or the
    mean/std-normalized tensor and the wrapper's ``net`` ("normalized", the paper's ImageNet
    setting; README, In Python)."""
    if input_space == "normalized":
        with torch.no_grad():
            return model.normalize(images), model.net
    return images, model


def _listed(keys: Sequence[str]) -> str:
    return " and ".join(keys) if len(keys) < 3 else f"{', '.join(keys[:-1])} and {keys[-1]}"


class Task:
    """The base of the task objects; class attributes say what a sample and a method look like."""

    #: The name in ``data.task`` and in the method registry.
    name: str = ""
    #: The keys every sample of the task holds (besides ``id``).
    sample_keys: Tuple[str, ...] = ()
    #: The sample key of the image a map is drawn on (its size is the store's map size).
    image_key: str = ""
    #: The outputs a method writes to the store per sample, as ``<method>/<output>``.
    outputs: Tuple[str, ...] = ("",)
    #: The output of a method's MethodResult the training monitor shows.
    monitored_output: str = ""
    #: The attribute of a train.py LightningModule holding the explained network, and what it returns.
    network_attribute: str = "model"
    network_returns: str = "logits"
    #: The evaluate families (configs/evaluate.yaml ``families``) that apply to the task's maps.
    families: Tuple[str, ...] = ()
    #: Images the engine forwards per sample (for ``batch_size=auto``).
    images_per_sample: int = 1
    #: Whether the Sec. 4.1 feature-map experiment applies (a classifier's layers).
    explains_feature_maps: bool = False
    input_spaces: Tuple[str, ...] = ("pixels",)
    input_space_error: str = ""

    # -- samples and data ------------------------------------------------------------------------

    def matches(self, sample: Mapping[str, Any]) -> bool:
        """Whether ``sample`` holds the task's keys."""
        return all(key in sample for key in self.sample_keys)

    def image_size(self, sample: Mapping[str, Any]) -> Tuple[int, int]:
        return tuple(sample[self.image_key].shape[-2:])

    def sample_mask_key(self, mask_key: str) -> str:
        """The sample key of the evidence mask ``mask_key`` of the explained image."""
        return mask_key

    def explained_dataset(self, data: Any, split: str, limit: Optional[int]) -> Dataset:
        """The dataset whose samples are explained, from a data config node."""
        raise NotImplementedError

    def pair_threshold(
        self, model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device = torch.device("cpu")
    ) -> Optional[Tuple[float, float]]:
        """(threshold, EER) of a pair task's clean scores; None for a task without a decision threshold."""
        return None

    def check_input_space(self, input_space: str) -> None:
        if input_space not in self.input_spaces:
            raise ConfigError(self.input_space_error)

    # -- methods -----------------------------------------------------------------------------

    def method_names(self) -> List[str]:
        return method_names(self.name)

    def method(self, name: str) -> Callable[..., MethodResult]:
        """The registered method ``name`` of the task, inputs and outputs checked."""
        return get_method(name, self.name)

    def build_method(self, options: Mapping[str, Any], key: str) -> Callable[..., MethodResult]:
        """A method from its explainer config (``_target_`` plus ``name`` and options), for this task."""
        return instantiate(dict(options), key, task=self.name)

    def batch_method(self, method: Callable[..., MethodResult], target: str, input_space: str) -> BatchMethod:
        """``method`` called on a batch of the task's samples."""
        raise NotImplementedError

    def monitor_options(self, fame_options: Mapping[str, Any], loss: str) -> Dict[str, Any]:
        """FAME's options in the training monitor."""
        return dict(fame_options)

    # -- networks ----------------------------------------------------------------------------

    def network(self, module: nn.Module, owner: str = "ExplanationMonitor") -> nn.Module:
        """The network a train.py module trains (``network_attribute``)."""
        network = getattr(module, self.network_attribute, None)
        if not isinstance(network, nn.Module):
            raise AttributeError(
                f"{owner} explains {self.name} through {type(module).__name__}.{self.network_attribute}, which is "
                f"{'missing' if network is None else type(network).__name__}; give the LightningModule a "
                f"`{self.network_attribute}` attribute holding the network ({self.network_returns} out)"
            )
        return network

    def checked_network(self, network: nn.Module, data: Mapping[str, Any], checkpoint: str) -> nn.Module:
        """``network`` of ``checkpoint``, refused when it does not fit the data config."""
        return network

    # -- evaluation ---------------------------------------------------------------------------

    def batch_targets(self, model: nn.Module, batch: Dict[str, Any]) -> Callable[[str], Optional[Tensor]]:
        """The per-sample targets of a batch for maps made with a ``target`` setting (None: no targets)."""
        return lambda target: None

    def mask_side(self, entry: str) -> Optional[str]:
        """The side of a pair a store entry explains (its masks are ``<side>_<key>``); None for single images."""
        return None

    def shown_entries(self, entries: Sequence[str]) -> List[str]:
        """The entries drawn over the explained image in the example grid."""
        return list(entries)

    def score_rows(
        self,
        scoring: Any,
        model: nn.Module,
        entry: str,
        maps: Tensor,
        batch: Dict[str, Any],
        targets: Optional[Tensor],
        threshold: Optional[float],
        ids: Sequence[str],
    ) -> List[Dict[str, Any]]:
        """The task's score rows of one entry's maps (besides localisation), through ``scoring``
        (:class:`fame.metrics.scoring.Scoring`)."""
        return []

    # -- the training monitor -----------------------------------------------------------------

    def probe_fields(self, item: Mapping[str, Any], sample_id: str) -> Dict[str, Any]:
        """The explained image and what it is explained against, as fields of a monitor probe."""
        raise NotImplementedError

    def monitor_inputs(
        self, model: nn.Module, probes: Sequence[Any], target: str, device: torch.device
    ) -> Tuple[Any, List[Dict[str, Any]]]:
        """(the method's third argument, per-probe values shown in the grid titles) of the monitor's probes."""
        raise NotImplementedError

    def monitor_scores(
        self,
        model: nn.Module,
        images: Tensor,
        other: Any,
        maps: Tensor,
        deletion_fractions: Sequence[float],
        removal_fraction: float,
    ) -> Dict[str, Tensor]:
        """The monitor's faithfulness score (name -> (B,)) of one method's maps."""
        raise NotImplementedError

    def probe_title(self, probe: Any, result: Mapping[str, Any]) -> str:
        raise NotImplementedError


class ClassificationTask(Task):
    """A classifier's image: maps of its label or its prediction, in pixels or the normalized input."""

    name = "classification"
    sample_keys = ("image", "label")
    image_key = "image"
    outputs = ("",)
    monitored_output = ""
    network_attribute, network_returns = "model", "logits"
    families = ("localization", "road", "deletion", "sanity")
    explains_feature_maps = True
    input_spaces = INPUT_SPACES

    def explained_dataset(self, data: Any, split: str, limit: Optional[int]) -> Dataset:
        """The dataset node of ``split`` alone when the data module names one (so explaining an image
        folder needs no training folder), else the split of the whole data module."""
        node = data["datamodule"].get(split) if isinstance(data["datamodule"], Mapping) else None
        if isinstance(node, Mapping) and "_target_" in node:
            return limited(instantiate(node, f"data.datamodule.{split}"), limit)
        return limited(split_dataset(instantiate(data.datamodule, "data.datamodule"), split), limit)

    def batch_method(self, method: Callable[..., MethodResult], target: str, input_space: str) -> BatchMethod:
        """``input_space="normalized"`` perturbs the normalized tensor (:func:`explained_inputs`);
        ``target="prediction"`` explains the model's top class (:func:`predicted_classes`)."""

        def compute(model: nn.Module, batch: Dict[str, Any]) -> MethodResult:
            images = batch["image"]
            targets = torch.as_tensor(batch["label"], device=images.device)
            if target == "prediction":
                targets = predicted_classes(model, images)
            images, network = explained_inputs(model, images, input_space)
            return method(network, images, targets, ids=list(batch["id"]))

        return compute

    def monitor_options(self, fame_options: Mapping[str, Any], loss: str) -> Dict[str, Any]:
        return dict(fame_options, loss=loss)

    def checked_network(self, network: nn.Module, data: Mapping[str, Any], checkpoint: str) -> nn.Module:
        classes = data.get("num_classes")
        outputs = [layer.out_features for layer in network.modules() if isinstance(layer, nn.Linear)][-1:]
        if classes is not None and outputs and outputs[0] != classes:
            raise ConfigError(
                f"checkpoint={checkpoint} holds a classifier of {outputs[0]} classes, but the data has "
                f"data.num_classes={classes}; give the checkpoint of a model trained on this data, or "
                "the experiment= it was trained with"
            )
        return network

    def batch_targets(self, model: nn.Module, batch: Dict[str, Any]) -> Callable[[str], Optional[Tensor]]:
        """The labels, or the model's predictions for maps made with ``target=prediction`` (computed
        once per batch)."""
        predictions: List[Tensor] = []

        def targets(target: str) -> Tensor:
            if target != "prediction":
                return torch.as_tensor(batch["label"], device=batch["image"].device)
            if not predictions:
                predictions.append(predicted_classes(model, batch["image"]))
            return predictions[0]

        return targets

    def score_rows(
        self,
        scoring: Any,
        model: nn.Module,
        entry: str,
        maps: Tensor,
        batch: Dict[str, Any],
        targets: Optional[Tensor],
        threshold: Optional[float],
        ids: Sequence[str],
    ) -> List[Dict[str, Any]]:
        return scoring.classification_rows(model, entry, maps, batch["image"], targets, ids)

    def probe_fields(self, item: Mapping[str, Any], sample_id: str) -> Dict[str, Any]:
        return {"image": torch.as_tensor(item["image"]).float(), "label": int(item["label"])}

    def monitor_inputs(
        self, model: nn.Module, probes: Sequence[Any], target: str, device: torch.device
    ) -> Tuple[Any, List[Dict[str, Any]]]:
        images = torch.stack([probe.image for probe in probes]).to(device)
        labels = torch.tensor([probe.label for probe in probes], device=device)
        with explaining(model):
            predictions = model(images).argmax(dim=1)
        shown = [
            {"label": label, "prediction": prediction}
            for label, prediction in zip(labels.tolist(), predictions.tolist())
        ]
        return (predictions if target == "prediction" else labels), shown

    def monitor_scores(
        self,
        model: nn.Module,
        images: Tensor,
        other: Any,
        maps: Tensor,
        deletion_fractions: Sequence[float],
        removal_fraction: float,
    ) -> Dict[str, Tensor]:
        """The normalized AUC of the target's softmax as the top pixels are zeroed."""
        curve = deletion_curve(model, images, maps, other, deletion_fractions, mode="deletion")
        return {"deletion_auc": curve_auc(curve, deletion_fractions).cpu()}

    def probe_title(self, probe: Any, result: Mapping[str, Any]) -> str:
        return f"{probe.id}\nlabel {result['label']} pred {result['prediction']}"


class VerificationTask(Task):
    """A face pair: e+ / e- maps of both sides, each against the other's frozen embedding."""

    name = "verification"
    sample_keys = ("gallery", "probe", "same")
    image_key = "probe"
    outputs = tuple(f"{side}.{output}" for side in ("probe", "gallery") for output in VERIFICATION_MODES)
    monitored_output = "similar"
    network_attribute, network_returns = "embedder", "embeddings"
    families = ("localization", "verification")
    images_per_sample = len(VERIFICATION_MODES)  # e+ and e- run as one batch
    input_space_error = (
        "input_space=normalized applies to classifiers; face models normalize inside and are perturbed in [0, 1] pixels"
    )

    def sample_mask_key(self, mask_key: str) -> str:
        return f"probe_{mask_key}"

    def explained_dataset(self, data: Any, split: str, limit: Optional[int]) -> Dataset:
        if "pairs" not in data:
            raise ConfigError("data.pairs is missing: a verification data config names the pairs to explain")
        return split_dataset(instantiate(data.pairs, "data.pairs"), "predict")

    def pair_threshold(
        self, model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device = torch.device("cpu")
    ) -> Optional[Tuple[float, float]]:
        """(threshold, EER) of the clean cosine similarities of every pair of ``dataset``: FGGB's theta
        and the fixed decision threshold of the verification deletion / insertion protocol."""
        scores, labels = [], []
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_items)
        with torch.no_grad():
            for batch in loader:
                pair = [model(batch[side].to(device)) for side in ("gallery", "probe")]
                scores.append(F.cosine_similarity(*pair, dim=1).cpu())
                labels.append(torch.as_tensor(batch["same"]).bool())
        threshold, eer = eer_threshold(torch.cat(scores), torch.cat(labels))
        return float(threshold), float(eer)

    def batch_method(self, method: Callable[..., MethodResult], target: str, input_space: str) -> BatchMethod:
        """Both sides of each pair: the probe against the gallery's frozen embedding and vice versa,
        as outputs ``probe.<output>`` and ``gallery.<output>``."""

        def compute(model: nn.Module, batch: Dict[str, Any]) -> MethodResult:
            maps, stats = {}, {}
            ids = [str(i) for i in batch["id"]]
            for side, other in (("probe", "gallery"), ("gallery", "probe")):
                result = method(model, batch[side], batch[other], ids=[f"{i}/{side}" for i in ids])
                maps.update({f"{side}.{output}": value for output, value in result.maps.items()})
                stats.update({f"{side}.{output}": value for output, value in result.stats.items()})
            return MethodResult(maps, stats)

        return compute

    def mask_side(self, entry: str) -> Optional[str]:
        return entry.split("/")[-1].split(".")[0]

    def shown_entries(self, entries: Sequence[str]) -> List[str]:
        return [entry for entry in entries if entry.split("/")[-1].startswith("probe.")]

    def score_rows(
        self,
        scoring: Any,
        model: nn.Module,
        entry: str,
        maps: Tensor,
        batch: Dict[str, Any],
        targets: Optional[Tensor],
        threshold: Optional[float],
        ids: Sequence[str],
    ) -> List[Dict[str, Any]]:
        """Tab. 2 rows of the probe's e+ maps (the probe alone is perturbed), in the "verification" family."""
        if "verification" not in scoring.families or not entry.endswith("probe.similar"):
            return []
        return scoring.verification_rows(model, entry, maps, batch, threshold, ids)

    def probe_fields(self, item: Mapping[str, Any], sample_id: str) -> Dict[str, Any]:
        from .data.face_modules import as_image_tensor

        return {
            "image": as_image_tensor(item["probe"], f"pair {sample_id}"),
            "reference": as_image_tensor(item["gallery"], f"pair {sample_id}"),
            "same": bool(item["same"]),
        }

    def monitor_inputs(
        self, model: nn.Module, probes: Sequence[Any], target: str, device: torch.device
    ) -> Tuple[Any, List[Dict[str, Any]]]:
        return torch.stack([probe.reference for probe in probes]).to(device), [{} for _ in probes]

    def monitor_scores(
        self,
        model: nn.Module,
        images: Tensor,
        other: Any,
        maps: Tensor,
        deletion_fractions: Sequence[float],
        removal_fraction: float,
    ) -> Dict[str, Tensor]:
        """cos(g, p) - cos(g, p with its top e+ pixels zeroed)."""
        removed = remove_top_pixels(images, maps, removal_fraction)
        gallery = F.normalize(model(other), dim=1)
        before = (F.normalize(model(images), dim=1) * gallery).sum(dim=1)
        after = (F.normalize(model(removed), dim=1) * gallery).sum(dim=1)
        return {"similarity_drop": (before - after).cpu()}

    def probe_title(self, probe: Any, result: Mapping[str, Any]) -> str:
        return f"{probe.id}\n{'same' if probe.same else 'different'}"


def explainer(name: str, task: str, **options: Any) -> Callable[..., MethodResult]:
    """The registered method ``name`` of ``task`` with the options of its config file bound: the
    ``_target_`` of every ``configs/explainer/<name>.yaml`` (the explain stage adds the task). An
    unknown option is refused here, naming the method's options."""
    method = task_of(task).method(name)
    method.check_options(options)
    return partial(method, **options)


_TASKS: Dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` known to :func:`task_of` (and to the config's ``data.task`` choices)."""
    if task.name in _TASKS:
        raise ValueError(f"a task named {task.name!r} is already registered; pick another name")
    _TASKS[task.name] = task
    return task


for _task in (ClassificationTask(), VerificationTask()):
    register_task(_task)


def task_names() -> List[str]:
    """The names ``data.task`` may take."""
    return list(_TASKS)


def task_of(name: str) -> Task:
    """The task object of a ``data.task`` name (or a store's recorded task)."""
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(_TASKS)}")
    return _TASKS[name]


def sample_task(item: Mapping[str, Any], where: str) -> Task:
    """The task whose samples look like ``item``; KeyError naming the expected keys otherwise."""
    for task in _TASKS.values():
        if task.matches(item):
            return task
    expected = " or ".join(f"{_listed(task.sample_keys)} ({task.name})" for task in _TASKS.values())
    raise KeyError(f"{where} has keys {sorted(item)}; expected {expected}")


__all__ = [
    "ClassificationTask",
    "INPUT_SPACES",
    "Task",
    "VerificationTask",
    "explained_inputs",
    "explainer",
    "predicted_classes",
    "register_task",
    "sample_task",
    "task_names",
    "task_of",
]
