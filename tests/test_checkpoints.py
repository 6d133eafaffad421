"""Checkpoints: the real MiniLM against transformers' outputs, Google checkpoints written by an
independent converter in this file, round trips of our writers, and every kind of bad checkpoint."""

import json
import pathlib
import re
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from safetensors.numpy import load_file, save_file

from bert4k.checkpoints import (
    CheckpointError,
    open_checkpoint,
    save_weights_as_checkpoint,
    save_weights_as_safetensors,
)
from bert4k.models import build_transformer_model
from conftest import write_tf_checkpoint

# Google BERT release names (google-research/bert modeling.py) for Hugging Face BertModel names;
# True where Google keeps the transposed ([in, out]) matrix. Written out here, independently of
# bert4k's own table, so a mistake there cannot cancel itself out.
HF_TO_GOOGLE = {
    "embeddings.word_embeddings.weight": ("bert/embeddings/word_embeddings", False),
    "embeddings.token_type_embeddings.weight": ("bert/embeddings/token_type_embeddings", False),
    "embeddings.position_embeddings.weight": ("bert/embeddings/position_embeddings", False),
    "embeddings.LayerNorm.weight": ("bert/embeddings/LayerNorm/gamma", False),
    "embeddings.LayerNorm.bias": ("bert/embeddings/LayerNorm/beta", False),
    "pooler.dense.weight": ("bert/pooler/dense/kernel", True),
    "pooler.dense.bias": ("bert/pooler/dense/bias", False),
}
HF_LAYER_TO_GOOGLE = {
    "attention.self.query.weight": ("attention/self/query/kernel", True),
    "attention.self.query.bias": ("attention/self/query/bias", False),
    "attention.self.key.weight": ("attention/self/key/kernel", True),
    "attention.self.key.bias": ("attention/self/key/bias", False),
    "attention.self.value.weight": ("attention/self/value/kernel", True),
    "attention.self.value.bias": ("attention/self/value/bias", False),
    "attention.output.dense.weight": ("attention/output/dense/kernel", True),
    "attention.output.dense.bias": ("attention/output/dense/bias", False),
    "attention.output.LayerNorm.weight": ("attention/output/LayerNorm/gamma", False),
    "attention.output.LayerNorm.bias": ("attention/output/LayerNorm/beta", False),
    "intermediate.dense.weight": ("intermediate/dense/kernel", True),
    "intermediate.dense.bias": ("intermediate/dense/bias", False),
    "output.dense.weight": ("output/dense/kernel", True),
    "output.dense.bias": ("output/dense/bias", False),
    "output.LayerNorm.weight": ("output/LayerNorm/gamma", False),
    "output.LayerNorm.bias": ("output/LayerNorm/beta", False),
}


def google_name(hf_name):
    match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", hf_name)
    if match:
        name, transposed = HF_LAYER_TO_GOOGLE[match.group(2)]
        return f"bert/encoder/layer_{match.group(1)}/{name}", transposed
    return HF_TO_GOOGLE[hf_name]


def hf_to_google_checkpoint(safetensors_path, prefix, with_optimizer_slots=True):
    """Convert a HF BertModel file into a Google checkpoint, as TF1 training would have left it."""
    variables = {}
    for hf, value in load_file(safetensors_path).items():
        if hf.endswith("position_ids"):
            continue
        name, transposed = google_name(hf)
        variables[name] = value.T.copy() if transposed else value
        if with_optimizer_slots:
            variables[name + "/adam_m"] = np.zeros_like(variables[name])
            variables[name + "/adam_v"] = np.zeros_like(variables[name])
    if with_optimizer_slots:
        variables["global_step"] = np.array(1000, dtype=np.int64)
    write_tf_checkpoint(prefix, variables)


def minilm_outputs(model, reference):
    probe = keras.Model(model.inputs, [model.get_layer("Transformer-5-FeedForward-Norm").output,
                                       model.output])
    return probe.predict([reference["token_ids"], reference["segment_ids"]], verbose=0)


