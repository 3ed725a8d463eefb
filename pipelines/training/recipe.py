"""The one typed schema for a training job. Recipes are YAML files that mirror it; unknown keys are rejected.

A job = a recipe (how to train) + a variant (what to train) + a dataset version (on what). The variant's own
facts (resolution, dropout, crop ratio) come from `models`' table unless the recipe overrides them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from models import (
    COEFFICIENT_KEYS,
    DEFAULT_COEFFICIENT_TOLERANCE,
    OVERRIDE_KEYS,
    PAPER_COEFFICIENTS,
    PHI_SIZE_KEYS,
    V1_BASE_NAME,
    CoefficientSet,
    StageSpec,
    VariantSpec,
    architecture_from_dict,
    check_coefficients,
    check_override,
    resolve_variant,
)
from pipelines.dataset import Backend
from pipelines.loading.transforms import TrainCrop
from pipelines.training.recipes import RECIPES_DIR, list_recipes


class RecipeError(ValueError):
    """A recipe that does not exist or does not validate."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A stored thing's name (a coefficient set, a baseline, a registered model): a file name, a tag value.
SET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class TableConfig(_Strict):
    """A stage table built in place of the variant's (a searched baseline; see models.search_space): the fields of
    `models.Architecture`, each row a `models.StageSpec` (its fields, block kinds and rules, such as odd kernels),
    the whole checked by models as the table it builds."""

    stem: int
    stages: list[StageSpec]
    head: int
    ten_percent_rule: bool = True

    @model_validator(mode="after")
    def _builds(self) -> TableConfig:
        architecture_from_dict(self.model_dump())  # ValueError naming what is wrong
        return self


