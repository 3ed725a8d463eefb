"""Where the project keeps its state: one data directory, overridable by one environment variable.

Everything a run produces lives under it, so `rm -r` of one folder resets the project and one variable moves
it to a bigger disk: the generated archives, the staged shards, the MLflow store, Ray's storage and the logs.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

DATA_DIR_ENV = "EFFNET_DATA_DIR"
SOURCE_ENV = "EFFNET_SOURCE"  # the ILSVRC2012 source the nightly stages from
STACK_FILE = "stack.json"  # written by infra/local-stack.sh start, removed by stop
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variable: set by a user, it names a shared server
# Ray's switch for a single-machine cluster: its node address becomes 127.0.0.1 and every Ray server binds
# loopback only (otherwise Ray swaps 127.0.0.1 for the host's address and listens on all interfaces).
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RAY_AUTH_ENV = "RAY_AUTH_MODE"  # Ray's client setting: "token" on a cluster with token auth
PREFECT_API_ENV = "PREFECT_API_URL"  # Prefect's own: the server flows and deployments talk to


class StackError(RuntimeError):
    """The data directory names a stack that does not answer."""


class StackSettings(BaseModel):
    """Where the local stack's servers listen: one file under the data directory, read by every command."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prefect_api_url: str
    mlflow_tracking_uri: str
    ray_address: str
    ray_dashboard_url: str
    ray_auth_mode: str = "token"

    def environment(self) -> dict[str, str]:
        """The variables the libraries' own clients read (Prefect, MLflow, Ray auth)."""
        return {
            PREFECT_API_ENV: self.prefect_api_url,
            TRACKING_URI_ENV: self.mlflow_tracking_uri,
            RAY_AUTH_ENV: self.ray_auth_mode,
        }

    def unreachable(self, timeout: float = 3.0) -> list[str]:
        """The stack's HTTP services that do not answer their health check."""
        checks = {"Prefect": f"{self.prefect_api_url}/health", "MLflow": f"{self.mlflow_tracking_uri}/health"}
        down = []
        for name, url in checks.items():
            try:
                with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 (http on loopback, from our file)
                    pass
            except OSError:
                down.append(f"{name} ({url})")
        return down


def is_loopback_address(address: str | None) -> bool:
    """A Ray address on this machine only (None: a local instance that this process starts)."""
    if address is None or address == "local":
        return True
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


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
    def source(self) -> Path:
        """Where the nightly looks for the ILSVRC2012 source when neither the run nor $EFFNET_SOURCE names one
        (the archives, or a link to them)."""
        return self.root / "source"

    @property
    def baselines(self) -> Path:
        """Named baseline stage tables (one JSON file each), as a baseline search stores them."""
        return self.root / "baselines"

    @property
    def coefficients(self) -> Path:
        """Named compound-scaling coefficient sets (one JSON file each), as a scaling search stores them."""
        return self.root / "coefficients"

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
    def stack_file(self) -> Path:
        return self.root / STACK_FILE

    @cached_property
    def stack(self) -> StackSettings | None:
        """The local stack's settings when it was started on this data directory, else None."""
        try:
            text = self.stack_file.read_text()
        except FileNotFoundError:
            return None
        try:
            return StackSettings.model_validate(json.loads(text))
        except (ValueError, ValidationError) as exc:
            raise StackError(
                f"{self.stack_file}: not a stack settings file ({exc.__class__.__name__}); "
                "restart the stack or remove the file"
            ) from None

    @property
    def tracking_uri(self) -> str:
        """MLflow's own MLFLOW_TRACKING_URI when set (a shared server), else the stack's server, else the
        SQLite store in here (the same database the stack's server uses)."""
        if os.environ.get(TRACKING_URI_ENV):
            return os.environ[TRACKING_URI_ENV]
        return self.stack.mlflow_tracking_uri if self.stack else f"sqlite:///{self.mlflow_db}"

    @property
    def ray_address(self) -> str | None:
        """The Ray cluster to join: $RAY_ADDRESS, else the stack's head, else None (start a local instance)."""
        return os.environ.get("RAY_ADDRESS") or (self.stack.ray_address if self.stack else None)

    @property
    def artifact_root(self) -> str | None:
        """Where new experiments keep artifacts: here, for the local store; a remote server decides for itself
        (the local stack's server also puts them here)."""
        return self.mlflow_artifacts.as_uri() if self.tracking_uri.startswith("sqlite:") else None

    def use_stack(self, check: bool = True) -> StackSettings | None:
        """Point this process's Prefect, MLflow and Ray clients at the stack, when one was started here.

        Variables the caller set win. With `check`, a stack that does not answer is an error (it was stopped
        without `infra/local-stack.sh stop`, or died): silently falling back to local servers would split the
        run history between two Prefect databases.
        """
        stack = self.stack
        if stack is not None:
            if check and (down := stack.unreachable()):
                raise StackError(
                    f"the local stack recorded in {self.stack_file} does not answer: {', '.join(down)}; "
                    "start it (infra/local-stack.sh start) or clear it (infra/local-stack.sh stop)"
                )
            for key, value in stack.environment().items():
                os.environ.setdefault(key, value)
        if is_loopback_address(self.ray_address):
            os.environ.setdefault(RAY_LOOPBACK_ENV, "0")
        return stack

    def ensure(self) -> DataLayout:
        for p in (self.root, self.datasets, self.mlflow_db.parent, self.mlflow_artifacts, self.ray_storage, self.logs):
            p.mkdir(parents=True, exist_ok=True)
        return self


def data_layout(root: str | os.PathLike[str] | None = None) -> DataLayout:
    """The data layout rooted at `root`, else $EFFNET_DATA_DIR, else `<checkout>/data`."""
    if root is None:
        root = os.environ.get(DATA_DIR_ENV) or PROJECT_ROOT / "data"
    return DataLayout(Path(root).expanduser().resolve())


def default_source(layout: DataLayout) -> Path:
    """The ILSVRC2012 source a run that names none stages from: $EFFNET_SOURCE, else the data directory's."""
    return Path(os.environ[SOURCE_ENV]).expanduser() if os.environ.get(SOURCE_ENV) else layout.source
