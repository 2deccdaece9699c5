"""One typed schema per entry point: the only place the ranges and choices of a config are checked.

:class:`TrainConfig` (train.py), :class:`ExplainConfig` (explain.py), :class:`FeaturemapConfig`
(``explain.py experiment=featuremap``) and :class:`EvaluateConfig` (evaluate.py) are pydantic
models of the keys each entry point reads; every other key passes through. A field's
:class:`Rule` says what it may hold, and a failed validation becomes one line naming the key, the
value and what is allowed (``config key 'x' has the value ...; allowed: ...``, README "Three
stages, one config mechanism"). FAME's options are checked by :class:`~fame.explain.FameConfig`
itself (:func:`fame_options`), so the engine and the explain schema share one set of rules.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated, Any, Dict, List, Optional, Sequence, Tuple, Type

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .explain import FameConfig
from .explain.fggb import GRADIENT_OF
from .explain.registry import fame_config
from .files import ConfigError, plain
from .metrics.faithfulness import SUBSTRATES
from .metrics.localization import LOCALIZATION_METRICS
from .metrics.sanity import RANDOMIZATIONS
from .metrics.scoring import ROAD_IMPUTATIONS, ROAD_ORDERS
from .metrics.verification import THRESHOLD_PROTOCOLS
from .tasks import INPUT_SPACES, task_names, task_of

#: Metric families of evaluate.py.
FAMILIES = ("localization", "road", "deletion", "verification", "sanity")
#: Dataset splits a store can explain.
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Rule:
    """What one config key may hold: a type (int, float, str, bool), choices and a range."""

    kind: type
    choices: Optional[Sequence[Any]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    optional: bool = False
    help: str = ""

    def allowed(self) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[self.kind]
            if self.minimum is not None and self.maximum is not None:
                text += f" in [{self.minimum}, {self.maximum}]"
            elif self.minimum is not None:
                text += f" >= {self.minimum}"
            elif self.maximum is not None:
                text += f" <= {self.maximum}"
        if self.optional:
            text += " or null"
        return text + (f" ({self.help})" if self.help else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.kind is bool:
            kind_ok = isinstance(value, bool)
        elif self.kind is int:
            kind_ok = not isinstance(value, bool) and isinstance(value, int)
        elif self.kind is float:
            kind_ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        else:
            kind_ok = isinstance(value, self.kind)
        return (
            kind_ok
            and (self.choices is None or value in self.choices)
            and (self.minimum is None or value >= self.minimum)
            and (self.maximum is None or value <= self.maximum)
        )

    def check(self, key: str, value: Any) -> None:
        """ConfigError naming ``key`` unless the rule accepts ``value``."""
        if not self.accepts(value):
            raise ConfigError(f"config key {key!r} has the value {value!r}; allowed: {self.allowed()}")


def _refuse(allowed: str) -> PydanticCustomError:
    return PydanticCustomError("rule", "allowed: {allowed}", {"allowed": allowed})


def ruled(kind: type, **rule: Any) -> Any:
    """The type of a field that ``Rule(kind, **rule)`` checks."""
    checked = Rule(kind, **rule)

    def check(value: Any) -> Any:
        if not checked.accepts(value):
            raise _refuse(checked.allowed())
        return value

    return Annotated[Optional[Any] if checked.optional else Any, BeforeValidator(check)]


def entries(allowed: Optional[Sequence[Any]] = None, each: Optional[Rule] = None, increasing: bool = False) -> Any:
    """The type of a field holding a non-empty list whose entries are all in ``allowed``, all pass
    ``each`` and, with ``increasing``, strictly increase."""

    def check(values: Any) -> Any:
        if not isinstance(values, list) or not values:
            raise _refuse("a non-empty list")
        unknown = [value for value in values if allowed is not None and value not in allowed]
        if unknown:
            raise PydanticCustomError(
                "entries",
                "has unknown entries {unknown}; allowed: {allowed}",
                {"unknown": str(unknown), "allowed": str(list(allowed))},
            )
        for value in values:
            if each is not None and not each.accepts(value):
                raise PydanticCustomError("entry", "allowed: {allowed}", {"allowed": each.allowed(), "entry": value})
        if increasing and any(not later > earlier for earlier, later in zip(values, values[1:])):
            raise _refuse("strictly increasing levels")
        return values

    return Annotated[List[Any], BeforeValidator(check)]


def mapping(allowed: str, optional: bool = False) -> Any:
    """The type of a field holding a config node with a ``_target_`` (null too with ``optional``)."""

    def check(value: Any) -> Any:
        if value is None and optional or isinstance(value, dict) and isinstance(value.get("_target_"), str):
            return value
        raise _refuse(allowed)

    return BeforeValidator(check)


def refuse(message: str) -> PydanticCustomError:
    """A schema error whose message is ``message`` as it is."""
    return PydanticCustomError("config", "{message}", {"message": message})


def _batch_sizes(node: Any, prefix: str) -> None:
    """Every ``batch_size`` anywhere in the tree: an integer >= 1, null or "auto"."""
    if isinstance(node, dict):
        for name, value in node.items():
            key = f"{prefix}{name}"
            if name == "batch_size" and value != "auto":
                Rule(int, minimum=1, optional=True, help='or "auto" where supported').check(key, value)
            _batch_sizes(value, key + ".")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _batch_sizes(value, f"{prefix}{index}.")


class Node(BaseModel):
    """A config node: the keys of a schema are checked, every other key passes through."""

    model_config = ConfigDict(extra="allow")


class EntryConfig(Node):
    """An entry point's whole config: its keys, then every ``batch_size`` anywhere in the tree."""

    @model_validator(mode="after")
    def _check_batch_sizes(self) -> "EntryConfig":
        try:
            _batch_sizes(self.model_dump(by_alias=True), "")
        except ConfigError as error:
            raise refuse(str(error)) from None
        return self


