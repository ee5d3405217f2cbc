#!/usr/bin/env bash
# The hook's CUDA checks, for a machine with a GPU (a few minutes): no host-device
# sync on steps that read nothing back (torch.cuda.set_sync_debug_mode("error")),
# statistics through the pinned staging buffers with their values intact, and two
# GPTs' steps with the async hook against the same step without it (reported, not
# judged: timings belong to `lrctl bench`). Without CUDA the tests skip and this says so.
#
#   scripts/gpu_check.sh            # uses .venv if there is one, else python3
#   PYTHON=/path/to/python scripts/gpu_check.sh
#   scripts/gpu_check.sh --tb=long -rA   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ -z "${LRCTL_GPU_REPORT:-}" ]; then
    LRCTL_GPU_REPORT=$(mktemp -t lrctl-gpu-XXXXXX.json)
    trap 'rm -f "$LRCTL_GPU_REPORT"' EXIT
fi
export LRCTL_GPU_REPORT
REPORT=$LRCTL_GPU_REPORT

"$PYTHON" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
PY

status=0
timeout 300 "$PYTHON" -m pytest -q -rs -n 0 -p no:randomly --timeout 240 \
    tests/daemon/test_cuda.py tests/daemon/test_cuda_hotpath.py "$@" || status=$?

if [ -s "$REPORT" ]; then
    echo "== GPT steps (tiny, small), async hook vs none (medians of interleaved blocks)"
    cat "$REPORT"
    echo
fi
exit "$status"
