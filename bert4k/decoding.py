"""Incremental decoding with a key/value cache, for any model the builder makes with a causal or
UniLM attention mask.

A separate module because it is a second way of running a built model, not a family or a layer:
`CachedStep` re-runs the builder's own hooks on real tensors, and while it does, the builder's
`apply()` asks `DecodingState.arguments_for` for extra call arguments, so self-attention layers
read and write a key/value buffer and position layers use the tokens' real positions. Every
family decodes through the same hooks it was built with; nothing is written twice.

The buffer has a fixed number of slots per row. Row b's prompt fills slots 0..len_b-1 and each
new token goes to the next free slot, so rows of different lengths decode together exactly as
they would alone, and a step costs the same whatever the output length.
"""

import keras
import numpy as np
from keras import ops

from bert4k import backend as K
from bert4k import layers as L


class LayerCache:
    """One self-attention layer's keys and values for every slot: [batch, slots, heads, size]."""

    def __init__(self, state, key, value):
        self.state, self.key, self.value = state, key, value

    def update(self, key, value):
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
        written = ops.cast(inputs["token_mask"], "float32")
        # [batch, new tokens, slots]: one-hot of each real new token's slot.
        self.write_matrix = ops.one_hot(inputs["positions"], slots) * written[..., None]
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
        keep = 1 - ops.sum(self.write_matrix, axis=1)
        placed = ops.einsum("bts,btnd->bsnd", ops.cast(self.write_matrix, new.dtype), new)
        return buffer * ops.cast(keep, buffer.dtype)[:, :, None, None] + placed

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
        if isinstance(layer, L.PositionEmbedding):
            return dict(arguments or {}, positions=self.positions)
        return arguments

    def outputs(self):
        result = {"valid": self.valid, "segments": self.segments}
        for index, cache in enumerate(self.layer_caches):
            result[f"key_{index}"], result[f"value_{index}"] = cache.key, cache.value
        return result


class CachedStep(keras.Model):
    """One decoding step of a built Transformer, compiled by Keras on any backend.

    Inputs (a dict): token_ids, segment_ids, token_mask, positions [batch, new tokens]; last
    [batch] (which new token's distribution to return); valid, segments [batch, slots]; and
    key_i, value_i [batch, slots, heads, size] for each block. Outputs: probas [batch, vocab]
    and the updated buffers.
    """

    def __init__(self, transformer, **kwargs):
        super().__init__(**kwargs)
        self.transformer = transformer
        self.shared_layers = list(transformer.layers.values())  # tracked: same weights

    def call(self, inputs):
        t = self.transformer
        state = DecodingState(inputs, t.num_hidden_layers)
        saved_bias, t.attention_bias = t.attention_bias, state.attention_bias(t.attention_mode())
        t.decoding = state
        try:
            x = t.apply_embeddings([inputs["token_ids"], inputs["segment_ids"]])
            for index in range(t.num_hidden_layers):
                x = t.apply_main_layers(x, index)
            output = t.apply_final_layers(x)
        finally:
            t.decoding, t.attention_bias = None, saved_bias
        output = output[-1] if isinstance(output, (list, tuple)) else output
        last = ops.expand_dims(ops.expand_dims(inputs["last"], 1), 2)
        probas = ops.squeeze(ops.take_along_axis(output, last, axis=1), 1)
        return dict(state.outputs(), probas=probas)


class KVCache:
    """The NumPy side of cached decoding: the buffers between steps, and row selection for beam
    search. `start` runs the prompts, `step` one new token per row."""

    def __init__(self, transformer, max_length):
        self.transformer = transformer
        self.max_length = max_length
        self.step_model = CachedStep(transformer)
        self.buffers = None
        self.lengths = None

    def start(self, token_ids, segment_ids=None):
        """Run ragged prompts (lists of ids); returns each row's next-token distribution."""
        batch = len(token_ids)
        self.lengths = np.array([len(ids) for ids in token_ids])
        if self.lengths.max() + 1 > self.max_length:
            raise ValueError(
                f"A prompt of {self.lengths.max()} tokens leaves no room in a decoding buffer of "
                f"{self.max_length} slots."
            )
        width = int(self.lengths.max())
        ids = np.zeros((batch, width), "int32")
        segments = np.zeros((batch, width), "int32")
        mask = np.zeros((batch, width), "float32")
        for row, sequence in enumerate(token_ids):
            ids[row, : len(sequence)] = sequence
            if segment_ids is not None:
                segments[row, : len(sequence)] = segment_ids[row]
            mask[row, : len(sequence)] = 1
        self.buffers = self._empty_buffers(batch)
        positions = np.tile(np.arange(width, dtype="int32"), (batch, 1))
        return self._run(ids, segments, mask, positions, self.lengths - 1)

    def step(self, token_ids, segment_id=0):
        """Append one token per row; returns each row's next-token distribution."""
        if self.lengths.max() >= self.max_length:
            raise ValueError(f"The decoding buffer of {self.max_length} slots is full.")
        batch = len(token_ids)
        ids = np.asarray(token_ids, "int32").reshape(batch, 1)
        segments = np.full((batch, 1), segment_id, "int32")
        positions = self.lengths.astype("int32").reshape(batch, 1)
        probas = self._run(ids, segments, np.ones((batch, 1), "float32"), positions,
                           np.zeros(batch, "int32"))
        self.lengths = self.lengths + 1
        return probas

    def select(self, rows):
        """Keep (and repeat, for new beams or samples) the given rows."""
        rows = np.asarray(rows)
        self.buffers = {k: v[rows] for k, v in self.buffers.items()}
        self.lengths = self.lengths[rows]

    def _run(self, ids, segments, mask, positions, last):
        inputs = dict(self.buffers, token_ids=ids, segment_ids=segments, token_mask=mask,
                      positions=positions, last=np.asarray(last, "int32"))
        outputs = self.step_model.predict_on_batch(inputs)
        self.buffers = {k: np.asarray(v) for k, v in outputs.items() if k != "probas"}
        return np.asarray(outputs["probas"])

    def _empty_buffers(self, batch):
        t = self.transformer
        shape = (batch, self.max_length, t.num_attention_heads)
        buffers = {
            "valid": np.zeros((batch, self.max_length), "float32"),
            "segments": np.zeros((batch, self.max_length), "float32"),
        }
        for index in range(t.num_hidden_layers):
            buffers[f"key_{index}"] = np.zeros(shape + (t.attention_key_size,), "float32")
            buffers[f"value_{index}"] = np.zeros(shape + (t.attention_head_size,), "float32")
        return buffers
