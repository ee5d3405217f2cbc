"""Small torch helpers for the hook, used through ``sys.modules`` (never imported here).

The training side loads torch itself (it hands us an optimizer); the hook must
not import it, so that ``import lrctl`` stays cheap and the controller, which
shares these modules, never pulls torch in.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import weakref
from typing import Any

__all__ = [
    "is_number",
    "lr_value",
    "on_device",
    "register_pre_step",
    "scaler_enabled",
    "shape_problem",
    "to_float",
    "total_grad_norm",
    "unscaled_norm",
]


def register_pre_step(optimizer: Any, hook: Any) -> Any:
    """Register ``hook`` to run before each ``optimizer.step()``; its handle, or ``None``.

    Wrappers such as accelerate's ``AcceleratedOptimizer`` subclass torch's
    ``Optimizer`` without its hook tables; their ``.optimizer`` is the real one.
    """
    for candidate in (optimizer, getattr(optimizer, "optimizer", None)):
        register = getattr(candidate, "register_step_pre_hook", None)
        if register is None:
            continue
        try:
            return register(hook)
        except (AttributeError, TypeError):
            continue
    return None


def total_grad_norm(optimizer: Any, wide: bool = False) -> Any:
    """The 2-norm of all gradients of ``optimizer``'s parameters, as a tensor (no sync).

    Uses torch's foreach kernels (``get_total_norm``, grouped by device and
    dtype); ``None`` when torch is not loaded or no parameter has a gradient.
    ``wide``: summed in float64, for gradients a ``GradScaler`` still scales (its scale
    grows without bound where nothing overflows, as under bf16: past ~1e19 the float32
    squares are inf, and every step read as an overflow).
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    grads = [p.grad for g in optimizer.param_groups for p in g["params"]
             if getattr(p, "grad", None) is not None]
    if not grads:
        return None
    if not _known_sparse(optimizer):
        try:
            return _norm_of(torch, grads, wide)
        except (RuntimeError, NotImplementedError):
            if all(g.layout == torch.strided for g in grads):
                raise
        # Its gradients were sparse once: they will be again. A torch error costs more
        # than the norm (~60 µs against ~15 on a small model): not at every report.
        with contextlib.suppress(TypeError):  # (not weakly referable or hashable: each time)
            _SPARSE.add(optimizer)
    # Sparse gradients (an ``Embedding(sparse=True)``): torch's norms refuse them. The
    # norm of the values a coalesced tensor holds is its norm (coalescing sums repeated
    # indices first, as the optimizer's step does).
    return _norm_of(torch, [_values(torch, g) for g in grads], wide)


#: Optimizers whose gradients were found sparse (their norm goes by their values).
_SPARSE: weakref.WeakSet[Any] = weakref.WeakSet()


def _known_sparse(optimizer: Any) -> bool:
    try:
        return optimizer in _SPARSE
    except TypeError:  # unhashable (an ``__eq__`` without ``__hash__``): never remembered
        return False


def _values(torch: Any, grad: Any) -> Any:
    """A gradient's values, dense: itself when it is dense."""
    if grad.layout == torch.strided:
        return grad
    if grad.layout == torch.sparse_coo:
        return grad.coalesce().values()
    return grad.values()  # compressed layouts hold each entry once


def _norm_of(torch: Any, grads: list[Any], wide: bool) -> Any:
    """:func:`total_grad_norm` of dense ``grads``."""
    if wide:
        groups: dict[Any, list[Any]] = {}
        for grad in grads:
            groups.setdefault((grad.device, grad.dtype), []).append(grad)
        wide_norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
            gs, 2.0, dtype=torch.float64)), 2.0) for gs in groups.values()]
        return torch.linalg.vector_norm(
            torch.stack([n.to(grads[0].device) for n in wide_norms]), 2.0)
    if _one_foreach_group(torch, grads):
        # get_total_norm's own arithmetic for a single (device, dtype) group, the usual
        # case (the same bits): without its per-call Python, about half its cost on a
        # small model's step.
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if total_norm is not None:
        return total_norm(grads, 2.0)
    per_device: dict[Any, list[Any]] = {}
    for grad in grads:
        per_device.setdefault((grad.device, grad.dtype), []).append(grad)
    norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs)))
             for gs in per_device.values()]
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))


def lr_value(lr: Any) -> float:
    """A param group's LR as a float (a tensor LR is read once, here), checked."""
    value = float(lr)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"param group LRs must be finite and >= 0, but got {value!r}")
    return value


