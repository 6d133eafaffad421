"""Activations and tensor helpers on `keras.ops`, so every backend runs the same model code."""

import functools
import math

import keras
from keras import ops

# Additive bias for masked attention logits. Large enough to zero a softmax entry, small enough to
# stay finite in float16/bfloat16 after being added to a logit.
MASK_BIAS = -1e4


# ---------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="bert4k")
def gelu_erf(x):
    """GELU with the exact erf, as Google BERT and Hugging Face 'gelu'. On PyTorch Keras's op is
    torch's one kernel (the formula written out took four elementwise passes, about a fifth of a
    MiniLM forward). Elsewhere the formula: TensorFlow's op is written with erfc, which its graph
    optimizer does not fuse into the matmul while training (a MiniLM step took 6-17% longer)."""
    if keras.backend.backend() == "torch":
        return ops.gelu(x, approximate=False)
    return 0.5 * x * (1.0 + ops.erf(x / math.sqrt(2.0)))


@keras.saving.register_keras_serializable(package="bert4k")
def gelu_tanh(x):
    """GELU's tanh approximation: Hugging Face 'gelu_new' / 'gelu_pytorch_tanh', GPT-2."""
    cdf = 0.5 * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return x * cdf


@keras.saving.register_keras_serializable(package="bert4k")
def swish(x):
    return x * ops.sigmoid(x)


def activation_for_training(activation):
    """`activation`, or for GELU (erf) inside a TensorFlow graph outside XLA, the same function
    whose gradient runs as one XLA-compiled elementwise kernel (in float32) instead of about ten
    Eigen passes over the [tokens, intermediate] activations: at BERT-base 16x128 a layer's GELU
    forward and backward took 6.6 ms against 17.0. Its forward stays the plain ops, which
    TensorFlow fuses into the matmul when no gradient is taken."""
    if activation is gelu_erf and _runs_onednn_kernels():
        import tensorflow as tf

        if tf.inside_function():
            return _gelu_erf_with_compiled_gradient
    return activation


def _gelu_erf_with_compiled_gradient(x):
    import tensorflow as tf

    @tf.custom_gradient
    def gelu(x):
        return gelu_erf(x), lambda dy: _compiled_gelu_erf_gradient()(x, dy)
    return gelu(x)


@functools.cache
def _compiled_gelu_erf_gradient():
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def gradient(x, dy):
        x32, dy32 = tf.cast(x, tf.float32), tf.cast(dy, tf.float32)
        u = x32 * (1 / math.sqrt(2.0))
        slope = 0.5 * (1.0 + tf.math.erf(u)) + x32 * tf.exp(-u * u) / math.sqrt(2 * math.pi)
        return tf.cast(dy32 * slope, x.dtype)
    return gradient


ACTIVATIONS = {
    "gelu": gelu_erf,
    "gelu_erf": gelu_erf,
    "gelu_new": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "swish": swish,
    "silu": swish,
    "relu": ops.relu,
    "tanh": ops.tanh,
    "sigmoid": ops.sigmoid,
    "softmax": ops.softmax,
    "linear": None,
}


def get_activation(name):
    """The activation a config names; Keras's own names and callables pass through."""
    if name is None or callable(name):
        return name
    key = str(name).lower()
    if key in ACTIVATIONS:
        return ACTIVATIONS[key] or keras.activations.linear
    try:
        return keras.activations.get(name)
    except ValueError:
        known = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"Unknown activation {name!r}; expected one of {known}.") from None


def activation_name(activation):
    """A serializable name for an activation given by name or by one of our functions."""
    if activation is None or isinstance(activation, str):
        return activation
    for name, fn in ACTIVATIONS.items():
        if fn is activation:
            return name
    return keras.activations.serialize(activation)


