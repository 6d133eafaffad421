"""Encoder families beside BERT (RoBERTa, ALBERT, NEZHA, ELECTRA, RoFormer, RoFormer-v2) and the
builder options (keep_tokens, compound_tokens, hierarchical_position, residual_attention_scores,
layer_norm_cond, prefix, sequence_length, a user's Transformer subclass).

Families transformers has: tiny random models that transformers created, saved and ran
(scripts/make_zoo_reference.py, fixtures in tests/fixtures/zoo/) load from their safetensors, and
from a checkpoint in the original release's names that this file writes from them with its own
name mapping (written out below, independently of bert4k's tables). Families transformers lacks
(NEZHA, RoFormer-v2) and RealFormer: a random checkpoint in the original names against a NumPy
implementation of the published equations, also written below.
"""

import pathlib
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from safetensors.numpy import load_file

from bert4k import configs
from bert4k.checkpoints import CheckpointError, save_weights_as_checkpoint, \
    save_weights_as_safetensors
from bert4k.models import BERT, build_transformer_model
from conftest import gelu, layer_norm, softmax, write_tf_checkpoint

ZOO = pathlib.Path(__file__).resolve().parent / "fixtures" / "zoo"
TOLERANCE = 1e-4

# ---------------------------------------------------------------------------------------------------
# Hugging Face names -> original release names, per family: (HF prefix regex, original prefix,
# {rest of the HF name: (rest of the original name, stored transposed)})
# ---------------------------------------------------------------------------------------------------

LINEAR = {"weight": ("kernel", True), "bias": ("bias", False)}
NORM = {"weight": ("gamma", False), "bias": ("beta", False)}
EMBEDDINGS = {
    "word_embeddings.weight": ("word_embeddings", False),
    "position_embeddings.weight": ("position_embeddings", False),
    "token_type_embeddings.weight": ("token_type_embeddings", False),
    "LayerNorm.weight": ("LayerNorm/gamma", False),
    "LayerNorm.bias": ("LayerNorm/beta", False),
}
BERT_LAYER = {}  # google-research/bert modeling.py scopes of one layer
for hf, google in [("attention.self.query", "attention/self/query"),
                   ("attention.self.key", "attention/self/key"),
                   ("attention.self.value", "attention/self/value"),
                   ("attention.output.dense", "attention/output/dense"),
                   ("intermediate.dense", "intermediate/dense"),
                   ("output.dense", "output/dense")]:
    BERT_LAYER.update({f"{hf}.{k}": (f"{google}/{v}", t) for k, (v, t) in LINEAR.items()})
for hf, google in [("attention.output.LayerNorm", "attention/output/LayerNorm"),
                   ("output.LayerNorm", "output/LayerNorm")]:
    BERT_LAYER.update({f"{hf}.{k}": (f"{google}/{v}", t) for k, (v, t) in NORM.items()})
ALBERT_LAYER = {}  # google-research/albert modeling.py scopes of the shared layer
for hf, google in [("attention.query", "attention_1/self/query"),
                   ("attention.key", "attention_1/self/key"),
                   ("attention.value", "attention_1/self/value"),
                   ("attention.dense", "attention_1/output/dense"),
                   ("ffn", "ffn_1/intermediate/dense"),
                   ("ffn_output", "ffn_1/intermediate/output/dense")]:
    ALBERT_LAYER.update({f"{hf}.{k}": (f"{google}/{v}", t) for k, (v, t) in LINEAR.items()})
for hf, google in [("attention.LayerNorm", "LayerNorm"), ("full_layer_layer_norm", "LayerNorm_1")]:
    ALBERT_LAYER.update({f"{hf}.{k}": (f"{google}/{v}", t) for k, (v, t) in NORM.items()})

MLM_BERT = [(r"cls\.predictions\.transform\.dense\.", "cls/predictions/transform/dense/", LINEAR),
            (r"cls\.predictions\.transform\.LayerNorm\.", "cls/predictions/transform/LayerNorm/",
             NORM),
            (r"cls\.predictions\.", "cls/predictions/", {"bias": ("output_bias", False)})]

