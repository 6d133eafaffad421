"""Cached decoding against full recomputation, beam search against greedy decoding, batches
against single calls."""

import keras
import numpy as np
import pytest

from bert4k.decoding import MIN_SLOTS, AutoRegressiveDecoder, KVCache
from bert4k.models import build_transformer_model

END = 3
CONFIG = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position=64)
CASES = [("gpt2", "lm"), ("gpt2_ml", "lm"), ("bert", "lm"), ("bert", "unilm"), ("nezha", "unilm")]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def transformer(request):
    model, application = request.param
    keras.utils.set_random_seed(7)
    extra = dict(with_mlm=True) if model not in ("gpt2", "gpt2_ml") else {}
    return build_transformer_model(model=model, application=application,
                                   return_keras_model=False, **CONFIG, **extra)


# Longer than any sequence here. The full recomputations run on sequences right-padded to it:
# under causal and UniLM attention no position sees those after it, so padding changes nothing
# before it, and every call has one shape. On JAX a new shape means a new XLA program (seconds,
# even eagerly, where every op compiles for it), and the references see a new length each step.
REFERENCE_LENGTH = 48


def padded(rows, value=0):
    array = np.full((len(rows), REFERENCE_LENGTH), value, "int32")
    for index, row in enumerate(rows):
        array[index, : len(row)] = row
    return array


def at_last_tokens(model, inputs, lengths):
    """The model's full forward pass, read at position lengths[i] - 1 of each row i."""
    outputs = model.predict(inputs, verbose=0)
    return outputs[np.arange(len(lengths)), np.asarray(lengths) - 1]


def prompts(count, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(4, 40, size=rng.integers(2, 7))) for _ in range(count)]


def tokens_only(transformer):
    return len(transformer.model.inputs) == 1


def full_inputs(transformer, rows, segment_rows=None):
    """Padded model inputs; UniLM's padding is target (segment 1): seen by nothing before it."""
    ids = padded(rows)
    if tokens_only(transformer):
        return ids
    if segment_rows is None:
        segment_rows = [[0] * len(row) for row in rows]
    return [ids, padded(segment_rows, int(transformer.application == "unilm"))]


def full_probas(transformer, token_ids, prompt_length):
    """Next-token probabilities after `token_ids`, recomputed from scratch."""
    segments = [0] * prompt_length
    segments += [int(transformer.application == "unilm")] * (len(token_ids) - prompt_length)
    inputs = full_inputs(transformer, [token_ids], [segments])
    return at_last_tokens(transformer.model, inputs, [len(token_ids)])[0]


class Uncached(AutoRegressiveDecoder):
    """bert4keras style: recompute the whole prefix every step."""

    def __init__(self, transformer, **kwargs):
        super().__init__(**kwargs)
        self.t = transformer

    @AutoRegressiveDecoder.wraps(default_rtype="probas")
    def predict(self, inputs, output_ids, states):
        token_ids = np.concatenate([inputs[0], output_ids], axis=1)
        lengths = [token_ids.shape[1]] * len(token_ids)
        if tokens_only(self.t):
            return at_last_tokens(self.t.model, padded(token_ids), lengths)
        segment_ids = np.concatenate(
            [inputs[1], np.full_like(output_ids, int(self.t.application == "unilm"))], axis=1)
        return at_last_tokens(self.t.model, full_inputs(self.t, token_ids, segment_ids), lengths)


def example(transformer, prompt):
    return [prompt] if tokens_only(transformer) else [prompt, [0] * len(prompt)]


def assert_steps_match_full_recomputation(transformer, cache, batch, steps):
    probas = cache.start(batch, [[0] * len(p) for p in batch])
    sequences = [list(p) for p in batch]
    new_segment = int(transformer.application == "unilm")
    for _ in range(steps):
        for row, sequence in enumerate(sequences):
            full = full_probas(transformer, sequence, len(batch[row]))
            np.testing.assert_allclose(probas[row], full, atol=1e-6)
        # Never the pad id 0: the full model hides it from attention as padding, the cache
        # holds every token it is given (and a tiny random model may well pick it).
        tokens = probas[:, 1:].argmax(-1) + 1
        for row, token in enumerate(tokens):
            sequences[row].append(int(token))
        probas = cache.step(tokens, new_segment)


def test_cached_steps_equal_full_recomputation(transformer):
    assert_steps_match_full_recomputation(transformer, KVCache(transformer, 24), prompts(3), 4)


def test_cached_steps_across_a_bucket_of_slots(transformer):
    """Rows outgrow the first bucket of slots mid-decoding: the buffers grow (once per power
    of two) and every step still equals the full recomputation."""
    rng = np.random.default_rng(6)
    batch = [list(rng.integers(4, 40, size=n)) for n in (MIN_SLOTS - 3, MIN_SLOTS - 6)]
    cache = KVCache(transformer, REFERENCE_LENGTH)
    assert_steps_match_full_recomputation(transformer, cache, batch, 6)
    assert cache.slots == 2 * MIN_SLOTS


