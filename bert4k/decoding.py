"""Incremental decoding with a key/value cache, for any model the builder makes with a causal or
UniLM attention mask.

A separate module because it is a second way of running a built model, not a family or a layer:
`CachedStep` re-runs the builder's own hooks on real tensors, and while it does, the builder's
`apply()` asks `DecodingState.arguments_for` for extra call arguments, so self-attention layers
read and write a key/value buffer and position layers use the tokens' real positions. Every
family decodes through the same hooks it was built with; nothing is written twice.

The buffer has a number of slots per row. Row b's prompt fills slots 0..len_b-1 and each new
token goes to the next free slot, so rows of different lengths decode together exactly as they
would alone. A step's cost should not depend on how long the output will be, so a step touches
the buffers as little as it can; each of these was a pass over the whole buffer per step:
- the buffers stay backend tensors between steps (no NumPy copy out of and into each step),
  and beam search's row selection is a gather inside the next step (not eager ops per buffer);
- keys and values are head-major, [batch, heads, slots, size]: the attention's matmuls read
  that layout as it is, where [batch, slots, heads, size] was transposed in every layer;
- a step scatters its new keys and values into their slots, instead of rewriting every slot;
- the buffers grow in power-of-two buckets of slots as the rows grow (at least MIN_SLOTS), so a
  step attends over at most twice the slots in use, not over the whole capacity, and the step
  function is traced or compiled once per bucket, not once per capacity.
"""

import keras
import numpy as np
from keras import ops

from bert4k import backend as K
from bert4k import layers as L


class LayerCache:
    """One self-attention layer's keys and values for every slot: [batch, heads, slots, size],
    head-major for the attention's matmuls (see layers.MultiHeadAttention.call)."""

    def __init__(self, state, key, value):
        self.state, self.key, self.value = state, key, value

    def update(self, key, value):
        """Write this step's [batch, new tokens, heads, size] keys and values; returns the
        buffers."""
        self.key = self.state.write(self.key, key)
        self.value = self.state.write(self.value, value)
        return self.key, self.value

    @property
    def positions(self):
        """Query positions of this step, for layers whose attention depends on them (RoPE)."""
        return self.state.positions