class ModelConfig(_Strict):
    variant: str = V1_BASE_NAME
    # Compound-scaling overrides applied on top of the variant (phi=-3 gives a CPU-sized model).
    phi: float | None = None
    # The bases phi scales by: a named set (`paper`, or one a scaling search stored; resolved to its numbers
    # when the job is planned, `pipelines.training.coefficients`) or explicit values; unset ones are the paper's.
    coefficients: str | None = Field(None, pattern=SET_NAME, description="a named coefficient set")
    alpha: float | None = Field(None, description="depth base of compound scaling")
    beta: float | None = Field(None, description="width base of compound scaling")
    gamma: float | None = Field(None, description="resolution base of compound scaling")
    coefficient_tolerance: float = Field(
        DEFAULT_COEFFICIENT_TOLERANCE, gt=0, lt=1, description="alpha * beta^2 * gamma^2 within this fraction of 2"
    )
    width_mult: float | None = None
    depth_mult: float | None = None
    resolution: int | None = Field(None, description="train resolution; default: the variant's")
    eval_resolution: int | None = Field(None, description="eval resolution; default: the variant's")
    crop_ratio: float | None = Field(
        None,
        description="eval centre crop's share of the resized image; "
        "default: the variant's (V1: res / (res + 32), V2: 1)",
    )
    allow_large_resolution: bool = Field(False, description="a V2 resolution above the paper's cap of 480")
    late_depth_stages: int | None = Field(
        None,
        description="non-uniform depth: the blocks depth scaling "
        "adds go to the last N stages (V2's rule); 0 or unset: every stage",
    )
    dropout: float | None = None
    stochastic_depth: float | None = None
    # PyTorch convention (weight of the new batch). None keeps the paper's 0.01 (TF decay 0.99), which needs
    # thousands of steps to settle; short runs need a faster average or their eval-mode BN is still at init.
    bn_momentum: float | None = Field(None, gt=0, le=1)
    table: TableConfig | None = Field(None, description="a searched stage table in place of the variant's")
    # A stored baseline by name (`pipelines.training.baselines`), resolved to its `table` when the job is planned.
    baseline: str | None = Field(None, pattern=SET_NAME, description="a named baseline table")

    @field_validator(*OVERRIDE_KEYS)
    @classmethod
    def _in_range(cls, value: Any, info: ValidationInfo) -> Any:
        """Each override's range is the one `models` applies to it (`models.check_override`): a recipe is refused
        when it is written, for the reason the variant would be (a resolution below the network's stride, ...)."""
        if value is None:
            return value
        assert info.field_name is not None  # set for a field validator
        return check_override(info.field_name, value)

    def overrides(self) -> dict[str, Any]:
        """Keyword overrides for `models.create_model` / `models.resolve_variant`."""
        out = {k: getattr(self, k) for k in OVERRIDE_KEYS if getattr(self, k) is not None}
        if self.table is not None:
            out["table"] = self.table.model_dump()
        return {**out, "allow_large_resolution": True} if self.allow_large_resolution else out

    def spec(self) -> VariantSpec:
        """The variant this section trains, every override applied: the one recipe-to-variant resolution."""
        return resolve_variant(self.variant, **self.overrides())

    def model_args(self, num_classes: int) -> dict[str, Any]:
        """What a checkpoint stores to rebuild the model (`models.checkpoint`): the variant, its overrides, its
        classes; `of_model_args` reads it back."""
        return {"name": self.variant, **self.overrides(), "num_classes": num_classes}

    @classmethod
    def of_model_args(cls, model_args: dict[str, Any], like: ModelConfig) -> ModelConfig:
        """The model section that rebuilds a saved model from its checkpoint's `model_args` (the variant's name,
        its overrides, its classes), with `like`'s training knobs (BN momentum, the coefficients' tolerance)."""
        args = {k: v for k, v in model_args.items() if k not in ("name", "num_classes")}
        return cls(
            variant=model_args["name"],
            bn_momentum=like.bn_momentum,
            coefficient_tolerance=like.coefficient_tolerance,
            **args,
        )

    def coefficient_set(self) -> CoefficientSet:
        """The set phi scales by: the given values, the paper's for those not given."""
        paper = PAPER_COEFFICIENTS
        return CoefficientSet(
            self.coefficients or ("paper" if self.alpha is self.beta is self.gamma is None else "explicit"),
            self.alpha or paper.alpha,
            self.beta or paper.beta,
            self.gamma or paper.gamma,
        )

    @model_validator(mode="after")
    def _coefficients_hold(self) -> ModelConfig:
        if (self.alpha, self.beta, self.gamma) != (None, None, None):
            if self.phi is None:
                raise ValueError("alpha, beta and gamma only apply together with phi")
            cs = self.coefficient_set()
            check_coefficients(f"coefficient set {cs.name!r}", cs.alpha, cs.beta, cs.gamma, self.coefficient_tolerance)
        return self


class OptimConfig(_Strict):
    optimizer: Literal["rmsprop", "sgd", "adamw"] = "rmsprop"
    # Learning rate for a global batch of 256; scaled linearly with the real global batch (paper convention).
    lr_per_256: float = Field(0.016, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    rmsprop_decay: float = Field(0.9, gt=0, lt=1)
    # TF's RMSProp adds eps inside the square root; 1e-3 there ~ 1e-3 outside at these magnitudes
    # (see `steps.build_optimizer`).
    eps: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    schedule: Literal["exponential", "cosine"] = "exponential"
    warmup_epochs: float = Field(5.0, ge=0)
    decay_rate: float = Field(0.97, gt=0, le=1)
    decay_epochs: float = Field(2.4, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)


class RegularizationConfig(_Strict):
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    ema_decay: float | None = Field(0.9999, gt=0, lt=1)


class AugmentConfig(_Strict):
    """Batch augmentations on the device (see pipelines/training/augment.py). Progressive learning overrides the
    RandAugment magnitude and the mixup alpha stage by stage."""

    policy: Literal["none", "randaugment", "autoaugment"] = "none"
    # Small datasets whose objects fill the frame (28 px photos) keep the whole image and shift it instead of
    # cropping it: each image moved by whole pixels, up to this fraction of its side, black filling the border.
    translate: float = Field(0.0, ge=0, lt=0.5, description="max shift of an image, as a fraction of its side")
    randaug_ops: int = Field(2, ge=1)
    randaug_magnitude: float = Field(9.0, ge=0)
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)


