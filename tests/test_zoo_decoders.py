"""Decoder families against transformers: small random models saved by
scripts/make_zoo_decoder_reference.py, loaded from their safetensors and from checkpoints in the
original release names (written here by an independent mapping)."""

import json
import re

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bert4k.checkpoints import save_weights_as_checkpoint, save_weights_as_safetensors
from bert4k.models import build_transformer_model
from conftest import FIXTURES, gelu, layer_norm, softmax, write_tf_checkpoint

ZOO = FIXTURES / "zoo"


# -- GPT-2 ----------------------------------------------------------------------------------------


def openai_gpt2_name(hf_name):
    """HF GPT2 name -> OpenAI's TF release name, and whether OpenAI adds a leading conv1d axis."""
    name = hf_name.removeprefix("transformer.")
    name = re.sub(r"^h\.(\d+)\.", r"h\1/", name)
    conv = re.search(r"(c_attn|c_proj|c_fc)\.weight$", name) is not None
    name = re.sub(r"\.weight$", "/w" if conv else "/g", name)
    name = re.sub(r"\.bias$", "/b", name)
    name = name.replace("wte/g", "wte").replace("wpe/g", "wpe").replace(".", "/")
    return "model/" + name, conv


@pytest.fixture(scope="module")
def gpt2_expected():
    return dict(np.load(ZOO / "gpt2" / "expected.npz"))


def test_gpt2_from_safetensors_matches_transformers(gpt2_expected):
    model = build_transformer_model(ZOO / "gpt2" / "config.json", ZOO / "gpt2", model="gpt2",
                                    with_lm="linear")
    logits = model.predict(gpt2_expected["token_ids"], verbose=0)
    assert np.abs(logits - gpt2_expected["logits"]).max() <= 1e-4


def test_gpt2_bare_model_file_matches_transformers(gpt2_expected, tmp_path):
    bare = {k.removeprefix("transformer."): v
            for k, v in load_file(ZOO / "gpt2" / "model.safetensors").items()}
    save_file(bare, tmp_path / "model.safetensors")
    model = build_transformer_model(ZOO / "gpt2" / "config.json", tmp_path, model="gpt2",
                                    with_lm=False)
    hidden = model.predict(gpt2_expected["token_ids"], verbose=0)
    assert np.abs(hidden - gpt2_expected["hidden"]).max() <= 1e-4


def test_gpt2_from_openai_release_names(gpt2_expected, tmp_path):
    variables = {}
    for hf_name, value in load_file(ZOO / "gpt2" / "model.safetensors").items():
        name, conv = openai_gpt2_name(hf_name)
        variables[name] = value[None] if conv else value
    write_tf_checkpoint(tmp_path / "model.ckpt", variables)
    hparams = dict(n_vocab=100, n_ctx=64, n_embd=32, n_head=4, n_layer=2)
    model = build_transformer_model(checkpoint_path=tmp_path / "model.ckpt", model="gpt2",
                                    with_lm="linear", **_gpt2_arguments(hparams))
    logits = model.predict(gpt2_expected["token_ids"], verbose=0)
    assert np.abs(logits - gpt2_expected["logits"]).max() <= 1e-4


def _gpt2_arguments(hparams):
    from bert4k.configs import config_to_arguments

    return config_to_arguments(hparams, "gpt2")


def test_gpt2_is_causal_by_default(gpt2_expected):
    model = build_transformer_model(ZOO / "gpt2" / "config.json", ZOO / "gpt2", model="gpt2")
    ids = gpt2_expected["token_ids"][:1].copy()
    before = model.predict(ids, verbose=0)
    ids[0, -1] = (ids[0, -1] + 1) % 100
    after = model.predict(ids, verbose=0)
    np.testing.assert_allclose(before[:, :-1], after[:, :-1], atol=1e-6)


def test_gpt2_round_trips(tmp_path, gpt2_expected):
    config = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position=64)
    model = build_transformer_model(model="gpt2", **config)
    ids = gpt2_expected["token_ids"]
    expected = model.predict(ids, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(ids, verbose=0), expected)
    save_weights_as_checkpoint(model, tmp_path / "ckpt" / "model.ckpt", family="gpt2")
    reloaded = build_transformer_model(checkpoint_path=tmp_path / "ckpt" / "model.ckpt",
                                       model="gpt2", **config)
    np.testing.assert_array_equal(reloaded.predict(ids, verbose=0), expected)


