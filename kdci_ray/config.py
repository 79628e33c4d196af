"""Typed, validated run configs: one YAML file -> one run; `--set a.b=c` overrides; clear errors.

Every section forbids unknown keys, so a typo fails loudly (with the allowed keys) before any work.
Later stages (distillation, KDCI, Ray, Tune, tracking) add their sections here; Tune search spaces are
overrides of these objects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SerializeAsAny, Strict, ValidationError, field_validator, model_validator,
)

from .data import DATASETS
from .models import check_classifier_spec, is_external
from .registry import Registry


class ConfigError(ValueError):
    """An invalid config: the message names each bad field, the value given and what is allowed."""


def _number_to_str(value: Any) -> Any:
    # Overrides are parsed as YAML, so `--set name=2024` arrives as an int; a name is still meant.
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


#: A string field that also takes a YAML number as its text.
Text = Annotated[str, BeforeValidator(_number_to_str)]
def _switch_from_bool(value: Any) -> Any:
    # YAML 1.1 reads a bare `on` / `off` as true / false: `--set channels_last=on` must still mean "on".
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


#: "auto" / "on" / "off", also written as a YAML boolean.
Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch_from_bool)]
#: An int field that refuses booleans and floats (`epochs: true` is a mistake, not 1).
Int = Annotated[int, Strict()]


def _check_betas(value: tuple[float, float]) -> tuple[float, float]:
    if not all(0 <= b < 1 for b in value):
        raise ValueError(f"Adam betas must each be in [0, 1), got {list(value)}")
    return value


#: Adam's (beta1, beta2).
Betas = Annotated[tuple[float, float], AfterValidator(_check_betas)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _known_dataset(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(DATASETS.unknown_message(name))
    return name


#: The name of a registered dataset (checked against the registry, with the known names in the error).
DatasetName = Annotated[Text, AfterValidator(_known_dataset)]


class DataConfig(Section):
    dataset: DatasetName = Field(description="registered dataset name")
    root: Path | None = Field(None, description="data folder or .tar.gz archive (not needed for digits)")
    download: bool = False
    limit: Int | None = Field(None, ge=1, description="use only the first N images of each split (smoke runs)")
    train_split: Text = "train"
    test_split: Text | None = Field(None, description="labelled split to evaluate on; default: the dataset's eval split")


class ModelConfig(Section):
    arch: Text = Field(description="a registered classifier (resnet34, ...), torchvision:<name>, timm:<name> or "
                       "import:<module>:<callable>")
    num_classes: Int | None = Field(None, ge=1, description="default: the dataset's class count")
    pretrained: bool = Field(False, description="torchvision:/timm: models: start from the library's weights (online)")
    features_layer: Text | None = Field(None, description="the final linear layer of an external model (default: its last nn.Linear)")
    options: dict[str, Any] = Field({}, description="keyword arguments of an external model's constructor")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, name: str) -> str:
        return check_classifier_spec(name)

    @model_validator(mode="after")
    def _external_only(self):
        if not is_external(self.arch) and (self.pretrained or self.features_layer or self.options):
            raise ValueError(f"arch = {self.arch}: pretrained, features_layer and options are for torchvision:/timm:/import: "
                             "models; remove them")
        return self

    def model_options(self, pretrained: bool | None = None) -> dict[str, Any]:
        """What `create_model` takes besides the class and channel counts (`pretrained` overrides the config's)."""
        if not is_external(self.arch):
            return {}
        return {"pretrained": self.pretrained if pretrained is None else pretrained, "features_layer": self.features_layer,
                **self.options}


class OptimConfig(Section):
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, description="not applied to BatchNorm weights and biases (see decay_norm_and_bias)")
    decay_norm_and_bias: bool = Field(False, description="weight decay on every parameter, BatchNorm and biases too (the public "
                                      "DFKD code's recipe; the CIFAR configs set it to match the public runs)")
    batch_size: Int = Field(256, ge=1)
    epochs: Int = Field(200, ge=1)
    warmup_epochs: float = Field(0, ge=0)
    schedule: Literal["cosine", "constant", "step"] = Field("cosine", description="per step; step: x0.1 at 40 % and 80 % of the run")


