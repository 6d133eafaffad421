"""Reading and writing checkpoints: Google TF checkpoints, Hugging Face safetensors (and, with
torch installed, pytorch_model.bin read with weights_only=True).

Weights map by name through one declared table per family: our weight path (layer name /
weight name, `{i}` for the block index) -> the variable name in Google's release, plus a transform.
Hugging Face names follow from Google names by a per-family rule. Never by weight order.
"""

import json
import os
import re
import tempfile
import warnings

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose variables do not fit the model."""


# ---------------------------------------------------------------------------------------------------
# Transforms: steps applied, in order, to a stored value to give our weight
# ---------------------------------------------------------------------------------------------------


class Transpose:
    def to_model(self, value):
        return value.T

    def to_checkpoint(self, value):
        return value.T

    def model_shape(self, shape):
        return tuple(shape[::-1])


class Squeeze:
    """OpenAI's TF checkpoints keep conv1d kernels with a leading axis of 1."""

    def to_model(self, value):
        return value[0]

    def to_checkpoint(self, value):
        return value[None]

    def model_shape(self, shape):
        return tuple(shape[1:])


class Split:
    """One fused stored matrix feeds several of our weights (GPT-2's c_attn -> q, k, v); the
    writer concatenates the parts back, in order, along `axis`."""

    def __init__(self, part, parts, axis=-1):
        self.part, self.parts, self.axis = part, parts, axis

    def to_model(self, value):
        return np.split(value, self.parts, axis=self.axis)[self.part]

    def model_shape(self, shape):
        shape = list(shape)
        shape[self.axis] //= self.parts
        return tuple(shape)


class Vocabulary:
    """Rows of a vocabulary-indexed weight (token embeddings, MLM output bias) for a shrunk or
    extended vocabulary: `keep_tokens` (old ids, in new-id order) selects rows, and each entry of
    `compound_tokens` (a list of ids of the kept vocabulary, or (ids, weights)) appends their
    (weighted) mean, as bert4keras's `keep_tokens` / `compound_tokens` do at load time. Loading only: a model built
    this way writes its own, smaller vocabulary."""

    def __init__(self, keep_tokens=None, compound_tokens=None):
        self.keep_tokens, self.compound_tokens = keep_tokens, compound_tokens or []

    def to_model(self, value):
        value = np.asarray(value)
        rows = value if self.keep_tokens is None else value[np.asarray(self.keep_tokens)]
        extra = []
        for item in self.compound_tokens:
            ids, weights = (item, None) if _is_id_list(item) else item
            extra.append(np.average(rows[np.asarray(ids)], axis=0, weights=weights))
        return np.concatenate([rows, np.asarray(extra, value.dtype)]) if extra else rows

    def model_shape(self, shape):
        rows = shape[0] if self.keep_tokens is None else len(self.keep_tokens)
        return (rows + len(self.compound_tokens),) + tuple(shape[1:])


def _is_id_list(item):
    return all(isinstance(i, (int, np.integer)) for i in item)


TRANSPOSE = (Transpose(),)


def to_model(value, steps):
    for step in steps or ():
        value = step.to_model(value)
    return value


def model_shape(shape, steps):
    for step in steps or ():
        shape = step.model_shape(shape)
    return tuple(shape)


def to_checkpoint(parts, steps):
    """Inverse of to_model; `parts` holds our weights in Split order (one unless split)."""
    steps = tuple(steps or ())
    if steps and isinstance(steps[-1], Split):
        value, steps = np.concatenate(parts, axis=steps[-1].axis), steps[:-1]
    else:
        (value,) = parts
    for step in reversed(steps):
        value = step.to_checkpoint(value)
    return value


# ---------------------------------------------------------------------------------------------------
# Mapping tables: (our weight path, original-release variable name, transform steps)
# ---------------------------------------------------------------------------------------------------

BERT_TABLE = [
    ("Embedding-Token/embeddings", "bert/embeddings/word_embeddings", None),
    ("Embedding-Segment/embeddings", "bert/embeddings/token_type_embeddings", None),
    ("Embedding-Position/embeddings", "bert/embeddings/position_embeddings", None),
    ("Embedding-Norm/gamma", "bert/embeddings/LayerNorm/gamma", None),
    ("Embedding-Norm/beta", "bert/embeddings/LayerNorm/beta", None),
]
for ours, google in [
    ("MultiHeadSelfAttention/q_dense", "attention/self/query"),
    ("MultiHeadSelfAttention/k_dense", "attention/self/key"),
    ("MultiHeadSelfAttention/v_dense", "attention/self/value"),
    ("MultiHeadSelfAttention/o_dense", "attention/output/dense"),
    ("FeedForward/i0_dense", "intermediate/dense"),
    ("FeedForward/o_dense", "output/dense"),
]:
    for weight in ("kernel", "bias"):
        BERT_TABLE.append(
            (f"Transformer-{{i}}-{ours}/{weight}", f"bert/encoder/layer_{{i}}/{google}/{weight}", None)
        )
for ours, google in [
    ("MultiHeadSelfAttention-Norm", "attention/output/LayerNorm"),
    ("FeedForward-Norm", "output/LayerNorm"),
]:
    for weight in ("gamma", "beta"):
        BERT_TABLE.append(
            (f"Transformer-{{i}}-{ours}/{weight}", f"bert/encoder/layer_{{i}}/{google}/{weight}", None)
        )
BERT_TABLE += [
    ("Pooler-Dense/kernel", "bert/pooler/dense/kernel", None),
    ("Pooler-Dense/bias", "bert/pooler/dense/bias", None),
    # Google stores the NSP matrix as [2, hidden], not as a [hidden, 2] kernel.
    ("NSP-Proba/kernel", "cls/seq_relationship/output_weights", TRANSPOSE),
    ("NSP-Proba/bias", "cls/seq_relationship/output_bias", None),
    ("MLM-Dense/kernel", "cls/predictions/transform/dense/kernel", None),
    ("MLM-Dense/bias", "cls/predictions/transform/dense/bias", None),
    ("MLM-Norm/gamma", "cls/predictions/transform/LayerNorm/gamma", None),
    ("MLM-Norm/beta", "cls/predictions/transform/LayerNorm/beta", None),
    ("MLM-Bias/bias", "cls/predictions/output_bias", None),
]


