"""bert4k.optimizers: each derived optimizer against an update written out in NumPy, accumulation
against one big batch, saving and restoring, and all eight extensions training a tiny BERT (also
under MirroredStrategy with two logical CPUs, in a subprocess)."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from bert4k import optimizers as O

ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKEND = keras.backend.backend()

# ------------------------------------------------------------------------------------------
# Variables with bert4keras-style paths, fixed gradients, and NumPy reference updates
# ------------------------------------------------------------------------------------------

STEPS = 3


def layer_variables():
    """FeedForward/{kernel,bias} and FeedForward-Norm/{gamma,beta} with fixed values."""
    dense = keras.layers.Dense(4, name="FeedForward")
    dense.build((None, 3))
    norm = keras.layers.LayerNormalization(name="FeedForward-Norm")
    norm.build((None, 4))
    variables = dense.trainable_variables + norm.trainable_variables
    rng = np.random.RandomState(0)
    for variable in variables:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return variables


def fixed_gradients(variables, steps=STEPS, seed=1):
    rng = np.random.RandomState(seed)
    return [[rng.normal(size=v.shape).astype("float32") for v in variables] for _ in range(steps)]


def values(variables):
    return [np.array(keras.ops.convert_to_numpy(v), dtype="float64") for v in variables]


def apply_steps(optimizer, variables, gradients):
    """Apply each step's gradients; return the variable values after every step."""
    history = []
    for step_gradients in gradients:
        optimizer.apply(step_gradients, variables)
        history.append(values(variables))
    return history


class NumpyAdam:
    """Keras's Adam (``bias_correction=True``) or Google BERT's (False), one variable."""

    def __init__(self, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-6, bias_correction=True):
        self.lr, self.b1, self.b2, self.eps = lr, beta_1, beta_2, epsilon
        self.bias_correction = bias_correction
        self.m = self.v = 0.0

    def delta(self, gradient, step):
        """The change Adam makes to the variable at 0-based update ``step``."""
        self.m = self.b1 * self.m + (1 - self.b1) * gradient
        self.v = self.b2 * self.v + (1 - self.b2) * gradient**2
        lr = self.lr
        if self.bias_correction:
            t = step + 1
            lr = lr * np.sqrt(1 - self.b2**t) / (1 - self.b1**t)
        return -lr * self.m / (np.sqrt(self.v) + self.eps)


def numpy_run(initial, gradients, step_fn):
    """Run ``step_fn(index, value, gradient, step) -> new value`` for every variable and step."""
    current = [np.array(v, dtype="float64") for v in initial]
    history = []
    for step, step_gradients in enumerate(gradients):
        current = [step_fn(i, x, g.astype("float64"), step)
                   for i, (x, g) in enumerate(zip(current, step_gradients))]
        history.append(current)
    return history


def assert_histories_close(actual, expected, atol=1e-6):
    for step, (got_step, want_step) in enumerate(zip(actual, expected)):
        assert len(got_step) == len(want_step)
        for index, (got, want) in enumerate(zip(got_step, want_step)):
            np.testing.assert_allclose(got, want, atol=atol, rtol=1e-5,
                                       err_msg=f"step {step}, variable {index}")


def assert_same_values(variables, reference_variables, atol=1e-6):
    assert_histories_close([values(variables)], [values(reference_variables)], atol=atol)


# ------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ({10: 1.0, 20: 0.1}, {0: 0.0, 5: 0.5, 10: 1.0, 15: 0.55, 20: 0.1, 21: 0.1, 1000: 0.1}),
        ({0: 0.5, 4: 1.0}, {0: 0.5, 1: 0.625, 2: 0.75, 4: 1.0, 9: 1.0}),
        ({"3": 2}, {0: 0.0, 1: 2 / 3, 3: 2.0, 7: 2.0}),
    ],
)
def test_piecewise_linear_is_exact_at_and_between_breakpoints_and_flat_after(schedule, expected):
    for step, value in expected.items():
        got = float(keras.ops.convert_to_numpy(O.piecewise_linear(step, schedule)))
        assert got == pytest.approx(value, abs=1e-7), step