class AugmentConfig(Section):
    crop_padding: Int = Field(4, ge=0, description="pad-and-random-crop margin in pixels (0: off)")
    hflip: bool = True


class OutputConfig(Section):
    dir: Path = Path("runs/teachers")
    overwrite: bool = Field(False, description="replace existing weights of the same name")


class RunConfig(Section):
    """What every run has: a name, a seed, where and how it computes, how often it evaluates."""

    name: Text = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run name: names its outputs under output.dir")
    seed: Int = Field(0, ge=0, lt=2**32)
    device: Text = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: Switch = "auto"
    eval_every: Int = Field(1, ge=1, description="evaluate on the labelled test split every N epochs (and at the end)")


class TeacherTrainConfig(RunConfig):
    """`kdci-ray train-teacher`: supervised training of a classifier on labelled data (<output.dir>/<name>.safetensors)."""

    data: DataConfig
    model: ModelConfig
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = AugmentConfig()
    output: OutputConfig = OutputConfig()


class TeacherConfig(ModelConfig):
    weights: Path | None = Field(None, description="teacher weights (.safetensors, or a torch checkpoint read with weights_only); "
                                 "may be left out for a torchvision:/timm: teacher with pretrained: true (the library's weights)")

    @model_validator(mode="after")
    def _weights_or_pretrained(self):
        if self.weights is None and not (is_external(self.arch) and self.pretrained):
            raise ValueError("teacher.weights is required: the file of the trained teacher (or, for a torchvision:/timm: "
                             "teacher, pretrained: true to use the library's weights)")
        return self


class KDConfig(Section):
    temperature: float = Field(4.0, gt=0, description="KD softmax temperature tau (loss is scaled by tau^2)")


class KDCIConfig(Section):
    """The confounder dictionary and the causal intervention (see ../shared/KDCI.md)."""

    enabled: bool = Field(True, description="false: the plain baseline, exactly")
    n: Int = Field(32, ge=1, description="dictionary size N (number of k-means prototypes)")
    alpha: float = Field(1.0, ge=0, description="fusion weight: s' = s + alpha * F")
    hidden: Int = Field(256, ge=1, description="attention hidden size h")
    attention: Literal["additive", "dot"] = "additive"
    uniform_attention: bool = Field(False, description="ablation: lambda = 1/N")
    use_prior: bool = Field(True, description="false = ablation: drop P(z) from F")
    random_prototypes: bool = Field(False, description="ablation: Gaussian prototypes with the real ones' mean/std")
    feature: Literal["logits", "penultimate"] = Field("logits", description="teacher output used to assign clusters")
    pca_dim: Int | None = Field(None, ge=1, description="PCA-reduce the assignment features (prototypes stay logits)")
    niter: Int = Field(20, ge=1, description="k-means (Lloyd) iterations")
    nredo: Int = Field(3, ge=1, description="k-means++ restarts; the lowest-inertia run is kept")
    max_train_points: Int = Field(100_000, ge=1, description="k-means trains on a seeded sample of this many rows")
    rebuild_every: Int = Field(0, ge=0, description="rebuild the dictionary every this many epochs (0: build once)")
    min_images_per_prototype: Int = Field(
        0, ge=0, description="the first dictionary waits (plain KD meanwhile) until a growing synthesizer pool holds this many images "
        "per prototype (or is full), at most half the run: N prototypes from the first call's images barely cover what the student "
        "trains on later. Single-process runs; data-parallel runs build at once. 0 (the default; the DeepInv and CMI configs set "
        "16, measured): build at the first epoch")
    dictionary: Path | None = Field(
        None, description="a prebuilt dictionary (jobs/build_dictionary.py output) used instead of building one; needs rebuild_every 0"
    )

    @model_validator(mode="after")
    def _prebuilt_is_fixed(self) -> "KDCIConfig":
        if self.dictionary is not None and self.rebuild_every > 0:
            raise ValueError("kdci.dictionary is a prebuilt dictionary and kdci.rebuild_every > 0 would replace it: set rebuild_every: 0 or unset dictionary")
        return self

    @model_validator(mode="after")
    def _enough_train_points(self) -> "KDCIConfig":
        if self.max_train_points < self.n:
            raise ValueError(f"max_train_points = {self.max_train_points} < n = {self.n}: k-means needs at least n points; raise max_train_points")
        return self