def softmax(x, axis=-1):
    """Softmax in x's dtype with float32 accuracy: a bfloat16 or float16 x is cast to float32 and
    back, unless the backend's own kernel already computes in float32 (`_softmax_keeps_float32`).
    Under bf16 the two casts of attention's [batch, heads, queries, keys] logits were ~5% of a
    MiniLM 8x128 inference on TensorFlow."""
    dtype = keras.backend.standardize_dtype(x.dtype)
    if dtype not in ("bfloat16", "float16"):
        return ops.softmax(x, axis=axis)
    if _softmax_keeps_float32(dtype):
        return _tensorflow_softmax_with_float32_gradient(x, axis)
    return ops.cast(ops.softmax(ops.cast(x, "float32"), axis=axis), dtype)


def _tensorflow_softmax_with_float32_gradient(x, axis):
    """tf.nn.softmax, its gradient computed in float32: TensorFlow's own runs in bf16 ops, with
    4x the error of the cast path's (max 1.6e-2 against 3.7e-3 on 128 keys; this: 4.8e-3)."""
    import tensorflow as tf

    @tf.custom_gradient
    def softmax_(x):
        y = tf.nn.softmax(x, axis=axis)

        def gradient(dy):
            y32, dy32 = tf.cast(y, tf.float32), tf.cast(dy, tf.float32)
            dx = (dy32 - tf.reduce_sum(dy32 * y32, axis=axis, keepdims=True)) * y32
            return tf.cast(dx, x.dtype)
        return y, gradient
    return softmax_(x)


def _softmax_keeps_float32(dtype):
    """Whether ops.softmax of a `dtype` tensor, here, equals float32 softmax rounded to `dtype`.
    True only for bfloat16 under TensorFlow's oneDNN CPU kernels, which accumulate in float32
    (outputs bit-identical to the casts); Eigen's kernel (oneDNN off) and XLA's accumulate in
    bfloat16 (2.7-5x the error on 128-512 keys), and GPUs are not checked."""
    return dtype == "bfloat16" and _runs_onednn_kernels()


def _runs_onednn_kernels():
    """Whether TensorFlow ops built here run on oneDNN's CPU kernels: TensorFlow with oneDNN on,
    no GPU, not compiled by XLA. The tests are TensorFlow internals: if they move, this says no
    and the portable code paths run."""
    if keras.backend.backend() != "tensorflow":
        return False
    try:
        import tensorflow as tf
        from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext
        from tensorflow.python.util._pywrap_util_port import IsMklEnabled
    except ImportError:
        return False
    return (IsMklEnabled() and not tf.config.list_logical_devices("GPU")
            and not GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


# ---------------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------------


def layer_norm(x, gamma=None, beta=None, epsilon=1e-12, rms=False):
    """LayerNorm over the last axis in x's dtype, statistics in float32 under any dtype (bf16
    variance loses too many bits). gamma and beta (float32, broadcasting to x; None: 1 and 0)
    scale and shift the normalized x; `rms=True` skips the mean (T5's RMSNorm).

    Inside a TensorFlow graph on oneDNN, a plain LayerNorm (per-feature gamma and beta) runs as
    oneDNN's fused kernel instead of ~9 Eigen passes: 2.3x faster in float32 and 1.7x in bf16
    at [1024, 384], with the same outputs. A SavedModel exported from such a graph holds that op;
    TF_ENABLE_ONEDNN_OPTS=0 at export keeps the portable ops (for ARM or GPU-only builds)."""
    if not rms and _takes_onednn_layer_norm(x, gamma, beta):
        return _onednn_layer_norm(x, gamma, beta, epsilon)
    if not rms and keras.backend.backend() == "torch" and _per_feature(gamma, beta):
        # Keras's op is torch's fused kernel there, on x in float32 (~8 passes otherwise).
        return ops.layer_normalization(x, gamma, beta, epsilon=epsilon)
    dtype = x.dtype
    x = ops.cast(x, "float32")
    if not rms:
        x = x - ops.mean(x, axis=-1, keepdims=True)
    x = x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + epsilon)
    if gamma is not None:
        x = x * gamma
    if beta is not None:
        x = x + beta
    return ops.cast(x, dtype)


