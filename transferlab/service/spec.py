"""The experiment spec: a pydantic model of the YAML a researcher writes, validated completely.

``load_spec`` reads and validates a file; ``validate_spec`` also checks everything that needs the
plugin registries (names, options, class ranges, freeze depths against the backbone's stages), so no
trial starts and nothing is written for a spec that cannot run.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import reprlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from transferlab.service.spec_yaml import SpecError, parse_spec_yaml, read_spec_text

CONDITIONS = ("AnB", "AnB+", "BnB", "BnB+", "random")
Condition = Literal["AnB", "AnB+", "BnB", "BnB+", "random"]
BnPolicy = Literal["frozen", "train"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PluginRef(BaseModel):
    """A plugin name with its options: ``convnet`` or ``{name: convnet, widths: [16, 32]}``."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=200)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainSpec(_Strict):
    """Training settings shared by every trial of the study."""

    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    eval_batch_size: int = Field(256, ge=1, le=65_536)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    schedule: Literal["cosine", "step", "none"] = "cosine"
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    amp: bool = True
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    num_workers: int = Field(0, ge=0, le=64)
    stage_lr_mult: list[Annotated[float, Field(ge=0, le=100)]] | None = None
    head_lr_mult: float = Field(1.0, ge=0, le=100)
    #: Frozen-prefix feature cache (``transferlab.engine.feature_cache``): on, storage dtype, size limit.
    feature_cache: bool = True
    feature_cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    feature_cache_max_mb: float = Field(2048.0, ge=0)
    #: Convolution weights in channels-last (NHWC) memory format; null: on CUDA only.
    channels_last: bool | None = None
    #: Keep in-memory data sets (and cached features) on the GPU; null: on CUDA when they take at
    #: most data_on_device_max_mb.
    data_on_device: bool | None = None
    data_on_device_max_mb: float = Field(4096.0, ge=0)


class Resources(_Strict):
    """What one trial asks of Ray: CPUs and (fractional) GPUs."""

    cpu: float = Field(1.0, gt=0, le=1024)
    gpu: float = Field(0.0, ge=0, le=64)


class GivenSplit(_Strict):
    """Explicit A and B class lists."""

    A: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    B: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)

    @model_validator(mode="after")
    def _disjoint(self) -> GivenSplit:
        for side in ("A", "B"):
            values = getattr(self, side)
            if len(set(values)) != len(values):
                raise ValueError(f"{side} lists a class twice: {values}")
        common = sorted(set(self.A) & set(self.B))
        if common:
            raise ValueError(f"classes {common} are in both A and B; the halves must be disjoint")
        return self


class RandomSplit(_Strict):
    """Random A/B halves of the task's classes, one split per seed."""

    random: Literal[True]
    seeds: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(min_length=1, max_length=100)
    a_classes: int | None = Field(None, ge=1)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds list one twice: {value}; each seed draws one split")
        return value


# Tags of the tagged unions below; pydantic puts them in error locations, and ``_loc`` drops them.
_UNION_TAGS = ("given-split", "random-split", "all-depths", "depth-list")


def _split_kind(value: Any) -> str:
    return "random-split" if isinstance(value, dict) and "random" in value else "given-split"


def _depths_kind(value: Any) -> str:
    return "all-depths" if isinstance(value, str) else "depth-list"


Split = Annotated[
    Annotated[GivenSplit, Tag("given-split")] | Annotated[RandomSplit, Tag("random-split")],
    Discriminator(_split_kind),
]
Depths = Annotated[
    Annotated[Literal["all"], Tag("all-depths")]
    | Annotated[list[Annotated[int, Field(ge=1)]], Tag("depth-list")],
    Discriminator(_depths_kind),
]


class TransferSource(_Strict):
    """The task (and head) base net A trains on when it differs from the target task.

    Cross-task transfer: baseA learns the source task; AnB and AnB+ copy its first n stages into a
    net with the target task's head. ``head`` defaults to ``classify``.
    """

    task: PluginRef
    head: PluginRef = PluginRef(name="classify")


