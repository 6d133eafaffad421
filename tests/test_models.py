"""The BERT builder: heads, attention masks, activations, name sharing, serialization, bad input.

Expectations are closed forms (NumPy), brute-force comparisons, or properties of the maths
(a causal model cannot see the future), never the model's own recorded outputs.
"""

import json
import math

import keras
import numpy as np
import pytest

from bert4k import backend as K
from bert4k.models import build_transformer_model


def random_batch(batch=3, length=10, vocab=120, pad_tail=True, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(batch, length)).astype("int32")
    segments = np.zeros_like(ids)
    segments[:, length // 2:] = 1
    if pad_tail:
        ids[0, -3:] = 0
        segments[0, -3:] = 0
    return ids, segments


def layer_output(model, name, inputs):
    probe = keras.Model(model.inputs, model.get_layer(name).output)
    return keras.ops.convert_to_numpy(probe(inputs))


# -- heads -------------------------------------------------------------------------------------


def test_default_output_is_the_sequence(tiny_config):
    model = build_transformer_model(**tiny_config)
    ids, segments = random_batch()
    out = model.predict([ids, segments], verbose=0)
    assert out.shape == (3, 10, tiny_config["hidden_size"])


def test_pooler_nsp_and_mlm_heads_match_closed_form(tiny_config):
    model = build_transformer_model(with_nsp=True, with_mlm=True, **tiny_config)
    ids, segments = random_batch()
    nsp, mlm = model.predict([ids, segments], verbose=0)
    sequence = layer_output(model, "Transformer-1-FeedForward-Norm", [ids, segments])

    w_pool, b_pool = model.get_layer("Pooler-Dense").get_weights()
    w_nsp, b_nsp = model.get_layer("NSP-Proba").get_weights()
    pooled = np.tanh(sequence[:, 0] @ w_pool + b_pool)
    np.testing.assert_allclose(nsp, softmax(pooled @ w_nsp + b_nsp), atol=1e-5)

    w_mlm, b_mlm = model.get_layer("MLM-Dense").get_weights()
    gamma, beta = model.get_layer("MLM-Norm").get_weights()
    table = model.get_layer("Embedding-Token").get_weights()[0]
    (bias,) = model.get_layer("MLM-Bias").get_weights()
    h = gelu_erf(sequence @ w_mlm + b_mlm)
    h = layer_norm(h, gamma, beta)
    np.testing.assert_allclose(mlm, softmax(h @ table.T + bias), atol=1e-5)


def test_with_pool_activation_and_linear_mlm(tiny_config):
    model = build_transformer_model(with_pool="linear", with_mlm="linear", **tiny_config)
    ids, segments = random_batch()
    pooled, logits = model.predict([ids, segments], verbose=0)
    sequence = layer_output(model, "Transformer-1-FeedForward-Norm", [ids, segments])
    w_pool, b_pool = model.get_layer("Pooler-Dense").get_weights()
    np.testing.assert_allclose(pooled, sequence[:, 0] @ w_pool + b_pool, atol=1e-5)
    assert not np.allclose(logits.sum(-1), 1.0)  # logits, not probabilities


@pytest.mark.parametrize("family", ["bert", "albert", "nezha"])
def test_pooled_only_model_runs_its_last_block_at_the_first_position(tiny_config, family):
    """With the pooler as its only output, the model runs its last block for [CLS] alone (NEZHA,
    whose relative positions enter attention, runs it whole): the pooled output is still the
    closed form of the first position of the whole-sequence model with the same weights."""
    model = build_transformer_model(model=family, with_pool=True, **tiny_config)
    whole = build_transformer_model(model=family, **tiny_config)
    for layer in whole.layers:
        layer.set_weights(model.get_layer(layer.name).get_weights())
    ids, segments = random_batch()
    pooled = model.predict([ids, segments], verbose=0)
    sequence = whole.predict([ids, segments], verbose=0)
    w_pool, b_pool = model.get_layer("Pooler-Dense").get_weights()
    np.testing.assert_allclose(pooled, np.tanh(sequence[:, 0] @ w_pool + b_pool), atol=1e-5)
    first_only = any(layer.name.endswith("-First-Position") for layer in model.layers)
    assert first_only == (family != "nezha")
    hidden = tiny_config["hidden_size"]
    assert tuple(model.get_layer("Pooler").input.shape[1:]) == ((1,) if first_only else (None,)) + (hidden,)
    if family == "bert":  # a layer's output is its first call's: the whole sequence, as before
        np.testing.assert_allclose(
            layer_output(model, "Transformer-1-FeedForward-Norm", [ids, segments]), sequence, atol=1e-6)


def test_mlm_output_is_tied_to_token_embeddings(tiny_config):
    model = build_transformer_model(with_mlm=True, **tiny_config)
    embedding = model.get_layer("Embedding-Token")
    # The same layer object serves input embeddings and the output projection: one table.
    nodes = embedding._inbound_nodes
    assert len(nodes) == 2
    names = [w.path for w in model.weights]
    assert names.count("Embedding-Token/embeddings") == 1


def test_prefix_gives_two_independent_models(tiny_config):
    a = build_transformer_model(prefix="A-", **tiny_config)
    b = build_transformer_model(prefix="B-", **tiny_config)
    assert a.get_layer("A-Embedding-Token") is not b.get_layer("B-Embedding-Token")
    assert all(w.path.startswith("A-") for w in a.weights)


# -- attention masks ---------------------------------------------------------------------------


def test_padding_does_not_change_real_positions(tiny_config):
    model = build_transformer_model(**tiny_config)
    ids, segments = random_batch(batch=1, pad_tail=False)
    padded_ids = np.concatenate([ids, np.zeros((1, 5), "int32")], axis=1)
    padded_segments = np.concatenate([segments, np.zeros((1, 5), "int32")], axis=1)
    plain = model.predict([ids, segments], verbose=0)
    padded = model.predict([padded_ids, padded_segments], verbose=0)
    np.testing.assert_allclose(padded[:, : ids.shape[1]], plain, atol=1e-5)


def test_lm_application_cannot_see_the_future(tiny_config):
    model = build_transformer_model(application="lm", **tiny_config)
    ids, segments = random_batch(batch=1, pad_tail=False)
    changed = ids.copy()
    changed[0, 6:] = (changed[0, 6:] + 7) % 100 + 5
    a = model.predict([ids, segments], verbose=0)
    b = model.predict([changed, segments], verbose=0)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-5)
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


