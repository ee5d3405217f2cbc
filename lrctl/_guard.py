"""The hook's own non-finite guard: a NaN/inf loss or gradient never reaches the weights.

The controller's divergence guard *decides* to back off on a non-finite value,
but in the default (async) loop its answer arrives after ``optimizer.step()``
has already applied the bad gradients. So the hook refuses that step itself,
in the training process, the moment it sees the statistics, without waiting
for the controller:

* **Host values** (a CPU loss, or any loss the loop turned into a float): the
  guard checks them with :func:`math.isfinite` and, when one is not finite,
  the next call of ``optimizer.step()`` returns without stepping. The
  optimizer's state (Adam's moments, its step count) is untouched: exactly as
  if the batch had not happened.
* **Device values** (CUDA, async): reading them would force a host sync, so the
  decision stays on the device. Optimizers that support AMP scaling (torch's
  ``fused=True`` Adam, AdamW, SGD) receive it as ``found_inf`` and skip the
  update inside their kernel, as ``GradScaler`` does. Others get their
  gradients zeroed on the device when the step is bad (their bits times 0, a few
  kernels for all of them: :func:`zero_grads_unless`; the weights stay finite, but
  momentum and weight decay still move them a little): pass ``fused=True`` for an
  exact skip.

The guard wraps the optimizer *instance's* ``step`` while the run is attached
(GradScaler's ``scaler.step(opt)`` and LR schedulers created later call
through it) and unwraps it on :meth:`StepGuard.remove`.

Until the hook's first ``step()`` call the wrapper also notes which gradients each
optimizer step consumed (:meth:`StepGuard.grads_renewed`): an optimizer step before
that call means the loop calls ``step()`` after ``optimizer.step()``, unless a
backward has run since (the step was someone else's: a checkpoint loader that
initialises the optimizer's state with a step at LR 0, a burn-in step).
"""

from __future__ import annotations

import functools
import math
import sys
import types
import warnings
import weakref
from typing import Any

from ._callers import callers_level

__all__ = ["StepGuard", "attached_guard", "close_earlier_attach", "zero_grads_unless"]


