"""A sqlite MLflow store made once, by the test process, before any controller's shipper
opens it: two processes creating one sqlite store at once can break its migration
(``table _alembic_tmp_... already exists``), so a test that reads the store while a
controller ships into it must not leave the creation to whichever comes first."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient


def made_sqlite_store(directory: Path) -> tuple[str, MlflowClient]:
    """The URI of a complete sqlite store in ``directory``, and a client on it. The
    default experiment's artifacts go under the working directory of the moment."""
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.search_experiments()
    return uri, client