class ValidationConfig(Section):
    """Data-free validation: substitution data the run never trains on, scored against the teacher at every
    evaluation (val_agreement, val_kl): what model selection may use, since nobody holds the test labels."""

    images: Int = Field(512, ge=0, description="held-out images: synthesizers make them with held-out seeds (once, at most one "
                        "call's batch); fixed pools and selections hold out a seeded share of their rows (0: off)")
    share: float = Field(0.1, gt=0, lt=1, description="at most this share of a fixed pool or selection is held out")


class SynthesisConfig(Section):
    """What every DFKD method's settings share. Each method file subclasses this with its own fields
    (losses, weights, schedules) and registers the subclass in `SYNTHESIS_CONFIGS` under its name, so a
    config's `synthesis:` section is validated against the chosen method's schema.

    Schedule: an epoch is `calls_per_epoch` synthesis calls, each followed by `kd_steps_per_call` KD
    steps (the public code's ep_steps / kd_steps); `warmup_calls` synthesis-only calls run before the
    first KD step.
    """

    method: Text = Field(description="registered DFKD method (dafl, deepinv, fast, cmi, ...)")
    batch_size: Int = Field(256, ge=1, description="images made per synthesis call")
    pool_size: Int = Field(65536, ge=1, description="in-memory image pool bound; the oldest images leave first")
    calls_per_epoch: Int = Field(1, ge=1, description="synthesis calls per KD epoch")
    kd_steps_per_call: Int = Field(400, ge=1, description="KD steps after each synthesis call")
    warmup_calls: Int = Field(0, ge=0, description="synthesis-only calls before the first KD step")
    g_steps: Int = Field(1, ge=1, description="optimisation steps inside one synthesis call")
    lr_g: float = Field(1e-3, gt=0, description="learning rate of the synthesis optimiser")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="synthesis arithmetic (the public runs are fp32; bf16 autocast is faster on GPUs)"
    )
    export_pool: bool = Field(False, description="write the final pool to <run dir>/pool.parquet")
    init_pool: Path | None = Field(
        None, description="Parquet pool (file or folder of shards) loaded into the pool before synthesis, e.g. CMI's pre-inverted set"
    )


class WildDataConfig(Section):
    """Unlabelled real data from another distribution (DFND's wild set, MosaicKD's OOD set): any registered
    dataset, labels unused, resized to the teacher's input (e.g. tiny-imagenet at 32 px for CIFAR teachers)."""

    dataset: DatasetName = Field(description="registered dataset used without labels (tiny-imagenet, imagenet, imagefolder, digits-wild, ...)")
    root: Path | None = Field(None, description="its folder or .tar.gz archive")
    split: Text = "train"
    limit: Int | None = Field(None, ge=1, description="use only the first N images (smoke runs)")
    in_memory: Switch = Field(
        "auto", description="hold the resized pool on the training device (auto: when it has at most max_in_memory images); off: stream from the dataset"
    )
    max_in_memory: Int = Field(2_000_000, ge=1, description="largest pool `auto` holds in memory")
    workers: Int = Field(8, ge=1, description="decoding threads for file-backed pools (ImageNet, imagefolder)")


#: method name -> its SynthesisConfig subclass (filled by the method files in kdci_ray.synthesis).
SYNTHESIS_CONFIGS: Registry = Registry("synthesis method")


