"""Session fixtures shared by every test tier: a tiny demo ImageNet and one staged version of it, and the
collection hooks that give each test its tier from its folder and skip `gpu` tests on a machine without CUDA.

The fixtures are read-only for tests: a test that damages files copies the staged dataset first (`copy_staged`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines.source.demo import DemoSummary, write_demo_imagenet

from helpers import DEMO_KWARGS, STAGE_PARAMS, stage_directly

TESTS = Path(__file__).resolve().parent
# The folder decides the tier; each is a marker registered in pyproject.toml, selected by `make test-unit`
# (`-m unit`) and `make test-integration` (`-m "integration or e2e"`).
TIERS = ("unit", "integration", "e2e")


def tier_of(path: Path) -> str | None:
    """`unit` for tests/unit/..., and so on; None for a file under tests/ outside the tier folders."""
    parts = path.resolve().relative_to(TESTS).parts
    return parts[0] if len(parts) > 1 and parts[0] in TIERS else None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its folder's tier, and skip `gpu` tests where CUDA is not available.

    A test outside the tier folders, or one marked with another folder's tier, is a usage error: otherwise
    `-m unit` and `-m "integration or e2e"` would not split the suite into two parts that add up to all of it.
    """
    wrong = []
    for item in items:
        if not item.path.resolve().is_relative_to(TESTS):
            continue  # collected from elsewhere (an explicit path outside tests/): not ours to sort
        tier = tier_of(item.path)
        if tier is None:
            wrong.append(f"{item.nodeid} is outside tests/{{{','.join(TIERS)}}}")
            continue
        others = sorted({m.name for m in item.iter_markers() if m.name in TIERS} - {tier})
        if others:
            wrong.append(f"{item.nodeid} is marked {' and '.join(others)} but lives in tests/{tier}")
        item.add_marker(tier)
    if wrong:
        raise pytest.UsageError("the folder decides a test's tier: " + "; ".join(wrong))
    skip_gpu_tests_without_cuda(items)


def skip_gpu_tests_without_cuda(items: list[pytest.Item]) -> None:
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    reason = (f"needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
              f"built for CUDA {torch.version.cuda or 'none'})")
    for item in gpu:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def demo_summary(tmp_path_factory: pytest.TempPathFactory) -> DemoSummary:
    """The generator's own record of the tiny demo ImageNet (classes, val ground truth, planted oddities)."""
    return write_demo_imagenet(tmp_path_factory.mktemp("demo_archives"), **DEMO_KWARGS)


@pytest.fixture(scope="session")
def demo_archives(demo_summary: DemoSummary) -> Path:
    """The folder holding the three ILSVRC2012 archives of the tiny demo ImageNet."""
    return demo_summary.out_dir


@pytest.fixture(scope="session")
def staged_dataset(demo_archives: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo staged at tiers (32, 64), shard_size 8, minival 0.25, seed 0; its version directory."""
    return stage_directly(demo_archives, tmp_path_factory.mktemp("datasets"), STAGE_PARAMS)


@pytest.fixture
def copy_staged(staged_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the staged version (same folder name) for tests that damage files."""
    root = tmp_path / staged_dataset.parent.name
    shutil.copytree(staged_dataset.parent, root)  # the whole datasets root: the spools live beside the versions
    return root / staged_dataset.name