def test_piecewise_linear_lr_scales_each_update_by_the_multiplier_at_its_update_count():
    SGDLR = O.extend_with_piecewise_linear_lr(keras.optimizers.SGD, name="TestSGDLR")
    optimizer = SGDLR(learning_rate=0.1, lr_schedule={2: 1, 4: 0.5})
    variable = keras.Variable(np.zeros(2, "float32"))
    multipliers = [0.0, 0.5, 1.0, 0.75, 0.5, 0.5]  # at updates 0..5
    expected = np.zeros(2)
    for multiplier in multipliers:
        assert float(optimizer.learning_rate) == pytest.approx(0.1 * multiplier)
        optimizer.apply([np.ones(2, "float32")], [variable])
        expected -= 0.1 * multiplier
        np.testing.assert_allclose(values([variable])[0], expected, atol=1e-7)


def test_warmup_linear_decay_is_google_berts_schedule():
    schedule = O.WarmupLinearDecay(1e-3, warmup_steps=10, total_steps=100)
    expected = {0: 0.0, 5: 5e-4, 9: 9e-4, 10: 9e-4, 55: 4.5e-4, 99: 1e-5, 100: 0.0, 150: 0.0}
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, abs=1e-9), step
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored._learning_rate, O.WarmupLinearDecay)
    assert restored._learning_rate.get_config() == schedule.get_config()


def test_warmup_linear_decay_rejects_bad_steps():
    with pytest.raises(ValueError, match="warmup_steps"):
        O.WarmupLinearDecay(1e-3, warmup_steps=200, total_steps=100)


# ------------------------------------------------------------------------------------------
# Base optimizers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias_correction", [True, False])
def test_adam_matches_numpy_with_and_without_bias_correction(bias_correction):
    variables = layer_variables()
    initial, gradients = values(variables), fixed_gradients(variables)
    history = apply_steps(O.Adam(learning_rate=0.01, bias_correction=bias_correction),
                          variables, gradients)
    adams = [NumpyAdam(0.01, bias_correction=bias_correction) for _ in variables]
    expected = numpy_run(initial, gradients, lambda i, x, g, t: x + adams[i].delta(g, t))
    assert_histories_close(history, expected)


@pytest.mark.tensorflow_only("sparse gradients (tf.IndexedSlices) exist only there")
def test_adam_sums_repeated_rows_of_a_sparse_gradient_before_squaring():
    import tensorflow as tf

    embedding = keras.Variable(np.ones((4, 2), "float32"))
    rows = np.array([[1.0, 2.0], [-3.0, 4.0], [0.5, 0.5]], "float32")
    sparse = tf.IndexedSlices(tf.constant(rows), tf.constant([0, 0, 2]), tf.constant([4, 2]))
    # Row 0 appears twice: its second moment must be (1 - 3)**2, not 1**2 + 3**2.
    O.Adam(learning_rate=0.1, beta_1=0.5).apply([sparse], [embedding])

    summed = np.zeros((4, 2))
    np.add.at(summed, [0, 0, 2], rows)
    expected = 1.0 + NumpyAdam(0.1, beta_1=0.5).delta(summed, 0)
    np.testing.assert_allclose(values([embedding])[0], expected, atol=1e-6)


def test_adafactor_matches_numpy_factored_and_unfactored():
    variables = layer_variables()  # kernel (3, 4) is factored with min_dim_size_to_factor=3
    initial, gradients = values(variables), fixed_gradients(variables)
    optimizer = O.AdaFactor(learning_rate=None, beta1=0.9, min_dim_size_to_factor=3,
                            exclude_from_parameter_scale=["Norm"])
    history = apply_steps(optimizer, variables, gradients)

    eps1, eps2 = 1e-30, 1e-3
    state = [dict(v=0.0, vr=0.0, vc=0.0, m=0.0) for _ in variables]

    def adafactor(i, x, g, step):
        t = step + 1
        lr, beta2 = min(1 / np.sqrt(t), 0.01), 1 - t**-0.8
        s, g2 = state[i], g**2 + eps1
        if i == 0:  # (3, 4): rows average the larger axis 1, columns average axis 0
            s["vr"] = beta2 * s["vr"] + (1 - beta2) * g2.mean(axis=1, keepdims=True)
            s["vc"] = beta2 * s["vc"] + (1 - beta2) * g2.mean(axis=0, keepdims=True)
            v = s["vr"] * s["vc"] / s["vr"].mean(axis=0, keepdims=True)
        else:
            s["v"] = v = beta2 * s["v"] + (1 - beta2) * g2
        u = g / np.sqrt(v + eps1)
        u = u / max(1.0, np.sqrt(np.mean(u**2)) / 1.0)
        s["m"] = u = 0.9 * s["m"] + 0.1 * u
        if i < 2:  # FeedForward/kernel and bias are scaled; FeedForward-Norm/* are excluded
            u = u * max(np.sqrt(np.mean(x**2)), eps2)
        return x - lr * u

    assert_histories_close(history, numpy_run(initial, gradients, adafactor))
    assert optimizer.get_config()["learning_rate"] is None