def is_number(x: Any) -> bool:
    """A real number, a one-element tensor, or a NumPy number or one-element array (not
    a bool)."""
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    if not hasattr(x, "item"):
        return False
    numel = getattr(x, "numel", None)
    if callable(numel):  # a tensor
        return numel() == 1
    size, dtype = getattr(x, "size", None), getattr(x, "dtype", None)
    return (type(size) is int and size == 1  # NumPy: np.float32(…), a 0-d array
            and getattr(dtype, "kind", "") in ("f", "i", "u"))


def on_device(x: Any) -> bool:
    """A tensor on an accelerator: reading it would synchronise with the device."""
    is_cpu = getattr(x, "is_cpu", None)
    if type(is_cpu) is bool:  # a tensor: ``.device`` would build an object (µs in a loop)
        return not is_cpu
    device = getattr(x, "device", None)
    return device is not None and getattr(device, "type", "cpu") != "cpu"


def to_float(x: Any) -> float | None:
    if x is None:
        return None
    if type(x) is float:
        return x
    return float(x.item()) if hasattr(x, "item") else float(x)


def scaler_enabled(scaler: Any) -> bool:
    """A ``GradScaler`` that is scaling (``enabled=False`` makes it a pass-through)."""
    if scaler is None:
        return False
    is_enabled = getattr(scaler, "is_enabled", None)
    return bool(is_enabled()) if callable(is_enabled) else True


def unscaled_norm(scaler: Any, optimizer: Any, norm: Any) -> Any:
    """``norm`` of the true gradients: divided by the scale unless the loop already called
    ``scaler.unscale_(optimizer)`` this step. No host sync: the scale stays a tensor."""
    if not scaler_enabled(scaler):
        return norm
    states = getattr(scaler, "_per_optimizer_states", None)
    inner = getattr(optimizer, "optimizer", optimizer)
    state = None
    if isinstance(states, dict):
        state = states.get(id(optimizer)) or states.get(id(inner))
    stage = state.get("stage") if isinstance(state, dict) else None
    if stage is not None and getattr(stage, "name", "") == "UNSCALED":
        return norm
    scale = getattr(scaler, "_scale", None)
    if scale is None:  # not scaled yet (no scale() call this run)
        return norm
    return norm / scale.to(norm.device).reshape(()) if hasattr(norm, "device") else (
        norm / float(scale))


def _one_foreach_group(torch: Any, grads: list[Any]) -> bool:
    """Whether ``grads`` are one (device, dtype) group that torch's foreach norm takes:
    then :func:`total_grad_norm` can skip ``get_total_norm``'s grouping. False (use
    ``get_total_norm``) when this torch lacks the helpers it relies on.

    Plain tensors on the CPU or on one CUDA device are checked here, attribute by
    attribute, to the same verdict as torch's helpers: those build a device object per
    tensor, which inside a training loop cost a small model's step ~20 µs, more than
    the norm itself. Any other device asks the helpers."""
    helpers = _foreach_helpers(torch)
    if helpers is None:
        return False
    first, tensor = grads[0], torch.Tensor
    dtype = first.dtype
    if type(first) is tensor and first.is_cpu:
        return all(type(g) is tensor and g.is_cpu and g.dtype is dtype for g in grads)
    if type(first) is tensor and first.is_cuda:
        index = first.get_device()
        return all(type(g) is tensor and g.is_cuda and g.get_device() == index
                   and g.dtype is dtype for g in grads)
    group, supported = helpers
    return len(group([grads])) == 1 and supported(grads, grads[0].device)


@functools.lru_cache(maxsize=4)
def _foreach_helpers(torch: Any) -> tuple[Any, Any] | None:
    """torch's (private) grouping and foreach-support helpers, looked up once."""
    try:
        from torch.utils._foreach_utils import (
            _group_tensors_by_device_and_dtype,
            _has_foreach_support,
        )
    except ImportError:
        return None
    if not hasattr(torch, "_foreach_norm"):
        return None
    return _group_tensors_by_device_and_dtype, _has_foreach_support


def shape_problem(loss: Any, grad_norm: Any) -> str | None:
    """What to tell a loop that passed ``ctl.step`` a loss (or grad norm) of several
    elements; None when both are one number (or not tensors)."""
    for what, value, fix in (("loss", loss, "pass a scalar, e.g. ctl.step(loss.mean())"),
                             ("grad_norm", grad_norm, "pass the total norm, as "
                              "clip_grad_norm_ returns it")):
        size = _numel(value)
        if size is not None and size != 1:
            return (f"lrctl: ctl.step() needs one number for the {what}, but the {what} "
                    f"has {size} elements; {fix}. No step is reported, and no NaN/inf step is "
                    "skipped, until then; training continues at the last LR")
    return None


def _numel(x: Any) -> int | None:
    """How many elements a tensor (or array) has; None for anything else."""
    numel = getattr(x, "numel", None)
    try:
        return int(numel()) if callable(numel) else None
    except Exception:
        return None
