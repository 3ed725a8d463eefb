"""Test helpers shared by the unit and integration tiers: staging without Prefect, reading shards back.

Import as `from helpers import ...` (pytest puts `tests/` on sys.path for `tests/conftest.py`).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any, Sequence

from pipelines.dataset import read_manifest
from pipelines.registry.tracking import EXPERIMENT
from pipelines.staging.params import StageParams
from pipelines.staging.stager import stage, work_dir

# The tiny demo ImageNet: 4 classes x 12 train (one of them truncated) + 4 val per class, 160x120 px +-15%.
DEMO_KWARGS: dict[str, Any] = dict(num_classes=4, train_per_class=12, val_per_class=4, seed=0)

# One bad file in 64 is 1.6%, above the default max_bad_fraction of 1%: the tiny set needs a looser limit.
STAGE_PARAMS = StageParams(tiers=(32, 64), shard_size=8, minival=0.25, seed=0, max_bad_fraction=0.05)



def stage_directly(
    source_dir: str | Path, out_dir: str | Path, params: StageParams,
    unit_order: Sequence[int] | None = None,
) -> Path:
    """The `stage-imagenet` flow's sequence without Prefect; returns the dataset version directory.

    `unit_order` (a permutation of the unit indices) processes units in another order, as a parallel or
    resumed run would; the result must not depend on it.
    """

    def map_units(fn, args):
        order = list(unit_order) if unit_order is not None else list(range(len(args)))
        done = {i: fn(*args[i]) for i in order}
        return [done[i] for i in range(len(args))]

    return stage(source_dir, out_dir, params, map_units=map_units, log=lambda *_: None)


def shard_paths(dataset_dir: str | Path, split: str, tier: int) -> list[Path]:
    """The shard files of one split x tier, in manifest (= name) order."""
    manifest = read_manifest(dataset_dir)
    return [Path(dataset_dir) / s["path"] for s in manifest.shards if s["split"] == split and s["tier"] == tier]


def read_samples(dataset_dir: str | Path, split: str, tier: int) -> dict[str, dict[str, bytes]]:
    """key -> {suffix: bytes} for every sample of one split x tier, read with plain `tarfile`.

    Raises if a key appears twice, so callers can rely on one entry per image.
    """
    samples: dict[str, dict[str, bytes]] = {}
    for path in shard_paths(dataset_dir, split, tier):
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                reader = tar.extractfile(member)
                assert reader is not None
                parts = samples.setdefault(key, {})
                assert suffix not in parts, f"{key}.{suffix} appears twice in {split}/{tier}"
                parts[suffix] = reader.read()
    return samples


def work_of(dataset_dir: str | Path, params: StageParams) -> Path:
    """The spool folder a staged version was made from (shared by versions of the same source + encoding)."""
    fingerprint = read_manifest(dataset_dir).source["fingerprint"]
    return work_dir(Path(dataset_dir).parent, fingerprint, params)


def add_images(tree: str | Path, wnids: Sequence[str], per_class: dict[str, int], start: int = 900_000,
               split: str = "train") -> list[str]:
    """Write new demo JPEGs into an extracted tree (`train/<wnid>/`, or `val/<wnid>/` for split='val'), as a
    source that grew since it was staged; returns the new keys."""
    import io

    import numpy as np

    from pipelines.source.demo import render_image

    keys = []
    for wnid, count in per_class.items():
        label = list(wnids).index(wnid)
        for i in range(count):
            number = start + i
            key = f"{wnid}_{number}" if split == "train" else f"ILSVRC2012_val_{number:08d}"
            rng = np.random.default_rng([7, label, number])
            buf = io.BytesIO()
            render_image(label, len(wnids), (160, 120), rng).save(buf, format="JPEG", quality=90)
            path = Path(tree) / split / wnid / f"{key}.JPEG"
            path.write_bytes(buf.getvalue())
            keys.append(key)
    return keys


# Bad input for the stager, as users have it: each kind must fail with an error naming the file.
BAD_INPUTS = ["missing path", "missing val archive", "truncated train archive", "devkit with too few labels"]


def _rewrite_devkit_ground_truth(devkit: Path, drop: int) -> None:
    """The devkit with its last `drop` val labels removed: it no longer matches the val images."""
    import io

    with tarfile.open(devkit, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]  # type: ignore[union-attr]
    with tarfile.open(devkit, "w:gz") as tar:
        for m, data in members:
            if data is not None and m.name.endswith("ILSVRC2012_validation_ground_truth.txt"):
                data = b"".join(data.splitlines(keepends=True)[:-drop])
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data) if data is not None else None)


def _damage(archives: Path, kind: str) -> str:
    """Damage a copy of the demo archives; returns the file name the error must name."""
    if kind == "missing val archive":
        (archives / "ILSVRC2012_img_val.tar").unlink()
        return "ILSVRC2012_img_val.tar"
    if kind == "truncated train archive":
        path = archives / "ILSVRC2012_img_train.tar"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return "ILSVRC2012_img_train.tar"
    if kind == "devkit with too few labels":
        _rewrite_devkit_ground_truth(archives / "ILSVRC2012_devkit_t12.tar.gz", drop=1)
        return "ILSVRC2012_validation_ground_truth.txt"
    raise AssertionError(kind)


def damaged_source(demo_archives: Path, tmp_path: Path, kind: str) -> tuple[Path, str]:
    """(source folder, file the error must name) for one kind of bad input."""
    import shutil

    if kind == "missing path":
        return tmp_path / "nowhere", "nowhere"
    source = tmp_path / "archives"
    shutil.copytree(demo_archives, source)
    return source, _damage(source, kind)


# --------------------------------------------------------------------------------------------- odd inputs


def plant_train_file(tree: str | Path, wnid: str, name: str, data: bytes) -> Path:
    """Put a file among a class's train images in an extracted tree (a file users have, not one the generator
    makes); returns its path."""
    path = Path(tree) / "train" / wnid / name
    path.write_bytes(data)
    return path


def class_tar_members(train_archive: str | Path, index: int) -> tuple[tarfile.TarInfo, list[tarfile.TarInfo]]:
    """(the outer member, its inner members) of the `index`-th class tar of a train archive, read with plain
    `tarfile`."""
    import io

    with tarfile.open(train_archive, "r:") as outer:
        victim = [m for m in outer if m.isfile()][index]
        reader = outer.extractfile(victim)
        assert reader is not None
        with tarfile.open(fileobj=io.BytesIO(reader.read()), mode="r:") as inner:
            return victim, inner.getmembers()


def damage_class_tar(train_archive: str | Path, index: int, member: int = 0) -> tarfile.TarInfo:
    """Overwrite the header of inner member `member` of the `index`-th class tar with 0xff bytes (the outer tar's
    headers stay whole); returns the outer member, whose name the error must give."""
    victim, inner = class_tar_members(train_archive, index)
    at = victim.offset_data + inner[member].offset
    path = Path(train_archive)
    data = bytearray(path.read_bytes())
    data[at : at + 512] = b"\xff" * 512
    path.write_bytes(bytes(data))
    return victim


class ConcurrencyProbe:
    """Wraps `runners.process_unit` (monkeypatch it in) to count units running at once and when each started and
    ended; `pause` seconds inside each unit let overlaps show."""

    def __init__(self, fn: Any, pause: float = 0.05) -> None:
        import threading

        self.fn, self.pause, self.lock = fn, pause, threading.Lock()
        self.now = self.most = 0
        self.starts: list[float] = []
        self.failed_at: float | None = None

    def __call__(self, *args: Any) -> Any:
        import time

        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.starts.append(time.monotonic())
        try:
            time.sleep(self.pause)
            return self.fn(*args)
        except Exception:
            with self.lock:
                self.failed_at = self.failed_at or time.monotonic()
            raise
        finally:
            with self.lock:
                self.now -= 1

    def started_after_failure(self) -> int:
        return sum(t > self.failed_at for t in self.starts) if self.failed_at is not None else 0


def flow_run_logs(flow_run_id: Any) -> list[str]:
    """The messages a Prefect flow run has logged to the server so far (this process's pending ones flushed)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()

    async def read() -> list[Any]:
        # Page by page: the server answers at most PREFECT_API_DEFAULT_LIMIT (200) logs at a time, and a family's
        # Ray jobs forward more lines than that.
        logs: list[Any] = []
        async with get_client() as client:
            while page := await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                                 offset=len(logs)):
                logs += page
        return logs

    return [log.message for log in asyncio.run(read())]