# ------------------------------------------------------------------------------------------
# Each extension against NumPy, over three updates
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_weight_decay_skips_exclusions_and_matches_decoupled_closed_form(base):
    variables = layer_variables()
    initial, gradients = values(variables), fixed_gradients(variables)
    lr, rate = (0.1 if base == "sgd" else 0.01), 0.05
    base_class = keras.optimizers.SGD if base == "sgd" else O.Adam
    AdamW = O.extend_with_weight_decay(base_class, name=f"Test{base}W")
    optimizer = AdamW(learning_rate=lr, weight_decay_rate=rate,
                      exclude_from_weight_decay=["Norm", "bias"])
    history = apply_steps(optimizer, variables, gradients)

    adams = [NumpyAdam(lr) for _ in variables]
    decayed = [True, False, False, False]  # FeedForward/kernel only

    def step_fn(i, x, g, t):
        delta = -lr * g if base == "sgd" else adams[i].delta(g, t)
        return x + delta - (lr * rate * x if decayed[i] else 0.0)

    assert_histories_close(history, numpy_run(initial, gradients, step_fn))


def test_weight_decay_scales_first_only_where_nothing_else_reads_the_value():
    """The decay commutes with a step that does not read the variable (it then scales the
    variable first); under gradient accumulation, whose assignments are masked, the result is
    still AdamW's closed form, one update per two micro-steps."""
    lr, rate = 0.01, 0.05
    decay = dict(learning_rate=lr, weight_decay_rate=rate, exclude_from_weight_decay=["Norm", "bias"])
    AdamW = O.extend_with_weight_decay(O.Adam, name="TestFirstAdamW")
    assert AdamW(**decay)._decays_first()
    assert O.extend_with_piecewise_linear_lr(AdamW, name="TestFirstAdamWLR")(**decay)._decays_first()
    assert not O.extend_with_layer_adaptation(AdamW, name="TestFirstLamb")(**decay)._decays_first()
    assert not O.extend_with_weight_decay(O.AdaFactor, name="TestFirstAdaFactorW")(
        **decay)._decays_first()
    assert not O.extend_with_weight_decay(O.extend_with_lookahead(O.Adam),
                                          name="TestFirstLookaheadW")(**decay)._decays_first()

    Accumulating = O.extend_with_gradient_accumulation(AdamW, name="TestFirstAccumAdamW")
    optimizer = Accumulating(grad_accum_steps=2, **decay)
    assert optimizer._decays_first()
    variables = layer_variables()
    initial, gradients = values(variables), fixed_gradients(variables, steps=4)
    history = apply_steps(optimizer, variables, gradients)

    adams = [NumpyAdam(lr) for _ in variables]
    decayed = [True, False, False, False]

    def adamw(i, x, g, t):
        return x + adams[i].delta(g, t) - (lr * rate * x if decayed[i] else 0.0)

    means = [[(a + b) / 2 for a, b in zip(gradients[k], gradients[k + 1])] for k in (0, 2)]
    updates = numpy_run(initial, means, adamw)
    assert_histories_close(history, [initial, updates[0], updates[0], updates[1]])


