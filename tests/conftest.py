"""Session fixtures shared by every test tier: a tiny demo ImageNet and one staged version of it.

Both are read-only for tests: a test that damages files copies the staged dataset first (`copy_staged`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines.source.demo import DemoSummary, write_demo_imagenet

from helpers import DEMO_KWARGS, STAGE_PARAMS, stage_directly


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
