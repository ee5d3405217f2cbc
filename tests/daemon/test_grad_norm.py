"""The hook's grad norm is torch's ``get_total_norm``, bit for bit, on every layout."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lrctl._torchutil import total_grad_norm


def _optimizer(*params: torch.Tensor) -> Any:
    return torch.optim.SGD([torch.nn.Parameter(p) for p in params], lr=0.1)


def _with_grads(opt: Any, skip: int | None = None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    grads = []
    for i, p in enumerate(opt.param_groups[0]["params"]):
        if i == skip:
            continue
        p.grad = torch.randn_like(p) * (i + 1)
        grads.append(p.grad)
    return grads


@pytest.mark.parametrize("shapes,dtypes", [
    ([(256, 64), (256,), (10, 256), (10,)], [torch.float32] * 4),  # one group: the fast way
    ([(3,)], [torch.float32]),
    ([(4, 4), (7,)], [torch.float64, torch.float64]),
    ([(4, 4), (7,), (5,)], [torch.float32, torch.float64, torch.float32]),  # mixed: torch's
    ([(8, 8), (3,)], [torch.bfloat16, torch.bfloat16]),
])
def test_total_grad_norm_is_get_total_norm(shapes: list[tuple[int, ...]],
                                           dtypes: list[torch.dtype]) -> None:
    opt = _optimizer(*(torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes, strict=True)))
    grads = _with_grads(opt)
    got = total_grad_norm(opt)
    want = torch.nn.utils.get_total_norm(grads, 2.0)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_parameters_without_gradients_are_left_out() -> None:
    opt = _optimizer(torch.zeros(3), torch.zeros(5), torch.zeros(2))
    grads = _with_grads(opt, skip=1)
    assert torch.equal(total_grad_norm(opt), torch.nn.utils.get_total_norm(grads, 2.0))
    for p in opt.param_groups[0]["params"]:
        p.grad = None
    assert total_grad_norm(opt) is None


def test_a_non_finite_gradient_gives_a_non_finite_norm() -> None:
    opt = _optimizer(torch.zeros(3), torch.zeros(2))
    grads = _with_grads(opt)
    grads[1][0] = float("nan")
    assert torch.isnan(total_grad_norm(opt))