def test_layer_adaptation_over_weight_decay_is_lamb():
    variables = layer_variables()
    initial, gradients = values(variables), fixed_gradients(variables)
    lr, rate = 0.01, 0.01
    Lamb = O.extend_with_layer_adaptation(O.extend_with_weight_decay(O.Adam), name="TestLamb")
    optimizer = Lamb(learning_rate=lr, weight_decay_rate=rate, exclude_from_weight_decay=["Norm"],
                     exclude_from_layer_adaptation=["bias"])
    history = apply_steps(optimizer, variables, gradients)

    adams = [NumpyAdam(lr) for _ in variables]
    decayed, adapted = [True, True, False, False], [True, False, True, True]

    def lamb(i, x, g, t):
        delta = adams[i].delta(g, t) - (lr * rate * x if decayed[i] else 0.0)
        if adapted[i]:
            delta = delta * np.linalg.norm(x) / np.linalg.norm(delta / lr)
        return x + delta

    assert_histories_close(history, numpy_run(initial, gradients, lamb))


def test_lookahead_matches_numpy():
    variables = layer_variables()
    initial, gradients = values(variables), fixed_gradients(variables, steps=5)
    lr, k, alpha = 0.1, 2, 0.5
    SGDLookahead = O.extend_with_lookahead(keras.optimizers.SGD, name="TestLookahead")
    optimizer = SGDLookahead(learning_rate=lr, steps_per_slow_update=k, slow_step_size=alpha)
    history = apply_steps(optimizer, variables, gradients)

    slow = [np.array(x, "float64") for x in initial]

    def lookahead(i, x, g, step):
        fast = x - lr * g
        if (step + 1) % k:
            return fast
        slow[i] = slow[i] + alpha * (fast - slow[i])
        return slow[i].copy()

    assert_histories_close(history, numpy_run(initial, gradients, lookahead))


def test_exponential_moving_average_with_and_without_bias_correction():
    variables = layer_variables()
    initial, gradients = values(variables), fixed_gradients(variables)
    lr, momentum = 0.1, 0.9
    SGDEMA = O.extend_with_exponential_moving_average(keras.optimizers.SGD, name="TestEMA")
    optimizer = SGDEMA(learning_rate=lr, ema_momentum=momentum)
    history = apply_steps(optimizer, variables, gradients)

    averages = [np.zeros_like(x) for x in initial]

    def sgd_with_average(i, x, g, step):
        new = x - lr * g
        averages[i] = momentum * averages[i] + (1 - momentum) * new
        return new

    expected = numpy_run(initial, gradients, sgd_with_average)
    assert_histories_close(history, expected)  # the average does not touch the weights

    optimizer.apply_ema_weights()
    corrected = [a / (1 - momentum**STEPS) for a in averages]
    assert_histories_close([values(variables)], [corrected])
    optimizer.reset_old_weights()
    assert_histories_close([values(variables)], [expected[-1]])
    optimizer.apply_ema_weights(bias_correction=False)
    assert_histories_close([values(variables)], [averages])
    optimizer.reset_old_weights()
    assert_histories_close([values(variables)], [expected[-1]])


def test_lazy_optimization_moves_only_rows_with_gradient():
    embedding = keras.layers.Embedding(5, 3, name="Embedding-Token")
    embedding.build((None,))
    dense = keras.layers.Dense(3, use_bias=False, name="Dense")
    dense.build((None, 5))
    variables = embedding.trainable_variables + dense.trainable_variables  # both (5, 3)
    initial = values(variables)
    gradients = fixed_gradients(variables)
    for step, rows in enumerate([[0, 2], [1], [2, 4]]):
        for gradient in gradients[step]:
            gradient[[r for r in range(5) if r not in rows]] = 0.0
    lr = 0.01
    LazyAdam = O.extend_with_lazy_optimization(O.Adam, name="TestLazyAdam")
    optimizer = LazyAdam(learning_rate=lr, include_in_lazy_optimization=["Embedding"])
    history = apply_steps(optimizer, variables, gradients)

    adams = [NumpyAdam(lr) for _ in variables]

    def lazy(i, x, g, t):
        delta = adams[i].delta(g, t)  # moments update everywhere
        if i == 0:
            delta = delta * np.any(g != 0, axis=-1, keepdims=True)
        return x + delta

    assert_histories_close(history, numpy_run(initial, gradients, lazy))
    # Row 0 has a gradient at the first update only: Adam's momentum keeps moving it in the
    # Dense kernel, while the lazy embedding row stays put.
    np.testing.assert_array_equal(history[-1][0][0], history[0][0][0])
    np.testing.assert_array_equal(history[-1][0][3], initial[0][3])
    assert not np.allclose(history[-1][1][0], history[0][1][0])


