"""The DDP tests' job check: only gloo's teardown abort, after the ranks' work, passes."""

from __future__ import annotations

import subprocess

import pytest
from ddp_run import GLOO_TEARDOWN_ABORT, check_job


def _job(returncode: int, stderr: str) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["torchrun"], returncode, stdout="", stderr=stderr)


def test_a_clean_job_passes() -> None:
    check_job(_job(0, ""), lambda: False)


def test_the_teardown_abort_after_the_work_is_judged_on_the_work() -> None:
    with pytest.warns(RuntimeWarning, match="gloo's teardown"):
        check_job(_job(1, f"...\n{GLOO_TEARDOWN_ABORT}\n..."), lambda: True)


@pytest.mark.parametrize(("stderr", "finished"), [
    (f"{GLOO_TEARDOWN_ABORT}\n", False),  # a rank aborted before writing its results
    ("RuntimeError: lrctl broke\n", True),  # any other failure
])
def test_any_other_failure_fails(stderr: str, finished: bool) -> None:
    with pytest.raises(AssertionError, match=r"terminate|lrctl broke"):
        check_job(_job(1, stderr), lambda: finished)
