"""`effnet train` rejects a bad variant, recipe or data path with one clear line, before Ray starts."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _effnet(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.effnet", "--data-dir", str(tmp_path / "data"), *args],
        capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--variant", "efficientnet_b99", "--recipe", "demo"], "efficientnet_b99"),
        (["--variant", "phi=abc", "--recipe", "demo"], "phi"),
        (["--variant", "efficientnet_b0", "--recipe", "no-such-recipe"], "no-such-recipe"),
        # 0 is refused by the schema, never taken as "not given" (the recipe's own value).
        (["--variant", "phi=-9", "--recipe", "demo", "--epochs", "0"], "schedule.epochs (given 0)"),
        (["--variant", "phi=-9", "--recipe", "demo", "--workers", "0"], "ray.num_workers (given 0)"),
    ],
)
def test_bad_variant_or_recipe(staged_dataset, tmp_path, args, message):
    p = _effnet("train", *args, "--data", str(staged_dataset), tmp_path=tmp_path)
    assert p.returncode == 2
    assert message in p.stderr and "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / "data" / "ray").exists() or not any((tmp_path / "data" / "ray").iterdir())


def test_bad_data_path(tmp_path):
    p = _effnet("train", "--variant", "efficientnet_b0", "--recipe", "demo", "--data", str(tmp_path / "nowhere"),
                tmp_path=tmp_path)
    assert p.returncode != 0
    assert "nowhere" in p.stderr and "effnet stage" in p.stderr and "Traceback" not in p.stderr


def test_models_json_lists_the_registry():
    import json

    p = subprocess.run([sys.executable, "-m", "cli.effnet", "models", "--json", "efficientnet_b0",
                        "efficientnet_v2_s"], capture_output=True, text=True, timeout=120)
    rows = json.loads(p.stdout)
    assert [r["name"] for r in rows] == ["efficientnet_b0", "efficientnet_v2_s"]
    assert rows[0]["params"] == 5_288_548