class DecodingState:
    """The tensors of one cached step: where this step's tokens go, which slots hold tokens, and
    each layer's cache. Built inside `CachedStep.call`."""

    def __init__(self, inputs, num_layers):
        slots = ops.shape(inputs["valid"])[1]
        self.written = ops.cast(inputs["token_mask"], "float32")
        # [batch, new tokens, slots]: one-hot of each real new token's slot. Only for the small
        # per-slot flags below; keys and values are scattered (see `write`).
        self.write_matrix = ops.one_hot(inputs["positions"], slots) * self.written[..., None]
        self.positions = inputs["positions"]
        written_slots = ops.sum(self.write_matrix, axis=1)
        self.valid = ops.maximum(inputs["valid"], written_slots)
        new_segments = ops.einsum("bts,bt->bs", self.write_matrix,
                                  ops.cast(inputs["segment_ids"], "float32"))
        self.segments = inputs["segments"] * (1 - written_slots) + new_segments
        self.buffers = [(inputs[f"key_{i}"], inputs[f"value_{i}"]) for i in range(num_layers)]
        # Self-attention calls take the buffers in call order: blocks run in order, and a layer
        # shared by every block (ALBERT) gets a different buffer at each call.
        self.layer_caches = []

    def write(self, buffer, new):
        """`buffer` with the new tokens' keys (or values) in their slots. A scatter touches the
        new slots only: rewriting every slot (buffer * keep + placed) cost a pass over the
        whole buffer per layer and step, which grew with the slots.
        Padding tokens (token_mask 0) write zeros into slots past their row's length, which
        stay invalid (zero, as before) until the row's own tokens overwrite them."""
        # The buffers stay float32 under a bf16 policy (the attention casts them back).
        new = ops.cast(new, buffer.dtype) * ops.cast(self.written, buffer.dtype)[..., None, None]
        heads, size = new.shape[2], new.shape[3]
        updates = ops.reshape(ops.transpose(new, (0, 2, 1, 3)), (-1, size))
        return ops.scatter_update(buffer, self._write_indices(heads), updates)

    def _write_indices(self, heads):
        """[batch * heads * new tokens, 3]: the (row, head, slot) of every new token's key, in
        the order of the head-major updates. Padding tokens included (they write zeros)."""
        shape = (ops.shape(self.positions)[0], heads, ops.shape(self.positions)[1])
        dtype = self.positions.dtype
        rows = ops.broadcast_to(ops.reshape(ops.arange(shape[0], dtype=dtype), (-1, 1, 1)), shape)
        head = ops.broadcast_to(ops.reshape(ops.arange(heads, dtype=dtype), (1, -1, 1)), shape)
        slots = ops.broadcast_to(ops.expand_dims(self.positions, 1), shape)
        return ops.reshape(ops.stack([rows, head, slots], axis=-1), (-1, 3))

    def attention_bias(self, mode, dtype="float32"):
        """[batch, 1, new tokens, slots]: causal or UniLM visibility over the filled slots."""
        slots = ops.shape(self.valid)[1]
        key_slots = ops.arange(slots)[None, None, :]
        if mode == "causal":
            allowed = ops.cast(key_slots <= self.positions[:, :, None], "float32")
        elif mode == "unilm":
            depth = ops.cumsum(self.segments * self.valid, axis=1)  # target tokens seen so far
            query_depth = ops.take_along_axis(depth, self.positions, axis=1)
            allowed = ops.cast(depth[:, None, :] <= query_depth[:, :, None], "float32")
        else:
            raise ValueError(
                f"Cached decoding needs application='lm' or 'unilm', not a {mode!r} encoder."
            )
        allowed = allowed * self.valid[:, None, :]
        return ops.cast(ops.expand_dims((1.0 - allowed) * K.MASK_BIAS, 1), dtype)

    def arguments_for(self, layer, arguments):
        """Extra call arguments for a layer applied during a cached step."""
        if isinstance(layer, L.MultiHeadAttention) and "SelfAttention" in layer.name:
            cache = LayerCache(self, *self.buffers[len(self.layer_caches)])
            self.layer_caches.append(cache)
            return dict(arguments or {}, cache=cache)
        if isinstance(layer, (L.PositionEmbedding, L.SinusoidalPositionEmbedding)):
            return dict(arguments or {}, positions=self.positions)
        if isinstance(layer, (L.RelativePositionBias, L.RelativePositionEmbedding)):
            return dict(arguments or {}, positions=self.positions,
                        key_length=ops.shape(self.valid)[1])
        return arguments

    def outputs(self):
        result = {"valid": self.valid, "segments": self.segments}
        for index, cache in enumerate(self.layer_caches):
            result[f"key_{index}"], result[f"value_{index}"] = cache.key, cache.value
        return result


class CachedStep(keras.Model):
    """One decoding step of a built Transformer, compiled by Keras on any backend.

    Inputs (a dict): token_ids, segment_ids, token_mask, positions [batch, new tokens]; last
    [batch] (which new token's distribution to return); rows [batch] (which row of the
    buffers each row continues); the buffers: valid, segments [rows, slots], key_i, value_i
    [rows, heads, slots, size] for each block, and an encoder-decoder's context [rows, length,
    hidden]. Outputs: probas [batch, vocab] and the updated buffers, [batch, ...].
    """

    STEP_INPUTS = ("token_ids", "segment_ids", "token_mask", "positions", "last", "rows")

    def __init__(self, transformer, **kwargs):
        # float32 whatever the global policy: Keras casts a layer's floating inputs to its
        # compute dtype, and the buffers and flags must stay float32 (the layers inside keep
        # their own policies, so the matmuls still run in bf16 under mixed_bfloat16).
        super().__init__(dtype="float32", **kwargs)
        self.transformer = transformer
        self.shared_layers = list(transformer.layers.values())  # tracked: same weights

    def call(self, inputs):
        t = self.transformer
        inputs = self._select_rows(inputs)
        model_inputs = t.decoding_inputs(inputs)
        state = DecodingState(inputs, t.num_hidden_layers)
        t.compute_attention_bias(model_inputs)  # for its side effects (T5's context bias)
        t.attention_bias = state.attention_bias(t.attention_mode())
        t.decoding = state
        try:
            output = t.forward(model_inputs)
        finally:
            t.decoding = None
        output = output[-1] if isinstance(output, (list, tuple)) else output
        last = ops.expand_dims(ops.expand_dims(inputs["last"], 1), 2)
        probas = ops.squeeze(ops.take_along_axis(output, last, axis=1), 1)
        result = dict(state.outputs(), probas=probas)
        if "context" in inputs:
            result["context"] = inputs["context"]
        return result

    def _select_rows(self, inputs):
        """The buffers' rows for this step's rows. Beam search keeps, drops and repeats rows
        between steps; gathering them here, inside the compiled step, costs one copy, where a
        gather per buffer on the host costs a dozen eager ops (milliseconds a step)."""
        return {k: v if k in self.STEP_INPUTS else ops.take(v, inputs["rows"], axis=0)
                for k, v in inputs.items()}