def _per_feature(gamma, beta):
    """Whether gamma and beta are one vector for every position (not Conditional LayerNorm's)."""
    return all(p is None or len(p.shape) == 1 for p in (gamma, beta))


def _takes_onednn_layer_norm(x, gamma, beta):
    """oneDNN's kernel is an op of graphs only, with one gamma and beta for every position."""
    if not (_per_feature(gamma, beta) and _runs_onednn_kernels()):
        return False
    import tensorflow as tf

    return tf.inside_function() and x.dtype in (tf.float32, tf.bfloat16, tf.float16)


def _onednn_layer_norm(x, gamma, beta, epsilon):
    """TensorFlow's `_MklLayerNorm` (the op its graph optimizer fuses Keras 2's LayerNorm into) on
    float32 rows, so that gamma and beta keep their float32 values (the op takes them in x's
    dtype); its gradient, which TensorFlow does not define, is LayerNorm's."""
    import tensorflow as tf
    from tensorflow.python.framework import op_def_library

    dim = x.shape[-1]
    gamma = tf.ones([dim], tf.float32) if gamma is None else gamma
    beta = tf.zeros([dim], tf.float32) if beta is None else beta

    @tf.custom_gradient
    def normalize(rows, gamma, beta):
        _, _, op, _ = op_def_library._apply_op_helper(
            "_MklLayerNorm", x=rows, scale=gamma, offset=beta, epsilon=epsilon,
            name="onednn_layer_norm")

        def gradient(dy):
            centered = rows - tf.reduce_mean(rows, axis=-1, keepdims=True)
            rstd = tf.math.rsqrt(tf.reduce_mean(tf.square(centered), -1, keepdims=True) + epsilon)
            normalized = centered * rstd
            dnormalized = dy * gamma
            dx = rstd * (dnormalized - tf.reduce_mean(dnormalized, -1, keepdims=True)
                         - normalized * tf.reduce_mean(dnormalized * normalized, -1, keepdims=True))
            return dx, tf.reduce_sum(dy * normalized, axis=0), tf.reduce_sum(dy, axis=0)
        return op.outputs[0], gradient
    rows = tf.cast(tf.reshape(x, [-1, dim]), tf.float32)
    y = tf.cast(tf.reshape(normalize(rows, gamma, beta), tf.shape(x)), x.dtype)
    y.set_shape(x.shape)
    return y


# ---------------------------------------------------------------------------------------------------
# Masks and attention biases
# ---------------------------------------------------------------------------------------------------


def sequence_masking(x, mask, value=0.0, axis=1):
    """Set x to `value` where mask (shape [batch, length], 1 = keep) is 0, along `axis`."""
    if mask is None:
        return x
    mask = ops.cast(mask, x.dtype)
    axis = axis % len(x.shape)
    for _ in range(axis - 1):
        mask = ops.expand_dims(mask, 1)
    while len(mask.shape) < len(x.shape):
        mask = ops.expand_dims(mask, -1)
    return x * mask + value * (1 - mask)


def padding_bias(token_ids, pad_id=0, dtype="float32"):
    """[batch, 1, 1, length]: MASK_BIAS on padded keys, 0 elsewhere."""
    keep = ops.cast(ops.not_equal(token_ids, pad_id), dtype)
    return ops.expand_dims(ops.expand_dims((1.0 - keep) * MASK_BIAS, 1), 1)


def causal_bias(length, dtype="float32"):
    """[1, 1, length, length]: each query sees itself and earlier keys (language models)."""
    idx = ops.arange(length)
    allowed = ops.cast(ops.expand_dims(idx, 1) >= ops.expand_dims(idx, 0), dtype)
    return ops.reshape((1.0 - allowed) * MASK_BIAS, (1, 1, length, length))


def unilm_bias(segment_ids, dtype="float32"):
    """[batch, 1, length, length]: UniLM seq2seq attention.

    Segment 0 (source) is seen by everyone; segment 1 (target) is seen causally. Equivalent to
    key position k visible from query q iff cumsum(seg)[k] <= cumsum(seg)[q].
    """
    idx = ops.cumsum(ops.cast(segment_ids, "int32"), axis=1)
    allowed = ops.cast(ops.expand_dims(idx, 1) <= ops.expand_dims(idx, 2), dtype)
    return ops.expand_dims((1.0 - allowed) * MASK_BIAS, 1)


