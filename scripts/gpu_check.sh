#!/usr/bin/env bash
# The hook's CUDA checks, for a machine with a GPU (a few minutes): the CUDA tests (no
# host-device sync on steps that read nothing back, under
# torch.cuda.set_sync_debug_mode("error"); statistics through the pinned staging buffers
# with their values intact), then `lrctl bench cuda`: two GPTs' steps with the async hook
# against the same step without it, and the sync check again, as one report (Markdown on
# stdout; with LRCTL_GPU_OUT=DIR also DIR/cuda.md and DIR/cuda.json). Without CUDA the
# tests skip and the suite says so.
#
#   scripts/gpu_check.sh            # uses .venv if there is one, else python3
#   PYTHON=/path/to/python scripts/gpu_check.sh
#   scripts/gpu_check.sh --tb=long -rA   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ -n "${LRCTL_GPU_OUT:-}" ]; then
    OUTDIR=$LRCTL_GPU_OUT
    mkdir -p "$OUTDIR"
else
    OUTDIR=$(mktemp -d -t lrctl-gpu-XXXXXX)
    trap 'rm -rf "$OUTDIR"' EXIT
fi

"$PYTHON" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
PY

status=0
timeout 300 "$PYTHON" -m pytest -q -rs -n 0 -p no:randomly --timeout 240 \
    tests/daemon/test_cuda.py tests/daemon/test_cuda_hotpath.py "$@" || status=$?

echo "== lrctl bench cuda"
timeout 300 "$PYTHON" -m lrctl bench cuda --json "$OUTDIR/cuda.json" --out "$OUTDIR" \
    || status=$?  # (the Markdown goes to stdout and to $OUTDIR/cuda.md)
exit "$status"