def test_unilm_application_source_is_bidirectional_target_is_causal(tiny_config):
    model = build_transformer_model(application="unilm", **tiny_config)
    ids, segments = random_batch(batch=1, length=10, pad_tail=False)  # source 0..4, target 5..9
    out = model.predict([ids, segments], verbose=0)

    changed_target = ids.copy()
    changed_target[0, 8:] = 7
    b = model.predict([changed_target, segments], verbose=0)
    np.testing.assert_allclose(out[:, :8], b[:, :8], atol=1e-5)  # nobody before 8 sees 8, 9

    changed_source = ids.copy()
    changed_source[0, 4] = 9
    c = model.predict([changed_source, segments], verbose=0)
    assert np.abs(out[:, :4] - c[:, :4]).max() > 1e-3  # source positions see all the source
    assert np.abs(out[:, 9] - c[:, 9]).max() > 1e-3  # and the target sees the source


def test_attention_bias_helpers_match_brute_force():
    segments = np.array([[0, 0, 0, 1, 1, 1]])
    bias = keras.ops.convert_to_numpy(K.unilm_bias(segments))[0, 0]
    expected = np.array(
        [[0.0 if (k < 3 or (q >= 3 and k <= q)) else K.MASK_BIAS for k in range(6)]
         for q in range(6)]
    )
    np.testing.assert_array_equal(bias, expected)
    causal = keras.ops.convert_to_numpy(K.causal_bias(4))[0, 0]
    np.testing.assert_array_equal(causal != 0, np.triu(np.ones((4, 4)), k=1) > 0)


# -- activations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gelu", lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))),
        ("gelu_new", lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi)
                                                      * (x + 0.044715 * x**3)))),
        ("relu", lambda x: np.maximum(x, 0)),
        ("swish", lambda x: x / (1 + np.exp(-x))),
    ],
)
def test_activations_match_closed_forms(name, expected):
    x = np.linspace(-5, 5, 101).astype("float32")
    got = keras.ops.convert_to_numpy(K.get_activation(name)(keras.ops.convert_to_tensor(x)))
    np.testing.assert_allclose(got, expected(x), atol=1e-6)