def assert_matches_reference(model, reference):
    sequence, pooled = minilm_outputs(model, reference)
    real = reference["token_ids"] != 0
    # Real tokens to 1e-4; padded positions (whose outputs nobody uses) to 1e-3.
    assert np.abs(sequence - reference["sequence_output"])[real].max() <= 1e-4
    assert np.abs(sequence - reference["sequence_output"]).max() <= 1e-3
    assert np.abs(pooled - reference["pooled_output"]).max() <= 1e-4


# -- the real MiniLM ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return build_transformer_model(minilm_dir / "config.json", minilm_dir, with_pool=True)


@pytest.mark.slow
def test_minilm_safetensors_matches_transformers(minilm, minilm_reference):
    assert_matches_reference(minilm, minilm_reference)


@pytest.mark.slow
def test_minilm_google_checkpoint_matches_transformers(minilm_dir, minilm_reference, tmp_path):
    prefix = tmp_path / "bert_model.ckpt"
    hf_to_google_checkpoint(minilm_dir / "model.safetensors", prefix)
    model = build_transformer_model(minilm_dir / "config.json", prefix, with_pool=True)
    assert_matches_reference(model, minilm_reference)


@pytest.mark.slow
def test_minilm_prefixed_and_gamma_beta_names_load(minilm_dir, minilm_reference, tmp_path):
    renamed = {}
    for name, value in load_file(minilm_dir / "model.safetensors").items():
        name = re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", name)
        name = re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", name)
        renamed["bert." + name] = value
    path = tmp_path / "renamed.safetensors"
    save_file(renamed, path)
    model = build_transformer_model(minilm_dir / "config.json", path, with_pool=True)
    assert_matches_reference(model, minilm_reference)


