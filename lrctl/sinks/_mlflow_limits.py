"""MLflow's limits and the error codes lrctl treats as final (no mlflow import)."""

from __future__ import annotations

__all__ = ["MAX_METRICS_PER_BATCH", "MAX_PARAMS_TAGS_PER_BATCH", "MAX_TAG_CHARS",
           "PERMANENT_ERRORS"]

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit (entities in all)
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_TAG_CHARS = 5000
#: MLflow error codes that retrying cannot fix (a deleted run, a refused value).
PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST",
                              "INVALID_STATE", "PERMISSION_DENIED"})