def _synthesis_schema(value: Any) -> Any:
    if value is None or isinstance(value, SynthesisConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError("must be a mapping with a `method` key")
    if "method" not in value:
        raise ValueError(f"`method` is required; known methods: {', '.join(SYNTHESIS_CONFIGS.names())}")
    method = str(value["method"])
    if method not in SYNTHESIS_CONFIGS:
        raise ValueError(SYNTHESIS_CONFIGS.unknown_message(method))
    try:
        return SYNTHESIS_CONFIGS.get(method).model_validate(value)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key for method {method!r} (check the spelling)" + did_you_mean(SYNTHESIS_CONFIGS.get(method), err["loc"])
            given = "" if err["type"] == "missing" or isinstance(err.get("input"), dict) else f" = {err.get('input')!r}"
            problems.append(f"{where}{given}: {msg}")
        raise ValueError("; ".join(problems)) from None


class DistillConfig(RunConfig):
    """One distillation run (outputs in <output.dir>/<name>/): teacher -> student on substitution data, with or without KDCI."""

    resume: bool = Field(True, description="continue from <output.dir>/<name>/checkpoint.pt when it exists")
    checkpoint_every: Annotated[int, Strict(), Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="write the checkpoint every N epochs (always after the last one and on SIGTERM); auto: as often "
        "as keeps writing them at <= 1 % of the training time (measured while running)",
    )
    compile: Switch = Field(
        "auto", description="the KD step as one compiled graph (torch.compile fullgraph; CUDA graphs on CUDA). auto: on for "
        "single-process CUDA runs, off on the CPU (compiling takes minutes there) and with fp16",
    )
    data: DataConfig = Field(description="the teacher's original dataset: its labelled test split scores the student")
    teacher: TeacherConfig
    student: ModelConfig
    kd: KDConfig = KDConfig()
    kdci: KDCIConfig = KDCIConfig()
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = Field(AugmentConfig(), description="applied to substitution images before KD")
    output: OutputConfig = OutputConfig(dir=Path("runs/distill"))
    validation: ValidationConfig = ValidationConfig()
    pool: Path | None = Field(
        None,
        description="fixed substitution data: a Parquet pool (jobs/synthesize.py output); when set, training reads it and synthesizes "
        "nothing (a method's own student terms, such as DFND's noise adaptation, need the method: leave pool unset)",
    )
    # Validated against the chosen method's schema; SerializeAsAny keeps the method's own fields on dump.
    synthesis: Annotated[SerializeAsAny[SynthesisConfig] | None, BeforeValidator(_synthesis_schema)] = Field(
        None, description="the DFKD method that makes the substitution data (None: data given in code)"
    )


class TableConfig(Section):
    """A results table (`kdci-ray reproduce`): methods x KDCI off/on x teacher/student pairs, each cell the
    distill config `<method>-<dataset>-<pair>.yaml` beside the table config, run as one Ray Tune grid."""

    name: Text = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="names the grid's folder and MLflow run")
    dataset: DatasetName
    methods: list[Text] = Field(min_length=1, description="DFKD methods (rows)")
    pairs: list[Annotated[Text, Field(pattern=r"^[A-Za-z0-9_]+-[A-Za-z0-9_]+$")]] = Field(
        min_length=1, description="teacher-student architecture pairs, e.g. wrn40_2-wrn16_1")
    kdci: list[bool] = Field([False, True], min_length=1, description="KDCI off and/or on in every cell")
    set: list[Text] = Field([], description="overrides (key=value) applied to every cell's config")
    gpus_per_trial: float | None = Field(None, gt=0, description="fractional GPUs per cell (one DDP worker); None: CPU trials")
    workers_per_trial: Int = Field(1, ge=1)
    max_concurrent: Int | None = Field(None, ge=1, description="trials at once; None: as many as the GPUs hold (0.25: 4 per GPU), 2 on CPUs")
    seeds: list[Annotated[int, Strict(), Field(ge=0)]] = Field([0], min_length=1, description="seeds per cell: with 3 or more the "
                                                             "table reports mean +- std and KDCI's paired difference with a 95 % interval")
    reference: dict[Text, dict[Text, float]] = Field({}, description="published top-1 per method and pair (the public code's "
                                                     "best-epoch protocol), shown beside ours; docs/reference_numbers.csv names the sources")
    reference_teacher: dict[Text, dict[Text, float]] = Field({}, description="the public teachers' top-1 per method and pair (the "
                                                             "public gap to the teacher; DFND used a teacher of its own)")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in SYNTHESIS_CONFIGS:
                raise ValueError(SYNTHESIS_CONFIGS.unknown_message(name))
        if len(set(names)) != len(names):
            raise ValueError(f"methods repeat: {names}")
        return names

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds

    @model_validator(mode="after")
    def _one_worker_per_gpu_fraction(self) -> "TableConfig":
        if self.gpus_per_trial is not None and self.gpus_per_trial < 1 and self.workers_per_trial > 1:
            raise ValueError(f"gpus_per_trial = {self.gpus_per_trial:g} with workers_per_trial = {self.workers_per_trial} puts DDP ranks "
                             "of one cell on one GPU (NCCL refuses that): set workers_per_trial: 1, or whole GPUs")
        return self