# -- T5 -------------------------------------------------------------------------------------------


def mesh_t5_name(hf_name):
    """HF T5 name -> the Mesh TensorFlow release name, and whether Mesh stores it transposed."""
    if hf_name == "shared.weight":
        return "shared/embedding", False
    if hf_name == "lm_head.weight":
        return "decoder/logits/kernel", True
    match = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(.+)\.weight", hf_name)
    if match is None:  # encoder.final_layer_norm.weight
        return hf_name.replace(".weight", "/scale").replace(".", "/"), False
    stack, block, layer, rest = match.groups()
    scope = f"{stack}/block_{int(block):03d}/layer_{int(layer):03d}"
    if rest == "layer_norm":
        return f"{scope}/layer_norm/scale", False
    if rest.endswith("relative_attention_bias"):
        return f"{scope}/{rest.replace('.', '/')}", True  # Mesh: [heads, buckets]
    attention = re.fullmatch(r"(SelfAttention|EncDecAttention)\.([qkvo])", rest)
    if attention:
        return f"{scope}/{attention.group(1)}/{attention.group(2)}", True
    return f"{scope}/{rest.replace('.', '/')}/kernel", True  # DenseReluDense.wi / wi_0 / wo


T5_FAMILIES = ["t5", "t5.1.1"]


@pytest.mark.parametrize("family", T5_FAMILIES)
def test_t5_from_safetensors_matches_transformers(family):
    expected = np.load(ZOO / family / "expected.npz")
    t5 = build_transformer_model(ZOO / family / "config.json", ZOO / family, model=family,
                                 with_lm="linear", return_keras_model=False)
    logits = t5.model.predict([expected["encoder_ids"], expected["decoder_ids"]], verbose=0)
    assert np.abs(logits - expected["logits"]).max() <= 1e-4
    context = t5.encoder.predict(expected["encoder_ids"], verbose=0)
    real = expected["encoder_ids"] != 0
    assert np.abs(context - expected["encoder_output"])[real].max() <= 1e-4
    assert np.all(context[~real] == 0)  # padding zeroed, for a decoder given the context alone


def write_mesh_checkpoint(family, prefix):
    variables = {}
    for hf_name, value in load_file(ZOO / family / "model.safetensors").items():
        name, transposed = mesh_t5_name(hf_name)
        variables[name] = value.T.copy() if transposed else value
    write_tf_checkpoint(prefix, variables)


@pytest.mark.parametrize("family", T5_FAMILIES)
def test_t5_from_mesh_tensorflow_names(family, tmp_path):
    expected = np.load(ZOO / family / "expected.npz")
    write_mesh_checkpoint(family, tmp_path / "model.ckpt")
    model = build_transformer_model(ZOO / family / "config.json", tmp_path / "model.ckpt",
                                    model=family, with_lm="linear")
    logits = model.predict([expected["encoder_ids"], expected["decoder_ids"]], verbose=0)
    assert np.abs(logits - expected["logits"]).max() <= 1e-4


@pytest.mark.parametrize("layout", ["mesh", "huggingface"])
def test_t5_halves_load_from_the_whole_models_checkpoint(layout, tmp_path):
    """Each half reads its stack from a checkpoint of the whole T5, by bert4keras's names with
    the version ('t5.1.1_encoder'), which a Mesh TensorFlow release's config does not give."""
    expected = np.load(ZOO / "t5.1.1" / "expected.npz")
    if layout == "mesh":
        write_mesh_checkpoint("t5.1.1", tmp_path / "model.ckpt")
        options = dict(checkpoint_path=tmp_path / "model.ckpt", vocab_size=100, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=4, attention_head_size=8,
                       intermediate_size=64, relative_attention_num_buckets=8,
                       relative_attention_max_distance=20)
    else:
        options = dict(config_path=ZOO / "t5.1.1" / "config.json", checkpoint_path=ZOO / "t5.1.1")
    encoder = build_transformer_model(model="t5.1.1_encoder", **options)
    context = encoder.predict(expected["encoder_ids"], verbose=0)
    real = expected["encoder_ids"] != 0
    assert np.abs(context - expected["encoder_output"])[real].max() <= 1e-4
    decoder = build_transformer_model(model="mt5.1.1_decoder", with_lm="linear", **options)
    logits = decoder.predict([context, expected["decoder_ids"]], verbose=0)
    assert np.abs(logits - expected["logits"]).max() <= 1e-4