def bert_hf_name(google_name, steps):
    """Google BERT name and steps -> (Hugging Face name, steps from the HF value to ours).

    HF Linear layers keep [out, in] matrices where Google keeps [in, out] kernels.
    """
    special = {
        "cls/predictions/output_bias": "cls.predictions.bias",
        "cls/seq_relationship/output_weights": "cls.seq_relationship.weight",
        "cls/seq_relationship/output_bias": "cls.seq_relationship.bias",
    }
    if google_name in special:
        return special[google_name], steps
    name = re.sub(r"layer_(\d+|\{i\})", r"layer.\1", google_name)
    if name.endswith("/kernel"):
        steps = TRANSPOSE
    name = re.sub(r"/(kernel|gamma)$", "/weight", name)
    name = re.sub(r"/beta$", "/bias", name)
    if name.endswith("_embeddings"):
        name += "/weight"
    return name.replace("/", "."), steps


GPT2_TABLE = [
    ("Embedding-Token/embeddings", "model/wte", None),
    ("Embedding-Position/embeddings", "model/wpe", None),
    ("Output-Norm/gamma", "model/ln_f/g", None),
    ("Output-Norm/beta", "model/ln_f/b", None),
]
for ours, original in [
    ("MultiHeadSelfAttention-Norm", "ln_1"),
    ("FeedForward-Norm", "ln_2"),
]:
    GPT2_TABLE += [
        (f"Transformer-{{i}}-{ours}/gamma", f"model/h{{i}}/{original}/g", None),
        (f"Transformer-{{i}}-{ours}/beta", f"model/h{{i}}/{original}/b", None),
    ]
for part, dense in enumerate(["q_dense", "k_dense", "v_dense"]):
    GPT2_TABLE += [
        (f"Transformer-{{i}}-MultiHeadSelfAttention/{dense}/kernel", "model/h{i}/attn/c_attn/w",
         (Squeeze(), Split(part, 3))),
        (f"Transformer-{{i}}-MultiHeadSelfAttention/{dense}/bias", "model/h{i}/attn/c_attn/b",
         (Split(part, 3),)),
    ]
for ours, original in [
    ("MultiHeadSelfAttention/o_dense", "attn/c_proj"),
    ("FeedForward/i0_dense", "mlp/c_fc"),
    ("FeedForward/o_dense", "mlp/c_proj"),
]:
    GPT2_TABLE += [
        (f"Transformer-{{i}}-{ours}/kernel", f"model/h{{i}}/{original}/w", (Squeeze(),)),
        (f"Transformer-{{i}}-{ours}/bias", f"model/h{{i}}/{original}/b", None),
    ]


def gpt2_hf_name(original, steps):
    """OpenAI's TF names -> Hugging Face GPT2Model names. HF's Conv1D keeps OpenAI's [in, out]
    layout without the leading axis."""
    name = re.sub(r"^model/", "transformer/", original)
    name = re.sub(r"h(\d+|\{i\})/", r"h.\1/", name)
    name = re.sub(r"/g$", "/weight", name)
    name = re.sub(r"/w$", "/weight", name)
    name = re.sub(r"/b$", "/bias", name)
    if name in ("transformer/wte", "transformer/wpe"):
        name += "/weight"
    steps = tuple(step for step in steps or () if not isinstance(step, Squeeze))
    return name.replace("/", "."), steps


# GPT-1 in BERT's names (bert4keras read CDial-GPT so): BERT's rows for the parts GPT has.
GPT_TABLE = [row for row in BERT_TABLE
             if row[0].startswith(("Embedding-Token", "Embedding-Position", "Transformer-"))]
GPT_HF_NAMES = {
    "attention/self/query": "attn/c_attn", "attention/self/key": "attn/c_attn",
    "attention/self/value": "attn/c_attn", "attention/output/dense": "attn/c_proj",
    "attention/output/LayerNorm": "ln_1", "intermediate/dense": "mlp/c_fc",
    "output/dense": "mlp/c_proj", "output/LayerNorm": "ln_2",
}


def gpt_hf_name(original, steps):
    """BERT-named GPT -> Hugging Face OpenAIGPTModel names: fused, Conv1D ([in, out]) q/k/v."""
    if original.startswith("bert/embeddings/"):
        table = "tokens_embed" if original.endswith("word_embeddings") else "positions_embed"
        return f"transformer.{table}.weight", steps
    match = re.fullmatch(r"bert/encoder/layer_(\{i\}|\d+)/(.+)/(kernel|bias|gamma|beta)", original)
    block, part, kind = match.groups()
    name = f"transformer/h/{block}/{GPT_HF_NAMES[part]}/"
    name += "bias" if kind in ("bias", "beta") else "weight"
    fused = ["attention/self/query", "attention/self/key", "attention/self/value"]
    steps = (Split(fused.index(part), 3),) if part in fused else None
    return name.replace("/", "."), steps


# GPT2-ML in its release's names (Grover's code: dense kernels [in, out], like ours).
GPT2_ML_TABLE = [
    ("Embedding-Token/embeddings", "newslm/embeddings/word_embed", None),
    ("Embedding-Position/embeddings", "newslm/embeddings/pos_embed", None),
    ("Embedding-Norm/gamma", "newslm/embeddings/LayerNorm_embed_norm/gamma", None),
    ("Embedding-Norm/beta", "newslm/embeddings/LayerNorm_embed_norm/beta", None),
]
for ours, original in [
    ("MultiHeadSelfAttention/q_dense", "query_layer"),
    ("MultiHeadSelfAttention/k_dense", "key_layer"),
    ("MultiHeadSelfAttention/v_dense", "value_layer"),
    ("MultiHeadSelfAttention/o_dense", "context_projection_layer"),
    ("FeedForward/i0_dense", "intermediate"),
    ("FeedForward/o_dense", "output"),
]:
    GPT2_ML_TABLE += [(f"Transformer-{{i}}-{ours}/{weight}",
                       f"newslm/layer{{i:02d}}/{original}/{weight}", None)
                      for weight in ("kernel", "bias")]
for ours, original in [("FeedForward-Norm-0", "LayerNorm_mlp_ln0"),
                       ("FeedForward-Norm-1", "LayerNorm_mlp_ln1")]:
    GPT2_ML_TABLE += [(f"Transformer-{{i}}-{ours}/{weight}",
                       f"newslm/layer{{i:02d}}/{original}/{weight}", None)
                      for weight in ("gamma", "beta")]


def release_names_hf_rule(original, steps):
    """For families transformers lacks: safetensors files keep the release's names, dotted."""
    return original.replace("/", "."), steps


