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


class _Sub(torch.Tensor):
    """A tensor subclass: torch's foreach kernels do not take it."""


@pytest.mark.parametrize("make", [
    lambda: [torch.randn(3), torch.randn(4, 2)],
    lambda: [torch.randn(3), torch.randn(2, dtype=torch.float64)],
    lambda: [torch.randn(3, dtype=torch.bfloat16)] * 2,
    lambda: [torch.randn(3), torch.randn(2).as_subclass(_Sub)],
    lambda: [torch.randn(3).as_subclass(_Sub)],
    lambda: [torch.randn(3), torch.randn(2, device="meta")],
    lambda: [torch.randn(2, device="meta"), torch.randn(3, device="meta")],
])
def test_the_fast_grouping_check_agrees_with_torch_helpers(make: Any) -> None:
    """The attribute-by-attribute check (no device objects) gives torch's own verdict."""
    from torch.utils._foreach_utils import (
        _group_tensors_by_device_and_dtype,
        _has_foreach_support,
    )

    from lrctl._torchutil import _one_foreach_group

    grads = make()
    want = (len(_group_tensors_by_device_and_dtype([grads])) == 1
            and _has_foreach_support(grads, grads[0].device))
    assert _one_foreach_group(torch, grads) is want


@pytest.mark.parametrize("wide", [False, True])
def test_sparse_gradients_have_the_norm_of_their_dense_form(wide: bool) -> None:
    """An ``Embedding(sparse=True)``'s gradient (repeated indices included: they are
    summed, as the optimizer's step sums them) beside a dense one: torch's norms refuse
    sparse tensors, and the hook reported nothing at all."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 4, sparse=True)
    head = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD([*emb.parameters(), *head.parameters()], lr=0.1)
    head(emb(torch.tensor([3, 7, 3, 9]))).sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.is_sparse
    want = torch.nn.utils.get_total_norm(
        [emb.weight.grad.to_dense(), head.weight.grad, head.bias.grad], 2.0)
    got = total_grad_norm(opt, wide=wide)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_sparse_gradients_cost_torch_s_error_once_per_optimizer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's refusal (an exception: ~60 µs, four times the norm on a small model) is
    paid at the first norm only; later ones go by the values at once, and stay exact."""
    import lrctl._torchutil as tu

    tried: list[bool] = []
    norm_of = tu._norm_of

    def counted(torch_: object, grads: list[object], wide: bool) -> object:
        tried.append(all(g.layout == torch.strided for g in grads))  # type: ignore[attr-defined]
        return norm_of(torch_, grads, wide)

    monkeypatch.setattr(tu, "_norm_of", counted)
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 4, sparse=True)
    head = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD([*emb.parameters(), *head.parameters()], lr=0.1)
    for step, batch in enumerate(([3, 7, 3, 9], [1, 1, 2], [40, 41])):
        opt.zero_grad()
        head(emb(torch.tensor(batch))).sum().backward()
        want = torch.nn.utils.get_total_norm(
            [emb.weight.grad.to_dense(), head.weight.grad, head.bias.grad], 2.0)
        assert float(total_grad_norm(opt)) == pytest.approx(float(want), rel=1e-6)
        assert tried == ([False, True] if step == 0 else [True]), (step, tried)
        tried.clear()


def test_an_unhashable_optimizer_still_gets_its_norm() -> None:
    """An optimizer class with ``__eq__`` and no ``__hash__`` cannot be remembered as
    sparse: it pays torch's refusal each time, and gets its norm (dense or sparse)."""

    class Unhashable(torch.optim.SGD):
        def __eq__(self, other: object) -> bool:
            return self is other

    emb = torch.nn.Embedding(10, 2, sparse=True)
    head = torch.nn.Linear(2, 1)
    for sparse in (False, True):
        params = [*emb.parameters(), *head.parameters()] if sparse else [*head.parameters()]
        opt = Unhashable(params, lr=0.1)
        opt.zero_grad()
        head(emb(torch.tensor([1, 2]))).sum().backward()
        grads = [p.grad.to_dense() for p in params]
        want = float(torch.nn.utils.get_total_norm(grads, 2.0))
        for _ in range(2):
            assert float(total_grad_norm(opt)) == pytest.approx(want, rel=1e-6)


def test_a_loop_with_sparse_gradients_is_reported_and_guarded(controller: Any) -> None:
    """The loop reports every step with its norm, and a NaN step is skipped (before, the
    norm's error dropped every observation and the guard with it)."""
    import warnings

    import lrctl

    torch.manual_seed(0)
    emb = torch.nn.Embedding(100, 8, sparse=True)
    head = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD([*emb.parameters(), *head.parameters()], lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of any kind
        with lrctl.attach(opt, spawn=False, sync=True) as ctl:
            for t in range(40):
                idx = torch.randint(0, 100, (16,))
                loss = ((head(emb(idx)) - (idx % 3).float().unsqueeze(1)) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                if t == 30:
                    loss = loss * float("nan")
                ctl.step(loss)
                opt.step()
            assert ctl._reported == 39
    assert torch.isfinite(head.weight).all() and torch.isfinite(emb.weight).all()
    assert any(d.step == 30 and d.action == "skip" for d in ctl.decisions)
