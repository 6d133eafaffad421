"""The fast paths: fused attention (keras.ops.dot_product_attention) against the explicit matmuls
and a NumPy reference, attention dropout in training, dropout's masks, bf16 against float32 and
transformers' outputs on the real MiniLM, bucketed padding, projections as single matmuls, Adam's
fused kernel.
Speed itself is measured by scripts/benchmark.py, never here."""

import math
import sys
import time

import keras
import numpy as np
import pytest

from bert4k import backend as K
from bert4k import layers as L
from bert4k.models import build_transformer_model
from bert4k.snippets import bucket_length, sequence_padding

numpy = keras.ops.convert_to_numpy  # tensors of any backend (torch's may require grad)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of keras.ops.dot_product_attention (the layers look it up at call time)."""
    calls = []
    original = keras.ops.dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("scale"))
        return original(*args, **kwargs)

    monkeypatch.setattr(keras.ops, "dot_product_attention", counting)
    return calls


# -- a NumPy reference of one attention layer -----------------------------------------------------


def numpy_attention(layer, q, k, v, bias, scale=True):
    """softmax(q Wq (k Wk)^T / sqrt(d) + bias) v Wv, then Wo: written out per head and query."""
    def dense(x, sub):
        kernel, bias_ = (numpy(w) for w in sub.weights)
        return x @ kernel + bias_

    heads, size = layer.heads, layer.head_size
    qw, kw, vw = dense(q, layer.q_dense), dense(k, layer.k_dense), dense(v, layer.v_dense)
    batch, q_len, _ = q.shape
    out = np.zeros((batch, q_len, heads * size))
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * size, (h + 1) * size)
            logits = qw[b, :, cols] @ kw[b, :, cols].T
            if scale:
                logits = logits / math.sqrt(size)
            logits = logits + np.broadcast_to(bias[b if bias.shape[0] > 1 else 0, 0],
                                              logits.shape)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[b, :, cols] = probs @ vw[b, :, cols]
    return dense(out, layer.o_dense)


def attention_biases(rng, batch=3, length=7):
    """Padding, causal and UniLM biases of some token ids with padding at the end."""
    ids = rng.integers(1, 50, size=(batch, length))
    ids[0, 5:] = 0
    ids[1, 3:] = 0
    segments = np.zeros_like(ids)
    segments[:, 2:] = 1
    segments[ids == 0] = 0
    return {
        "padding": numpy(K.padding_bias(ids)),
        "causal": numpy(K.padding_bias(ids) + K.causal_bias(length)),
        "unilm": numpy(K.padding_bias(ids) + K.unilm_bias(segments)),
    }


@pytest.mark.parametrize("mask", ["padding", "causal", "unilm"])
def test_fused_and_explicit_attention_match_numpy(mask, fused_calls):
    rng = np.random.default_rng(0)
    bias = attention_biases(rng)[mask]
    q, k, v = (rng.standard_normal((3, 7, 32)).astype("float32") for _ in range(3))
    outputs = {}
    for implementation in ("fused", "explicit"):
        keras.utils.set_random_seed(3)
        layer = L.MultiHeadAttention(heads=4, head_size=8, attention_implementation=implementation)
        outputs[implementation] = numpy(layer([q, k, v], bias=bias))
    assert len(fused_calls) == 1  # the fused layer took the fused path, the explicit one did not
    expected = numpy_attention(layer, q, k, v, bias)
    np.testing.assert_allclose(outputs["explicit"], expected, atol=1e-5)
    np.testing.assert_allclose(outputs["fused"], expected, atol=1e-5)


CASES = [  # (model, application, extra settings): every mask, position scheme and norm placement
    ("bert", "encoder", {}),
    ("bert", "lm", {}),
    ("bert", "unilm", {}),
    ("roformer", "encoder", {}),  # rotary positions, applied before the fused op
    ("gpt2", "lm", {}),
    ("t5_encoder", None, {}),  # T5: unscaled logits, position bias joins the mask bias
    ("t5_decoder", None, {}),
    ("bert", "encoder", dict(attention_head_size=16)),  # heads * size != hidden
]


def model_inputs(model, rng, batch=3, length=9, hidden=32):
    ids = rng.integers(1, 120, size=(batch, length)).astype("int32")
    ids[0, 6:] = 0
    ids[2, 4:] = 0
    segments = np.zeros_like(ids)
    segments[:, 3:] = 1
    segments[ids == 0] = 0
    if model in ("gpt2", "t5_encoder"):
        return [ids]
    if model == "t5_decoder":
        context = rng.standard_normal((batch, length, hidden)).astype("float32")
        context[1, 5:] = 0  # a padded encoder output
        return [context, ids]
    return [ids, segments]


@pytest.mark.parametrize("model,application,extra", CASES,
                         ids=[f"{m}-{a}-{len(e)}" for m, a, e in CASES])
def test_fused_model_matches_explicit_model(tiny_config, model, application, extra, fused_calls):
    config = dict(tiny_config, **extra)
    if model.startswith("t5"):
        config.pop("segment_vocab_size")
    inputs = model_inputs(model, np.random.default_rng(1))
    outputs = {}
    for implementation in ("explicit", "fused"):
        keras.utils.set_random_seed(5)
        built = build_transformer_model(model=model, application=application,
                                        attention_implementation=implementation, **config)
        outputs[implementation] = numpy(built(inputs))
    assert len(fused_calls) >= config["num_hidden_layers"]
    np.testing.assert_allclose(outputs["fused"], outputs["explicit"], atol=1e-5)