def _t5_table(gated):
    """T5 in the Mesh TensorFlow release names. Its kernels are [in, out] like ours; its relative
    attention biases are [heads, buckets]."""
    table = [
        ("Embedding-Token/embeddings", "shared/embedding", None),
        ("Encoder-Output-Norm/gamma", "encoder/final_layer_norm/scale", None),
        ("Decoder-Output-Norm/gamma", "decoder/final_layer_norm/scale", None),
    ]
    for stack in ("Encoder", "Decoder"):
        table.append((f"{stack}-Embedding-Relative-Position/embeddings",
                      f"{stack.lower()}/block_000/layer_000/SelfAttention/relative_attention_bias",
                      TRANSPOSE))
    sublayers = {
        "Encoder": [("MultiHeadSelfAttention", "SelfAttention"), ("FeedForward", "DenseReluDense")],
        "Decoder": [("MultiHeadSelfAttention", "SelfAttention"),
                    ("MultiHeadCrossAttention", "EncDecAttention"),
                    ("FeedForward", "DenseReluDense")],
    }
    inputs = ["wi_0", "wi_1"] if gated else ["wi"]
    for stack, parts in sublayers.items():
        for number, (ours, original) in enumerate(parts):
            block = f"{stack}-Transformer-{{i}}-{ours}"
            scope = f"{stack.lower()}/block_{{i:03d}}/layer_{number:03d}"
            table.append((f"{block}-Norm/gamma", f"{scope}/layer_norm/scale", None))
            if ours == "FeedForward":
                for k, name in enumerate(inputs):
                    table.append((f"{block}/i{k}_dense/kernel", f"{scope}/{original}/{name}/kernel",
                                  None))
                table.append((f"{block}/o_dense/kernel", f"{scope}/{original}/wo/kernel", None))
            else:
                for dense, name in zip(["q_dense", "k_dense", "v_dense", "o_dense"], "qkvo"):
                    table.append((f"{block}/{dense}/kernel", f"{scope}/{original}/{name}", None))
    if gated:
        table.append(("Decoder-Output-LM/kernel", "decoder/logits/kernel", None))
    return table


def t5_hf_name(original, steps):
    """Mesh TensorFlow T5 names -> Hugging Face T5ForConditionalGeneration names."""
    if original == "decoder/logits/kernel":
        return "lm_head.weight", TRANSPOSE
    name = re.sub(r"block_(\{i:03d\}|\d+)",
                  lambda m: "block." + ("{i}" if m.group(1)[0] == "{" else str(int(m.group(1)))),
                  original)
    name = re.sub(r"layer_0*(\d)", r"layer.\1", name)
    name = name.replace("shared/embedding", "shared/weight")
    if name.endswith("relative_attention_bias"):
        return name.replace("/", ".") + ".weight", None
    if re.search(r"/(scale|kernel|[qkvo])$", name):
        transposed = not name.endswith("scale")
        name = re.sub(r"/(scale|kernel)$", "", name) + "/weight"
        steps = TRANSPOSE if transposed else steps
    return name.replace("/", "."), steps


T5_TABLE = _t5_table(gated=False)
T5_1_1_TABLE = _t5_table(gated=True)


class Family:
    """A family's table, its rule from original names to Hugging Face names, and the HF prefix of
    its base model (files of the bare model omit it) and of its heads (which never carry it)."""

    def __init__(self, table, hf_rule, hf_prefix, hf_heads=(), hf_ignored=None,
                 google_ignored=None):
        self.table, self.hf_rule, self.hf_prefix, self.hf_heads = table, hf_rule, hf_prefix, hf_heads
        # Buffers and tied copies that HF files carry beside the parameters.
        self.hf_ignored = re.compile(hf_ignored or r"position_ids$")
        # Variables of the release that belong to another model stored beside this one (ELECTRA
        # keeps its generator and discriminator in one checkpoint).
        self.google_ignored = re.compile(google_ignored) if google_ignored else None


FAMILIES = {
    "bert": Family(BERT_TABLE, bert_hf_name, "bert.", hf_heads=("cls.",),
                   hf_ignored=r"(position_ids$|cls\.predictions\.decoder\.(weight|bias)$)"),
    "t5": Family(T5_TABLE, t5_hf_name, "", hf_heads=("lm_head.",),
                 hf_ignored=r"(embed_tokens\.weight$|^lm_head\.weight$)"),
    "t5.1.1": Family(T5_1_1_TABLE, t5_hf_name, "", hf_heads=("lm_head.",),
                     hf_ignored=r"embed_tokens\.weight$"),
    "gpt": Family(GPT_TABLE, gpt_hf_name, "transformer.", hf_heads=("lm_head.",),
                  hf_ignored=r"(\.attn\.bias$|^lm_head\.weight$|position_ids$)"),
    "gpt2": Family(GPT2_TABLE, gpt2_hf_name, "transformer.", hf_heads=("lm_head.",),
                   hf_ignored=r"(\.attn\.(bias|masked_bias)$|^lm_head\.weight$)"),
    "gpt2_ml": Family(GPT2_ML_TABLE, release_names_hf_rule, "newslm."),
}

# ---------------------------------------------------------------------------------------------------
# Encoder families beside BERT. Each table is BERT's with its own names; each Hugging Face rule is
# a few renames of original names before BERT's conventions (layer_N -> layer.N, kernel -> weight
# transposed, gamma/beta -> weight/bias, / -> .).
# ---------------------------------------------------------------------------------------------------


def renamed_hf_rule(renames=(), special=None):
    """A Hugging Face rule: `special` original names map to the given HF names (steps kept);
    the others go through the regex `renames`, then through bert_hf_name."""
    special = special or {}

    def rule(original, steps):
        if original in special:
            return special[original], steps
        name = original
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        return bert_hf_name(name, steps)

    return rule


def _rows(prefix, google, steps=None, weights=("kernel", "bias")):
    return [(f"{prefix}/{w}", f"{google}/{w}", steps) for w in weights]


# Factorised embeddings (embedding_size != hidden_size) are projected by this layer in Google's
# ALBERT, and bert4keras reads it under the same name for every BERT-like family.
EMBEDDING_MAPPING = _rows("Embedding-Mapping", "bert/encoder/embedding_hidden_mapping_in")

_BLOCK_LAYERS = [  # (our layer suffix, Google BERT scope, weights)
    ("MultiHeadSelfAttention/q_dense", "attention/self/query", ("kernel", "bias")),
    ("MultiHeadSelfAttention/k_dense", "attention/self/key", ("kernel", "bias")),
    ("MultiHeadSelfAttention/v_dense", "attention/self/value", ("kernel", "bias")),
    ("MultiHeadSelfAttention/o_dense", "attention/output/dense", ("kernel", "bias")),
    ("MultiHeadSelfAttention-Norm", "attention/output/LayerNorm", ("gamma", "beta")),
    ("FeedForward/i0_dense", "intermediate/dense", ("kernel", "bias")),
    ("FeedForward/o_dense", "output/dense", ("kernel", "bias")),
    ("FeedForward-Norm", "output/LayerNorm", ("gamma", "beta")),
]