@pytest.mark.slow
def test_readme_use_example_runs_on_the_real_minilm(minilm_dir, minilm_reference, tmp_path,
                                                     monkeypatch, capsys):
    """README's "Use" block as written, its files being the MiniLM's (the Google checkpoint
    converted by this file's own converter)."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text("utf-8")
    code = re.search(r"## Use\n\n```python\n(.*?)```", readme, re.S).group(1)
    hf_dir = tmp_path / "hf_dir"
    hf_dir.mkdir()
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        (hf_dir / name).symlink_to(minilm_dir / name)
    (tmp_path / "vocab.txt").symlink_to(minilm_dir / "vocab.txt")
    (tmp_path / "bert_config.json").symlink_to(minilm_dir / "config.json")
    hf_to_google_checkpoint(minilm_dir / "model.safetensors", tmp_path / "bert_model.ckpt")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "[[[" in capsys.readouterr().out  # the printed [1, length, 384] array
    assert namespace["token_ids"].shape == (1, len(namespace["tokenizer"].tokenize("语言模型")))


@pytest.mark.slow
def test_saved_safetensors_uses_hugging_face_names(minilm, minilm_dir, tmp_path):
    path = tmp_path / "model.safetensors"
    save_weights_as_safetensors(minilm, path)
    saved = load_file(path)
    original = {k: v for k, v in load_file(minilm_dir / "model.safetensors").items()
                if not k.endswith("position_ids")}
    assert set(saved) == {"bert." + k for k in original}
    for name, value in original.items():
        np.testing.assert_array_equal(saved["bert." + name], value)


@pytest.mark.slow
def test_saved_google_checkpoint_reloads_exactly(minilm, minilm_dir, minilm_reference, tmp_path):
    prefix = tmp_path / "out" / "bert_model.ckpt"
    save_weights_as_checkpoint(minilm, prefix)
    stored = dict(tf.train.list_variables(str(prefix)))
    expected = {google_name(k)[0] for k in load_file(minilm_dir / "model.safetensors")
                if not k.endswith("position_ids")}
    assert set(stored) == expected
    reloaded = build_transformer_model(minilm_dir / "config.json", prefix, with_pool=True)
    for a, b in zip(minilm_outputs(minilm, minilm_reference),
                    minilm_outputs(reloaded, minilm_reference)):
        np.testing.assert_array_equal(a, b)


# -- heads and the NSP orientation, on a tiny model ------------------------------------------------


def tiny_google_variables(config, rng, layers=None):
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = {
        "bert/embeddings/word_embeddings": (v, h),
        "bert/embeddings/token_type_embeddings": (config["segment_vocab_size"], h),
        "bert/embeddings/position_embeddings": (config["max_position"], h),
        "bert/embeddings/LayerNorm/gamma": (h,),
        "bert/embeddings/LayerNorm/beta": (h,),
        "bert/pooler/dense/kernel": (h, h),
        "bert/pooler/dense/bias": (h,),
        "cls/seq_relationship/output_weights": (2, h),
        "cls/seq_relationship/output_bias": (2,),
        "cls/predictions/transform/dense/kernel": (h, h),
        "cls/predictions/transform/dense/bias": (h,),
        "cls/predictions/transform/LayerNorm/gamma": (h,),
        "cls/predictions/transform/LayerNorm/beta": (h,),
        "cls/predictions/output_bias": (v,),
    }
    for n in range(config["num_hidden_layers"] if layers is None else layers):
        for name, _ in HF_LAYER_TO_GOOGLE.values():
            shapes[f"bert/encoder/layer_{n}/{name}"] = block_shape(name, h, i)
    return {k: rng.normal(size=s).astype("float32") for k, s in shapes.items()}


def block_shape(name, hidden, intermediate):
    if name.startswith("intermediate/"):
        return (hidden, intermediate) if name.endswith("kernel") else (intermediate,)
    if name.startswith("output/dense"):
        return (intermediate, hidden) if name.endswith("kernel") else (hidden,)
    return (hidden, hidden) if name.endswith("kernel") else (hidden,)


def test_google_heads_load_with_nsp_not_transposed(tiny_config, tmp_path):
    variables = tiny_google_variables(tiny_config, np.random.default_rng(0))
    write_tf_checkpoint(tmp_path / "bert_model.ckpt", variables)
    model = build_transformer_model(checkpoint_path=tmp_path / "bert_model.ckpt", with_nsp=True,
                                    with_mlm=True, **tiny_config)
    kernel, bias = model.get_layer("NSP-Proba").get_weights()
    np.testing.assert_array_equal(kernel, variables["cls/seq_relationship/output_weights"].T)
    np.testing.assert_array_equal(bias, variables["cls/seq_relationship/output_bias"])
    ff = model.get_layer("Transformer-1-FeedForward")
    np.testing.assert_array_equal(ff.i0_dense.kernel.numpy(),
                                  variables["bert/encoder/layer_1/intermediate/dense/kernel"])
    np.testing.assert_array_equal(model.get_layer("MLM-Bias").get_weights()[0],
                                  variables["cls/predictions/output_bias"])


def test_fine_tuned_checkpoints_load_and_leave_their_task_heads_unread(tiny_config, tmp_path):
    """run_classifier.py and run_squad.py save their heads beside BERT's variables, and
    transformers' *ForSequenceClassification and *ForQuestionAnswering beside 'bert.': the encoder
    loads, the heads come back as unread; an unknown variable among BERT's own is still an error."""
    h = tiny_config["hidden_size"]
    rng = np.random.default_rng(0)
    variables = tiny_google_variables(tiny_config, rng)
    google_heads = {"output_weights": rng.normal(size=(3, h)).astype("float32"),
                    "output_bias": np.zeros(3, "float32"),
                    "cls/squad/output_weights": rng.normal(size=(2, h)).astype("float32"),
                    "cls/squad/output_bias": np.zeros(2, "float32")}
    write_tf_checkpoint(tmp_path / "classifier.ckpt", {**variables, **google_heads})
    bert = build_transformer_model(return_keras_model=False, with_pool=True, **tiny_config)
    unread = bert.load_weights_from_checkpoint(tmp_path / "classifier.ckpt")
    assert set(google_heads) <= set(unread)
    ff = bert.model.get_layer("Transformer-1-FeedForward")
    np.testing.assert_array_equal(ff.o_dense.kernel.numpy(),
                                  variables["bert/encoder/layer_1/output/dense/kernel"])

    save_weights_as_safetensors(bert.model, tmp_path / "encoder.safetensors")
    hf_heads = {"classifier.weight": np.ones((3, h), "float32"),
                "qa_outputs.bias": np.ones(2, "float32")}
    save_file({**load_file(tmp_path / "encoder.safetensors"), **hf_heads},
              tmp_path / "classifier.safetensors")
    reloaded = build_transformer_model(return_keras_model=False, with_pool=True, **tiny_config)
    assert set(reloaded.load_weights_from_checkpoint(tmp_path / "classifier.safetensors")) \
        >= set(hf_heads)
    np.testing.assert_array_equal(reloaded.model.get_layer("Pooler-Dense").kernel.numpy(),
                                  variables["bert/pooler/dense/kernel"])

    variables["bert/encoder/layer_0/attention/self/relative_positions"] = np.ones(4, "float32")
    write_tf_checkpoint(tmp_path / "variant.ckpt", variables)
    with pytest.raises(CheckpointError, match="1 in the checkpoint but not in the model:\n"
                                              ".*relative_positions"):
        build_transformer_model(checkpoint_path=tmp_path / "variant.ckpt", with_pool=True,
                                **tiny_config)