class ProgressiveConfig(_Strict):
    """V2 progressive learning: training split into `stages` equal parts; in each, image size, dropout,
    RandAugment magnitude and mixup alpha move from their min towards their max.

    `rule: paper` is the V2 paper (stage i of n at min + (max - min) * i / (n - 1); Table 6 ranges);
    `rule: automl` is the released code (min + (max - min) * (i + 1) / n, its own ranges, dropout constant).
    Explicit [min, max] pairs override the variant's table.
    `choose_from`: the epochs early stopping scores and may choose: `any_stage` (every epoch) or `last_stage`
    (only the last stage's, trained at the size evaluation uses, as the papers' last-epoch figures are; minival
    is still measured every epoch). Measured on demo data (benchmarks/progressive.py, 3 seeds, 500 val images):
    val top-1 99.5 any_stage, 99.1 last_stage, within the seeds' spread; any_stage stays the default.
    """

    enabled: bool = False
    stages: int = Field(4, ge=1)
    rule: Literal["paper", "automl"] = "paper"
    image_size: tuple[int, int] | None = None
    dropout: tuple[float, float] | None = None
    randaug_magnitude: tuple[float, float] | None = None
    mixup_alpha: tuple[float, float] | None = None
    choose_from: Literal["last_stage", "any_stage"] = Field(
        "any_stage", description="the epochs whose checkpoints early stopping scores and may choose"
    )


class DataConfig(_Strict):
    backend: Backend = "wds"
    # Per worker and optimizer step: with the worker count, the global batch the learning rate scales with. What
    # does not fit a device at once is accumulated over micro-batches (pipelines/training/sizing.py).
    batch_size: int = Field(128, ge=1, description="per worker and optimizer step")
    micro_batch_size: int | None = Field(None, ge=1, description="images per forward pass; default: sized to fit")
    loader_workers: int = Field(4, ge=0)
    eval_batch_size: int | None = Field(None, ge=1)
    # The training crop's ranges (the papers': Inception's); small or close-up datasets often keep more area.
    rrc_scale: tuple[float, float] = Field(TrainCrop.scale, description="area fraction a training crop keeps")
    rrc_ratio: tuple[float, float] = Field(TrainCrop.ratio, description="aspect ratios of a training crop")
    flip: bool = Field(TrainCrop.flip, description="mirror half the training crops left to right")

    @model_validator(mode="after")
    def _crop_ranges(self) -> DataConfig:
        (s0, s1), (r0, r1) = self.rrc_scale, self.rrc_ratio
        if not 0 < s0 <= s1 <= 1:
            raise ValueError(f"data.rrc_scale must be (min, max) with 0 < min <= max <= 1, got {self.rrc_scale}")
        if not 0 < r0 <= r1:
            raise ValueError(f"data.rrc_ratio must be (min, max) with 0 < min <= max, got {self.rrc_ratio}")
        return self

    @property
    def train_crop(self) -> TrainCrop:
        return TrainCrop(self.rrc_scale, self.rrc_ratio, self.flip)  # tuples already: validation made them


class ScheduleConfig(_Strict):
    epochs: int = Field(350, ge=1)
    patience: int | None = Field(None, ge=1, description="early stop after this many epochs without improvement")
    eval_every: int = Field(1, ge=1)
    # Every epoch ends with a checkpoint; these add mid-epoch ones (either or both), from which a restarted job
    # resumes at the very batch it had reached. The clock is rank 0's, told to every rank each step.
    checkpoint_every_steps: int | None = Field(None, ge=1, description="a mid-epoch checkpoint every N steps")
    checkpoint_every_minutes: float | None = Field(None, gt=0, description="a mid-epoch checkpoint every M minutes")


class RayConfig(_Strict):
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    use_gpu: bool = False
    device_memory_gb: float | None = Field(
        None, gt=0, description="per worker: the device memory a micro-batch is sized to; None: the batch whole"
    )
    max_failures: int = Field(2, ge=0)