def _step_model(transformer):
    """One CachedStep per builder, kept on it between decoding calls: a new Keras model would
    trace (or, on JAX, compile) its step function again on every call."""
    if getattr(transformer, "cached_step", None) is None:
        transformer.cached_step = CachedStep(transformer)
    return transformer.cached_step


def _step_function(step_model):
    """The step model as a compiled function from backend tensors to backend tensors (kept on
    the model, like the model itself). `predict_on_batch` would copy every output to NumPy and
    back into the next step: a pass over the whole buffer, twice a step."""
    if getattr(step_model, "run_step", None) is None:
        jax = keras.backend.backend() == "jax"
        step_model.run_step = (_jax_step_function if jax else _keras_step_function)(step_model)
    return step_model.run_step


def _keras_step_function(step_model):
    """Keras's own predict function: on TensorFlow a tf.function (shapes relaxed after a
    retrace), on PyTorch eager under no_grad. Both take and return tensors; predict_on_batch
    only adds the NumPy copies."""

    def run_step(inputs):
        step_model.make_predict_function()  # made once, unless compile() resets it
        return step_model.predict_function([(inputs,)])

    return run_step


def _jax_step_function(step_model):
    """jax.jit of the stateless call. Keras's own JAX predict function donates the weights
    and writes them back into the model every call; this one only reads them."""
    import jax  # only on the JAX backend

    @jax.jit
    def stateless_step(trainable, non_trainable, inputs):
        return step_model.stateless_call(trainable, non_trainable, inputs)[0]

    def run_step(inputs):
        if not step_model.built:  # stateless_call needs the weights to exist
            if all(layer.built for layer in step_model.shared_layers):
                step_model.built = True  # the builder's layers: nothing new to create
            else:
                with keras.StatelessScope():  # what predict_on_batch does to build
                    step_model(inputs)
        return stateless_step([v.value for v in step_model.trainable_variables],
                              [v.value for v in step_model.non_trainable_variables], inputs)

    return run_step


def _bucket(size, cap=None):
    """The next power of two >= size (at most `cap`)."""
    bucket = 1 << max(int(size) - 1, 0).bit_length()
    return min(bucket, cap) if cap else bucket


def _pad(tensor, axis, extra):
    """`tensor` with `extra` zeros appended along `axis`."""
    widths = [(0, 0)] * len(tensor.shape)
    widths[axis] = (0, extra)
    return ops.pad(tensor, widths)


def _right_padded(sequences):
    array = np.zeros((len(sequences), max(map(len, sequences))), "int32")
    for row, sequence in enumerate(sequences):
        array[row, : len(sequence)] = sequence
    return array


# A buffer's smallest number of slots: attending over a few dozen slots costs next to nothing,
# while every new bucket costs a retrace (TensorFlow) or a compilation (JAX).
MIN_SLOTS = 32


