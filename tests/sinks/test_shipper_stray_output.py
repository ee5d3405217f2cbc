"""What the MLflow shipper child writes outside its JSON protocol is logged as text, at
INFO, unless it looks like an error: mlflow prints "🏃 View run ... at: URL" to stdout
at every end_run tracked to a server, which the controller logged as an ERROR (as bytes).

No child is started: the controller's reader is fed the child's stdout as bytes.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from lrctl.sinks.shipper_proxy import ShipperProcess

LOGGER = "lrctl.sinks.mlflow"
VIEW_RUN = "🏃 View run train-plain at: http://127.0.0.1:5000/#/experiments/1/runs/abc"
VIEW_EXPERIMENT = "🧪 View experiment at: http://127.0.0.1:5000/#/experiments/1"


def _read(tmp_path: Path, lines: list[bytes]) -> None:
    ShipperProcess(tmp_path)._read(io.BytesIO(b"".join(lines)))


def _records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


def test_mlflow_view_lines_are_info_text(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    _read(tmp_path, [f"{VIEW_RUN}\n".encode(), f"{VIEW_EXPERIMENT}\r\n".encode(), b"\n"])
    assert _records(caplog) == [
        (logging.INFO, f"lrctl: the MLflow shipper wrote: {VIEW_RUN}"),
        (logging.INFO, f"lrctl: the MLflow shipper wrote: {VIEW_EXPERIMENT}"),
    ]


@pytest.mark.parametrize("line", [
    b"Traceback (most recent call last):\n",
    b"mlflow.exceptions.MlflowException: API request failed\n",
    b"ConnectionError: refused\n",
    b"2024/01/01 ERROR mlflow.utils: something broke\n",
])
def test_lines_that_look_like_errors_stay_errors(tmp_path: Path, line: bytes,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    _read(tmp_path, [line])
    assert _records(caplog) == [
        (logging.ERROR, f"lrctl: the MLflow shipper wrote: {line.decode().strip()}")]


def test_undecodable_bytes_and_non_objects_are_text_and_protocol_lines_still_work(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    own = json.dumps({"log": logging.WARNING, "msg": "lrctl: a message of the child"})
    _read(tmp_path, [b"\xff\xfe half a character\n", b"42\n", own.encode() + b"\n"])
    assert _records(caplog) == [
        (logging.INFO, "lrctl: the MLflow shipper wrote: \ufffd\ufffd half a character"),
        (logging.INFO, "lrctl: the MLflow shipper wrote: 42"),
        (logging.WARNING, "lrctl: a message of the child"),
    ]


def test_a_long_line_is_cut(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    _read(tmp_path, [b"x" * 10_000 + b"\n"])
    [(level, message)] = _records(caplog)
    assert level == logging.INFO and message.endswith("x" * 200) and len(message) < 300
