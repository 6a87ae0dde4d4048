#!/usr/bin/env bash
# Run the whole test suite in the project's own virtualenv (created on first use).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup-venv.sh" test
cd "$root"
# One BLAS thread: the suite's numerics are then deterministic and CI's 2 cores are not oversubscribed.
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
# Two workers (STREAMGMM_TEST_WORKERS to change; 0 runs in this process): each starts its own
# broker, and the integration tests mostly wait on it and on the daemons they start.
exec python -m pytest -q -n "${STREAMGMM_TEST_WORKERS:-2}" "$@"