def _without(table, *ours_prefixes):
    return [row for row in table if not row[0].startswith(ours_prefixes)]


# -- RoBERTa: Google BERT's layout (bert4keras reads RoBERTa converted to it); Hugging Face names
# the base model 'roberta.' and the MLM head 'lm_head.'.
ROBERTA_TABLE = BERT_TABLE + EMBEDDING_MAPPING
roberta_hf_name = renamed_hf_rule(
    renames=[(r"^bert/", "roberta/"),
             (r"^cls/predictions/transform/dense/", "lm_head/dense/"),
             (r"^cls/predictions/transform/LayerNorm/", "lm_head/layer_norm/")],
    special={"cls/predictions/output_bias": "lm_head.bias"},
)

# -- ALBERT: one block shared by every layer, under group_0/inner_group_0 (num_hidden_groups and
# inner_group_num 1, as in every release). 'albert_unshared' reads the same variables into
# separate per-layer blocks (Transformer-{i}-...), so they can be fine-tuned apart.
ALBERT_BLOCK = "bert/encoder/transformer/group_0/inner_group_0/"
_ALBERT_SCOPES = {
    "attention/self/query": "attention_1/self/query",
    "attention/self/key": "attention_1/self/key",
    "attention/self/value": "attention_1/self/value",
    "attention/output/dense": "attention_1/output/dense",
    "attention/output/LayerNorm": "LayerNorm",
    "intermediate/dense": "ffn_1/intermediate/dense",
    "output/dense": "ffn_1/intermediate/output/dense",
    "output/LayerNorm": "LayerNorm_1",
}


def _albert_table(block):
    table = _without(BERT_TABLE, "Transformer-") + EMBEDDING_MAPPING
    for ours, scope, weights in _BLOCK_LAYERS:
        table += _rows(f"{block}-{ours}", ALBERT_BLOCK + _ALBERT_SCOPES[scope], weights=weights)
    return table


ALBERT_TABLE = _albert_table("Transformer")
ALBERT_UNSHARED_TABLE = _albert_table("Transformer-{i}")
_HF_ALBERT_BLOCK = "albert/encoder/albert_layer_groups/0/albert_layers/0/"
albert_hf_name = renamed_hf_rule(
    renames=[(ALBERT_BLOCK + "attention_1/self/", _HF_ALBERT_BLOCK + "attention/"),
             (ALBERT_BLOCK + "attention_1/output/dense/", _HF_ALBERT_BLOCK + "attention/dense/"),
             (ALBERT_BLOCK + "LayerNorm/", _HF_ALBERT_BLOCK + "attention/LayerNorm/"),
             (ALBERT_BLOCK + "ffn_1/intermediate/dense/", _HF_ALBERT_BLOCK + "ffn/"),
             (ALBERT_BLOCK + "ffn_1/intermediate/output/dense/", _HF_ALBERT_BLOCK + "ffn_output/"),
             (ALBERT_BLOCK + "LayerNorm_1/", _HF_ALBERT_BLOCK + "full_layer_layer_norm/"),
             (r"^bert/pooler/dense/", "albert/pooler/"),
             (r"^bert/", "albert/"),
             (r"^cls/predictions/transform/", "predictions/")],
    special={"cls/predictions/output_bias": "predictions.bias",
             "cls/seq_relationship/output_weights": "sop_classifier.classifier.weight",
             "cls/seq_relationship/output_bias": "sop_classifier.classifier.bias"},
)

# -- NEZHA: BERT without absolute position embeddings (relative positions have no weights).
NEZHA_TABLE = _without(BERT_TABLE, "Embedding-Position") + EMBEDDING_MAPPING
nezha_hf_name = renamed_hf_rule(renames=[(r"^bert/", "nezha/")])

# -- RoFormer: BERT without absolute positions (rotary ones have no weights). Hugging Face names
# the base model 'roformer.' and the embedding projection 'embeddings_project'.
ROFORMER_TABLE = NEZHA_TABLE
roformer_hf_name = renamed_hf_rule(
    renames=[(r"^bert/encoder/embedding_hidden_mapping_in/", "roformer/embeddings_project/"),
             (r"^bert/", "roformer/")])

# -- RoFormer-v2: RoFormer with no biases, parameter-free norms and a bare MLM head (the tied
# embeddings, after `Output-Mapping` when embedding_size != hidden_size: the release names no
# variable for that projection; bert4k stores it as BERT's MLM transform).
ROFORMER_V2_TABLE = [
    row for row in _without(ROFORMER_TABLE, "Pooler-", "NSP-", "MLM-")
    if not re.search(r"/(bias|beta|gamma)$", row[1])
] + [("Output-Mapping/kernel", "cls/predictions/transform/dense/kernel", None)]

# -- ELECTRA: the discriminator under electra/ with its embedding projection and prediction head;
# the generator (smaller, MLM head) under generator/, sharing the discriminator's embeddings.
ELECTRA_TABLE = [
    (ours, "electra/" + google[len("bert/"):], steps)
    for ours, google, steps in _without(BERT_TABLE, "Pooler-") + EMBEDDING_MAPPING
    if google.startswith("bert/")
]
ELECTRA_TABLE = [
    (ours, google.replace("electra/encoder/embedding_hidden_mapping_in", "electra/embeddings_project"),
     steps) for ours, google, steps in ELECTRA_TABLE
] + _rows("Discriminator-Dense", "discriminator_predictions/dense") \
  + _rows("Discriminator-Prediction", "discriminator_predictions/dense_1")
ELECTRA_GENERATOR_TABLE = [
    (ours, re.sub(r"^electra/(encoder|embeddings_project)", r"generator/\1", google), steps)
    for ours, google, steps in ELECTRA_TABLE if not ours.startswith("Discriminator-")
] + _rows("MLM-Dense", "generator_predictions/dense") + [
    ("MLM-Norm/gamma", "generator_predictions/LayerNorm/gamma", None),
    ("MLM-Norm/beta", "generator_predictions/LayerNorm/beta", None),
    ("MLM-Bias/bias", "generator_predictions/output_bias", None),
]
electra_hf_name = renamed_hf_rule(
    renames=[(r"^discriminator_predictions/dense_1/", "discriminator_predictions/dense_prediction/")])
