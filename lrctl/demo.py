"""``lrctl demo``: the whole product in a minute, on data that ships with scikit-learn.

Two runs of the same setup, side by side: a 64→256→10 MLP on the bundled
digits, AdamW at a deliberately too-high learning rate, and, two fifths of the
way in, three corrupted batches (labels misaligned, as from a bad data shard).

* **lrctl**: the range-test policy (``policies/rangetest.yaml``, opt-in: the
  default policy leaves the LR you gave alone unless the run diverges or stalls)
  steers the LR through the controller — a range test finds a workable LR, the
  divergence guard skips the corrupted batches' spike (one bad batch is no
  divergence: a spike that lasts backs off, and the LR grows back after a clean
  stretch); plateau decay stands by to halve the LR if the loss stops improving.
* **fixed**: the same LR throughout; lrctl watches in shadow mode, so the
  MLflow UI shows what it *would* have done, and nothing changes the LR.

Both runs log to MLflow (``./mlflow.db`` unless ``MLFLOW_TRACKING_URI`` says
otherwise); the demo ends with the decisions and their reasons, the numbers
side by side, the command that opens the MLflow UI and a timeline picture.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ._defaults import RANGETEST_POLICY as DEMO_POLICY
from .hook import Controller

__all__ = ["DemoResult", "run_demo"]



@dataclass
class DemoResult:
    name: str
    val_loss: float
    accuracy: float
    stopped_at: int | None
    lrs: list[float] = field(default_factory=list)
    decisions: list[Any] = field(default_factory=list)
    run_key: str | None = None


def _data(seed: int) -> tuple[Any, ...]:
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xt = torch.tensor(x, dtype=torch.float32) / 16.0
    yt = torch.tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(xt), generator=gen)
    train, val = order[:1400], order[1400:]
    return xt[train], yt[train], xt[val], yt[val]


def train(name: str, policy: Any, lr: float, steps: int, out: TextIO,
          seed: int = 0) -> DemoResult:
    """One training run with the hook attached (``policy`` decides; shadow mode only watches)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    x_train, y_train, x_val, y_val = _data(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    result = DemoResult(name, math.nan, math.nan, None)
    # sync: wait for each decision, so that a `skip` can veto the very step it judged
    with Controller(optimizer, policy=policy, run_name=f"demo-{name}", sync=True) as ctl:
        result.run_key = ctl.run_key
        bar = _Progress(name, steps, out)
        bad = range(2 * steps // 5, 2 * steps // 5 + 3)
        for step in range(steps):
            batch = torch.randint(0, len(x_train), (64,))
            labels = y_train[batch]
            if step in bad:
                labels = (labels + 1 + step % 9) % 10  # every label wrong
            loss = nn.functional.cross_entropy(model(x_train[batch]), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ctl.step(loss)
            if not ctl.should_skip:
                optimizer.step()
            result.lrs.append(ctl.lr[0])
            if step % 100 == 99:
                with torch.no_grad():
                    ctl.report(val_loss=nn.functional.cross_entropy(model(x_val), y_val).item())
            bar.update(step + 1, loss.item(), ctl.lr[0])
            if ctl.should_stop:
                result.stopped_at = step
                break
        bar.done()
        with torch.no_grad():
            logits = model(x_val)
            result.val_loss = nn.functional.cross_entropy(logits, y_val).item()
            result.accuracy = (logits.argmax(1) == y_val).float().mean().item()
        result.decisions = ctl.decisions
    return result


def run_demo(steps: int = 3000, lr: float = 0.5, out: TextIO = sys.stdout) -> int:
    """Run both arms, then print the decisions, the comparison and where to look."""
    import torch

    torch.set_num_threads(1)
    policy_text = DEMO_POLICY.read_text()
    shadow_text = policy_text.replace("version: 1\n", "version: 1\nmode: shadow\n", 1)
    print(f"lrctl demo: digits MLP, AdamW at a too-high LR of {lr:g}, {steps} steps, "
          f"3 corrupted batches at step {2 * steps // 5}\n", file=out)
    started = time.monotonic()
    steered = train("lrctl", str(DEMO_POLICY), lr, steps, out)
    fixed = train("fixed", shadow_text, lr, steps, out)

    print("\nWhat lrctl decided, and why:", file=out)
    for d in steered.decisions:
        print(f"  step {d.step:>5}  {d.policy:<10} {d.action:<16} "
              f"{d.old_lrs[0]:.3g} → {d.new_lrs[0]:.3g}  {d.reason}", file=out)
    if not steered.decisions:
        print("  (no decisions reached the hook)", file=out)
    shadow = [d for d in fixed.decisions if d.shadow]
    print(f"\nIn the fixed-LR run lrctl watched in shadow mode and would have made "
          f"{len(shadow)} decisions.", file=out)

    print("\n  run     final val loss  val accuracy  LR at the end", file=out)
    for r in (steered, fixed):
        stop = f"  (asked to stop at step {r.stopped_at})" if r.stopped_at is not None else ""
        print(f"  {r.name:<7} {_num(r.val_loss):>14}  {r.accuracy:>12.1%}  "
              f"{r.lrs[-1] if r.lrs else lr:>13.3g}{stop}", file=out)
    _where_to_look(steered, fixed, out)
    print(f"\n(done in {time.monotonic() - started:.0f} s)", file=out)
    return 0


def open_ui_lines(uri: str) -> list[str]:
    """How to see the demo's runs in MLflow's UI, for the tracking URI they went to."""
    if uri.startswith(("http://", "https://")):  # a tracking server: its own UI
        lines = [f"  open the UI:  browse {uri.rstrip('/')}"]
    else:
        lines = [f"  open the UI:  mlflow ui --backend-store-uri {uri} --port 5000",
                 "  then browse http://127.0.0.1:5000"]
    return [*lines, "  → Model training → experiment lrctl → run demo-lrctl (Overview: the "
                    "decisions and why; chart lrctl/lr/g0; artifact "
                    "lrctl/decisions_table.json)"]


def _where_to_look(steered: DemoResult, fixed: DemoResult, out: TextIO) -> None:
    if not _shipped([r.run_key for r in (steered, fixed) if r.run_key]):
        print("\nMLflow has not received both runs yet (the controller ships them in the "
              "background; 'lrctl status' shows why if it cannot)", file=out)
    uri = _shipped_to(steered.run_key) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        print(f"\nMLflow: both runs are in experiment 'lrctl' at {uri}", file=out)
    else:
        uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        print(f"\nMLflow: both runs are in experiment 'lrctl' in {Path.cwd() / 'mlflow.db'}",
              file=out)
    for line in open_ui_lines(uri):
        print(line, file=out)
    picture = _timeline(steered)
    if picture is not None:
        print(f"  timeline picture: {picture}", file=out)
    if steered.run_key:
        print(f"  audit trail:  lrctl decisions {steered.run_key}", file=out)
    _controller_note(out)


def _shipped(run_keys: list[str], wait_s: float = 60.0) -> bool:
    """Wait until the controller's MLflow shipper has finished each run (its cursor says
    so), so that what the demo then prints about MLflow is true; False after ``wait_s``."""
    from .sinks.journal import find_run_paths, read_json

    deadline = time.monotonic() + wait_s
    while True:  # (another version's controller keeps its own state dir: state_dirs)
        roots = _state_roots()
        if all((read_json(find_run_paths(key, roots).cursor, {}) or {}).get("finished")
               for key in run_keys):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _shipped_to(run_key: str | None) -> str | None:
    """The tracking URI the controller chose for the run (its journal says), or None."""
    from .sinks.journal import find_run_paths, read_json

    if not run_key:
        return None
    meta = read_json(find_run_paths(run_key, _state_roots()).meta, {}) or {}
    target = meta.get("mlflow")
    uri = target.get("tracking_uri") if isinstance(target, dict) else None
    return uri if isinstance(uri, str) else None


def _state_roots() -> list[Path]:
    """Where the demo's journals can be: the state directory of the controller on the
    default socket, as it reports it (one started with ``lrctl serve --state-dir D``
    keeps its runs in D, where no default looks), then the default ones, as
    ``lrctl decisions`` looks. (With the default ones alone, the demo waited 75 s for a
    controller started with --state-dir, said MLflow had not received the runs, and drew
    no picture.)"""
    from . import paths
    from .commands._client import live_state_dir

    roots = paths.state_dirs()
    live = live_state_dir(None)
    if live and Path(live) not in roots:
        roots.insert(0, Path(live))
    return roots


def _controller_note(out: TextIO) -> None:
    """Say so when the demo started the controller, and how to stop it."""
    from . import _spawn, paths

    if not _spawn.spawned:
        return
    pid = _spawn.spawned[0].pid
    print(f"\nThe demo started a controller (pid {pid}) on {paths.default_socket()}: it serves "
          f"the next runs, exits by itself {_spawn.SPAWNED_IDLE_EXIT_S // 60} minutes after "
          "its last run, and 'lrctl stop' stops it now.", file=out)


def _timeline(run: DemoResult, wait_s: float = 15.0) -> Path | None:
    """Draw the steered run's timeline from the controller's journal, once it is complete."""
    from .sinks.journal import find_run_paths, read_lines
    from .timeline import render_run

    if run.run_key is None:
        return None
    run_paths = find_run_paths(run.run_key, _state_roots())
    events = run_paths.stream("events")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:  # the controller journals the run's end after `bye`
        if events.exists() and any(line.record.get("event") == "end"
                                   for line in read_lines(events)):
            break
        time.sleep(0.2)
    if not run_paths.root.exists():
        return None
    return render_run(run_paths.root, Path.cwd() / "lrctl-demo-timeline.png")


def _num(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else "diverged"


class _Progress:
    """A one-line progress bar on ``out`` (a terminal redraws it; a log gets a few lines)."""

    def __init__(self, name: str, total: int, out: TextIO, width: int = 30) -> None:
        self.name, self.total, self.out, self.width = name, total, out, width
        self.tty = hasattr(out, "isatty") and out.isatty()
        self._shown = -1

    def update(self, step: int, loss: float, lr: float) -> None:
        pct = step * 100 // self.total
        if pct == self._shown or (not self.tty and pct % 25 and step != self.total):
            return
        self._shown = pct
        filled = self.width * step // self.total
        line = (f"{self.name:<6} [{'#' * filled}{'.' * (self.width - filled)}] {pct:3d}%  "
                f"step {step}/{self.total}  loss {loss:.3f}  lr {lr:.3g}")
        self.out.write(("\r" + line) if self.tty else line + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()