BERT4KERAS = pathlib.Path(__file__).resolve().parent / "fixtures" / "bert4keras"


def bert4keras_example_model(head="Classifier"):
    """What scripts/make_bert4keras_reference.py built in bert4keras, built in bert4k."""
    from bert4k.layers import ConditionalRandomField

    bert = build_transformer_model(BERT4KERAS / "bert_config.json", return_keras_model=False)
    cls = keras.layers.Lambda(lambda x: x[:, 0], name="CLS-token")(bert.model.output)
    label = keras.layers.Dense(3, activation="softmax", name=head)(cls)
    tags = keras.layers.Dense(5, name="Tagger")(bert.model.output)
    tags = ConditionalRandomField(lr_multiplier=100, name="CRF")(tags)
    return keras.Model(bert.model.inputs, [label, tags])


@pytest.mark.parametrize("saved", ["best_model.weights", "best_model.h5"])
def test_weights_a_bert4keras_script_saved_load_into_the_same_model(saved, tiny_config, tmp_path):
    """tf.keras 2's object checkpoint, and Keras 2's HDF5 (whose sublayers are named dense,
    dense_1, ... and map to q, k, v, o in their order)."""
    from bert4k.checkpoints import load_bert4keras_weights

    expected = np.load(BERT4KERAS / "expected.npz")
    model = bert4keras_example_model()
    load_bert4keras_weights(model, BERT4KERAS / saved)
    label, tags = model.predict([expected["token_ids"], expected["segment_ids"]], verbose=0)
    assert np.abs(label - expected["label"]).max() <= 1e-5
    real = expected["token_ids"] != 0
    assert np.abs(tags - expected["tags"])[real].max() <= 1e-5
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.get_layer("CRF").trans),
                               expected["trans"], rtol=1e-6)

    renamed = bert4keras_example_model(head="Sentiment")
    table = renamed.get_layer("Embedding-Token").weights[0]
    before = keras.ops.convert_to_numpy(table)
    with pytest.raises(CheckpointError, match=r"(?s)missing from the file:\n  Sentiment/kernel"
                                              r".*not in the model:\n  Classifier/kernel"):
        load_bert4keras_weights(renamed, BERT4KERAS / saved)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(table), before)  # nothing assigned
    variables = tiny_google_variables(tiny_config, np.random.default_rng(0))
    write_tf_checkpoint(tmp_path / "bert_model.ckpt", variables)
    with pytest.raises(CheckpointError, match="no layer weights of a Keras model"):
        load_bert4keras_weights(model, tmp_path / "bert_model.ckpt")