def test_hidden_act_from_config_is_used(tiny_config):
    tiny_config["hidden_act"] = "relu"
    model = build_transformer_model(**tiny_config)
    ff = model.get_layer("Transformer-0-FeedForward")
    x = np.random.default_rng(0).normal(size=(2, 3, 32)).astype("float32")
    (w1, b1), (w2, b2) = ff.i0_dense.get_weights(), ff.o_dense.get_weights()
    got = keras.ops.convert_to_numpy(ff(x))  # a torch tensor that requires grad, on torch
    np.testing.assert_allclose(got, np.maximum(x @ w1 + b1, 0) @ w2 + b2, atol=1e-5)


# -- serialization ----------------------------------------------------------------------------


@pytest.mark.parametrize("application", ["encoder", "lm", "unilm"])
def test_keras_save_and_safe_load_give_identical_outputs(tiny_config, tmp_path, application):
    model = build_transformer_model(
        application=application, with_nsp=True, with_mlm=True, dropout_rate=0.1,
        attention_dropout_rate=0.1, **tiny_config
    )
    ids, segments = random_batch()
    before = model.predict([ids, segments], verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    after = loaded.predict([ids, segments], verbose=0)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in loaded.layers)


def test_pooled_only_model_saves_and_loads_with_identical_outputs(tiny_config, tmp_path):
    """The last block's whole-sequence call, which the model does not run, is not saved: the
    loaded model runs the first-position call and gives the same pooled output."""
    model = build_transformer_model(with_pool=True, dropout_rate=0.1, **tiny_config)
    ids, segments = random_batch()
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(model.predict([ids, segments], verbose=0),
                                  loaded.predict([ids, segments], verbose=0))
    assert "Transformer-1-First-Position" in [layer.name for layer in loaded.layers]


def test_every_layer_round_trips_its_config(tiny_config):
    model = build_transformer_model(with_nsp=True, with_mlm=True, **tiny_config)
    for layer in model.layers:
        config = keras.saving.serialize_keras_object(layer)
        clone = keras.saving.deserialize_keras_object(config, safe_mode=True)
        assert type(clone) is type(layer)
        assert clone.get_config() == layer.get_config()


def test_model_trains(tiny_config):
    base = build_transformer_model(with_pool=True, **tiny_config)
    output = keras.layers.Dense(2, activation="softmax")(base.output)
    model = keras.Model(base.inputs, output)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    ids, segments = random_batch(batch=16, seed=1)
    labels = (ids[:, 1] > 60).astype("int32")
    history = model.fit([ids, segments], labels, epochs=15, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]


# -- bad input --------------------------------------------------------------------------------


def test_unknown_keyword_is_an_error(tiny_config):
    with pytest.raises(TypeError, match="hiden_size"):
        build_transformer_model(hiden_size=3, **tiny_config)


def test_unknown_config_key_is_an_error(tiny_config, tmp_path):
    config = dict(tiny_config, max_position_embeddings=64, unknown_setting=1)
    config.pop("max_position")
    path = tmp_path / "bert_config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(TypeError, match="unknown_setting"):
        build_transformer_model(path)


def test_missing_and_malformed_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        build_transformer_model(tmp_path / "nowhere.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"hidden_size": 32,')
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        build_transformer_model(bad)


def test_missing_required_setting_names_it(tiny_config):
    tiny_config.pop("vocab_size")
    with pytest.raises(ValueError, match="vocab_size"):
        build_transformer_model(**tiny_config)


def test_unknown_model_and_application(tiny_config):
    with pytest.raises(ValueError, match="Unknown model 'bart'"):
        build_transformer_model(model="bart", **tiny_config)
    with pytest.raises(ValueError, match="Unknown application 'decoder'"):
        build_transformer_model(application="decoder", **tiny_config)


def test_config_of_another_family_is_refused(tiny_config, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "albert", **tiny_config}))
    with pytest.raises(ValueError, match="'albert' model.*model='albert'"):
        build_transformer_model(path)


def test_sequence_longer_than_max_position(tiny_config):
    model = build_transformer_model(**tiny_config)
    ids = np.ones((1, 65), "int32")
    # The direct call first: on JAX, an error raised while `predict` traces leaves the model's
    # weights detached (Keras's JAX trainer takes them out of the variables before tracing and
    # puts them back only when the loop ends), so nothing can run on that model afterwards.
    with pytest.raises(ValueError, match="max_position"):
        model([ids, np.zeros_like(ids)])
    with pytest.raises(ValueError, match="65 exceeds max_position=64"):
        model.predict([ids, np.zeros_like(ids)], verbose=0)


# -- NumPy references ---------------------------------------------------------------------------


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def gelu_erf(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def layer_norm(x, gamma, beta, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta
