"""Task heads: ConditionalRandomField, GlobalPointer, EfficientGlobalPointer, the Loss layer, and
the multi-label cross-entropies they train with.

Expectations are independent: brute force over every label path, the formulas written out in
NumPy, or toy tasks that a correct head learns perfectly. Never the layers' own recorded outputs.
"""

import itertools

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

from bert4k import backend as K
from bert4k.layers import (
    PADDING_SCORE,
    ConditionalRandomField,
    EfficientGlobalPointer,
    GlobalPointer,
    Loss,
)
from bert4k.snippets import ViterbiDecoder


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def padding_mask(lengths, max_length, pad_left=None):
    """[batch, max_length] of 0/1: row b has lengths[b] tokens, padded on the right, or on the
    left where pad_left[b]."""
    mask = np.zeros((len(lengths), max_length), "int32")
    for row, length in enumerate(lengths):
        if pad_left is not None and pad_left[row]:
            mask[row, max_length - length :] = 1
        else:
            mask[row, :length] = 1
    return mask


# -- CRF against brute force --------------------------------------------------------------------


def path_score(emissions, trans, path):
    emission = sum(emissions[t, label] for t, label in enumerate(path))
    return emission + sum(trans[a, b] for a, b in zip(path[:-1], path[1:]))


def all_paths(length, num_labels):
    return list(itertools.product(range(num_labels), repeat=length))


def brute_force_nll(emissions, trans, gold):
    """log of the sum over every label path of exp(score), minus the gold path's score."""
    emissions = emissions.astype(np.float64)
    scores = [path_score(emissions, trans, p) for p in all_paths(len(emissions), len(trans))]
    return np.logaddexp.reduce(scores) - path_score(emissions, trans, gold)


@settings(max_examples=30, deadline=None)
@given(
    length=st.integers(1, 5),
    num_labels=st.integers(1, 4),
    mask_route=st.sampled_from(["none", "keras_mask", "second_input"]),
    lr_multiplier=st.sampled_from([1, 4]),
    seed=st.integers(0, 2**16),
)
def test_crf_loss_is_log_partition_minus_gold_path(
    length, num_labels, mask_route, lr_multiplier, seed
):
    rng = np.random.default_rng(seed)
    batch = 4
    emissions = rng.normal(scale=2.0, size=(batch, length, num_labels)).astype("float32")
    labels = rng.integers(0, num_labels, size=(batch, length))
    if mask_route == "none":
        mask = np.ones((batch, length), "int32")
    else:  # padding on either side, empty rows included
        mask = padding_mask(rng.integers(0, length + 1, batch), length, rng.random(batch) < 0.5)

    crf = ConditionalRandomField(lr_multiplier=lr_multiplier)
    if mask_route == "none":
        scores = crf(emissions)
    elif mask_route == "keras_mask":
        scores = crf(emissions, mask=mask.astype(bool))
    else:
        scores = crf([emissions, mask])
    trans = to_numpy(crf.trans).astype(np.float64)

    tokens = mask.astype(bool)
    expected = [
        brute_force_nll(emissions[b][tokens[b]], trans, labels[b][tokens[b]]) for b in range(batch)
    ]
    sparse = to_numpy(crf.negative_log_likelihood(labels, scores))
    one_hot = np.eye(num_labels, dtype="float32")[labels]
    dense = to_numpy(crf.negative_log_likelihood(one_hot, scores, one_hot=True))
    np.testing.assert_allclose(sparse, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dense, expected, rtol=1e-5, atol=1e-4)
    # The Keras loss objects average over the batch; labels may come as [batch, length, 1].
    batch_mean = np.mean(expected)
    sparse_loss = to_numpy(crf.sparse_loss(labels[..., None], scores))
    np.testing.assert_allclose(sparse_loss, batch_mean, rtol=1e-5, atol=1e-4)
    dense_loss = to_numpy(crf.dense_loss(one_hot, scores))
    np.testing.assert_allclose(dense_loss, batch_mean, rtol=1e-5, atol=1e-4)


def test_crf_marks_padding_and_leaves_tokens_alone():
    emissions = np.random.default_rng(0).normal(size=(2, 4, 3)).astype("float32")
    mask = padding_mask([4, 2], 4)
    crf = ConditionalRandomField()
    np.testing.assert_array_equal(to_numpy(crf(emissions)), emissions)
    scores = to_numpy(crf([emissions, mask]))
    np.testing.assert_array_equal(scores[mask == 1], emissions[mask == 1])
    assert np.all(scores[mask == 0] == PADDING_SCORE)


def test_crf_accuracy_counts_unpadded_tokens_only():
    emissions = np.array([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]] * 2, "float32")  # argmax 0, 1, 0
    labels = np.array([[0, 1, 1], [0, 0, 1]])
    crf = ConditionalRandomField()
    scores = crf([emissions, padding_mask([3, 2], 3)])
    # Row 0: 2 of 3 right; row 1: 1 of its 2 tokens right.
    assert float(to_numpy(crf.sparse_accuracy(labels, scores))) == pytest.approx(3 / 5)
    one_hot = np.eye(2, dtype="float32")[labels]
    assert float(to_numpy(crf.dense_accuracy(one_hot, scores))) == pytest.approx(3 / 5)


@pytest.mark.parametrize("seed", range(5))
def test_viterbi_with_crf_transitions_is_the_best_path(seed):
    rng = np.random.default_rng(seed)
    length, num_labels = rng.integers(1, 6), rng.integers(2, 5)
    emissions = rng.normal(scale=2.0, size=(length, num_labels))
    crf = ConditionalRandomField()
    crf.build((None, None, num_labels))
    trans = to_numpy(crf.trans)
    best = max(all_paths(length, num_labels), key=lambda p: path_score(emissions, trans, p))
    assert list(ViterbiDecoder(trans).decode(emissions)) == list(best)


def test_lr_multiplier_scales_the_transitions_step():
    """The variable holds trans / m, so Adam's first step (about lr per entry on the variable)
    moves the transitions m * lr."""
    multiplier, learning_rate, num_labels = 10, 1e-3, 3
    crf = ConditionalRandomField(lr_multiplier=multiplier)
    emissions = keras.Input((5, num_labels))
    model = keras.Model(emissions, crf(emissions))
    np.testing.assert_allclose(crf.get_weights()[0] * multiplier, to_numpy(crf.trans), rtol=1e-6)

    model.compile(keras.optimizers.Adam(learning_rate), loss=crf.sparse_loss)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5, num_labels)).astype("float32")
    y = rng.integers(0, num_labels, size=(8, 5))
    before = to_numpy(crf.trans)
    model.train_on_batch(x, y)
    step = np.abs(to_numpy(crf.trans) - before)
    np.testing.assert_allclose(step, multiplier * learning_rate, rtol=0.05)


# -- CRF learns a tagging task that needs its transitions -----------------------------------------

O, B, I = 0, 1, 2  # noqa: E741 (the tag names)
MARK, JOINERS, FILLERS, CLS = 1, (2, 3), (4, 5), 6


def toy_tags(tokens):
    """A marker is B; a joiner right after B or I is I, elsewhere O; fillers and CLS are O. A
    joiner's tag depends on the previous tag, which only the CRF's transitions can see in this
    model. (Sequences start with CLS, as BERT's do: a CRF has no start transitions, so a joiner
    in the first position could not be told from one after B.)"""
    tags, previous = [], O
    for token in tokens:
        if token == MARK:
            tag = B
        elif token in JOINERS and previous in (B, I):
            tag = I
        else:
            tag = O
        tags.append(tag)
        previous = tag
    return tags


def toy_tagging_data(count, max_length, rng):
    tokens = np.zeros((count, max_length), "int32")
    tags = np.zeros((count, max_length), "int32")
    for row in range(count):
        length = rng.integers(4, max_length + 1)
        tokens[row, 0] = CLS
        tokens[row, 1:length] = rng.choice(
            [MARK, 2, 3, 4, 5], size=length - 1, p=[0.25, 0.25, 0.25, 0.15, 0.1]
        )
        tags[row, :length] = toy_tags(tokens[row, :length])
    return tokens, tags


def test_crf_tagger_learns_a_transition_dependent_rule():
    rng = np.random.default_rng(0)
    x_train, y_train = toy_tagging_data(256, 10, rng)
    x_test, y_test = toy_tagging_data(128, 10, rng)

    token_ids = keras.Input((None,), dtype="int32")
    # One emission score per tag and token: the CRF's loss is then convex, and training is quick.
    emissions = keras.layers.Embedding(7, 3, mask_zero=True)(token_ids)
    crf = ConditionalRandomField(lr_multiplier=2)
    model = keras.Model(token_ids, crf(emissions))
    model.compile(keras.optimizers.Adam(0.1), loss=crf.sparse_loss, metrics=[crf.sparse_accuracy])
    model.fit(x_train, y_train, batch_size=32, epochs=8, verbose=0)

    scores = to_numpy(model(x_test))
    decoder = ViterbiDecoder(to_numpy(crf.trans))
    lengths = (x_test > 0).sum(axis=1)
    predicted = [decoder.decode(s[:n]) for s, n in zip(scores, lengths)]
    gold = [y[:n] for y, n in zip(y_test, lengths)]
    assert all(np.array_equal(p, g) for p, g in zip(predicted, gold))
    # The emissions alone cannot do it: a joiner scores the same after B as after O.
    emission_accuracy = float(to_numpy(crf.sparse_accuracy(y_test, scores)))
    assert emission_accuracy < 1.0


# -- GlobalPointer ---------------------------------------------------------------------------------

GLOBAL_POINTERS = [GlobalPointer, EfficientGlobalPointer]


