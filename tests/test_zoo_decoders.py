"""Decoder families against transformers: small random models saved by
scripts/make_zoo_decoder_reference.py, loaded from their safetensors and from checkpoints in the
original release names (written here by an independent mapping)."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from safetensors.numpy import load_file, save_file

from bert4k.checkpoints import save_weights_as_checkpoint
from bert4k.models import build_transformer_model
from conftest import FIXTURES

ZOO = FIXTURES / "zoo"


def write_tf_checkpoint(prefix, variables):
    names = sorted(variables)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(variables[n]) for n in names])


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