HF_TO_ORIGINAL = {
    "roberta": [
        (r"roberta\.embeddings\.", "bert/embeddings/", EMBEDDINGS),
        (r"roberta\.encoder\.layer\.(\d+)\.", r"bert/encoder/layer_\1/", BERT_LAYER),
        (r"lm_head\.dense\.", "cls/predictions/transform/dense/", LINEAR),
        (r"lm_head\.layer_norm\.", "cls/predictions/transform/LayerNorm/", NORM),
        (r"lm_head\.", "cls/predictions/", {"bias": ("output_bias", False)}),
    ],
    "albert": [
        (r"albert\.embeddings\.", "bert/embeddings/", EMBEDDINGS),
        (r"albert\.encoder\.embedding_hidden_mapping_in\.",
         "bert/encoder/embedding_hidden_mapping_in/", LINEAR),
        (r"albert\.encoder\.albert_layer_groups\.0\.albert_layers\.0\.",
         "bert/encoder/transformer/group_0/inner_group_0/", ALBERT_LAYER),
        (r"albert\.pooler\.", "bert/pooler/dense/", LINEAR),
        (r"predictions\.dense\.", "cls/predictions/transform/dense/", LINEAR),
        (r"predictions\.LayerNorm\.", "cls/predictions/transform/LayerNorm/", NORM),
        (r"predictions\.", "cls/predictions/", {"bias": ("output_bias", False)}),
        # Google keeps the SOP/NSP matrix as [2, hidden], as torch does.
        (r"sop_classifier\.classifier\.", "cls/seq_relationship/",
         {"weight": ("output_weights", False), "bias": ("output_bias", False)}),
    ],
    "electra": [  # google-research/electra: the discriminator under electra/
        (r"electra\.embeddings\.", "electra/embeddings/", EMBEDDINGS),
        (r"electra\.embeddings_project\.", "electra/embeddings_project/", LINEAR),
        (r"electra\.encoder\.layer\.(\d+)\.", r"electra/encoder/layer_\1/", BERT_LAYER),
        (r"discriminator_predictions\.dense\.", "discriminator_predictions/dense/", LINEAR),
        (r"discriminator_predictions\.dense_prediction\.", "discriminator_predictions/dense_1/",
         LINEAR),
    ],
    "electra_generator": [  # the generator under generator/, sharing electra/embeddings
        (r"electra\.embeddings\.", "electra/embeddings/", EMBEDDINGS),
        (r"electra\.embeddings_project\.", "generator/embeddings_project/", LINEAR),
        (r"electra\.encoder\.layer\.(\d+)\.", r"generator/encoder/layer_\1/", BERT_LAYER),
        (r"generator_predictions\.dense\.", "generator_predictions/dense/", LINEAR),
        (r"generator_predictions\.LayerNorm\.", "generator_predictions/LayerNorm/", NORM),
        (r"generator_lm_head\.", "generator_predictions/", {"bias": ("output_bias", False)}),
    ],
    "roformer": [  # ZhuiyiTechnology/roformer: bert4keras, BERT's names, no position table
        (r"roformer\.embeddings\.", "bert/embeddings/", EMBEDDINGS),
        (r"roformer\.embeddings_project\.", "bert/encoder/embedding_hidden_mapping_in/", LINEAR),
        (r"roformer\.encoder\.layer\.(\d+)\.", r"bert/encoder/layer_\1/", BERT_LAYER),
    ] + MLM_BERT,
}

# XLM-R's release is fairseq's; bert4keras users convert it to RoBERTa's BERT-named checkpoint.
HF_TO_ORIGINAL["xlm_roberta"] = HF_TO_ORIGINAL["roberta"]

# Variables of the other ELECTRA model kept in the same release checkpoint: they must be ignored.
OTHER_ELECTRA_MODEL = {
    "electra": ["generator/encoder/layer_0/attention/self/query/kernel",
                "generator/embeddings_project/kernel", "generator_predictions/output_bias"],
    "electra_generator": ["electra/encoder/layer_0/attention/self/query/kernel",
                          "electra/embeddings_project/kernel",
                          "discriminator_predictions/dense_1/bias"],
}


def original_name(family, hf_name):
    for prefix, original, leaves in HF_TO_ORIGINAL[family]:
        match = re.match(prefix, hf_name)
        if match and hf_name[match.end():] in leaves:
            leaf, transposed = leaves[hf_name[match.end():]]
            return match.expand(original) + leaf, transposed
    raise KeyError(f"no original name for {hf_name}")


def write_original_checkpoint(family, prefix):
    """The fixture's weights in the original release's names, as training would leave them:
    with Adam slots, a step counter, and (ELECTRA) the other model's variables."""
    variables = {}
    for name, value in load_file(ZOO / family / "model.safetensors").items():
        if name.endswith("embed_positions.weight"):  # RoFormer's fixed sinusoidal buffer
            continue
        google, transposed = original_name(family, name)
        variables[google] = np.ascontiguousarray(value.T) if transposed else value
        variables[google + "/adam_m"] = np.zeros_like(value)
    variables["global_step"] = np.array(100, np.int64)
    for name in OTHER_ELECTRA_MODEL.get(family, []):
        variables[name] = np.ones((3, 3), np.float32)
    write_tf_checkpoint(prefix, variables)


# ---------------------------------------------------------------------------------------------------
# Families transformers has
# ---------------------------------------------------------------------------------------------------

# fixture directory -> (model name, builder options, {expected key: our output or layer input})
HF_FAMILIES = {
    "roberta": ("roberta", dict(with_mlm="linear"),
                {"sequence_output": ("input", "MLM-Dense"), "mlm_logits": ("output", 0)}),
    # config.json says model_type 'xlm-roberta': read as RoBERTa, position offset included.
    "xlm_roberta": ("roberta", dict(with_mlm="linear"),
                    {"sequence_output": ("input", "MLM-Dense"), "mlm_logits": ("output", 0)}),
    "albert": ("albert", dict(with_nsp=True, with_mlm="linear"),
               {"sequence_output": ("input", "MLM-Dense"),
                "pooled_output": ("layer", "Pooler-Dense"),
                "sop_logits": ("output", 0), "mlm_logits": ("output", 1)}),
    "electra": ("electra", dict(with_discriminator="linear"),
                {"sequence_output": ("input", "Discriminator-Dense"),
                 "discriminator_logits": ("output", 0)}),
    "electra_generator": ("electra", dict(generator=True, with_mlm="linear"),
                          {"sequence_output": ("input", "MLM-Dense"), "mlm_logits": ("output", 0)}),
    "roformer": ("roformer", dict(with_mlm="linear"),
                 {"sequence_output": ("input", "MLM-Dense"), "mlm_logits": ("output", 0)}),
}


