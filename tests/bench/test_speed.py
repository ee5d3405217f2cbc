"""Smoke tests of the speed suites (overhead, latency, throughput, mlflow, reload, all).

Tiny sizes and structure only: which arms and rows exist, that every figure is
finite and every gated row has a verdict. Never a timing threshold: these run
on shared machines; the real numbers come from ``lrctl bench all`` by hand.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from lrctl.bench import SUITE_MODULES  # noqa: E402
from lrctl.bench._controller import ServeProcess  # noqa: E402
from lrctl.bench._floor import SocketFloor  # noqa: E402
from lrctl.bench._timing import interleave, quantile, ratios, rows_table, summary  # noqa: E402
from lrctl.bench.latency import LatencyConfig, run_latency  # noqa: E402
from lrctl.bench.overhead import (  # noqa: E402
    SOCKET_FLOOR,
    STEP_FLOOR,
    OverheadConfig,
    run_overhead,
)
from lrctl.bench.reload_bench import ReloadConfig, run_reload  # noqa: E402
from lrctl.bench.throughput import ThroughputConfig, run_throughput  # noqa: E402
from lrctl.cli import main  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_every_speed_suite_is_registered() -> None:
    names = [importlib.import_module(m).SUITE.name for m in SUITE_MODULES]
    for name in ("overhead", "latency", "throughput", "mlflow", "reload", "all"):
        assert name in names
    assert names[-1] == "all"


def test_quantiles_and_summary() -> None:
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert quantile(xs, 0.5) == 3.0 and quantile(xs, 0.25) == 2.0 and quantile(xs, 1.0) == 5.0
    s = summary(xs)
    assert (s["median"], s["q1"], s["q3"], s["n"]) == (3.0, 2.0, 4.0, 5.0)
    assert math.isnan(quantile([], 0.5))
    assert ratios([2.0, 3.0], [1.0, 0.0]) == [2.0]  # a zero denominator is dropped


def test_interleave_rotates_the_order_every_round() -> None:
    calls: list[str] = []

    def arm(name: str) -> float:
        calls.append(name)
        return float(len(calls))

    out = interleave({n: (lambda n=n: arm(n)) for n in "abc"}, 3)
    assert calls == list("abc" "bca" "cab")
    assert [len(v) for v in out.values()] == [3, 3, 3]


def test_rows_table_marks_misses() -> None:
    row = {"arm": "x", "stats": summary([1.0, 2.0]), "unit": "µs",
           "ratio": summary([4.0]), "vs": "y", "target": "≤ 3×", "ok": False}
    text = rows_table([row, {**row, "ok": True}, {**row, "ok": None, "ratio": None}])
    assert "**miss**" in text and "| pass |" in text and "4.000× y" in text


def _finite_rows(rows: list[dict]) -> None:
    for r in rows:
        assert math.isfinite(r["stats"]["median"]), r
        if r["target"]:
            assert isinstance(r["ok"], bool), r


def test_quick_overhead_structure() -> None:
    cfg = OverheadConfig.quick()
    cfg.steps, cfg.micro_steps = {"digits": 3}, 4
    result = run_overhead(cfg)
    arms = [r["arm"] for r in result["step"]["digits"]]
    assert arms[0] == "bare AdamW step" and "lrctl async" in arms and "lrctl sync" in arms
    step = {r["arm"]: r for r in result["step"]["digits"]}
    given = step["lrctl async, grad_norm=clip_grad_norm_(...)"]
    assert given["vs"] == "clipped" and given["target"] == "≤ 1.02×"
    assert step["lrctl async"]["target"] == "≤ 1.05×"
    _finite_rows(result["step"]["digits"])
    hook = {r["arm"]: r for r in result["hook"]}
    assert {"CosineAnnealingLR.step()", "lrctl hook every=1", "lrctl hook every=4"} <= set(hook)
    assert hook["lrctl hook every=4"]["vs"] == "every=1"
    assert hook[SOCKET_FLOOR]["vs"] == "cosine" and not hook[SOCKET_FLOOR]["target"]
    assert step[STEP_FLOOR]["vs"] == "bare" and not step[STEP_FLOOR]["target"]
    for name, target in (("default.yaml", "≤ 3×"), ("divergence.yaml", "≤ 2×")):
        row = hook[f"lrctl engine.observe, {name}"]
        assert row["vs"] == "plateau" and row["target"] == target  # side by side, one table
    _finite_rows(result["hook"])


def test_the_socket_floor_is_a_real_client_of_the_paced_controller() -> None:
    """The floor arm's client reads each answer and sets the LR it says (a warmup's ramp,
    applied one step after it was decided), as a hook would."""
    policy = "version: 1\npolicies:\n  - kind: warmup\n    steps: 10\n"
    group = {"lr": 1.0}
    with ServeProcess() as srv:
        floor = SocketFloor(srv.socket, group, policy)
        seen = []
        try:
            for _ in range(6):
                floor.call(1.0, 1.0)
                seen.append(group["lr"])
        finally:
            floor.close()
    assert seen[0] == 1.0  # nothing read before the first report
    assert 0.0 < seen[1] < seen[-1] < 1.0 and seen[1:] == sorted(seen[1:]), seen


def test_quick_latency_structure() -> None:
    result = run_latency(LatencyConfig(rounds=1, steps=6))
    assert len(result["sync"]) == 5 and len(result["async"]) == 4  # 5: the loop without spin
    for r in result["sync"]:
        assert r["us"]["n"] == 6 and r["us"]["median"] > 0
    for r in result["async"]:
        assert r["steps"] == 5 and 0 <= r["in_time"] <= r["steps"]  # the first step has no t-1


def test_quick_reload_structure() -> None:
    """Every edit of the watched file reaches the optimizer, each as one reload."""
    result = run_reload(ReloadConfig(edits=2, gap_s=0.2))
    assert result["missed"] == 0 and result["ms"]["n"] == 2
    assert result["reload_decisions"] == 2
    assert math.isfinite(result["ms"]["p99"]) and isinstance(result["ok"], bool)


def test_quick_throughput_structure() -> None:
    cfg = ThroughputConfig(runs=(1, 3), seconds=0.3, rounds=1, paced_runs=2, paced_hz=50,
                           churn_runs=0)
    result = run_throughput(cfg)
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == {"unpaced N=1", "unpaced N=3", "paced 2 × 50 Hz"}
    for r in rows.values():
        assert r["per_s"]["median"] > 0 and r["rss_mib"] > 0
    for name in ("unpaced N=1", "unpaced N=3"):
        assert rows[name]["latency_us"]["p50"] > 0
    # The paced runs read their answers a step later, as hooks do: no latency, but each
    # answer was there by the next step or waited for.
    paced = rows["paced 2 × 50 Hz"]
    assert math.isnan(paced["latency_us"]["p50"]) and paced["in_time"] > 0
    assert paced["in_time"] + paced["waited"] >= paced["per_s"]["median"] * 0.3 * 0.9
    assert result["rss_mib"]["idle"] > 0


def test_quick_throughput_churn_arm_structure() -> None:
    cfg = ThroughputConfig(runs=(1,), seconds=0.2, rounds=1, paced_runs=2, paced_hz=50,
                           churn_runs=3, churn_hz=20, churn_seconds=2.0, churn_rounds=1,
                           churn_lifetime=(0.3, 0.8), arms=("churn",))  # --only churn
    result = run_throughput(cfg)
    rows = {r["arm"]: r for r in result["rows"]}
    assert list(rows) == ["paced 3 × 20 Hz, churn, MLflow on"]
    assert result["rss_mib"]["idle"] is None  # no shared controller was started
    row = rows["paced 3 × 20 Hz, churn, MLflow on"]
    assert row["churn"] and row["per_s"]["median"] > 0 and row["latency_us"]["p99"] > 0
    assert row["started"]["median"] >= 1 and row["ended"]["median"] >= 1
    assert row["decisions_exact"]  # every journaled decision in MLflow exactly once
    assert row["decisions_mlflow"] == row["decisions_journaled"]
    assert math.isfinite(row["shipper_cpu_share"]["median"]) and row["rss_mib"] > 0
    assert isinstance(row["ok"], bool)


def test_throughput_only_names_its_arms() -> None:
    with pytest.raises(SystemExit, match="--only takes arms of unpaced, paced, churn"):
        main(["bench", "throughput", "--only", "churn,bogus", "-q"])


def test_cli_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["bench", "latency", "--quick", "--steps", "5", "--rounds", "1", "--out", str(out),
               "--json", str(tmp_path / "l.json"), "-q"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| sync, in a training loop |" in printed and "cores" in printed
    data = json.loads((tmp_path / "l.json").read_text())
    assert data["suite"] == "latency" and data["machine"]["torch"]
    assert (out / "latency.md").is_file()


def test_all_runs_the_chosen_suites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "all.json"
    rc = main(["bench", "all", "--quick", "--only", "throughput", "--out", str(tmp_path), "-q",
               "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "#### throughput" in printed and "#### overhead" not in printed
    # The targets come first, one line per judged figure, from the same result.
    assert printed.index("#### targets at a glance") < printed.index("#### throughput")
    saved = json.loads(out.read_text())
    rows = saved["targets"]["throughput"]
    judged = [r for r in saved["suites"]["throughput"]["rows"] if r["target"]]
    assert [t["target"] for t in rows] == [r["target"] for r in judged] and rows
    assert [t["ok"] for t in rows] == [r["ok"] for r in judged]
    for t in rows:
        assert f"| throughput | {t['what']} | {t['target']} | {t['measured']} |" in printed


def test_quick_mlflow_structure(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from lrctl.bench.mlflow_bench import MlflowConfig, run_mlflow

    result = run_mlflow(MlflowConfig(ship_rounds=1, ship_runs=1, ship_steps=20, rounds=1,
                                     steps=3))
    ship = result["shipping"]["rounds"][0]
    assert ship["points"] == ship["expected"] == 60  # every point landed in the store
    arms = [r["arm"] for r in result["overhead"]]
    assert arms[-1] == "lrctl async, MLflow sqlite, slowed"
    _finite_rows(result["overhead"])