def _line(error: Dict[str, Any], prefix: str) -> str:
    key = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
    context = error.get("ctx") or {}
    if error["type"] == "config":
        return context["message"]
    if error["type"] == "missing":
        return f"config key {key!r} is missing"
    if error["type"] == "entries":
        return f"config key {key!r} has unknown entries {context['unknown']}; allowed: {context['allowed']}"
    value = context["entry"] if error["type"] == "entry" else error["input"]
    if error["type"] in ("rule", "entry"):
        return f"config key {key!r} has the value {value!r}; allowed: {context['allowed']}"
    return f"config key {key!r} has the value {value!r}: {error['msg']}"


def check(schema: Type[BaseModel], config: Any, prefix: str = "") -> BaseModel:
    """``config`` (OmegaConf or plain) validated by ``schema``; the first problem is a ConfigError of
    one line (``prefix``: the dotted key of ``config`` in the messages)."""
    try:
        return schema.model_validate(plain(config) if config is not None else {})
    except ValidationError as error:
        raise ConfigError(_line(error.errors()[0], prefix)) from None


# ----------------------------------------------------------------------------------------------
# FAME's options


def fame_options(options: Any, key: str) -> FameConfig:
    """A FameConfig from the FAME fields of ``options``, checked by FameConfig itself; a numeric
    field's type error names ``key.<field>`` (its type is that of the field's default)."""
    fields = {field.name: field for field in dataclasses.fields(FameConfig)}
    values = {}
    for name, value in (plain(options) or {}).items():
        if name not in fields:
            continue
        default = fields[name].default
        if isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None:
            Rule(float if isinstance(default, float) else int).check(f"{key}.{name}", value)
        values[name] = value
    try:
        return fame_config(values, "classification")
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{key}: {error}") from error


