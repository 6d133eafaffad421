"""Keras 3 layers of the transformer families: plain layers with explicit `get_config`, registered
under the package name "bert4k" so saved models load with `safe_mode=True`."""

import keras
from keras import ops

from bert4k import backend as K


def register(cls):
    return keras.saving.register_keras_serializable(package="bert4k")(cls)


# ---------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------


@register
class Embedding(keras.layers.Embedding):
    """Token embedding that doubles as the tied output projection: `mode='dense'` multiplies
    hidden states by the transposed table, giving vocabulary logits (the MLM / LM head)."""

    def call(self, inputs, mode="embedding"):
        if mode == "dense":
            return ops.matmul(inputs, ops.transpose(ops.cast(self.embeddings, inputs.dtype)))
        return super().call(inputs)

    def compute_output_spec(self, inputs, mode="embedding"):
        if mode == "dense":
            shape = tuple(inputs.shape[:-1]) + (self.input_dim,)
            return keras.KerasTensor(shape, dtype=self.compute_dtype)
        return super().compute_output_spec(inputs)


@register
class PositionEmbedding(keras.layers.Layer):
    """Learned absolute positions, added to (or concatenated with) the input sequence.

    `hierarchical` (a float alpha, e.g. 0.4) decomposes position p into (p // n, p % n) over the
    learned table of size n, so a model trained on n positions runs on n * n: the embeddings of
    positions < n are the original ones (Su Jianlin's hierarchical decomposition).

    `offset` shifts every position by a constant: Hugging Face RoBERTa's table keeps rows 0 and 1
    for padding, and position p reads row p + pad_token_id + 1.
    """

    def __init__(
        self,
        input_dim,
        output_dim,
        merge_mode="add",
        hierarchical=None,
        embeddings_initializer="zeros",
        offset=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.merge_mode = merge_mode
        self.hierarchical = hierarchical
        self.offset = offset
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.input_dim, self.output_dim),
            initializer=self.embeddings_initializer,
        )

    def max_length(self):
        return (self.input_dim**2 if self.hierarchical else self.input_dim) - self.offset

    def check_length(self, length):
        if isinstance(length, int) and length > self.max_length():
            raise ValueError(
                f"Input sequence length {length} exceeds max_position={self.max_length()} of layer "
                f"'{self.name}'. Truncate the inputs (e.g. tokenizer.encode(..., maxlen="
                f"{self.max_length()})) or build the model with hierarchical_position=True."
            )

    def position_embeddings(self, positions):
        embeddings = ops.cast(self.embeddings, self.compute_dtype)
        if self.offset:
            positions = positions + self.offset
        if not self.hierarchical:
            return ops.take(embeddings, positions, axis=0)
        alpha = self.hierarchical
        base = (embeddings - alpha * embeddings[:1]) / (1 - alpha)
        high = ops.take(base, positions // self.input_dim, axis=0)
        low = ops.take(base, positions % self.input_dim, axis=0)
        return alpha * high + (1 - alpha) * low

    def call(self, inputs, positions=None):
        """`positions` [batch, length] overrides 0..length-1 (cached decoding writes new tokens
        at later positions)."""
        length = inputs.shape[1]
        self.check_length(length)
        if positions is None:
            length = ops.shape(inputs)[1] if length is None else length
            pos = ops.expand_dims(self.position_embeddings(ops.arange(length)), 0)
        else:
            pos = self.position_embeddings(positions)
        if self.merge_mode == "add":
            return inputs + pos
        pos = ops.broadcast_to(pos, ops.concatenate([ops.shape(inputs)[:2], [self.output_dim]], 0))
        return ops.concatenate([inputs, pos], axis=-1)

    def compute_output_shape(self, input_shape):
        if self.merge_mode == "add":
            return input_shape
        return tuple(input_shape[:-1]) + (input_shape[-1] + self.output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            input_dim=self.input_dim,
            output_dim=self.output_dim,
            merge_mode=self.merge_mode,
            hierarchical=self.hierarchical,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
            offset=self.offset,
        )
        return config


@register
class SinusoidalPositionEmbedding(keras.layers.Layer):
    """The sinusoidal table of positions 0..length-1 of the input, [1, length, output_dim] as
    interleaved (sin, cos) pairs, with no weights: RoFormer's rotary attention rotates queries
    and keys by it. `positions` [batch, length] overrides 0..length-1 (cached decoding)."""

    def __init__(self, output_dim, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = output_dim

    def call(self, inputs, positions=None):
        if positions is None:
            positions = ops.expand_dims(ops.arange(ops.shape(inputs)[1]), 0)
        return ops.cast(K.sinusoidal_embeddings(positions, self.output_dim), self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self.output_dim)
        return config


@register
class RelativePositionEmbedding(keras.layers.Layer):
    """NEZHA's functional relative positions, with no weights: for query i and key j, row
    clip(j - i, -max_distance, max_distance) + max_distance of the sinusoidal table (sin at even,
    cos at odd features), as NEZHA's release computes it. Inputs [queries, keys] (or one
    sequence for both); output [q_len, k_len, output_dim]."""

    def __init__(self, output_dim, max_distance=64, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = output_dim
        self.max_distance = max_distance

    def call(self, inputs):
        q, k = inputs if isinstance(inputs, (list, tuple)) else (inputs, inputs)
        distance = (ops.expand_dims(ops.arange(ops.shape(k)[1]), 0)
                    - ops.expand_dims(ops.arange(ops.shape(q)[1]), 1))
        index = ops.clip(distance, -self.max_distance, self.max_distance) + self.max_distance
        return ops.cast(K.sinusoidal_embeddings(index, self.output_dim), self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self.output_dim, max_distance=self.max_distance)
        return config


# ---------------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------------


@register
class LayerNormalization(keras.layers.Layer):
    """LayerNorm with the checkpoint names gamma/beta. `rms=True` drops the mean and beta
    (T5's RMSNorm); `rms=True, scale=False` is RoFormer-v2's parameter-free norm.

    `conditional=True` (Conditional LayerNorm, as bert4keras's `layer_norm_cond`): the inputs are
    [x, condition] and gamma, beta are shifted by Dense projections of the condition
    (`gamma_dense`, `beta_dense`, zero-initialised so the layer starts as the plain LayerNorm),
    optionally after a `hidden_units` projection of the condition.
    """

    def __init__(self, epsilon=1e-12, center=True, scale=True, rms=False, conditional=False,
                 hidden_units=None, hidden_activation="linear",
                 hidden_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.center = center and not rms
        self.scale = scale
        self.rms = rms
        self.conditional = conditional
        self.hidden_units = hidden_units
        self.hidden_activation = K.activation_name(hidden_activation)
        self.hidden_initializer = keras.initializers.get(hidden_initializer)

    def build(self, input_shape):
        if self.conditional:
            input_shape, condition_shape = input_shape
        dim = input_shape[-1]
        if self.scale:
            self.gamma = self.add_weight(name="gamma", shape=(dim,), initializer="ones")
        if self.center:
            self.beta = self.add_weight(name="beta", shape=(dim,), initializer="zeros")
        if not self.conditional:
            return

        def dense(units, name, **kwargs):
            layer = keras.layers.Dense(units, use_bias=False, name=name,
                                       dtype=self.dtype_policy, **kwargs)
            layer.build(condition_shape)
            return layer

        if self.hidden_units:
            self.hidden_dense = dense(self.hidden_units, "hidden_dense",
                                      activation=K.get_activation(self.hidden_activation),
                                      kernel_initializer=self.hidden_initializer)
            condition_shape = tuple(condition_shape[:-1]) + (self.hidden_units,)
        if self.scale:
            self.gamma_dense = dense(dim, "gamma_dense", kernel_initializer="zeros")
        if self.center:
            self.beta_dense = dense(dim, "beta_dense", kernel_initializer="zeros")

    def call(self, inputs):
        condition = None
        if self.conditional:
            inputs, condition = inputs
            if self.hidden_units:
                condition = self.hidden_dense(condition)
            for _ in range(len(inputs.shape) - len(condition.shape)):
                condition = ops.expand_dims(condition, 1)  # [batch, dim] -> [batch, 1, dim]
            condition = ops.cast(condition, "float32")
        # Statistics in float32 even under mixed precision: bf16 variance loses too many bits.
        x = ops.cast(inputs, "float32")
        if not self.rms:
            x = x - ops.mean(x, axis=-1, keepdims=True)
        variance = ops.mean(ops.square(x), axis=-1, keepdims=True)
        x = x * ops.rsqrt(variance + self.epsilon)
        if self.scale:
            gamma = ops.cast(self.gamma, "float32")
            if condition is not None:
                gamma = gamma + ops.cast(self.gamma_dense(condition), "float32")
            x = x * gamma
        if self.center:
            beta = ops.cast(self.beta, "float32")
            if condition is not None:
                beta = beta + ops.cast(self.beta_dense(condition), "float32")
            x = x + beta
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape[0] if self.conditional else input_shape

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon, center=self.center, scale=self.scale, rms=self.rms)
        if self.conditional:
            config.update(
                conditional=True, hidden_units=self.hidden_units,
                hidden_activation=self.hidden_activation,
                hidden_initializer=keras.initializers.serialize(self.hidden_initializer),
            )
        return config


# ---------------------------------------------------------------------------------------------------
# Attention and feed-forward
# ---------------------------------------------------------------------------------------------------


@register
class AttentionBias(keras.layers.Layer):
    """Additive attention bias built from the inputs: padding keys (token id == pad_id) are hidden,
    and 'causal' (language model) or 'unilm' (seq2seq from segment ids) masks are added on top.

    Inputs: token ids, or [token ids, segment ids] for 'unilm'.
    """

    MODES = ("padding", "causal", "unilm")

    def __init__(self, mode="padding", pad_id=0, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"AttentionBias mode must be one of {self.MODES}, got {mode!r}.")
        self.mode = mode
        self.pad_id = pad_id

    def call(self, inputs):
        token_ids = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        bias = ops.zeros((1, 1, 1, 1), self.compute_dtype)
        if self.pad_id is not None:  # GPT-2 has no padding token
            bias = K.padding_bias(token_ids, self.pad_id, self.compute_dtype)
        if self.mode == "causal":
            bias = bias + K.causal_bias(ops.shape(token_ids)[1], self.compute_dtype)
        elif self.mode == "unilm":
            bias = bias + K.unilm_bias(inputs[1], self.compute_dtype)
        return bias

    def compute_output_shape(self, input_shape):
        shape = input_shape[0] if isinstance(input_shape[0], (list, tuple)) else input_shape
        query_len = 1 if self.mode == "padding" else shape[1]
        return (shape[0], 1, query_len, shape[1])

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode, pad_id=self.pad_id)
        return config


@register
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head attention with an additive bias (padding / causal / position bias).

    Inputs [q, k, v]; `bias` broadcasts to [batch, heads, q_len, k_len]. `key_size` may differ
    from `head_size` (the value/output size per head), as in some compressed models.
    """

    def __init__(
        self,
        heads,
        head_size,
        out_dim=None,
        key_size=None,
        use_bias=True,
        attention_scale=True,
        attention_dropout=0.0,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.heads = heads
        self.head_size = head_size
        self.out_dim = out_dim
        self.key_size = key_size or head_size
        self.use_bias = use_bias
        self.attention_scale = attention_scale
        self.attention_dropout = attention_dropout
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.dropout = keras.layers.Dropout(attention_dropout) if attention_dropout else None

    def _dense(self, units, name):
        return keras.layers.Dense(
            units,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            name=name,
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        q_shape, k_shape, v_shape = input_shape[:3]
        out_dim = self.out_dim or q_shape[-1]
        self.q_dense = self._dense(self.heads * self.key_size, "q_dense")
        self.k_dense = self._dense(self.heads * self.key_size, "k_dense")
        self.v_dense = self._dense(self.heads * self.head_size, "v_dense")
        self.o_dense = self._dense(out_dim, "o_dense")
        self.q_dense.build(q_shape)
        self.k_dense.build(k_shape)
        self.v_dense.build(v_shape)
        self.o_dense.build(tuple(q_shape[:-1]) + (self.heads * self.head_size,))

    def _split_heads(self, x, size):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        return ops.reshape(x, (batch, length, self.heads, size))

    def call(self, inputs, bias=None, cache=None, training=None, rotary_embeddings=None,
             relative_embeddings=None, residual_scores=None, return_scores=False):
        """`cache` (cached decoding, see bert4k.decoding) stores this call's keys and values into
        its buffer and returns the whole buffer's, so earlier positions are not recomputed.

        Position information inside attention:
        - `rotary_embeddings` [1, length, key_size] (interleaved sin, cos pairs): RoFormer's
          rotary positions rotate the queries and keys (before caching, at their own positions);
        - `relative_embeddings` [q_len, k_len, key_size]: NEZHA's relative positions (Shaw et
          al.) add q . r_qk to the logits and sum_k p_qk r_qk to the values.
        `residual_scores` (RealFormer) are the previous layer's logits, added to this layer's;
        `return_scores=True` returns (output, logits), the logits before `bias`, for the next.
        """
        q, k, v = inputs[:3]
        qw = self._split_heads(self.q_dense(q), self.key_size)
        kw = self._split_heads(self.k_dense(k), self.key_size)
        vw = self._split_heads(self.v_dense(v), self.head_size)
        if rotary_embeddings is not None:
            sinusoidal = ops.expand_dims(ops.cast(rotary_embeddings, qw.dtype), -2)
            qw, kw = K.apply_rotary(qw, sinusoidal), K.apply_rotary(kw, sinusoidal)
        if cache is not None:
            kw, vw = cache.update(kw, vw)
        scores = ops.einsum("bqnd,bknd->bnqk", qw, kw)
        if relative_embeddings is not None:
            relative = ops.cast(relative_embeddings, qw.dtype)
            scores = scores + ops.einsum("bqnd,qkd->bnqk", qw, relative)
        if self.attention_scale:
            scores = scores * (self.key_size**-0.5)
        if residual_scores is not None:
            scores = scores + ops.cast(residual_scores, scores.dtype)
        logits = scores
        if bias is not None:
            scores = scores + ops.cast(bias, scores.dtype)
        # Softmax in float32: under bf16 the -1e4 mask and large logits lose precision.
        probs = ops.cast(ops.softmax(ops.cast(scores, "float32"), axis=-1), vw.dtype)
        if self.dropout is not None:
            probs = self.dropout(probs, training=training)
        out = ops.einsum("bnqk,bknd->bqnd", probs, vw)
        if relative_embeddings is not None:
            out = out + ops.einsum("bnqk,qkd->bqnd", probs, ops.cast(relative, probs.dtype))
        batch, length = ops.shape(out)[0], ops.shape(out)[1]
        out = self.o_dense(ops.reshape(out, (batch, length, self.heads * self.head_size)))
        return (out, logits) if return_scores else out

    def compute_output_shape(self, input_shape):
        q_shape = input_shape[0]
        return tuple(q_shape[:-1]) + (self.out_dim or q_shape[-1],)

    def compute_output_spec(self, inputs, *args, return_scores=False, **kwargs):
        output = super().compute_output_spec(inputs, *args, **kwargs)
        if not return_scores:
            return output
        q_shape, k_shape = inputs[0].shape, inputs[1].shape
        scores_shape = (q_shape[0], self.heads, q_shape[1], k_shape[1])
        return output, keras.KerasTensor(scores_shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            heads=self.heads,
            head_size=self.head_size,
            out_dim=self.out_dim,
            key_size=self.key_size,
            use_bias=self.use_bias,
            attention_scale=self.attention_scale,
            attention_dropout=self.attention_dropout,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


@register
class FeedForward(keras.layers.Layer):
    """Position-wise feed-forward. A list of activations makes it gated (T5.1.1's GEGLU):
    one input projection per activation, multiplied together, then the output projection."""

    def __init__(
        self, units, activation="relu", use_bias=True, kernel_initializer="glorot_uniform", **kwargs
    ):
        super().__init__(**kwargs)
        self.units = units
        activations = activation if isinstance(activation, (list, tuple)) else [activation]
        self.activation_names = [K.activation_name(a) for a in activations]
        self.activations = [K.get_activation(a) for a in activations]
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        dense = lambda units, name: keras.layers.Dense(  # noqa: E731
            units,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            name=name,
            dtype=self.dtype_policy,
        )
        self.input_denses = []
        for i in range(len(self.activations)):
            layer = dense(self.units, f"i{i}_dense")
            layer.build(input_shape)
            setattr(self, f"i{i}_dense", layer)
            self.input_denses.append(layer)
        self.o_dense = dense(input_shape[-1], "o_dense")
        self.o_dense.build(tuple(input_shape[:-1]) + (self.units,))

    def call(self, inputs):
        x = None
        for layer, activation in zip(self.input_denses, self.activations):
            h = activation(layer(inputs)) if activation else layer(inputs)
            x = h if x is None else x * h
        return self.o_dense(x)

    def get_config(self):
        config = super().get_config()
        names = self.activation_names
        config.update(
            units=self.units,
            activation=names if len(names) > 1 else names[0],
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


# ---------------------------------------------------------------------------------------------------
# Small pieces of the heads
# ---------------------------------------------------------------------------------------------------


@register
class BiasAdd(keras.layers.Layer):
    """A trainable bias alone (the MLM output bias after the tied embedding projection)."""

    def build(self, input_shape):
        self.bias = self.add_weight(name="bias", shape=(input_shape[-1],), initializer="zeros")

    def call(self, inputs):
        return inputs + ops.cast(self.bias, inputs.dtype)


@register
class SelectToken(keras.layers.Layer):
    """Hidden state of one position ([CLS] by default), the pooler's input."""

    def __init__(self, index=0, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def call(self, inputs):
        return inputs[:, self.index]

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + tuple(input_shape[2:])

    def get_config(self):
        config = super().get_config()
        config.update(index=self.index)
        return config


@register
class Activation(keras.layers.Layer):
    """keras.layers.Activation that also knows our activation names (gelu_erf, gelu_tanh, ...)."""

    def __init__(self, activation, **kwargs):
        super().__init__(**kwargs)
        self.activation_name = K.activation_name(activation)
        self.activation = K.get_activation(activation)

    def call(self, inputs):
        if self.activation_name == "softmax":
            # Softmax over a vocabulary in float32, then back to the compute dtype.
            return ops.cast(ops.softmax(ops.cast(inputs, "float32"), axis=-1), self.compute_dtype)
        return self.activation(inputs)

    def get_config(self):
        config = super().get_config()
        config.update(activation=self.activation_name)
        return config
