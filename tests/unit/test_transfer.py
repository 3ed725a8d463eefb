"""The transfer plan and table (`pipelines.training.transfer`), on synthetic models and dataset versions: which jobs
a transfer runs and what each registers as, what is refused as no transfer, and the papers' table with every cell
linked to its run. The flow on a real cluster: tests/integration/test_transfer_flow.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.training.recipe import load_recipe
from pipelines.training.transfer import (
    SCRATCH,
    Source,
    Target,
    dataset_name,
    failed_cells,
    model_uri,
    plan_transfer,
    resolve_target,
    to_markdown,
    to_text,
    transfer_jobs,
    transfer_name,
    transfer_recipes,
    transfer_table,
)

IMAGENET = tuple(f"n{i:08d}" for i in range(4))
B0 = Source(
    "models:/efficientnet-b0-phi-9/3",
    "efficientnet_b0_phi-9",
    {"name": "efficientnet_b0", "phi": -9.0, "num_classes": 4},
    IMAGENET,
    "imagenet-aaa",
    123_456,
)
B2 = Source(
    "models:/efficientnet-b0-phi-7/1",
    "efficientnet_b0_phi-7",
    {"name": "efficientnet_b0", "phi": -7.0, "num_classes": 4},
    IMAGENET,
    "imagenet-aaa",
    None,
)
CIFAR = Target(Path("/d/cifar10-111"), "cifar10-111", "cifar10", ("airplane", "automobile", "bird"))
FLOWERS = Target(Path("/d/flowers102-222"), "flowers102-222", "flowers102", tuple(f"{i}" for i in range(1, 6)))
FINETUNE = load_recipe("finetune")
SCRATCH_RECIPE = load_recipe("demo")


def _link(run_id: str) -> str:
    return f"http://mlflow/#/experiments/1/runs/{run_id}"


def test_names():
    assert transfer_name("efficientnet_b0", "cifar10") == "efficientnet-b0-cifar10"
    assert transfer_name("efficientnet_b0_phi-9", "flowers102") == "efficientnet-b0-phi-9-flowers102"
    assert model_uri("efficientnet-b0") == "models:/efficientnet-b0@champion"
    assert model_uri("models:/efficientnet-b0/3") == "models:/efficientnet-b0/3"


@pytest.mark.parametrize(
    "source, expected",
    [
        ({"kind": "archives"}, "imagenet"),  # ILSVRC2012, staged before versions named their dataset
        ({"dataset": "cifar10"}, "cifar10"),
        ({"dataset": "Stanford_Cars"}, "stanford-cars"),
    ],
)
def test_dataset_name(source, expected):
    class Manifest:
        pass

    m = Manifest()
    m.source = source  # type: ignore[attr-defined]
    assert dataset_name(m) == expected  # type: ignore[arg-type]


def test_every_model_onto_every_dataset():
    pairs = plan_transfer([B0, B2], [CIFAR, FLOWERS], FINETUNE, None)
    assert [(p.source.uri, p.target.version, p.name) for p in pairs] == [
        (B0.uri, "cifar10-111", "efficientnet-b0-phi-9-cifar10"),
        (B2.uri, "cifar10-111", "efficientnet-b0-phi-7-cifar10"),
        (B0.uri, "flowers102-222", "efficientnet-b0-phi-9-flowers102"),
        (B2.uri, "flowers102-222", "efficientnet-b0-phi-7-flowers102"),
    ]
    first = pairs[0].finetune
    # The source's architecture and weights, a new head; the recipe's training knobs (the V2 paper's) kept.
    assert first.model.spec().name == "efficientnet_b0_phi-9"
    assert first.init is not None and (first.init.from_, first.init.head) == (B0.uri, "reset")
    assert first.register_as == "efficientnet-b0-phi-9-cifar10"
    assert first.optim == FINETUNE.optim and first.schedule == FINETUNE.schedule
    assert all(p.scratch is None for p in pairs)
    assert [label for label, _, _ in transfer_jobs(pairs)] == [p.name for p in pairs]


def test_from_scratch_adds_a_job_per_pair():
    (pair,) = plan_transfer([B0], [CIFAR], FINETUNE, SCRATCH_RECIPE)
    assert pair.scratch is not None and pair.scratch.init is None
    assert pair.scratch.model.spec().name == "efficientnet_b0_phi-9" and pair.scratch.optim == SCRATCH_RECIPE.optim
    assert pair.scratch.register_as == pair.scratch_name == f"efficientnet-b0-phi-9-cifar10-{SCRATCH}"
    jobs = transfer_jobs([pair])
    assert [(label, recipe, path) for label, recipe, path in jobs] == [
        (pair.name, pair.finetune, CIFAR.path),
        (pair.scratch_name, pair.scratch, CIFAR.path),
    ]


def test_match_needs_a_shared_class_id():
    in_1k = Target(Path("/d/in1k"), "imagenet-ccc", "imagenet", (IMAGENET[2], "n99999999"))
    (pair,) = plan_transfer([B0], [in_1k], FINETUNE, None, head="match")
    assert pair.finetune.init is not None and pair.finetune.init.head == "match"


def test_recipes_take_epochs_and_overrides():
    finetune, scratch = transfer_recipes("finetune", "demo", 2, {"ray": {"num_workers": 1}})
    assert finetune.schedule.epochs == 2 and finetune.ray.num_workers == 1 and finetune.optim == FINETUNE.optim
    assert scratch is not None and scratch.schedule.epochs == 2 and scratch.ray.num_workers == 1
    assert transfer_recipes("finetune", None, None, None) == (FINETUNE, None)
    with pytest.raises(ValueError, match="recipe 'nope' not found"):
        transfer_recipes("nope", None, None, None)


@pytest.mark.parametrize(
    "sources, targets, head, message",
    [
        (
            [B0],
            [Target(Path("/d/x"), "imagenet-aaa", "imagenet", ("a",))],
            "reset",
            "models:/efficientnet-b0-phi-9/3 was trained on imagenet-aaa: that is fine-tuning on its own task",
        ),
        (
            [B0],
            [Target(Path("/d/x"), "imagenet-bbb", "imagenet", IMAGENET)],
            "reset",
            "was trained on the classes of imagenet-bbb",
        ),
        ([B0], [CIFAR], "keep", "head must be one of reset, match, not 'keep'"),
        (
            [B0],
            [CIFAR, Target(Path("/d/y"), "cifar10-333", "cifar10", ("cat",))],
            "reset",
            "would both register as efficientnet-b0-phi-9-cifar10: one model per variant and one version per dataset",
        ),
        (
            [B0, Source("models:/other/1", B0.variant, B0.model_args, None, None, None)],
            [CIFAR],
            "reset",
            "would both register as efficientnet-b0-phi-9-cifar10",
        ),
        ([B0], [CIFAR], "match", "head: match finds no class id shared"),
        (
            [Source("models:/x/1", B0.variant, B0.model_args, None, None, None)],
            [CIFAR],
            "match",
            "models:/x/1 records no class ids",
        ),
        ([], [CIFAR], "reset", "nothing to transfer: 0 model(s) onto 1 dataset version(s)"),
    ],
)
def test_what_is_no_transfer_is_refused_in_one_line(sources, targets, head, message):
    with pytest.raises(ValueError, match="^[^\n]*$") as info:
        plan_transfer(sources, targets, FINETUNE, None, head)
    assert message in str(info.value)


def test_a_target_by_name_or_directory(tmp_path):
    version = tmp_path / "datasets" / "cifar10-abc"
    version.mkdir(parents=True)
    manifest = {
        "format": 1,
        "version": "cifar10-abc",
        "classes": ["cat", "dog"],
        "num_classes": 2,
        "splits": {},
        "minival_keys": [],
        "tiers": [32],
        "shards": [],
        "bad_files": [],
        "images_seen": 0,
        "source": {"kind": "cifar10-binary", "dataset": "cifar10"},
        "params": {},
        "code_version": "x",
    }
    (version / "manifest.json").write_text(json.dumps(manifest))
    by_name = resolve_target(tmp_path / "datasets", "cifar10-abc")
    assert by_name == resolve_target(tmp_path / "datasets", str(version))
    assert (by_name.dataset, by_name.classes, by_name.path) == ("cifar10", ("cat", "dog"), version.resolve())
    with pytest.raises(FileNotFoundError, match="dataset cifar10-nope: neither a directory nor a staged version"):
        resolve_target(tmp_path / "datasets", "cifar10-nope")


def _trained(run_id: str, top1: float, name: str) -> dict:
    return {
        "status": "trained",
        "run_id": run_id,
        "val_top1": top1,
        "registered_model": name,
        "version": "1",
        "params": 98_765,
        "wall_clock_hours": 0.25,
        "variant": "efficientnet_b0_phi-9",
    }


def test_the_table_links_every_cell_to_its_run():
    pairs = plan_transfer([B0, B2], [CIFAR, FLOWERS], FINETUNE, SCRATCH_RECIPE)
    rows = {}
    for i, p in enumerate(pairs):
        rows[p.name] = _trained(f"ft{i}", 90.0 + i, p.name)
        rows[p.scratch_name] = _trained(f"sc{i}", 50.0 + i, p.scratch_name)
    rows[pairs[3].scratch_name] = {"variant": pairs[3].scratch_name, "status": "failed", "reason": "Ray job x failed"}
    table = transfer_table(pairs, rows, _link, "transfer t")
    assert table["datasets"] == ["cifar10", "flowers102"]
    assert [m["model"] for m in table["models"]] == [B0.uri, B2.uri]
    assert [(c["dataset"], c["model"], c["run_id"], c["run_url"]) for c in table["cells"]] == [
        (p.target.dataset, p.source.uri, f"ft{i}", _link(f"ft{i}")) for i, p in enumerate(pairs)
    ]
    assert table["cells"][0]["scratch"]["run_id"] == "sc0" and table["cells"][0]["top1"] == 90.0
    assert table["cells"][3]["scratch"]["status"] == "failed"
    json.dumps(table)  # the parent run's transfer_table.json
    assert failed_cells(table) == f"1 transfer job(s) failed: {pairs[3].scratch_name} (Ray job x failed)"

    markdown = to_markdown(table)
    grid = markdown.split("\n\n")[2].splitlines()
    assert grid[0] == "| model | variant | params (M) | cifar10 top-1 | flowers102 top-1 |"
    assert grid[2] == (
        f"| {B0.uri} | efficientnet_b0_phi-9 | 0.123 | [90.00]({_link('ft0')}) (scratch "
        f"[50.00]({_link('sc0')})) | [92.00]({_link('ft2')}) (scratch [52.00]({_link('sc2')})) |"
    )
    assert grid[3].startswith(f"| {B2.uri} | efficientnet_b0_phi-7 | - |") and "(scratch failed)" in grid[3]
    for i in range(4):
        assert markdown.count(_link(f"ft{i}")) == 2  # in the grid and in the pair's row
    assert "| cifar10 | cifar10-111 | models:/efficientnet-b0-phi-9/3 | [90.00]" in markdown
    assert "0.099 | 0.250 | efficientnet-b0-phi-9-cifar10/1 |" in markdown
    text = to_text(table)
    assert "90.00 (scratch 50.00)" in text and "http" not in text


def test_a_failed_pair_is_a_failed_cell():
    (pair,) = plan_transfer([B0], [CIFAR], FINETUNE, None)
    table = transfer_table(
        [pair], {pair.name: {"variant": pair.name, "status": "failed", "reason": "boom"}}, _link, "t"
    )
    assert table["cells"][0]["run_id"] is None and "scratch" not in table["cells"][0]
    assert failed_cells(table) == f"1 transfer job(s) failed: {pair.name} (boom)"
    assert "| failed: boom |" in to_markdown(table)
    assert failed_cells(transfer_table([pair], {pair.name: _trained("r", 1.0, pair.name)}, _link, "t")) is None


def test_run_links_go_to_the_tracking_server_or_the_local_ui():
    from pipelines.registry.tracking import LOCAL_UI, run_url

    assert run_url("http://127.0.0.1:5001/", "3", "abc") == "http://127.0.0.1:5001/#/experiments/3/runs/abc"
    assert run_url("sqlite:///data/mlflow/mlflow.db", "3", "abc") == f"{LOCAL_UI}/#/experiments/3/runs/abc"
