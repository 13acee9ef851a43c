"""A real sqlite MLflow store per test, copied from one template migrated once per session.

A fresh sqlite store runs MLflow's schema migrations on first use (seconds on 2 cores); copying an
already-migrated file takes milliseconds (measured here).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network from tests (inherited by Ray workers)


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty, fully migrated sqlite MLflow database."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # creates and migrates the schema
    return path


@pytest.fixture
def mlflow_uri(mlflow_template, tmp_path) -> str:
    """sqlite:///<tmp>/mlflow/mlflow.db, a private copy of the template (artifacts go next to it)."""
    folder = tmp_path / "mlflow"
    folder.mkdir()
    shutil.copyfile(mlflow_template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"
