"""The override language: a registered variant plus keyword overrides -> a `VariantSpec` (`resolve_variant`).

The spec's name is a slug that records every effective override, in one order (`efficientnet_b0_phi-9_w1.1`), so
the same overrides always give the same name: it names jobs, checkpoints and registered models. `OVERRIDE_KEYS`
is the one list of override keys; the recipe's model section and the callers that reset some of them (a family
member, a scaling trial) derive theirs from it and from its groups (`COEFFICIENT_KEYS`, `PHI_SIZE_KEYS`).

`resolve_variant` applies the overrides in steps (`_STEPS`, in slug order): each step is a small function of the
variant, the given overrides and the changes made so far, and returns its own changes and slug tags.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from .checks import MIN_RESOLUTION, check_crop_ratio, check_late_depth_stages, check_rate, check_real, check_resolution
from .scaling import PAPER_COEFFICIENTS, compound_scale
from .tables import ARCHITECTURES, Architecture, architecture_from_dict, register_architecture
from .variants import V1_BASE_NAME, V2_MAX_RESOLUTION, VariantSpec, get_variant, v1_crop_ratio

# Override keys in slug order, each with its tag in a variant's name.
_SLUG_TAGS: dict[str, str] = {
    "phi": "phi",
    "alpha": "alpha",
    "beta": "beta",
    "gamma": "gamma",
    "width_mult": "w",
    "depth_mult": "d",
    "resolution": "r",
    "eval_resolution": "er",
    "dropout": "drop",
    "stochastic_depth": "sd",
    "late_depth_stages": "late",
    "crop_ratio": "crop",
}
OVERRIDE_KEYS: tuple[str, ...] = tuple(_SLUG_TAGS)
# The bases phi scales by (the paper's unless given); they apply only together with phi.
COEFFICIENT_KEYS: tuple[str, ...] = ("alpha", "beta", "gamma")
# What phi decides. An explicit value wins over phi, so whoever sets phi anew resets these.
PHI_SIZE_KEYS: tuple[str, ...] = ("width_mult", "depth_mult", "resolution", "eval_resolution")
# `resolve_variant`'s keywords besides the override keys: a stage table, and the V2 resolution cap lifted.
TABLE, ALLOW_LARGE_RESOLUTION = "table", "allow_large_resolution"

_positive_real = functools.partial(check_real, positive=True)
# Each override's range, checked where it is given (a recipe) and where it is applied (`resolve_variant`).
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "phi": check_real,
    **{key: _positive_real for key in (*COEFFICIENT_KEYS, "width_mult", "depth_mult")},
    "resolution": check_resolution,
    "eval_resolution": check_resolution,
    "dropout": check_rate,
    "stochastic_depth": check_rate,
    "late_depth_stages": check_late_depth_stages,  # at most the table's stages: checked in `_late_depth`
    "crop_ratio": check_crop_ratio,
}

Changes = dict[str, Any]  # VariantSpec fields to replace


def check_override(key: str, value: Any) -> Any:
    """`value` as override `key` takes it; ValueError naming the key and its allowed range."""
    return _CHECKS[key](key, value)


def _slug_number(value: float) -> str:
    """Shortest exact text for a number that is safe in file and registry names: 3, -3, 0.5, 1e-05."""
    value = float(value)
    text = str(int(value)) if value.is_integer() else repr(value)
    return text.replace("+", "")


def _tag(key: str, value: Any) -> str:
    return f"{_SLUG_TAGS[key]}{_slug_number(value)}"


def _given(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides given a value (None: not given); ValueError for an unknown key, or bases without phi."""
    unknown = sorted(set(overrides) - {*OVERRIDE_KEYS, TABLE})
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name}; valid overrides: {list(OVERRIDE_KEYS)}")
    given = {key: value for key, value in overrides.items() if value is not None}
    bases = [key for key in COEFFICIENT_KEYS if key in given]
    if bases and "phi" not in given:
        raise ValueError(f"{bases} only apply together with phi")
    return given


