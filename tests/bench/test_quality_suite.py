"""Fast checks of the grown quality benchmark: tasks, the tuning/held-out split, the
policy arms, the metrics on hand-made tables, and a tiny end-to-end run.

One step or a few dozen steps per run; no timing thresholds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from lrctl.bench._metrics import aggregate, early_stops, false_backoffs  # noqa: E402
from lrctl.bench._pool import Unit, run_units  # noqa: E402
from lrctl.bench.arms import (  # noqa: E402
    DEFAULT_POLICY,
    REPO_POLICIES,
    build_optimizer,
    make_controller,
    policy_arms,
)
from lrctl.bench.quality import QualityConfig, resolve_arms, run_quality  # noqa: E402
from lrctl.bench.quality import summarize_quality as summarize  # noqa: E402
from lrctl.bench.runner import RunResult, train  # noqa: E402
from lrctl.bench.tasks import OPTIMIZERS, TASKS, get_task, tasks_in_split  # noqa: E402
from lrctl.cli import main  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# -- tasks and the split --------------------------------------------------------------
@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_builds_and_takes_a_step_for_each_seed(name: str) -> None:
    task = get_task(name)
    for seed in (0, 1, 2):
        inst = task.build(seed)
        opt = build_optimizer(task.optimizer, inst.model.parameters(), 1e-3)
        batch = inst.next_batch()
        assert len(batch[0]) == task.batch_size
        loss = inst.loss(inst.model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(float(loss.detach())) and math.isfinite(inst.val_loss(inst.model))


def test_task_data_is_fixed_and_the_seed_moves_init_and_batches() -> None:
    task = TASKS["teacher_student"]
    a, b, c = task.build(0), task.build(0), task.build(1)
    assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    assert not torch.equal(a.next_batch()[0], c.next_batch()[0])
    assert a.val_loss(a.model) == b.val_loss(b.model) != c.val_loss(c.model)


def test_split_is_declared_and_both_halves_mix_kinds_and_optimizers() -> None:
    tuning, heldout = tasks_in_split("tuning"), tasks_in_split("heldout")
    assert set(tuning) | set(heldout) == set(TASKS) and not set(tuning) & set(heldout)
    assert {"digits", "charlm"} <= set(tuning)
    assert abs(len(tuning) - len(heldout)) <= 2 and len(TASKS) >= 12
    for half in (tuning, heldout):
        optimizers = {TASKS[t].optimizer for t in half}
        assert "sgdm" in optimizers and optimizers & {"adam", "adamw"}, half
        assert len({TASKS[t].kind for t in half}) == len(half)
    assert {t.optimizer for t in TASKS.values()} == set(OPTIMIZERS)
    assert len({t.kind for t in TASKS.values()}) == len(TASKS)
    assert min(t.batch_size for t in TASKS.values()) <= 8
    assert max(t.batch_size for t in TASKS.values()) >= 512
    assert min(t.steps for t in TASKS.values()) <= 300
    assert max(t.steps for t in TASKS.values()) >= 5000
    assert tasks_in_split("all") == tuple(TASKS)
    with pytest.raises(ValueError):
        tasks_in_split("test")


# -- arms -----------------------------------------------------------------------------
def test_every_arm_builds_the_declared_optimizer() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    for opt, cls in (("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                     ("sgdm", torch.optim.SGD)):
        for arm in ("fixed", "cosine", "plateau", "lrctl", "policy:default"):
            ctl = make_controller(arm, params, 0.01, 100, None, opt)
            assert type(ctl.optimizer) is cls, (arm, opt)
        group = make_controller("fixed", params, 0.01, 100, None, opt).optimizer.param_groups[0]
        assert group["lr"] == 0.01
        assert group.get("momentum", 0.9) == 0.9
        assert group.get("weight_decay", 0.0) == (0.01 if opt == "adamw" else 0.0)
    sf = make_controller("schedulefree", params, 0.01, 100, None, "sgdm").optimizer
    assert type(sf).__name__ == "SGDScheduleFree"


def test_policy_arms_default_to_the_checkout_policies() -> None:
    arms = policy_arms()
    if REPO_POLICIES.is_dir():
        assert set(arms) == {f"policy:{p.stem}" for p in REPO_POLICIES.glob("*.yaml")}
    assert "policy:default" in arms
    assert policy_arms([DEFAULT_POLICY]) == {"policy:default": DEFAULT_POLICY}
    cfg = QualityConfig()
    assert cfg.arm_names()[:5] == ("fixed", "cosine", "plateau", "schedulefree", "prodigy")
    with pytest.raises(ValueError, match="unknown arm"):
        resolve_arms(QualityConfig(arms=("fixed", "cosine", "policy:nope")))


def test_a_val_loss_policy_arm_is_sent_the_validation_loss(tmp_path: Path) -> None:
    policy = tmp_path / "vplateau.yaml"
    policy.write_text("version: 1\npolicies:\n  - kind: plateau\n    metric: val_loss\n"
                      "    patience: 0\n    factor: 0.5\n    threshold: 0.5\n")
    run = train(TASKS["wine"], "policy:vplateau", 1e-3, 0, steps=60, policy=policy)
    assert any(d["action"] == "reduce" for d in run.decisions)
    plain = make_controller("policy:default", [torch.nn.Parameter(torch.zeros(1))], 1e-3, 60)
    assert plain.evals_per_run == 0  # the default policy watches the training loss only


# -- metrics on hand-made tables --------------------------------------------------------
def _r(task: str, arm: str, lr: float, seed: int, val: float, *, diverged: bool = False,
       decisions: tuple[str, ...] = (), steps: int = 100) -> RunResult:
    run = RunResult(task, arm, lr, seed, steps, val, diverged, steps_done=steps)
    run.decisions = [{"step": 1, "policy": "divergence", "kind": "divergence", "action": a}
                     for a in decisions]
    return run


def _table() -> list[RunResult]:
    lrs_vals = {
        # arm: {lr: per-seed final losses}
        "fixed": {1e-3: (2.0, 2.0, 2.0), 1e-2: (1.0, 1.0, 1.0)},
        "cosine": {1e-3: (1.5, 1.5, 1.5), 1e-2: (1.0, 1.0, 1.0)},  # best: 1.0 at 1e-2
        # median 2.0 (no harm at 1e-3) although the mean is 3.0; at 1e-2 median 1.2 > 1.05
        "policy:x": {1e-3: (1.0, 2.0, 6.0), 1e-2: (1.2, 1.2, 1.0)},
    }
    runs = []
    for arm, by_lr in lrs_vals.items():
        for lr, vals in by_lr.items():
            for seed, v in enumerate(vals):
                runs.append(_r("a", arm, lr, seed, v,
                               decisions=("backoff", "regrow") if arm == "policy:x" else ()))
    # task b: one diverged seed of policy:x at 1e-3 (median still finite), fixed diverges
    # at 1e-2 (so nothing is harm there), and one stop decision.
    for seed in range(3):
        runs += [_r("b", "fixed", 1e-3, seed, 1.0), _r("b", "cosine", 1e-3, seed, 1.0),
                 _r("b", "fixed", 1e-2, seed, math.nan, diverged=True),
                 _r("b", "cosine", 1e-2, seed, 2.0),
                 _r("b", "policy:x", 1e-3, seed, math.nan if seed == 0 else 1.0,
                    diverged=seed == 0),
                 _r("b", "policy:x", 1e-2, seed, 5.0, decisions=("stop",) if seed else ())]
    return runs


def test_regret_width_harm_and_false_backoffs_on_a_hand_made_table() -> None:
    arms, lrs = ["fixed", "cosine", "policy:x"], [1e-3, 1e-2]
    s = summarize(_table(), arms, lrs)
    a = s["a"]
    assert a["best_cosine_val"] == 1.0 and a["best_cosine_lr"] == 1e-2 and a["best_at_edge"]
    x = a["arms"]["policy:x"]
    assert x["regret"] == [pytest.approx(3.0), pytest.approx(3.4 / 3)]
    assert x["robust_width"] == 0 and x["median_r"] == pytest.approx((3.0 + 3.4 / 3) / 2)
    assert x["harm"] == 1 and x["harm_lrs"] == [1e-2]  # the median, not the mean, decides
    assert a["arms"]["fixed"]["harm"] == 0 and a["arms"]["cosine"]["harm"] == 0
    assert a["arms"]["cosine"]["robust_width"] == 1
    assert x["false_backoffs"] == {"count": 6, "steps": 600, "per_10k": 100.0}
    assert a["arms"]["fixed"]["false_backoffs"] is None
    b = s["b"]["arms"]
    assert b["policy:x"]["regret"] == [math.inf, 5.0]  # a diverged seed makes the mean inf
    assert b["policy:x"]["harm"] == 0  # median 1.0 at 1e-3; fixed diverged at 1e-2
    assert b["fixed"]["nan_runs"] == 3 and b["policy:x"]["nan_runs"] == 1
    assert b["cosine"]["harm"] == 0 and b["cosine"]["regret"] == [1.0, 2.0]
    assert b["policy:x"]["false_backoffs"]["count"] == 2

    agg = aggregate(s, {"a": "heldout", "b": "tuning"}, arms)
    assert list(agg) == ["heldout", "tuning"]
    px = agg["heldout"]["arms"]["policy:x"]
    assert (px["harm_total"], px["tasks_harm_0"], px["harm_max"]) == (1, 0, 1)
    both = aggregate(s, {"a": "heldout", "b": "heldout"}, arms)["heldout"]["arms"]
    assert both["policy:x"]["harm_total"] == 1 and both["policy:x"]["tasks_harm_0"] == 1
    assert both["policy:x"]["median_robust_width"] == 0
    assert both["policy:x"]["nan_runs"] == 1 and both["fixed"]["nan_runs"] == 3
    assert both["policy:x"]["false_backoffs"]["per_10k"] == pytest.approx(8 * 1e4 / 1200)
    assert both["fixed"]["false_backoffs"] is None


def test_harm_is_undefined_without_a_fixed_arm() -> None:
    runs = [r for r in _table() if r.arm != "fixed"]
    s = summarize(runs, ["cosine", "policy:x"], [1e-3, 1e-2])
    assert s["a"]["arms"]["policy:x"]["harm"] is None
    assert aggregate(s, {"a": "heldout", "b": "heldout"},
                     ["cosine", "policy:x"])["heldout"]["arms"]["policy:x"]["harm_total"] is None


def test_false_backoffs_count_rollback_and_stop_but_not_regrow() -> None:
    runs = [_r("a", "lrctl", 1e-3, 0, 1.0, decisions=("backoff", "rollback", "regrow", "stop",
                                                      "skip"), steps=500)]
    assert false_backoffs(runs) == {"count": 3, "steps": 500, "per_10k": 60.0}


# -- end to end -------------------------------------------------------------------------
def test_tiny_run_in_process_covers_both_splits() -> None:
    cfg = QualityConfig(tasks=("digits", "wine"), arms=("fixed", "cosine", "policy:default"),
                        lrs=(1e-3, 1e-2), seeds=(0,), steps={"digits": 20, "wine": 20})
    result = run_quality(cfg)
    assert [r["task"] for r in result["runs"]][:6] == ["digits"] * 6
    assert set(result["splits"]) == {"tuning", "heldout"}
    assert list(result["splits"]) == ["heldout", "tuning"]
    assert result["summary"]["wine"]["split"] == "heldout"
    assert result["config"]["task_info"]["wine"]["optimizer"] == "adam"
    info = result["config"]["policy_files"]["policy:default"]
    assert info["path"].endswith("default.yaml") and len(info["sha256"]) == 64
    json.dumps(result["runs"], allow_nan=False)


def test_pool_gives_the_same_runs_as_in_process() -> None:
    units = [Unit("wine", arm, 1e-2, 1, 15) for arm in ("fixed", "policy:default")]
    here = run_units(units, jobs=1)
    pooled = run_units(units, jobs=2)
    assert [r.final_val for r in pooled] == [r.final_val for r in here]
    assert [r.arm for r in pooled] == ["fixed", "policy:default"]


def test_cli_quick_quality_on_a_tiny_subset(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "quality", "--quick", "--tasks", "digits", "linreg", "--seeds", "1",
               "--steps", "20", "--arms", "policy:default", "lrctl", "--jobs", "1",
               "--out", str(tmp_path), "--json", str(tmp_path / "q.json"), "-q"])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.index("#### Held-out tasks (1): linreg") < text.index("#### Tuning tasks (1)")
    assert "Command `lrctl bench quality --quick --tasks digits linreg" in text
    assert "| policy:default |" in text and "| lrctl |" in text
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["config"]["split"] == "all"
    assert data["config"]["arms"] == ["fixed", "cosine", "policy:default", "lrctl"]
    assert data["provenance"]["command"].startswith("lrctl bench quality --quick")
    assert len(data["provenance"]["commit"]) in (7, 40) or data["provenance"]["commit"] == \
        "unknown"
    assert data["splits"]["heldout"]["tasks"] == ["linreg"]
    assert (tmp_path / "quality.md").read_text().startswith("### lrctl bench quality")


def test_cli_split_and_policies_select_tasks_and_arms(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("version: 1\npolicies:\n  - kind: divergence\n")
    rc = main(["bench", "quality", "--quick", "--split", "heldout", "--tasks", "digits", "wine",
               "--seeds", "1", "--steps", "5", "--policies", str(mine), "--jobs", "1",
               "--out", str(tmp_path), "--json", str(tmp_path / "q.json"), "-q"])
    assert rc == 0
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["config"]["tasks"] == ["wine"] and data["config"]["split"] == "heldout"
    assert data["config"]["arms"] == ["fixed", "cosine", "plateau", "schedulefree", "prodigy",
                                      "policy:mine"]
    with pytest.raises(SystemExit, match="unknown arm"):
        main(["bench", "quality", "--quick", "--tasks", "wine", "--arms", "policy:nope",
              "--out", str(tmp_path), "-q"])


# -- early stopping and WSD arms ------------------------------------------------------------
def test_an_early_stop_is_measured_against_the_same_run_trained_on(tmp_path: Path) -> None:
    always = tmp_path / "es.yaml"  # stops at the second validation, whatever it says
    always.write_text("version: 1\npolicies:\n  - kind: earlystop\n    metric: val_loss\n"
                      "    min_delta: 100.0\n    patience: 1\n")
    run = train(TASKS["wine"], "policy:es", 1e-2, 0, steps=100, policy=always)
    # 20 validations per run, every 5 steps: reported after steps 4 and 9, the second is
    # judged with step 10's observation.
    assert run.early_stop_step == 10 and run.stopped_at is None
    assert run.steps_done == 100  # trained on to the end for the full run's val
    assert math.isfinite(run.final_val) and math.isfinite(run.full_val)
    assert run.final_val != run.full_val
    assert false_backoffs([run])["count"] == 0  # a planned stop is not a false back-off
    stops = early_stops([run])
    assert (stops["stopped"], stops["steps"], stops["saved"]) == (1, 100, 89)
    assert stops["median_val_ratio"] == pytest.approx(run.final_val / run.full_val)
    assert stops["saved_equal"] == (89 if stops["median_val_ratio"] <= 1.05 else 0)
    assert stops["worse"] == (stops["saved_equal"] == 0)
    summary = run.summary()
    assert summary["early_stop_step"] == 10 and summary["full_val"] == run.full_val


def test_early_stops_on_a_hand_made_table() -> None:
    def stopped(step: int | None, val: float, full: float) -> RunResult:
        run = _r("a", "policy:es", 1e-3, 0, val, steps=100)
        run.early_stop_step, run.full_val = step, full
        return run

    runs = [stopped(49, 1.0, 1.0), stopped(79, 1.2, 1.0), stopped(None, 0.9, math.nan),
            stopped(9, math.nan, 1.0)]
    assert early_stops(runs) == {"stopped": 3, "steps": 400, "saved": 50 + 20 + 90,
                                 "saved_equal": 50, "worse": 2, "median_val_ratio": 1.1}


def test_wsd_and_earlystop_arms_run_on_a_small_task(tmp_path: Path) -> None:
    cfg = QualityConfig(tasks=("wine",), arms=("fixed", "cosine", "policy:wsd",
                                               "policy:earlystop"),
                        lrs=(3e-2,), seeds=(0,), steps={"wine": 300})
    result = run_quality(cfg)
    runs = {r["arm"]: r for r in result["runs"]}
    assert set(runs) == {"fixed", "cosine", "policy:wsd", "policy:earlystop"}
    # WSD knows the run's length (as attach(total_steps=...) does): its cooldown is the
    # last 20 % at the latest, earlier if the loss stalled.
    assert runs["policy:wsd"]["actions"].get("wsd:decay_start") == 1
    assert all(math.isfinite(r["final_val"]) for r in result["runs"])
    arms = result["summary"]["wine"]["arms"]
    es = arms["policy:earlystop"]["early_stops"]
    assert set(es) == {"stopped", "steps", "saved", "saved_equal", "worse",
                       "median_val_ratio"} and es["steps"] == 300
    assert arms["fixed"]["early_stops"] is None
    agg = result["splits"]["heldout"]["arms"]["policy:earlystop"]["early_stops"]
    assert agg["steps"] == 300 and agg["stopped"] == es["stopped"]
    json.dumps(result["runs"], allow_nan=False)
    from lrctl.bench.report import quality_tables

    table = quality_tables(result)
    assert "| policy:wsd |" in table
    assert ("steps saved at equal final validation loss" in table) == bool(es["stopped"])


def test_harm_is_judged_the_same_way_for_a_loss_below_zero() -> None:
    """A Gaussian NLL ends below 0: the rule ``median > 1.05 x fixed`` flagged runs up to
    5 % better than fixed as harm there, and missed worse ones (found by a review)."""
    runs = []
    for seed in range(3):
        runs += [_r("n", "fixed", 1e-3, seed, -1.00), _r("n", "cosine", 1e-3, seed, -1.00),
                 _r("n", "policy:better", 1e-3, seed, -1.04),
                 _r("n", "policy:worse", 1e-3, seed, -0.90),
                 _r("n", "fixed", 1e-2, seed, 2.00), _r("n", "cosine", 1e-2, seed, 2.00),
                 _r("n", "policy:better", 1e-2, seed, 2.08),  # within 5 %
                 _r("n", "policy:worse", 1e-2, seed, 2.20)]
    s = summarize(runs, ["fixed", "cosine", "policy:better", "policy:worse"], [1e-3, 1e-2])
    arms = s["n"]["arms"]
    assert arms["policy:better"]["harm_lrs"] == []
    assert arms["policy:worse"]["harm_lrs"] == [1e-3, 1e-2]