def selected_methods(explainer: Optional[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The ``explainer`` entries with a ``name`` (their config file was selected); an experiment may
    tune a method it does not select (a fragment without ``name``)."""
    return {key: options for key, options in (explainer or {}).items() if options is not None and "name" in options}


def _check_methods(explainer: Optional[Dict[str, Any]], task_name: str) -> None:
    task = task_of(task_name)
    known = task.method_names()
    selected = selected_methods(explainer)
    if not selected:
        raise refuse(f"no explainer selected; choose some of {known}, e.g. explainer=[fame,gradcam]")
    for name, options in selected.items():
        method = options["name"]
        if method not in known:
            raise refuse(f"explainer.{name}: unknown {task.name} method {method!r}; known: {', '.join(known)}")
        if "_target_" not in options:
            raise refuse(
                f"explainer.{name} has no _target_; a method's config file builds it with "
                "_target_: fame.tasks.explainer (configs/explainer/)"
            )
        chosen = {key: value for key, value in options.items() if key not in ("name", "_target_", "_partial_")}
        try:
            task.method(method).check_options(chosen)
        except ValueError as error:
            raise refuse(f"explainer.{name}: {error}") from None
        try:
            if method == "fame":
                fame_options(chosen, f"explainer.{name}")
            if method == "fggb":
                Rule(str, choices=GRADIENT_OF).check(
                    f"explainer.{name}.gradient_of", options.get("gradient_of", "normalized")
                )
        except ConfigError as error:
            raise refuse(str(error)) from None


# ----------------------------------------------------------------------------------------------
# train.py


class DataKeys(Node):
    task: ruled(str, choices=tuple(task_names()))


class TrainerKeys(Node):
    max_epochs: ruled(int, minimum=1, optional=True)


class OptimizerKeys(Node):
    lr: ruled(float, minimum=0.0) = None
    weight_decay: ruled(float, minimum=0.0) = None


class SchedulerKeys(Node):
    warmup_steps: ruled(int, minimum=0) = None
    warmup_fraction: ruled(float, minimum=0.0, maximum=1.0) = None
    power: ruled(float, minimum=0.0) = None


class ModuleKeys(Node):
    optimizer: Annotated[
        Optional[OptimizerKeys],
        mapping("a config node with a _target_, e.g. module/optimizer=sgd or adamw (configs/module/optimizer/)"),
    ] = None
    scheduler: Annotated[
        Optional[SchedulerKeys],
        mapping(
            "a config node with a _target_, e.g. module/scheduler=onecycle, cosine, step or polynomial "
            "(configs/module/scheduler/), or null (constant)",
            optional=True,
        ),
    ] = None
    thresholds: ruled(str, choices=THRESHOLD_PROTOCOLS) = None


def _resume(value: Any) -> Any:
    if value in ("auto", False) or isinstance(value, str) and value.endswith(".ckpt"):
        return value
    raise _refuse("auto, false or the path of a .ckpt file")


class TrainConfig(EntryConfig):
    """train.py's config (configs/train.yaml)."""

    seed: ruled(int, minimum=0)
    limit: ruled(int, minimum=1, optional=True)
    data: DataKeys
    trainer: TrainerKeys
    module: ModuleKeys = Field(default_factory=ModuleKeys)
    resume: Annotated[Any, BeforeValidator(_resume)]

    @model_validator(mode="after")
    def _check_training_folder(self) -> "TrainConfig":
        extra = self.data.model_extra or {}
        if "train_root" in extra and extra["train_root"] is None:  # configs/data/image_folder.yaml
            raise refuse(
                "config key 'data.train_root' has the value None; allowed: the training image folder "
                "(root/<class>/<image>), e.g. data.train_root=/data/train"
            )
        return self


# ----------------------------------------------------------------------------------------------
# explain.py


class ExplainConfig(EntryConfig):
    """explain.py's config (configs/explain.yaml): its keys, the selected methods and FAME's options."""

    seed: ruled(int, minimum=0)
    limit: ruled(int, minimum=1, optional=True)
    split: ruled(str, choices=SPLITS)
    target: ruled(str, choices=("label", "prediction"), help="the class a classification map explains")
    new_group: ruled(bool)
    input_space: ruled(str, choices=INPUT_SPACES, help="normalized needs a model with normalize/net")
    data: DataKeys
    explainer: Optional[Dict[str, Any]] = None

    @model_validator(mode="after")
    def _check_methods_and_input_space(self) -> "ExplainConfig":
        _check_methods(self.explainer, self.data.task)
        try:
            task_of(self.data.task).check_input_space(self.input_space)
        except ConfigError as error:
            raise refuse(str(error)) from None
        return self


class FeaturemapKeys(Node):
    images: ruled(int, minimum=1)
    max_locations: ruled(int, minimum=1, optional=True)
    sheet_layer: ruled(str)
    output_dir: ruled(str)


class FeaturemapConfig(EntryConfig):
    """``explain.py experiment=featuremap`` (paper Sec. 4.1): the featuremap keys, FAME selected,
    a classification data config."""

    featuremap: FeaturemapKeys
    data: DataKeys
    explainer: Optional[Dict[str, Any]] = None

    @model_validator(mode="after")
    def _check_fame_and_task(self) -> "FeaturemapConfig":
        fame = selected_methods(self.explainer).get("fame")
        if fame is None:
            raise refuse("the feature-map experiment needs the fame explainer: explainer=[fame]")
        try:
            fame_options(fame, "explainer.fame")
        except ConfigError as error:
            raise refuse(str(error)) from None
        if not task_of(self.data.task).explains_feature_maps:
            raise refuse(
                "the feature-map experiment explains a classifier's layers: choose a classification data config"
            )
        return self


# ----------------------------------------------------------------------------------------------
# evaluate.py


class BootstrapKeys(Node):
    resamples: ruled(int, minimum=10)
    confidence: ruled(float, minimum=0.5, maximum=0.999)


class LocalizationKeys(Node):
    metrics: entries(allowed=sorted(LOCALIZATION_METRICS))


class RoadKeys(Node):
    orders: entries(allowed=list(ROAD_ORDERS))
    imputations: entries(allowed=ROAD_IMPUTATIONS)
    percentages: entries(each=Rule(float, minimum=0, maximum=100), increasing=True)


class VerificationKeys(Node):
    percentages: entries(each=Rule(float, minimum=0, maximum=100), increasing=True)


class DeletionKeys(Node):
    fractions: entries(each=Rule(float, minimum=0, maximum=1), increasing=True)
    protocol: ruled(
        str,
        choices=SUBSTRATES,
        help="fame: black / blurred [0, 1] pixels at deletion.fractions; rise: "
        "RISE's CausalMetric, one pixel row per step",
    ) = "fame"


class SanityKeys(Node):
    """The sanity check's options (Adebayo et al. 2018; README "Evaluation")."""

    samples: ruled(int, minimum=1) = 8
    layers: Optional[Any] = None
    randomization: ruled(
        str,
        choices=RANDOMIZATIONS,
        help="reinit: reset_parameters() and BatchNorm statistics "
        "reset; redraw: parameters redrawn from their own mean / std",
    ) = "reinit"

    @model_validator(mode="after")
    def _check_layers(self) -> "SanityKeys":
        layers = self.layers
        if layers is not None and (
            not isinstance(layers, list) or not layers or not all(isinstance(name, str) for name in layers)
        ):
            raise refuse(
                f"config key 'sanity.layers' has the value {layers!r}; allowed: null (the model's blocks, "
                "output first) or a non-empty list of module names, e.g. [fc, layer4, layer3]"
            )
        return self


class EvaluateConfig(EntryConfig):
    """evaluate.py's config (configs/evaluate.yaml)."""

    seed: ruled(int, minimum=0)
    device: ruled(str)
    exclude_empty: ruled(bool)
    bootstrap: BootstrapKeys
    grid_rows: ruled(int, minimum=0)
    families: entries(allowed=FAMILIES)
    localization: LocalizationKeys
    road: RoadKeys
    verification: VerificationKeys
    deletion: DeletionKeys
    sanity: SanityKeys = Field(default_factory=SanityKeys)

    @model_validator(mode="after")
    def _check_road_start(self) -> "EvaluateConfig":
        if "road" in self.families and self.road.percentages[0] != 0:  # the logit drop is measured from P = 0
            raise refuse(
                f"config key 'road.percentages' has the value {self.road.percentages}; "
                "allowed: levels starting at 0 (the logit drop is measured from P = 0)"
            )
        return self


def sanity_options(config: Any) -> Tuple[int, Optional[List[str]], str]:
    """(``sanity.samples``, ``sanity.layers``, ``sanity.randomization``) of an evaluate config,
    checked by :class:`SanityKeys`; defaults 8, null and reinit."""
    node = plain(config).get("sanity") if config is not None else None
    options = check(SanityKeys, node or {}, prefix="sanity")
    return options.samples, options.layers, options.randomization
