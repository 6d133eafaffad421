"""Tests for bert4k.snippets and bert4k.feeding (through snippets, as scripts import them) against
hand-built arrays, closed forms and brute force."""

import itertools
import math
import os
import platform
import random
import resource
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bert4k import snippets
from conftest import TINY_CONFIG
from bert4k.snippets import (
    DataGenerator,
    ViterbiDecoder,
    longest_common_subsequence,
    longest_common_substring,
    parallel_apply,
    parallel_apply_generator,
    sequence_padding,
    text_segmentate,
    truncate_sequences,
)


# --- workers for parallel_apply: module level so that processes can import them under any start method ---


def square(x):
    return x * x


def fail_on_seven(x):
    if x == 7:
        raise ValueError(f"item {x} is bad")
    return x


# ----------------------------------------------------------------------------------------------------------
# sequence_padding
# ----------------------------------------------------------------------------------------------------------


def test_padding_post_and_pre_against_hand_built_arrays():
    inputs = [[1, 2, 3], [4], [5, 6]]
    post = np.array([[1, 2, 3], [4, 0, 0], [5, 6, 0]])
    pre = np.array([[1, 2, 3], [0, 0, 4], [0, 5, 6]])
    np.testing.assert_array_equal(sequence_padding(inputs), post)
    np.testing.assert_array_equal(sequence_padding(inputs, mode="pre"), pre)


def test_padding_value_truncation_and_fixed_length():
    inputs = [[1, 2, 3, 4], [5]]
    np.testing.assert_array_equal(
        sequence_padding(inputs, length=2, value=-1), np.array([[1, 2], [5, -1]])
    )
    # 'pre' still keeps the beginning of a long sequence, as in bert4keras
    np.testing.assert_array_equal(
        sequence_padding(inputs, length=3, value=9, mode="pre"), np.array([[1, 2, 3], [9, 9, 5]])
    )
    np.testing.assert_array_equal(
        sequence_padding(inputs, length=6), np.array([[1, 2, 3, 4, 0, 0], [5, 0, 0, 0, 0, 0]])
    )


def test_padding_two_sequence_dims_with_tuple_length():
    a = np.array([[1, 2], [3, 4]])
    b = np.array([[5, 6, 7]])
    expected = np.array([[[1, 2, 0], [3, 4, 0]], [[5, 6, 7], [0, 0, 0]]])
    np.testing.assert_array_equal(sequence_padding([a, b], seq_dims=2), expected)
    expected_cut = np.array([[[1, 2], [3, 4], [0, 0]], [[5, 6], [0, 0], [0, 0]]])
    np.testing.assert_array_equal(sequence_padding([a, b], length=(3, 2), seq_dims=2), expected_cut)
    expected_pre = np.array([[[0, 1, 2], [0, 3, 4]], [[0, 0, 0], [5, 6, 7]]])
    np.testing.assert_array_equal(sequence_padding([a, b], seq_dims=2, mode="pre"), expected_pre)


def test_padding_keeps_feature_dims_and_dtype():
    vectors = [np.ones((2, 4), dtype=np.float32), np.full((1, 4), 2, dtype=np.float32)]
    out = sequence_padding(vectors)
    assert out.shape == (2, 2, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1], np.array([[2, 2, 2, 2], [0, 0, 0, 0]], dtype=np.float32))
    # an empty sequence must not turn integer ids into floats
    ids = sequence_padding([[], [3, 4]])
    assert ids.dtype.kind == "i"
    np.testing.assert_array_equal(ids, np.array([[0, 0], [3, 4]]))


def test_padding_rejects_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        sequence_padding([[1]], mode="middle")


ragged = st.lists(st.lists(st.integers(-100, 100), max_size=8), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(ragged, st.sampled_from(["post", "pre"]), st.one_of(st.none(), st.integers(0, 10)))
def test_padding_random_ragged_lists(sequences, mode, length):
    value = 7
    out = sequence_padding(sequences, length=length, value=value, mode=mode)
    width = max(len(s) for s in sequences) if length is None else length
    assert out.shape == (len(sequences), width)
    for row, seq in zip(out, sequences):
        kept = seq[:width]
        pad = [value] * (width - len(kept))
        assert row.tolist() == (kept + pad if mode == "post" else pad + kept)


# ----------------------------------------------------------------------------------------------------------
# truncate_sequences
# ----------------------------------------------------------------------------------------------------------


def test_truncate_pops_from_the_longest_in_place():
    first, second = [1, 2, 3, 4, 5], [6, 7, 8]
    result = truncate_sequences(5, -1, first, second)
    assert first == [1, 2] and second == [6, 7, 8]  # 5,3 -> 4,3 -> 3,3 -> tie goes to the first -> 2,3
    assert result[0] is first and result[1] is second


def test_truncate_index_keeps_special_tokens():
    first = ["[CLS]", "a", "b", "c", "[SEP]"]
    second = ["d", "[SEP]"]
    truncate_sequences(5, -2, first, second)
    assert first == ["[CLS]", "a", "[SEP]"] and second == ["d", "[SEP]"]
    first, second = [1, 2, 3, 4], [5, 6, 7, 8]
    truncate_sequences(4, [0, -1], first, second)  # one index per sequence
    assert first == [3, 4] and second == [5, 6]


def test_truncate_leaves_short_inputs_alone_and_keeps_empty_ones():
    first, second = [1, 2], []
    assert truncate_sequences(10, -1, first, second) == [[1, 2], []]


def _water_filled_lengths(lengths, maxlen):
    """Closed form of popping from the first longest: a common cap c, the spare budget to the last ones."""
    if sum(lengths) <= maxlen:
        return list(lengths)
    cap = max(c for c in range(max(lengths) + 1) if sum(min(l, c) for l in lengths) <= maxlen)
    spare = maxlen - sum(min(l, cap) for l in lengths)
    above = [k for k, l in enumerate(lengths) if l > cap]
    keep_extra = set(above[len(above) - spare :]) if spare else set()
    return [min(l, cap) + (k in keep_extra) for k, l in enumerate(lengths)]


@pytest.mark.parametrize("maxlen", [0, 1, 4, 7, 12])
def test_truncate_matches_closed_form(maxlen):
    for lengths in itertools.product(range(0, 7, 2), range(1, 6), range(0, 5)):
        sequences = [list(range(n)) for n in lengths]
        truncate_sequences(maxlen, -1, *sequences)
        assert [len(s) for s in sequences] == _water_filled_lengths(lengths, maxlen), lengths
        assert all(s == list(range(len(s))) for s in sequences)  # -1 pops from the end


# ----------------------------------------------------------------------------------------------------------
# text_segmentate
# ----------------------------------------------------------------------------------------------------------


def test_text_segmentate_splits_at_coarse_then_fine_separators():
    text = "今天天气很好，我们去公园玩。明天下雨，我们在家里看书，然后睡觉。"
    pieces = text_segmentate(text, 10, "。，")
    expected = ["今天天气很好，", "我们去公园玩。", "明天下雨，", "我们在家里看书，", "然后睡觉。"]
    assert pieces == expected
    assert text_segmentate(text, 100, "。，") == [text]


def test_text_segmentate_keeps_an_unsplittable_part_and_strips():
    assert text_segmentate("abcdefgh。ab", 4, "。") == ["abcdefgh。", "ab"]
    assert text_segmentate("  xx。yy  ", 3, "。", strips="。") == ["xx", "yy"]


sentences = st.lists(st.text(alphabet="abc", min_size=1, max_size=6), min_size=1, max_size=12)


@settings(max_examples=80, deadline=None)
@given(sentences, st.lists(st.sampled_from("。，"), min_size=12, max_size=12), st.integers(7, 20))
def test_text_segmentate_recovers_text_and_respects_maxlen(words, marks, maxlen):
    text = "".join(w + m for w, m in zip(words, marks))
    pieces = text_segmentate(text, maxlen, "。，")
    assert "".join(pieces) == text
    # every word plus its mark fits in maxlen, so every piece must too
    assert all(len(p) <= maxlen for p in pieces)
    assert all(pieces)


# ----------------------------------------------------------------------------------------------------------
# parallel_apply
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dummy", [True, False], ids=["threads", "processes"])
def test_parallel_apply_equals_map(dummy):
    items = list(range(60))
    expected = list(map(square, items))
    ordered = parallel_apply(square, items, 3, 5, dummy=dummy, unordered=False)
    assert ordered == expected
    unordered = parallel_apply(square, iter(items), 3, 5, dummy=dummy)
    assert sorted(unordered) == sorted(expected)
    received = []
    assert parallel_apply(square, items, 2, 4, callback=received.append, dummy=dummy) is None
    assert sorted(received) == sorted(expected)


@pytest.mark.parametrize("dummy", [True, False], ids=["threads", "processes"])
def test_parallel_apply_generator_yields_indexed_results(dummy):
    pairs = list(parallel_apply_generator(square, range(30), 2, 3, dummy=dummy))
    assert sorted(pairs) == [(i, i * i) for i in range(30)]


@pytest.mark.parametrize("dummy", [True, False], ids=["threads", "processes"])
def test_parallel_apply_raises_worker_error_in_caller(dummy):
    with pytest.raises(ValueError, match="item 7 is bad"):
        parallel_apply(fail_on_seven, range(20), 2, 4, dummy=dummy)


def test_parallel_apply_stops_early_when_the_caller_does():
    results = parallel_apply_generator(square, itertools.count(), 2, 4)  # endless input
    first = next(results)
    results.close()  # must terminate the workers rather than hang
    assert first[1] == first[0] ** 2


# ----------------------------------------------------------------------------------------------------------
# DataGenerator
# ----------------------------------------------------------------------------------------------------------


def make_samples(count=10):
    """(token ids of length 1-4, label) pairs; the first id is the sample number + 1 (0 is padding)."""
    return [([k + 1] + [k + 101] * (k % 4), k % 2) for k in range(count)]


class BatchGenerator(DataGenerator):
    def __iter__(self, random=False):
        ids, labels = [], []
        for is_end, (token_ids, label) in self.sample(random):
            ids.append(token_ids)
            labels.append([label])
            if len(ids) == self.batch_size or is_end:
                yield sequence_padding(ids), np.array(labels)
                ids, labels = [], []


class SampleGenerator(DataGenerator):
    """For to_dataset: yields single samples, tf.data batches them."""

    def __iter__(self, random=False):
        for _, (token_ids, label) in self.sample(random):
            yield token_ids, [label]


def sample_order(batches):
    return [int(row[0]) - 1 for ids, _ in batches for row in ids]


def test_generator_length_and_ordered_pass():
    generator = BatchGenerator(make_samples(10), batch_size=4)
    assert len(generator) == 3
    batches = list(generator.fortest())
    assert [len(ids) for ids, _ in batches] == [4, 4, 2]
    assert sample_order(batches) == list(range(10))
    np.testing.assert_array_equal(batches[2][0], np.array([[9, 0], [10, 110]]))


def test_sample_marks_only_the_last_item():
    generator = BatchGenerator(list("abc"), batch_size=2)
    assert list(generator.sample()) == [(False, "a"), (False, "b"), (True, "c")]
    assert list(BatchGenerator([], batch_size=2).sample()) == []


def test_forfit_cycles_and_reshuffles_each_epoch():
    np.random.seed(0)
    generator = BatchGenerator(make_samples(12), batch_size=4)
    stream = generator.forfit()
    epochs = [sample_order(itertools.islice(stream, len(generator))) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(12))
    assert len({tuple(order) for order in epochs}) == 3  # three different shuffles
    assert epochs[0] != list(range(12))


def test_sample_shuffles_unsized_data_through_a_buffer():
    np.random.seed(1)
    data = make_samples(30)
    generator = BatchGenerator((d for d in data), batch_size=4, buffer_size=5)  # no len()
    assert generator.steps is None
    with pytest.raises(TypeError, match="no length"):
        len(generator)
    order = [d[0][0] - 1 for _, d in generator.sample(random=True)]
    assert sorted(order) == list(range(30)) and order != list(range(30))


def test_forfit_refuses_to_spin_on_exhausted_data():
    generator = BatchGenerator(iter(make_samples(3)), batch_size=2)
    stream = generator.forfit(random=False)
    assert len(list(itertools.islice(stream, 2))) == 2
    with pytest.raises(ValueError, match="produced nothing"):
        next(stream)


# Page faults of 20 allocations of 8 MiB (2,048 pages, each written) after a generator dataset ran:
# about 20 x 2,048 when malloc maps every one from the kernel, about 2,048 when it reuses freed memory.
MALLOC_PROBE = """
import ctypes, resource, sys
import tensorflow as tf
from bert4k.snippets import DataGenerator

class Batches(DataGenerator):
    def __iter__(self, random=False):
        yield from self.data

batches = Batches([0], batch_size=1)
if sys.argv[1] == "to_dataset":
    batches.to_dataset("int32", [])
elif sys.argv[1] != "plain":
    getattr(batches, sys.argv[1])()
for _ in tf.data.Dataset.from_generator(lambda: iter(range(3)), output_signature=tf.TensorSpec((), tf.int32)):
    pass
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = libc.malloc(8 * 2**20)
    ctypes.memset(block, 1, 8 * 2**20)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults_after_a_generator_dataset(setting):
    result = subprocess.run([sys.executable, "-c", MALLOC_PROBE, setting], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
@pytest.mark.backends("tensorflow", reason="probes TensorFlow's own generator datasets: once a CI run")
def test_data_generators_keep_freed_memory_that_tensorflows_generator_datasets_give_back():
    pages = 20 * 8 * 2**20 // resource.getpagesize()
    assert page_faults_after_a_generator_dataset("plain") > pages // 2  # TensorFlow's own setting
    for entry in ("forfit", "fortest", "to_dataset", "to_pydataset"):
        assert page_faults_after_a_generator_dataset(entry) < pages // 5, entry


# Page faults of a jitted step whose temporaries (a 128 MiB product) are a block beyond glibc's 64 MiB
# thread heaps: about 33,000 a call when malloc maps it from the kernel every call, none once it
# comes from the main heap and stays there.
JAX_MALLOC_PROBE = """
import os, resource, sys
os.environ["KERAS_BACKEND"] = "jax"
import keras
from bert4k.snippets import keep_freed_memory
import jax
import jax.numpy as jnp
if sys.argv[1] == "after a computation":
    jnp.ones(3).block_until_ready()
acted = keep_freed_memory() if sys.argv[1] != "plain" else None
step = jax.jit(lambda x, w: (jnp.tanh(x @ w) @ w.T).sum())
x, w = jnp.ones((8192, 256)), jnp.full((256, 4096), 1e-3)
for _ in range(2):
    step(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step(x, w).block_until_ready()
print(acted, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
@pytest.mark.backends("jax", reason="probes XLA's CPU runtime in a JAX process: once a CI run")
def test_keep_freed_memory_on_jax_before_its_runtime_starts():
    def probe(setting):
        result = subprocess.run([sys.executable, "-c", JAX_MALLOC_PROBE, setting], capture_output=True,
                                text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert result.returncode == 0, result.stderr[-3000:]
        acted, faults = result.stdout.split()[-2:]
        return acted, int(faults)

    block_pages = 128 * 2**20 // resource.getpagesize()
    acted, faults = probe("plain")
    assert faults > block_pages // 2  # mapped and faulted in again at every call
    acted, faults = probe("first thing")
    assert acted == "True" and faults < block_pages // 20  # from the main heap, kept there
    acted, faults = probe("after a computation")  # JAX's threads keep their own heaps: too late
    assert acted == "False" and faults > block_pages // 2


def length_samples(count):
    """(token ids, label) pairs of lengths 1-40 in a fixed scrambled order; the first id numbers the
    sample (+ 1: 0 is padding)."""
    lengths = (np.arange(count) * 7919) % 40 + 1
    return [([k + 1] + [7] * (int(length) - 1), k % 2) for k, length in enumerate(lengths)]


def padded_positions(batches):
    return sum(ids.size for ids, _ in batches)


def test_grouping_by_length_sorts_windows_of_batches_and_draws_their_order():
    np.random.seed(3)
    data = length_samples(90)
    generator = BatchGenerator(data, batch_size=4, length_of=lambda item: len(item[0]), group_by_length=5)
    passes = [list(generator.__iter__(random=True)) for _ in range(2)]
    for batches in passes:
        assert sorted(sample_order(batches)) == list(range(90))  # every sample once
        assert [len(ids) for ids, _ in batches] == [4] * 22 + [2]  # the short batch stays last
        for window in range(0, 20, 5):  # 5 batches of 4 items; the last window holds 3 batches
            ranges = sorted((ids.shape[1], min(np.count_nonzero(row) for row in ids))
                            for ids, _ in batches[window:window + 5])
            assert all(low_next >= high for (high, _), (_, low_next) in zip(ranges, ranges[1:]))
    windows = [[ids.shape[1] for ids, _ in batches[w:w + 5]] for batches in passes for w in range(0, 20, 5)]
    assert sum(longest == sorted(longest) for longest in windows) < len(windows) / 2  # not shortest first
    assert sample_order(passes[0]) != sample_order(passes[1])
    ungrouped = BatchGenerator(data, batch_size=4)
    assert padded_positions(passes[0]) < 0.8 * padded_positions(list(ungrouped.__iter__(random=True)))
    assert sample_order(generator.fortest()) == list(range(90))  # ordered passes are not grouped


def test_grouping_by_length_of_unsized_data():
    np.random.seed(4)
    data = length_samples(30)
    generator = BatchGenerator(iter(data), batch_size=4, buffer_size=8, length_of=lambda item: len(item[0]),
                               group_by_length=2)
    batches = list(generator.__iter__(random=True))
    assert sorted(sample_order(batches)) == list(range(30))
    assert [len(ids) for ids, _ in batches] == [4] * 7 + [2]


@pytest.mark.parametrize("arguments, error, message", [
    (dict(length_of=7), TypeError, "length_of must be a function"),
    (dict(length_of=len, group_by_length=0), ValueError, "group_by_length must be a whole number"),
])
def test_grouping_by_length_refuses_bad_arguments(arguments, error, message):
    with pytest.raises(error, match=message):
        BatchGenerator(make_samples(4), batch_size=2, **arguments)


class LengthGenerator(DataGenerator):
    """One batch of two sequences per item of ``data``, each item giving the batch's length."""

    def __iter__(self, random=False):
        for _, length in self.sample():  # in order even when random: the tests know what to expect
            yield np.full((2, length), length, dtype="int32"), np.zeros((2, 1), dtype="float32")


def test_forfit_moves_a_batch_of_another_length_up_to_second_place():
    generator = LengthGenerator([10, 10, 10, 7, 12], batch_size=1)
    stream = generator.forfit()
    for _ in range(2):  # each pass, whole
        assert [ids.shape[1] for ids, _ in itertools.islice(stream, 5)] == [10, 7, 10, 10, 12]
    ordered = generator.forfit(random=False)  # for predict: the order is the data's
    assert [ids.shape[1] for ids, _ in itertools.islice(ordered, 5)] == [10, 10, 10, 7, 12]
    same = LengthGenerator([5, 5, 5], batch_size=1).forfit()
    assert [ids[0, 0] for ids, _ in itertools.islice(same, 3)] == [5, 5, 5]


@pytest.mark.parametrize("adapter", ["forfit", "to_pydataset"])
def test_fit_takes_batches_padded_to_their_longest_when_the_first_two_agree(adapter):
    import keras

    model = build_tiny_classifier(keras)
    generator = LengthGenerator([10, 10, 7, 12], batch_size=1)
    data = getattr(generator, adapter)()
    outcome = {}

    def fit():  # a batch outside Keras's signature can make fit hang on TensorFlow: bounded here
        try:
            outcome["history"] = model.fit(data, steps_per_epoch=len(generator), epochs=2, verbose=0)
        except Exception as error:  # noqa: BLE001 - raised again in the test's thread
            outcome["error"] = error

    worker = threading.Thread(target=fit, daemon=True)
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive(), "fit hung"
    if "error" in outcome:
        raise outcome["error"]
    assert np.all(np.isfinite(outcome["history"].history["loss"]))


class ListBatches(DataGenerator):
    """Batches as bert4keras's examples yield them: ``[token_ids, segment_ids], labels``."""

    def __iter__(self, random=False):
        batch_token_ids, batch_segment_ids, batch_labels = [], [], []
        for is_end, length in self.sample(random):
            batch_token_ids.append([2] + [5 + length] * length + [3])
            batch_segment_ids.append([0] * (length + 2))
            batch_labels.append([length % 2])
            if len(batch_token_ids) == self.batch_size or is_end:
                yield [sequence_padding(batch_token_ids), sequence_padding(batch_segment_ids)], \
                    sequence_padding(batch_labels)
                batch_token_ids, batch_segment_ids, batch_labels = [], [], []


def test_batches_of_lists_as_bert4keras_yields_them_fit_and_predict():
    """A list of inputs in a generator's batch raises a TypeError in Keras 3 on TensorFlow;
    forfit and fortest hand it on as a tuple, the arrays untouched."""
    import keras

    from bert4k.models import build_transformer_model

    generator = ListBatches([3, 9, 4, 12, 6, 7, 5, 10], batch_size=2)
    (token_ids, segment_ids), labels = next(generator.fortest())
    assert token_ids.tolist() == [[2, 8, 8, 8, 3] + [0] * 6, [2] + [14] * 9 + [3]]
    assert labels.tolist() == [[1], [1]] and segment_ids.shape == (2, 11)
    bert = build_transformer_model(return_keras_model=False, **TINY_CONFIG)
    pooled = keras.layers.GlobalAveragePooling1D()(bert.model.output)
    model = keras.Model(bert.model.inputs, keras.layers.Dense(2, activation="softmax")(pooled))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    history = model.fit(generator.forfit(), steps_per_epoch=len(generator), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.predict(generator.fortest(), verbose=0).shape == (8, 2)


@pytest.mark.backends("tensorflow", reason="forfit_dataset builds a tf.data.Dataset")
def test_forfit_dataset_serves_forfits_batches_with_free_axes_and_no_autotuning():
    import keras

    generator = LengthGenerator([10, 10, 10, 7, 12], batch_size=1)
    dataset = generator.forfit_dataset()
    ids_spec, labels_spec = dataset.element_spec
    assert ids_spec.shape.as_list() == [None, None]  # lengths differ among the first batches
    assert labels_spec.shape.as_list() == [None, 1]  # the same in all of them
    assert dataset.options().autotune.enabled is False
    expected = [ids[0, 0] for ids, _ in itertools.islice(generator.forfit(), 12)]
    assert [ids.numpy()[0, 0] for ids, _ in dataset.take(12)] == expected
    history = build_tiny_classifier(keras).fit(dataset, steps_per_epoch=5, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_to_dataset_gives_the_generators_padded_batches():
    pytest.importorskip("tensorflow")
    samples = make_samples(12)  # whole batches: the endless stream would otherwise batch across passes
    expected = list(BatchGenerator(samples, batch_size=4).fortest())
    dataset = SampleGenerator(samples, batch_size=4).to_dataset(
        types=("int32", "int32"), shapes=([None], [1]), padded_batch=True, random=False
    )
    got = [(ids.numpy(), labels.numpy()) for ids, labels in dataset.take(len(expected))]
    for (ids, labels), (want_ids, want_labels) in zip(got, expected):
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(labels, want_labels)


def test_to_dataset_names_inputs_and_fixed_shapes():
    pytest.importorskip("tensorflow")

    class Fixed(DataGenerator):
        def __iter__(self, random=False):
            for _, (token_ids, label) in self.sample(random):
                yield [sequence_padding([token_ids], length=5)[0], [label]]  # a list, not a tuple

    dataset = Fixed(make_samples(6), batch_size=3).to_dataset(
        types=("int32", "int32"), shapes=([5], [1]), names=("Input-Token", "label"), random=False
    )
    batch = next(iter(dataset))
    assert set(batch) == {"Input-Token", "label"}
    assert batch["Input-Token"].shape == (3, 5)
    np.testing.assert_array_equal(batch["label"].numpy()[:, 0], [0, 1, 0])
    np.testing.assert_array_equal(batch["Input-Token"].numpy()[1], [2, 102, 0, 0, 0])


def test_to_pydataset_serves_the_stream_in_order_and_replays_peeked_batches():
    generator = BatchGenerator(make_samples(10), batch_size=4)  # widths 4, 4, 2
    expected = list(generator.fortest())
    pydataset = generator.to_pydataset(random=False)
    assert isinstance(pydataset, snippets.DataGeneratorPyDataset)
    assert pydataset.num_batches == 3
    # Keras's TensorFlow path peeks at batches 0 and 1 before the epoch starts
    peeked = [pydataset[0], pydataset[1]]
    np.testing.assert_array_equal(peeked[1][0], expected[1][0])
    pydataset.on_epoch_begin()
    epoch = [pydataset[i] for i in range(3)]
    pydataset.on_epoch_end()
    assert sample_order(epoch) == list(range(10))
    # both peeked batches were 4 wide, so Keras fixed that width: the last batch is zero-padded to it
    np.testing.assert_array_equal(epoch[2][0], np.pad(expected[2][0], [(0, 0), (0, 2)]))
    np.testing.assert_array_equal(epoch[2][1], expected[2][1])
    assert sample_order(list(pydataset)) == list(range(10))  # the next pass, read directly


def test_to_pydataset_reads_by_keras_worker_threads_are_never_peeks():
    import multiprocessing.dummy

    generator = BatchGenerator(make_samples(10), batch_size=4)  # widths 4, 4, 2
    expected = list(generator.fortest())
    pydataset = generator.to_pydataset(random=False, workers=2)
    pydataset[0], pydataset[1]  # Keras peeks from the thread that runs fit
    # Keras's adapter starts its worker threads before it calls on_epoch_begin: a worker may read
    # the whole epoch first, and gets the epoch (peeked batches replayed, the last one padded).
    with multiprocessing.dummy.Pool(2) as pool:
        epoch = pool.map(lambda i: pydataset[i], range(3), chunksize=3)
    pydataset.on_epoch_begin()
    assert sample_order(epoch) == list(range(10))
    np.testing.assert_array_equal(epoch[2][0], np.pad(expected[2][0], [(0, 0), (0, 2)]))
    assert sample_order([pydataset[i] for i in range(3)]) == list(range(10))  # the next pass


def test_to_pydataset_explains_a_batch_wider_than_keras_expects():
    samples = [([1], 0), ([2], 1), ([3, 4, 5], 0)]
    pydataset = BatchGenerator(samples, batch_size=1).to_pydataset(random=False)
    pydataset[0], pydataset[1]
    pydataset.on_epoch_begin()
    pydataset[0], pydataset[1]
    with pytest.raises(ValueError, match="axis 1"):
        pydataset[2]


def test_to_pydataset_with_a_batch_process():
    generator = BatchGenerator(make_samples(10), batch_size=4)
    pydataset = generator.to_pydataset(random=False, use_multiprocessing=True)
    try:
        assert sample_order(list(pydataset)) == list(range(10))
    finally:
        pydataset.close()


def build_tiny_classifier(keras):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(None,), dtype="int32")
    hidden = keras.layers.Embedding(200, 8, mask_zero=True)(inputs)
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(pooled))
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


@pytest.mark.parametrize("workers", [1, 2])
def test_to_pydataset_fits_with_keras(workers):
    import keras
    model = build_tiny_classifier(keras)
    train = BatchGenerator(make_samples(10), batch_size=4)  # widths vary: 4, 4, 2 in order
    history = model.fit(train.to_pydataset(random=False, workers=workers), epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and np.all(np.isfinite(history.history["loss"]))


def test_to_pydataset_predicts_in_order():
    import keras
    model = build_tiny_classifier(keras)
    test = BatchGenerator(make_samples(10), batch_size=4)
    predicted = model.predict(test.to_pydataset(random=False), verbose=0)
    one_by_one = np.concatenate([model.predict_on_batch(ids) for ids, _ in test.fortest()])
    np.testing.assert_allclose(predicted, one_by_one, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# ViterbiDecoder
# ----------------------------------------------------------------------------------------------------------


def path_score(nodes, trans, path):
    emission = sum(nodes[t, label] for t, label in enumerate(path))
    return emission + sum(trans[a, b] for a, b in zip(path[:-1], path[1:]))


def brute_force_best_path(nodes, trans, starts=None, ends=None):
    length, num_labels = nodes.shape
    paths = [
        p
        for p in itertools.product(range(num_labels), repeat=length)
        if (starts is None or p[0] in starts) and (ends is None or p[-1] in ends)
    ]
    return max(paths, key=lambda p: path_score(nodes, trans, p))


@pytest.mark.parametrize("length,num_labels", [(1, 3), (2, 2), (3, 4), (5, 3), (6, 2), (4, 5)])
@pytest.mark.parametrize("restricted", [False, True])
def test_viterbi_equals_brute_force(length, num_labels, restricted):
    rng = np.random.default_rng(length * 10 + num_labels)
    for _ in range(5):
        nodes = rng.normal(size=(length, num_labels))
        trans = rng.normal(size=(num_labels, num_labels))
        starts = ends = None
        if restricted:
            starts = sorted(rng.choice(num_labels, size=max(1, num_labels // 2), replace=False).tolist())
            ends = sorted(rng.choice(num_labels, size=max(1, num_labels // 2), replace=False).tolist())
            if length == 1 and not set(starts) & set(ends):
                ends = starts  # a single position must satisfy both
        original = nodes.copy()
        path = ViterbiDecoder(trans, starts, ends).decode(nodes)
        expected = brute_force_best_path(nodes, trans, starts, ends)
        assert tuple(path.tolist()) == expected
        np.testing.assert_array_equal(nodes, original)  # the caller's scores are not modified


# ----------------------------------------------------------------------------------------------------------
# Small utilities
# ----------------------------------------------------------------------------------------------------------


def test_text_utilities():
    assert snippets.strQ2B("ＡＢｃ　１２３！？") == "ABc 123!?"
    assert snippets.strQ2B("中文，保持") == "中文,保持"
    assert snippets.convert_to_unicode("中".encode("utf-8")) == "中"
    assert snippets.convert_to_unicode("中") == "中"
    assert snippets.is_string("a") and not snippets.is_string(b"a")
    single = snippets.to_array([1, 2])
    assert isinstance(single, np.ndarray) and single.tolist() == [1, 2]
    first, second = snippets.to_array([1], [[2.0]])
    assert first.shape == (1,) and second.shape == (1, 1)


def test_softmax_sums_to_one_even_for_large_logits():
    probabilities = snippets.softmax(np.array([[1000.0, 1000.0], [0.0, math.log(3.0)]]))
    np.testing.assert_allclose(probabilities, [[0.5, 0.5], [0.25, 0.75]])


def test_longest_common_substring_and_subsequence_against_brute_force():
    rng = random.Random(0)
    for _ in range(40):
        source = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        target = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))

        length, (i0, i1, j0, j1) = longest_common_substring(source, target)
        substrings = {source[i:j] for i in range(len(source)) for j in range(i + 1, len(source) + 1)}
        assert length == max([len(s) for s in substrings if s in target], default=0)
        assert source[i0:i1] == target[j0:j1] and i1 - i0 == length

        length, mapping = longest_common_subsequence(source, target)
        best = 0
        for k in range(len(source), 0, -1):
            if any(_is_subsequence(c, target) for c in itertools.combinations(source, k)):
                best = k
                break
        assert length == best == len(mapping)
        assert all(source[i] == target[j] for i, j in mapping)
        assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(mapping, mapping[1:]))


def _is_subsequence(chars, text):
    remaining = iter(text)
    return all(c in remaining for c in chars)


def test_argument_decorators():
    class Base:
        @snippets.insert_arguments(dropout=0.1)
        @snippets.delete_arguments("bias")
        def __init__(self, units):
            self.units = units

    layer = Base(3, dropout=0.5)
    assert (layer.units, layer.dropout) == (3, 0.5)
    assert Base(2).dropout == 0.1
    with pytest.raises(TypeError, match="bias"):
        Base(2, bias=True)