class StepGuard:
    """Skips the optimizer step after a non-finite loss or grad norm was seen."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.skipped = 0  # host-side skips carried out
        self.stepped = 0  # optimizer steps taken through the guard
        self.enabled = True  # False: never skip (the loop reports after stepping)
        self._skip_next = False
        self.after: Any = None  # called after every optimizer step, taken or skipped
        # Called instead of the step it skips: the hook's pre-step work (the optimizer's
        # pre-step hooks run only inside the step), so that the LRs the groups hold then
        # are those the step would have used, as at any other step.
        self.on_skip: Any = None
        self._device_ok: Any = None  # a 0-dim bool tensor: the device-side verdict
        self.owner: Any = None  # a weak reference to the hook that installed it
        # Until the hook knows the loop's order (its first step() call), each optimizer step
        # notes the gradients it consumed (see grads_renewed); nothing once it knows.
        self.watching = True
        self._consumed: Any = None  # _grads_fingerprint() at the last optimizer step
        self._inner = optimizer.step
        # A step set on the instance (an LR scheduler's counting wrapper, say) is put back
        # on remove(); otherwise the class's step shows through again.
        self._own_step = optimizer.__dict__.get("step")
        self._active = True
        self._wrapper = self._make_wrapper()  # one function, to recognise it when unwrapping
        try:
            optimizer.step = self._wrapper
            self._installed = True
        except (AttributeError, TypeError):  # a step that cannot be wrapped: no guard
            self._installed = False

    @property
    def installed(self) -> bool:
        return self._installed

    def check(self, loss: float | None, grad_norm: float | None) -> bool:
        """Host values of this step: True (and the next ``step()`` skipped) if not finite."""
        bad = ((loss is not None and not math.isfinite(loss))
               or (grad_norm is not None and not math.isfinite(grad_norm)))
        if bad and self._installed and self.enabled:
            self._skip_next = True
        return bad

    def check_on_device(self, loss: Any, grad_norm: Any) -> None:
        """Device tensors of this step: keep the verdict on the device (no host sync)."""
        if not self.enabled:
            return
        torch = sys.modules["torch"]
        ok = None
        for value in (loss, grad_norm):
            if value is not None and hasattr(value, "device"):
                finite = torch.isfinite(value.detach())
                if finite.dim():  # (a 0-dim verdict needs no reduction: a kernel less)
                    finite = finite.all()
                ok = finite if ok is None else ok & finite
        self._device_ok = ok

    @property
    def skips_next(self) -> bool:
        """Whether the next optimizer step is to be skipped (a host verdict)."""
        return self._skip_next

    def veto(self) -> None:
        """Skip the next optimizer step (the controller asked, in time: sync mode)."""
        if self._installed and self.enabled:
            self._skip_next = True

    def clear(self) -> None:
        """The loop called ``step()`` without stepping the optimizer: forget the verdict."""
        self._skip_next = False
        self._device_ok = None

    def remove(self) -> None:
        self._active = False
        if self._installed and self.optimizer.__dict__.get("step") is self._wrapper:
            if self._own_step is not None:
                self.optimizer.step = self._own_step
            else:
                del self.optimizer.step  # someone who wrapped us after keeps calling through

    # -- the wrapped step ---------------------------------------------------------------
    def _make_wrapper(self) -> Any:
        def step(_optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            return self._step(*args, **kwargs)

        # A torch LR scheduler created before attach wrapped the step and checks for its
        # mark; we call through its wrapper, so the mark stays true.
        if getattr(self._inner, "_wrapped_by_lr_sched", False):
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        step.__wrapped__ = self._inner  # type: ignore[attr-defined]
        step._lrctl_guard = self  # type: ignore[attr-defined]  # (see attached_guard)
        # A method bound to the optimizer, as the step it replaces: a scheduler created
        # after attach wraps ``step.__func__`` and binds it to the optimizer again.
        return types.MethodType(step, self.optimizer)

    def _step(self, *args: Any, **kwargs: Any) -> Any:
        if not self._active:
            return self._inner(*args, **kwargs)
        try:
            return self._guarded_step(args, kwargs)
        finally:
            if self.watching:
                self._note_consumed()
            if self.after is not None:
                self.after()

    def grads_renewed(self) -> bool:
        """Whether the gradients now are not those the last optimizer step consumed: a
        backward has run since, so the loop calls ``step()`` before ``optimizer.step()``
        and the steps before it were someone else's. False where nothing says so: no
        step, the same gradients untouched, none now (``zero_grad()`` after the step), or
        all of them zeroed in place (``zero_grad(set_to_none=False)`` after the step).
        Ends the watch: called once, at the hook's first ``step()``."""
        self.watching = False
        consumed, self._consumed = self._consumed, None
        if not self.stepped or consumed is _UNREAD:
            return False
        try:
            return _renewed(consumed, self.optimizer)
        except Exception:  # gradients it cannot read so (sparse, say): decided as before
            return False

    def _note_consumed(self) -> None:
        """After an optimizer step, while watching: the gradients it consumed."""
        try:
            self._consumed = _grads_fingerprint(self.optimizer)
        except Exception:  # not the loop's step's failure: the order is decided as before
            self.watching = False
            self._consumed = _UNREAD

    def _guarded_step(self, args: Any, kwargs: Any) -> Any:
        self.stepped += 1
        if self._skip_next:
            self._skip_next = False
            self._device_ok = None
            self.skipped += 1
            if self.on_skip is not None:
                self.on_skip()
            return _closure_loss(args, kwargs)
        ok, self._device_ok = self._device_ok, None
        if ok is None:
            return self._inner(*args, **kwargs)
        return self._device_step(ok, args, kwargs)

    def _device_step(self, ok: Any, args: Any, kwargs: Any) -> Any:
        torch = sys.modules["torch"]
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
        if getattr(opt, "_step_supports_amp_scaling", False) and not hasattr(opt, "found_inf"):
            opt.found_inf = (~ok).to(torch.float32)  # the fused kernel skips the update
            try:
                return self._inner(*args, **kwargs)
            finally:
                del opt.found_inf
        zero_grads_unless(torch, ok, opt)
        return self._inner(*args, **kwargs)


