#!/usr/bin/env bash
# The test suite once per Keras backend: TensorFlow (the default), then JAX, then PyTorch, from
# the project's .venv (installed with '.[tensorflow-cpu,jax,torch-cpu,dev]', see README).
# Tests that only make sense on some backends are skipped on the others, with the reason listed.
#
# Usage: scripts/test_backends.sh [pytest arguments]   e.g. -x, -k name, tests/test_models.py
# BACKENDS="jax torch" picks the backends; PYTHON the interpreter (default .venv/bin/python).
# Every backend runs even when one fails, so one CI run shows all the failures; the exit status
# is that of the worst run.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
status=0
summary=""
for backend in ${BACKENDS:-tensorflow jax torch}; do
    echo "=== KERAS_BACKEND=$backend"
    started=$SECONDS
    KERAS_BACKEND=$backend "$PYTHON" -m pytest "$@"
    code=$?
    summary+="KERAS_BACKEND=$backend: exit $code in $((SECONDS - started)) s"$'\n'
    if [ "$code" -gt "$status" ]; then status=$code; fi
done
printf '%s' "$summary"
exit "$status"
