"""A GPT of nanoGPT's shape for the CUDA suite and the CUDA tests, with nothing in it that
syncs the host: tokens come in one-hot (a matmul, not an embedding lookup) and the loss is
a plain log-softmax sum, so that a sync ``torch.cuda.set_sync_debug_mode("error")`` catches
in a step is the hook's.

Two sizes: ``tiny``, a step bound by its kernel launches (the hook's worst case on a
GPU), and ``small``, GPT-2 small's depth and width over 1 024 tokens, bound by the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SIZES", "GptRun", "TinyGPT"]

#: Model shape and batch size per size name.
SIZES: dict[str, tuple[dict[str, int], int]] = {
    "tiny": ({"context": 128, "width": 128, "layers": 4, "heads": 4}, 16),
    "small": ({"context": 1024, "width": 768, "layers": 12, "heads": 12}, 8),
}
VOCAB = 256


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
        self.masked: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (t.transpose(1, 2) for t in
                   self.qkv(self.ln1(x)).view(b, n, 3, self.heads, c // self.heads).unbind(2))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        y = att.masked_fill(self.masked[:n, :n], -math.inf).softmax(-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """nanoGPT's shape: token and position embeddings, pre-norm blocks, a head."""

    def __init__(self, vocab: int = VOCAB, context: int = 128, width: int = 128,
                 layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Linear(vocab, width, bias=False)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = nn.Sequential(*(_Block(width, heads, context) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.tok(onehot) + self.pos[:onehot.shape[1]])))


class GptRun:
    """A model, its AdamW and one batch on ``device``; :meth:`step` trains one step.

    ``shape`` overrides the size's model shape and batch (``{"batch": 2, "context": 16,
    ...}``: a CPU smoke run)."""

    def __init__(self, size: str = "tiny", device: str = "cuda", fused: bool = False,
                 shape: dict[str, int] | None = None) -> None:
        torch.manual_seed(0)
        dims, batch = SIZES[size]
        dims = {**dims, **(shape or {})}
        batch = dims.pop("batch", batch)
        self.model = TinyGPT(**dims).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, fused=fused)
        tokens = torch.randint(0, VOCAB, (batch, dims["context"]), device=device)
        self.x = F.one_hot(tokens, VOCAB).float()  # built once, outside the timed steps
        self.y = torch.roll(self.x, -1, dims=1)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def loss(self) -> torch.Tensor:
        return -(self.model(self.x).log_softmax(-1) * self.y).sum(-1).mean()

    def step(self, hook: Callable[..., Any] | None = None, clip: bool = False) -> None:
        """One step; ``hook`` is ``ctl.step``, given the loss (and, with ``clip``, the
        norm ``clip_grad_norm_`` returned: the fast path for loops that clip anyway)."""
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1e9)
            if hook is not None:
                hook(loss, grad_norm=norm)
        elif hook is not None:
            hook(loss)
        self.opt.step()