@pytest.mark.parametrize("model,settings", [("nezha", {}),
                                            ("bert", dict(residual_attention_scores=True))])
def test_attention_needing_logits_or_relative_values_stays_explicit(tiny_config, model, settings,
                                                                    fused_calls):
    ids = np.random.default_rng(2).integers(1, 120, size=(2, 6)).astype("int32")
    keras.utils.set_random_seed(5)
    built = build_transformer_model(model=model, attention_implementation="fused",
                                    **settings, **tiny_config)
    built([ids, np.zeros_like(ids)])
    assert fused_calls == []


def test_attention_dropout_in_training_takes_the_explicit_path(fused_calls):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 32)).astype("float32")
    bias = attention_biases(rng, batch=2, length=6)["padding"]
    layer = L.MultiHeadAttention(heads=4, head_size=8, attention_dropout=0.5,
                                 attention_implementation="fused")
    inference = numpy(layer([x, x, x], bias=bias))
    assert len(fused_calls) == 1
    np.testing.assert_allclose(inference, numpy_attention(layer, x, x, x, bias), atol=1e-5)
    trained = [numpy(layer([x, x, x], bias=bias, training=True)) for _ in range(300)]
    assert len(fused_calls) == 1  # training with dropout never reached the fused op
    # Dropout acts on the probabilities, with inverted scaling: every call differs from the
    # inference output, and since the output is linear in the probabilities, their average
    # converges to it (the error shrinks like 1 / sqrt(calls)).
    single = np.abs(trained[0] - inference).mean()
    average = np.abs(np.mean(trained, axis=0) - inference).mean()
    assert single > 0.05 and average < single / 5


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_keeps_each_value_independently_with_probability_one_minus_rate(rate):
    """The layer every bert4k model drops with (16 random bits a value on TensorFlow), checked
    against the Bernoulli(1 - rate) it must be: counts within 5 standard deviations."""
    x = np.random.default_rng(0).uniform(1, 2, size=(2, 3, 333, 335)).astype("float32")  # odd
    layer = L.Dropout(rate)
    first, second = (numpy(layer(x, training=True)) for _ in range(2))
    np.testing.assert_array_equal(numpy(layer(x)), x)  # inference: untouched
    n, keep = x.size, 1 - rate
    for out in (first, second):
        kept = out != 0
        np.testing.assert_allclose(out[kept], x[kept] / keep, rtol=1e-6)  # inverted scaling
        assert abs(kept.mean() - keep) < 5 * math.sqrt(rate * keep / n)
    both = ((first != 0) & (second != 0)).mean()  # calls draw fresh masks
    assert abs(both - keep**2) < 5 * math.sqrt(keep**2 * (1 - keep**2) / n)
    # The two halves of one random word decide neighbouring values: no correlation between them.
    flat = (first != 0).reshape(-1).astype("float64")
    pairs = np.corrcoef(flat[0:-1:2], flat[1::2])[0, 1]
    assert abs(pairs) < 5 / math.sqrt(n / 2)


def random_words_drawn(layer, shape):
    """Shapes of the 32-bit random arrays a training call of `layer` draws, read off its traced
    graph (TensorFlow) or jaxpr (JAX)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(
            tf.TensorSpec(shape, tf.float32)).graph
        return [tuple(out.shape) for op in graph.get_operations() if "StatelessRandom" in op.type
                for out in op.outputs if out.dtype in (tf.uint32, tf.float32)]
    import jax

    layer.build(shape)
    state = [v.value for v in layer.non_trainable_variables]  # the seed generator's
    jaxpr = jax.make_jaxpr(lambda s, x: layer.stateless_call([], s, x, training=True))(
        state, np.ones(shape, "float32"))

    def equations(jaxpr):  # nested calls (jit, pjit) included
        for eqn in jaxpr.eqns:
            yield eqn
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)

    return [tuple(var.aval.shape) for eqn in equations(jaxpr.jaxpr)
            if eqn.primitive.name == "random_bits" for var in eqn.outvars]


@pytest.mark.backends("tensorflow", "jax", reason="PyTorch drops with its own fused kernel")
def test_dropout_draws_sixteen_random_bits_a_value():
    """Half as much work for the generator as Keras's dropout (32 bits a value)."""
    assert random_words_drawn(L.Dropout(0.1), (3, 5, 7)) == [(53,)]  # 105 values
    assert random_words_drawn(L.Dropout(0.1), (2, 4)) == [(4,)]


@pytest.mark.tensorflow_only("a traced step with an unknown batch and under XLA")
def test_dropout_in_a_compiled_function_with_unknown_shape():
    import tensorflow as tf

    layer = L.Dropout(0.25)
    spec = tf.TensorSpec([None, 7], tf.float32)
    for jit in (False, True):
        step = tf.function(lambda x: layer(x, training=True), input_signature=[spec],
                           jit_compile=jit)
        out = step(tf.ones([3001, 7])).numpy()  # an odd size
        assert set(np.unique(out)) == {0.0, np.float32(1 / 0.75)}
        assert abs((out == 0).mean() - 0.25) < 0.03


def test_auto_attention_is_explicit_on_tensorflow_and_fused_elsewhere(fused_calls):
    x = np.random.default_rng(4).standard_normal((2, 5, 16)).astype("float32")
    L.MultiHeadAttention(heads=2, head_size=8)([x, x, x])
    assert len(fused_calls) == (0 if keras.backend.backend() == "tensorflow" else 1)


