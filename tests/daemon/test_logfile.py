"""The controller's log is bounded (rotated) and every file of it private, never a symlink's
target (a soak test's find: a controller running for weeks grew it ~250 bytes a run, with
no bound)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from lrctl.daemon.logfile import PrivateLogHandler


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"lrctl.test.logfile.{id(handler)}")
    logger.propagate = False
    logger.addHandler(handler)
    return logger


def test_the_log_rotates_at_its_size_and_keeps_a_few_private_files(tmp_path: Path) -> None:
    path = tmp_path / "controller.log"
    handler = PrivateLogHandler(str(path), max_bytes=1000, backups=2)
    logger = _logger(handler)
    try:
        for i in range(200):
            logger.error("line %03d %s", i, "x" * 40)
    finally:
        handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["controller.log", "controller.log.1", "controller.log.2"]
    for name in files:
        st = (tmp_path / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size <= 1000
    assert "line 199" in path.read_text()  # the newest lines in the current file
    assert "line 000" not in "".join((tmp_path / n).read_text() for n in files)


def test_a_symlink_at_the_log_or_a_rotated_name_is_never_written_through(
        tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    path = tmp_path / "controller.log"
    path.symlink_to(victim)
    with pytest.raises(PermissionError, match="symlink"):
        PrivateLogHandler(str(path))
    path.unlink()
    (tmp_path / "controller.log.1").symlink_to(victim)  # planted where a rotation renames
    handler = PrivateLogHandler(str(path), max_bytes=200, backups=1)
    logger = _logger(handler)
    try:
        for i in range(20):
            logger.error("line %d %s", i, "y" * 40)
    finally:
        handler.close()
    assert victim.read_text() == "keep\n"
    assert not (tmp_path / "controller.log.1").is_symlink()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