class KVCache:
    """The host side of cached decoding: the buffers (backend tensors) between steps, and row
    selection for beam search. `start` runs the prompts, `step` one new token per row.
    `max_length` is the capacity (prompt and new tokens); the buffers grow towards it."""

    def __init__(self, transformer, max_length):
        # An encoder-decoder (T5) encodes once; its decoder steps with the context as an input.
        self.encoder = getattr(transformer, "encoder", None)
        self.transformer = getattr(transformer, "decoder_builder", transformer)
        self.max_length = max_length
        self.step_model = _step_model(self.transformer)
        self.run_step = _step_function(self.step_model)
        # valid, segments, key_i, value_i (and an encoder-decoder's context), as the last step
        # left them; `rows` says which of their rows each current row continues (None: all, in
        # order), applied inside the next step.
        self.buffers = None
        self.rows = None
        self.lengths = None  # [current rows]
        # JAX compiles one XLA program per input shape (seconds each), and beam search changes
        # the number of rows as beams end. Rounding the rows and the prompt width up to powers
        # of two bounds the programs to a handful; the extra rows and tokens are masked out.
        # TensorFlow relaxes its traced shapes itself, and PyTorch runs eagerly.
        self.bucketed = keras.backend.backend() == "jax"

    def start(self, token_ids, segment_ids=None, encoder_token_ids=None):
        """Run ragged prompts (lists of ids); returns each row's next-token distribution. An
        encoder-decoder also takes each row's encoder input."""
        batch = len(token_ids)
        self.lengths = np.array([len(ids) for ids in token_ids])
        if self.lengths.max() + 1 > self.max_length:
            raise ValueError(
                f"A prompt of {self.lengths.max()} tokens leaves no room in a decoding buffer of "
                f"{self.max_length} slots."
            )
        width = int(self.lengths.max())
        if self.bucketed:  # the padding's token_mask is 0: its slots stay empty and invalid
            width = _bucket(width, cap=self.max_length - 1)
        ids = np.zeros((batch, width), "int32")
        segments = np.zeros((batch, width), "int32")
        mask = np.zeros((batch, width), "float32")
        for row, sequence in enumerate(token_ids):
            ids[row, : len(sequence)] = sequence
            if segment_ids is not None:
                segments[row, : len(sequence)] = segment_ids[row]
            mask[row, : len(sequence)] = 1
        # Room for the prompt (its padding writes too) and the first new token.
        self.buffers = self._empty_buffers(batch, _bucket(max(width + 1, MIN_SLOTS)))
        if self.encoder is not None:
            self.buffers["context"] = self._encode(encoder_token_ids)
        self.rows = None
        positions = np.tile(np.arange(width, dtype="int32"), (batch, 1))
        return self._run(ids, segments, mask, positions, self.lengths - 1)

    def step(self, token_ids, segment_id=0):
        """Append one token per row; returns each row's next-token distribution."""
        if self.lengths.max() >= self.max_length:
            raise ValueError(f"The decoding buffer of {self.max_length} slots is full.")
        self._reserve(int(self.lengths.max()) + 1)
        batch = len(token_ids)
        ids = np.asarray(token_ids, "int32").reshape(batch, 1)
        segments = np.full((batch, 1), segment_id, "int32")
        positions = self.lengths.astype("int32").reshape(batch, 1)
        probas = self._run(ids, segments, np.ones((batch, 1), "float32"), positions,
                           np.zeros(batch, "int32"))
        self.lengths = self.lengths + 1
        return probas

    def select(self, rows):
        """Keep (and repeat, for new beams or samples) the given rows. The buffers follow in
        the next step (see CachedStep._select_rows)."""
        rows = np.asarray(rows, "int32")
        self.rows = rows if self.rows is None else self.rows[rows]
        self.lengths = self.lengths[rows]

    @property
    def slots(self):
        return int(self.buffers["valid"].shape[1])

    def _reserve(self, slots):
        """Grow the buffers to the bucket holding `slots` slots. The new slots are empty
        (invalid, zero); a copy of the buffers once per doubling costs O(1) per step."""
        if slots > self.slots:
            extra = _bucket(slots) - self.slots
            for name, buffer in self.buffers.items():
                if name != "context":  # [rows, length, hidden]: no slots
                    # Slots are axis 1 of valid and segments, 2 of the head-major keys and values.
                    self.buffers[name] = _pad(buffer, 1 if len(buffer.shape) == 2 else 2, extra)

    def _encode(self, encoder_token_ids):
        encoder_ids = _right_padded(encoder_token_ids)
        rows, length = encoder_ids.shape
        if self.bucketed:  # the encoder hides its padding (token id 0), from itself too
            encoder_ids = np.pad(encoder_ids,
                                 [(0, _bucket(rows) - rows), (0, _bucket(length) - length)])
        context = self.encoder.predict_on_batch([encoder_ids])  # its one input, as a list
        return ops.convert_to_tensor(np.asarray(context)[:rows])

    def _run(self, ids, segments, mask, positions, last):
        batch = len(ids)
        rows = np.arange(batch, dtype="int32") if self.rows is None else self.rows
        step = dict(token_ids=ids, segment_ids=segments, token_mask=mask, positions=positions,
                    last=np.asarray(last, "int32"), rows=rows)
        if self.bucketed:
            step = self._bucket_rows(step)
        outputs = self.run_step(dict(self.buffers, **step))
        self.buffers = {k: v for k, v in outputs.items() if k != "probas"}
        self.rows = None
        return ops.convert_to_numpy(outputs["probas"])[:batch]

    def _bucket_rows(self, step):
        """JAX: the step's rows padded to a power of two. The extra rows have no token to
        write and continue buffer row 0; rows never mix, and only the real rows' probas are
        returned. The buffers keep the extra rows between steps."""
        batch = len(step["rows"])
        extra = _bucket(batch) - batch
        step = {k: np.pad(v, [(0, extra)] + [(0, 0)] * (v.ndim - 1)) for k, v in step.items()}
        if int(self.buffers["valid"].shape[0]) != batch + extra:
            # A new bucket of rows (beams began or ended): gather here, once, so that the
            # compiled steps always have as many buffer rows as step rows: one program per
            # bucket, not one per pair of buckets.
            self.buffers = {k: ops.take(v, step["rows"], axis=0) for k, v in self.buffers.items()}
            step["rows"] = np.arange(batch + extra, dtype="int32")
        return step

    def _empty_buffers(self, batch, slots):
        t = self.transformer
        shape = (batch, t.num_attention_heads, slots)
        buffers = {
            "valid": ops.zeros((batch, slots), "float32"),
            "segments": ops.zeros((batch, slots), "float32"),
        }
        for index in range(t.num_hidden_layers):
            buffers[f"key_{index}"] = ops.zeros(shape + (t.attention_key_size,), "float32")
            buffers[f"value_{index}"] = ops.zeros(shape + (t.attention_head_size,), "float32")
        return buffers