def test_attention_implementation_is_checked_and_serialized():
    with pytest.raises(ValueError, match="attention_implementation"):
        L.MultiHeadAttention(heads=2, head_size=4, attention_implementation="flash")
    layer = L.MultiHeadAttention(heads=2, head_size=4, attention_implementation="explicit")
    assert L.MultiHeadAttention.from_config(layer.get_config()).attention_implementation == \
        "explicit"


# -- bf16 mixed precision -------------------------------------------------------------------------


def _float64_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_bfloat16_softmax_has_float32_accuracy():
    """K.softmax of bf16 logits (attention's, under a bf16 policy), checked against float64:
    within the rounding of its bf16 output (2^-9 of 1, plus float32 noise) on every backend.
    A softmax accumulating in bf16 reaches 5e-3 on these 512 keys (XLA's) or 1e-2 (Eigen's)."""
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((4, 3, 16, 512)) * 4).astype("float32")
    logits[..., 400:] += K.MASK_BIAS  # masked keys, as attention adds them
    x = keras.ops.cast(logits, "bfloat16")
    exact = _float64_softmax(numpy(keras.ops.cast(x, "float32")).astype("float64"))
    out = K.softmax(x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert np.abs(numpy(keras.ops.cast(out, "float32")) - exact).max() < 2.2e-3


@pytest.mark.tensorflow_only("TensorFlow's graph, eager and XLA contexts")
def test_bfloat16_softmax_skips_the_casts_only_where_tensorflow_computes_in_float32():
    import tensorflow as tf
    from tensorflow.python.util._pywrap_util_port import IsMklEnabled

    rng = np.random.default_rng(8)
    x = tf.cast(rng.standard_normal((2, 3, 8, 512)) * 4, tf.bfloat16)
    exact = _float64_softmax(tf.cast(x, tf.float64).numpy())
    for jit in (False, True):
        decided = tf.function(lambda: K._softmax_keeps_float32("bfloat16"), jit_compile=jit)()
        assert bool(decided) == (IsMklEnabled() and not jit)  # oneDNN on, outside XLA
        out = tf.function(K.softmax, jit_compile=jit)(x)
        assert np.abs(tf.cast(out, tf.float64).numpy() - exact).max() < 2.2e-3
    assert not K._softmax_keeps_float32("float16")
    # Its gradient (training under mixed_bfloat16) also has float32 accuracy: within one bf16
    # rounding of the largest gradient, where TensorFlow's own bf16 gradient is 4x off.
    weights = tf.constant(rng.standard_normal(x.shape), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.cast(K.softmax(x), tf.float32) * weights)
    y = exact
    exact_gradient = (weights.numpy() - (weights.numpy() * y).sum(-1, keepdims=True)) * y
    error = np.abs(tf.cast(tape.gradient(loss, x), tf.float64).numpy() - exact_gradient).max()
    assert error < 2 * 2.0**-9 * np.abs(exact_gradient).max()


def _float64_layer_norm(x, gamma, beta, epsilon=1e-12):
    centered = x - x.mean(-1, keepdims=True)
    return centered / np.sqrt((centered**2).mean(-1, keepdims=True) + epsilon) * gamma + beta


def _finite_difference_gradient(f, x, step=1e-6):
    """d sum(f) / dx, one central difference per element of x (float64)."""
    gradient = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += step
        down[index] -= step
        gradient[index] = (f(up).sum() - f(down).sum()) / (2 * step)
    return gradient


def _layer_norm_case(seed=9):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 16)) * 3 + 1
    return x, 1 + 0.2 * rng.standard_normal(16), 0.1 * rng.standard_normal(16)


def test_layer_norm_matches_float64():
    """K.layer_norm against NumPy in float64, in float32 and in bf16 (statistics in float32: the
    bf16 result within one rounding of its largest value)."""
    x, gamma, beta = _layer_norm_case()
    exact = _float64_layer_norm(x, gamma, beta)
    as_float32 = lambda a: keras.ops.convert_to_tensor(a, "float32")  # noqa: E731
    out = K.layer_norm(as_float32(x), as_float32(gamma), as_float32(beta))
    assert np.abs(numpy(out) - exact).max() < 1e-5
    x16 = keras.ops.cast(as_float32(x), "bfloat16")
    exact16 = _float64_layer_norm(numpy(keras.ops.cast(x16, "float32")).astype("float64"),
                                  gamma, beta)
    out16 = K.layer_norm(x16, as_float32(gamma), as_float32(beta))
    assert keras.backend.standardize_dtype(out16.dtype) == "bfloat16"
    assert np.abs(numpy(keras.ops.cast(out16, "float32")) - exact16).max() < 2.0**-8 * 4