def test_parameter_wise_lr_multiplies_each_variables_step():
    variables = layer_variables()
    initial, gradients = values(variables), fixed_gradients(variables)
    lr = 0.01
    ParamwiseAdam = O.extend_with_parameter_wise_lr(O.Adam, name="TestParamwiseAdam")
    schedule = {"Norm": 0.5, "kernel": 4.0, "FeedForward-Norm/gamma": 3.0}
    optimizer = ParamwiseAdam(learning_rate=lr, paramwise_lr_schedule=schedule)
    history = apply_steps(optimizer, variables, gradients)

    adams = [NumpyAdam(lr) for _ in variables]
    multipliers = [4.0, 1.0, 1.5, 0.5]  # kernel, bias, Norm gamma (0.5 * 3), Norm beta
    expected = numpy_run(initial, gradients,
                         lambda i, x, g, t: x + multipliers[i] * adams[i].delta(g, t))
    assert_histories_close(history, expected)


# ------------------------------------------------------------------------------------------
# Gradient accumulation
# ------------------------------------------------------------------------------------------


def regression_data(samples=16, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, 10, size=(samples, 4)).astype("int32")
    targets = rng.normal(size=(samples, 2)).astype("float32")
    return tokens, targets


def small_model():
    keras.utils.set_random_seed(7)
    return keras.Sequential([
        keras.Input((4,), dtype="int32"),
        keras.layers.Embedding(10, 6, name="Embedding-Token"),
        keras.layers.Flatten(),
        keras.layers.Dense(8, activation="tanh", name="Hidden"),
        keras.layers.Dense(2, name="Output"),
    ])


ACCUMULATION_SCHEDULE = dict(peak_learning_rate=0.05, warmup_steps=2, total_steps=10)


def accumulating_and_plain_optimizers(steps):
    AccumAdam = O.extend_with_gradient_accumulation(O.Adam, name="TestAccumAdam")
    accumulating = AccumAdam(learning_rate=O.WarmupLinearDecay(**ACCUMULATION_SCHEDULE),
                             grad_accum_steps=steps)
    plain = O.Adam(learning_rate=O.WarmupLinearDecay(**ACCUMULATION_SCHEDULE))
    return accumulating, plain


