"""A fine-tuned model's weights as bert4keras (0.11, on tf.keras 2) saves them, and its outputs,
for tests/test_checkpoints.py: bert4k must read such weights into the same model built in bert4k.

The model is what bert4keras's examples build: a small BERT with a classifier on [CLS] and a CRF
tagger on every token, saved with `model.save_weights('best_model.weights')` (TensorFlow's
object checkpoint: best_model.weights.index and .data-00000-of-00001), and in Keras 2's HDF5
layout (best_model.h5, as Keras 2.3 on TensorFlow 1 wrote any name). Every weight is random
(fixed seed, LayerNorm and biases included). Run in bert4keras's environment
(`bash scripts/benchmark_envs.sh bert4keras` builds one under .bench/bert4keras):

    TF_KERAS=1 TF_USE_LEGACY_KERAS=1 .bench/bert4keras/bin/python scripts/make_bert4keras_reference.py
"""

import json
import os

import numpy as np
from bert4keras.backend import keras
from bert4keras.layers import ConditionalRandomField
from bert4keras.models import build_transformer_model

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "bert4keras")
CONFIG = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, hidden_act="gelu", max_position_embeddings=64,
              type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build():
    config_path = os.path.join(OUT, "bert_config.json")
    with open(config_path, "w") as f:
        json.dump(CONFIG, f, indent=2)
    bert = build_transformer_model(config_path, return_keras_model=False)
    cls = keras.layers.Lambda(lambda x: x[:, 0], name="CLS-token")(bert.model.output)
    label = keras.layers.Dense(3, activation="softmax", name="Classifier")(cls)
    tags = keras.layers.Dense(5, name="Tagger")(bert.model.output)
    tags = ConditionalRandomField(lr_multiplier=100, name="CRF")(tags)
    return keras.models.Model(bert.model.input, [label, tags])


def main():
    os.makedirs(OUT, exist_ok=True)
    model = build()
    rng = np.random.default_rng(0)
    for weight in model.weights:
        value = rng.normal(0, 0.3, weight.shape) + (1.0 if "gamma" in weight.name else 0.0)
        weight.assign(value.astype("float32"))
    model.save_weights(os.path.join(OUT, "best_model.weights"))
    os.remove(os.path.join(OUT, "checkpoint"))  # TensorFlow's state file, with this machine's path
    model.save_weights(os.path.join(OUT, "best_model.h5"))  # Keras 2's HDF5, as Keras 2.3 wrote
    token_ids = rng.integers(5, 50, size=(2, 10))
    token_ids[0, 7:] = 0
    segment_ids = np.zeros_like(token_ids)
    segment_ids[:, 5:] = 1
    segment_ids[0, 7:] = 0
    label, tags = model.predict([token_ids, segment_ids])
    np.savez(os.path.join(OUT, "expected.npz"), token_ids=token_ids, segment_ids=segment_ids,
             label=label, tags=tags, trans=model.get_layer("CRF").trans.numpy())
    print(sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
