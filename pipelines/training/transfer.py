"""Transfer as the papers run it: registered models fine-tuned onto other datasets, and the transfer table.

Each (model, dataset version) pair is a job of the `finetune` recipe (the V2 paper's transfer settings) on the
source's architecture, started from its weights with a new classifier for the dataset's classes (`head: reset`;
`match` keeps the rows of the class ids both share), evaluated on the version's `val` split (a transfer set's own
test split), and registered as a task of its own, `<variant>-<dataset>` (`efficientnet-b0-cifar10`). With
`from_scratch`, the same architecture is also trained from scratch on the dataset (`<variant>-<dataset>-scratch`),
for comparison. The table is the papers' (EfficientNet Table 5, EfficientNetV2 Table 10): a row per model with
its parameters, a column per dataset, top-1 in each cell, each linked to the MLflow run that trained it; a second
table lists each pair's details (from-scratch top-1, the fine-tuned model's parameters, fine-tune hours, the
registered version).

`source_refs`, `resolve_sources`, `resolve_target`, `transfer_recipes` and `check_jobs` read the registry, the
recipes and the datasets root; `plan_transfer`, `transfer_jobs`, `transfer_table`, `failed_cells`, `to_markdown` and
`to_text` are pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.summary import aligned_text
from pipelines.dataset import BAD_INPUT, Manifest, read_manifest
from pipelines.registry import tracking
from pipelines.registry.compare import FAILED, TRAINED, markdown_table
from pipelines.registry.model_ref import registered_classes, registered_model_args, registered_version
from pipelines.registry.tracking import CHAMPION, Tags
from pipelines.settings import DataLayout
from pipelines.training.family import Jobs, from_champions, member_recipes
from pipelines.training.job import validate_job
from pipelines.training.recipe import ModelConfig, Recipe, load_recipe, merge_sections
from pipelines.training.warm_start import matched_rows

HEADS = ("reset", "match")  # a transfer's new classifier: fresh, or with the rows of the shared class ids
DEFAULT_DATASET = "imagenet"  # what a version's manifest that names no dataset was staged from
SCRATCH = "scratch"  # the from-scratch job's registered name ends in -scratch, its label too
TABLE_DIR = "transfer"  # the parent MLflow run's folder of the table files
TABLE_JSON, TABLE_MD = "transfer_table.json", "transfer_table.md"
Job = tuple[str, Recipe, Path]  # (label, recipe, dataset version directory): one Ray job


@dataclass(frozen=True)
class Source:
    """A registered version to start from, as the plan needs it."""

    uri: str  # models:/NAME/VERSION (an alias or a bare name resolved to the version it names now)
    variant: str  # the slug of its architecture (efficientnet_b0_phi-9): what the transfer models are named after
    model_args: dict[str, Any]  # what rebuilds its architecture (`ModelConfig.of_model_args`)
    classes: tuple[str, ...] | None  # the class ids it was trained on, as recorded with it (None: not recorded)
    dataset_version: str | None  # the staged version it was trained on (its `dataset_version` tag)
    params: int | None  # its parameter count (its `params` tag)


@dataclass(frozen=True)
class Target:
    """A staged dataset version to transfer to."""

    path: Path
    version: str  # the version's name
    dataset: str  # the dataset's name (cifar10, flowers102, imagenet, ...)
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Pair:
    """One model onto one dataset: its fine-tuning recipe and, where asked, its from-scratch one."""

    source: Source
    target: Target
    finetune: Recipe
    scratch: Recipe | None

    @property
    def name(self) -> str:
        """The registered model of the fine-tuned versions (`<variant>-<dataset>`), the fine-tuning job's label."""
        assert self.finetune.register_as is not None  # set by plan_transfer
        return self.finetune.register_as

    @property
    def scratch_name(self) -> str:
        return f"{self.name}-{SCRATCH}"


def dataset_name(manifest: Manifest) -> str:
    """The dataset a staged version holds, as registered names spell it (lower case, `-` for anything else)."""
    name = str(manifest.source.get("dataset", DEFAULT_DATASET))
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.") or DEFAULT_DATASET