class TransferSpec(_Strict):
    """Yosinski et al. (2014): base nets on A and B, then AnB, AnB+, BnB, BnB+ and random per depth.

    ``split`` divides the classes into A and B; with a ``source`` task it may be left out, and then A
    is every class of the source task and B every class of the target task.
    """

    split: Split | None = None
    source: TransferSource | None = None
    depths: Depths = "all"
    conditions: list[Condition] = Field(default_factory=lambda: list(CONDITIONS), min_length=1)
    bn: BnPolicy = "frozen"
    fine_tune_lr_mult: float = Field(1.0, ge=0, le=100)

    @field_validator("depths")
    @classmethod
    def _unique_depths(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("depths must be 'all' or a non-empty list of distinct depths")
        return value

    @field_validator("conditions")
    @classmethod
    def _unique_conditions(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"conditions list one twice: {value}")
        return value

    @model_validator(mode="after")
    def _split_or_source(self) -> TransferSpec:
        if self.split is None and self.source is None:
            raise ValueError(
                "needs a 'split' of the classes into A and B, or a 'source' task for base net A "
                "(cross-task transfer)"
            )
        return self


class SingleSpec(_Strict):
    """One backbone + head + task, optionally on a class subset with a frozen prefix."""

    freeze_depth: int = Field(0, ge=0)
    bn: BnPolicy = "frozen"
    classes: list[Annotated[int, Field(ge=0)]] | None = None


#: The longest trial condition the store keeps (its ``trials.condition`` column).
CONDITION_MAX_LENGTH = 16
#: A multitask task key: it names the task in trial conditions (``single:<key>``, at most
#: ``CONDITION_MAX_LENGTH`` characters) and in metric names (``val/<key>/miou``, ``train/weight/<key>``).
TASK_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,8}$")
SINGLE_PREFIX = "single:"
#: A multitask trial's model-selection metric: the mean over tasks of (+/-) each primary metric.
MULTITASK_METRIC = "score"
#: Keys that would read as the combined metrics beside the per-task ones (``train/weight/<key>``, ``score``).
RESERVED_TASK_KEYS = ("weight", "score")


class MultitaskTask(_Strict):
    """One task of a multitask study and the head that predicts its target."""

    task: PluginRef
    head: PluginRef = PluginRef(name="classify")


class MultitaskSpec(_Strict):
    """One shared backbone, one head per task, trained jointly under each loss weighting.

    ``single_task_baselines`` adds each task trained alone on the same backbone, depth, seed and
    budget, so the results can report every task's change over single-task training.
    """

    tasks: dict[str, MultitaskTask]
    weightings: list[PluginRef] = Field(
        default_factory=lambda: [PluginRef(name="equal")], min_length=1, max_length=64
    )
    single_task_baselines: bool = True
    freeze_depths: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0], min_length=1)
    bn: BnPolicy = "frozen"

    @field_validator("tasks")
    @classmethod
    def _task_keys(cls, value: dict[str, MultitaskTask]) -> dict[str, MultitaskTask]:
        bad = [k for k in value if not TASK_KEY.match(k)]
        if bad:
            raise ValueError(
                f"task keys {bad} are not allowed: a key is a letter then up to 8 letters, digits or "
                "'_' (it names the task in conditions such as 'single:<key>' and in metric names)"
            )
        reserved = [k for k in value if k in RESERVED_TASK_KEYS]
        if reserved:
            raise ValueError(
                f"task keys {reserved} are reserved (metric names use {', '.join(RESERVED_TASK_KEYS)}); "
                "choose another"
            )
        if len(value) < 2:
            raise ValueError(
                f"a multitask study needs at least 2 tasks, got {len(value)} ({', '.join(value) or 'none'}); "
                "one task alone is a 'single' study"
            )
        return value

    @field_validator("freeze_depths")
    @classmethod
    def _unique_depths(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"freeze_depths list one twice: {value}")
        return value

    @field_validator("weightings")
    @classmethod
    def _unique_weightings(cls, value: list[PluginRef]) -> list[PluginRef]:
        dumped = [w.model_dump() for w in value]
        twice = [w.name for i, w in enumerate(value) if dumped[i] in dumped[:i]]
        if twice:
            raise ValueError(f"weightings list {twice} twice with the same options; each runs once")
        return value

    def weighting_conditions(self) -> list[str]:
        """The condition each weighting's trials are recorded under, in the order listed.

        A weighting's name, with ``-1``, ``-2``, ... when a name is listed more than once (two
        ``fixed`` weightings with different weights become ``fixed-1`` and ``fixed-2``).
        """
        counts = Counter(w.name for w in self.weightings)
        seen: Counter[str] = Counter()
        conditions = []
        for w in self.weightings:
            seen[w.name] += 1
            conditions.append(w.name if counts[w.name] == 1 else f"{w.name}-{seen[w.name]}")
        return conditions


