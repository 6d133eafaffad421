#!/usr/bin/env bash
# Create the peer environments scripts/benchmark.py compares bert4k against, under .bench/
# (gitignored). Each peer gets its own virtual environment so their pins do not fight:
#
#   .bench/keras-hub   keras-hub + keras + tensorflow-cpu           keras-hub's BertBackbone
#   .bench/bert4keras  bert4keras 0.11.5 + tf-keras + tensorflow-cpu   the original (TF_USE_LEGACY_KERAS=1)
#   .bench/torch       torch 2.13.0 (CPU) + transformers + keras + bert4k (editable)
#                      -> transformers' BertModel / tokenizers, and bert4k on the PyTorch backend
#   .bench/jax         jax[cpu] + keras + bert4k (editable)         bert4k on the JAX backend
#
# bert4k on TensorFlow runs from the project's own .venv (see README "Set up").
# Usage: bash scripts/benchmark_envs.sh [keras-hub bert4keras torch jax]   (default: all)
# Each environment is skipped when it already imports; a failed one is reported, not fatal.
# torch is pinned to 2.13.0: an unpinned `pip install torch` pulls a multi-GB CUDA build.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
TF_VERSION=${TF_VERSION:-2.21.0}
KERAS_VERSION=${KERAS_VERSION:-3.15.1}
mkdir -p .bench
wanted=${*:-keras-hub bert4keras torch jax}
status=0

make_env() {  # name, import check, pip arguments...
    local name=$1 check=$2
    shift 2
    local env=.bench/$name
    if [ -x "$env/bin/python" ] && "$env/bin/python" -c "$check" >/dev/null 2>&1; then
        echo "[$name] ready"
        return 0
    fi
    echo "[$name] creating $env"
    "$PY" -m venv "$env" || return 1
    "$env/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
    if ! "$env/bin/pip" install -q "$@" > "$env/install.log" 2>&1; then
        echo "[$name] pip install failed, see $env/install.log:"; grep -v WARNING "$env/install.log" | tail -5
        return 1
    fi
    if [ -n "${NO_DEPS:-}" ] && ! "$env/bin/pip" install -q --no-deps $NO_DEPS >> "$env/install.log" 2>&1; then
        echo "[$name] pip install --no-deps $NO_DEPS failed, see $env/install.log"
        return 1
    fi
    if ! "$env/bin/python" -c "$check" > "$env/check.log" 2>&1; then
        echo "[$name] installed but does not import, see $env/check.log:"; tail -5 "$env/check.log"
        return 1
    fi
    echo "[$name] ready"
}

for name in $wanted; do
    case $name in
    keras-hub)
        make_env keras-hub "import keras_hub, tensorflow" \
            keras-hub "keras==$KERAS_VERSION" "tensorflow-cpu==$TF_VERSION" safetensors || status=1 ;;
    bert4keras)
        # bert4keras 0.11.5 is Keras 2 code: it runs on tf.keras with TF_KERAS=1, and
        # TF_USE_LEGACY_KERAS=1 makes tf.keras the Keras 2 package tf-keras (same version as TF).
        # Its metadata requires keras<=2.3.1, which TensorFlow 2.21 (keras>=3) rules out, and which
        # TF_KERAS=1 never imports: install it with --no-deps. distutils comes from setuptools.
        NO_DEPS=bert4keras==0.11.5 make_env bert4keras \
            "import os; os.environ['TF_KERAS']='1'; os.environ['TF_USE_LEGACY_KERAS']='1'; import bert4keras.models" \
            "tf-keras==$TF_VERSION" "tensorflow-cpu==$TF_VERSION" safetensors setuptools || status=1 ;;
    torch)
        make_env torch "import os; os.environ['KERAS_BACKEND']='torch'; import torch, transformers, keras, bert4k" \
            torch==2.13.0 transformers tokenizers "keras==$KERAS_VERSION" -e "$ROOT" || status=1 ;;
    jax)
        make_env jax "import os; os.environ['KERAS_BACKEND']='jax'; import jax, keras, bert4k" \
            "jax[cpu]" "keras==$KERAS_VERSION" -e "$ROOT" || status=1 ;;
    *) echo "unknown environment $name (expected keras-hub bert4keras torch jax)"; status=1 ;;
    esac
done
exit $status