def transfer_name(variant: str, dataset: str) -> str:
    """`efficientnet_b0` onto `cifar10` -> `efficientnet-b0-cifar10`."""
    return f"{tracking.registered_name(variant)}-{dataset}"


def model_uri(ref: str) -> str:
    """A model as the flow takes it: `models:/NAME/VERSION`, `models:/NAME@ALIAS`, or a registered model's
    NAME (its champion)."""
    return ref if ref.startswith("models:/") else f"models:/{ref}@{CHAMPION}"


def resolve_sources(c: Any, refs: Sequence[str]) -> list[Source]:
    """Each model pinned to the version it names now, with its architecture, classes and training data.
    ModelError (a ValueError) naming a model the registry does not have, or one without plain weights."""
    sources = []
    for ref in refs:
        mv = registered_version(c, model_uri(ref.strip()))  # ModelError: malformed, or no such version
        args = registered_model_args(c, mv)
        params = mv.tags.get(Tags.PARAMS)
        sources.append(
            Source(
                uri=f"models:/{mv.name}/{mv.version}",
                variant=ModelConfig.of_model_args(args, ModelConfig()).spec().name,
                model_args=args,
                classes=registered_classes(c, mv),
                dataset_version=mv.tags.get(Tags.DATASET_VERSION),
                params=int(params) if params else None,
            )
        )
    return sources


def source_refs(
    c: Any,
    models: Sequence[str] | None,
    family: Sequence[str] | None,
    recipe: str,
    overrides: dict | None,
    layout: DataLayout,
) -> list[str]:
    """The models to start from: `models` as given, else the champions of the `family`'s members (their variants as
    `recipe` and `overrides` make them). ValueError when neither is given, or a member has no champion."""
    if models:
        return list(models)
    if not family:
        raise ValueError("no models to transfer: give models (models:/NAME/VERSION, NAME), or family (its champions)")
    return champion_uris(c, member_recipes(list(family), recipe, overrides, layout=layout))


def transfer_recipes(
    recipe: str, scratch_recipe: str | None, epochs: int | None, overrides: dict | None
) -> tuple[Recipe, Recipe | None]:
    """The fine-tuning recipe and the from-scratch one (None: no scratch jobs), each with `overrides` and `epochs`
    over it; RecipeError (a ValueError) for a recipe that does not exist or validate."""
    sections = merge_sections({}, overrides, {"schedule": {"epochs": epochs}} if epochs is not None else None)
    finetune = load_recipe(recipe).with_overrides(**sections)
    return finetune, load_recipe(scratch_recipe).with_overrides(**sections) if scratch_recipe else None


def champion_uris(c: Any, members: Jobs) -> list[str]:
    """The champion of each family member's variant, pinned to its version (`from_champions`); ValueError naming
    the members with none yet."""
    jobs, missing = from_champions(c, members)
    if missing:
        raise ValueError(
            f"no champion yet for {', '.join(missing)}: train the family first (train-family), or name the models"
        )
    return [recipe.init.from_ for _, recipe in jobs if recipe.init is not None]


def resolve_target(datasets_root: Path, ref: str) -> Target:
    """A staged version by directory or by name under the datasets root; FileNotFoundError when neither."""
    path = Path(ref).expanduser()
    if not path.is_dir():
        path = datasets_root / ref
    if not path.is_dir():
        raise FileNotFoundError(f"dataset {ref}: neither a directory nor a staged version in {datasets_root}")
    manifest = read_manifest(path)
    return Target(path.resolve(), manifest.version, dataset_name(manifest), manifest.classes)


def _check_pair(source: Source, target: Target, head: str) -> None:
    """ValueError when the pair is no transfer: the dataset the model was trained on, or its very classes; or when
    `head: match` finds nothing to match."""
    trained_on = (
        target.version
        if target.version == source.dataset_version
        else f"the classes of {target.version}"
        if target.classes == source.classes
        else None
    )
    if trained_on is not None:
        raise ValueError(
            f"{source.uri} was trained on {trained_on}: that is fine-tuning on its own task (train-family "
            "start_from: champion), not transfer"
        )
    if head == "match":
        if source.classes is None:
            raise ValueError(f"{source.uri} records no class ids, which head: match needs: use head: reset")
        try:
            matched_rows(source.classes, target.classes)
        except ValueError as exc:
            raise ValueError(f"{source.uri} onto {target.version}: {exc}") from None


