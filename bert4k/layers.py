"""Keras 3 layers of the transformer families: plain layers with explicit `get_config`, registered
under the package name "bert4k" so saved models load with `safe_mode=True`."""

import math
import weakref

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

    def add_weight(self, *args, **kwargs):
        # Under a mixed policy Keras would cast the whole table (vocabulary x hidden) to the
        # compute dtype on every call before gathering a few rows: MiniLM's 30522 x 384 cast
        # took 7% of a bf16 8x128 forward pass. Gathered rows are cast by the call instead.
        kwargs.setdefault("autocast", False)
        return super().add_weight(*args, **kwargs)

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
    sequence for both); output [q_len, k_len, output_dim]. During cached decoding `positions`
    [batch, q_len] and `key_length` give each row's real query positions and the buffer's
    length (slot j holds position j); the output is then [batch, q_len, key_length, output_dim]."""

    def __init__(self, output_dim, max_distance=64, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = output_dim
        self.max_distance = max_distance

    def call(self, inputs, positions=None, key_length=None):
        q, k = inputs if isinstance(inputs, (list, tuple)) else (inputs, inputs)
        if positions is None:
            distance = (ops.expand_dims(ops.arange(ops.shape(k)[1]), 0)
                        - ops.expand_dims(ops.arange(ops.shape(q)[1]), 1))
        else:
            distance = (ops.arange(key_length)[None, None, :]
                        - ops.cast(positions, "int32")[:, :, None])
        index = ops.clip(distance, -self.max_distance, self.max_distance) + self.max_distance
        return ops.cast(K.sinusoidal_embeddings(index, self.output_dim), self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self.output_dim, max_distance=self.max_distance)
        return config


@register
class RelativePositionBias(keras.layers.Layer):
    """T5's relative attention bias: key-minus-query distances fall into log-spaced buckets (signed
    when bidirectional), each bucket with a learned bias per head. Inputs [queries, keys];
    output [1 or batch, heads, q_len, k_len]. `positions` [batch, q_len] and `key_length` give
    the real query positions and buffer length during cached decoding."""

    def __init__(self, heads, num_buckets=32, max_distance=128, bidirectional=True,
                 embeddings_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.heads = heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def build(self, input_shape):
        self.embeddings = self.add_weight(name="embeddings", shape=(self.num_buckets, self.heads),
                                          initializer=self.embeddings_initializer)

    def bucket(self, distance):
        buckets, n = self.num_buckets, -distance
        offset = 0
        if self.bidirectional:
            buckets //= 2
            offset = ops.cast(n < 0, "int32") * buckets
            n = ops.abs(n)
        else:
            n = ops.maximum(n, 0)
        exact = buckets // 2
        scaled = ops.log(ops.maximum(ops.cast(n, "float32"), 1.0) / exact)
        scaled = scaled / math.log(self.max_distance / exact) * (buckets - exact)
        large = ops.minimum(exact + ops.cast(scaled, "int32"), buckets - 1)
        return offset + ops.where(n < exact, n, large)

    def call(self, inputs, positions=None, key_length=None):
        q, k = inputs
        if positions is None:
            positions = ops.expand_dims(ops.arange(ops.shape(q)[1]), 0)
        key_length = ops.shape(k)[1] if key_length is None else key_length
        distance = ops.arange(key_length)[None, None, :] - positions[:, :, None]
        bias = ops.take(ops.cast(self.embeddings, self.compute_dtype), self.bucket(distance), 0)
        return ops.transpose(bias, (0, 3, 1, 2))

    def compute_output_shape(self, input_shape):
        return (1, self.heads, input_shape[0][1], input_shape[1][1])

    def get_config(self):
        config = super().get_config()
        config.update(
            heads=self.heads, num_buckets=self.num_buckets, max_distance=self.max_distance,
            bidirectional=self.bidirectional,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
        )
        return config


@register
class SequenceMask(keras.layers.Layer):
    """Zero the vectors at padded positions: inputs [vectors, token ids]. A T5 encoder's output
    goes through it so a decoder given only the context can still tell its padding."""

    def __init__(self, pad_id=0, **kwargs):
        super().__init__(**kwargs)
        self.pad_id = pad_id

    def call(self, inputs):
        x, token_ids = inputs
        return K.sequence_masking(x, ops.not_equal(token_ids, self.pad_id))

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = super().get_config()
        config.update(pad_id=self.pad_id)
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
        gamma = beta = None
        if self.scale:
            gamma = ops.cast(self.gamma, "float32")
            if condition is not None:
                gamma = gamma + ops.cast(self.gamma_dense(condition), "float32")
        if self.center:
            beta = ops.cast(self.beta, "float32")
            if condition is not None:
                beta = beta + ops.cast(self.beta_dense(condition), "float32")
        return K.layer_norm(inputs, gamma, beta, self.epsilon, rms=self.rms)

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


def as_rows(x):
    """[..., dim] -> [rows, dim]: the projections of attention and feed-forward run on 2-D rows.

    A Dense on [batch, length, dim] is one matmul already (Keras reshapes it to 2-D inside), but
    on TensorFlow the reshape back to rank 3 then sits between the MatMul and its BiasAdd, so
    TensorFlow's graph optimizer cannot fuse the bias and activation into the matmul. On rows,
    MatMul + BiasAdd (+ GELU, ReLU, ...) become one oneDNN `_FusedMatMul` kernel, with no extra
    passes over the [tokens, units] result: about 15% off a feed-forward sublayer in graph mode
    (measured at MiniLM size, 8x128, fp32 and bf16). Under XLA and on other backends the
    reshapes are free.
    """
    return ops.reshape(x, (-1, x.shape[-1]))


@register
class AttentionBias(keras.layers.Layer):
    """Additive attention bias built from the inputs: padding keys (token id == pad_id) are hidden,
    and 'causal' (language model) or 'unilm' (seq2seq from segment ids) masks are added on top.

    Inputs: token ids, or [token ids, segment ids] for 'unilm'. Mode 'context' takes vectors
    [batch, length, dim] instead and hides the all-zero ones (a T5 encoder's padded positions).
    """

    MODES = ("padding", "causal", "unilm", "context")

    def __init__(self, mode="padding", pad_id=0, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"AttentionBias mode must be one of {self.MODES}, got {mode!r}.")
        self.mode = mode
        self.pad_id = pad_id

    def call(self, inputs):
        if self.mode == "context":
            keep = ops.cast(ops.any(ops.not_equal(inputs, 0), axis=-1), self.compute_dtype)
            return ops.expand_dims(ops.expand_dims((1.0 - keep) * K.MASK_BIAS, 1), 1)
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
        query_len = 1 if self.mode in ("padding", "context") else shape[1]
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

    `attention_implementation`: 'fused' computes softmax(q k^T * scale + bias) v with
    `keras.ops.dot_product_attention` (PyTorch's scaled_dot_product_attention kernel, JAX's
    dot_product_attention; on TensorFlow Keras writes out the same einsum/softmax/einsum, in
    float32 logits); 'explicit' writes the computation out here. The fused op has no attention
    dropout, no output of the logits and no term beside the bias, so a call that needs one of
    them (dropout while training, NEZHA's relative embeddings, RealFormer's residual scores,
    key_size != head_size) takes the explicit path whatever the setting. 'auto' (the default) is
    'fused' on JAX and PyTorch, where it is the fast kernel, and 'explicit' on TensorFlow, where
    Keras's einsums transpose inside and the explicit path's batched matmuls were faster
    (`scripts/benchmark.py`, MiniLM 8x128 in graph mode: x1.04-1.08).
    """

    IMPLEMENTATIONS = ("auto", "fused", "explicit")

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
        attention_implementation="auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if attention_implementation not in self.IMPLEMENTATIONS:
            raise ValueError(
                f"attention_implementation must be one of {self.IMPLEMENTATIONS}, got "
                f"{attention_implementation!r}."
            )
        self.heads = heads
        self.head_size = head_size
        self.out_dim = out_dim
        self.key_size = key_size or head_size
        self.use_bias = use_bias
        self.attention_scale = attention_scale
        self.attention_dropout = attention_dropout
        self.attention_implementation = attention_implementation
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        # Under the layer's policy: a float32 Dropout would hand bf16 attention float32
        # probabilities (and torch will not multiply them with bf16 values).
        self.dropout = (Dropout(attention_dropout, dtype=self.dtype_policy)
                        if attention_dropout else None)

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

    def _project(self, dense, x, size):
        """[batch, length, dim] -> [batch, length, heads, size] through one 2-D matmul (see
        `as_rows`)."""
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        return ops.reshape(dense(as_rows(x)), (batch, length, self.heads, size))

    def call(self, inputs, bias=None, cache=None, training=None, rotary_embeddings=None,
             relative_embeddings=None, position_bias=None, residual_scores=None,
             return_scores=False):
        """`cache` (cached decoding, see bert4k.decoding) stores this call's keys and values into
        its buffer and returns the whole buffer's, so earlier positions are not recomputed. The
        buffers are head-major, [batch, heads, slots, size]: the layout the two attention
        matmuls read directly, where [batch, slots, heads, size] would be transposed (a copy of
        the whole buffer, growing with the slots) in every layer at every step. A cached call
        therefore attends with the explicit path, whatever `attention_implementation` says:
        the fused op takes [batch, slots, heads, size] only.

        Position information inside attention:
        - `rotary_embeddings` [1, length, key_size] (interleaved sin, cos pairs): RoFormer's
          rotary positions rotate the queries and keys (before caching, at their own positions);
        - `relative_embeddings` [q_len, k_len, key_size]: NEZHA's relative positions (Shaw et
          al.) add q . r_qk to the logits and sum_k p_qk r_qk to the values.
        - `position_bias` [1 or batch, heads, q_len, k_len]: T5's bucketed relative positions,
          added to the logits.
        `residual_scores` (RealFormer) are the previous layer's logits, added to this layer's;
        `return_scores=True` returns (output, logits), the logits before `bias`, for the next.
        """
        q, k, v = inputs[:3]
        qw = self._project(self.q_dense, q, self.key_size)
        kw = self._project(self.k_dense, k, self.key_size)
        vw = self._project(self.v_dense, v, self.head_size)
        if rotary_embeddings is not None:
            sinusoidal = ops.expand_dims(ops.cast(rotary_embeddings, qw.dtype), -2)
            qw, kw = K.apply_rotary(qw, sinusoidal), K.apply_rotary(kw, sinusoidal)
        if cache is not None:
            # The buffers may be float32 under a bf16 policy: attend in the compute dtype.
            kw, vw = (ops.cast(x, qw.dtype) for x in cache.update(kw, vw))
            scores = ops.einsum("bqnd,bnkd->bnqk", qw, kw)
        elif self.uses_fused_path(training, relative_embeddings, residual_scores, return_scores):
            return self._output(self._fused_attention(qw, kw, vw, bias, position_bias))
        else:
            # Head-major copies, so both attention products are plain batched matmuls. On
            # TensorFlow the einsums transposed inside, slower: MiniLM's attention at 8x128 took
            # 1.8 ms a layer against 1.4, and a 16x128 training step 4% longer.
            vw = ops.transpose(vw, (0, 2, 1, 3))  # [batch, heads, keys, size]
            scores = ops.matmul(ops.transpose(qw, (0, 2, 1, 3)), ops.transpose(kw, (0, 2, 3, 1)))
        if relative_embeddings is not None:
            relative = ops.cast(relative_embeddings, qw.dtype)
            # [q, k, d], or [batch, q, k, d] in a cached step (each row at its own positions)
            table = "bqkd" if len(relative.shape) == 4 else "qkd"
            scores = scores + ops.einsum(f"bqnd,{table}->bnqk", qw, relative)
        if self.attention_scale:
            scores = scores * (self.key_size**-0.5)
        if position_bias is not None:
            scores = scores + ops.cast(position_bias, scores.dtype)
        if residual_scores is not None:
            scores = scores + ops.cast(residual_scores, scores.dtype)
        logits = scores
        if bias is not None:
            scores = scores + ops.cast(bias, scores.dtype)
        # Float32 accuracy: under bf16 the -1e4 mask and large logits lose precision.
        probs = ops.cast(K.softmax(scores), vw.dtype)
        if self.dropout is not None:
            probs = self.dropout(probs, training=training)
        out = ops.transpose(ops.matmul(probs, vw), (0, 2, 1, 3))  # [batch, length, heads, size]
        if relative_embeddings is not None:
            out = out + ops.einsum(f"bnqk,{table}->bqnd", probs, ops.cast(relative, probs.dtype))
        out = self._output(out)
        return (out, logits) if return_scores else out

    def _output(self, x):
        """[batch, length, heads, head_size] -> the output projection [batch, length, out_dim]."""
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        out = self.o_dense(ops.reshape(x, (-1, self.heads * self.head_size)))
        return ops.reshape(out, (batch, length, out.shape[-1]))

    def uses_fused_path(self, training=None, relative_embeddings=None, residual_scores=None,
                        return_scores=False):
        """Whether a call with these arguments goes through keras.ops.dot_product_attention."""
        implementation = self.attention_implementation
        if implementation == "auto":
            implementation = "explicit" if keras.backend.backend() == "tensorflow" else "fused"
        if implementation == "explicit":
            return False
        needs_logits = return_scores or residual_scores is not None
        needs_value_term = relative_embeddings is not None  # NEZHA: sum_k p_qk r_qk
        dropping = self.dropout is not None and bool(training)
        # The fused op takes one head size for queries, keys and values on some backends.
        return not (needs_logits or needs_value_term or dropping
                    or self.key_size != self.head_size)

    def _fused_attention(self, qw, kw, vw, bias, position_bias):
        """softmax(q k^T * scale + bias + position_bias) v, [batch, q_len, heads, head_size]:
        T5's position bias is additive, so it joins the mask bias."""
        if position_bias is not None:
            position_bias = ops.cast(position_bias, qw.dtype)
            bias = position_bias if bias is None else ops.cast(bias, qw.dtype) + position_bias
        elif bias is not None:
            bias = ops.cast(bias, qw.dtype)
        scale = self.key_size**-0.5 if self.attention_scale else 1.0
        return ops.dot_product_attention(qw, kw, vw, bias=bias, scale=scale)

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
            attention_implementation=self.attention_implementation,
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

    def call(self, inputs, training=None):
        rows = as_rows(inputs)  # see `as_rows`: projection, bias and activation fuse on TF
        x = None
        for layer, activation in zip(self.input_denses, self.activations):
            if activation and training:
                activation = K.activation_for_training(activation)
            h = activation(layer(rows)) if activation else layer(rows)
            x = h if x is None else x * h
        out = self.o_dense(x)
        return ops.reshape(out, (*ops.shape(inputs)[:-1], out.shape[-1]))

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
class Dropout(keras.layers.Dropout):
    """keras.layers.Dropout whose mask takes 16 random bits a value, not 32 (TensorFlow, JAX).

    The random generator is most of a dropout's cost on a CPU: TensorFlow's Philox took about
    1.9 ns a 32-bit number on the 2-core AMD EPYC machine (100 ms of a 640 ms MiniLM training
    step at 16x128), and JAX's Threefry behind `jax.random.bernoulli` about 11 ns a value. Each
    32-bit number is split in two; a value is kept when its 16 bits reach round(rate * 2^16), so
    the rate is exact to 2^-17, and the kept values are scaled by 1 / (1 - rate) as Keras's.
    PyTorch (its own fused dropout kernel), and a `noise_shape`, use Keras's own dropout.
    """

    def call(self, inputs, training=False):
        backend = keras.backend.backend()
        if (training and 0 < self.rate < 1 and self.noise_shape is None
                and backend in _SIXTEEN_BIT_DROPOUTS):
            return _SIXTEEN_BIT_DROPOUTS[backend](inputs, self.rate, self.seed_generator.next())
        return super().call(inputs, training=training)


def _keep_threshold(rate):
    return min(round(rate * 2**16), 2**16 - 1)


def _tensorflow_dropout(x, rate, seed):
    import tensorflow as tf

    if seed.dtype != tf.int32:  # the generator's state; stateless ops take int32 seeds (XLA)
        seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
    size = tf.size(x)
    words = tf.random.stateless_uniform([(size + 1) // 2], seed, minval=None, maxval=None,
                                        dtype=tf.uint32)
    halves = tf.reshape(tf.bitcast(words, tf.uint16), [-1])[:size]
    keep = tf.reshape(halves, tf.shape(x)) >= tf.constant(_keep_threshold(rate), tf.uint16)
    return tf.where(keep, x * tf.cast(1 / (1 - rate), x.dtype), tf.zeros((), x.dtype))


def _jax_dropout(x, rate, seed):
    import jax
    import jax.numpy as jnp

    # bits() of uint16 would draw a 32-bit number a value again: draw half as many and split them
    words = jax.random.bits(seed, ((x.size + 1) // 2,), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:x.size]
    keep = halves.reshape(x.shape) >= jnp.uint16(_keep_threshold(rate))
    return jnp.where(keep, x * jnp.asarray(1 / (1 - rate), x.dtype), jnp.zeros((), x.dtype))


_SIXTEEN_BIT_DROPOUTS = {"tensorflow": _tensorflow_dropout, "jax": _jax_dropout}


@register
class SelectToken(keras.layers.Layer):
    """Hidden state of one position ([CLS] by default), the pooler's input; with keepdims, as a
    sequence of length 1."""

    def __init__(self, index=0, keepdims=False, **kwargs):
        super().__init__(**kwargs)
        self.index = index
        self.keepdims = keepdims

    def call(self, inputs):
        if self.keepdims:
            return inputs[:, self.index:self.index + 1] if self.index != -1 else inputs[:, -1:]
        return inputs[:, self.index]

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + ((1,) if self.keepdims else ()) + tuple(input_shape[2:])

    def get_config(self):
        config = super().get_config()
        config.update(index=self.index, keepdims=self.keepdims)
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
            return K.softmax(inputs)  # over a vocabulary: float32 accuracy in any dtype
        return self.activation(inputs)

    def get_config(self):
        config = super().get_config()
        config.update(activation=self.activation_name)
        return config


# ---- Task heads: CRF, GlobalPointer, Loss ----

# A Keras loss or metric sees only (y_true, y_pred), so these heads write padding into their outputs
# as a score far below any real one, and their losses and metrics recognise padding by it.
PADDING_SCORE = -1e12
_PADDING_THRESHOLD = -1e6  # scores below this were written as padding


def _split_mask(inputs, mask):
    """Task heads take `x` or `[x, padding_mask]` (1 = token); an explicit mask wins over Keras's."""
    if isinstance(inputs, (list, tuple)):
        if len(inputs) == 2:
            return inputs[0], inputs[1]
        inputs = inputs[0]
    if isinstance(mask, (list, tuple)):
        mask = mask[0]
    return inputs, mask


def _first_shape(input_shape):
    """The shape of `x`, whether the layer was built on `x` or on `[x, padding_mask]`."""
    if input_shape and isinstance(input_shape[0], (list, tuple)):
        return tuple(input_shape[0])
    return tuple(input_shape)


def _unpadded(y_pred):
    """[batch, length] bool: False where a CRF wrote PADDING_SCORE."""
    return ops.all(ops.greater(ops.cast(y_pred, "float32"), _PADDING_THRESHOLD), axis=-1)


def _label_ids(y_true, y_pred):
    # Keras may hand sparse labels over as [batch, length, 1], and as floats.
    return ops.cast(ops.reshape(y_true, ops.shape(y_pred)[:-1]), "int32")


@register
def sparse_accuracy(y_true, y_pred):
    """CRF training metric: accuracy of each unpadded token's best emission (cheap; decode with
    Viterbi for real predictions). y_true holds label ids."""
    keep = ops.cast(_unpadded(y_pred), "float32")
    predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
    correct = ops.cast(ops.equal(predicted, _label_ids(y_true, y_pred)), "float32")
    return ops.sum(correct * keep) / ops.maximum(ops.sum(keep), 1.0)


@register
def dense_accuracy(y_true, y_pred):
    """`sparse_accuracy` for one-hot y_true."""
    return sparse_accuracy(ops.argmax(y_true, axis=-1), y_pred)


@register
class ConditionalRandomField(keras.layers.Layer):
    """Linear-chain CRF: a learned transition matrix `trans[i, j]` (label i followed by label j),
    with the loss and metrics that use it. The layer passes the emission scores through (in float32),
    except that padded positions become PADDING_SCORE. Padding comes from a Keras mask or an
    explicit second input `[scores, mask]`, and must be on one side of a sequence (right or left).

        crf = ConditionalRandomField(lr_multiplier=100)
        output = crf(keras.layers.Dense(num_labels)(hidden))
        model.compile(optimizer, loss=crf.sparse_loss, metrics=[crf.sparse_accuracy])
        ViterbiDecoder(keras.ops.convert_to_numpy(crf.trans)).decode(scores[:length])

    `lr_multiplier` multiplies the transitions' learning rate: the variable holds trans / m and the
    layer uses m * variable, so an (Adam-like) step on the variable moves `trans` m times as far.
    """

    def __init__(self, lr_multiplier=1, **kwargs):
        super().__init__(**kwargs)
        self.lr_multiplier = lr_multiplier

    def build(self, input_shape):
        num_labels = _first_shape(input_shape)[-1]
        self._trans = self.add_weight(
            name="trans", shape=(num_labels, num_labels), initializer="glorot_uniform"
        )
        if self.lr_multiplier != 1:
            self._trans.assign(self._trans / self.lr_multiplier)

    @property
    def trans(self):
        """The transition scores in use, [num_labels, num_labels]."""
        if self.lr_multiplier != 1:
            return self._trans * self.lr_multiplier
        return self._trans

    def call(self, inputs, mask=None):
        scores, mask = _split_mask(inputs, mask)
        scores = ops.cast(scores, "float32")  # PADDING_SCORE and the loss need float32's range
        if mask is None:
            return scores
        return ops.where(ops.expand_dims(ops.cast(mask, "bool"), -1), scores, PADDING_SCORE)

    def compute_mask(self, inputs, mask=None):
        return None  # the padding now lives in the scores

    def compute_output_shape(self, input_shape):
        return _first_shape(input_shape)

    # Loss objects rather than bound methods, so that a model compiled with them saves and loads.
    @property
    def sparse_loss(self):
        """Keras loss: the gold path's negative log-likelihood; y_true: label ids [batch, length]."""
        return CRFLoss(self)

    @property
    def dense_loss(self):
        """Keras loss: as `sparse_loss`, y_true one-hot [batch, length, num_labels]."""
        return CRFLoss(self, one_hot=True)

    # The accuracies need only the scores: plain registered functions, serializable as they are.
    sparse_accuracy = staticmethod(sparse_accuracy)
    dense_accuracy = staticmethod(dense_accuracy)

    def negative_log_likelihood(self, y_true, y_pred, one_hot=False):
        """Per-sequence loss [batch]: log Z minus the gold path's score (0 for all-padding rows)."""
        y_pred = ops.cast(y_pred, "float32")
        if not one_hot:
            y_true = ops.one_hot(_label_ids(y_true, y_pred), y_pred.shape[-1])
        keep = _unpadded(y_pred)
        y_pred = ops.where(ops.expand_dims(keep, -1), y_pred, 0.0)
        y_true = ops.cast(y_true, "float32") * ops.cast(ops.expand_dims(keep, -1), "float32")
        return self._log_partition(y_pred, keep) - self._path_score(y_true, y_pred)

    def _path_score(self, y_true, y_pred):
        """Emission plus transition scores of the one-hot path y_true; its zeroed padding drops the
        transitions into and out of padding."""
        emissions = ops.sum(y_true * y_pred, axis=(1, 2))
        trans = ops.cast(self.trans, "float32")
        transitions = ops.einsum("bti,ij,btj->b", y_true[:, :-1], trans, y_true[:, 1:])
        return emissions + transitions

    def _log_partition(self, y_pred, keep):
        """log Z by the forward algorithm in log space, scanned over time so that a dynamic length
        works on every backend. alpha[b, j] is the log-sum over paths so far ending in label j; a
        padded step leaves alpha as it is and the first token starts it: either side may be padded.
        """
        trans = ops.expand_dims(ops.cast(self.trans, "float32"), 0)

        def step(carry, inputs):
            alpha, started = carry
            emission, is_token = inputs
            extended = ops.logsumexp(ops.expand_dims(alpha, -1) + trans, axis=1) + emission
            updated = ops.where(ops.expand_dims(started, -1), extended, emission)
            alpha = ops.where(ops.expand_dims(is_token, -1), updated, alpha)
            return (alpha, ops.logical_or(started, is_token)), None

        time_major = (ops.transpose(y_pred, (1, 0, 2)), ops.transpose(keep, (1, 0)))
        initial = (ops.zeros_like(y_pred[:, 0]), ops.zeros_like(keep[:, 0]))
        (alpha, started), _ = ops.scan(step, initial, time_major)
        return ops.where(started, ops.logsumexp(alpha, axis=-1), 0.0)

    def get_config(self):
        config = super().get_config()
        config.update(lr_multiplier=self.lr_multiplier)
        return config

    @classmethod
    def from_config(cls, config):
        layer = super().from_config(config)
        _LOADED_CRFS[layer.name] = layer
        return layer


# CRF layers by name, as `from_config` last made them. Keras loads a model's layers before its
# compile config, so a CRFLoss being loaded finds its model's layer here. (Keras's shared-object
# mechanism does not reach layers inside a functional model's config.)
_LOADED_CRFS = weakref.WeakValueDictionary()


class _LayerHandle:
    """Holds a layer where Keras's save/load walker does not look: it follows attributes, and the
    CRF's loss properties would lead it from the layer to a new loss and back, without end."""

    def __init__(self, layer):
        self.layer = layer


@register
class CRFLoss(keras.losses.Loss):
    """`ConditionalRandomField.sparse_loss` / `.dense_loss`. Calling the object averages over the
    batch; `crf.negative_log_likelihood` gives the per-sequence values."""

    def __init__(self, crf, one_hot=False, name=None, **kwargs):
        super().__init__(name=name or ("dense_loss" if one_hot else "sparse_loss"), **kwargs)
        self._crf = _LayerHandle(crf)
        self.one_hot = one_hot

    def call(self, y_true, y_pred):
        return self._crf.layer.negative_log_likelihood(y_true, y_pred, one_hot=self.one_hot)

    def get_config(self):
        config = super().get_config()
        config.update(crf=self._crf.layer.name, one_hot=self.one_hot)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        name = config.pop("crf")
        crf = _LOADED_CRFS.get(name)
        if crf is None:
            raise ValueError(
                f"A CRF loss for layer {name!r} loads only with its model "
                "(keras.models.load_model); elsewhere, compile with the layer's sparse_loss again."
            )
        return cls(crf, **config)


@register
class GlobalPointer(keras.layers.Layer):
    """Scores for every (start, end) span: [batch, heads, length, length], one head per entity type
    (Su Jianlin's GlobalPointer, https://kexue.fm/archives/8373).

    Each head projects tokens to a query and a key of `head_size`, rotates both by RoPE (so a score
    knows the span's length) and takes their scaled dot product. Spans touching padding, and with
    `tril_mask` spans with start > end, score PADDING_SCORE. Padding comes from a Keras mask or a
    second input `[hidden, mask]`. Train with `K.multilabel_categorical_crossentropy` on the scores
    flattened per head; predict the spans scoring > 0. Scores are float32 even under mixed
    precision: PADDING_SCORE and the loss need float32's range.
    """

    def __init__(
        self,
        heads,
        head_size,
        RoPE=True,
        use_bias=True,
        tril_mask=True,
        kernel_initializer="lecun_normal",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.heads = heads
        self.head_size = head_size
        self.RoPE = RoPE
        self.use_bias = use_bias
        self.tril_mask = tril_mask
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self._create_projections()

    def _dense(self, units, name):
        return keras.layers.Dense(
            units,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name=name,
        )

    def _create_projections(self):
        # Per head, head_size query units then head_size key units: bert4keras's layout.
        self.dense = self._dense(self.heads * self.head_size * 2, "dense")

    def build(self, input_shape):
        self.dense.build(_first_shape(input_shape))

    def call(self, inputs, mask=None):
        hidden, mask = _split_mask(inputs, mask)
        projected = self.dense(hidden)
        projected = ops.reshape(
            projected, (*ops.shape(projected)[:-1], self.heads, 2 * self.head_size)
        )
        query, key = projected[..., : self.head_size], projected[..., self.head_size :]
        if self.RoPE:
            query, key = self._rotate(query), self._rotate(key)
        logits = ops.einsum("bmhd,bnhd->bhmn", query, key) / self.head_size**0.5
        return self._mask_spans(logits, mask)

    def _rotate(self, x):
        """RoPE on x [batch, length, (heads,) head_size] by token position."""
        positions = ops.arange(ops.shape(x)[1])
        sinusoidal = ops.cast(K.sinusoidal_embeddings(positions, self.head_size), x.dtype)
        if len(x.shape) == 4:
            sinusoidal = ops.expand_dims(sinusoidal, 1)  # the same rotation for every head
        return K.apply_rotary(x, sinusoidal)

    def _mask_spans(self, logits, mask):
        logits = ops.cast(logits, "float32")
        if mask is not None:
            token = ops.cast(mask, "bool")
            both_tokens = ops.logical_and(token[:, None, :, None], token[:, None, None, :])
            logits = ops.where(both_tokens, logits, PADDING_SCORE)
        if self.tril_mask:
            positions = ops.arange(ops.shape(logits)[-1])
            start_not_after_end = ops.expand_dims(positions, 1) <= ops.expand_dims(positions, 0)
            logits = ops.where(start_not_after_end, logits, PADDING_SCORE)
        return logits

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        shape = _first_shape(input_shape)
        return (shape[0], self.heads, shape[1], shape[1])

    def get_config(self):
        config = super().get_config()
        config.update(
            heads=self.heads,
            head_size=self.head_size,
            RoPE=self.RoPE,
            use_bias=self.use_bias,
            tril_mask=self.tril_mask,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


@register
class EfficientGlobalPointer(GlobalPointer):
    """GlobalPointer whose heads share one query/key projection and add a per-head score for the
    span's start and for its end token (https://kexue.fm/archives/8877): far fewer parameters."""

    def _create_projections(self):
        # bert4keras's layout: shared query/key interleaved (even units query, odd units key), and
        # per head an end-token unit (even) and a start-token unit (odd).
        self.p_dense = self._dense(self.head_size * 2, "p_dense")
        self.q_dense = self._dense(self.heads * 2, "q_dense")

    def build(self, input_shape):
        hidden_shape = _first_shape(input_shape)
        self.p_dense.build(hidden_shape)
        self.q_dense.build(hidden_shape[:-1] + (self.head_size * 2,))

    def call(self, inputs, mask=None):
        hidden, mask = _split_mask(inputs, mask)
        projected = self.p_dense(hidden)
        query, key = projected[..., ::2], projected[..., 1::2]
        if self.RoPE:
            query, key = self._rotate(query), self._rotate(key)
        shared = ops.einsum("bmd,bnd->bmn", query, key) / self.head_size**0.5
        token_bias = ops.transpose(self.q_dense(projected), (0, 2, 1)) / 2  # [batch, 2 heads, len]
        end_bias = ops.expand_dims(token_bias[:, ::2], 2)
        start_bias = ops.expand_dims(token_bias[:, 1::2], 3)
        return self._mask_spans(ops.expand_dims(shared, 1) + end_bias + start_bias, mask)


@register
class Loss(keras.layers.Layer):
    """A layer that adds a loss computed from its inputs (bert4keras's `Loss`), for losses that need
    more than (y_true, y_pred): subclass it, write `compute_loss(inputs, mask=None)`, and compile
    the model without a loss. Keras 3 collects `add_loss` from `call` in `fit`, `evaluate` and
    `train_on_batch` on every backend. The layer returns its inputs, or `inputs[output_axis]` (an
    index or a list of indices).
    """

    def __init__(self, output_axis=None, **kwargs):
        super().__init__(**kwargs)
        self.output_axis = output_axis

    def call(self, inputs, mask=None):
        self.add_loss(self.compute_loss(inputs, mask))
        return self._select(inputs)

    def compute_loss(self, inputs, mask=None):
        raise NotImplementedError(f"{type(self).__name__} must define compute_loss(inputs, mask).")

    def _select(self, items):
        if self.output_axis is None:
            return items
        if isinstance(self.output_axis, (list, tuple)):
            return [items[i] for i in self.output_axis]
        return items[self.output_axis]

    def compute_output_shape(self, input_shape):
        return self._select(input_shape)

    def compute_mask(self, inputs, mask=None):
        if mask is None:
            return None
        return self._select(mask)

    def get_config(self):
        config = super().get_config()
        config.update(output_axis=self.output_axis)
        return config