def probe(model, spec):
    outputs = model.outputs
    tensors = {}
    for key, (kind, where) in spec.items():
        if kind == "output":
            tensors[key] = outputs[where]
        elif kind == "input":
            tensors[key] = model.get_layer(where).input
        else:
            tensors[key] = model.get_layer(where).output
    return keras.Model(model.inputs, tensors)


def run_probe(model, spec, reference):
    inputs = [reference["token_ids"].astype("int32"), reference["segment_ids"].astype("int32")]
    out = probe(model, spec)(inputs)
    return {k: keras.ops.convert_to_numpy(v) for k, v in out.items()}


def compare_with_reference(family, ours, reference):
    """Max abs diff per output, on real (non-padding) tokens; HF gives logits where our heads
    give probabilities (SOP)."""
    pad = 1 if family in ("roberta", "xlm_roberta") else 0
    real = reference["token_ids"] != pad
    diffs = {}
    for key, value in ours.items():
        expected = reference[key]
        if key == "sop_logits":
            expected = np.exp(expected) / np.exp(expected).sum(-1, keepdims=True)
        value = value.reshape(expected.shape)
        diff = np.abs(value - expected)
        diffs[key] = float(diff[real].max() if diff.shape[:2] == real.shape else diff.max())
    return diffs


@pytest.fixture(scope="module")
def references():
    return {family: dict(np.load(ZOO / family / "expected.npz")) for family in HF_FAMILIES}


@pytest.fixture(scope="module")
def hf_models():
    """family -> builder loaded from the transformers-written safetensors (via its config.json)."""
    models = {}
    for family, (model, options, _) in HF_FAMILIES.items():
        models[family] = build_transformer_model(ZOO / family / "config.json", ZOO / family,
                                                 model=model, return_keras_model=False, **options)
    return models


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_safetensors_from_transformers_matches_its_outputs(family, hf_models, references):
    spec = HF_FAMILIES[family][2]
    diffs = compare_with_reference(family, run_probe(hf_models[family].model, spec,
                                                     references[family]), references[family])
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_original_release_checkpoint_matches_transformers(family, references, tmp_path):
    model, options, spec = HF_FAMILIES[family]
    write_original_checkpoint(family, tmp_path / "model.ckpt")
    loaded = build_transformer_model(ZOO / family / "config.json", tmp_path / "model.ckpt",
                                     model=model, **options)
    diffs = compare_with_reference(family, run_probe(loaded, spec, references[family]),
                                   references[family])
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_albert_shares_one_block_and_unshared_reads_it_into_each(hf_models, references,
                                                                 tmp_path):
    albert = hf_models["albert"].model
    assert "Transformer-MultiHeadSelfAttention" in [layer.name for layer in albert.layers]
    assert not any(layer.name.startswith("Transformer-0") for layer in albert.layers)
    write_original_checkpoint("albert", tmp_path / "albert.ckpt")
    for path in (ZOO / "albert", tmp_path / "albert.ckpt"):
        unshared = build_transformer_model(ZOO / "albert" / "config.json", path,
                                           model="albert_unshared", with_nsp=True,
                                           with_mlm="linear")
        q0 = unshared.get_layer("Transformer-0-MultiHeadSelfAttention")
        q1 = unshared.get_layer("Transformer-1-MultiHeadSelfAttention")
        assert q0 is not q1
        np.testing.assert_array_equal(q0.q_dense.kernel.numpy(), q1.q_dense.kernel.numpy())
        diffs = compare_with_reference("albert", run_probe(unshared, HF_FAMILIES["albert"][2],
                                                           references["albert"]),
                                       references["albert"])
        assert max(diffs.values()) <= TOLERANCE, diffs
    # Blocks fine-tuned apart cannot be written back into ALBERT's one shared block.
    q1.q_dense.kernel.assign(q1.q_dense.kernel.numpy() + 1)
    with pytest.raises(CheckpointError, match="group_0/inner_group_0.*different values"):
        save_weights_as_checkpoint(unshared, tmp_path / "out" / "model.ckpt",
                                   family="albert_unshared")


def test_roberta_config_translates_its_position_offset(hf_models):
    model = hf_models["roberta"]
    assert (model.pad_token_id, model.position_offset) == (1, 2)
    layer = model.model.get_layer("Embedding-Position")
    assert layer.max_length() == 64  # 66 rows, the first two reserved
    with pytest.raises(ValueError, match="65 exceeds max_position=64"):
        model.model([np.full((1, 65), 5, "int32"), np.zeros((1, 65), "int32")])