# ---------------------------------------------------------------------------------------------------
# Position helpers
# ---------------------------------------------------------------------------------------------------


def sinusoidal_embeddings(positions, dim, base=10000.0):
    """Transformer sinusoidal embeddings for float positions [..., n] -> [..., n, dim], interleaved
    as (sin, cos) pairs, the layout RoFormer's rotary embedding expects."""
    # Feature j has frequency base^(-2 (j // 2) / dim): sin at even j, cos at odd j. Selecting
    # rather than stacking and reshaping keeps the shape static-free (symbolic tracing works).
    freqs = ops.repeat(ops.power(base, -2.0 * ops.arange(dim // 2, dtype="float32") / dim), 2)
    angles = ops.expand_dims(ops.cast(positions, "float32"), -1) * freqs
    even = ops.equal(ops.arange(2 * (dim // 2)) % 2, 0)
    return ops.where(even, ops.sin(angles), ops.cos(angles))


def apply_rotary(x, sinusoidal):
    """Rotate pairs (x[2i], x[2i+1]) of x [..., n, d] by the angles in `sinusoidal` [n, d]."""
    cos = ops.repeat(sinusoidal[..., 1::2], 2, axis=-1)
    sin = ops.repeat(sinusoidal[..., ::2], 2, axis=-1)
    x_even, x_odd = x[..., ::2], x[..., 1::2]
    rotated = ops.reshape(ops.stack([-x_odd, x_even], axis=-1), ops.shape(x))
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------


def multilabel_categorical_crossentropy(y_true, y_pred):
    """Multi-label softmax cross-entropy (Su Jianlin): y_true in {0, 1}, y_pred logits, no
    threshold to tune; positives are pushed above 0 and negatives below."""
    y_true = ops.cast(y_true, y_pred.dtype)
    y_pred = (1 - 2 * y_true) * y_pred
    y_neg = y_pred - y_true * 1e12
    y_pos = y_pred - (1 - y_true) * 1e12
    zeros = ops.zeros_like(y_pred[..., :1])
    neg_loss = ops.logsumexp(ops.concatenate([y_neg, zeros], axis=-1), axis=-1)
    pos_loss = ops.logsumexp(ops.concatenate([y_pos, zeros], axis=-1), axis=-1)
    return neg_loss + pos_loss


def sparse_multilabel_categorical_crossentropy(y_true, y_pred, mask_zero=False):
    """The same loss with y_true as indices of the positive classes [..., num_positive]; index 0
    is padding when mask_zero. Works for huge label spaces without a dense y_true."""
    zeros = ops.zeros_like(y_pred[..., :1])
    y_pred = ops.concatenate([y_pred, zeros], axis=-1)
    if mask_zero:
        infs = zeros + 1e12
        y_pred = ops.concatenate([infs, y_pred[..., 1:]], axis=-1)
    y_pos_2 = ops.take_along_axis(y_pred, ops.cast(y_true, "int32"), axis=-1)
    y_pos_1 = ops.concatenate([y_pos_2, zeros], axis=-1)
    if mask_zero:
        y_pred = ops.concatenate([-infs, y_pred[..., 1:]], axis=-1)
        y_pos_2 = ops.take_along_axis(y_pred, ops.cast(y_true, "int32"), axis=-1)
    pos_loss = ops.logsumexp(-y_pos_1, axis=-1)
    all_loss = ops.logsumexp(y_pred, axis=-1)
    aux_loss = ops.logsumexp(y_pos_2, axis=-1) - all_loss
    aux_loss = ops.clip(1 - ops.exp(aux_loss), 1e-7, 1)
    neg_loss = all_loss + ops.log(aux_loss)
    return pos_loss + neg_loss