def plan_transfer(
    sources: Sequence[Source], targets: Sequence[Target], finetune: Recipe, scratch: Recipe | None, head: str = "reset"
) -> list[Pair]:
    """Every source onto every target, dataset by dataset: the fine-tuning recipe (the source's architecture with
    `finetune`'s training knobs, its weights, a new head, registered as `<variant>-<dataset>`) and, with `scratch`,
    the same architecture from scratch (`<variant>-<dataset>-scratch`). ValueError for what is no transfer, or for
    two pairs that would register under one name (two models of one variant, two versions of one dataset)."""
    if not sources or not targets:
        raise ValueError(f"nothing to transfer: {len(sources)} model(s) onto {len(targets)} dataset version(s)")
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    pairs: list[Pair] = []
    seen: dict[str, str] = {}
    for target in targets:
        for source in sources:
            _check_pair(source, target, head)
            name = transfer_name(source.variant, target.dataset)
            if name in seen:
                raise ValueError(
                    f"{source.uri} onto {target.version} and {seen[name]} would both register as {name}: "
                    "one model per variant and one version per dataset"
                )
            seen[name] = f"{source.uri} onto {target.version}"
            pairs.append(Pair(source, target, _recipe(finetune, source, name, head), _scratch(scratch, source, name)))
    return pairs


def _recipe(base: Recipe, source: Source, name: str, head: str) -> Recipe:
    model = ModelConfig.of_model_args(source.model_args, base.model).model_dump()
    return base.with_overrides(model=model, init={"from": source.uri, "head": head}, register_as=name)


def _scratch(base: Recipe | None, source: Source, name: str) -> Recipe | None:
    if base is None:
        return None
    model = ModelConfig.of_model_args(source.model_args, base.model).model_dump()
    return base.with_overrides(model=model, init=None, register_as=f"{name}-{SCRATCH}")


def transfer_jobs(pairs: Sequence[Pair]) -> list[Job]:
    """The Ray jobs of the plan, labelled by what they register as: each pair's fine-tuning, then its scratch job."""
    jobs: list[Job] = []
    for pair in pairs:
        jobs.append((pair.name, pair.finetune, pair.target.path))
        if pair.scratch is not None:
            jobs.append((pair.scratch_name, pair.scratch, pair.target.path))
    return jobs


def check_jobs(jobs: Sequence[Job]) -> None:
    """Every job checked with its dataset before anything trains (`validate_job`): ValueError naming the first
    problem, after the job's label."""
    for label, recipe, dataset in jobs:
        try:
            validate_job(recipe, dataset)
        except BAD_INPUT as exc:
            raise ValueError(f"{label}: {exc}") from None


def _result(row: dict[str, Any] | None, link: Callable[[str], str]) -> dict[str, Any]:
    """The part of a cell one job gives: its run and linked page, top-1 on val, its version, how it ended."""
    row = row or {"status": FAILED, "reason": "not run"}
    if row.get("status") != TRAINED:
        return {"status": FAILED, "reason": row.get("reason", ""), "run_id": None, "run_url": None, "top1": None}
    return {
        "status": TRAINED,
        "run_id": row["run_id"],
        "run_url": link(row["run_id"]),
        "top1": row["val_top1"],
        "registered_model": row["registered_model"],
        "version": row["version"],
        "params": row["params"],
        "hours": row["wall_clock_hours"],
        "gpu_hours": row.get("gpu_hours", 0.0),
    }