def _phi(spec: VariantSpec, given: dict[str, Any], changes: Changes) -> tuple[Changes, list[str]]:
    """phi (V1 only): multipliers and resolution of B0's table compound-scaled by the given bases (the paper's by
    default); the variant's dropout stays. Bases equal to the paper's leave no tag."""
    if "phi" not in given:
        return {}, []
    if spec.family != "v1":
        raise ValueError(
            f"phi scales the V1 B0 table; {spec.name} is a V2 model (use width_mult/depth_mult/resolution)"
        )
    bases = {key: check_override(key, given[key]) for key in COEFFICIENT_KEYS if key in given}
    scaled = compound_scale(given["phi"], base_resolution=get_variant(V1_BASE_NAME).train_resolution, **bases)
    tags = [_tag("phi", given["phi"])]
    tags += [_tag(key, value) for key, value in bases.items() if value != getattr(PAPER_COEFFICIENTS, key)]
    return {
        "phi": float(given["phi"]),
        "width_mult": scaled.width_mult,
        "depth_mult": scaled.depth_mult,
        "train_resolution": scaled.resolution,
        "eval_resolution": scaled.resolution,
    }, tags


def _multipliers(spec: VariantSpec, given: dict[str, Any], changes: Changes) -> tuple[Changes, list[str]]:
    """width_mult, depth_mult: explicit values, which win over phi's."""
    out: Changes = {}
    for key in ("width_mult", "depth_mult"):
        if key in given:
            value = check_override(key, given[key])
            if value != getattr(spec, key) or "phi" in given:
                out[key] = value
    return out, [_tag(key, value) for key, value in out.items()]


def _resolution(spec: VariantSpec, given: dict[str, Any], changes: Changes) -> tuple[Changes, list[str]]:
    """resolution: the training resolution; the eval one keeps its ratio to it (1 for V1, which trains and
    evaluates at one size)."""
    if "resolution" not in given:
        return {}, []
    value = check_override("resolution", given["resolution"])
    if value == spec.train_resolution and "phi" not in given:
        return {}, []
    ratio = spec.eval_resolution / spec.train_resolution
    return (
        {"train_resolution": value, "eval_resolution": max(MIN_RESOLUTION, round(value * ratio))},
        [_tag("resolution", value)],
    )


def _eval_resolution(spec: VariantSpec, given: dict[str, Any], changes: Changes) -> tuple[Changes, list[str]]:
    """eval_resolution: wins over the one phi or `resolution` gave."""
    if "eval_resolution" not in given:
        return {}, []
    value = check_override("eval_resolution", given["eval_resolution"])
    if value == changes.get("eval_resolution", spec.eval_resolution):
        return {}, []
    return {"eval_resolution": value}, [_tag("eval_resolution", value)]


def _rates(spec: VariantSpec, given: dict[str, Any], changes: Changes) -> tuple[Changes, list[str]]:
    """dropout, stochastic_depth."""
    out: Changes = {}
    for key in ("dropout", "stochastic_depth"):
        if key in given:
            value = check_override(key, given[key])
            if value != getattr(spec, key):
                out[key] = value
    return out, [_tag(key, value) for key, value in out.items()]


def _late_depth(spec: VariantSpec, given: dict[str, Any], changes: Changes) -> tuple[Changes, list[str]]:
    """late_depth_stages: at most the stages of the variant's table."""
    if "late_depth_stages" not in given:
        return {}, []
    stages = len(ARCHITECTURES[spec.architecture].stages)
    value = check_late_depth_stages("late_depth_stages", given["late_depth_stages"], stages, of=spec.name)
    if value == spec.late_depth_stages:
        return {}, []
    return {"late_depth_stages": value}, [_tag("late_depth_stages", value)]