class RuntimeConfig(_Strict):
    amp: bool = True  # bf16 autocast on GPU; off on CPU, where it is slower for these convolutions
    channels_last: bool = True
    compile: bool = False
    torch_threads: int | None = Field(None, ge=1, description="per worker; default: cpus_per_worker")
    system_metrics_seconds: float | None = Field(
        10.0, gt=0, description="MLflow system metrics (CPU, memory, GPU) of each node sampled this often; null: off"
    )


class InitConfig(_Strict):
    """Start from a registered model's weights rather than from scratch (fine-tuning): `from` names the version
    (`models:/efficientnet-b0/3`, or `models:/efficientnet-b0@champion`, read when the job starts); `head: keep`
    keeps its classifier (same classes), `reset` builds a new one for the dataset's classes, `match` builds a new
    one whose rows for the class ids the source was also trained on (WNIDs: ImageNet-21k -> ILSVRC2012, as the V2
    paper fine-tunes) are the source's rows, weight and bias; the rest stay freshly initialised
    (`warm_start.matched_rows`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    from_: str = Field(
        alias="from",
        pattern=r"^models:/[^/@]+(/\d+|@[\w-]+)$",
        description="models:/NAME/VERSION or models:/NAME@ALIAS",
    )
    head: Literal["keep", "reset", "match"] = "keep"
    # Layer-wise freezing for the first epochs (a new head settles before the features move): the stem and the
    # first N stages, or "backbone" (everything but the classifier), weights and BN statistics kept as loaded.
    freeze: int | Literal["backbone"] = Field(0, description="stages frozen with the stem (0: none), or 'backbone'")
    freeze_epochs: int = Field(0, ge=0, description="epochs the frozen part stays frozen")

    @model_validator(mode="after")
    def _freeze_is_whole(self) -> InitConfig:
        if isinstance(self.freeze, int) and self.freeze < 0:
            raise ValueError("init.freeze must be a number of stages >= 0 or 'backbone'")
        if (self.freeze != 0) != (self.freeze_epochs > 0):
            raise ValueError("init.freeze and init.freeze_epochs go together: what to freeze, and for how long")
        return self


class Recipe(_Strict):
    name: str
    description: str = ""
    seed: int = 0
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    regularization: RegularizationConfig = RegularizationConfig()
    augment: AugmentConfig = AugmentConfig()
    progressive: ProgressiveConfig = ProgressiveConfig()
    data: DataConfig = DataConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    ray: RayConfig = RayConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    init: InitConfig | None = None  # None: from scratch
    # The registered model the job's version goes to (and whose champion it is measured against); default
    # efficientnet-<variant>. A model fine-tuned onto other classes is another task: `effnet finetune` names it.
    register_as: str | None = Field(None, pattern=SET_NAME)

    @model_validator(mode="after")
    def _eval_every_fits(self) -> Recipe:
        if self.schedule.eval_every > self.schedule.epochs:
            raise ValueError("schedule.eval_every is larger than schedule.epochs: minival would never run")
        return self

    def with_overrides(self, **sections: Any) -> Recipe:
        """A copy with some fields of some sections replaced (a section's by a dict of them, a top-level field such
        as `register_as` by its value), validated like a file."""
        data = self.model_dump(by_alias=True)  # as a file spells the fields (init's `from`)
        unknown = [s for s in sections if s not in data]
        if unknown:
            raise ValueError(f"unknown recipe section {unknown[0]!r}")
        try:
            return Recipe.model_validate(merge_sections(data, sections))
        except ValidationError as exc:
            raise RecipeError(f"invalid recipe {self.name!r} after overrides: {describe_errors(exc)}") from None


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A recipe by name (`v1`, `demo`, ...) or by path to a YAML file, with the recipe it `extends` under it."""
    path, data = _recipe_sections(name_or_path, ())
    data.setdefault("name", path.stem)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{path}: invalid recipe: {describe_errors(exc)}") from None


EXTENDS = "extends"  # a recipe file's key: the recipe (a name, or a path beside it) whose sections it changes