def rotate_numpy(x, head_size):
    """RoPE by hand: pair (2i, 2i+1) at position t turns by t * 10000^(-2i / head_size).
    x: [batch, length, ..., head_size]."""
    length = x.shape[1]
    theta = 10000.0 ** (-2.0 * np.arange(head_size // 2) / head_size)
    angle = np.arange(length)[:, None] * theta[None, :]  # [length, head_size // 2]
    angle = angle.reshape((1, length) + (1,) * (x.ndim - 3) + (head_size // 2,))
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = np.empty_like(x)
    rotated[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    rotated[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return rotated


def dense_numpy(layer, x):
    return x @ to_numpy(layer.kernel).astype(np.float64) + to_numpy(layer.bias)


def global_pointer_numpy(layer, hidden):
    heads, size = layer.heads, layer.head_size
    projected = dense_numpy(layer.dense, hidden)
    projected = projected.reshape(hidden.shape[:2] + (heads, 2 * size))
    query = rotate_numpy(projected[..., :size], size)
    key = rotate_numpy(projected[..., size:], size)
    return np.einsum("bmhd,bnhd->bhmn", query, key) / np.sqrt(size)


def efficient_global_pointer_numpy(layer, hidden):
    size = layer.head_size
    projected = dense_numpy(layer.p_dense, hidden)
    query = rotate_numpy(projected[..., 0::2], size)
    key = rotate_numpy(projected[..., 1::2], size)
    shared = np.einsum("bmd,bnd->bmn", query, key) / np.sqrt(size)
    token_bias = dense_numpy(layer.q_dense, projected) / 2  # [batch, length, 2 * heads]
    end = token_bias[..., 0::2].transpose(0, 2, 1)[:, :, None, :]  # by end position n
    start = token_bias[..., 1::2].transpose(0, 2, 1)[:, :, :, None]  # by start position m
    return shared[:, None] + end + start


@pytest.mark.parametrize(
    "cls, reference",
    [
        (GlobalPointer, global_pointer_numpy),
        (EfficientGlobalPointer, efficient_global_pointer_numpy),
    ],
)
def test_global_pointer_scores_equal_a_direct_rope_computation(cls, reference):
    hidden = np.random.default_rng(0).normal(size=(2, 7, 12)).astype("float32")
    layer = cls(heads=3, head_size=8)
    layer.build(hidden.shape)
    rng = np.random.default_rng(1)
    # Random biases too: zero-initialised ones would go untested.
    layer.set_weights([rng.normal(scale=0.3, size=w.shape) for w in layer.get_weights()])
    scores = to_numpy(layer(hidden))
    expected = reference(layer, hidden.astype(np.float64))
    upper = np.triu(np.ones((7, 7), bool))
    np.testing.assert_allclose(scores[..., upper], expected[..., upper], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", GLOBAL_POINTERS)
def test_global_pointer_masks_padding_and_the_lower_triangle(cls):
    hidden = np.random.default_rng(0).normal(size=(2, 5, 12)).astype("float32")
    mask = padding_mask([5, 3], 5)
    layer = cls(heads=2, head_size=8)
    explicit = to_numpy(layer([hidden, mask]))
    by_keras_mask = to_numpy(layer(hidden, mask=mask.astype(bool)))
    np.testing.assert_array_equal(explicit, by_keras_mask)

    tokens = mask.astype(bool)
    both_tokens = tokens[:, None, :, None] & tokens[:, None, None, :]
    upper = np.triu(np.ones((5, 5), bool))[None, None]
    valid = np.broadcast_to(both_tokens & upper, explicit.shape)
    assert np.all(explicit[~valid] == PADDING_SCORE)
    assert np.all(np.abs(explicit[valid]) < 1e3)

    untriangled = to_numpy(cls(heads=2, head_size=8, tril_mask=False)([hidden, mask]))
    assert np.all(np.abs(untriangled[np.broadcast_to(both_tokens, explicit.shape)]) < 1e3)
    assert np.all(untriangled[np.broadcast_to(~both_tokens, explicit.shape)] == PADDING_SCORE)


def test_global_pointer_without_rope_ignores_position():
    """Without RoPE, the same two tokens score the same wherever they stand."""
    vector = np.random.default_rng(0).normal(size=(12,)).astype("float32")
    hidden = np.tile(vector, (1, 6, 1))
    scores = to_numpy(GlobalPointer(heads=1, head_size=8, RoPE=False, tril_mask=False)(hidden))
    np.testing.assert_allclose(scores, np.full_like(scores, scores[0, 0, 0, 0]), rtol=1e-5)
    with_rope = to_numpy(GlobalPointer(heads=1, head_size=8, tril_mask=False)(hidden))
    assert not np.allclose(with_rope[0, 0, 0, 1], with_rope[0, 0, 0, 4])


# -- GlobalPointer learns a span task --------------------------------------------------------------

# Type 0 spans run from token 1 to token 2, type 1 spans from token 3 to token 4; 5..9 are filler.
SPAN_MARKERS = [(1, 2), (3, 4)]


def toy_span_data(count, max_length, rng):
    tokens = np.zeros((count, max_length), "int32")
    spans = []
    for row in range(count):
        length = rng.integers(5, max_length + 1)
        tokens[row, :length] = rng.integers(5, 10, size=length)
        free = list(rng.permutation(length))
        row_spans = set()
        for kind, (start_token, end_token) in enumerate(SPAN_MARKERS):
            if rng.random() < 0.7:
                start, end = sorted([free.pop(), free.pop()])
                tokens[row, start], tokens[row, end] = start_token, end_token
                row_spans.add((kind, start, end))
        spans.append(row_spans)
    return tokens, spans


def span_targets(spans, heads, max_length):
    targets = np.zeros((len(spans), heads, max_length, max_length), "float32")
    for row, row_spans in enumerate(spans):
        for kind, start, end in row_spans:
            targets[row, kind, start, end] = 1
    return targets


def global_pointer_loss(y_true, y_pred):
    """Multi-label cross-entropy over all spans of one head, as bert4keras's examples train."""
    rows = ops.shape(y_pred)[0] * ops.shape(y_pred)[1]
    y_true, y_pred = ops.reshape(y_true, (rows, -1)), ops.reshape(y_pred, (rows, -1))
    return K.multilabel_categorical_crossentropy(y_true, y_pred)


def span_f1(scores, spans):
    predicted = [{tuple(s) for s in np.argwhere(row > 0)} for row in scores]
    true_positives = sum(len(p & g) for p, g in zip(predicted, spans))
    return 2 * true_positives / (sum(map(len, predicted)) + sum(map(len, spans)))


@pytest.mark.parametrize("cls", GLOBAL_POINTERS)
def test_global_pointer_learns_marked_spans(cls):
    rng = np.random.default_rng(0)
    x_train, train_spans = toy_span_data(256, 12, rng)
    x_test, test_spans = toy_span_data(128, 12, rng)

    token_ids = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Embedding(10, 32, mask_zero=True)(token_ids)
    model = keras.Model(token_ids, cls(heads=2, head_size=16)(hidden))
    model.compile(keras.optimizers.Adam(0.02), loss=global_pointer_loss)
    model.fit(x_train, span_targets(train_spans, 2, 12), batch_size=64, epochs=6, verbose=0)

    assert span_f1(to_numpy(model(x_test)), test_spans) == 1.0


# -- multi-label cross-entropy ---------------------------------------------------------------------


def multilabel_numpy(y_true, y_pred):
    """log(1 + sum over negatives of e^s) + log(1 + sum over positives of e^-s)."""
    y_pred = y_pred.astype(np.float64)
    negatives = np.where(y_true == 0, np.exp(y_pred), 0.0).sum(-1)
    positives = np.where(y_true == 1, np.exp(-y_pred), 0.0).sum(-1)
    return np.log1p(negatives) + np.log1p(positives)


def test_multilabel_crossentropy_equals_the_formula():
    rng = np.random.default_rng(0)
    y_pred = rng.normal(scale=3.0, size=(4, 3, 20)).astype("float32")
    y_true = (rng.random((4, 3, 20)) < 0.2).astype("float32")
    y_true[0, 0] = 0  # a row without positives
    actual = to_numpy(K.multilabel_categorical_crossentropy(y_true, y_pred))
    np.testing.assert_allclose(actual, multilabel_numpy(y_true, y_pred), rtol=1e-5, atol=1e-5)


def test_sparse_multilabel_crossentropy_equals_dense():
    rng = np.random.default_rng(1)
    num_classes, batch = 12, 16
    y_pred = rng.normal(scale=2.0, size=(batch, num_classes)).astype("float32")
    positives = np.stack([rng.permutation(num_classes)[:3] for _ in range(batch)])
    y_true = np.zeros((batch, num_classes), "float32")
    np.put_along_axis(y_true, positives, 1.0, axis=-1)
    sparse = to_numpy(K.sparse_multilabel_categorical_crossentropy(positives, y_pred))
    np.testing.assert_allclose(sparse, multilabel_numpy(y_true, y_pred), rtol=1e-4, atol=1e-4)
    dense = to_numpy(K.multilabel_categorical_crossentropy(y_true, y_pred))
    np.testing.assert_allclose(sparse, dense, rtol=1e-4, atol=1e-4)


def test_sparse_multilabel_crossentropy_with_mask_zero_skips_class_zero():
    """With mask_zero, index 0 pads the positive lists and class 0 is never scored, so it equals
    the dense loss over classes 1.."""
    rng = np.random.default_rng(2)
    num_classes, batch, width = 12, 16, 4
    y_pred = rng.normal(scale=2.0, size=(batch, num_classes)).astype("float32")
    positives = np.zeros((batch, width), "int32")
    y_true = np.zeros((batch, num_classes), "float32")
    for row in range(batch):
        count = rng.integers(0, width + 1)
        chosen = rng.permutation(np.arange(1, num_classes))[:count]
        positives[row, :count] = chosen
        y_true[row, chosen] = 1.0
    sparse = K.sparse_multilabel_categorical_crossentropy(positives, y_pred, mask_zero=True)
    sparse = to_numpy(sparse)
    expected = multilabel_numpy(y_true[:, 1:], y_pred[:, 1:])
    np.testing.assert_allclose(sparse, expected, rtol=1e-4, atol=1e-4)
    dense = to_numpy(K.multilabel_categorical_crossentropy(y_true[:, 1:], y_pred[:, 1:]))
    np.testing.assert_allclose(sparse, dense, rtol=1e-4, atol=1e-4)


# -- Loss layer ------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="bert4k_tests")
class SquaredErrorLoss(Loss):
    def compute_loss(self, inputs, mask=None):
        y_true, y_pred = inputs
        return ops.mean(ops.square(y_true - y_pred))


def regression_model(output_axis=1):
    x, y = keras.Input((4,)), keras.Input((1,))
    prediction = keras.layers.Dense(1, name="linear")(x)
    return keras.Model([x, y], SquaredErrorLoss(output_axis=output_axis)([y, prediction]))


def test_loss_layer_trains_a_model_compiled_without_a_loss():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype("float32")
    weights = np.array([[1.0], [2.0], [-1.0], [0.5]], "float32")
    model = regression_model()
    model.compile(keras.optimizers.SGD(0.3))  # full-batch gradient descent: quick on this problem
    model.fit([x, x @ weights], batch_size=256, epochs=40, verbose=0)
    model([x, x @ weights])  # an eager call leaves the layer's loss in model.losses
    assert float(to_numpy(model.losses[0])) < 1e-4
    np.testing.assert_allclose(model.get_layer("linear").get_weights()[0], weights, atol=1e-2)


def test_loss_layer_selects_its_outputs():
    assert len(regression_model(output_axis=None).outputs) == 2
    assert len(regression_model(output_axis=[1, 0]).outputs) == 2
    assert regression_model(output_axis=1).outputs[0].shape == (None, 1)
    with pytest.raises(NotImplementedError):
        Loss()([np.zeros((1, 1)), np.zeros((1, 1))])


# -- serialization ---------------------------------------------------------------------------------


LAYERS = [
    lambda: ConditionalRandomField(lr_multiplier=5),
    lambda: GlobalPointer(heads=2, head_size=8, use_bias=False, tril_mask=False),
    lambda: EfficientGlobalPointer(heads=2, head_size=8, RoPE=False),
    lambda: SquaredErrorLoss(output_axis=0),
]


@pytest.mark.parametrize("make_layer", LAYERS)
def test_get_config_round_trip(make_layer):
    layer = make_layer()
    inputs = np.random.default_rng(0).normal(size=(2, 5, 6)).astype("float32")
    args = [inputs, inputs] if isinstance(layer, Loss) else inputs
    expected = to_numpy(layer(args))
    copy = type(layer).from_config(layer.get_config())
    copy(args)
    copy.set_weights(layer.get_weights())
    assert copy.get_config() == layer.get_config()
    np.testing.assert_array_equal(to_numpy(copy(args)), expected)


@pytest.mark.parametrize("cls", GLOBAL_POINTERS)
def test_global_pointer_model_saves_and_loads(cls, tmp_path):
    token_ids = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Embedding(10, 16, mask_zero=True)(token_ids)
    model = keras.Model(token_ids, cls(heads=2, head_size=8)(hidden))
    path = tmp_path / "pointer.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    x, _ = toy_span_data(4, 9, np.random.default_rng(0))
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


def test_loss_layer_model_saves_and_loads(tmp_path):
    model = regression_model()
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = x[:, :1]
    path = tmp_path / "loss.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(to_numpy(loaded([x, y])), to_numpy(model([x, y])))
    assert isinstance(loaded.layers[-1], SquaredErrorLoss)
    squared_error = np.mean((y - to_numpy(model([x, y]))) ** 2)
    assert float(to_numpy(loaded.losses[0])) == pytest.approx(float(squared_error))


# Saved before a training step, the optimizer has fewer variables than the one Keras builds on load.
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_compiled_crf_model_saves_and_loads_with_its_loss(tmp_path):
    rng = np.random.default_rng(0)
    x, y = toy_tagging_data(32, 8, rng)
    token_ids = keras.Input((None,), dtype="int32")
    hidden = keras.layers.Embedding(7, 8, mask_zero=True)(token_ids)
    crf = ConditionalRandomField(lr_multiplier=5, name="crf")
    model = keras.Model(token_ids, crf(keras.layers.Dense(3)(hidden)))
    model.compile("adam", loss=crf.sparse_loss, metrics=[crf.sparse_accuracy])
    path = tmp_path / "crf.keras"
    model.save(path)

    loaded = keras.models.load_model(path, safe_mode=True)
    loaded_crf = loaded.get_layer("crf")
    np.testing.assert_array_equal(loaded_crf.get_weights()[0], crf.get_weights()[0])
    np.testing.assert_array_equal(to_numpy(loaded_crf.trans), to_numpy(crf.trans))
    scores = to_numpy(model(x))
    np.testing.assert_array_equal(to_numpy(loaded(x)), scores)
    original_loss = to_numpy(model.loss(y, scores))
    np.testing.assert_allclose(to_numpy(loaded.loss(y, scores)), original_loss, rtol=1e-6)
    # The loaded loss reads the loaded model's own transitions, not the original's.
    loaded_crf.set_weights([np.random.default_rng(1).normal(size=(3, 3))])
    assert not np.allclose(to_numpy(loaded.loss(y, scores)), original_loss)
    # and fit trains them.
    before = to_numpy(loaded_crf.trans)
    loaded.fit(x, y, epochs=1, verbose=0)
    assert not np.allclose(to_numpy(loaded_crf.trans), before)
