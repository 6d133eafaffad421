"""Smoke tests of the examples: each runs end to end, in-process, on a tiny model (hidden 32,
2 layers) and a few batches of the bundled corpus, and returns a metric in its range. Their
real results, at the default settings, are in each example's docstring.

basic_extract_features is tested for real: on all-MiniLM-L6-v2 its sentence embeddings must equal
sentence-transformers' (tests/fixtures/sentence_embeddings.npz, from
scripts/make_sentence_embedding_reference.py).
"""

import importlib
import json
import math
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bert4k import assets

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(EXAMPLES))

import common  # noqa: E402  (examples/common.py, found through the path above)

TINY_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "hidden_act": "gelu",
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "vocab_size": 3761,
}


def example(name):
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "bert_config.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture
def tiny(tiny_config):
    """Arguments every task example takes: the tiny model, a few batches."""
    return ["--config", str(tiny_config), "--limit", "24", "--epochs", "1", "--batch-size", "8",
            "--maxlen", "24"]


def test_char_vocab_is_the_one_the_builder_makes():
    vocab = common.build_char_vocab(text for text, _ in assets.read_sentiment("train"))
    assert common.CHAR_VOCAB.read_text(encoding="utf-8").split("\n")[:-1] == vocab
    assert json.loads(common.SMALL_CONFIG.read_text())["vocab_size"] == len(vocab)


@pytest.mark.slow
def test_extract_features_equals_sentence_transformers():
    reference = np.load(FIXTURES / "sentence_embeddings.npz")
    assert len(reference["sentences"][-1].split()) > int(reference["max_seq_length"])  # cut
    embeddings = example("basic_extract_features").main([str(s) for s in reference["sentences"]])
    assert embeddings.shape == reference["embeddings"].shape
    assert np.abs(embeddings - reference["embeddings"]).max() <= 1e-4


def test_masked_language_model_loads_a_checkpoint_with_mlm_head(tiny_config, tmp_path):
    from bert4k.checkpoints import save_weights_as_checkpoint
    from bert4k.models import build_transformer_model
    from bert4k.tokenizers import Tokenizer

    module = example("basic_masked_language_model")
    model = build_transformer_model(tiny_config, with_mlm=True)
    save_weights_as_checkpoint(model, tmp_path / "bert_model.ckpt")
    shutil.copy(tiny_config, tmp_path / "bert_config.json")
    shutil.copy(common.CHAR_VOCAB, tmp_path / "vocab.txt")
    argv = ["--config", str(tmp_path / "bert_config.json"), "--checkpoint",
            str(tmp_path / "bert_model.ckpt"), "--vocab", str(tmp_path / "vocab.txt"),
            "--limit", "40", "--maxlen", "24"]
    accuracy = module.main(argv)
    # The saved weights were used: the example's accuracy is the in-memory model's.
    tokenizer = Tokenizer(str(common.CHAR_VOCAB), do_lower_case=True)
    test = module.Generator(assets.read_sentiment("test", limit=4), tokenizer, 24, 32,
                            training=False)
    assert accuracy == pytest.approx(module.masked_accuracy(model, test))


def test_masked_language_model_trains_one_without_checkpoint(tiny, tmp_path, monkeypatch):
    module = example("basic_masked_language_model")
    monkeypatch.setattr(module, "PRETRAINED", tmp_path / "nothing here")
    accuracy = module.main(tiny + ["这家酒店的服务[MASK]好。"])
    assert 0.0 <= accuracy <= 1.0


def test_sentiment_classification(tiny):
    accuracy = example("task_sentiment_classification").main(tiny)
    assert 0.0 <= accuracy <= 1.0


def test_sentence_similarity(tiny):
    accuracy = example("task_sentence_similarity").main(tiny)
    assert 0.0 <= accuracy <= 1.0


def test_sequence_labeling_crf(tiny):
    module = example("task_sequence_labeling_crf")
    assert module.strip_punctuation("好， 很好！！") == (list("好很好"), [1, 0, 3])
    f1 = module.main(tiny + ["这家酒店位置很好服务也不错"])
    assert 0.0 <= f1 <= 1.0


def test_seq2seq_unilm(tiny):
    exact, rouge = example("task_seq2seq_unilm").main(tiny + ["--test-size", "4", "--topk", "2",
                                                              "好很务服"])
    assert 0.0 <= exact <= 1.0 and 0.0 <= rouge <= 1.0


def test_language_model(tiny):
    perplexity = example("task_language_model").main(tiny + ["--samples", "1", "房间"])
    # A barely trained model is close to uniform over the vocabulary, and no worse than that.
    assert math.isfinite(perplexity) and 1.0 < perplexity < 3 * TINY_CONFIG["vocab_size"]


@pytest.mark.tensorflow_only("the main job pretrains (no PyTorch loop), and on JAX its XLA "
                             "compiles take minutes of CI; JaxTrainer and fit on JAX have their "
                             "own tests (test_pretraining, test_backends)")
def test_main_job_pretrains_then_compares_with_random_init(tmp_path, capsys):
    module = example("main_job")
    argv = ["--output", str(tmp_path), "--pretrain-steps", "3", "--pretrain-batch-size", "4",
            "--labels", "16", "--epochs", "1", "--batch-size", "8", "--maxlen", "16",
            "--seeds", "2"]
    results = module.main(argv)
    model_dir = tmp_path / "model"
    for name in ("bert_config.json", "vocab.txt", "bert_model.ckpt.index"):
        assert (model_dir / name).exists(), name
    assert results["pretraining"]["seconds"] > 0
    for run in ("pretrained", "random"):
        assert 0.0 <= results[run]["accuracy"] <= 1.0 and results[run]["tokens_per_sec"] > 0
        assert len(results[run]["accuracies"]) == 2
        assert results[run]["accuracy"] == pytest.approx(np.mean(results[run]["accuracies"]))
    table = capsys.readouterr().out
    assert "fine-tune, pretrained" in table and str(model_dir) in table
    assert "mean of 2" in table and "pretraining gain:" in table
    # The same output again: pretraining is finished, so it is reused, not repeated.
    assert module.main(argv)["pretraining"]["seconds"] is None


def test_main_job_script_imports_no_deep_learning_framework_at_its_top():
    """prepare()'s worker processes import the script (multiprocessing's spawn): each would
    otherwise spend seconds importing TensorFlow for nothing."""
    code = ("import sys; sys.path.insert(0, 'examples'); import main_job; "
            "print(sorted({'keras', 'tensorflow', 'jax', 'torch'} & set(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize("pretrained, random, verdict", [
    ([0.81, 0.83], [0.78, 0.80], "every pretrained run beats every random one"),
    ([0.79, 0.82], [0.83, 0.84], "every random run beats every pretrained one"),
    ([0.80, 0.83], [0.81, 0.82], "the seeds' ranges overlap: not told apart from noise"),
    ([0.90], [0.70], "one seed each: noise not measured, use --seeds 3"),
])
def test_main_job_gain_verdict_compares_the_seeds_ranges(pretrained, random, verdict):
    module = example("main_job")
    assert module.gain_verdict({"accuracies": pretrained}, {"accuracies": random}) == verdict