@pytest.mark.tensorflow_only("TensorFlow's oneDNN kernel, graph and XLA contexts")
def test_layer_norm_runs_onednns_kernel_in_tensorflow_graphs_with_float32_gradients():
    """In a graph on oneDNN, K.layer_norm is the `_MklLayerNorm` kernel with our gradient; under
    XLA the portable ops. Values and the gradients of x, gamma and beta against float64 finite
    differences of NumPy's LayerNorm."""
    import tensorflow as tf
    from tensorflow.python.util._pywrap_util_port import IsMklEnabled

    x, gamma, beta = _layer_norm_case()
    weights = np.random.default_rng(10).standard_normal(x.shape)
    exact = {
        "x": _finite_difference_gradient(lambda v: _float64_layer_norm(v, gamma, beta) * weights, x),
        "gamma": _finite_difference_gradient(lambda v: _float64_layer_norm(x, v, beta) * weights,
                                             gamma),
        "beta": (weights.reshape(-1, 16)).sum(0),
    }

    def value_and_gradients(x, gamma, beta):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y = K.layer_norm(x, gamma, beta)
            loss = tf.reduce_sum(y * weights)
        return y, dict(zip(("x", "gamma", "beta"), tape.gradient(loss, [x, gamma, beta])))

    for jit in (False, True):
        step = tf.function(value_and_gradients, jit_compile=jit)
        inputs = [tf.constant(a, tf.float32) for a in (x, gamma, beta)]
        y, gradients = step(*inputs)
        graph = step.get_concrete_function(*inputs).graph
        fused = any(op.type == "_MklLayerNorm" for op in graph.get_operations())
        assert fused == (IsMklEnabled() and not jit)
        assert np.abs(y.numpy() - _float64_layer_norm(x, gamma, beta)).max() < 1e-5
        for name, gradient in gradients.items():
            assert np.abs(gradient.numpy() - exact[name]).max() < 1e-4 * np.abs(exact[name]).max()
    # bf16 rows go through the kernel in float32: gamma and beta are not rounded to bf16.
    x16 = tf.cast(tf.constant(x, tf.float32), tf.bfloat16)
    normalize = tf.function(lambda x: K.layer_norm(x, tf.constant(gamma, tf.float32),
                                                   tf.constant(beta, tf.float32)))
    graph = normalize.get_concrete_function(x16).graph
    assert any(op.type == "_MklLayerNorm" for op in graph.get_operations()) == IsMklEnabled()
    exact16 = _float64_layer_norm(tf.cast(x16, tf.float64).numpy(), gamma, beta)
    out16 = tf.cast(normalize(x16), tf.float64).numpy()
    assert np.abs(out16 - exact16).max() <= 2.0**-8 * np.abs(exact16).max()  # one rounding


def test_gelu_erf_is_exact_and_stays_the_erf_formula_on_tensorflow():
    """gelu_erf against float64 x * Phi(x) on every backend (on PyTorch, torch's own kernel). On
    TensorFlow it stays the erf formula: tf.nn.gelu's erfc form is not what the graph optimizer
    fuses into the matmul, and MiniLM training steps ran 6-17% slower with it."""
    erf = np.vectorize(math.erf)
    x = np.linspace(-6, 6, 301)
    exact = 0.5 * x * (1 + erf(x / math.sqrt(2)))
    y = numpy(K.gelu_erf(keras.ops.convert_to_tensor(x, "float32")))
    assert np.abs(y - exact).max() < 1e-5
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec([None], tf.float32)
        graph = tf.function(K.gelu_erf).get_concrete_function(spec).graph
        types = {op.type for op in graph.get_operations()}
        assert "Erf" in types and "Erfc" not in types, types


@pytest.mark.tensorflow_only("TensorFlow's graph, eager and XLA contexts")
def test_gelu_for_training_has_a_compiled_gradient_in_tensorflow_graphs():
    """activation_for_training(gelu_erf): in a graph (oneDNN, no XLA) the custom-gradient GELU,
    elsewhere gelu_erf itself; values and gradients against float64 central differences of
    x * Phi(x), in float32 and in bf16 (gradient within one bf16 rounding)."""
    import tensorflow as tf
    from tensorflow.python.util._pywrap_util_port import IsMklEnabled

    erf = np.vectorize(math.erf)
    gelu64 = lambda v: 0.5 * v * (1 + erf(v / math.sqrt(2)))  # noqa: E731
    x = np.linspace(-6, 6, 301)
    exact_gradient = _finite_difference_gradient(gelu64, x)  # elementwise: d sum / dx_i = gelu'
    assert K.activation_for_training(K.gelu_erf) is K.gelu_erf  # eager: no graph to gain in
    for jit in (False, True):
        chosen = tf.function(lambda: K.activation_for_training(K.gelu_erf) is K.gelu_erf,
                             jit_compile=jit)
        assert chosen() == (jit or not IsMklEnabled())
    assert K.activation_for_training(K.swish) is K.swish

    @tf.function
    def value_and_gradient(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            y = K.activation_for_training(K.gelu_erf)(v)
        return y, tape.gradient(y, v)

    y, gradient = value_and_gradient(tf.constant(x, tf.float32))
    assert np.abs(y.numpy() - gelu64(x)).max() < 1e-5
    assert np.abs(gradient.numpy() - exact_gradient).max() < 1e-5
    y16, gradient16 = value_and_gradient(tf.constant(x, tf.bfloat16))
    x16 = tf.cast(tf.constant(x, tf.bfloat16), tf.float64).numpy()
    exact16 = _finite_difference_gradient(gelu64, x16)
    error = np.abs(tf.cast(gradient16, tf.float64).numpy() - exact16)
    assert (error <= 2.0**-8 * np.maximum(np.abs(exact16), 2.0**-8)).all()


def test_mixed_bfloat16_policy_layers_and_outputs(tiny_config):
    model = build_transformer_model(with_mlm=True, with_pool=True,
                                    dtype_policy="mixed_bfloat16", **tiny_config)
    attention = model.get_layer("Transformer-0-MultiHeadSelfAttention")
    assert attention.compute_dtype == "bfloat16" and attention.q_dense.compute_dtype == "bfloat16"
    assert model.get_layer("Transformer-0-FeedForward").compute_dtype == "bfloat16"
    # The residual stream and the softmax heads stay float32.
    for name in ("Transformer-0-MultiHeadSelfAttention-Norm", "Transformer-0-FeedForward-Add",
                 "MLM-Activation"):
        assert model.get_layer(name).compute_dtype == "float32", name
    assert all(w.dtype == "float32" for w in model.weights)  # variables stay float32
    ids = np.random.default_rng(0).integers(1, 120, size=(2, 8)).astype("int32")
    pooled, probabilities = model.predict([ids, np.zeros_like(ids)], verbose=0)
    assert pooled.dtype == np.float32 and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)