def test_tiny_checkpoint_and_safetensors_round_trip(tiny_config, tmp_path):
    model = build_transformer_model(with_nsp=True, with_mlm=True, **tiny_config)
    ids = np.array([[2, 7, 9, 11, 3, 0]], "int32")
    inputs = [ids, np.zeros_like(ids)]
    expected = model.predict(inputs, verbose=0)
    save_weights_as_checkpoint(model, tmp_path / "ckpt" / "bert_model.ckpt")
    save_weights_as_safetensors(model, tmp_path / "hf" / "model.safetensors")
    for path in (tmp_path / "ckpt" / "bert_model.ckpt", tmp_path / "hf"):
        reloaded = build_transformer_model(checkpoint_path=path, with_nsp=True, with_mlm=True,
                                           **tiny_config)
        for a, b in zip(expected, reloaded.predict(inputs, verbose=0)):
            np.testing.assert_array_equal(a, b)


def test_directory_of_checkpoints_opens_the_latest(tiny_config, tmp_path):
    early = tiny_google_variables(tiny_config, np.random.default_rng(0))
    late = tiny_google_variables(tiny_config, np.random.default_rng(1))
    write_tf_checkpoint(tmp_path / "model.ckpt-200", early)
    write_tf_checkpoint(tmp_path / "model.ckpt-1000", late)  # before -200 by name, after by step
    name = "bert/pooler/dense/kernel"
    np.testing.assert_array_equal(open_checkpoint(tmp_path).read(name), late[name])
    # TensorFlow's state file decides where there is one, even with another machine's paths in it.
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/model.ckpt-200"\n'
                                         'all_model_checkpoint_paths: "/elsewhere/model.ckpt-200"\n')
    np.testing.assert_array_equal(open_checkpoint(tmp_path).read(name), early[name])


def test_directory_of_unrelated_checkpoints_asks_for_a_prefix(tiny_config, tmp_path):
    variables = tiny_google_variables(tiny_config, np.random.default_rng(0))
    write_tf_checkpoint(tmp_path / "bert_model.ckpt", variables)
    write_tf_checkpoint(tmp_path / "other.ckpt", variables)
    with pytest.raises(CheckpointError, match="bert_model.ckpt, other.ckpt.*pass the prefix"):
        open_checkpoint(tmp_path)


def _write_shards(directory, tensors, index_name, save):
    """tensors split over two files named by a Hugging Face shard index, as save_pretrained does."""
    names = sorted(tensors)
    halves = {"model-00001-of-00002": names[::2], "model-00002-of-00002": names[1::2]}
    suffix = ".safetensors" if index_name.startswith("model.safetensors") else ".bin"
    weight_map = {}
    for shard, shard_names in halves.items():
        save({n: tensors[n] for n in shard_names}, str(directory / (shard + suffix)))
        weight_map.update({n: shard + suffix for n in shard_names})
    (directory / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("index_name", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_sharded_hugging_face_directory_loads_every_shard(tiny_config, tmp_path, index_name):
    if index_name.startswith("model.safetensors"):
        save = save_file
    else:
        torch = pytest.importorskip("torch")
        def save(tensors, path):
            torch.save({n: torch.from_numpy(v) for n, v in tensors.items()}, path)
    model = build_transformer_model(with_mlm=True, **tiny_config)
    save_weights_as_safetensors(model, tmp_path / "whole.safetensors")
    _write_shards(tmp_path, load_file(tmp_path / "whole.safetensors"), index_name, save)
    ids = np.array([[2, 7, 9, 11, 3, 0]], "int32")
    inputs = [ids, np.zeros_like(ids)]
    reloaded = build_transformer_model(checkpoint_path=tmp_path, with_mlm=True, **tiny_config)
    np.testing.assert_array_equal(model.predict(inputs, verbose=0), reloaded.predict(inputs, verbose=0))
    (tmp_path / "model-00002-of-00002.safetensors").unlink(missing_ok=True)
    (tmp_path / "model-00002-of-00002.bin").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        open_checkpoint(tmp_path)


def test_convert_command_round_trips_and_names_the_heads_it_leaves_out(tiny_config, tmp_path, capsys):
    from bert4k import cli

    variables = tiny_google_variables(tiny_config, np.random.default_rng(0))
    slots = {"bert/pooler/dense/kernel/adam_m": np.ones((32, 32), "float32"),
             "global_step": np.array(7, "int64")}
    write_tf_checkpoint(tmp_path / "bert_model.ckpt", {**variables, **slots})
    config = tmp_path / "bert_config.json"
    config.write_text(json.dumps(dict(
        vocab_size=tiny_config["vocab_size"], hidden_size=tiny_config["hidden_size"],
        num_hidden_layers=tiny_config["num_hidden_layers"], intermediate_size=tiny_config["intermediate_size"],
        num_attention_heads=tiny_config["num_attention_heads"], hidden_act="gelu",
        max_position_embeddings=tiny_config["max_position"], type_vocab_size=2)))

    cli.main(["convert", str(tmp_path / "bert_model.ckpt"), str(tmp_path / "encoder.safetensors"),
              "--config", str(config)])
    message = capsys.readouterr().err
    heads = sorted(n for n in variables if n.startswith(("cls/", "bert/pooler/")))
    assert f"not converted: {len(heads)} variables" in message and heads[0] in message
    assert "adam_m" not in message and "global_step" not in message
    encoder = load_file(tmp_path / "encoder.safetensors")
    for hf_name, value in encoder.items():
        name, transposed = google_name(hf_name[len("bert."):])
        np.testing.assert_array_equal(value, variables[name].T if transposed else variables[name])

    heads_flags = ["--with-pool", "--with-nsp", "--with-mlm"]
    cli.main(["convert", str(tmp_path / "bert_model.ckpt"), str(tmp_path / "hf" / "model.safetensors"),
              "--config", str(config), *heads_flags])
    cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "back" / "bert_model.ckpt"),
              "--config", str(config), *heads_flags])
    assert "not converted" not in capsys.readouterr().err
    back = tf.train.load_checkpoint(str(tmp_path / "back" / "bert_model.ckpt"))
    assert sorted(back.get_variable_to_shape_map()) == sorted(variables)
    for name, value in variables.items():
        np.testing.assert_array_equal(back.get_tensor(name), value)


# -- bad checkpoints --------------------------------------------------------------------------------


def test_every_problem_is_reported_at_once(tiny_config, tmp_path):
    variables = tiny_google_variables(tiny_config, np.random.default_rng(0), layers=3)
    del variables["bert/encoder/layer_0/attention/self/query/bias"]
    variables["bert/pooler/dense/kernel"] = np.zeros((5, 5), "float32")
    write_tf_checkpoint(tmp_path / "bert_model.ckpt", variables)
    with pytest.raises(CheckpointError) as error:
        build_transformer_model(checkpoint_path=tmp_path / "bert_model.ckpt", with_pool=True,
                                **tiny_config)
    message = str(error.value)
    assert "bert/encoder/layer_0/attention/self/query/bias" in message  # missing
    assert "bert/encoder/layer_2/attention/self/query/kernel" in message  # unexpected block
    assert "bert/pooler/dense/kernel: checkpoint shape (5, 5)" in message and "(32, 32)" in message


def test_checkpoint_of_another_size(minilm_dir, tiny_config):
    with pytest.raises(CheckpointError, match=r"word_embeddings.*\(30522, 384\)"):
        build_transformer_model(checkpoint_path=minilm_dir, **tiny_config)


def test_checkpoint_of_another_family(tiny_config, tmp_path):
    albert = {
        "bert/embeddings/word_embeddings": np.zeros((120, 16), "float32"),
        "bert/encoder/transformer/group_0/inner_group_0/attention_1/self/query/kernel":
            np.zeros((32, 32), "float32"),
    }
    write_tf_checkpoint(tmp_path / "albert.ckpt", albert)
    with pytest.raises(CheckpointError, match="group_0/inner_group_0"):
        build_transformer_model(checkpoint_path=tmp_path / "albert.ckpt", **tiny_config)


