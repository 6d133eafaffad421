"""Runs in a subprocess on the backend named by KERAS_BACKEND, for tests/test_backends.py: one
process cannot switch Keras backends, and JAX fixes its device count when it starts.

    python tests/backend_worker.py parity WORKDIR MINILM_DIR
    python tests/backend_worker.py data_parallel WORKDIR DATA_DIR   (JAX with 2 devices)

Each task writes its results to WORKDIR/<task>-<backend>.npz; the test compares them.
"""

import json
import os
import pathlib
import sys

import numpy as np

TASKS = {}


def task(function):
    TASKS[function.__name__] = function
    return function


def backend():
    import keras

    return keras.backend.backend()


def write(workdir, name, **arrays):
    np.savez(pathlib.Path(workdir) / f"{name}-{backend()}.npz", **arrays)


def outputs(prediction, name):
    """{name_0: first output, ...}: a model with several outputs predicts a list."""
    prediction = prediction if isinstance(prediction, (list, tuple)) else [prediction]
    return {f"{name}_{i}": np.asarray(value) for i, value in enumerate(prediction)}


# ---------------------------------------------------------------------------------------------------
# The same checkpoints, and .keras files saved on other backends
# ---------------------------------------------------------------------------------------------------


def minilm_outputs(model, token_ids, segment_ids):
    import keras

    probe = keras.Model(model.inputs, [model.get_layer("Transformer-5-FeedForward-Norm").output,
                                       model.output])
    return probe.predict([token_ids, segment_ids], verbose=0)


@task
def parity(workdir, minilm_dir):
    """MiniLM from its safetensors (noting whether TensorFlow got imported), the tiny model
    from a Google checkpoint, the tiny .keras files of the other backends, and a .keras file of
    our own for them."""
    import keras

    from bert4k.models import build_transformer_model

    workdir, minilm_dir = pathlib.Path(workdir), pathlib.Path(minilm_dir)
    inputs = dict(np.load(workdir / "inputs.npz"))
    results = {}

    minilm = build_transformer_model(minilm_dir / "config.json", minilm_dir, with_pool=True)
    results["minilm_sequence"], results["minilm_pooled"] = minilm_outputs(
        minilm, inputs["minilm_token_ids"], inputs["minilm_segment_ids"])
    results["tensorflow_imported"] = "tensorflow" in sys.modules  # before anything below needs it

    tiny_inputs = [inputs["tiny_token_ids"], inputs["tiny_segment_ids"]]
    config = json.loads((workdir / "tiny_config.json").read_text())
    from_google = build_transformer_model(checkpoint_path=workdir / "tiny" / "bert_model.ckpt",
                                          **config)
    results.update(outputs(from_google.predict(tiny_inputs, verbose=0), "google"))

    for path in sorted(workdir.glob("saved-*.keras")):
        loaded = keras.models.load_model(path, safe_mode=True)
        results.update(outputs(loaded.predict(tiny_inputs, verbose=0),
                               f"loaded_{path.stem.split('-', 1)[1]}"))

    own = build_transformer_model(**config)  # this backend's own random initialisation
    results.update(outputs(own.predict(tiny_inputs, verbose=0), "own"))
    own.save(workdir / f"saved-{backend()}.keras")
    write(workdir, "parity", **results)


# ---------------------------------------------------------------------------------------------------
# keras.distribution.DataParallel on two (virtual CPU) devices against one device
# ---------------------------------------------------------------------------------------------------


def classifier(config, checkpoint_path=None):
    import keras

    from bert4k.models import build_transformer_model

    transformer = build_transformer_model(checkpoint_path=checkpoint_path, with_pool=True,
                                          return_keras_model=False, **config)
    output = keras.layers.Dense(2, activation="softmax", name="classifier")(transformer.model.output)
    return transformer, keras.Model(transformer.model.inputs, output)


class BatchLosses:
    """The loss of every batch (Keras logs the running mean of the epoch; this undoes it)."""

    def __init__(self):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(inner, epoch, logs=None):
                self.previous_mean, self.seen = 0.0, 0

            def on_train_batch_end(inner, batch, logs=None):
                mean = float(logs["loss"])
                self.losses.append(mean * (self.seen + 1) - self.previous_mean * self.seen)
                self.previous_mean, self.seen = mean, self.seen + 1

        self.losses = []
        self.callback = Callback()