def test_mixed_bfloat16_model_trains(tiny_config):
    keras.utils.set_random_seed(0)
    encoder = build_transformer_model(with_pool=True, dtype_policy="mixed_bfloat16",
                                      dropout_rate=0.1, attention_dropout_rate=0.1, **tiny_config)
    output = keras.layers.Dense(2, activation="softmax", dtype="float32")(encoder.output)
    model = keras.Model(encoder.inputs, output)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 120, size=(8, 10)).astype("int32")
    labels = (ids[:, 1] % 2).astype("int32")
    before = [numpy(w) for w in model.trainable_weights]
    losses = [float(model.train_on_batch([ids, np.zeros_like(ids)], labels)) for _ in range(15)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(w.dtype == "float32" for w in model.trainable_weights)
    changed = [not np.array_equal(b, numpy(w)) for b, w in zip(before, model.trainable_weights)]
    assert all(changed)


def test_bfloat16_policy_stores_matmul_weights_in_bfloat16_and_predicts_as_mixed(tiny_config,
                                                                                 tmp_path):
    from bert4k.checkpoints import save_weights_as_safetensors

    mixed = build_transformer_model(with_mlm=True, dtype_policy="mixed_bfloat16", **tiny_config)
    path = tmp_path / "model.safetensors"
    save_weights_as_safetensors(mixed, path)
    model = build_transformer_model(checkpoint_path=path, with_mlm=True, dtype_policy="bfloat16",
                                    **tiny_config)
    dtypes = {w.path: w.dtype for w in model.weights}
    assert dtypes["Transformer-0-FeedForward/i0_dense/kernel"] == "bfloat16"
    assert dtypes["Embedding-Token/embeddings"] == "bfloat16"
    assert dtypes["Transformer-0-FeedForward-Norm/gamma"] == "float32"
    for name in ("Transformer-0-MultiHeadSelfAttention-Norm", "Transformer-0-FeedForward-Add",
                 "MLM-Activation"):
        assert model.get_layer(name).compute_dtype == "float32", name
    # The same bf16 matmuls on the same float32 stream as mixed_bfloat16: the kernels are only
    # rounded once, when loaded, instead of at every call.
    ids = np.random.default_rng(0).integers(1, 120, size=(2, 8)).astype("int32")
    inputs = [ids, np.zeros_like(ids)]
    expected, probabilities = mixed.predict(inputs, verbose=0), model.predict(inputs, verbose=0)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)
    # Written back as float32, as every reader of these formats expects.
    save_weights_as_safetensors(model, tmp_path / "again.safetensors")
    reloaded = build_transformer_model(checkpoint_path=tmp_path / "again.safetensors",
                                       with_mlm=True, **tiny_config)
    for weight, original in zip(reloaded.weights, model.weights):
        assert weight.dtype == "float32"
        np.testing.assert_array_equal(numpy(weight), numpy(original).astype("float32"))


def test_mixed_precision_embedding_casts_the_gathered_rows_not_the_table():
    layer = L.Embedding(1000, 8, dtype="mixed_bfloat16")
    ids = np.array([[3, 5, 999]], "int32")
    out = layer(ids)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert layer.embeddings.dtype == "float32"
    rows = numpy(layer.embeddings)[ids[0]]
    expected = numpy(keras.ops.cast(keras.ops.cast(rows, "bfloat16"), "float32"))
    np.testing.assert_array_equal(numpy(keras.ops.cast(out, "float32"))[0], expected)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec((None, None), tf.int32)
        graph = tf.function(layer).get_concrete_function(spec).graph
        casts = [tuple(op.inputs[0].shape) for op in graph.get_operations() if op.type == "Cast"]
        assert (1000, 8) not in casts, casts


@pytest.mark.slow
def test_bfloat16_minilm_is_close_to_float32_and_transformers(minilm_dir, minilm_reference):
    ids, segments = minilm_reference["token_ids"], minilm_reference["segment_ids"]
    expected = minilm_reference["sequence_output"]  # transformers (torch, float32)
    outputs = {}
    for policy in ("float32", "mixed_bfloat16", "bfloat16"):
        model = build_transformer_model(minilm_dir / "config.json", minilm_dir,
                                        dtype_policy=policy, attention_implementation="fused")
        outputs[policy] = numpy(model.predict([ids, segments], verbose=0))
    real = ids > 0
    float32 = outputs.pop("float32")
    scale = np.abs(expected[real]).max()
    np.testing.assert_allclose(float32[real], expected[real], atol=1e-4)
    # bf16 keeps 8 bits of mantissa: every matmul input is rounded to 2^-9 relative. Against
    # float32 and against transformers, the largest difference stays under 1% of the largest
    # output; sentence embeddings (mean pooling) agree to a cosine of 0.9995 (measured: above
    # 0.9999 with AMX bf16 kernels, 0.99987 on an AVX2-only CPU whose kernels round more).
    mask = real[..., None]
    pooled = lambda x: (x * mask).sum(1) / mask.sum(1)  # noqa: E731
    for policy, bfloat16 in outputs.items():
        assert np.abs(bfloat16[real] - float32[real]).max() < 1e-2 * scale, policy
        assert np.abs(bfloat16[real] - expected[real]).max() < 1e-2 * scale, policy
        a, b = pooled(bfloat16), pooled(float32)
        cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cosine.min() > 0.9995, policy


