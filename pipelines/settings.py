"""Where the project keeps its state: one data directory, overridable by one environment variable.

Everything a run produces lives under it, so `rm -r` of one folder resets the project and one variable moves
it to a bigger disk: the generated archives, the staged shards, the MLflow store, Ray's storage and the logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "EFFNET_DATA_DIR"
# The checkout root: pipelines/ sits directly under it.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DataLayout:
    """The fixed sub-folders of the data directory."""

    root: Path

    @property
    def demo_archives(self) -> Path:
        return self.root / "demo-imagenet"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow" / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlflow" / "artifacts"

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def tracking_uri(self) -> str:
        """MLflow's own MLFLOW_TRACKING_URI when set (a shared server), else the SQLite store in here."""
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.mlflow_db}"

    @property
    def artifact_root(self) -> str | None:
        """Where new experiments keep artifacts: here for the local store; a server decides for itself."""
        return self.mlflow_artifacts.as_uri() if self.tracking_uri.startswith("sqlite:") else None

    def ensure(self) -> "DataLayout":
        for p in (self.root, self.datasets, self.mlflow_db.parent, self.mlflow_artifacts, self.ray_storage, self.logs):
            p.mkdir(parents=True, exist_ok=True)
        return self


def data_layout(root: str | os.PathLike[str] | None = None) -> DataLayout:
    """The data layout rooted at `root`, else $EFFNET_DATA_DIR, else `<checkout>/data`."""
    if root is None:
        root = os.environ.get(DATA_DIR_ENV) or PROJECT_ROOT / "data"
    return DataLayout(Path(root).expanduser().resolve())