def _recipe_sections(name_or_path: str | Path, seen: tuple[Path, ...]) -> tuple[Path, dict[str, Any]]:
    """A recipe file's sections merged over those of the recipe it extends: a section's fields replace the
    base's one by one; `name` and `description` are the file's own."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    elif seen and not path.is_absolute():
        path = seen[-1].parent / path  # a base file named by path lies beside the file that extends it
    if not path.exists():
        raise RecipeError(f"recipe {str(name_or_path)!r} not found; known recipes: {', '.join(list_recipes())}")
    if path.resolve() in seen:
        chain = " -> ".join(p.stem for p in (*seen, path.resolve()))
        raise RecipeError(f"{path}: recipes extend each other in a circle ({chain})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got a {type(data).__name__}")
    base_name = data.pop(EXTENDS, None)
    if base_name is None:
        return path, data
    if not isinstance(base_name, str):
        raise RecipeError(f"{path}: {EXTENDS} names one recipe, got {base_name!r}")
    _, base = _recipe_sections(base_name, (*seen, path.resolve()))
    for own in ("name", "description"):
        base.pop(own, None)
    return path, merge_sections(base, data)


def merge_sections(base: dict[str, Any], *overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Recipe sections merged, later ones winning: a section's fields replace the earlier ones field by field
    (a whole value where either side is not a mapping). The one merge rule of recipe files (`extends`),
    `Recipe.with_overrides` and a family's layered overrides."""
    out = dict(base)
    for o in overrides:
        for section, values in (o or {}).items():
            both = isinstance(values, dict) and isinstance(out.get(section), dict)
            out[section] = {**out[section], **values} if both else values
    return out


def describe_errors(exc: ValidationError) -> str:
    """One clause per problem: the key path, what was given, what is allowed."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "recipe"
        # A whole section's value (a model-level check) is no help in one line: its message names the fields.
        shown = err["loc"] and err["type"] != "missing" and "input" in err and not isinstance(err["input"], dict)
        given = f" (given {err['input']!r})" if shown else ""
        parts.append(f"{where}{given}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


MEMBER_SCALING_KEYS = ("coefficients", *COEFFICIENT_KEYS, "baseline")


def parse_family_member(member: str) -> dict[str, Any]:
    """A family member as written in a flow parameter -> `model` section overrides.

    `efficientnet_b3` is a registered variant; `phi=-3` (or `phi=1.5`) is B0 compound-scaled by that phi, with
    the recipe's coefficients (the paper's by default); `phi=2,coefficients=my-search` scales by a named set,
    `phi=2,alpha=1.3,beta=1.1,gamma=1.15` by explicit values; `phi=0,baseline=my-nas` scales a stored baseline
    table (a baseline search's) in place of B0's.
    """
    member = member.strip()
    if not member.startswith("phi="):
        return {"variant": member, "phi": None}
    first, *rest = member.split(",")
    try:
        phi = float(first[4:])
    except ValueError:
        raise ValueError(f"family member {member!r}: phi must be a number, e.g. phi=-3") from None
    if not math.isfinite(phi):
        raise ValueError(f"family member {member!r}: phi must be a finite number, e.g. phi=-3")
    # phi decides the sizes: explicit ones the recipe has would win over it (models.PHI_SIZE_KEYS).
    out: dict[str, Any] = {"variant": V1_BASE_NAME, "phi": phi, **dict.fromkeys(PHI_SIZE_KEYS)}
    for part in rest:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in MEMBER_SCALING_KEYS:
            raise ValueError(
                f"family member {member!r}: {part.strip()!r} is not one of "
                f"{', '.join(k + '=...' for k in MEMBER_SCALING_KEYS)}"
            )
        if key in ("coefficients", "baseline"):
            out[key] = value.strip()
        else:
            try:
                out[key] = float(value)
            except ValueError:
                raise ValueError(f"family member {member!r}: {key} must be a number") from None
    if "coefficients" in out and set(COEFFICIENT_KEYS) & set(out):
        raise ValueError(f"family member {member!r}: a named coefficient set or alpha/beta/gamma, not both")
    if "coefficients" in out:  # the set's own numbers replace whatever the recipe had (resolved later)
        out.update(dict.fromkeys(COEFFICIENT_KEYS))
    elif set(COEFFICIENT_KEYS) & set(out):
        out["coefficients"] = None
    return out
