"""Fixtures that start the real stack, small: a Prefect test server, a local Ray cluster, a SQLite MLflow store.

Imported by the integration and e2e conftests (fixtures are found by name in a conftest's namespace).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from pipelines.settings import RAY_LOOPBACK_ENV, DataLayout


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary Prefect server (SQLite) for the whole session."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """A real local Ray cluster sized like this machine; shut down at the end of the session.

    Yields the context (its `dashboard_url` addresses the state API of this cluster, not another one that
    may run on the same machine).
    """
    # Before ray is imported (Ray reads it then): the node address is 127.0.0.1 and Ray listens on loopback only.
    os.environ.setdefault(RAY_LOOPBACK_ENV, "0")
    import ray

    from pipelines.training import cluster

    # A new instance of our own, never a stack's head that may run on this machine. With the dashboard: its state
    # API lets Ray Train clean up after a killed worker.
    ctx = cluster.init_local(num_cpus=2, log_to_driver=True,
                             ignore_reinit_error=True)  # each tier's conftest has this fixture
    yield ctx
    ray.shutdown()


@pytest.fixture
def data_layout_tmp(tmp_path: Path) -> DataLayout:
    """A fresh data directory (MLflow SQLite store, Ray storage, logs) for one test."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the layout's own SQLite store, whatever the caller's shell says
    return DataLayout(tmp_path / "data").ensure()