def _table(spec: VariantSpec, given: dict[str, Any], changes: Changes) -> tuple[Changes, list[str]]:
    """table: a searched stage table in place of the variant's (scaled like it), registered under its content's
    name; tagged with that name's first 8 hex digits. The variant's own table changes nothing."""
    if TABLE not in given:
        return {}, []
    table = given[TABLE]
    arch = table if isinstance(table, Architecture) else architecture_from_dict(table)
    if arch == ARCHITECTURES[spec.architecture]:
        return {}, []
    architecture = register_architecture(arch)
    return {"architecture": architecture}, [f"t{architecture.removeprefix('searched_')[:8]}"]


def _crop(spec: VariantSpec, given: dict[str, Any], changes: Changes) -> tuple[Changes, list[str]]:
    """crop_ratio: an explicit ratio wins over the one V1 derives from the eval resolution."""
    if "crop_ratio" not in given:
        return {}, []
    value = check_override("crop_ratio", given["crop_ratio"])
    if value == spec.crop_ratio and "eval_resolution" not in changes:
        return {}, []
    return {"crop_ratio": value}, [_tag("crop_ratio", value)]


_STEPS = (_phi, _multipliers, _resolution, _eval_resolution, _rates, _late_depth, _table, _crop)


def _check_v2_cap(spec: VariantSpec, changes: Changes, allow_large: bool) -> None:
    sizes = (
        changes.get("train_resolution", spec.train_resolution),
        changes.get("eval_resolution", spec.eval_resolution),
    )
    if spec.family == "v2" and max(sizes) > V2_MAX_RESOLUTION and not allow_large:
        raise ValueError(
            f"{spec.name}: train/eval resolution {sizes[0]}/{sizes[1]} goes above V2's cap of "
            f"{V2_MAX_RESOLUTION} (paper Sec. 4.2); set model.allow_large_resolution: true to train it "
            "anyway"
        )


def resolve_variant(name: str, **overrides: Any) -> VariantSpec:
    """The spec for `name` with overrides applied; its `name` slug records every effective override.

    Overrides:
      phi (V1 only): width, depth and resolution from `compound_scale` applied to the B0 table, with
        optional `alpha`, `beta`, `gamma` (paper values by default); replaces the named variant's
        multipliers and resolution, keeps its dropout.
      width_mult, depth_mult, resolution, eval_resolution: explicit values; they win over phi.
        `resolution` sets the training resolution; for V1 (which trains and evaluates at one size) it
        sets the eval resolution too, for V2 the eval resolution keeps its ratio to the training one.
      crop_ratio: the eval centre crop's share of the resized image, in (0, 1] (default: the variant's).
      dropout, stochastic_depth: rates in [0, 1).
      late_depth_stages: non-uniform depth (V2's rule, `stage_repeats`): the blocks that depth scaling adds go
        to the last N stages only (0: every stage alike).
      allow_large_resolution: a V2 resolution override above V2_MAX_RESOLUTION is refused unless True.
      table: a stage table (an Architecture, or its `architecture_to_dict` form: a searched baseline) built in
        place of the variant's, with the variant's multipliers, resolutions and rates; registered under its
        content's name (`architecture_name`), so every process that resolves it builds the same network.
    Overrides equal to the named variant's value leave the name unchanged.
    """
    spec = get_variant(name)
    overrides = dict(overrides)
    allow_large = bool(overrides.pop(ALLOW_LARGE_RESOLUTION, False))
    given = _given(name, overrides)
    changes: Changes = {}
    tags: list[str] = []
    for step in _STEPS:
        more, more_tags = step(spec, given, changes)
        changes.update(more)
        tags += more_tags
    if not changes:
        return spec
    _check_v2_cap(spec, changes, allow_large)
    if "eval_resolution" in changes and spec.family == "v1" and "crop_ratio" not in changes:
        changes["crop_ratio"] = v1_crop_ratio(changes["eval_resolution"])  # V1's crop follows its eval size
    return dataclasses.replace(spec, name="_".join([spec.name, *tags]), **changes)