def zero_grads_unless(torch: Any, ok: Any, optimizer: Any) -> None:
    """Every gradient of ``optimizer`` zeroed where the 0-dim device bool ``ok`` is False,
    left bit for bit where it is True, without a host sync and in a few kernels: each
    floating gradient is viewed as the integers of its width (its bits) and multiplied
    by ``ok`` (1 or 0), one ``_foreach_mul_`` per device and width. Bits times 0 are
    +0.0 whatever the value was, a NaN or an inf too, where ``grad * ok`` would keep a
    NaN; a sparse gradient's values alike (``torch.where`` refused them). (A
    ``torch.where`` per parameter, as before, cost three kernel launches and a
    gradient-sized allocation each: on a GPU whose step is bound by launches, a tiny
    GPT's 54 parameters made the hooked step 1.28x the bare one.) Gradients of other
    kinds (complex, a tensor subclass) take ``torch.where``, one by one."""
    bits_of = _bit_views(torch)
    views: dict[tuple[int, Any], list[Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            bits = bits_of.get(g.dtype) if type(g) is torch.Tensor else None
            if bits is not None and g.layout is torch.sparse_coo:
                g = g._values()  # (an embedding's sparse gradient: its values, a view)
            elif g.layout is not torch.strided:
                bits = None
            if bits is None:
                g.copy_(torch.where(ok.to(g.device), g, torch.zeros((), dtype=g.dtype,
                                                                    device=g.device)))
                continue
            views.setdefault((g.get_device(), bits), []).append(g.view(bits))
    for (_, bits), same in views.items():
        mask = ok.to(device=same[0].device, dtype=bits)
        try:
            torch._foreach_mul_(same, mask)
        except (RuntimeError, TypeError):  # a torch without the tensor-scalar overload
            for view in same:
                view.mul_(mask)


@functools.lru_cache(maxsize=2)
def _bit_views(torch: Any) -> dict[Any, Any]:
    """Each floating dtype's integer dtype of the same width (see zero_grads_unless)."""
    return {torch.float32: torch.int32, torch.float64: torch.int64,
            torch.float16: torch.int16, torch.bfloat16: torch.int16}


#: What a step noted when it could not read the gradients (see StepGuard.grads_renewed).
_UNREAD = object()


def _grads_fingerprint(optimizer: Any) -> tuple[Any, Any, int] | None:
    """The gradient of the optimizer's first parameter that has one, cheaply: the parameter,
    a weak reference to the gradient (a tensor backward made after ``zero_grad()`` set it
    None is another object, even at a reused address) and its version counter (which
    backward's in-place accumulation and ``zero_grad(set_to_none=False)`` advance).
    None: no parameter has a gradient."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    for group in opt.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is not None:
                return p, weakref.ref(g), g._version
    return None


def _renewed(consumed: tuple[Any, Any, int] | None, optimizer: Any) -> bool:
    """:meth:`StepGuard.grads_renewed`, given what the last optimizer step consumed."""
    now = _grads_fingerprint(optimizer)
    if now is None:
        return False
    if consumed is None:
        return True  # the step had no gradients to consume; these came after it
    param, grad_ref, version = consumed
    grad = grad_ref()
    if now[0] is not param or grad is None or now[1]() is not grad:
        return True  # another tensor: backward made it (after zero_grad() set it None)
    if grad._version == version:
        return False
    # Changed in place: a backward accumulated into it, or zero_grad(set_to_none=False)
    # zeroed it (read once, here: on CUDA a host sync, at the first step() only).
    return not _grads_all_zero(optimizer)


def _grads_all_zero(optimizer: Any) -> bool:
    """Whether every gradient this rank holds is zero (a DTensor's: its own shard, with no
    collective); stops at the first that is not."""
    opt = getattr(optimizer, "optimizer", optimizer)
    seen = False
    for group in opt.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            local = g.to_local() if hasattr(g, "to_local") else g
            if local.numel():
                if bool(local.any()):
                    return False
                seen = True
    return seen


def attached_guard(optimizer: Any) -> StepGuard | None:
    """The guard an earlier attach installed on ``optimizer`` and that is still active, if
    any: its ``step``, or a wrapper of it (an LR scheduler made after that attach)."""
    step = getattr(optimizer, "__dict__", {}).get("step")
    for _ in range(8):  # wrappers of wrappers, not forever
        if step is None:
            return None
        guard = getattr(step, "_lrctl_guard", None)
        if isinstance(guard, StepGuard):
            return guard if guard._active else None
        step = getattr(step, "__wrapped__", None)
    return None


def close_earlier_attach(optimizer: Any) -> None:
    """An optimizer still attached (an attach cell run again in a notebook, a second
    attach): two hooks would each write their own LRs and each report the other's as a
    foreign write. The earlier one is closed, its run ended, with a warning."""
    guard = attached_guard(optimizer)
    earlier = guard.owner() if guard is not None and guard.owner is not None else None
    if earlier is None:
        return
    warnings.warn(f"lrctl: this optimizer is already attached (run {earlier.run_key!r}); "
                  "that controller is closed and its run ended, so that one hook sets the "
                  "LRs (close() a controller before attaching its optimizer again)",
                  RuntimeWarning, stacklevel=callers_level())
    earlier.close()


def _closure_loss(args: Any, kwargs: Any) -> Any:
    """What a skipped ``step(closure)`` returns: the closure's loss, as the step it stands
    for would have (torch's optimizers evaluate it, with gradients, and return it; a loop
    such as ``loss = opt.step(closure); loss.item()`` must not get None). No closure: None."""
    closure = kwargs["closure"] if "closure" in kwargs else (args[0] if args else None)
    if closure is None:
        return None
    with sys.modules["torch"].enable_grad():
        return closure()