def transfer_table(
    pairs: Sequence[Pair], rows: dict[str, dict[str, Any]], link: Callable[[str], str], title: str
) -> dict[str, Any]:
    """The papers' transfer table as data: the datasets (columns), the models (rows, with their parameters) and a
    cell per pair, its fine-tuning job's result (and its from-scratch job's under `scratch`) from `rows` (the
    flow's rows by job label), each run linked by `link(run_id)`."""
    models: dict[str, dict[str, Any]] = {}
    for p in pairs:
        models.setdefault(p.source.uri, {"model": p.source.uri, "variant": p.source.variant, "params": p.source.params})
    cells = []
    for p in pairs:
        cell = {
            "dataset": p.target.dataset,
            "dataset_version": p.target.version,
            "model": p.source.uri,
            "variant": p.source.variant,
            "registered_as": p.name,
            **_result(rows.get(p.name), link),
        }
        if p.scratch is not None:
            cell["scratch"] = {"registered_as": p.scratch_name, **_result(rows.get(p.scratch_name), link)}
        cells.append(cell)
    datasets = list(dict.fromkeys(p.target.dataset for p in pairs))
    return {"title": title, "datasets": datasets, "models": list(models.values()), "cells": cells}


def failed_cells(table: dict[str, Any]) -> str | None:
    """One line naming the jobs that failed and why, or None when every one trained."""
    failed = [
        f"{part['registered_as']} ({part['reason']})"
        for cell in table["cells"]
        for part in (cell, cell.get("scratch"))
        if part is not None and part["status"] != TRAINED
    ]
    return f"{len(failed)} transfer job(s) failed: " + "; ".join(failed) if failed else None


def _top1(part: dict[str, Any] | None, markdown: bool) -> str:
    if part is None:
        return "-"
    if part["status"] != TRAINED:
        return FAILED
    value = f"{part['top1']:.2f}"
    return f"[{value}]({part['run_url']})" if markdown else value


def _millions(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f}"


def _cell_text(cell: dict[str, Any] | None, markdown: bool) -> str:
    if cell is None:
        return "-"
    text = _top1(cell, markdown)
    scratch = cell.get("scratch")
    return text if scratch is None else f"{text} (scratch {_top1(scratch, markdown)})"


def grid(table: dict[str, Any], markdown: bool = True) -> list[list[str]]:
    """The papers' layout: a row per model (its parameters), a column per dataset, val top-1 in the cells (with
    the from-scratch top-1 where trained); links in markdown."""
    at = {(cell["model"], cell["dataset"]): cell for cell in table["cells"]}
    head = ["model", "variant", "params (M)", *(f"{d} top-1" for d in table["datasets"])]
    return [head] + [
        [
            m["model"],
            m["variant"],
            _millions(m["params"]),
            *(_cell_text(at.get((m["model"], d)), markdown) for d in table["datasets"]),
        ]
        for m in table["models"]
    ]


DETAIL_HEAD = ["dataset", "version", "model", "top-1", "from scratch", "params (M)", "fine-tune h", "registered"]


def details(table: dict[str, Any], markdown: bool = True) -> list[list[str]]:
    """A row per pair: the dataset and its version, the model, top-1 (from scratch), the fine-tuned model's
    parameters and hours, the registered version (or why it failed)."""
    out = [DETAIL_HEAD]
    for cell in table["cells"]:
        trained = cell["status"] == TRAINED
        out.append(
            [
                cell["dataset"],
                cell["dataset_version"],
                cell["model"],
                _top1(cell, markdown),
                _top1(cell.get("scratch"), markdown),
                _millions(cell["params"]) if trained else "-",
                f"{cell['hours']:.3f}" if trained else "-",
                f"{cell['registered_model']}/{cell['version']}" if trained else f"failed: {cell['reason']}",
            ]
        )
    return out


def to_markdown(table: dict[str, Any]) -> str:
    """The table as the Prefect artifact and `transfer_table.md` show it: the papers' grid, then the details."""
    return (
        f"## {table['title']}\n\nval top-1 (the dataset's test split) after fine-tuning; each cell links to its "
        f"MLflow run.\n\n{markdown_table(grid(table))}\n### Each pair\n\n{markdown_table(details(table))}"
    )


def to_text(table: dict[str, Any]) -> str:
    """The grid and the details in aligned columns, for a console or a log."""
    return aligned_text(grid(table, markdown=False)) + "\n\n" + aligned_text(details(table, markdown=False))
