#!/usr/bin/env bash
# The live demo: embedded Kafka-compatible broker + synthetic drifting stream + the real daemon.
# Sets up .venv on first use. Extra arguments go to the demo (e.g. --messages 50000).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup-venv.sh" test
cd "$root"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
exec python -m streamgmm.dev.demo "$@"