def greedy(transformer, prompt, maxlen):
    output = []
    for _ in range(maxlen):
        probas = full_probas(transformer, prompt + output, len(prompt))
        output.append(int(probas.argmax()))
        if output[-1] == END:
            break
    return output


def test_beam_search_with_topk_1_is_greedy(transformer):
    decoder = AutoRegressiveDecoder(start_id=None, end_id=END, maxlen=6, model=transformer)
    for prompt in prompts(2, seed=1):
        got = decoder.beam_search(example(transformer, prompt), topk=1)
        assert list(got) == greedy(transformer, prompt, 6)


def test_cached_beam_search_equals_uncached(transformer):
    cached = AutoRegressiveDecoder(start_id=None, end_id=END, maxlen=6, model=transformer)
    uncached = Uncached(transformer, start_id=None, end_id=END, maxlen=6)
    for prompt in prompts(2, seed=2):
        inputs = example(transformer, prompt)
        assert list(cached.beam_search(inputs, topk=3)) == list(uncached.beam_search(inputs, 3))


def test_cached_beam_search_across_a_bucket_of_slots(transformer):
    """Beams are selected and repeated before and after the buffers grow."""
    cached = AutoRegressiveDecoder(start_id=None, end_id=END, maxlen=8, model=transformer)
    uncached = Uncached(transformer, start_id=None, end_id=END, maxlen=8)
    prompt = list(np.random.default_rng(8).integers(4, 40, size=MIN_SLOTS - 4))
    inputs = example(transformer, prompt)
    assert list(cached.beam_search(inputs, topk=2)) == list(uncached.beam_search(inputs, 2))


def test_cached_sampling_equals_uncached(transformer):
    cached = AutoRegressiveDecoder(start_id=None, end_id=END, maxlen=5, model=transformer)
    uncached = Uncached(transformer, start_id=None, end_id=END, maxlen=5)
    inputs = example(transformer, prompts(1, seed=3)[0])
    np.random.seed(11)
    a = cached.random_sample(inputs, n=3, topk=10, topp=0.9)
    np.random.seed(11)
    b = uncached.random_sample(inputs, n=3, topk=10, topp=0.9)
    assert [list(x) for x in a] == [list(x) for x in b]


def test_a_batch_decodes_like_single_calls(transformer):
    decoder = AutoRegressiveDecoder(start_id=None, end_id=END, maxlen=6, model=transformer)
    batch = prompts(8, seed=4)
    examples = [example(transformer, p) for p in batch]
    batched = decoder.beam_search([list(column) for column in zip(*examples)], topk=2)
    singles = [decoder.beam_search(e, topk=2) for e in examples]
    assert [list(x) for x in batched] == [list(x) for x in singles]


def test_sampling_respects_topk():
    probas = np.array([[0.1, 0.5, 0.05, 0.35]] * 200)
    tokens = AutoRegressiveDecoder._sample(probas, topk=2, topp=None)
    assert set(tokens) == {1, 3}
    tokens = AutoRegressiveDecoder._sample(probas, topk=None, topp=0.5)
    assert set(tokens) == {1}


@pytest.fixture(scope="module", params=["t5", "t5.1.1"])
def t5(request):
    keras.utils.set_random_seed(5)
    return build_transformer_model(model=request.param, return_keras_model=False, **CONFIG)


def t5_greedy(t5, source, maxlen):
    output = [0]
    for _ in range(maxlen):
        # The encoder's padding is hidden from it and from the decoder's cross-attention.
        probas = at_last_tokens(t5.model, [padded([source]), padded([output])], [len(output)])[0]
        output.append(int(probas.argmax()))
        if output[-1] == END:
            break
    return output


def test_t5_cached_decoding_is_greedy_and_batches(t5):
    decoder = AutoRegressiveDecoder(start_id=0, end_id=END, maxlen=5, model=t5)
    sources = prompts(3, seed=5)
    singles = [list(decoder.beam_search([source], topk=1)) for source in sources]
    assert singles == [t5_greedy(t5, source, 5) for source in sources]
    batched = decoder.beam_search([sources], topk=1)
    assert [list(x) for x in batched] == singles


def test_cached_decoding_under_a_global_bfloat16_policy():
    """A global mixed_bfloat16 policy must not reach the cache's float32 buffers and flags (Keras
    casts a layer's floating inputs to its compute dtype): the same tokens as the same model
    built with dtype_policy='mixed_bfloat16'."""
    def decode(**policy):
        keras.utils.set_random_seed(3)
        transformer = build_transformer_model(model="gpt2", application="lm",
                                              return_keras_model=False, **CONFIG, **policy)
        decoder = AutoRegressiveDecoder(start_id=None, end_id=END, maxlen=12, model=transformer)
        return decoder.beam_search([[5, 6, 7]], topk=2)

    expected = decode(dtype_policy="mixed_bfloat16")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        assert list(decode()) == list(expected)
    finally:
        keras.config.set_dtype_policy(previous)