def test_config_settings_that_cannot_be_honoured_are_refused():
    with pytest.raises(ValueError, match="num_hidden_groups=2"):
        configs.config_to_arguments({"model_type": "albert", "num_hidden_groups": 2}, "albert")
    with pytest.raises(ValueError, match="rotary_value"):
        configs.config_to_arguments({"model_type": "roformer", "rotary_value": True}, "roformer")
    with pytest.raises(ValueError, match="generator=True"):
        build_transformer_model(model="electra", with_mlm=True, **TINY)
    with pytest.raises(ValueError, match="no pooler"):
        build_transformer_model(model="roformer_v2", with_pool=True, **TINY)


# ---------------------------------------------------------------------------------------------------
# NumPy implementations of the published equations
# ---------------------------------------------------------------------------------------------------

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position=64, segment_vocab_size=2)


def sinusoid_table(rows, dim):
    """Row p: sin(p / 10000^(2i/dim)) at 2i, cos at 2i+1 (NEZHA's relative table)."""
    table = np.zeros((rows, dim))
    for p in range(rows):
        for i in range(dim // 2):
            table[p, 2 * i] = np.sin(p / 10000 ** (2 * i / dim))
            table[p, 2 * i + 1] = np.cos(p / 10000 ** (2 * i / dim))
    return table


def rotate(x):
    """RoFormer's rotary position embedding of x [batch, length, heads, d]: each pair
    (x_2i, x_2i+1) at position m rotated by the angle m * 10000^(-2i/d)."""
    length, dim = x.shape[1], x.shape[-1]
    theta = np.arange(length)[:, None] * 10000.0 ** (-2 * np.arange(dim // 2) / dim)
    cos, sin = np.cos(theta)[None, :, None, :], np.sin(theta)[None, :, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def numpy_encoder(w, ids, segments, heads, layers, positions="absolute", norm="layer",
                  activation=gelu, max_relative=64, residual_scores=False):
    """A post-norm BERT-style encoder read from original-release (bert/...) names.

    positions: 'absolute' (BERT), 'relative' (NEZHA: r_ij = sinusoid row clip(j - i) +
    max_relative, scores q_i . (k_j + r_ij), outputs sum_j p_ij (v_j + r_ij)) or 'rotary'
    (RoFormer). norm: 'layer' (gamma, beta) or 'rms' (RoFormer-v2, no parameters). Biases absent
    from `w` are zero. residual_scores: RealFormer (each layer's logits add the previous').
    """
    def dense(x, name):
        return x @ w[name + "/kernel"] + w.get(name + "/bias", 0)

    def normalise(x, name):
        if norm == "rms":
            return layer_norm(x, center=False)
        return layer_norm(x, w[name + "/gamma"], w[name + "/beta"])

    batch, length = ids.shape
    x = w["bert/embeddings/word_embeddings"][ids]
    x = x + w["bert/embeddings/token_type_embeddings"][segments]
    if positions == "absolute":
        x = x + w["bert/embeddings/position_embeddings"][:length]
    x = normalise(x, "bert/embeddings/LayerNorm")
    if "bert/encoder/embedding_hidden_mapping_in/kernel" in w:
        x = dense(x, "bert/encoder/embedding_hidden_mapping_in")
    hidden = x.shape[-1]
    size = hidden // heads
    mask = np.where(ids == 0, -1e9, 0.0)[:, None, None, :]
    if positions == "relative":
        distance = np.arange(length)[None, :] - np.arange(length)[:, None]
        relative = sinusoid_table(2 * max_relative + 1, size)[
            np.clip(distance, -max_relative, max_relative) + max_relative]
    previous = None
    for i in range(layers):
        scope = f"bert/encoder/layer_{i}/"

        def split(name):
            return dense(x, scope + name).reshape(batch, length, heads, size)

        q, k, v = split("attention/self/query"), split("attention/self/key"), \
            split("attention/self/value")
        if positions == "rotary":
            q, k = rotate(q), rotate(k)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k)
        if positions == "relative":
            scores = scores + np.einsum("bqhd,qkd->bhqk", q, relative)
        scores = scores / np.sqrt(size)
        if residual_scores and previous is not None:
            scores = scores + previous
        previous = scores
        probs = softmax(scores + mask)
        out = np.einsum("bhqk,bkhd->bqhd", probs, v)
        if positions == "relative":
            out = out + np.einsum("bhqk,qkd->bqhd", probs, relative)
        out = dense(out.reshape(batch, length, hidden), scope + "attention/output/dense")
        x = normalise(x + out, scope + "attention/output/LayerNorm")
        h = dense(activation(dense(x, scope + "intermediate/dense")), scope + "output/dense")
        x = normalise(x + h, scope + "output/LayerNorm")
    return x


def random_original_checkpoint(rng, config, positions=True, biases=True, norms=True,
                               mapping=False, mlm=False):
    """Random variables in Google BERT's names (as NEZHA's and RoFormer's releases use)."""
    h, m, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    e = config.get("embedding_size") or h
    shapes = {"bert/embeddings/word_embeddings": (v, e),
              "bert/embeddings/token_type_embeddings": (2, e)}
    if positions:
        shapes["bert/embeddings/position_embeddings"] = (config["max_position"], e)
    dims = {"bert/embeddings/LayerNorm": e}
    if mapping:
        shapes["bert/encoder/embedding_hidden_mapping_in/kernel"] = (e, h)
        dims["bert/encoder/embedding_hidden_mapping_in"] = None
    for i in range(config["num_hidden_layers"]):
        scope = f"bert/encoder/layer_{i}/"
        for name, shape in [("attention/self/query", (h, h)), ("attention/self/key", (h, h)),
                            ("attention/self/value", (h, h)), ("attention/output/dense", (h, h)),
                            ("intermediate/dense", (h, m)), ("output/dense", (m, h))]:
            shapes[scope + name + "/kernel"] = shape
            if biases:
                shapes[scope + name + "/bias"] = shape[1:]
        dims[scope + "attention/output/LayerNorm"] = h
        dims[scope + "output/LayerNorm"] = h
    if mapping and biases:
        shapes["bert/encoder/embedding_hidden_mapping_in/bias"] = (h,)
    if mlm:
        shapes.update({"cls/predictions/transform/dense/kernel": (h, e),
                       "cls/predictions/transform/dense/bias": (e,),
                       "cls/predictions/output_bias": (v,)})
        dims["cls/predictions/transform/LayerNorm"] = e
    variables = {name: rng.normal(0, 0.3, shape) for name, shape in shapes.items()}
    if norms:
        for scope, dim in dims.items():
            if dim:
                variables[scope + "/gamma"] = 1 + rng.normal(0, 0.2, dim)
                variables[scope + "/beta"] = rng.normal(0, 0.2, dim)
    return {name: value.astype("float32") for name, value in variables.items()}


def batch(length=12, vocab=100, seed=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(3, length)).astype("int32")
    segments = np.zeros_like(ids)
    segments[:, length // 2:] = 1
    ids[0, -4:] = 0
    segments[0, -4:] = 0
    return ids, segments


def assert_close_on_real_tokens(ours, expected, ids):
    diff = np.abs(ours - expected)[ids != 0].max()
    assert diff <= TOLERANCE, diff


NEZHA_CONFIG = dict(TINY, embedding_size=16, max_relative_position=4)  # clipped at 4 of 12
ROFORMER_V2_CONFIG = dict(TINY, hidden_act="relu")


@pytest.fixture(scope="module")
def nezha(tmp_path_factory):
    rng = np.random.default_rng(11)
    weights = random_original_checkpoint(rng, NEZHA_CONFIG, positions=False, mapping=True,
                                         mlm=True)
    prefix = tmp_path_factory.mktemp("nezha") / "model.ckpt"
    write_tf_checkpoint(prefix, weights)
    builder = build_transformer_model(checkpoint_path=prefix, model="nezha", with_mlm="linear",
                                      return_keras_model=False, **NEZHA_CONFIG)
    return builder, weights, prefix


@pytest.fixture(scope="module")
def roformer_v2(tmp_path_factory):
    rng = np.random.default_rng(12)
    weights = random_original_checkpoint(rng, ROFORMER_V2_CONFIG, positions=False, biases=False,
                                         norms=False)
    prefix = tmp_path_factory.mktemp("roformer_v2") / "model.ckpt"
    write_tf_checkpoint(prefix, weights)
    builder = build_transformer_model(checkpoint_path=prefix, model="roformer_v2",
                                      with_mlm="linear", return_keras_model=False,
                                      **ROFORMER_V2_CONFIG)
    return builder, weights, prefix


def sequence_of(model, layer, inputs):
    probe_model = keras.Model(model.inputs, model.get_layer(layer).input)
    return keras.ops.convert_to_numpy(probe_model(inputs))


def test_nezha_matches_numpy_relative_positions(nezha):
    builder, w, _ = nezha
    ids, segments = batch()
    expected = numpy_encoder(w, ids, segments, heads=4, layers=2, positions="relative",
                             max_relative=4)
    assert_close_on_real_tokens(sequence_of(builder.model, "MLM-Dense", [ids, segments]),
                                expected, ids)
    h = layer_norm(gelu(expected @ w["cls/predictions/transform/dense/kernel"]
                        + w["cls/predictions/transform/dense/bias"]),
                   w["cls/predictions/transform/LayerNorm/gamma"],
                   w["cls/predictions/transform/LayerNorm/beta"])
    logits = h @ w["bert/embeddings/word_embeddings"].T + w["cls/predictions/output_bias"]
    assert_close_on_real_tokens(keras.ops.convert_to_numpy(builder.model([ids, segments])),
                                logits, ids)
    # NEZHA's release clips at 64 by default.
    default = build_transformer_model(model="nezha", **TINY)
    assert default.get_layer("Embedding-Relative-Position").max_distance == 64


def test_roformer_v2_matches_numpy_rotary_unbiased_scale_free(roformer_v2):
    builder, w, _ = roformer_v2
    ids, segments = batch()
    expected = numpy_encoder(w, ids, segments, heads=4, layers=2, positions="rotary", norm="rms",
                             activation=lambda x: np.maximum(x, 0))
    logits = keras.ops.convert_to_numpy(builder.model([ids, segments]))
    assert_close_on_real_tokens(logits, expected @ w["bert/embeddings/word_embeddings"].T, ids)
    assert not [w.path for w in builder.model.weights if re.search(r"(bias|gamma|beta)$", w.path)]


def test_roformer_rotary_matches_numpy(hf_models):
    """The HF comparison, again against the paper's pairwise rotation written here."""
    builder = hf_models["roformer"]
    ids, segments = batch()
    w = {}
    for layer, scope in [("Embedding-Token", "bert/embeddings/word_embeddings"),
                         ("Embedding-Segment", "bert/embeddings/token_type_embeddings")]:
        w[scope] = builder.model.get_layer(layer).get_weights()[0]
    w["bert/embeddings/LayerNorm/gamma"], w["bert/embeddings/LayerNorm/beta"] = \
        builder.model.get_layer("Embedding-Norm").get_weights()
    kernel, bias = builder.model.get_layer("Embedding-Mapping").get_weights()
    w["bert/encoder/embedding_hidden_mapping_in/kernel"] = kernel
    w["bert/encoder/embedding_hidden_mapping_in/bias"] = bias
    for i in range(2):
        attention = builder.model.get_layer(f"Transformer-{i}-MultiHeadSelfAttention")
        ff = builder.model.get_layer(f"Transformer-{i}-FeedForward")
        for layer, name in [(attention.q_dense, "attention/self/query"),
                            (attention.k_dense, "attention/self/key"),
                            (attention.v_dense, "attention/self/value"),
                            (attention.o_dense, "attention/output/dense"),
                            (ff.i0_dense, "intermediate/dense"), (ff.o_dense, "output/dense")]:
            w[f"bert/encoder/layer_{i}/{name}/kernel"], w[f"bert/encoder/layer_{i}/{name}/bias"] = \
                layer.get_weights()
        for layer, name in [("MultiHeadSelfAttention-Norm", "attention/output/LayerNorm"),
                            ("FeedForward-Norm", "output/LayerNorm")]:
            w[f"bert/encoder/layer_{i}/{name}/gamma"], w[f"bert/encoder/layer_{i}/{name}/beta"] = \
                builder.model.get_layer(f"Transformer-{i}-{layer}").get_weights()
    expected = numpy_encoder(w, ids, segments, heads=4, layers=2, positions="rotary")
    assert_close_on_real_tokens(sequence_of(builder.model, "MLM-Dense", [ids, segments]),
                                expected, ids)


# ---------------------------------------------------------------------------------------------------
# Builder options, on a tiny BERT read from a random Google checkpoint
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory):
    config = dict(TINY, max_position=16)
    weights = random_original_checkpoint(np.random.default_rng(13), config, mlm=True)
    prefix = tmp_path_factory.mktemp("bert") / "bert_model.ckpt"
    write_tf_checkpoint(prefix, weights)
    return config, weights, prefix


def test_residual_attention_scores_match_numpy_realformer(bert_checkpoint):
    config, w, prefix = bert_checkpoint
    model = build_transformer_model(checkpoint_path=prefix, residual_attention_scores=True,
                                    **config)
    ids, segments = batch()
    expected = numpy_encoder(w, ids, segments, heads=4, layers=2, residual_scores=True)
    assert_close_on_real_tokens(keras.ops.convert_to_numpy(model([ids, segments])), expected, ids)
    plain = numpy_encoder(w, ids, segments, heads=4, layers=2)
    assert np.abs(expected - plain)[ids != 0].max() > 1e-2  # the residual scores matter here


def write_vocab(path, size):
    """A vocabulary of `size` tokens, some of which load_vocab(simplified=True) drops:
    multi-character tokens with CJK characters or punctuation."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    dropped = ["中国", "##，。", "北京", "!!", "##人民"]
    i = 0
    while len(tokens) < size:
        tokens.append(dropped[i // 7] if i % 7 == 3 and i // 7 < len(dropped) else f"w{i}")
        i += 1
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return tokens


def test_keep_tokens_gives_the_full_models_logits_on_kept_tokens(bert_checkpoint, tmp_path):
    from bert4k.tokenizers import load_vocab

    config, w, prefix = bert_checkpoint
    tokens = write_vocab(tmp_path / "vocab.txt", config["vocab_size"])
    token_dict, keep_tokens = load_vocab(tmp_path / "vocab.txt", simplified=True,
                                         startswith=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    assert len(keep_tokens) == len(tokens) - 5 and keep_tokens[:5] == [0, 1, 2, 3, 4]
    full = build_transformer_model(checkpoint_path=prefix, with_mlm="linear", **config)
    small = build_transformer_model(checkpoint_path=prefix, with_mlm="linear",
                                    keep_tokens=keep_tokens, **config)
    new_ids, segments = batch(vocab=len(keep_tokens))
    old_ids = np.asarray(keep_tokens, "int32")[new_ids]
    assert [tokens[i] for i in old_ids[1]] == [list(token_dict)[i] for i in new_ids[1]]
    expected = keras.ops.convert_to_numpy(full([old_ids, segments]))[..., keep_tokens]
    got = keras.ops.convert_to_numpy(small([new_ids, segments]))
    assert got.shape[-1] == len(keep_tokens)
    assert_close_on_real_tokens(got, expected, new_ids)


def test_compound_tokens_start_as_the_mean_of_their_parts(bert_checkpoint):
    config, w, prefix = bert_checkpoint
    keep = list(range(0, 100, 2))
    compound = [[5, 6], ([7, 8, 9], [1.0, 2.0, 1.0])]
    model = build_transformer_model(checkpoint_path=prefix, with_mlm=True, keep_tokens=keep,
                                    compound_tokens=compound, **config)
    table = model.get_layer("Embedding-Token").get_weights()[0]
    (bias,) = model.get_layer("MLM-Bias").get_weights()
    for stored, ours in [(w["bert/embeddings/word_embeddings"], table),
                         (w["cls/predictions/output_bias"], bias)]:
        kept = stored[keep]
        assert ours.shape[0] == len(keep) + 2
        np.testing.assert_allclose(ours[: len(keep)], kept)
        np.testing.assert_allclose(ours[len(keep)], kept[[5, 6]].mean(0), atol=1e-6)
        np.testing.assert_allclose(ours[len(keep) + 1],
                                   (kept[7] + 2 * kept[8] + kept[9]) / 4, atol=1e-6)


def test_hierarchical_position_keeps_the_table_and_runs_four_times_longer(bert_checkpoint):
    config, w, prefix = bert_checkpoint  # max_position 16
    plain = build_transformer_model(checkpoint_path=prefix, **config)
    model = build_transformer_model(checkpoint_path=prefix, hierarchical_position=True, **config)
    layer = model.get_layer("Embedding-Position")
    assert layer.hierarchical == 0.4
    rows = keras.ops.convert_to_numpy(layer.position_embeddings(keras.ops.arange(16)))
    np.testing.assert_allclose(rows, w["bert/embeddings/position_embeddings"], atol=1e-6)
    ids, segments = batch(length=16)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model([ids, segments])),
                               keras.ops.convert_to_numpy(plain([ids, segments])), atol=1e-5)
    long_ids, long_segments = batch(length=64)
    out = keras.ops.convert_to_numpy(model([long_ids, long_segments]))
    assert out.shape == (3, 64, 32) and np.isfinite(out).all()
    with pytest.raises(ValueError, match="hierarchical_position=True"):
        plain([long_ids, long_segments])


def test_layer_norm_cond_starts_as_the_plain_model_and_conditions_every_norm(bert_checkpoint,
                                                                           tmp_path):
    config, w, prefix = bert_checkpoint
    ids, segments = batch()
    condition = np.random.default_rng(0).normal(size=(3, 8)).astype("float32")
    builder = build_transformer_model(checkpoint_path=prefix, layer_norm_cond=8,
                                      layer_norm_cond_hidden_size=6,
                                      layer_norm_cond_hidden_act="tanh",
                                      return_keras_model=False, **config)
    model = builder.model
    assert [t.name for t in model.inputs][-1] == "Input-Condition"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model([ids, segments, condition])),
                               numpy_encoder(w, ids, segments, heads=4, layers=2)[...], atol=1e-4)

    rng = np.random.default_rng(1)
    for weight in model.weights:
        if re.search(r"-Norm/(gamma|beta)_dense/kernel$", weight.path):
            weight.assign(rng.normal(0, 0.1, weight.shape).astype("float32"))
    norm = model.get_layer("Transformer-1-FeedForward-Norm")
    probe = keras.Model(model.inputs, [norm.input[0], norm.output])
    x, y = (keras.ops.convert_to_numpy(t) for t in probe([ids, segments, condition]))
    hidden = np.tanh(condition @ norm.hidden_dense.kernel.numpy())
    gamma = norm.gamma.numpy() + hidden @ norm.gamma_dense.kernel.numpy()
    beta = norm.beta.numpy() + hidden @ norm.beta_dense.kernel.numpy()
    np.testing.assert_allclose(y, layer_norm(x, gamma[:, None], beta[:, None]), atol=1e-4)

    # The condition projections are written under bert4k/ names and read back.
    before = keras.ops.convert_to_numpy(model([ids, segments, condition]))
    save_weights_as_checkpoint(builder, tmp_path / "cond.ckpt")
    stored = dict(tf.train.list_variables(str(tmp_path / "cond.ckpt")))
    assert "bert4k/Embedding-Norm/gamma_dense/kernel" in stored
    assert "bert/embeddings/LayerNorm/gamma" in stored
    reloaded = build_transformer_model(checkpoint_path=tmp_path / "cond.ckpt", layer_norm_cond=8,
                                       layer_norm_cond_hidden_size=6,
                                       layer_norm_cond_hidden_act="tanh", **config)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(reloaded([ids, segments, condition])), before)
    path = tmp_path / "cond.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded([ids, segments, condition])),
                                  before)


def test_layer_norm_cond_from_a_keras_tensor(bert_checkpoint):
    config, w, prefix = bert_checkpoint
    label = keras.Input((1,), dtype="int32", name="Input-Label")
    condition = keras.layers.Flatten()(keras.layers.Embedding(3, 8)(label))
    model = build_transformer_model(checkpoint_path=prefix, layer_norm_cond=condition,
                                    additional_input_layers=label, **config)
    assert model.inputs[-1] is label
    ids, segments = batch()
    out = model([ids, segments, np.array([[0], [1], [2]], "int32")])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out),
                               numpy_encoder(w, ids, segments, heads=4, layers=2), atol=1e-4)


def test_prefix_puts_two_models_side_by_side(bert_checkpoint, nezha):
    config, w, prefix = bert_checkpoint
    nezha_builder, _, nezha_prefix = nezha
    a = build_transformer_model(checkpoint_path=prefix, prefix="A-", **config)
    b = build_transformer_model(checkpoint_path=nezha_prefix, model="nezha", prefix="B-",
                                with_mlm="linear", **NEZHA_CONFIG)
    both = keras.Model(a.inputs + b.inputs, [a.output, b.output])
    assert len({layer.name for layer in both.layers}) == len(both.layers)
    ids, segments = batch()
    out_a, out_b = (keras.ops.convert_to_numpy(t) for t in both([ids, segments, ids, segments]))
    assert_close_on_real_tokens(out_a, numpy_encoder(w, ids, segments, heads=4, layers=2), ids)
    np.testing.assert_allclose(out_b, keras.ops.convert_to_numpy(
        nezha_builder.model([ids, segments])), atol=1e-5)


def test_sequence_length_fixes_the_input_shape(bert_checkpoint):
    config, w, prefix = bert_checkpoint
    model = build_transformer_model(checkpoint_path=prefix, sequence_length=12, **config)
    assert [tuple(t.shape) for t in model.inputs] == [(None, 12), (None, 12)]
    ids, segments = batch(length=12)
    assert_close_on_real_tokens(keras.ops.convert_to_numpy(model([ids, segments])),
                                numpy_encoder(w, ids, segments, heads=4, layers=2), ids)


class MeanPooledBERT(BERT):
    """A user's family: BERT's network and checkpoint names, a mean-pooled output."""

    def apply_final_layers(self, x):
        return self.apply(x, keras.layers.GlobalAveragePooling1D, name="Mean-Pool")


def test_model_can_be_a_users_transformer_subclass(bert_checkpoint):
    config, w, prefix = bert_checkpoint
    model = build_transformer_model(checkpoint_path=prefix, model=MeanPooledBERT, **config)
    ids, segments = batch()
    ids[0, -4:] = 7  # no padding: the plain mean is over every position
    expected = numpy_encoder(w, ids, segments, heads=4, layers=2).mean(1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model([ids, segments])), expected,
                               atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Every family round-trips through .keras and through its own checkpoint writers
# ---------------------------------------------------------------------------------------------------

ROUND_TRIPS = {
    # name: (where the builder comes from, rebuild options)
    "roberta": ("hf", "roberta"), "albert": ("hf", "albert"), "electra": ("hf", "electra"),
    "electra_generator": ("hf", "electra_generator"), "roformer": ("hf", "roformer"),
    # ALBERT's one block read into each layer (blocks that diverged cannot be written back).
    "albert_unshared": ("hf", "albert"),
    "nezha": ("nezha", None),
    "roformer_v2": ("build", dict(model="roformer_v2", embedding_size=16, with_mlm=True)),
    "realformer": ("build", dict(model="bert", residual_attention_scores=True, with_mlm=True)),
}


def rebuild_options(name):
    kind, spec = ROUND_TRIPS[name]
    if kind == "hf":
        model, options, _ = HF_FAMILIES[spec]
        model = name if name == "albert_unshared" else model
        return dict(config_path=ZOO / spec / "config.json", model=model, **options)
    if kind == "nezha":
        return dict(model="nezha", with_mlm="linear", **NEZHA_CONFIG)
    return dict(TINY, **spec)


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_every_family_round_trips_keras_and_checkpoints(name, hf_models, nezha, tmp_path):
    kind, spec = ROUND_TRIPS[name]
    options = rebuild_options(name)
    if name == "albert_unshared":
        builder = build_transformer_model(checkpoint_path=ZOO / spec, return_keras_model=False,
                                          **options)
    elif kind == "hf":
        builder = hf_models[spec]
    elif kind == "nezha":
        builder = nezha[0]
    else:
        builder = build_transformer_model(return_keras_model=False, **options)
    ids, segments = batch()
    inputs = [ids, segments if builder.segment_vocab_size > 1 else np.zeros_like(segments)]
    before = keras.ops.convert_to_numpy(builder.model(inputs)) if len(builder.model.outputs) == 1 \
        else [keras.ops.convert_to_numpy(t) for t in builder.model(inputs)]

    def same(model):
        after = model(inputs)
        after = [after] if not isinstance(after, (list, tuple)) else after
        for a, b in zip(before if isinstance(before, list) else [before], after):
            np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))

    builder.model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in loaded.layers)
    same(loaded)
    save_weights_as_checkpoint(builder, tmp_path / "ckpt" / "model.ckpt")
    same(build_transformer_model(checkpoint_path=tmp_path / "ckpt" / "model.ckpt", **options))
    save_weights_as_safetensors(builder, tmp_path / "hf" / "model.safetensors")
    same(build_transformer_model(checkpoint_path=tmp_path / "hf", **options))