def flow_run_artifacts(flow_run_id: Any) -> dict[str, Any]:
    """The Prefect artifacts a flow run created, by key (as the UI's Artifacts tab lists them)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key: a for a in asyncio.run(read())}


def browse(url: str, screenshot: Path | None = None, wait_ms: int = 20_000) -> str:
    """A page as a user's browser shows it (headless Chromium, Debian's `chromium`): its DOM once its scripts
    have run for `wait_ms` of the page's time, and a screenshot to `screenshot` when asked. Skips the test
    when there is no Chromium (`make setup` installs it)."""
    import shutil
    import subprocess

    import pytest

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("needs headless Chromium (Debian package chromium; make setup installs it as root)")
    # --no-sandbox: Chromium refuses to run as root with its sandbox; the pages are our own servers'.
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1600,1000",
            f"--virtual-time-budget={wait_ms}"]
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
    return subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                          check=True).stdout


def jobs_client(ray_cluster: Any) -> Any:
    """The Ray Jobs API of the tests' cluster."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(f"http://{ray_cluster.dashboard_url}")


def ray_jobs(client: Any, field: str, value: str) -> list:
    """The Ray jobs whose submission metadata has `field` = `value`."""
    return [j for j in client.list_jobs() if (j.metadata or {}).get(field) == value]