@pytest.mark.parametrize("family", T5_FAMILIES)
def test_t5_round_trips(family, tmp_path):
    config = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64)
    t5 = build_transformer_model(model=family, return_keras_model=False, **config)
    inputs = [np.array([[5, 6, 7, 0]]), np.array([[0, 8, 9]])]
    expected = t5.model.predict(inputs, verbose=0)
    t5.model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(inputs, verbose=0), expected)
    t5.save_weights_as_checkpoint(tmp_path / "ckpt" / "model.ckpt")
    reloaded = build_transformer_model(checkpoint_path=tmp_path / "ckpt" / "model.ckpt",
                                       model=family, **config)
    np.testing.assert_array_equal(reloaded.predict(inputs, verbose=0), expected)


# -- GPT (GPT-1) --------------------------------------------------------------------------------


def bert_named_gpt(hf_weights):
    """HF OpenAIGPT weights -> the network in BERT's names, fused q/k/v split apart."""
    parts = {"ln_1": "attention/output/LayerNorm", "ln_2": "output/LayerNorm",
             "attn.c_proj": "attention/output/dense", "mlp.c_fc": "intermediate/dense",
             "mlp.c_proj": "output/dense"}
    variables = {}
    for name, value in hf_weights.items():
        name = name.removeprefix("transformer.")
        if name == "tokens_embed.weight":
            variables["bert/embeddings/word_embeddings"] = value
            continue
        if name == "positions_embed.weight":
            variables["bert/embeddings/position_embeddings"] = value
            continue
        block, module, kind = re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name).groups()
        scope = f"bert/encoder/layer_{block}"
        if module == "attn.c_attn":
            for piece, part in zip(np.split(value, 3, axis=-1), ["query", "key", "value"]):
                variables[f"{scope}/attention/self/{part}/{'kernel' if kind == 'weight' else 'bias'}"] = piece
            continue
        norm = module.startswith("ln_")
        suffix = ("gamma" if kind == "weight" else "beta") if norm else \
            ("kernel" if kind == "weight" else "bias")
        variables[f"{scope}/{parts[module]}/{suffix}"] = value
    return variables


def test_gpt_matches_transformers_from_both_layouts(tmp_path):
    expected = np.load(ZOO / "gpt" / "expected.npz")
    model = build_transformer_model(ZOO / "gpt" / "config.json", ZOO / "gpt", model="gpt",
                                    with_lm="linear")
    assert np.abs(model.predict(expected["token_ids"], verbose=0) - expected["logits"]).max() \
        <= 1e-4
    write_tf_checkpoint(tmp_path / "bert_model.ckpt",
                        bert_named_gpt(load_file(ZOO / "gpt" / "model.safetensors")))
    model = build_transformer_model(ZOO / "gpt" / "config.json", tmp_path / "bert_model.ckpt",
                                    model="gpt", with_lm=False)
    assert np.abs(model.predict(expected["token_ids"], verbose=0) - expected["hidden"]).max() \
        <= 1e-4


def test_gpt_round_trips(tmp_path):
    config = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position=64)
    gpt = build_transformer_model(model="gpt", return_keras_model=False, **config)
    ids = np.array([[5, 6, 7, 8]])
    expected = gpt.model.predict(ids, verbose=0)
    gpt.model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(ids, verbose=0), expected)
    gpt.save_weights_as_checkpoint(tmp_path / "ckpt" / "model.ckpt")
    reloaded = build_transformer_model(checkpoint_path=tmp_path / "ckpt" / "model.ckpt",
                                       model="gpt", **config)
    np.testing.assert_array_equal(reloaded.predict(ids, verbose=0), expected)


# -- GPT2-ML ---------------------------------------------------------------------------------------

GPT2_ML_CONFIG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, hidden_act="gelu",
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                      initializer_range=0.014)  # the keys of gpt2-ml's mega.json