# -- bucketed lengths for XLA -------------------------------------------------------------------


def test_sequence_padding_buckets_lengths():
    assert [bucket_length(n, 16) for n in (0, 1, 16, 17, 33)] == [16, 16, 16, 32, 48]
    padded = sequence_padding([[1, 2, 3], [4]], multiple_of=4)
    np.testing.assert_array_equal(padded, [[1, 2, 3, 0], [4, 0, 0, 0]])
    # Explicit lengths win; 2-D padding buckets each sequence dimension.
    assert sequence_padding([[1, 2, 3]], length=5, multiple_of=4).shape == (1, 5)
    assert sequence_padding([np.ones((3, 5))], seq_dims=2, multiple_of=4).shape == (1, 4, 8)
    # Batches of every length from 1 to 64 take four shapes instead of 64.
    shapes = {sequence_padding([[7] * n], multiple_of=16).shape for n in range(1, 65)}
    assert shapes == {(1, 16), (1, 32), (1, 48), (1, 64)}
    with pytest.raises(ValueError, match="multiple_of"):
        bucket_length(3, 0)


def test_bucketed_padding_leaves_real_positions_unchanged(tiny_config):
    model = build_transformer_model(**tiny_config)
    rng = np.random.default_rng(4)
    sequences = [list(rng.integers(1, 120, size=n)) for n in (9, 5, 7)]
    tight = sequence_padding(sequences)
    bucketed = sequence_padding(sequences, multiple_of=16)
    assert bucketed.shape == (3, 16)
    a = numpy(model([tight, np.zeros_like(tight)]))
    b = numpy(model([bucketed, np.zeros_like(bucketed)]))
    for row, sequence in enumerate(sequences):
        np.testing.assert_allclose(b[row, :len(sequence)], a[row, :len(sequence)], atol=1e-5)


# -- projections as single matmuls ----------------------------------------------------------------


def test_projections_are_single_rank_two_kernels(tiny_config):
    """Every attention and feed-forward projection is one [in, out] kernel (one matmul over all
    heads), not a per-head [in, heads, size] einsum kernel."""
    model = build_transformer_model(**tiny_config)
    for index in range(tiny_config["num_hidden_layers"]):
        attention = model.get_layer(f"Transformer-{index}-MultiHeadSelfAttention")
        feed_forward = model.get_layer(f"Transformer-{index}-FeedForward")
        for dense in (attention.q_dense, attention.k_dense, attention.v_dense, attention.o_dense,
                      feed_forward.i0_dense, feed_forward.o_dense):
            assert isinstance(dense, keras.layers.Dense) and len(dense.kernel.shape) == 2


@pytest.mark.tensorflow_only("inspects the traced TensorFlow graph")
def test_rank_three_projections_trace_to_one_matmul_each():
    import tensorflow as tf

    attention = L.MultiHeadAttention(heads=4, head_size=8)
    feed_forward = L.FeedForward(64, activation="gelu")
    spec = tf.TensorSpec((None, None, 32))
    counts = {}
    for name, fn in (("attention", lambda x: attention([x, x, x])),
                     ("feed_forward", lambda x: feed_forward(x))):
        fn(tf.zeros((1, 3, 32)))
        graph = tf.function(fn).get_concrete_function(spec).graph
        counts[name] = [op.type for op in graph.get_operations()].count("MatMul")
    # q, k, v, o and the two feed-forward projections: one 2-D MatMul each over batch * length
    # rows; the attention's two batched products are the only other contractions.
    assert counts == {"attention": 4, "feed_forward": 2}


# -- the optimizer's fused kernel ------------------------------------------------------------------


@pytest.mark.tensorflow_only("inspects the traced TensorFlow graph")
def test_adam_updates_each_variable_with_one_fused_kernel_unless_assigns_are_overridden():
    """bert4k's Adam (and the extensions built on it) updates through TensorFlow's
    ResourceApplyAdam; gradient accumulation, which masks every assign, keeps the ops it can
    mask, and so do half-precision variables. (That the numbers are Adam's is tested against
    NumPy in test_optimizers.)"""
    import tensorflow as tf

    from bert4k import optimizers as O

    def kernels(optimizer, dtype="float32"):
        variables = [keras.Variable(np.ones(shape, dtype)) for shape in ((3, 4), (4,))]
        gradients = [tf.ones(v.shape, dtype) for v in variables]
        optimizer.build(variables)
        graph = tf.function(lambda: optimizer.apply(gradients, variables)).get_concrete_function().graph
        return [op.type for op in graph.get_operations()].count("ResourceApplyAdam")

    weight_decay = O.extend_with_weight_decay(O.Adam, name="FusedTestAdamW")
    accumulation = O.extend_with_gradient_accumulation(O.Adam, name="FusedTestAccumulated")
    assert kernels(O.Adam(bias_correction=False)) == 2
    assert kernels(weight_decay(weight_decay_rate=0.01)) == 2
    assert kernels(accumulation(grad_accum_steps=2)) == 0
    assert kernels(O.Adam(amsgrad=True)) == 0
    assert kernels(O.Adam(), dtype="float16") == 0