electra_generator_hf_name = renamed_hf_rule(
    renames=[(r"^generator/", "electra/")],
    special={"generator_predictions/output_bias": "generator_lm_head.bias"})

FAMILIES.update({
    "roberta": Family(ROBERTA_TABLE, roberta_hf_name, "roberta.", hf_heads=("lm_head.",),
                      hf_ignored=r"(position_ids$|^lm_head\.decoder\.(weight|bias)$)"),
    "albert": Family(ALBERT_TABLE, albert_hf_name, "albert.",
                     hf_heads=("predictions.", "sop_classifier."),
                     hf_ignored=r"(position_ids$|^predictions\.decoder\.(weight|bias)$)"),
    "albert_unshared": Family(ALBERT_UNSHARED_TABLE, albert_hf_name, "albert.",
                              hf_heads=("predictions.", "sop_classifier."),
                              hf_ignored=r"(position_ids$|^predictions\.decoder\.(weight|bias)$)"),
    "nezha": Family(NEZHA_TABLE, nezha_hf_name, "nezha.", hf_heads=("cls.",),
                    hf_ignored=r"(position_ids$|relative_positions|"
                               r"^cls\.predictions\.decoder\.(weight|bias)$)"),
    "roformer": Family(ROFORMER_TABLE, roformer_hf_name, "roformer.", hf_heads=("cls.",),
                       hf_ignored=r"(position_ids$|embed_positions\.weight$|"
                                  r"^cls\.predictions\.decoder\.(weight|bias)$)"),
    "roformer_v2": Family(ROFORMER_V2_TABLE, roformer_hf_name, "roformer.", hf_heads=("cls.",),
                          hf_ignored=r"(position_ids$|embed_positions\.weight$|"
                                     r"^cls\.predictions\.decoder\.weight$)"),
    "electra": Family(ELECTRA_TABLE, electra_hf_name, "electra.",
                      hf_heads=("discriminator_predictions.",),
                      google_ignored=r"^(generator|generator_predictions)/"),
    "electra_generator": Family(ELECTRA_GENERATOR_TABLE, electra_generator_hf_name, "electra.",
                                hf_heads=("generator_predictions.", "generator_lm_head."),
                                hf_ignored=r"(position_ids$|^generator_lm_head\.weight$)",
                                google_ignored=r"^(electra/(encoder|embeddings_project)|"
                                               r"discriminator_predictions)/"),
})

# Variables that belong to training, not to the model: optimizer slots, step counters, buffers.
IGNORED_GOOGLE = re.compile(r"(adam_[mv]|global_step|good_steps|bad_steps|loss_scale|Momentum)")


# ---------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------


class Reader:
    """Names and shapes of a checkpoint's variables, and their values on demand."""

    layout = None  # "google" or "huggingface"

    def __init__(self, path):
        self.path = path
        self.shapes = {}

    def read(self, name):
        raise NotImplementedError


def _tensorflow(purpose):
    """TensorFlow, needed (whatever the Keras backend) only for the Google checkpoint format; a
    clear message where it is not installed: JAX or PyTorch users may not have it."""
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError(
            f"{purpose} needs TensorFlow, which is not installed: pip install tensorflow-cpu (any "
            "Keras backend can then use it), or use a Hugging Face model.safetensors instead."
        ) from None
    return tf


class GoogleReader(Reader):
    layout = "google"

    def __init__(self, prefix):
        super().__init__(prefix)
        tf = _tensorflow(f"Reading the Google (TF) checkpoint {prefix!r}")

        self._errors = tf.errors.OpError
        try:
            self._reader = tf.train.load_checkpoint(prefix)
            self.shapes = {
                name: tuple(shape)
                for name, shape in self._reader.get_variable_to_shape_map().items()
            }
        except (self._errors, ValueError) as e:
            raise CheckpointError(f"Cannot read TF checkpoint {prefix!r}: {_message(e)}") from None

    def read(self, name):
        try:
            return self._reader.get_tensor(name)
        except Exception as e:  # OpError, or IndexError for a short data file
            raise CheckpointError(
                f"Cannot read variable {name!r} from TF checkpoint {self.path!r} "
                f"(truncated or corrupt data file?): {_message(e)}"
            ) from None


class SafetensorsReader(Reader):
    layout = "huggingface"

    def __init__(self, paths):
        super().__init__(paths[0] if len(paths) == 1 else os.path.dirname(paths[0]))
        from safetensors import safe_open

        self._files = {}
        for path in paths:
            try:
                handle = safe_open(path, framework="numpy")
                for name in handle.keys():
                    self.shapes[name] = tuple(handle.get_slice(name).get_shape())
                    self._files[name] = handle
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"Cannot read safetensors file {path!r}: {e}") from None

    def read(self, name):
        try:
            return self._files[name].get_tensor(name)
        except Exception as e:
            raise CheckpointError(
                f"Cannot read tensor {name!r} from {self.path!r} (truncated file?): {e}"
            ) from None


class TorchReader(Reader):
    layout = "huggingface"

    def __init__(self, paths):
        super().__init__(paths[0] if len(paths) == 1 else os.path.dirname(paths[0]))
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{paths[0]!r} is a PyTorch pickle. bert4k never unpickles weight files without "
                "torch's safe loader: install torch (pip install torch==2.13.0 for the CPU build) or "
                "convert it to safetensors with: python -c \"import torch, safetensors.torch as s; "
                f"s.save_file(torch.load({paths[0]!r}, weights_only=True), 'model.safetensors')\""
            ) from None
        self._tensors = {}
        for path in paths:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"Cannot read PyTorch weights {path!r}: {e}") from None
            self._tensors.update({k: v.float().numpy() if v.is_floating_point() else v.numpy()
                                  for k, v in state.items()})
        self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

    def read(self, name):
        return self._tensors[name]