# ---------------------------------------------------------------------------------------------------
# AutoRegressiveDecoder: bert4keras's API, on batches, with the cache when given a model
# ---------------------------------------------------------------------------------------------------


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class AutoRegressiveDecoder:
    """Beam search and sampling for autoregressive models.

    As in bert4keras, a subclass may define `predict(self, inputs, output_ids, states)` decorated
    with `@AutoRegressiveDecoder.wraps(default_rtype)`, recomputing the whole prefix each step.
    Given `model` (the Transformer builder from `build_transformer_model(...,
    return_keras_model=False)` with application='lm' or 'unilm'), no predict is needed: each
    input's prompt is run once and every new token costs one cached step.

    `inputs` is one example (a list of 1-D sequences, e.g. [token_ids, segment_ids]) or a batch
    (a list of lists of sequences, ragged allowed); a batch returns one result per example.
    """

    def __init__(self, start_id, end_id, maxlen, minlen=1, model=None, cache_size=None):
        self.start_id, self.end_id = start_id, end_id
        self.maxlen, self.minlen = maxlen, minlen
        self.first_output_ids = np.empty((1, 0), "int64") if start_id is None else \
            np.array([[start_id]])
        self.transformer = model
        self.cache_size = cache_size

    @staticmethod
    def wraps(default_rtype="probas", use_states=False):
        """Make a user `predict` return (probas or log-probas, states) with temperature applied."""

        def decorator(predict):
            def new_predict(self, inputs, output_ids, states, temperature=1, rtype=default_rtype):
                prediction = predict(self, inputs, output_ids, states)
                scores, states = prediction if use_states else (prediction, None)
                scores = np.asarray(scores, "float64")
                if default_rtype == "logits":
                    probas = _softmax(scores / temperature)
                else:
                    probas = np.power(scores, 1.0 / temperature) if temperature != 1 else scores
                    probas = probas / probas.sum(axis=-1, keepdims=True)
                return (probas if rtype == "probas" else np.log(probas + 1e-12)), states

            return new_predict

        return decorator

    def last_token(self, model):
        """A model that outputs only the last position of `model`'s output (cached per model)."""
        if not hasattr(self, "_last_token_models"):
            self._last_token_models = {}
        if model not in self._last_token_models:
            outputs = [L.SelectToken(index=-1)(output) for output in model.outputs]
            self._last_token_models[model] = keras.Model(model.inputs, outputs)
        return self._last_token_models[model]

    def predict(self, inputs, output_ids, states, temperature=1, rtype="probas"):
        raise NotImplementedError(
            "Give AutoRegressiveDecoder a model (cached decoding) or define predict() decorated "
            "with @AutoRegressiveDecoder.wraps(...)."
        )

    # -- scoring: the cache, or the user's predict ------------------------------------------------

    def _log_probas(self, examples, rows, output_ids, states, temperature):
        """Log-probabilities of the next token for each row; rows[i] is its example's index."""
        if self.transformer is None:
            row_inputs = self._stack([examples[r] for r in rows])
            scores, states = self.predict(row_inputs, output_ids, states, temperature, "logits")
            return scores, states
        if states is None:
            states = self._start_cache(examples, rows, output_ids)
            probas = states.first_probas
        else:
            probas = states.step(output_ids[:, -1], self._new_segment_id())
        probas = np.asarray(probas, "float64")
        if temperature != 1:
            probas = np.power(probas, 1.0 / temperature)
        probas = probas / probas.sum(axis=-1, keepdims=True)
        return np.log(probas + 1e-12), states

    def _start_cache(self, examples, rows, output_ids):
        if hasattr(self.transformer, "decoder_builder"):  # encoder-decoder: prompts are outputs
            cache = KVCache(self.transformer, self.cache_size or output_ids.shape[1] + self.maxlen)
            cache.first_probas = cache.start([list(p) for p in output_ids], None,
                                             [examples[row][0] for row in rows])
            return cache
        prompts, segments = [], []
        for row, prefix in zip(rows, output_ids):
            sequences = examples[row]
            token_ids = list(sequences[0]) + list(prefix)
            segment_ids = list(sequences[1]) if len(sequences) > 1 else [0] * len(sequences[0])
            prompts.append(token_ids)
            segments.append(segment_ids + [self._new_segment_id()] * len(prefix))
        longest = max(map(len, prompts))
        cache = KVCache(self.transformer, self.cache_size or longest + self.maxlen + 1)
        cache.first_probas = cache.start(prompts, segments)
        return cache

    def _new_segment_id(self):
        return 1 if getattr(self.transformer, "application", None) == "unilm" else 0

    def _select(self, states, rows):
        if isinstance(states, KVCache):
            states.select(rows)
            return states
        if states is None:
            return None
        return [np.asarray(s)[rows] for s in states] if isinstance(states, list) else \
            np.asarray(states)[rows]

    @staticmethod
    def _stack(examples):
        """Right-padded arrays [rows, length] from the rows' sequences."""
        columns = list(zip(*examples))
        stacked = []
        for column in columns:
            width = max(len(seq) for seq in column)
            array = np.zeros((len(column), width), "int64")
            for i, seq in enumerate(column):
                array[i, : len(seq)] = seq
            stacked.append(array)
        return stacked

    @staticmethod
    def _as_batch(inputs):
        single = np.ndim(inputs[0][0]) == 0 if len(inputs[0]) else True
        examples = [[list(seq) for seq in inputs]] if single else \
            [[list(seq) for seq in example] for example in zip(*inputs)]
        return examples, single

    def _ended(self, output_ids, min_ends):
        ends = (output_ids == self.end_id).sum(axis=1)
        return (output_ids[:, -1] == self.end_id) & (ends >= min_ends)

    # -- beam search --------------------------------------------------------------------------------

    def beam_search(self, inputs, topk, states=None, temperature=1, min_ends=1):
        """The highest-scoring output per example, keeping `topk` beams."""
        examples, single = self._as_batch(inputs)
        rows = np.arange(len(examples))
        output_ids = np.repeat(self.first_output_ids, len(examples), axis=0)
        scores = np.zeros(len(examples))
        results = [None] * len(examples)
        for _ in range(self.maxlen):
            log_probas, states = self._log_probas(examples, rows, output_ids, states, temperature)
            parents, tokens, scores = self._best_candidates(rows, scores, log_probas, topk)
            states = self._select(states, parents)
            rows = rows[parents]
            output_ids = np.concatenate([output_ids[parents], tokens[:, None]], axis=1)
            keep = self._finish_beams(rows, output_ids, scores, results, min_ends)
            if not keep.any():
                break
            states = self._select(states, np.flatnonzero(keep))
            rows, output_ids, scores = rows[keep], output_ids[keep], scores[keep]
        for row in np.unique(rows):  # maxlen reached: the best beam of each unfinished example
            if results[row] is None:
                mine = np.flatnonzero(rows == row)
                results[row] = output_ids[mine[scores[mine].argmax()]]
        return results[0] if single else results

    @staticmethod
    def _best_candidates(rows, scores, log_probas, topk):
        """Per example, the topk (parent row, token) pairs by total score."""
        parents, tokens, totals = [], [], []
        vocab = log_probas.shape[1]
        for example in np.unique(rows):
            mine = np.flatnonzero(rows == example)
            candidates = (scores[mine][:, None] + log_probas[mine]).ravel()
            k = min(topk, candidates.size)
            best = np.argpartition(-candidates, k - 1)[:k]
            best = best[np.argsort(-candidates[best], kind="stable")]
            parents.append(mine[best // vocab])
            tokens.append(best % vocab)
            totals.append(candidates[best])
        return np.concatenate(parents), np.concatenate(tokens), np.concatenate(totals)

    def _finish_beams(self, rows, output_ids, scores, results, min_ends):
        """Record examples whose best beam has ended; drop ended beams. Returns rows to keep."""
        ended = self._ended(output_ids, min_ends)
        keep = ~ended
        if output_ids.shape[1] < self.minlen:
            return np.ones(len(rows), bool)
        for example in np.unique(rows):
            mine = np.flatnonzero(rows == example)
            best = mine[scores[mine].argmax()]
            if ended[best]:
                results[example] = output_ids[best]
                keep[mine] = False
        return keep

    # -- sampling -----------------------------------------------------------------------------------

    def random_sample(self, inputs, n, topk=None, topp=None, states=None, temperature=1,
                      min_ends=1):
        """`n` sampled outputs per example, from the topk most likely tokens and/or the smallest
        set whose probability reaches topp."""
        examples, single = self._as_batch(inputs)
        rows = np.arange(len(examples))
        output_ids = np.repeat(self.first_output_ids, len(examples), axis=0)
        results = [[] for _ in examples]
        for step in range(self.maxlen):
            log_probas, states = self._log_probas(examples, rows, output_ids, states, temperature)
            if step == 0:  # one prompt run per example, then n samples of it
                repeat = np.repeat(np.arange(len(rows)), n)
                states = self._select(states, repeat)
                rows, output_ids, log_probas = rows[repeat], output_ids[repeat], log_probas[repeat]
            tokens = self._sample(np.exp(log_probas), topk, topp)
            output_ids = np.concatenate([output_ids, tokens[:, None]], axis=1)
            done = self._ended(output_ids, min_ends) if output_ids.shape[1] >= self.minlen else \
                np.zeros(len(rows), bool)
            for row, ids in zip(rows[done], output_ids[done]):
                results[row].append(ids)
            if done.all():
                rows = rows[:0]
                break
            if done.any():
                states = self._select(states, np.flatnonzero(~done))
                rows, output_ids = rows[~done], output_ids[~done]
        for row, ids in zip(rows, output_ids):
            results[row].append(ids)
        return results[0] if single else results

    @staticmethod
    def _sample(probas, topk, topp):
        candidates = np.tile(np.arange(probas.shape[1]), (len(probas), 1))
        if topk is not None:
            top = np.argpartition(-probas, topk - 1, axis=1)[:, :topk]
            probas = np.take_along_axis(probas, top, axis=1)
            candidates = top
        if topp is not None:
            order = np.argsort(-probas, axis=1)
            probas = np.take_along_axis(probas, order, axis=1)
            candidates = np.take_along_axis(candidates, order, axis=1)
            cumulative = np.cumsum(probas / probas.sum(axis=1, keepdims=True), axis=1)
            beyond = np.roll(cumulative >= topp, 1, axis=1)  # keep the token that crosses topp
            beyond[:, 0] = False
            probas = np.where(beyond, 0.0, probas)
        probas = probas / probas.sum(axis=1, keepdims=True)
        picks = [np.random.choice(len(p), p=p) for p in probas]
        return candidates[np.arange(len(probas)), picks]