def gpt2_ml_release(rng, config):
    """Random weights in gpt2-ml's checkpoint names (Grover's modeling.py scopes)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    shapes = {"newslm/embeddings/word_embed": (config["vocab_size"], h),
              "newslm/embeddings/pos_embed": (config["max_position_embeddings"], h)}
    norms = ["newslm/embeddings/LayerNorm_embed_norm"]
    for n in range(config["num_hidden_layers"]):
        scope = f"newslm/layer{n:02d}"
        for dense in ("query_layer", "key_layer", "value_layer", "context_projection_layer"):
            shapes.update({f"{scope}/{dense}/kernel": (h, h), f"{scope}/{dense}/bias": (h,)})
        shapes.update({f"{scope}/intermediate/kernel": (h, i), f"{scope}/intermediate/bias": (i,),
                       f"{scope}/output/kernel": (i, h), f"{scope}/output/bias": (h,)})
        norms += [f"{scope}/LayerNorm_mlp_ln0", f"{scope}/LayerNorm_mlp_ln1"]
    weights = {name: rng.normal(0, 0.3, shape) for name, shape in shapes.items()}
    for norm in norms:
        weights[f"{norm}/gamma"] = 1 + rng.normal(0, 0.3, h)
        weights[f"{norm}/beta"] = rng.normal(0, 0.3, h)
    return {name: value.astype("float32") for name, value in weights.items()}


def numpy_gpt2_ml(w, ids, heads, layers):
    """Grover's forward pass as gpt2-ml runs it: LN(tokens + positions); each layer
    x = x + attention(x), x = LN1(x + mlp(LN0(x))); next-token probabilities from the tied
    token table. LayerNorm epsilon 1e-5, erf GELU."""
    def norm(x, scope):
        return layer_norm(x, w[f"{scope}/gamma"], w[f"{scope}/beta"], eps=1e-5)

    def dense(x, scope):
        return x @ w[f"{scope}/kernel"] + w[f"{scope}/bias"]

    def split(x):  # [batch, length, hidden] -> [batch, heads, length, size]
        return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3)

    length = ids.shape[1]
    x = w["newslm/embeddings/word_embed"][ids] + w["newslm/embeddings/pos_embed"][:length]
    x = norm(x, "newslm/embeddings/LayerNorm_embed_norm")
    future = np.triu(np.ones((length, length), bool), 1)
    for n in range(layers):
        scope = f"newslm/layer{n:02d}"
        q, k, v = (split(dense(x, f"{scope}/{part}_layer")) for part in ("query", "key", "value"))
        scores = np.where(future, -np.inf, q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]))
        context = softmax(scores) @ v
        context = context.transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + dense(context, f"{scope}/context_projection_layer")
        h = gelu(dense(norm(x, f"{scope}/LayerNorm_mlp_ln0"), f"{scope}/intermediate"))
        x = norm(x + dense(h, f"{scope}/output"), f"{scope}/LayerNorm_mlp_ln1")
    return softmax(x @ w["newslm/embeddings/word_embed"].T)


def test_gpt2_ml_matches_numpy_grover_from_its_release_names(tmp_path):
    weights = gpt2_ml_release(np.random.default_rng(0), GPT2_ML_CONFIG)
    weights["global_step"] = np.array(100000, np.int64)  # as in model.ckpt-100000
    write_tf_checkpoint(tmp_path / "model.ckpt-100000", weights)
    (tmp_path / "config.json").write_text(json.dumps(GPT2_ML_CONFIG))
    model = build_transformer_model(tmp_path / "config.json", tmp_path / "model.ckpt-100000",
                                    model="gpt2_ml")
    ids = np.random.default_rng(1).integers(1, 100, size=(2, 12))
    expected = numpy_gpt2_ml(weights, ids, heads=4, layers=2)
    assert np.abs(model.predict(ids, verbose=0) - expected).max() <= 1e-5
    # A directory holding the run's checkpoint, as bert4keras users point at it.
    np.testing.assert_allclose(
        build_transformer_model(tmp_path / "config.json", tmp_path, model="gpt2_ml")
        .predict(ids, verbose=0), expected, atol=1e-5)


def test_gpt2_ml_round_trips(tmp_path):
    gpt = build_transformer_model(model="gpt2_ml", return_keras_model=False, vocab_size=100,
                                  hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  max_position=64)
    ids = np.array([[5, 6, 7, 8]])
    expected = gpt.model.predict(ids, verbose=0)
    gpt.model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(ids, verbose=0), expected)
    save_weights_as_checkpoint(gpt, tmp_path / "ckpt" / "model.ckpt")
    save_weights_as_safetensors(gpt, tmp_path / "st" / "model.safetensors")  # release names
    for path in (tmp_path / "ckpt" / "model.ckpt", tmp_path / "st"):
        reloaded = build_transformer_model(checkpoint_path=path, model="gpt2_ml", vocab_size=100,
                                           hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, max_position=64)
        np.testing.assert_array_equal(reloaded.predict(ids, verbose=0), expected)
