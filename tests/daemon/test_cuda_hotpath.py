"""The hook's CUDA hot path (runs only where a GPU exists; ``scripts/gpu_check.sh``).

* No host-device sync on a step that reads nothing back, whether the hook computes
  the grad norm or is handed ``clip_grad_norm_``'s (a CUDA tensor): checked with
  ``torch.cuda.set_sync_debug_mode("error")``, which raises on any sync.
* The statistics reach the controller through the pinned staging buffers, with their
  values intact: a NaN loss on the device becomes the guard's back-off at its step.
* A GPT's step with the async hook against the same step without it (a tiny one, bound
  by its kernel launches, and one of GPT-2 small's depth and width, bound by the GPU),
  interleaved blocks, medians: reported (``LRCTL_GPU_REPORT`` names a JSON file for
  it), never a pass/fail threshold (timings belong to ``lrctl bench``, not to tests).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch
from daemon_helpers import ControllerProc
from torch import nn
from torch.nn import functional as F

import lrctl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

POLICY = {"version": 1, "policies": [{"kind": "divergence", "min_samples": 8,
                                      "regrow_after": 10_000}]}
WARMUP = 5  # first steps may sync: pinned buffers, optimizer state, cuBLAS workspaces
#: Model shapes and batch sizes: "tiny", a step bound by its kernel launches (the hook's
#: worst case); "small", GPT-2 small's depth and width over 1 024 tokens, bound by the GPU.
SIZES: dict[str, tuple[dict[str, int], int]] = {
    "tiny": ({"context": 128, "width": 128, "layers": 4, "heads": 4}, 16),
    "small": ({"context": 1024, "width": 768, "layers": 12, "heads": 12}, 8),
}


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))
        causal = torch.ones(context, context, dtype=torch.bool).triu(1)
        self.register_buffer("masked", causal, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (t.transpose(1, 2) for t in
                   self.qkv(self.ln1(x)).view(b, n, 3, self.heads, c // self.heads).unbind(2))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        y = att.masked_fill(self.masked[:n, :n], -math.inf).softmax(-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """nanoGPT's shape, tiny. Tokens come in one-hot (a matmul, not an embedding lookup)
    and the loss is a plain log-softmax sum: nothing in the model itself may sync, so
    that a sync caught by the debug mode is the hook's."""

    def __init__(self, vocab: int = 256, context: int = 128, width: int = 128,
                 layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Linear(vocab, width, bias=False)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = nn.Sequential(*(_Block(width, heads, context) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.tok(onehot) + self.pos[:onehot.shape[1]])))


class _Run:
    """A model, its optimizer and a batch on the GPU; ``step(hook)`` trains one step."""

    def __init__(self, fused: bool = False, size: str = "tiny") -> None:
        torch.manual_seed(0)
        shape, batch = SIZES[size]
        self.model = TinyGPT(**shape).cuda()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, fused=fused)
        tokens = torch.randint(0, 256, (batch, shape["context"]), device="cuda")
        self.x = F.one_hot(tokens, 256).float()  # built once, outside the timed steps
        self.y = torch.roll(self.x, -1, dims=1)

    def loss(self) -> torch.Tensor:
        return -(self.model(self.x).log_softmax(-1) * self.y).sum(-1).mean()

    def step(self, hook: Callable[..., None] | None = None, clip: bool = False) -> None:
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:  # the fast path: the loop clips anyway and hands the hook the norm
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1e9)
            if hook is not None:
                hook(loss, grad_norm=norm)
        elif hook is not None:
            hook(loss)
        self.opt.step()


