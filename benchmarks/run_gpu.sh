#!/usr/bin/env bash
# The GPU sweep in one command: install the GPU extra, check that JAX sees a GPU, then run
# benchmarks/grad_strategies.py on it (about 8 minutes on one recent GPU) and
# benchmarks/scaling.py (DP-SGD step vs the GPUs present, streaming vs table size). Writes
# benchmarks/results/grad_strategies_gpu.{json,md}, grad_strategies_gpu_{time,memory}.png and
# scaling_gpu.{json,md,png} with the device kind recorded. Extra arguments go to
# grad_strategies.py, e.g.
#   bash benchmarks/run_gpu.sh --quick        # -> grad_strategies_gpu_quick.*
# SCALING_ARGS goes to scaling.py (default: devices 1 2 4 8, as many as exist; 0.1M and 1M rows).
# PYTHON selects the interpreter (default: python on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -m pip install -q -e ".[gpu]"; then
  echo "run_gpu.sh: installing the GPU extra failed; going on with the JAX that is installed" >&2
fi

if ! "$PYTHON" - <<'PY'
import sys

import jax

try:
    gpus = jax.devices("gpu")
except RuntimeError as err:
    sys.exit(f"run_gpu.sh: JAX has no GPU backend ({err})")
print(f"run_gpu.sh: {len(gpus)} GPU(s); benchmarking on {gpus[0].device_kind}", file=sys.stderr)
PY
then
  echo "run_gpu.sh: no GPU found, so the GPU sweep was not run and nothing was written." >&2
  echo "run_gpu.sh: the CPU sweep is: python benchmarks/grad_strategies.py  (or --quick)" >&2
  exit 1
fi

# Workers then allocate only what they use, one at a time; peak_bytes_in_use is per process either way.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
"$PYTHON" benchmarks/grad_strategies.py --device gpu "$@"
# shellcheck disable=SC2086
"$PYTHON" benchmarks/scaling.py --platform gpu ${SCALING_ARGS:---devices 1 2 4 8 --stream-rows 100000 1000000}
