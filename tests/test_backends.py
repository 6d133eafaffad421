"""The same bert4k on TensorFlow, JAX and PyTorch.

The backend this suite runs on is compared, in this process, with the other two, each run in a
subprocess (tests/backend_worker.py): one Keras process has one backend. The TensorFlow run does
the parity checks, the JAX run the JAX ones. Checked: the real MiniLM
from its safetensors gives the same outputs everywhere, without importing TensorFlow on JAX and
PyTorch; a Google checkpoint written here loads everywhere; a .keras file saved on any backend
loads and predicts identically on the others. And on JAX, fine-tuning with `fit` and pretraining
with JaxTrainer under keras.distribution.DataParallel on two (virtual CPU) devices follow the
one-device runs, and JaxTrainer follows the TensorFlow Trainer from the same weights.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from bert4k.checkpoints import save_weights_as_checkpoint
from bert4k.models import build_transformer_model
from conftest import TINY_CONFIG

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "backend_worker.py"
BACKENDS = ("tensorflow", "jax", "torch")
# What a backend's package is called when installed.
PACKAGES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
# Float32 on CPU, the same weights and inputs: the backends differ only in the order of their
# sums, far below this (the bar for "the same outputs").
TOLERANCE = 1e-4


def current():
    return keras.backend.backend()


def others():
    return [b for b in BACKENDS if b != current()]


def run_worker(backend, *arguments, env=None, timeout=600):
    missing = PACKAGES[backend]
    if importlib.util.find_spec(missing) is None:
        pytest.skip(f"{missing} is not installed: the {backend} backend cannot be compared")
    environment = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    result = subprocess.run([sys.executable, str(WORKER), *map(str, arguments)], env=environment,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{backend} worker failed:\n{result.stdout[-3000:]}\n"
                                    f"{result.stderr[-6000:]}")


def tiny_inputs():
    token_ids = np.array([[2, 17, 31, 44, 5, 3, 60, 61, 3, 0, 0, 0],
                          [2, 9, 99, 3, 0, 0, 0, 0, 0, 0, 0, 0]], "int32")
    segment_ids = np.array([[0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
                            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], "int32")
    return token_ids, segment_ids


def tiny_model_config(tiny_config):
    # Several of our layers and both heads, so the .keras round trip covers more than Dense:
    # UniLM attention bias, the pooler and the MLM head tied to the token embeddings.
    return dict(tiny_config, application="unilm", with_pool=True, with_mlm=True)


def outputs(prediction, name):
    prediction = prediction if isinstance(prediction, (list, tuple)) else [prediction]
    return {f"{name}_{i}": np.asarray(value) for i, value in enumerate(prediction)}


def minilm_outputs(model, reference):
    probe = keras.Model(model.inputs, [model.get_layer("Transformer-5-FeedForward-Norm").output,
                                       model.output])
    return probe.predict([reference["token_ids"], reference["segment_ids"]], verbose=0)


@pytest.fixture(scope="module")
def parity(minilm_dir, minilm_reference, tmp_path_factory):
    """Runs everything once: this backend's part here, the other two's in subprocesses.
    Returns {backend: {result name: array}}; the names are the worker's ('own_0' ... are the
    predictions of the tiny model saved as saved-<backend>.keras)."""
    workdir = tmp_path_factory.mktemp("backends")
    config = tiny_model_config(TINY_CONFIG)
    token_ids, segment_ids = tiny_inputs()
    np.savez(workdir / "inputs.npz", tiny_token_ids=token_ids, tiny_segment_ids=segment_ids,
             minilm_token_ids=minilm_reference["token_ids"],
             minilm_segment_ids=minilm_reference["segment_ids"])
    (workdir / "tiny_config.json").write_text(json.dumps(config))

    keras.utils.set_random_seed(7)
    here = build_transformer_model(**config)
    results = {current(): outputs(here.predict([token_ids, segment_ids], verbose=0), "own")}
    here.save(workdir / f"saved-{current()}.keras")
    # The Google checkpoint of this model: every backend loads it and must predict `own` here.
    save_weights_as_checkpoint(here, workdir / "tiny" / "bert_model.ckpt")

    for backend in others():
        run_worker(backend, "parity", workdir, minilm_dir)
        results[backend] = dict(np.load(workdir / f"parity-{backend}.npz"))

    minilm = build_transformer_model(minilm_dir / "config.json", minilm_dir, with_pool=True)
    sequence, pooled = minilm_outputs(minilm, minilm_reference)
    results[current()].update(minilm_sequence=sequence, minilm_pooled=pooled)
    for backend in others():  # the other backends' .keras files, loaded here
        loaded = keras.models.load_model(workdir / f"saved-{backend}.keras", safe_mode=True)
        results[current()].update(outputs(loaded.predict([token_ids, segment_ids], verbose=0),
                                          f"loaded_{backend}"))
    return results


# The parity checks start the two other backends in subprocesses; once per CI run is enough,
# from the default (TensorFlow) run. The code compares whichever backend runs here.
default_run_only = pytest.mark.backends(
    "tensorflow", reason="compares the three backends in subprocesses; runs once, in the "
                         "TensorFlow (default) suite")


def max_difference(a, b):
    return float(np.max(np.abs(np.asarray(a, "float64") - np.asarray(b, "float64"))))


@pytest.mark.slow
@default_run_only
def test_minilm_gives_the_same_outputs_on_every_backend(parity, minilm_reference):
    real = minilm_reference["token_ids"] != 0
    here = parity[current()]
    for backend in others():
        there = parity[backend]
        # Real tokens within the bar; padded positions (whose outputs nobody uses) within 1e-3,
        # as against transformers in test_checkpoints.
        assert max_difference(here["minilm_sequence"][real], there["minilm_sequence"][real]) <= TOLERANCE
        assert max_difference(here["minilm_sequence"], there["minilm_sequence"]) <= 1e-3
        assert max_difference(here["minilm_pooled"], there["minilm_pooled"]) <= TOLERANCE


@pytest.mark.slow
@default_run_only
def test_safetensors_loading_does_not_import_tensorflow(parity):
    for backend in others():
        if backend != "tensorflow":
            assert not parity[backend]["tensorflow_imported"], (
                f"loading a safetensors checkpoint on {backend} imported TensorFlow")


@pytest.mark.slow
@default_run_only
def test_a_google_checkpoint_loads_on_every_backend(parity):
    here = parity[current()]
    for backend in others():
        own = sorted(name for name in here if name.startswith("own_"))
        assert len(own) == 2  # the pooled [CLS] and the MLM probabilities
        for name in own:
            google = "google_" + name.split("_")[1]
            assert max_difference(parity[backend][google], here[name]) <= TOLERANCE, (backend, name)


@pytest.mark.slow
@default_run_only
def test_keras_files_load_and_predict_identically_across_backends(parity):
    checked = set()
    for loader, results in parity.items():
        for key in results:
            if not key.startswith("loaded_"):
                continue
            saver, index = key[len("loaded_"):].rsplit("_", 1)
            assert max_difference(results[key], parity[saver][f"own_{index}"]) <= TOLERANCE, (
                f"saved on {saver}, loaded on {loader}, output {index}")
            checked.add((saver, loader))
    # Everything saved here loads there and the other way round, at least.
    assert {(current(), b) for b in others()} | {(b, current()) for b in others()} <= checked


# ---------------------------------------------------------------------------------------------------
# keras.distribution.DataParallel on JAX
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretraining_data(tmp_path_factory):
    """Google MLM + NSP pairs of 32 tokens from 300 reviews of the bundled corpus."""
    from bert4k import assets
    from pretraining import data_utils

    workdir = tmp_path_factory.mktemp("pretraining_data")
    corpus = workdir / "reviews.txt"
    corpus.write_text("".join(text.strip() + "\n"
                              for text, _ in assets.read_sentiment("train", limit=300)),
                      encoding="utf-8")
    data_utils.prepare([str(corpus)], str(workdir / "data"), objective="mlm_nsp",
                       max_seq_length=32, max_predictions_per_seq=5, min_count=2, workers=1,
                       verbose=0)
    return workdir / "data"


@pytest.fixture(scope="module")
def data_parallel(pretraining_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("data_parallel")
    (workdir / "tiny_config.json").write_text(json.dumps(TINY_CONFIG))
    # Two virtual CPU devices: XLA reads the flag when JAX starts, hence the subprocess.
    run_worker("jax", "data_parallel", workdir, pretraining_data,
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    return dict(np.load(workdir / "data_parallel-jax.npz"))


# These start their own processes and compare JAX with something; once per CI run is enough,
# and the JAX run is where they belong.
jax_run_only = pytest.mark.backends(
    "jax", reason="a JAX check that starts its own processes; runs in the JAX suite")


@pytest.mark.slow
@jax_run_only
def test_fine_tuning_under_data_parallel_follows_one_device(data_parallel):
    assert int(data_parallel["replicated_on"]) == 2  # the weights live on both devices
    single, parallel = data_parallel["single_losses"], data_parallel["parallel_losses"]
    assert len(single) == len(parallel) == 8
    assert single[-1] < single[0]  # it learns
    # The same arithmetic, the batch sums split in two: float32 rounding only, through 8 Adam
    # steps.
    np.testing.assert_allclose(parallel, single, rtol=0, atol=1e-4)
    np.testing.assert_allclose(data_parallel["parallel_kernel"], data_parallel["single_kernel"],
                               rtol=0, atol=1e-4)


@pytest.mark.slow
@jax_run_only
def test_pretraining_under_data_parallel_follows_one_device(data_parallel):
    assert int(data_parallel["pretrain_batch_sharded_on"]) == 2  # each device reads half a batch
    one, two = data_parallel["pretrain_one"], data_parallel["pretrain_two"]
    assert len(one) == len(two) == 4
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)


@pytest.mark.slow
@jax_run_only
def test_jax_pretraining_follows_the_tensorflow_trainer(pretraining_data, tmp_path):
    """JaxTrainer against the independent TensorFlow Trainer (tf.GradientTape, tf.distribute),
    from the same weights, on the same data: Adam with weight decay, LAMB and gradient
    accumulation over two micro-batches, dropout off."""
    import backend_worker
    from bert4k.checkpoints import save_weights_as_safetensors
    from pretraining import data_utils
    from pretraining import pretraining as pt

    info = data_utils.read_info(str(pretraining_data))
    config = pt.model_config(backend_worker.PRETRAINING_MODEL, info["vocab_size"],
                             info["settings"].max_seq_length)
    transformer, _ = pt.build_models(config, pt.MaskedLMWithNSP())
    initial = tmp_path / "initial.safetensors"
    save_weights_as_safetensors(transformer, initial)

    run_worker("tensorflow", "pretrain", tmp_path, pretraining_data, initial)
    backend_worker.pretrain(tmp_path, pretraining_data, initial)  # here, on JAX
    tensorflow = np.load(tmp_path / "pretrain-tensorflow.npz")["losses"]
    jax = np.load(tmp_path / "pretrain-jax.npz")["losses"]
    assert len(jax) == len(tensorflow) == backend_worker.PRETRAINING["steps"]
    # float32, the same sums in other orders
    np.testing.assert_allclose(jax, tensorflow, rtol=0, atol=1e-5)