def test_gradient_accumulation_in_fit_equals_steps_on_concatenated_batches():
    tokens, targets = regression_data()
    steps, micro_batch, epochs = 2, 4, 3
    accumulating, plain = accumulating_and_plain_optimizers(steps)
    results = []
    for optimizer, batch_size in [(accumulating, micro_batch), (plain, micro_batch * steps)]:
        model = small_model()
        model.compile(optimizer, "mse")
        model.fit(tokens, targets, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
        results.append(values(model.trainable_variables))
    assert_histories_close([results[0]], [results[1]], atol=1e-6)
    updates = epochs * len(tokens) // (micro_batch * steps)
    assert int(keras.ops.convert_to_numpy(accumulating.iterations)) == updates
    expected_lr = float(O.WarmupLinearDecay(**ACCUMULATION_SCHEDULE)(updates))
    assert float(accumulating.learning_rate) == pytest.approx(expected_lr)


def loss_and_gradients(model, tokens, targets):
    """One backward pass on any backend (a custom training loop's core)."""
    loss_fn = keras.losses.MeanSquaredError()
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(targets, model(tokens))
        return tape.gradient(loss, model.trainable_variables)
    if BACKEND == "jax":
        import jax

        def loss_of(trainable):
            non_trainable = [v.value for v in model.non_trainable_variables]
            outputs, _ = model.stateless_call(trainable, non_trainable, tokens)
            return loss_fn(targets, outputs)

        return jax.grad(loss_of)([v.value for v in model.trainable_variables])
    model.zero_grad()
    loss_fn(targets, model(tokens)).backward()
    return [v.value.grad.clone() for v in model.trainable_variables]


@pytest.mark.parametrize("steps", [2, 4])
def test_gradient_accumulation_in_a_custom_loop_counts_real_updates(steps):
    tokens, targets = regression_data()
    micro_batch = 8 // steps
    accumulating, plain = accumulating_and_plain_optimizers(steps)
    results = []
    for optimizer, batch_size in [(accumulating, micro_batch), (plain, micro_batch * steps)]:
        model = small_model()
        for start in range(0, len(tokens), batch_size):
            batch = slice(start, start + batch_size)
            gradients = loss_and_gradients(model, tokens[batch], targets[batch])
            optimizer.apply(gradients, model.trainable_variables)
        results.append(values(model.trainable_variables))
    assert_histories_close([results[0]], [results[1]], atol=1e-6)
    assert int(keras.ops.convert_to_numpy(accumulating.iterations)) == 2
    assert float(accumulating.learning_rate) == pytest.approx(0.05 * (1 - 2 / 10))  # schedule(2)


def test_gradient_accumulation_refuses_keras_features_that_act_per_micro_step():
    AccumSGD = O.extend_with_gradient_accumulation(keras.optimizers.SGD, name="TestAccumSGD")
    with pytest.raises(ValueError, match="weight_decay"):
        AccumSGD(learning_rate=0.1, weight_decay=0.01)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        AccumSGD(learning_rate=0.1, grad_accum_steps=0)


def test_extending_something_other_than_an_optimizer_class_is_a_clear_error():
    with pytest.raises(TypeError, match="Optimizer subclass"):
        O.extend_with_lookahead(keras.optimizers.Adam())


# ------------------------------------------------------------------------------------------
# All eight together: serialization, saving, composition order, training
# ------------------------------------------------------------------------------------------

EXTENSIONS = [
    O.extend_with_weight_decay,
    O.extend_with_layer_adaptation,
    O.extend_with_piecewise_linear_lr,
    O.extend_with_gradient_accumulation,
    O.extend_with_lookahead,
    O.extend_with_lazy_optimization,
    O.extend_with_exponential_moving_average,
    O.extend_with_parameter_wise_lr,
]
ALL_ARGUMENTS = dict(
    learning_rate=0.01,
    weight_decay_rate=0.01,
    exclude_from_weight_decay=["Norm", "bias"],
    exclude_from_layer_adaptation=["Norm", "bias"],
    lr_schedule={4: 1.0, 1000: 0.1},
    grad_accum_steps=2,
    steps_per_slow_update=3,
    slow_step_size=0.5,
    include_in_lazy_optimization=["Embedding"],
    ema_momentum=0.9,
    paramwise_lr_schedule={"Embedding": 0.5},
)


def compose(extensions, name, base=O.Adam):
    optimizer_class = base
    for extend in extensions[:-1]:
        optimizer_class = extend(optimizer_class)
    return extensions[-1](optimizer_class, name=name)


@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_all_eight_serialize_by_name_in_either_order(order):
    extensions = EXTENSIONS if order == "forward" else EXTENSIONS[::-1]
    arguments = dict(ALL_ARGUMENTS)
    if order == "reversed":
        arguments["learning_rate"] = O.WarmupLinearDecay(0.01, warmup_steps=10, total_steps=100)
    optimizer = compose(extensions, name=f"TestAllEight{order}")(**arguments)
    config = json.loads(json.dumps(keras.optimizers.serialize(optimizer)))  # as in a .keras file
    assert config["registered_name"] == f"bert4k>TestAllEight{order}"
    restored = keras.optimizers.deserialize(config)
    assert type(restored) is type(optimizer)
    assert restored.get_config() == optimizer.get_config()


BASE_OPTIMIZERS = {
    "Adam": O.Adam,
    "Adamax": O.Adamax,
    "Lion": O.Lion,
    "AdaFactor": O.AdaFactor,
    "Lamb": keras.optimizers.Lamb,
    "SGD": keras.optimizers.SGD,
}


@pytest.mark.parametrize("base", sorted(BASE_OPTIMIZERS))
def test_all_eight_extend_every_base_optimizer(base):
    optimizer = compose(EXTENSIONS, name=f"TestAllEightOn{base}", base=BASE_OPTIMIZERS[base])(
        **ALL_ARGUMENTS)
    variables = layer_variables()
    initial = values(variables)
    apply_steps(optimizer, variables, fixed_gradients(variables, steps=2 * 3))  # 3 real updates
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 3
    assert all(np.all(np.isfinite(v)) for v in values(variables))
    assert not np.allclose(values(variables)[0], initial[0])
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert restored.get_config() == optimizer.get_config()


def train_steps(model, tokens, targets, steps):
    for start in range(0, 4 * steps, 4):
        model.train_on_batch(tokens[start:start + 4], targets[start:start + 4])


def test_keras_file_restores_class_config_and_state(tmp_path):
    tokens, targets = regression_data(samples=32)
    optimizer = compose(EXTENSIONS, name="TestSavedAllEight")(**ALL_ARGUMENTS)
    model = small_model()
    model.compile(optimizer, "mse")
    train_steps(model, tokens, targets, steps=5)  # mid-cycle: the gradient sums are not empty
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)

    assert type(loaded.optimizer) is type(optimizer)
    assert loaded.optimizer.get_config() == optimizer.get_config()
    assert_same_values(loaded.optimizer.variables, optimizer.variables, atol=0)
    # Restored state continues exactly as the original.
    train_steps(model, tokens[20:], targets[20:], steps=3)
    train_steps(loaded, tokens[20:], targets[20:], steps=3)
    assert_same_values(loaded.trainable_variables, model.trainable_variables)