class Spec(_Strict):
    """A whole experiment."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    study: Literal["transfer", "single", "multitask"]
    backbone: PluginRef
    #: The head and task of a transfer or single study; a multitask study names one per task instead.
    head: PluginRef = PluginRef(name="classify")
    task: PluginRef | None = None
    train: TrainSpec = TrainSpec()
    #: Albumentations transforms for the training split (docs/augmentation.md): a name, or a name with
    #: the transform's parameters; checked against albumentations by ``spec_checks``.
    augment: list[PluginRef] = Field(default_factory=list, max_length=64)
    seeds: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(
        default_factory=lambda: [0], min_length=1, max_length=1000
    )
    resources: Resources = Resources()
    max_failures: int = Field(0, ge=0, le=100)
    transfer: TransferSpec | None = None
    single: SingleSpec | None = None
    multitask: MultitaskSpec | None = None

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds list one twice: {value}")
        return value

    @model_validator(mode="after")
    def _study_section(self) -> Spec:
        for section in ("transfer", "single", "multitask"):
            if section != self.study and getattr(self, section) is not None:
                raise ValueError(f"a '{section}' section only belongs to study '{section}'")
        if self.study == "transfer" and self.transfer is None:
            raise ValueError("study 'transfer' needs a 'transfer' section (split, depths, conditions)")
        if self.study == "multitask":
            if self.multitask is None:
                raise ValueError("study 'multitask' needs a 'multitask' section (tasks, weightings)")
            given = [k for k in ("task", "head") if k in self.model_fields_set]
            if given:
                raise ValueError(
                    f"a multitask study names its tasks and heads under 'multitask.tasks' "
                    f"(each key: {{task: ..., head: ...}}); remove the top-level {' and '.join(given)}"
                )
            return self
        if self.task is None:
            raise ValueError(f"study '{self.study}' needs a 'task'")
        if self.study == "single" and self.single is None:
            self.single = SingleSpec()
        return self

    @property
    def study_task(self) -> PluginRef:
        """The task of a transfer or single study (a multitask study has one per key)."""
        if self.task is None:
            raise ValueError(f"a {self.study} study has no top-level task")
        return self.task


@dataclass(frozen=True)
class ClassSplit:
    """One A/B split of the task's classes; ``None`` means every class (cross-task, no split)."""

    id: str
    a: tuple[int, ...] | None
    b: tuple[int, ...] | None


@dataclass(frozen=True)
class TaskFacts:
    """One task of a multitask study as its trials use it."""

    task_name: str
    #: The spec's task options with paths made absolute (and a pretrained backbone's input settings).
    task_options: dict[str, Any]
    head_name: str
    head_options: dict[str, Any]
    primary_metric: str
    higher_is_better: bool


@dataclass(frozen=True)
class ValidatedSpec:
    """A spec that passed every check, with the facts the planner needs."""

    spec: Spec
    text: str
    source: str
    stage_names: tuple[str, ...]
    depths: tuple[int, ...]
    splits: tuple[ClassSplit, ...]
    num_classes: int
    primary_metric: str
    higher_is_better: bool
    #: The task options trials use: the spec's, plus a pretrained backbone's normalisation and size.
    task_options: dict[str, Any] = field(default_factory=dict)
    #: The backbone options trials use: the spec's, with file paths made absolute.
    backbone_options: dict[str, Any] = field(default_factory=dict)
    #: Cross-task transfer: the source task's options (as ``task_options``), primary metric and direction.
    source_task_options: dict[str, Any] | None = None
    source_primary_metric: str | None = None
    source_higher_is_better: bool = True
    #: Multitask study: each task key's task, head, primary metric and direction, in spec order.
    multitask_tasks: dict[str, TaskFacts] = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.stage_names)

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(self.spec.model_dump_json().encode()).hexdigest()


def _loc(parts: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in parts if p not in _UNION_TAGS)


def _short(value: Any) -> str:
    """``repr`` cut to a readable length (a bad value may be a huge list)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = 60
    short.maxlist = short.maxdict = 8
    return short.repr(value)


def _models_in(annotation: Any) -> dict[str | None, type[BaseModel]]:
    """The pydantic models in a field's annotation, keyed by their union tag (``None``: untagged)."""
    models: dict[str | None, type[BaseModel]] = {}
    for arg in get_args(annotation) or (annotation,):
        tag = None
        if get_origin(arg) is Annotated:
            arg, *metadata = get_args(arg)
            tag = next((m.tag for m in metadata if isinstance(m, Tag)), None)
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            models[tag] = arg
        elif get_args(arg):  # an optional union: ``Split | None``
            models.update(_models_in(arg))
    return models


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at ``loc`` (for close matches on unknown keys)."""
    models: dict[str | None, type[BaseModel]] = {None: Spec}
    for part in loc:
        if part in models:  # a union tag in the location picks that member of the union
            models = {None: models[part]}
            continue
        field = next(iter(models.values())).model_fields.get(part)
        models = _models_in(field.annotation) if field is not None else {}
        if not models:
            return []
    return list(next(iter(models.values())).model_fields)


def _pydantic_problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        loc = err["loc"]
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            known = _known_fields(loc[:-1])
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append((_loc(loc), f"unknown key{hint} (allowed: {', '.join(known)})"))
            continue
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = (
            ""
            if err["type"] in ("missing", "value_error") or isinstance(value, dict)
            else f" (got {_short(value)})"
        )
        problems.append((_loc(loc), msg + shown))
    return problems


def parse_spec(data: dict[str, Any], source: str = "<spec>") -> Spec:
    """Validate the structure and types of a spec mapping."""
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, _pydantic_problems(exc)) from None


def load_spec(path: str | Path) -> ValidatedSpec:
    """Read, parse and completely validate a spec file."""
    text = read_spec_text(path)
    return validate_spec_text(text, str(path))


def validate_spec_text(text: str, source: str = "<spec>") -> ValidatedSpec:
    """Parse and completely validate spec text (structure, plugins, classes, depths)."""
    from transferlab.service.spec_checks import check_spec  # imports the registries

    spec = parse_spec(parse_spec_yaml(text, source), source)
    return check_spec(spec, text, source)
