"""The Transformer builder, its families, and `build_transformer_model`.

A `Transformer` assembles a functional Keras model from hooks (inputs, embeddings, one block,
final layers, attention bias). Every layer goes through `apply()`, which keeps layers by name:
applying a name twice reuses the layer, which is how weights are shared, tied and prefixed.
"""

import inspect

import keras

from bert4k import backend as K
from bert4k import checkpoints, configs
from bert4k import layers as L

APPLICATIONS = {"encoder": "padding", "lm": "causal", "unilm": "unilm"}


class Transformer:
    """Base builder: an embedding stack, `num_hidden_layers` blocks and a family's final layers."""

    family = None  # the checkpoint mapping table (checkpoints.FAMILIES) this model reads and writes
    default_application = "encoder"  # what application=None means for the family
    pre_norm = False  # GPT-2 and T5 normalise before each sublayer instead of after

    def __init__(
        self,
        vocab_size,
        hidden_size,
        num_hidden_layers,
        num_attention_heads,
        intermediate_size,
        hidden_act="gelu",
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        embedding_size=None,
        attention_head_size=None,
        attention_key_size=None,
        sequence_length=None,
        max_position=512,
        segment_vocab_size=2,
        layer_norm_epsilon=1e-12,
        initializer_range=0.02,
        pad_token_id=0,
        application=None,
        ignore_invalid_weights=False,
        prefix=None,
        name=None,
        keep_tokens=None,
        compound_tokens=None,
        residual_attention_scores=False,
        layer_norm_cond=None,
        layer_norm_cond_hidden_size=None,
        layer_norm_cond_hidden_act=None,
        additional_input_layers=None,
        dtype_policy=None,
        attention_implementation="auto",
    ):
        """Options every family shares, beside the sizes:

        keep_tokens: old token ids to keep, in new-id order (from load_vocab(simplified=True)):
            the vocabulary shrinks to them, and the token embeddings and MLM bias read from a
            checkpoint keep only their rows. compound_tokens: new tokens appended after them,
            each a list of ids of the kept vocabulary (or (ids, weights)) whose mean
            initialises it.
        residual_attention_scores: RealFormer, each attention adds the previous one's logits.
        layer_norm_cond: Conditional LayerNorm in every norm. An int n adds an input
            'Input-Condition' of shape (n,); a Keras tensor is used as the condition, with
            `additional_input_layers` (the keras.Input(s) it comes from) appended to the
            model's inputs. layer_norm_cond_hidden_size/_act: a projection of the condition
            first.
        dtype_policy: a Keras dtype policy for the model's layers. 'mixed_bfloat16' (to
            train): weights float32, matmuls in bfloat16. 'bfloat16' (to predict): the same
            matmuls, with their weights stored in bfloat16 (no cast of every kernel at every
            call; half the memory; too coarse to take small updates). Under either, the
            residual stream (LayerNorm, the residual adds, dropout), softmax activations and
            the model's outputs stay float32 (see `layer_dtype`). None: Keras's global policy
            (keras.config.set_dtype_policy), treated the same way.
        attention_implementation: 'auto', 'fused' or 'explicit' (layers.MultiHeadAttention):
            keras.ops.dot_product_attention where the attention allows it, or bert4k's own
            batched matmuls; 'auto' takes the faster on the backend.
        """
        application = application or self.default_application
        if application not in APPLICATIONS:
            raise ValueError(
                f"Unknown application {application!r}; expected one of {sorted(APPLICATIONS)}."
            )
        if hidden_size % num_attention_heads and attention_head_size is None:
            raise ValueError(
                f"hidden_size={hidden_size} is not a multiple of "
                f"num_attention_heads={num_attention_heads}; give attention_head_size."
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.attention_head_size = attention_head_size or hidden_size // num_attention_heads
        self.attention_key_size = attention_key_size or self.attention_head_size
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.dropout_rate = dropout_rate or 0.0
        self.attention_dropout_rate = attention_dropout_rate or 0.0
        self.embedding_size = embedding_size or hidden_size
        self.sequence_length = sequence_length
        self.max_position = max_position
        self.segment_vocab_size = segment_vocab_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.pad_token_id = pad_token_id
        self.application = application
        self.ignore_invalid_weights = ignore_invalid_weights
        self.prefix = prefix or ""
        self.name = name
        self.layers = {}
        self.model = None
        if keep_tokens is not None:
            self.vocab_size = len(keep_tokens)
        self.vocab_size += len(compound_tokens or [])
        self.keep_tokens = keep_tokens
        self.compound_tokens = compound_tokens
        self.residual_attention_scores = residual_attention_scores
        self.attention_scores = None
        self.layer_norm_cond = layer_norm_cond
        self.layer_norm_cond_hidden_size = layer_norm_cond_hidden_size
        self.layer_norm_cond_hidden_act = layer_norm_cond_hidden_act
        self.additional_input_layers = additional_input_layers
        self.layer_norm_condition = None
        self.position_bias = None
        self.decoding = None  # a bert4k.decoding.DecodingState during a cached decoding step
        self.dtype_policy = dtype_policy
        self.attention_implementation = attention_implementation

    @classmethod
    def accepted_arguments(cls):
        """Every keyword the class chain accepts: the builder rejects anything else."""
        names = set()
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                params = inspect.signature(klass.__init__).parameters
                names.update(p for p in params if p not in ("self", "args", "kwargs"))
        return names

    # -- assembly ---------------------------------------------------------------------------------

    def build(self):
        inputs = self.get_inputs()
        condition_inputs = self.set_layer_norm_condition()
        self.attention_bias = self.compute_attention_bias(inputs)
        outputs = self.forward(inputs)
        self.model = keras.Model(inputs + condition_inputs, outputs, name=self.name)
        return self.model

    def forward(self, inputs):
        """Embeddings, blocks and final layers: on symbolic inputs when building, on real tensors
        during a cached decoding step (bert4k.decoding)."""
        x = self.apply_embeddings(inputs)
        self.position_bias = self.compute_position_bias(x)
        for index in range(self.num_hidden_layers):
            x = self.apply_main_layers(x, index)
        return self.cast_outputs(self.apply_final_layers(x))

    # Layers that only add, normalise, drop or squash: under a bf16/fp16 policy they run in float32,
    # so the residual stream between blocks keeps float32 precision (as torch.autocast leaves
    # additions and norms in float32). The matmul layers take their float32 inputs cast to
    # bfloat16 (Keras casts a layer's float inputs to its compute dtype), which costs a few cheap
    # elementwise casts. With the stream in bfloat16 too, every block's output is rounded to 8
    # bits of mantissa: on MiniLM (8x128) the largest difference from float32 grows from 0.031
    # to 0.045 and the mean one from 0.0017 to 0.0023 (outputs up to 6.1 in magnitude).
    FLOAT32_LAYERS = (L.LayerNormalization, keras.layers.Add, keras.layers.Dropout, L.Activation)

    def computes_in_half_precision(self):
        """Whether the policy in effect (ours or Keras's global one) computes in bfloat16 or
        float16, mixed or not."""
        policy = keras.dtype_policies.get(self.dtype_policy or keras.config.dtype_policy())
        return policy.compute_dtype in ("bfloat16", "float16")

    def layer_dtype(self, layer):
        """The dtype policy a new layer of class `layer` gets (None: Keras's global one)."""
        if (self.computes_in_half_precision() and isinstance(layer, type)
                and issubclass(layer, self.FLOAT32_LAYERS)):
            return "float32"
        return self.dtype_policy

    def cast_outputs(self, outputs):
        """Under a half-precision policy, the outputs as float32 (Keras's mixed-precision
        guide): users, losses and metrics get float32 tensors. Nothing for float32 outputs."""
        if not self.computes_in_half_precision():
            return outputs
        many = isinstance(outputs, (list, tuple))
        cast = []
        for i, x in enumerate(outputs if many else [outputs]):
            if keras.backend.standardize_dtype(x.dtype) != "float32":
                # Keras casts a layer's float inputs to its compute dtype: a linear Activation
                # of dtype float32 is a cast that saves and loads as a plain Keras layer.
                x = self.apply(x, keras.layers.Activation, activation="linear", dtype="float32",
                               name=f"Output-Float32-{i}" if many else "Output-Float32")
            cast.append(x)
        return cast if many else cast[0]

    def decoding_inputs(self, step_inputs):
        """This model's inputs from a cached decoding step's tensors (bert4k.decoding)."""
        return [step_inputs["token_ids"], step_inputs["segment_ids"]]

    def apply(self, inputs=None, layer=None, arguments=None, **kwargs):
        """Call the layer registered under kwargs['name'] (prefixed), creating it on first use.

        With inputs=None the layer itself is returned (for tying, e.g. the MLM head's use of
        Embedding-Token's table).
        """
        name = self.prefix + kwargs.pop("name")
        if name not in self.layers:
            dtype = self.layer_dtype(layer)
            if dtype is not None:
                kwargs.setdefault("dtype", dtype)
            self.layers[name] = layer(name=name, **kwargs)
        layer = self.layers[name]
        if inputs is None:
            return layer
        if self.decoding is not None:
            arguments = self.decoding.arguments_for(layer, arguments)
        if self.residual_attention_scores and isinstance(layer, L.MultiHeadAttention):
            return self.call_with_residual_scores(layer, inputs, arguments)
        return layer(inputs, **(arguments or {}))

    def call_with_residual_scores(self, layer, inputs, arguments):
        """RealFormer (arXiv:2012.11747): each attention adds the previous one's logits."""
        arguments = dict(arguments or {}, return_scores=True)
        if self.attention_scores is not None:
            arguments["residual_scores"] = self.attention_scores
        output, self.attention_scores = layer(inputs, **arguments)
        return output

    @property
    def initializer(self):
        return keras.initializers.TruncatedNormal(stddev=self.initializer_range)

    # -- hooks ------------------------------------------------------------------------------------

    def get_inputs(self):
        raise NotImplementedError

    def attention_mode(self):
        return APPLICATIONS[self.application]

    def compute_attention_bias(self, inputs):
        """The attention bias every block uses: padding, plus causal or UniLM masks."""
        mode = self.attention_mode()
        bias_inputs = inputs if mode == "unilm" else inputs[0]
        return self.apply(
            bias_inputs, L.AttentionBias, mode=mode, pad_id=self.pad_token_id, name="Attention-Mask"
        )

    def apply_embeddings(self, inputs):
        raise NotImplementedError

    def set_layer_norm_condition(self):
        """Set the Conditional LayerNorm condition; return the model inputs it adds."""
        condition = self.layer_norm_cond
        if condition is None:
            return []
        if isinstance(condition, int):
            condition = keras.Input((condition,), name=self.prefix + "Input-Condition")
            extra = [condition]
        else:
            extra = self.additional_input_layers
            if extra is None:
                extra = [condition]
            extra = list(extra) if isinstance(extra, (list, tuple)) else [extra]
        self.layer_norm_condition = condition
        return extra

    def compute_position_bias(self, x):
        """Position information every attention receives (relative or rotary embeddings),
        computed once from the embedded sequence; None for absolute positions."""
        return None

    def block_name(self, index):
        """Prefix of block `index`'s layer names; ALBERT drops the index so blocks share layers."""
        return f"Transformer-{index}"

    def apply_main_layers(self, x, index):
        """One transformer block: self-attention, then feed-forward, each a residual sublayer."""
        block = self.block_name(index)
        x = self.apply_residual(
            x, L.MultiHeadAttention, f"{block}-MultiHeadSelfAttention",
            sublayer_inputs=lambda h: [h, h, h], arguments=self.attention_arguments(index),
            **self.attention_settings(),
        )
        return self.apply_residual(x, L.FeedForward, f"{block}-FeedForward",
                                   **self.feed_forward_settings())

    def attention_arguments(self, index):
        """Tensors passed to block `index`'s attention call (bias; position bias; cache)."""
        return {"bias": self.attention_bias}

    def attention_settings(self):
        return dict(
            heads=self.num_attention_heads, head_size=self.attention_head_size,
            key_size=self.attention_key_size, attention_dropout=self.attention_dropout_rate,
            kernel_initializer=self.initializer,
            attention_implementation=self.attention_implementation,
        )

    def feed_forward_settings(self):
        return dict(units=self.intermediate_size, activation=self.hidden_act,
                    kernel_initializer=self.initializer)

    def apply_residual(self, x, layer, name, sublayer_inputs=None, arguments=None, norms=None,
                       **settings):
        """One residual sublayer. Post-norm (BERT): sublayer, dropout, add, norm. Pre-norm
        (GPT-2, T5): norm, sublayer, dropout, add. `sublayer_inputs(h)` builds the sublayer's
        inputs from the (normalised) stream, e.g. [h, h, h] for self-attention. `norms`, the
        names of the norms (before, after), or None for either, places them otherwise (GPT2-ML)."""
        if norms is None:
            norms = (f"{name}-Norm", None) if self.pre_norm else (None, f"{name}-Norm")
        before, after = norms
        h = self.apply_norm(x, before) if before else x
        h = sublayer_inputs(h) if sublayer_inputs else h
        h = self.apply(h, layer, arguments, name=name, **settings)
        h = self.apply(h, L.Dropout, rate=self.dropout_rate, name=f"{name}-Dropout")
        h = self.apply([x, h], keras.layers.Add, name=f"{name}-Add")
        return self.apply_norm(h, after) if after else h

    def apply_norm(self, x, name):
        settings = dict(epsilon=self.layer_norm_epsilon, **self.norm_settings())
        if self.layer_norm_condition is not None:
            x = [x, self.layer_norm_condition]
            settings.update(conditional=True, hidden_units=self.layer_norm_cond_hidden_size,
                            hidden_activation=self.layer_norm_cond_hidden_act or "linear",
                            hidden_initializer=self.initializer)
        return self.apply(x, L.LayerNormalization, name=name, **settings)

    def norm_settings(self):
        """LayerNormalization options of the family (RoFormer-v2: parameter-free RMS norm)."""
        return {}

    def apply_final_layers(self, x):
        raise NotImplementedError

    # -- checkpoints ------------------------------------------------------------------------------

    @property
    def weights(self):
        """The weights of the builder's own layers: those a checkpoint holds (a user's layers in
        the model, e.g. a condition's embedding for layer_norm_cond, are not read or written)."""
        seen = {}
        for layer in self.layers.values():
            for weight in layer.weights:
                seen.setdefault(id(weight), weight)
        return list(seen.values())

    def load_weights_from_checkpoint(self, checkpoint_path):
        """Returns the checkpoint's variables left unread (see checkpoints.load_weights)."""
        return checkpoints.load_weights(self, checkpoint_path, self.family, prefix=self.prefix,
                                 ignore_invalid_weights=self.ignore_invalid_weights,
                                 adapt=self.checkpoint_adaptations())

    # Weights indexed by token id, whose rows keep_tokens / compound_tokens select and extend.
    vocabulary_weights = ("Embedding-Token/embeddings", "MLM-Bias/bias")

    def checkpoint_adaptations(self):
        """{our weight path: steps after the family's table} for this model's options."""
        if self.keep_tokens is None and not self.compound_tokens:
            return {}
        step = (checkpoints.Vocabulary(self.keep_tokens, self.compound_tokens),)
        return {path: step for path in self.vocabulary_weights}

    def save_weights_as_checkpoint(self, checkpoint_prefix):
        checkpoints.save_weights_as_checkpoint(self.model, checkpoint_prefix, self.family,
                                               prefix=self.prefix)


class BERT(Transformer):
    """Google BERT: post-LayerNorm blocks, learned absolute positions, pooler, NSP and MLM heads."""

    family = "bert"
    use_bias = True  # of the embedding projection (RoFormer-v2 has no biases)

    def __init__(self, with_pool=False, with_nsp=False, with_mlm=False, hierarchical_position=None,
                 position_offset=0, **kwargs):
        """hierarchical_position: True (alpha 0.4) or a float alpha runs the learned positions
        beyond max_position, up to max_position**2. position_offset: first row of the position
        table (Hugging Face RoBERTa: pad_token_id + 1; set from its config.json)."""
        super().__init__(**kwargs)
        self.with_pool = with_pool or with_nsp
        self.with_nsp = with_nsp
        self.with_mlm = with_mlm
        self.hierarchical_position = 0.4 if hierarchical_position is True else hierarchical_position
        self.position_offset = position_offset

    def get_inputs(self):
        shape = (self.sequence_length,)
        inputs = [keras.Input(shape, dtype="int32", name=self.prefix + "Input-Token")]
        if self.segment_vocab_size > 0:
            inputs.append(keras.Input(shape, dtype="int32", name=self.prefix + "Input-Segment"))
        return inputs

    def apply_embeddings(self, inputs):
        x = self.apply(inputs[0], L.Embedding, input_dim=self.vocab_size,
                       output_dim=self.embedding_size, embeddings_initializer=self.initializer,
                       name="Embedding-Token")
        if self.segment_vocab_size > 0:
            s = self.apply(inputs[1], L.Embedding, input_dim=self.segment_vocab_size,
                           output_dim=self.embedding_size,
                           embeddings_initializer=self.initializer, name="Embedding-Segment")
            x = self.apply([x, s], keras.layers.Add, name="Embedding-Token-Segment")
        x = self.apply_position_embeddings(x)
        x = self.apply_norm(x, "Embedding-Norm")
        x = self.apply(x, L.Dropout, rate=self.dropout_rate, name="Embedding-Dropout")
        if self.embedding_size != self.hidden_size:
            x = self.apply(x, keras.layers.Dense, units=self.hidden_size, use_bias=self.use_bias,
                           kernel_initializer=self.initializer, name="Embedding-Mapping")
        return x

    def apply_position_embeddings(self, x):
        """Learned absolute positions; NEZHA and RoFormer put positions in attention instead."""
        return self.apply(x, L.PositionEmbedding, input_dim=self.max_position,
                          output_dim=self.embedding_size, hierarchical=self.hierarchical_position,
                          offset=self.position_offset, embeddings_initializer=self.initializer,
                          name="Embedding-Position")

    def apply_main_layers(self, x, index):
        """The last block of a model whose only output is the pooler (or NSP) is built twice from
        the same layers: over the whole sequence, which the model does not run but which
        `get_layer(...).output` still gives (Keras returns a layer's first call), and at the first
        position alone, queries [CLS] and keys every position, which the model runs: at length 128
        that skips 5/6 of the block (7% of BERT-base's encoder), and the pooled output is the same."""
        sequence = super().apply_main_layers(x, index)
        if index < self.num_hidden_layers - 1 or not self.pools_first_position_only():
            return sequence
        block = self.block_name(index)
        first = self.apply(x, L.SelectToken, index=0, keepdims=True, name=f"{block}-First-Position")
        first = self.apply_residual(
            first, L.MultiHeadAttention, f"{block}-MultiHeadSelfAttention",
            sublayer_inputs=lambda h: [h, x, x], arguments=self.attention_arguments(index))
        return self.apply_residual(first, L.FeedForward, f"{block}-FeedForward")

    def pools_first_position_only(self):
        """Whether nothing but the pooler reads the last block, and its first position depends on
        the others only through attention's keys and values (post-norm, padding mask, no position
        bias, residual scores, layer-norm condition or decoding cache)."""
        return (self.with_pool and not self.with_mlm and not self.pre_norm
                and self.attention_mode() == "padding" and self.position_bias is None
                and not self.residual_attention_scores and self.layer_norm_condition is None
                and self.decoding is None)

    def apply_final_layers(self, x):
        """bert4keras's output convention: the sequence alone; with heads, only the heads."""
        outputs = [x]
        if self.with_pool:
            outputs.append(self.apply_pooler(x))
        if self.with_mlm:
            outputs.append(self.apply_mlm(x))
        if len(outputs) == 1:
            return outputs[0]
        if len(outputs) == 2:
            return outputs[1]
        return outputs[1:]

    def apply_pooler(self, x):
        pool_activation = "tanh" if self.with_pool is True else self.with_pool
        x = self.apply(x, L.SelectToken, index=0, name="Pooler")
        x = self.apply(x, keras.layers.Dense, units=self.hidden_size,
                       activation=K.get_activation(pool_activation),
                       kernel_initializer=self.initializer, name="Pooler-Dense")
        if self.with_nsp:
            x = self.apply(x, keras.layers.Dense, units=2, activation="softmax",
                           kernel_initializer=self.initializer, name="NSP-Proba")
        return x

    def apply_mlm(self, x):
        mlm_activation = "softmax" if self.with_mlm is True else self.with_mlm
        x = self.apply(x, keras.layers.Dense, units=self.embedding_size,
                       activation=K.get_activation(self.hidden_act),
                       kernel_initializer=self.initializer, name="MLM-Dense")
        x = self.apply_norm(x, "MLM-Norm")
        x = self.apply(x, arguments={"mode": "dense"}, name="Embedding-Token")
        x = self.apply(x, L.BiasAdd, name="MLM-Bias")
        return self.apply(x, L.Activation, activation=mlm_activation, name="MLM-Activation")


class RoBERTa(BERT):
    """RoBERTa: BERT's network. Hugging Face files name it 'roberta.' with an 'lm_head.' MLM head,
    and their position table starts at pad_token_id + 1 (position_offset, set from config.json)."""

    family = "roberta"


class ALBERT(BERT):
    """ALBERT: factorised embeddings (Embedding-Mapping) and one block shared by every layer."""

    family = "albert"

    def block_name(self, index):
        return "Transformer"


class ALBERT_Unshared(BERT):
    """ALBERT's weights read into separate blocks, one per layer (fine-tuned apart, like BERT)."""

    family = "albert_unshared"


class NEZHA(BERT):
    """NEZHA (arXiv:1909.00204): functional relative positions, sinusoidal and clipped at
    max_relative_position, added to the keys and the values of every attention."""

    family = "nezha"

    def __init__(self, max_relative_position=64, use_relative_position=True, **kwargs):
        super().__init__(**kwargs)
        if not use_relative_position:
            raise ValueError("NEZHA without relative positions is BERT: build it with "
                             "model='bert'.")
        if self.attention_key_size != self.attention_head_size:
            raise ValueError(
                "NEZHA adds one relative embedding to keys and values: attention_key_size="
                f"{self.attention_key_size} must equal attention_head_size="
                f"{self.attention_head_size}."
            )
        self.max_relative_position = max_relative_position

    def apply_position_embeddings(self, x):
        return x

    def compute_position_bias(self, x):
        return self.apply(x, L.RelativePositionEmbedding, output_dim=self.attention_key_size,
                          max_distance=self.max_relative_position,
                          name="Embedding-Relative-Position")

    def attention_arguments(self, index):
        return dict(super().attention_arguments(index), relative_embeddings=self.position_bias)


class RoFormer(BERT):
    """RoFormer (arXiv:2104.09864): rotary positions rotate the queries and keys of every
    attention; no absolute position embeddings."""

    family = "roformer"

    def apply_position_embeddings(self, x):
        return x

    def compute_position_bias(self, x):
        return self.apply(x, L.SinusoidalPositionEmbedding, output_dim=self.attention_key_size,
                          name="Embedding-Rotary-Position")

    def attention_arguments(self, index):
        return dict(super().attention_arguments(index), rotary_embeddings=self.position_bias)


class RoFormerV2(RoFormer):
    """RoFormer-v2 (ZhuiyiTechnology/roformer-v2): RoFormer without any bias, with the
    parameter-free RMS norm x / sqrt(mean(x^2) + eps) (no gamma, no beta), still post-norm, and an
    MLM head that is the tied embeddings alone. (bert4keras's own initializer for pretraining
    from scratch is not reproduced: checkpoints and fine-tuning do not depend on it.)"""

    family = "roformer_v2"
    use_bias = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.with_pool or self.with_nsp:
            raise ValueError("RoFormer-v2 has no pooler or NSP head; use with_mlm, or pool yourself.")

    def norm_settings(self):
        return dict(rms=True, scale=False)

    def attention_settings(self):
        return dict(super().attention_settings(), use_bias=False)

    def feed_forward_settings(self):
        return dict(super().feed_forward_settings(), use_bias=False)

    def apply_mlm(self, x):
        if self.embedding_size != self.hidden_size:
            x = self.apply(x, keras.layers.Dense, units=self.embedding_size, use_bias=False,
                           kernel_initializer=self.initializer, name="Output-Mapping")
        x = self.apply(x, L.Dropout, rate=self.dropout_rate, name="Output-MLM-Dropout")
        x = self.apply(x, arguments={"mode": "dense"}, name="Embedding-Token")
        activation = "softmax" if self.with_mlm is True else self.with_mlm
        return self.apply(x, L.Activation, activation=activation, name="Output-MLM-Activation")


class ELECTRA(BERT):
    """ELECTRA (arXiv:2003.10555). The discriminator reads electra/ names; `with_discriminator`
    adds its replaced-token head (True: sigmoid probabilities, or an activation name).
    `generator=True` builds the generator instead (its config: hidden size and heads of the
    generator), which reads generator/ names, shares the embeddings under electra/embeddings,
    and has the MLM head (`with_mlm`)."""

    def __init__(self, with_discriminator=False, generator=False, **kwargs):
        super().__init__(**kwargs)
        if self.with_pool:
            raise ValueError("ELECTRA has no pooler or NSP head (with_pool, with_nsp).")
        if self.with_mlm and not generator:
            raise ValueError("ELECTRA's MLM head belongs to its generator: pass generator=True "
                             "(with the generator's sizes).")
        if with_discriminator and generator:
            raise ValueError("with_discriminator is the discriminator's head; the generator has "
                             "the MLM head (with_mlm).")
        self.with_discriminator = with_discriminator
        self.generator = generator
        self.family = "electra_generator" if generator else "electra"

    def apply_final_layers(self, x):
        if self.with_discriminator:
            activation = "sigmoid" if self.with_discriminator is True else self.with_discriminator
            x = self.apply(x, keras.layers.Dense, units=self.hidden_size,
                           activation=K.get_activation(self.hidden_act),
                           kernel_initializer=self.initializer, name="Discriminator-Dense")
            return self.apply(x, keras.layers.Dense, units=1,
                              activation=K.get_activation(activation),
                              kernel_initializer=self.initializer,
                              name="Discriminator-Prediction")
        return super().apply_final_layers(x)


class GPT(Transformer):
    """OpenAI GPT (GPT-1): BERT's post-LayerNorm blocks without segments or an embedding norm,
    learned positions, causal attention, and the output tied to the token embeddings. Besides
    Hugging Face's layout it reads BERT-named checkpoints of this network (as bert4keras read
    CDial-GPT)."""

    family = "gpt"
    default_application = "lm"

    def __init__(self, intermediate_size=None, hidden_act="gelu_new", segment_vocab_size=0,
                 layer_norm_epsilon=1e-5, pad_token_id=None, with_lm=True, **kwargs):
        hidden_size = kwargs["hidden_size"]
        super().__init__(intermediate_size=intermediate_size or 4 * hidden_size,
                         hidden_act=hidden_act, segment_vocab_size=segment_vocab_size,
                         layer_norm_epsilon=layer_norm_epsilon, pad_token_id=pad_token_id,
                         **kwargs)
        self.with_lm = with_lm

    def get_inputs(self):
        return [keras.Input((self.sequence_length,), dtype="int32",
                            name=self.prefix + "Input-Token")]

    def apply_embeddings(self, inputs):
        return self.apply(self.embed_tokens_and_positions(inputs[0]), L.Dropout,
                          rate=self.dropout_rate, name="Embedding-Dropout")

    def embed_tokens_and_positions(self, token_ids):
        x = self.apply(token_ids, L.Embedding, input_dim=self.vocab_size,
                       output_dim=self.hidden_size, embeddings_initializer=self.initializer,
                       name="Embedding-Token")
        return self.apply(x, L.PositionEmbedding, input_dim=self.max_position,
                          output_dim=self.hidden_size, embeddings_initializer=self.initializer,
                          name="Embedding-Position")

    def apply_final_layers(self, x):
        return self.apply_lm(x)

    def apply_lm(self, x):
        """Next-token probabilities (or logits with with_lm='linear') from the tied embeddings."""
        if not self.with_lm:
            return x
        x = self.apply(x, arguments={"mode": "dense"}, name="Embedding-Token")
        activation = "softmax" if self.with_lm is True else self.with_lm
        return self.apply(x, L.Activation, activation=activation, name="LM-Activation")


class GPT2(GPT):
    """OpenAI GPT-2: GPT with pre-LayerNorm blocks and a final LayerNorm."""

    family = "gpt2"
    pre_norm = True

    def apply_final_layers(self, x):
        x = self.apply_norm(x, "Output-Norm")
        x = self.apply(x, L.Dropout, rate=self.dropout_rate, name="Output-Dropout")
        return self.apply_lm(x)


class GPT2_ML(GPT):
    """GPT2-ML (imcaspar/gpt2-ml, on Grover's code; its 1.5B Chinese model): GPT with a
    LayerNorm after the embeddings and its own block: the attention's sum is not normalised;
    the feed-forward normalises its input and normalises its sum again.
    Read from the release's `newslm/...` checkpoint names."""

    family = "gpt2_ml"

    def __init__(self, hidden_act="gelu", **kwargs):  # its config.json's; GPT's is the tanh one
        super().__init__(hidden_act=hidden_act, **kwargs)

    def apply_embeddings(self, inputs):
        x = self.apply_norm(self.embed_tokens_and_positions(inputs[0]), "Embedding-Norm")
        return self.apply(x, L.Dropout, rate=self.dropout_rate,
                          name="Embedding-Dropout")

    def apply_main_layers(self, x, index):
        block = self.block_name(index)
        x = self.apply_residual(
            x, L.MultiHeadAttention, f"{block}-MultiHeadSelfAttention",
            sublayer_inputs=lambda h: [h, h, h], arguments=self.attention_arguments(index),
            norms=(None, None), **self.attention_settings(),
        )
        name = f"{block}-FeedForward"
        return self.apply_residual(x, L.FeedForward, name,
                                   norms=(f"{name}-Norm-0", f"{name}-Norm-1"),
                                   **self.feed_forward_settings())


class T5Base(Transformer):
    """What T5's encoder and decoder share: pre-norm blocks with RMS norm, no biases, unscaled
    attention with bucketed relative position biases, and versions 1.0 (ReLU FFN, output tied to
    the scaled embeddings) and 1.1 / mT5 1.1 (gated-GELU FFN, separate output layer)."""

    family = "t5"
    pre_norm = True
    default_version = "t5.1.0"
    stack = None  # "Encoder" or "Decoder": the prefix of the stack's layer names

    def __init__(self, version=None, hidden_act=None, layer_norm_epsilon=1e-6, segment_vocab_size=0,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 num_decoder_layers=None, with_lm=True, **kwargs):
        self.arguments = dict(kwargs, version=version, hidden_act=hidden_act,
                              layer_norm_epsilon=layer_norm_epsilon,
                              relative_attention_num_buckets=relative_attention_num_buckets,
                              relative_attention_max_distance=relative_attention_max_distance,
                              num_decoder_layers=num_decoder_layers, with_lm=with_lm)
        self.version = self.arguments["version"] = version or self.default_version
        if self.version not in ("t5.1.0", "t5.1.1", "mt5.1.1"):
            raise ValueError(f"Unknown T5 version {version!r}; expected t5.1.0, t5.1.1 or mt5.1.1.")
        if self.stack == "Decoder" and num_decoder_layers:
            kwargs["num_hidden_layers"] = num_decoder_layers
        if hidden_act is None:
            hidden_act = "relu" if self.version == "t5.1.0" else ["gelu_new", "linear"]
        kwargs.setdefault("intermediate_size", 4 * kwargs.get("hidden_size", 0))
        super().__init__(hidden_act=hidden_act, layer_norm_epsilon=layer_norm_epsilon,
                         segment_vocab_size=segment_vocab_size, **kwargs)
        self.family = "t5" if self.version == "t5.1.0" else "t5.1.1"
        self.num_buckets = relative_attention_num_buckets
        self.max_distance = relative_attention_max_distance
        self.with_lm = with_lm

    def block_name(self, index):
        return f"{self.stack}-Transformer-{index}"

    def norm_settings(self):
        return dict(rms=True)

    def attention_settings(self):
        return dict(super().attention_settings(), use_bias=False, attention_scale=False)

    def feed_forward_settings(self):
        return dict(super().feed_forward_settings(), use_bias=False)

    def attention_arguments(self, index):
        return dict(super().attention_arguments(index), position_bias=self.position_bias)

    def compute_position_bias(self, x):
        return self.apply([x, x], L.RelativePositionBias, heads=self.num_attention_heads,
                          num_buckets=self.num_buckets, max_distance=self.max_distance,
                          bidirectional=self.stack == "Encoder",
                          embeddings_initializer=self.initializer,
                          name=f"{self.stack}-Embedding-Relative-Position")

    def embed_tokens(self, token_ids):
        x = self.apply(token_ids, L.Embedding, input_dim=self.vocab_size,
                       output_dim=self.hidden_size, embeddings_initializer=self.initializer,
                       name="Embedding-Token")
        return self.apply(x, L.Dropout, rate=self.dropout_rate,
                          name=f"{self.stack}-Embedding-Dropout")

    def apply_output_norm(self, x):
        x = self.apply_norm(x, f"{self.stack}-Output-Norm")
        return self.apply(x, L.Dropout, rate=self.dropout_rate,
                          name=f"{self.stack}-Output-Dropout")


class T5Encoder(T5Base):
    """T5's encoder: Encoder-Input-Token -> the context, zero at padded positions."""

    stack = "Encoder"

    def get_inputs(self):
        return [keras.Input((self.sequence_length,), dtype="int32",
                            name=self.prefix + "Encoder-Input-Token")]

    def compute_attention_bias(self, inputs):
        self.token_ids = inputs[0]
        return self.apply(inputs[0], L.AttentionBias, mode="padding", pad_id=self.pad_token_id,
                          name="Encoder-Attention-Mask")

    def apply_embeddings(self, inputs):
        return self.embed_tokens(inputs[0])

    def apply_final_layers(self, x):
        x = self.apply_output_norm(x)
        return self.apply([x, self.token_ids], L.SequenceMask, pad_id=self.pad_token_id,
                          name="Encoder-Output-Mask")


class T5Decoder(T5Base):
    """T5's decoder: [Input-Context, Decoder-Input-Token] -> next-token probabilities. Causal
    self-attention (no padding mask: T5 starts decoding from the pad id), cross-attention to the
    context's non-zero positions."""

    stack = "Decoder"
    default_application = "lm"

    def get_inputs(self):
        context = keras.Input((self.sequence_length, self.hidden_size),
                              name=self.prefix + "Input-Context")
        tokens = keras.Input((self.sequence_length,), dtype="int32",
                             name=self.prefix + "Decoder-Input-Token")
        return [context, tokens]

    def compute_attention_bias(self, inputs):
        self.context_bias = self.apply(inputs[0], L.AttentionBias, mode="context",
                                       name="Decoder-Context-Mask")
        return self.apply(inputs[1], L.AttentionBias, mode="causal", pad_id=None,
                          name="Decoder-Attention-Mask")

    def apply_embeddings(self, inputs):
        self.context = inputs[0]
        return self.embed_tokens(inputs[1])

    def apply_main_layers(self, x, index):
        block = self.block_name(index)
        x = self.apply_residual(
            x, L.MultiHeadAttention, f"{block}-MultiHeadSelfAttention",
            sublayer_inputs=lambda h: [h, h, h], arguments=self.attention_arguments(index),
            **self.attention_settings(),
        )
        x = self.apply_residual(
            x, L.MultiHeadAttention, f"{block}-MultiHeadCrossAttention",
            sublayer_inputs=lambda h: [h, self.context, self.context],
            arguments={"bias": self.context_bias}, **self.attention_settings(),
        )
        return self.apply_residual(x, L.FeedForward, f"{block}-FeedForward",
                                   **self.feed_forward_settings())

    def apply_final_layers(self, x):
        x = self.apply_output_norm(x)
        if not self.with_lm:
            return x
        if self.version == "t5.1.0":  # tied output, scaled as Mesh TensorFlow does
            x = self.apply(x, keras.layers.Rescaling, scale=self.hidden_size**-0.5,
                           name="Decoder-Output-Scale")
            x = self.apply(x, arguments={"mode": "dense"}, name="Embedding-Token")
        else:
            x = self.apply(x, keras.layers.Dense, units=self.vocab_size, use_bias=False,
                           kernel_initializer=self.initializer, name="Decoder-Output-LM")
        activation = "softmax" if self.with_lm is True else self.with_lm
        return self.apply(x, L.Activation, activation=activation,
                          name="Decoder-Output-LM-Activation")

    def decoding_inputs(self, step_inputs):
        return [step_inputs["context"], step_inputs["token_ids"]]


class T5(T5Base):
    """The whole T5: [Encoder-Input-Token, Decoder-Input-Token] -> next-token probabilities.
    `.encoder` and `.decoder` are its two halves as Keras models (same layers, same weights),
    for encoding once and decoding step by step."""

    def build(self):
        self.encoder_builder = T5Encoder(**self.arguments)
        self.decoder_builder = T5Decoder(**self.arguments)
        self.encoder_builder.layers = self.decoder_builder.layers = self.layers  # one registry
        self.encoder = self.encoder_builder.build()
        self.decoder = self.decoder_builder.build()
        # The whole model applies the decoder's layers again, to the encoder's output: one flat
        # graph (a nested decoder model would not reload its shared layers' wiring).
        inputs = [self.encoder.inputs[0], self.decoder.inputs[1]]
        decoder_inputs = [self.encoder.outputs[0], inputs[1]]
        self.decoder_builder.attention_bias = self.decoder_builder.compute_attention_bias(
            decoder_inputs)
        self.model = keras.Model(inputs, self.decoder_builder.forward(decoder_inputs),
                                 name=self.name)
        return self.model


class T5_1_1(T5):
    default_version = "t5.1.1"


class T5_1_1_Encoder(T5Encoder):
    default_version = "t5.1.1"


class T5_1_1_Decoder(T5Decoder):
    default_version = "t5.1.1"


MODELS = {"bert": BERT, "gpt": GPT, "gpt2": GPT2, "t5": T5, "t5.1.0": T5, "t5.1.1": T5_1_1,
          "mt5.1.1": T5_1_1, "t5_encoder": T5Encoder, "t5_decoder": T5Decoder}
# bert4keras's names for one half of a given version (a config.json of transformers says the
# version itself; a Mesh TensorFlow release's config does not).
MODELS.update({"t5.1.0_encoder": T5Encoder, "t5.1.0_decoder": T5Decoder,
               "t5.1.1_encoder": T5_1_1_Encoder, "t5.1.1_decoder": T5_1_1_Decoder,
               "mt5.1.1_encoder": T5_1_1_Encoder, "mt5.1.1_decoder": T5_1_1_Decoder})
MODELS.update({
    "roberta": RoBERTa, "albert": ALBERT, "albert_unshared": ALBERT_Unshared, "nezha": NEZHA,
    "roformer": RoFormer, "roformer_v2": RoFormerV2, "electra": ELECTRA, "gpt2_ml": GPT2_ML,
})


def build_transformer_model(
    config_path=None,
    checkpoint_path=None,
    model="bert",
    application=None,
    return_keras_model=True,
    **kwargs,
):
    """Build a model from a config file (Google or Hugging Face) and keyword overrides, and load
    a checkpoint (Google TF checkpoint prefix, Hugging Face directory or .safetensors file).

    application: 'encoder', 'lm' (causal) or 'unilm' (seq2seq); None takes the family's own
    ('encoder' for BERT, 'lm' for GPT-2).
    """
    model_class = resolve_model_class(model)
    arguments = configs.load_config(config_path, model)
    arguments.update(kwargs)
    arguments["application"] = application
    check_arguments(model_class, arguments, config_path)
    transformer = model_class(**arguments)
    transformer.build()
    if checkpoint_path is not None:
        transformer.load_weights_from_checkpoint(checkpoint_path)
    return transformer.model if return_keras_model else transformer


def resolve_model_class(model):
    if isinstance(model, type) and issubclass(model, Transformer):
        return model
    if isinstance(model, str) and model.lower() in MODELS:
        return MODELS[model.lower()]
    raise ValueError(
        f"Unknown model {model!r}; expected one of {sorted(MODELS)} or a Transformer subclass."
    )


def check_arguments(model_class, arguments, config_path):
    accepted = model_class.accepted_arguments()
    unknown = sorted(set(arguments) - accepted)
    if unknown:
        source = f"config {config_path!r} and keyword arguments" if config_path else "keyword arguments"
        raise TypeError(
            f"Unknown {source} for {model_class.__name__}: {unknown}. "
            f"Accepted: {sorted(accepted)}."
        )
    # A subclass may give a default to a setting its base requires (GPT-2's intermediate_size).
    defaults = {}
    for klass in model_class.__mro__:
        if "__init__" in vars(klass):
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if p.kind == p.POSITIONAL_OR_KEYWORD and name != "self":
                    defaults.setdefault(name, p.default is not inspect.Parameter.empty)
    required = {name for name, has_default in defaults.items() if not has_default}
    missing = sorted(required - set(arguments))
    if missing:
        raise ValueError(
            f"Missing model settings {missing}: give a config_path (bert_config.json or "
            "config.json) or pass them as keyword arguments."
        )