C = TypeVar("C", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], c) with c parsed as YAML (so 3 -> int, true -> bool, [1, 2] -> list)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {item!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for item in overrides or []:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def did_you_mean(model: type[BaseModel] | None, loc: tuple) -> str:
    """"; did you mean 'epochs'?" for an unknown key at `loc` of `model` (its nested sections followed),
    or "" when nothing is close."""
    import difflib
    import typing

    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(str(part))
        if field is None:
            return ""
        options = [field.annotation, *typing.get_args(field.annotation)]  # a section, or an optional one
        model = next((a for a in options if isinstance(a, type) and issubclass(a, BaseModel)), None)
    match = difflib.get_close_matches(str(loc[-1]), list(getattr(model, "model_fields", {})), n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def _format_errors(exc: ValidationError, source: str, schema: type[BaseModel] | None = None) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        field_path = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the allowed keys in configs/ or the schema)" + did_you_mean(schema, err["loc"])
        elif err["type"] == "missing":
            msg = "required field is missing"
        given = err.get("input")
        shown = "" if err["type"] in ("missing",) or isinstance(given, dict) else f" = {given!r}"
        lines.append(f"  {field_path}{shown}: {msg}")
    return "\n".join(lines)


def validate_config(schema: type[C], raw: dict[str, Any], source: str = "<dict>") -> C:
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, schema)) from None


def load_config(path: str | Path, schema: type[C], overrides: list[str] | None = None) -> C:
    """Read YAML `path`, apply `a.b=c` overrides and validate against `schema`."""
    path = Path(path)
    if not path.is_file():
        where = ""
        if not path.is_absolute() and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # inside `ray job submit`
            where = (f"; inside `ray job submit` a relative path resolves in the job's temporary copy of --working-dir "
                     f"({Path.cwd()}): name a file of that folder relative to it, or give an absolute path on shared storage")
        raise ConfigError(f"config file {path} does not exist (examples are in configs/){where}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return validate_config(schema, apply_overrides(raw, overrides), str(path))


def dump_config(config: BaseModel) -> str:
    """The config as YAML (paths as strings), e.g. to store beside outputs and in checkpoints."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def with_absolute_paths(config: C, base: Path | None = None) -> C:
    """A copy whose relative paths (teacher weights, data roots, pools, dictionaries) are absolute against
    `base` (default: the working directory): processes started elsewhere, such as Ray Train workers, whose
    working directory is not the user's, still find them."""
    base = Path.cwd() if base is None else Path(base)
    updates: dict[str, Any] = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, Path) and not value.is_absolute():
            updates[name] = base / value
        elif isinstance(value, BaseModel):
            updates[name] = with_absolute_paths(value, base)
    return config.model_copy(update=updates)