def check_family_run(layout: Any, ray_cluster: Any, flow_run_id: str, rows: list[dict],
                     epochs: dict[str, int]) -> None:
    """What a first `train-family` run (no champion yet) leaves, asserted: one Ray job per member, side by side; a
    finished parent MLflow run with the members' runs nested under it, each registered as champion (on minival)
    with the metrics MLflow's compare view plots; the comparison files on the parent; the summary artifact and
    one progress line per epoch (`epochs` by variant) in the flow run."""
    from matplotlib.image import imread
    from mlflow.tracking import MlflowClient

    from pipelines.registry import compare
    from pipelines.registry.tracking import Tags
    from pipelines.training import submit

    jobs = ray_jobs(jobs_client(ray_cluster), submit.FLOW_RUN_FIELD, flow_run_id)
    assert len(jobs) == len(rows) and all(j.status == "SUCCEEDED" for j in jobs), jobs
    assert max(j.start_time for j in jobs) < min(j.end_time for j in jobs), "the Ray jobs did not overlap"

    c = MlflowClient(tracking_uri=layout.tracking_uri, registry_uri=layout.tracking_uri)
    exp = c.get_experiment_by_name(EXPERIMENT).experiment_id
    [parent] = c.search_runs([exp], filter_string=f"tags.{Tags.FLOW_RUN} = '{flow_run_id}' and "
                                                  f"tags.{Tags.RUN_KIND} = 'family'")
    assert parent.info.status == "FINISHED"
    for row in rows:
        mv = c.get_model_version(row["registered_model"], row["version"])
        assert mv.run_id == row["run_id"]
        # First of its name: champion, decided on minival (no champion to compare with), val not involved. The
        # decision measured the registered weights on minival: what the run scored there with them.
        assert mv.tags[Tags.PROMOTION].startswith("promoted") and mv.tags[Tags.CHAMPION_TOP1] == "none"
        assert mv.tags[Tags.PROMOTION_TOP1] == mv.tags[Tags.MINIVAL_TOP1] == f"{row['minival_top1']:.3f}" and row[
            "champion"]
        run = c.get_run(row["run_id"])
        assert run.data.tags[Tags.FLOW_RUN] == flow_run_id
        assert run.data.tags[Tags.PARENT_RUN] == parent.info.run_id  # nested under the family's run
        # What MLflow's compare view plots, as metrics of the run.
        metrics = run.data.metrics
        assert metrics["model_params"] == row["params"] and metrics["gmacs"] == row["gmacs"] > 0
        assert metrics["eval_resolution"] == row["eval_resolution"] and 0 < metrics["wall_clock_hours"] < 1
        assert metrics["gpu_hours"] == 0  # CPU workers
        assert any(k.startswith("system/node_0/cpu_utilization") for k in metrics), sorted(metrics)
    # The parent run holds the comparison: the plot, the page, the table with a row per member.
    files = {a.path for a in c.list_artifacts(parent.info.run_id, "comparison")}
    assert files == {"comparison/comparison.png", "comparison/comparison.html", "comparison/comparison.csv"}
    local = Path(c.download_artifacts(parent.info.run_id, "comparison", str(layout.root / "downloaded")))
    table = (local / "comparison.csv").read_text()
    assert [line.split(",")[0] for line in table.splitlines()[1:]] == [r["variant"] for r in rows]
    # Every cell as these rows give it (the cells' formats: tests/unit/test_compare.py); the page under the run's
    # title, showing the plot, drawn at the family figure's size (its points: test_compare.py too).
    assert table == compare.to_csv(rows)
    assert (local / "comparison.html").read_text() == compare.to_html(rows, parent.info.run_name)
    assert imread(local / "comparison.png").shape[:2] == (480, 1600)
    # The same table as the flow run's artifact in the Prefect UI.
    summary = flow_run_artifacts(flow_run_id)["family-summary"]
    assert summary.type == "markdown" and summary.data.endswith("\n\n" + compare.to_markdown(rows)), summary.data
    # The drivers' progress lines reach the flow run's log, one per epoch per variant.
    logs = flow_run_logs(flow_run_id)
    for row in rows:
        n = epochs[row["variant"]]
        for epoch in range(1, n + 1):
            assert sum(line.startswith(f"{row['variant']} epoch {epoch}/{n}") for line in logs) == 1, logs