# -- the benchmark's bookkeeping (its timings are never asserted) ----------------------------------


@pytest.fixture(scope="module")
def benchmark():
    """scripts/benchmark.py's modules, imported as the script imports them (from scripts/)."""
    import importlib
    import pathlib
    import types

    scripts = str(pathlib.Path(__file__).resolve().parents[1] / "scripts")
    sys.path.insert(0, scripts)
    try:
        importlib.import_module("benchmark")  # the driver imports the other three
        return types.SimpleNamespace(**{name: importlib.import_module("benchmark_" + name)
                                        for name in ("plan", "workers", "report")})
    finally:
        sys.path.remove(scripts)


def test_benchmark_flops_count_every_matmul(benchmark):
    """FLOPs per token against a count of the encoder's matmuls, one by one."""
    c = benchmark.plan.MODELS["base"]
    layers, hidden, inner = c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]
    length = 128
    per_token = 0
    for _ in range(layers):
        per_token += 3 * 2 * hidden * hidden  # q, k, v projections
        per_token += 2 * length * hidden  # q . k for every key, all heads together
        per_token += 2 * length * hidden  # probabilities . v
        per_token += 2 * hidden * hidden  # output projection
        per_token += 2 * hidden * inner + 2 * inner * hidden  # feed-forward
    assert benchmark.plan.flops_per_token("base", length) == per_token
    assert benchmark.plan.flops_per_token("base", length, training=True) == 3 * per_token


@pytest.mark.parametrize("model", ["minilm", "base"])
def test_benchmark_flops_of_a_pooled_only_encoder_count_its_last_block_per_sequence(benchmark, model):
    """A sequence's matmuls one by one when the last block queries the first position alone."""
    c = benchmark.plan.MODELS[model]
    layers, hidden, inner = c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]
    n = 128

    def block(queries):  # one sequence's FLOPs; keys and values at all n positions
        flops = 2 * n * hidden * hidden * 2  # k, v projections
        flops += 2 * queries * hidden * hidden * 2  # q and output projections
        flops += 2 * queries * n * hidden * 2  # q . k and probabilities . v
        return flops + 2 * queries * hidden * inner * 2  # feed-forward

    per_sequence = (layers - 1) * block(n) + block(1)
    expected = per_sequence / n
    assert benchmark.plan.flops_per_token(model, n, pooled_only=True) == pytest.approx(expected, rel=1e-12)
    assert benchmark.plan.flops_per_token(model, n, True, True) == pytest.approx(3 * expected, rel=1e-12)


def test_benchmark_keeps_each_measurements_best_pass(benchmark):
    record = dict(kind="inference", variant="bert4k-tf-graph", model="minilm", batch=8, length=128)
    records = [dict(record, tokens_per_s=5.0), dict(record, tokens_per_s=7.0),
               dict(record, batch=1, tokens_per_s=3.0), dict(kind="peak", gflops=1.0)]
    kept = benchmark.report.best_passes(records)
    assert sorted(r.get("tokens_per_s", 0) for r in kept) == [0, 3.0, 7.0]


def test_benchmark_sets_figures_against_the_fastest_peak_of_the_run(benchmark):
    """TensorFlow's matmul peak is measured again through a run; percentages use its fastest
    measurement, and the table shows the slowest beside it."""
    import types

    peak = dict(kind="peak", env="main", library="tensorflow", dtype="float32")
    records = [dict(peak, gflops=352.0), dict(peak, gflops=427.0), dict(peak, gflops=398.0),
               dict(peak, dtype="bfloat16", gflops=700.0),
               dict(kind="peak", env="torch", library="torch", dtype="float32", gflops=171.0),
               dict(kind="inference", variant="v", model="base", batch=8, length=128,
                    tokens_per_s=2000.0)]
    report = benchmark.report.Report(types.SimpleNamespace(
        records=records, args=types.SimpleNamespace(matmul_size=3072)))
    assert report.peak32 == 427.0 and report.peak16 == 700.0
    figure = 2000.0 * benchmark.plan.flops_per_token("base", 128) / 427e9
    assert report.fraction(report.one(kind="inference")) == pytest.approx(figure)
    table = report.peak_table()
    assert "| tensorflow | 427 (slowest of 3: 352) | 700 |" in table
    assert "| torch | 171 | - |" in table


def test_benchmark_percent_of_a_training_row_counts_the_flops_it_ran(benchmark):
    """A classifier whose encoder ran its last block at [CLS] alone (the record says so) is set
    against the FLOPs it ran, not the whole encoder's."""
    import types

    step = dict(kind="training", variant="v", model="base", batch=16, length=128, tokens_per_s=600.0)
    records = [dict(kind="peak", env="main", library="tensorflow", dtype="float32", gflops=400.0),
               dict(step, pooled_only=True), dict(step, variant="w")]
    report = benchmark.report.Report(types.SimpleNamespace(
        records=records, args=types.SimpleNamespace(matmul_size=3072)))
    ran = benchmark.plan.flops_per_token("base", 128, training=True, pooled_only=True)
    whole = benchmark.plan.flops_per_token("base", 128, training=True)
    assert ran < whole
    assert report.fraction(report.one(variant="v"), True) == pytest.approx(600.0 * ran / 400e9)
    assert report.fraction(report.one(variant="w"), True) == pytest.approx(600.0 * whole / 400e9)