@pytest.mark.tensorflow_only("tf.train.Checkpoint of Keras variables")
def test_tf_checkpoint_restores_optimizer_state(tmp_path):
    import tensorflow as tf

    tokens, targets = regression_data(samples=32)
    OptimizerClass = compose(EXTENSIONS, name="TestCheckpointAllEight")
    model = small_model()
    model.compile(OptimizerClass(**ALL_ARGUMENTS), "mse")
    train_steps(model, tokens, targets, steps=5)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))

    fresh = small_model()
    fresh.compile(OptimizerClass(**ALL_ARGUMENTS), "mse")
    fresh.optimizer.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(path).assert_consumed()
    assert_same_values(fresh.optimizer.variables, model.optimizer.variables, atol=0)
    assert_same_values(fresh.trainable_variables, model.trainable_variables, atol=0)


def sentiment_like_data(samples=128, length=12, seed=0):
    """Label 1 when token 7 occurs: a one-layer BERT learns it in a few dozen updates."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(10, 120, size=(samples, length)).astype("int32")
    labels = (np.arange(samples) % 2).astype("int32")
    positions = rng.randint(1, length, size=samples)
    tokens[labels == 1, positions[labels == 1]] = 7
    tokens[:, 0] = 2  # [CLS]
    return [tokens, np.zeros_like(tokens)], labels


def tiny_bert_classifier(tiny_config):
    from bert4k.models import build_transformer_model

    bert = build_transformer_model(with_pool=True, **tiny_config)
    probabilities = keras.layers.Dense(2, activation="softmax", name="Classifier")(bert.output)
    return keras.Model(bert.inputs, probabilities)


# One transformer layer: the graph of eight extensions on every variable takes a while to trace.
BERT_LAYERS = 1
BERT_ARGUMENTS = dict(ALL_ARGUMENTS, learning_rate=0.08, lr_schedule={4: 1.0, 100: 0.5})
BERT_EPOCHS = 12


def test_all_eight_train_a_tiny_bert_classifier(tiny_config):
    inputs, labels = sentiment_like_data()
    model = tiny_bert_classifier(dict(tiny_config, num_hidden_layers=BERT_LAYERS))
    optimizer = compose(EXTENSIONS, name="TestBertAllEight")(**BERT_ARGUMENTS)
    model.compile(optimizer, "sparse_categorical_crossentropy")
    before = model.evaluate(inputs, labels, verbose=0)
    model.fit(inputs, labels, batch_size=16, epochs=BERT_EPOCHS, verbose=0)
    after = model.evaluate(inputs, labels, verbose=0)
    assert after < 0.5 * before, (before, after)
    optimizer.apply_ema_weights()
    assert model.evaluate(inputs, labels, verbose=0) < before
    optimizer.reset_old_weights()


MIRRORED_SCRIPT = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
sys.path.insert(0, {tests!r})
import test_optimizers as T
from conftest import TINY_CONFIG

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
result = {{"replicas": strategy.num_replicas_in_sync}}

# All eight on a tiny BERT.
inputs, labels = T.sentiment_like_data()
keras.utils.set_random_seed(1234)
with strategy.scope():
    model = T.tiny_bert_classifier(dict(TINY_CONFIG, num_hidden_layers=T.BERT_LAYERS))
    optimizer = T.compose(T.EXTENSIONS, name="MirroredAllEight")(**T.BERT_ARGUMENTS)
    model.compile(optimizer, "sparse_categorical_crossentropy")
result["before"] = model.evaluate(inputs, labels, verbose=0)
model.fit(inputs, labels, batch_size=16, epochs=T.BERT_EPOCHS, verbose=0)
result["after"] = model.evaluate(inputs, labels, verbose=0)
result["updates"] = int(optimizer.iterations.numpy())
optimizer.apply_ema_weights()
result["ema"] = model.evaluate(inputs, labels, verbose=0)
optimizer.reset_old_weights()
result["reset"] = model.evaluate(inputs, labels, verbose=0)

# In a custom loop, two replicas end where one device does: all eight (so accumulation across
# replicas also equals one step on the concatenated batch, as tested on one device), and Adam
# alone and with weight decay (TensorFlow's fused Adam kernel, on each replica's variables).
def custom_loop(strategy, make_optimizer):
    tokens, targets = T.regression_data(samples=32)
    with strategy.scope():
        model = T.small_model()
        optimizer = make_optimizer()
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.MeanSquaredError(reduction="sum")

    @tf.function
    def train_step(tokens, targets):
        def replica_step(tokens, targets):
            with tf.GradientTape() as tape:
                loss = loss_fn(targets, model(tokens)) / 8.0  # global batch of 8
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(gradients, model.trainable_variables)
        strategy.run(replica_step, args=(tokens, targets))

    dataset = tf.data.Dataset.from_tensor_slices((tokens, targets)).batch(8).repeat(2)
    for batch in strategy.experimental_distribute_dataset(dataset):
        train_step(*batch)
    return [w.numpy() for w in model.trainable_variables], int(optimizer.iterations.numpy())

optimizers = dict(
    all_eight=lambda: T.compose(T.EXTENSIONS, name="LoopAllEight")(**T.ALL_ARGUMENTS),
    adam=lambda: T.O.Adam(learning_rate=0.01),
    adamw=lambda: T.O.extend_with_weight_decay(T.O.Adam, name="LoopAdamW")(
        learning_rate=0.01, weight_decay_rate=0.1),
)
for name, make_optimizer in optimizers.items():
    single, single_updates = custom_loop(tf.distribute.get_strategy(), make_optimizer)
    mirrored, mirrored_updates = custom_loop(strategy, make_optimizer)
    result[name + "_gap"] = max(float(np.abs(a - b).max()) for a, b in zip(single, mirrored))
    result[name + "_updates"] = [single_updates, mirrored_updates]
print("RESULT " + json.dumps(result))
"""


@pytest.mark.tensorflow_only("tf.distribute.MirroredStrategy")
def test_all_eight_under_mirrored_strategy_with_two_cpus():
    script = MIRRORED_SCRIPT.format(tests=str(ROOT / "tests"))
    environment = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               cwd=ROOT, env=environment, timeout=300)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and lines, completed.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["replicas"] == 2
    assert result["after"] < 0.5 * result["before"], result
    assert result["updates"] == BERT_EPOCHS * 128 // (16 * 2)
    assert result["ema"] < result["before"] and result["reset"] == pytest.approx(result["after"])
    assert result["all_eight_gap"] < 1e-5 and result["all_eight_updates"] == [4, 4], result
    for name in ("adam", "adamw"):
        assert result[name + "_gap"] < 1e-5 and result[name + "_updates"] == [8, 8], result