def open_checkpoint(path):
    """A Reader for a Google checkpoint prefix, a HF directory, a .safetensors or .bin file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _open_directory(path)
    if path.endswith(".safetensors"):
        _require_file(path)
        return SafetensorsReader([path])
    if path.endswith((".bin", ".pt", ".pth")):
        _require_file(path)
        return TorchReader([path])
    if path.endswith(".index"):
        path = path[: -len(".index")]
    if os.path.exists(path + ".index"):
        return GoogleReader(path)
    raise FileNotFoundError(
        f"No checkpoint at {path!r}: expected a Google checkpoint prefix (with {path}.index and "
        "data files beside it), a .safetensors file, or a Hugging Face model directory."
    )


def _open_directory(path):
    for index, reader in (("model.safetensors.index.json", SafetensorsReader),
                          ("pytorch_model.bin.index.json", TorchReader)):
        shards = _shards(os.path.join(path, index))
        if shards:
            return reader(shards)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, name)):
            return open_checkpoint(os.path.join(path, name))
    prefix = _google_prefix(path)
    if prefix:
        return GoogleReader(prefix)
    raise FileNotFoundError(
        f"No weights in directory {path!r}: looked for model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin(.index.json) and *.ckpt.index."
    )


def _shards(index):
    """The files a Hugging Face shard index (*.index.json) names, or None where there is none."""
    if not os.path.exists(index):
        return None
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"Cannot read the shard index {index!r}: {e!r}") from None
    shards = [os.path.join(os.path.dirname(index), s) for s in sorted(set(weight_map.values()))]
    for shard in shards:
        _require_file(shard)
    return shards


def _google_prefix(directory):
    """The checkpoint prefix a directory of Google checkpoints means: the one its `checkpoint`
    state file names (as TensorFlow's own tools read it), else the only one, else the highest
    step of one run (model.ckpt-200, model.ckpt-1000: by number, not by name)."""
    prefixes = sorted(f[: -len(".index")] for f in os.listdir(directory) if f.endswith(".index"))
    if not prefixes:
        return None
    latest = _state_file_prefix(directory)
    if latest in prefixes:
        return os.path.join(directory, latest)
    steps = [re.fullmatch(r"(.*)-(\d+)", p) for p in prefixes]
    if len(prefixes) > 1 and all(steps) and len({m.group(1) for m in steps}) == 1:
        return os.path.join(directory, max(steps, key=lambda m: int(m.group(2))).group(0))
    if len(prefixes) > 1:
        raise CheckpointError(
            f"Directory {directory!r} holds several checkpoints ({', '.join(prefixes)}) and no "
            "`checkpoint` file naming the latest: pass the prefix of the one to load."
        )
    return os.path.join(directory, prefixes[0])


def _state_file_prefix(directory):
    """The basename of model_checkpoint_path in a TF `checkpoint` state file, if any."""
    try:
        with open(os.path.join(directory, "checkpoint"), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(r'^model_checkpoint_path:\s*"([^"]*)"', text, re.MULTILINE)
    return os.path.basename(match.group(1)) if match else None


def _require_file(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path!r}.")


def _message(error):
    return getattr(error, "message", None) or str(error)


# ---------------------------------------------------------------------------------------------------
# Name mapping
# ---------------------------------------------------------------------------------------------------


class Mapping:
    """One family's table, compiled for one layout, in both directions."""

    def __init__(self, family, layout):
        if family not in FAMILIES:
            raise ValueError(f"No checkpoint table for family {family!r}; known: {sorted(FAMILIES)}.")
        spec = FAMILIES[family]
        self.rows = []
        for ours, original, steps in spec.table:
            name = original
            if layout == "huggingface":
                name, steps = spec.hf_rule(original, steps)
            self.rows.append((_pattern(ours), _pattern(name), ours, name, steps))
        self.separator = "." if layout == "huggingface" else "/"
        self.scopes = [_pattern(self._scope(row[3])) for row in self.rows]

    def _scope(self, name):
        return self.separator.join(name.split(self.separator)[:2])

    def in_scope(self, checkpoint_name):
        """Whether a name lies where the family's own variables do (`bert/encoder`,
        `cls/predictions`, ...), as opposed to a task head fine-tuning added beside them
        (`output_weights`, `classifier.weight`, `cls/squad/...`)."""
        scope = self._scope(checkpoint_name)
        return any(pattern.fullmatch(scope) for pattern in self.scopes)

    def checkpoint_name(self, weight_path):
        """(checkpoint name, transform) for one of our weight paths, or None if undeclared."""
        for ours_re, _, _, name, transform in self.rows:
            match = ours_re.fullmatch(weight_path)
            if match:
                return _fill(name, match.groupdict().get("i")), transform
        return None

    def weight_path(self, checkpoint_name):
        """(our weight path, the same weight's path in block 0 or None if not per-block) for a
        checkpoint name, or None. A name without a block index that feeds every block (ALBERT
        read unshared) gives block 0's."""
        for _, name_re, ours, name, _ in self.rows:
            match = name_re.fullmatch(checkpoint_name)
            if match:
                first_block = _fill(ours, "0") if INDEX.search(ours) else None
                return _fill(ours, match.groupdict().get("i") or "0"), first_block
        return None


# Weights bert4k adds to a family's layers (Conditional LayerNorm's condition projections) have no
# name in any release: they are written as "bert4k/<weight path>" and read back from there; a
# checkpoint without them leaves their initial values (zeros: the plain LayerNorm).
EXTENSION_WEIGHTS = re.compile(r"-Norm/(gamma|beta|hidden)_dense/kernel$")
EXTENSION_PREFIX = "bert4k/"


# The block index in a template: {i}, or with a format such as {i:03d} (T5's block_007).
INDEX = re.compile(r"\{i(?::([^}]*))?\}")


def _pattern(template):
    regex, last = "", 0
    for match in INDEX.finditer(template):
        regex += re.escape(template[last:match.start()]) + r"(?P<i>\d+)"
        last = match.end()
    return re.compile(regex + re.escape(template[last:]))


def _fill(template, index):
    """The template with block `index` (digits, or None for none) in its placeholder."""
    return INDEX.sub(lambda m: "" if index is None else format(int(index), m.group(1) or ""),
                     template)


def _normalize_hf_names(shapes, spec):
    """Map canonical HF names (with the base-model prefix, LayerNorm weight/bias) to the
    checkpoint's own spelling, so 'bert.'-less files and old gamma/beta files both read."""
    prefixed = any(n.startswith(spec.hf_prefix) for n in shapes)
    canonical = {}
    for name in shapes:
        full = name
        if not prefixed and not name.startswith(tuple(spec.hf_heads) + (EXTENSION_PREFIX,)):
            full = spec.hf_prefix + name
        full = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", full)
        full = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", full)
        canonical[full] = name
    return canonical


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def load_weights(model, checkpoint_path, family="bert", prefix="", ignore_invalid_weights=False,
                 adapt=None):
    """Assign every model weight from the checkpoint, by name; report all problems at once.
    Returns the checkpoint's variables left unread (optimizer slots and the like aside): those of
    heads the model was built without, and task heads of a fine-tuned checkpoint (Google's
    `output_weights`, transformers' `classifier.*`), which bert4k has no table for.

    `adapt` maps some of our weight paths to steps applied after the table's (e.g. a Vocabulary
    for keep_tokens).
    """
    reader = open_checkpoint(checkpoint_path)
    mapping = Mapping(family, reader.layout)
    if reader.layout == "huggingface":
        names = _normalize_hf_names(reader.shapes, FAMILIES[family])
        ignored = FAMILIES[family].hf_ignored
    else:
        names = {n: n for n in reader.shapes}
        ignored = IGNORED_GOOGLE
        if FAMILIES[family].google_ignored is not None:
            other = FAMILIES[family].google_ignored.pattern
            ignored = re.compile(f"{IGNORED_GOOGLE.pattern}|{other}")
    weights = {_strip(w.path, prefix): w for w in model.weights}

    assignments, missing, mismatched, unexpected, unread = [], [], [], [], []
    for path, variable in weights.items():
        found = mapping.checkpoint_name(path)
        if found is None and EXTENSION_WEIGHTS.search(path):
            if EXTENSION_PREFIX + path not in names:
                continue  # keeps its initial value
            found = (EXTENSION_PREFIX + path, None)
        if found is None:
            missing.append(f"  {path} {tuple(variable.shape)}: not in the {family!r} mapping table")
            continue
        name, transform = found
        transform = tuple(transform or ()) + tuple((adapt or {}).get(path, ()))
        if name not in names:
            missing.append(f"  {name} (for {path}, shape {tuple(variable.shape)})")
            continue
        stored = reader.shapes[names[name]]
        expected = tuple(variable.shape)
        if model_shape(stored, transform) != expected:
            mismatched.append(
                f"  {name}: checkpoint shape {stored} gives {model_shape(stored, transform)}, "
                f"model {path} needs {expected}"
            )
            continue
        assignments.append((variable, names[name], transform))

    for canonical, stored_name in sorted(names.items()):
        if ignored.search(canonical):
            continue
        found = mapping.weight_path(canonical)
        extension = canonical.startswith(EXTENSION_PREFIX)
        if extension:
            found = (canonical[len(EXTENSION_PREFIX):], None)
        if found is None or found[0] not in weights:
            unread.append(stored_name)
            # Heads and stacks the model was built without (T5's decoder for its encoder) and
            # task heads outside the family's scopes stay unread without complaint; an undeclared
            # name among the family's own, a block beyond the model's depth, or a bert4k
            # extension the model lacks means the checkpoint is not this model.
            undeclared = found is None and mapping.in_scope(canonical)
            extra_block = found is not None and found[1] in weights
            if undeclared or extra_block or extension:
                unexpected.append(f"  {stored_name} {reader.shapes[stored_name]}")

    problems = _report(reader, family, missing, unexpected, mismatched, bool(assignments))
    if problems and not ignore_invalid_weights:
        raise CheckpointError(problems)
    if problems:
        warnings.warn(problems + "\nThose weights keep their initial values.", stacklevel=2)
    # Read everything before assigning anything: a corrupt file leaves the model untouched.
    values = [to_model(reader.read(name), transform) for _, name, transform in assignments]
    for (variable, _, _), value in zip(assignments, values):
        variable.assign(np.asarray(value, dtype=variable.dtype))
    return unread


def _strip(path, prefix):
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


def _report(reader, family, missing, unexpected, mismatched, anything_matched):
    if not (missing or unexpected or mismatched):
        return ""
    lines = [f"Checkpoint {reader.path!r} ({reader.layout} layout) does not fit this {family!r} model:"]
    for title, items in [
        ("missing from the checkpoint", missing),
        ("in the checkpoint but not in the model", unexpected),
        ("shape mismatch", mismatched),
    ]:
        if items:
            lines.append(f"{len(items)} {title}:")
            lines.extend(items)
    if not anything_matched:
        sample = ", ".join(sorted(reader.shapes)[:5])
        lines.append(
            f"No variable matched: this looks like a checkpoint of another family or layout "
            f"(its variables start with: {sample})."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Weights of a whole model saved by Keras 2 (bert4keras's scripts)
# ---------------------------------------------------------------------------------------------------


def load_bert4keras_weights(model, path):
    """Assign every weight of a Keras `model` from the weights a Keras 2 model saved with
    `model.save_weights('best_model.weights')`, as bert4keras's scripts do: TensorFlow's object
    checkpoint under tf.keras 2 (best_model.weights.index and .data-*), HDF5 under Keras 2.3 or
    with an .h5 name. Build the same model in bert4k (the same layer names, your own layers
    included) and pass it here: weights are matched by layer name and their name in the layer;
    every missing, unexpected or mis-shaped weight is reported at once, and nothing is assigned
    unless all of them fit.

    (Keras 3's own `load_weights` reads such HDF5 files by layer order, which puts weights in
    the wrong layers of a bert4k model without a word.)"""
    path = os.fspath(path)
    weights = {w.path: w for w in model.weights}
    if os.path.isfile(path) and _is_hdf5(path):
        stored, read = _keras2_hdf5_variables(path, weights)
    else:
        stored, read = _keras2_checkpoint_variables(path)
    missing = [f"  {p} {tuple(w.shape)}" for p, w in weights.items() if p not in stored]
    unexpected = [f"  {p} ({where})" for p, (where, _) in stored.items() if p not in weights]
    mismatched = [f"  {p}: saved {shape}, model {tuple(weights[p].shape)}"
                  for p, (_, shape) in stored.items()
                  if p in weights and shape != tuple(weights[p].shape)]
    if missing or unexpected or mismatched:
        lines = [f"Keras 2 weights {path!r} do not fit this model:"]
        for title, items in [("missing from the file", missing),
                             ("in the file but not in the model", unexpected),
                             ("shape mismatch", mismatched)]:
            if items:
                lines += [f"{len(items)} {title}:"] + items
        raise CheckpointError("\n".join(lines))
    values = read([where for where, _ in stored.values()])  # all read, then assigned
    for p, value in zip(stored, values):
        weights[p].assign(np.asarray(value, dtype=weights[p].dtype))


def _is_hdf5(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


# tf.keras keys a layer's variable by the layer's place among the model's layers with weights,
# then the attribute path inside the layer: layer_with_weights-8/q_dense/kernel/.ATTRIBUTES/...
KERAS2_KEY = re.compile(r"layer(?:_with_weights)?-\d+/(.+)/\.ATTRIBUTES/VARIABLE_VALUE")


def _keras2_checkpoint_variables(path):
    """({our weight path: (checkpoint key, shape)}, read(keys)) for a tf.keras object checkpoint:
    the layer's name (first part of the variable's name) and the attribute path in the key."""
    tf = _tensorflow(f"Reading the tf.keras weights {path!r}")
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    try:
        reader = tf.train.load_checkpoint(path)
    except (tf.errors.OpError, ValueError) as e:
        raise CheckpointError(f"Cannot read Keras 2 weights {path!r}: {_message(e)}") from None
    if not reader.has_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"):
        raise CheckpointError(f"{path!r} holds no layer weights of a Keras model (a Google "
                              "checkpoint? build_transformer_model(checkpoint_path=...) reads those).")
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    shapes = reader.get_variable_to_shape_map()
    stored = {}
    for node in graph.nodes:
        for attribute in node.attributes:
            match = KERAS2_KEY.fullmatch(attribute.checkpoint_key)
            if match and attribute.full_name:
                layer = attribute.full_name.split("/")[0]
                key = attribute.checkpoint_key
                stored[f"{layer}/{match.group(1)}"] = (key, tuple(shapes[key]))
    return stored, lambda keys: [reader.get_tensor(key) for key in keys]


def _keras2_hdf5_variables(path, weights):
    """({our weight path: (dataset, shape)}, read(datasets)) for Keras 2's HDF5 weights: a group
    per layer name. Inside a layer, sublayers carry the names Keras gave them (dense, dense_1,
    ...); they are taken in their order, which is the order in which the layer builds its
    sublayers, as ours (q, k, v, o; i0, o), and each variable by its own name (kernel, bias)."""
    import h5py

    stored = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise CheckpointError(
                f"{path!r} is an HDF5 file without layer names: not Keras 2 weights (Keras 3's "
                ".weights.h5 layout, which only Keras's model.load_weights reads, by layer order).")
        for layer in map(_text, root.attrs["layer_names"]):
            group = root[layer]
            names = [_text(n) for n in group.attrs["weight_names"]]
            ours = _sublayers(weights, layer)
            theirs = list(dict.fromkeys(n.split("/")[-2] for n in names if n.count("/") > 1))
            renamed = dict(zip(theirs, ours))
            for name in names:
                parts = name.removesuffix(":0").split("/")
                if len(parts) > 2:  # layer/sublayer/variable
                    parts[-2] = renamed.get(parts[-2], parts[-2])
                inner = "/".join(parts[-2:] if len(parts) > 2 else parts[-1:])
                stored[f"{layer}/{inner}"] = (f"{layer}/{name}", tuple(group[name].shape))

    def read(wheres):
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            return [root[where][()] for where in wheres]

    return stored, read


def _sublayers(weights, layer):
    """The names of `layer`'s sublayers in the order of its weights (q_dense, k_dense, ...)."""
    found = (p.split("/") for p in weights if p.startswith(layer + "/"))
    return list(dict.fromkeys(parts[1] for parts in found if len(parts) > 2))


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def checkpoint_variables(model, family="bert", layout="google", prefix=""):
    """{checkpoint name: numpy value} for every weight of the model, in the given layout."""
    mapping = Mapping(family, layout)
    parts = {}  # checkpoint name -> (steps, {split part: value})
    for weight in model.weights:
        path = _strip(weight.path, prefix)
        found = mapping.checkpoint_name(path)
        if found is None and EXTENSION_WEIGHTS.search(path):
            found = (EXTENSION_PREFIX + path, None)
        if found is None:
            raise CheckpointError(
                f"Weight {path!r} has no name in the {family!r} checkpoint table; "
                "only the family's own layers can be written."
            )
        name, steps = found
        part = steps[-1].part if steps and isinstance(steps[-1], Split) else 0
        value = np.asarray(weight.numpy())
        if value.dtype.name in ("bfloat16", "float16"):  # a model built to predict in half
            value = value.astype(np.float32)  # precision: its files are read as any BERT's
        stored = parts.setdefault(name, (steps, {}))[1]
        if part in stored and not np.array_equal(stored[part], value):
            # Several weights read from one variable (ALBERT read unshared) and have diverged.
            raise CheckpointError(
                f"Weight {path!r} and another weight both map to {name!r} in the {family!r} "
                "layout but hold different values; this layout cannot store them apart."
            )
        stored[part] = value
    return {
        name: np.ascontiguousarray(to_checkpoint([values[k] for k in sorted(values)], steps))
        for name, (steps, values) in parts.items()
    }


def _atomic_files(final_paths, write):
    """Run write(temp_dir) that creates files named like final_paths' basenames, then move them
    into place only if it succeeded: an interrupted save leaves no half-written checkpoint."""
    directory = os.path.dirname(os.path.abspath(final_paths[0]))
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".bert4k-save-") as tmp:
        write(tmp)
        for final in final_paths:  # data before index: a reader never sees an index alone
            os.replace(os.path.join(tmp, os.path.basename(final)), final)


def save_weights_as_checkpoint(model, checkpoint_prefix, family="bert", prefix=""):
    """Write a Google-format TF checkpoint (bert_model.ckpt.index / .data-00000-of-00001) with
    Google's variable names, readable by tf.train.load_checkpoint and TF1 Savers alike."""
    tf = _tensorflow("Writing a Google (TF) checkpoint")

    model, family, prefix = _unwrap(model, family, prefix)
    variables = checkpoint_variables(model, family, "google", prefix)
    checkpoint_prefix = os.fspath(checkpoint_prefix)
    base = os.path.basename(checkpoint_prefix)

    def write(tmp):
        names = sorted(variables)
        tf.raw_ops.SaveV2(
            prefix=os.path.join(tmp, base),
            tensor_names=names,
            shape_and_slices=[""] * len(names),
            tensors=[tf.constant(variables[n]) for n in names],
        )

    _atomic_files([checkpoint_prefix + ".data-00000-of-00001", checkpoint_prefix + ".index"], write)


def save_weights_as_safetensors(model, path, family="bert", prefix=""):
    """Write model.safetensors with Hugging Face names (BertForPreTraining layout, 'bert.' prefix),
    which transformers' BertModel.from_pretrained reads."""
    from safetensors.numpy import save_file

    model, family, prefix = _unwrap(model, family, prefix)
    variables = checkpoint_variables(model, family, "huggingface", prefix)
    path = os.fspath(path)
    _atomic_files([path], lambda tmp: save_file(variables, os.path.join(tmp, os.path.basename(path)),
                                                metadata={"format": "pt"}))


def _unwrap(model, family, prefix):
    """Accept a Transformer builder (which knows its family and prefix, and whose `weights` are
    its own layers', not those of a user's layers around them) or a Keras model."""
    if hasattr(model, "family") and hasattr(model, "model"):
        return model, model.family, model.prefix
    return model, family, prefix
