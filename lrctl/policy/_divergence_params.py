"""The divergence guard's knobs (:class:`~lrctl.policy.divergence.Divergence`'s
``PARAMS``): names, types, defaults, bounds and the help that ``lrctl validate --kinds``
and the README's reference table show."""

from __future__ import annotations

from ._params import MAX_WINDOW, Param

__all__ = ["DIVERGENCE_PARAMS"]

DIVERGENCE_PARAMS = (
    Param("factor", "float", 0.5, "multiply the LR by this on a back-off", gt=0, lt=1),
    Param("z_threshold", "float", 6.0, "robust z-score above which a value is a spike", gt=0),
    Param("window", "int", 128, "values in the rolling statistics", ge=4,
          le=MAX_WINDOW),
    Param("min_samples", "int", 32, "values needed before spike detection arms", ge=4),
    Param("watch_loss", "bool", True, "detect spikes in the loss"),
    Param("watch_grad_norm", "bool", True, "detect spikes in the grad norm (log scale)"),
    Param("loss_scale", "str", "log", "judge the loss on a log or a linear scale",
          choices=("log", "linear")),
    Param("min_sigma", "float", 0.05,
          "least robust σ (log units; relative to the median for a linear loss)", ge=0),
    Param("grad_norm_min_sigma", "float", None,
          "least robust σ of the log grad norm (default: min_sigma)", ge=0, optional=True),
    Param("tolerance", "int", 0, "spikes tolerated before a back-off", ge=0),
    Param("loss_confirm", "int", 1,
          "loss spikes in a row that make one spike (a lone one is flagged and "
          "skipped, not backed off); 1: every loss spike counts", ge=1, le=MAX_WINDOW),
    Param("grad_norm_tolerance", "int", 0,
          "spikes of the grad norm alone (the loss ordinary) tolerated before a "
          "back-off, beside `tolerance` (flagged and skipped, not backed off)", ge=0),
    Param("cooldown", "int", 10, "observations after a back-off with no new spike back-off",
          ge=0, le=MAX_WINDOW),
    Param("regrow_after", "int", 200, "clean observations before the LR regrows", ge=1),
    Param("regrow_factor", "float", 2.0, "growth of the multiplier at each regrowth", gt=1),
    Param("max_backoffs", "int", 8, "back-offs in one incident before stop", ge=1),
    Param("max_shift", "float", 4.0,
          "a cooldown whose loss stays this many times above the old median is still "
          "divergence, not a new level: back off again, harder (null: never)",
          gt=1, optional=True),
    Param("min_multiplier", "float", 1e-3, "floor of the back-off multiplier", gt=0, le=1),
    Param("max_rollbacks", "int", 3,
          "rollbacks to a snapshot before the incident per run, when the hook keeps "
          "snapshots (attach(snapshot_every=N)); one more asks to stop; 0: never", ge=0),
    Param("rollback_factor", "float", 0.1,
          "multiply the LR by this at a rollback (it does not regrow past it)", gt=0, lt=1),
    Param("skip_nonfinite", "bool", True, "record the skip of a non-finite step as this "
          "policy's (false: the engine's guard records it; the step is skipped either way)"),
    Param("skip_spikes", "bool", False,
          "also ask the hook to skip steps flagged as spikes (sync mode acts on it)"),
)