def fine_tune(model, batches, initial_classifier):
    import keras

    model.get_layer("classifier").set_weights(initial_classifier)
    model.compile(keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    recorder = BatchLosses()
    model.fit((batch for batch in batches), steps_per_epoch=len(batches), epochs=1, verbose=0,
              shuffle=False,
              callbacks=[recorder.callback])
    first_kernel = model.trainable_variables[0]
    return np.array(recorder.losses), first_kernel, keras.ops.convert_to_numpy(first_kernel.value)


@task
def data_parallel(workdir, data_dir):
    """Fine-tune a tiny BERT classifier with `fit`, and pretrain with JaxTrainer, each on one
    device and under DataParallel on two, from the same initial weights and data (dropout off:
    the masks are drawn per device layout)."""
    import jax
    import keras

    from bert4k.checkpoints import save_weights_as_safetensors
    from bert4k.snippets import sequence_padding
    from pretraining import pretraining as pt

    workdir = pathlib.Path(workdir)
    devices = keras.distribution.list_devices()
    assert len(jax.devices()) == 2, jax.devices()
    config = json.loads((workdir / "tiny_config.json").read_text())
    config.update(dropout_rate=0.0, attention_dropout_rate=0.0)

    # Sentences of random length, labelled by whether token 7 occurs: learnable, and padded.
    rng = np.random.RandomState(0)
    batches = []
    for _ in range(8):
        ids = [list(rng.randint(1, config["vocab_size"], rng.randint(3, 20))) for _ in range(8)]
        ids = [[2] + sentence + [3] for sentence in ids]
        labels = np.array([[int(7 in sentence)] for sentence in ids])
        token_ids = sequence_padding(ids, length=24)
        batches.append(((token_ids, np.zeros_like(token_ids)), labels))

    keras.utils.set_random_seed(0)
    transformer, single = classifier(config)
    save_weights_as_safetensors(transformer, workdir / "initial.safetensors")
    initial_classifier = single.get_layer("classifier").get_weights()
    single_losses, _, single_kernel = fine_tune(single, batches, initial_classifier)

    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    # Built under the distribution, and loading a checkpoint into the replicated variables.
    _, parallel = classifier(config, workdir / "initial.safetensors")
    parallel_losses, kernel, parallel_kernel = fine_tune(parallel, batches, initial_classifier)
    replicated_on = len(kernel.value.sharding.device_set)
    keras.distribution.set_distribution(None)

    histories, sharded_on = {}, {}
    for name, distribution in [("one", None), ("two", "data_parallel")]:
        settings = pt.TrainingSettings(steps=4, batch_size=8, learning_rate=1e-3, log_every=1,
                                       checkpoint_every=4, shuffle_buffer=100)
        model = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
        trainer = pt.JaxTrainer(model, data_dir, str(workdir / f"pretrain-{name}"), settings,
                                distribution=distribution, verbose=0)
        batch = next(iter(trainer.dataset(0)))
        sharded_on[name] = len(batch["input_ids"].sharding.device_set) if distribution else 1
        histories[name] = np.array([record["loss"] for record in trainer.run()["history"]])

    write(workdir, "data_parallel", single_losses=single_losses, parallel_losses=parallel_losses,
          single_kernel=single_kernel, parallel_kernel=parallel_kernel,
          replicated_on=replicated_on, pretrain_one=histories["one"], pretrain_two=histories["two"],
          pretrain_batch_sharded_on=sharded_on["two"])


# ---------------------------------------------------------------------------------------------------
# Pretraining from given weights (the TensorFlow Trainer, as a reference for JaxTrainer)
# ---------------------------------------------------------------------------------------------------


PRETRAINING = dict(steps=4, batch_size=8, learning_rate=1e-3, grad_accum_steps=2, lamb=True,
                   log_every=1, shuffle_buffer=100, verbose=0)
PRETRAINING_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)


@task
def pretrain(workdir, data_dir, init_checkpoint):
    from pretraining import pretraining as pt

    result = pt.pretrain(PRETRAINING_MODEL, data_dir, str(pathlib.Path(workdir) / f"pretrain-{backend()}"),
                         init_checkpoint=init_checkpoint, **PRETRAINING)
    write(workdir, "pretrain", losses=np.array([record["loss"] for record in result["history"]]))


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    os.chdir(pathlib.Path(__file__).resolve().parents[1])
    TASKS[sys.argv[1]](*sys.argv[2:])