def test_ignore_invalid_weights_warns_and_loads_the_rest(tiny_config, tmp_path):
    variables = tiny_google_variables(tiny_config, np.random.default_rng(0))
    del variables["bert/pooler/dense/bias"]
    write_tf_checkpoint(tmp_path / "bert_model.ckpt", variables)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_transformer_model(checkpoint_path=tmp_path / "bert_model.ckpt",
                                        with_pool=True, ignore_invalid_weights=True,
                                        **tiny_config)
    assert any("pooler/dense/bias" in str(w.message) for w in caught)
    np.testing.assert_array_equal(model.get_layer("Pooler-Dense").kernel.numpy(),
                                  variables["bert/pooler/dense/kernel"])


def test_truncated_safetensors_names_the_file(tiny_config, tmp_path):
    model = build_transformer_model(**tiny_config)
    path = tmp_path / "model.safetensors"
    save_weights_as_safetensors(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        build_transformer_model(checkpoint_path=path, **tiny_config)


def test_truncated_tf_checkpoint_names_the_file(tiny_config, tmp_path):
    model = build_transformer_model(**tiny_config)
    prefix = tmp_path / "bert_model.ckpt"
    save_weights_as_checkpoint(model, prefix)
    data_file = tmp_path / "bert_model.ckpt.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="bert_model.ckpt"):
        build_transformer_model(checkpoint_path=prefix, **tiny_config)


def test_missing_checkpoint_path(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        build_transformer_model(checkpoint_path=tmp_path / "nothing.ckpt", **tiny_config)
    with pytest.raises(FileNotFoundError, match="No weights in directory"):
        build_transformer_model(checkpoint_path=tmp_path, **tiny_config)


def _malicious_pickle(directory):
    """A pytorch_model.bin whose unpickling runs `touch executed`; returns the marker's path."""
    marker = directory / "executed"
    payload = (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    (directory / "pytorch_model.bin").write_bytes(payload)
    return marker


def test_pytorch_pickle_is_never_unpickled_without_torch(tmp_path, monkeypatch):
    marker = _malicious_pickle(tmp_path)
    # As if torch were not installed (None in sys.modules makes `import torch` fail): torch is in
    # the test environment for the torch backend. Only the reader runs meanwhile; Keras on the
    # torch backend needs torch itself.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match="weights_only=True.*safetensors"):
        open_checkpoint(tmp_path)
    assert not marker.exists()


def test_pytorch_pickle_is_read_only_by_the_safe_loader(tiny_config, tmp_path):
    pytest.importorskip("torch")
    marker = _malicious_pickle(tmp_path)
    with pytest.raises(CheckpointError, match="Cannot read PyTorch weights"):
        build_transformer_model(checkpoint_path=tmp_path, **tiny_config)
    assert not marker.exists()


def test_google_checkpoint_without_tensorflow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "bert_model.ckpt.index").write_bytes(b"")
    # As if TensorFlow were not installed, as it need not be on JAX or PyTorch.
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError, match="needs TensorFlow.*pip install tensorflow-cpu"):
        open_checkpoint(tmp_path / "bert_model.ckpt")


def test_failed_save_leaves_no_files(tiny_config, tmp_path):
    base = build_transformer_model(**tiny_config)
    extended = keras.Model(base.inputs, keras.layers.Dense(2, name="classifier")(base.output))
    with pytest.raises(CheckpointError, match="classifier"):
        save_weights_as_checkpoint(extended, tmp_path / "bert_model.ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_minilm_token_ids_equal_transformers(minilm_dir, minilm_reference):
    from bert4k.snippets import sequence_padding
    from bert4k.tokenizers import Tokenizer

    tokenizer = Tokenizer(str(minilm_dir / "vocab.txt"), do_lower_case=True)
    encoded = [tokenizer.encode(str(a), str(b) or None)
               for a, b in zip(minilm_reference["texts"], minilm_reference["pairs"])]
    token_ids = sequence_padding([ids for ids, _ in encoded])
    segment_ids = sequence_padding([segments for _, segments in encoded])
    np.testing.assert_array_equal(token_ids, minilm_reference["token_ids"])
    np.testing.assert_array_equal(segment_ids, minilm_reference["segment_ids"])
