"""What ``status`` says when MLflow's store refuses a write: the cause, not how it was
raised. An adversarial pass filled the disk under an MLflow sqlite store mid-run: status
said "MLflow unavailable: MlflowException: (raised as a result of Query-invoked
autoflush; consider using a session.no_autoflush block ...)", the real cause ("database
or disk is full") only in the controller's log. Reproduced here with a real full sqlite
database (``PRAGMA max_page_count``) written through an autoflushing SQLAlchemy session,
wrapped as MLflow's store wraps it (``MlflowException(message=e) from e``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from mlflow.exceptions import MlflowException
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from lrctl.sinks._mlflow_store import reason, unavailable


class _Base(DeclarativeBase):
    pass


class _Row(_Base):
    __tablename__ = "rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    blob: Mapped[bytes]


def _full_disk_error(path: Path) -> MlflowException:
    engine = sa.create_engine(f"sqlite:///{path}")
    _Base.metadata.create_all(engine)
    try:
        with Session(engine) as session:
            session.execute(sa.text("PRAGMA max_page_count = 8"))  # a full "disk"
            session.add(_Row(blob=b"x" * 200_000))
            try:
                session.query(_Row).all()  # the autoflush writes, and fails
            except sa.exc.OperationalError as exc:
                try:
                    raise MlflowException(message=exc) from exc
                except MlflowException as wrapped:
                    return wrapped
    finally:
        engine.dispose()
    pytest.fail("the full database took the write")


def test_a_full_mlflow_store_is_said_as_such(tmp_path: Path) -> None:
    exc = _full_disk_error(tmp_path / "mlflow.db")
    assert str(exc).startswith("(raised as a result of Query-invoked autoflush")  # (as seen)
    said = unavailable(reason(exc))
    assert said == ("MLflow unavailable: MlflowException: (sqlite3.OperationalError) "
                    "database or disk is full")


def test_a_cause_the_first_line_does_not_name_is_added() -> None:
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise RuntimeError("could not log the batch") from inner
    except RuntimeError as exc:
        said = reason(exc)
    assert said == ("RuntimeError: could not log the batch (OSError: [Errno 28] No space "
                    "left on device)")
    assert reason(ValueError("bad\n[SQL: INSERT ...]")) == "ValueError: bad"
    assert reason(ValueError()) == "ValueError"