def _no_sync_steps(run: _Run, ctl: lrctl.Controller, steps: int, clip: bool) -> None:
    for _ in range(WARMUP):
        run.step(ctl.step, clip=clip)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            run.step(ctl.step, clip=clip)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("clip", [False, True], ids=["hook-computes-norm", "clip-norm-given"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_hooked_gpt_steps_never_sync(controller: ControllerProc, clip: bool,
                                     fused: bool) -> None:
    run = _Run(fused=fused)
    with lrctl.attach(run.opt, policy=POLICY, spawn=False) as ctl:
        _no_sync_steps(run, ctl, 40, clip)
        for _ in range(3):  # let the last staged statistics go out
            run.step(ctl.step, clip=clip)
        assert ctl._staging.used  # they went through the pinned buffers
        assert all(buf.is_pinned() for buf in ctl._staging._pinned)
        assert lrctl.client.request({"t": "runs"})["runs"][0]["step"] >= 40


def test_staged_statistics_reach_the_controller_intact(controller: ControllerProc) -> None:
    """A NaN loss on the device: skipped on the device (no sync) and, through the
    pinned buffers, the controller's guard backs off at that very step."""
    model = nn.Linear(8, 1).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 8, device="cuda")
    nan_at = 20
    with lrctl.attach(opt, policy=POLICY, spawn=False) as ctl:
        for t in range(40):
            loss = model(x).pow(2).mean()
            if t == nan_at:
                loss = loss * torch.tensor(math.nan, device="cuda")
            opt.zero_grad()
            loss.backward()
            ctl.step(loss)
            opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN was refused
    backoffs = [d.step for d in ctl.decisions if d.action == "backoff"]
    assert backoffs == [nan_at]


@pytest.mark.parametrize("size", list(SIZES))
def test_gpt_step_ratio(controller: ControllerProc, size: str) -> None:
    """Wall time per step with the async hook over the same step without it."""
    blocks, steps = (9, 30) if size == "tiny" else (5, 10)
    arms: dict[str, tuple[_Run, lrctl.Controller | None, bool]] = {}
    stack: list[lrctl.Controller] = []
    for name, hooked, clip in (("bare", False, False), ("hook computes the norm", True, False),
                               ("bare + clip_grad_norm_", False, True),
                               ("hook given clip_grad_norm_'s norm", True, True)):
        run = _Run(size=size)
        ctl = lrctl.attach(run.opt, policy=POLICY, spawn=False) if hooked else None
        if ctl is not None:
            stack.append(ctl)
        arms[name] = (run, ctl, clip)
    times: dict[str, list[float]] = {name: [] for name in arms}
    try:
        for run, ctl, clip in arms.values():
            for _ in range(WARMUP):
                run.step(ctl.step if ctl else None, clip=clip)
        names = list(arms)
        for b in range(blocks):
            for name in names[b % len(names):] + names[:b % len(names)]:
                run, ctl, clip = arms[name]
                torch.cuda.synchronize()
                began = time.perf_counter()
                for _ in range(steps):
                    run.step(ctl.step if ctl else None, clip=clip)
                torch.cuda.synchronize()
                times[name].append((time.perf_counter() - began) / steps)
    finally:
        for ctl in stack:
            ctl.close()

    def ratio(num: str, den: str) -> float:
        return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))

    report = {"device": torch.cuda.get_device_name(), "model": size,
              "parameters": sum(p.numel() for p in arms["bare"][0].model.parameters()),
              "step_ms": {n: statistics.median(xs) * 1e3 for n, xs in times.items()},
              "hook computes the norm / bare": ratio("hook computes the norm", "bare"),
              "hook given the norm / bare + clip":
                  ratio("hook given clip_grad_norm_'s norm", "bare + clip_grad_norm_")}
    print(json.dumps(report, indent=1))
    path = os.environ.get("LRCTL_GPU_REPORT")
    if path:  # one report per model size, in one JSON object
        try:
            with open(path, encoding="utf-8") as f:
                reports = json.load(f)
        except (OSError, ValueError):
            reports = {}
        reports[size] = report
        with open(path, "w", encoding="utf-8") as f:
            json.dump(reports, f, indent=1)
    assert all(math.isfinite(v) and v > 0 for v in report["step_ms"].values())