def test_benchmark_reports_the_head_to_head_fine_tuning_steps(benchmark):
    """The interleaved fine-tuning steps get their own column and goal row, against keras-hub's
    faster mode."""
    import types

    step = dict(kind="headtohead-training", model="minilm", batch=16, length=128)
    records = [dict(step, variant="keras-hub-tf-graph", tokens_per_s=2000.0),
               dict(step, variant="keras-hub-tf-xla", tokens_per_s=2500.0),
               dict(step, variant="bert4k-tf-graph", tokens_per_s=3000.0),
               dict(step, variant="bert4k-tf-xla", tokens_per_s=2400.0),
               dict(kind="headtohead", model="minilm", batch=8, length=128,
                    variant="keras-hub-tf-xla", tokens_per_s=9000.0),
               dict(kind="headtohead", model="minilm", batch=8, length=128,
                    variant="bert4k-tf-xla", tokens_per_s=8100.0)]
    args = types.SimpleNamespace(models=["minilm"], plan={"minilm": dict(shapes=[], variants=[])},
                                 output="unused")
    report = benchmark.report.Report(types.SimpleNamespace(records=records, args=args))
    table = report.head_to_head_table()
    assert "| variant | 8x128 | train 16x128 |" in table
    assert "| bert4k-tf-graph | - | 3,000 (x1.20) |" in table
    goals = report.goals()
    assert ("| minilm training 16x128: bert4k >= keras-hub, head to head | "
            "bert4k-tf-graph vs keras-hub-tf-xla: x1.20 | yes |") in goals
    assert ("| minilm inference 8x128: bert4k >= keras-hub, head to head | "
            "bert4k-tf-xla vs keras-hub-tf-xla: x0.90 | no |") in goals


def test_benchmark_fine_tunes_each_library_with_its_users_adamw(benchmark):
    """bert4k's training rows on TensorFlow step with bert4k's AdamW (its fused Adam kernel, BERT's
    decay exclusions); keras-hub's, and bert4k's on other backends, with Keras's AdamW."""
    from bert4k import optimizers as O

    job = dict(mode="graph", model="minilm", precision="float32", variant="unused")
    mine = benchmark.workers.KerasRunner(dict(job, impl="bert4k")).fine_tuning_optimizer()
    peer = benchmark.workers.KerasRunner(dict(job, impl="keras-hub")).fine_tuning_optimizer()
    assert isinstance(peer, keras.optimizers.AdamW)  # on PyTorch, a subclass of Keras's own
    if keras.backend.backend() != "tensorflow":
        assert isinstance(mine, keras.optimizers.AdamW)
        return
    assert isinstance(mine, O.Adam) and mine.weight_decay_rate == 0.01
    assert mine.weight_decay_exclusions == ["Norm", "bias"]
    assert mine._takes_fused_kernel(keras.Variable(np.zeros((2, 2), "float32")))


def test_benchmark_measurement_warms_up_fully_even_when_slow(benchmark):
    """A slow first call (a compile) does not cut the warm-up short: the second call is not timed."""
    calls = []

    def call():
        calls.append(len(calls))
        time.sleep(0.05 if len(calls) == 1 else 0.0)

    results = benchmark.workers.measure(call, warmup=2, min_time=0.01, min_reps=3)
    assert len(calls) == 2 + results["reps"] and results["reps"] >= 3
    assert results["first_call"] >= 0.05 > results["min_seconds"]


def test_benchmark_measurement_times_calls_for_min_time_however_short_they_are(benchmark):
    """Short calls are timed for min_time, not stopped at a fixed number of calls (the old cap of
    50 timed a 20 ms MiniLM 1x128 call for about 1 s of the 3 s the report states)."""
    results = benchmark.workers.measure(lambda: time.sleep(0.002), warmup=1, min_time=0.3,
                                        min_reps=3)
    assert results["reps"] > 50
    assert results["reps"] * results["median_seconds"] >= 0.25
    interleaved = benchmark.workers.measure_interleaved(
        {"a": lambda: time.sleep(0.002), "b": lambda: time.sleep(0.002)},
        warmup=1, min_time=0.3, min_reps=3)
    assert interleaved["a"]["reps"] > 50 and interleaved["a"]["reps"] == interleaved["b"]["reps"]


def test_benchmark_interleaved_measurement_calls_each_in_turn(benchmark):
    calls = []
    results = benchmark.workers.measure_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        warmup=1, min_time=0.0, min_reps=3)
    assert calls == ["a", "b"] * 4  # the first (compiling) call of each, then 3 rounds
    assert results["a"]["reps"] == results["b"]["reps"] == 3


def test_benchmark_writes_only_its_readme_block(benchmark, tmp_path):
    readme = tmp_path / "README.md"
    begin, end = benchmark.report.README_BEGIN, benchmark.report.README_END
    readme.write_text(f"# x\n\nprose\n\n{begin}\nold\n{end}\n\nmore\n")
    benchmark.report.write_readme(readme, "### Machine\n\n| a |\n\n### Goals\n")
    text = readme.read_text()
    assert "old" not in text and "#### Machine" in text and "#### Goals" in text
    assert text.startswith(f"# x\n\nprose\n\n{begin}") and text.endswith(f"{end}\n\nmore\n")
