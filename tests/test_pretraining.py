"""Pretraining: data creation rules (checked on many samples against Google's rules), the TFRecord
files (read back by TensorFlow itself), training on the bundled corpus, exact resume after
SIGKILL/SIGTERM, MultiWorkerMirroredStrategy against one process, and the exported model."""

import collections
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import pretraining
from bert4k import assets, cli
from bert4k.models import build_transformer_model
from bert4k.tokenizers import Tokenizer
from pretraining import data_utils as du
from pretraining import pretraining as pt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

# Training needs a trainer: tf.distribute's (Trainer) or keras.distribution's (JaxTrainer).
trains = pytest.mark.backends("tensorflow", "jax", reason="pretraining has a TensorFlow and a "
                              "JAX training loop, none for PyTorch")


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def cjk_vocab(size):
    """Special tokens plus `size` distinct CJK characters (ids 5 ...)."""
    chars = [chr(0x4E00 + i) for i in range(size)]
    return {t: i for i, t in enumerate(list(du.SPECIAL_TOKENS) + chars)}, chars


def make_vocab(token_dict):
    return du.Vocabulary.from_tokenizer(Tokenizer(token_dict))


def random_documents(chars, rng, count, sentences=(2, 8), length=(3, 30)):
    """Encoded documents of random characters, each character a word of its own."""
    documents = []
    for _ in range(count):
        document = []
        for _ in range(rng.randint(*sentences)):
            ids = [5 + rng.randrange(len(chars)) for _ in range(rng.randint(*length))]
            document.append((ids, [True] * len(ids)))
        documents.append(document)
    return documents


def masking_counts(instances, vocab):
    """Counts of tokens, chosen tokens and the three replacements, from the instances alone."""
    counts = collections.Counter()
    for instance in instances:
        ids, positions, labels = (instance["input_ids"], instance["masked_lm_positions"],
                                  instance["masked_lm_ids"])
        counts["tokens"] += len(ids)
        counts["chosen"] += len(positions)
        for position, label in zip(positions, labels):
            assert label not in (vocab.cls_id, vocab.sep_id)
            if ids[position] == vocab.mask_id:
                counts["mask"] += 1
            elif ids[position] == label:
                counts["keep"] += 1
            else:
                counts["random"] += 1
                assert ids[position] in vocab.random_ids
    return counts


def original_ids(instance):
    """The instance's tokens before masking: the labels put back at the masked positions."""
    ids = list(instance["input_ids"])
    for position, label in zip(instance["masked_lm_positions"], instance["masked_lm_ids"]):
        ids[position] = label
    return ids


def write_corpus(path, documents):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(documents) + "\n")


def read_losses(output_dir):
    """{step: loss}, the last record of each step winning (a resumed run logs steps again)."""
    losses = {}
    with open(os.path.join(output_dir, pt.LOG_FILE), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            losses[record["step"]] = record["loss"]
    return losses


def log_length(output_dir):
    path = os.path.join(output_dir, pt.LOG_FILE)
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def subprocess_env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def cli_pretrain(data_dir, output_dir, steps, *extra):
    model = ["--hidden-size", "32", "--num-layers", "2", "--num-heads", "4",
             "--intermediate-size", "64"]
    return [sys.executable, "-m", "bert4k.cli", "pretrain", "--data", data_dir,
            "--output", output_dir, *model, "--steps", str(steps), "--batch-size", "8",
            "--learning-rate", "1e-3", "--log-every", "1", "--shuffle-buffer", "200",
            "--verbose", "0", *extra]


# ---------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """1,500 reviews of the bundled corpus, one document a line."""
    path = tmp_path_factory.mktemp("corpus") / "reviews.txt"
    write_corpus(path, [text for text, _ in assets.read_sentiment("train", limit=1500)])
    return str(path)


@pytest.fixture(scope="module")
def mlm_data(corpus, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("mlm_data"))
    du.prepare([corpus], directory, objective="mlm", max_seq_length=64,
               max_predictions_per_seq=10, min_count=3, workers=1, verbose=0)
    return directory


@pytest.fixture(scope="module")
def small_data(corpus, tmp_path_factory):
    """Google MLM + NSP pairs of 32 tokens from 500 reviews: for the runs in subprocesses."""
    directory = tmp_path_factory.mktemp("small_data")
    with open(corpus, encoding="utf-8") as f:
        write_corpus(directory / "part.txt", [line.strip() for line in itertools.islice(f, 500)])
    du.prepare([str(directory / "part.txt")], str(directory / "data"), objective="mlm_nsp",
               max_seq_length=32, max_predictions_per_seq=5, min_count=2, workers=1, verbose=0)
    return str(directory / "data")


@pytest.fixture(scope="module")
def trained(mlm_data, tmp_path_factory):
    """A tiny BERT trained 150 steps on the corpus slice (dropout 0.1)."""
    output = str(tmp_path_factory.mktemp("trained"))
    settings = pt.TrainingSettings(steps=150, batch_size=16, learning_rate=3e-3, warmup_steps=20,
                                   log_every=1, checkpoint_every=100, shuffle_buffer=1000, seed=3)
    config = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    trainer_class = pt.JaxTrainer if keras.backend.backend() == "jax" else pt.Trainer
    trainer = trainer_class(config, mlm_data, output, settings, verbose=0)
    return trainer, trainer.run()


# ---------------------------------------------------------------------------------------------------
# Text, vocabulary, TFRecord encoding
# ---------------------------------------------------------------------------------------------------


def test_split_sentences_keeps_punctuation_and_numbers():
    assert du.split_sentences("今天很好。明天呢？“好！”就这样") == ["今天很好。", "明天呢？", "“好！”", "就这样"]
    assert du.split_sentences("It costs 3.5 dollars. Fine!") == ["It costs 3.5 dollars.", "Fine!"]


def test_documents_by_blank_lines_or_by_line(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("a b.\nc d.\n\ne f.\n", encoding="utf-8")
    lines = tmp_path / "lines.txt"
    lines.write_text("一。二。\n三\n", encoding="utf-8")
    assert [d for d, _ in du.iter_documents(blank)] == [["a b.", "c d."], ["e f."]]
    assert [d for d, _ in du.iter_documents(lines)] == [["一。", "二。"], ["三"]]
    bad = tmp_path / "bad.txt"
    bad.write_bytes("好".encode("utf-8")[:2])
    with pytest.raises(ValueError, match="bad.txt: not UTF-8"):
        list(du.iter_documents(bad))


def test_build_vocab_puts_special_tokens_first_and_spells_any_word():
    token_dict = du.build_vocab(["好好 abc。", "好 ab"], min_count=2, do_lower_case=True)
    assert list(token_dict)[:5] == list(du.SPECIAL_TOKENS)
    assert {"好", "a", "##a", "b", "##b"} <= set(token_dict)
    assert "c" not in token_dict and "。" not in token_dict  # seen once
    assert Tokenizer(token_dict).tokenize("bab") == ["[CLS]", "b", "##a", "##b", "[SEP]"]


def test_crc32c_and_examples_are_read_by_tensorflow(tmp_path):
    assert du.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    # Values of one byte, of the looked-up varints (< 16,384) and beyond them, in separate features.
    features = dict(input_ids=[2, 300, 70000, 3], segment_ids=[0, 1, 127], masked_lm_ids=[5, 128, 16383],
                    masked_lm_weights=[1.0, 0.0])
    path = str(tmp_path / "one.tfrecord")
    with open(path, "wb") as f:
        f.write(du.tfrecord(du.encode_example(features)))
    record = next(iter(tf.data.TFRecordDataset(path)))  # TF checks both CRCs
    parsed = tf.io.parse_single_example(record, {
        "input_ids": tf.io.FixedLenFeature([4], tf.int64),
        "segment_ids": tf.io.FixedLenFeature([3], tf.int64),
        "masked_lm_ids": tf.io.FixedLenFeature([3], tf.int64),
        "masked_lm_weights": tf.io.FixedLenFeature([2], tf.float32)})
    for name in ("input_ids", "segment_ids", "masked_lm_ids"):
        assert parsed[name].numpy().tolist() == features[name]
    assert parsed["masked_lm_weights"].numpy().tolist() == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------------
# Masking, whole words, NSP: Google's rules over many samples
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["mlm", "mlm_nsp"])
def test_masking_statistics_match_15_percent_and_80_10_10(objective):
    token_dict, chars = cjk_vocab(2000)
    vocab, rng = make_vocab(token_dict), random.Random(0)
    settings = du.DataSettings(objective, max_seq_length=128, max_predictions_per_seq=40)
    instances = du.create_instances(random_documents(chars, rng, 1500), settings, vocab, rng)
    counts = masking_counts(instances, vocab)
    assert counts["tokens"] > 100_000  # ~19k chosen: 1% is over 3 standard deviations
    assert abs(counts["chosen"] / counts["tokens"] - 0.15) < 0.01
    assert abs(counts["mask"] / counts["chosen"] - 0.8) < 0.01
    assert abs(counts["keep"] / counts["chosen"] - 0.1) < 0.01
    assert abs(counts["random"] / counts["chosen"] - 0.1) < 0.01
    for instance in instances:
        positions = instance["masked_lm_positions"]
        assert positions == sorted(set(positions)) and len(positions) <= 40
        assert len(instance["input_ids"]) <= 128


def test_max_predictions_per_seq_caps_the_masked_tokens():
    token_dict, chars = cjk_vocab(100)
    vocab, rng = make_vocab(token_dict), random.Random(1)
    settings = du.DataSettings("mlm", max_seq_length=128, max_predictions_per_seq=5)
    instances = du.create_instances(random_documents(chars, rng, 100), settings, vocab, rng)
    assert max(len(i["masked_lm_positions"]) for i in instances) == 5


def runs_segmenter(text):
    """A user's word segmenter: a word is a run of one repeated character."""
    return ["".join(group) for _, group in itertools.groupby(text)]


def test_whole_word_masking_never_splits_a_word():
    # Words are runs of one repeated character and neighbouring words differ (documents are
    # apart by [SEP] or a new sequence), so in the original sequence (masked positions given
    # back their labels) every maximal run is exactly one word.
    token_dict, chars = cjk_vocab(300)
    encoder = du.TextEncoder(Tokenizer(token_dict), runs_segmenter)
    rng = random.Random(2)
    documents = []
    for _ in range(300):
        words, previous = [], None
        for _ in range(rng.randint(4, 20)):
            char = rng.choice([c for c in chars if c != previous])
            words.append(char * rng.randint(1, 4))
            previous = char
        cut = rng.randint(1, len(words) - 1)
        documents.append(encoder.encode_document(["".join(words[:cut]), "".join(words[cut:])]))
    settings = du.DataSettings("mlm", max_seq_length=64, max_predictions_per_seq=20)
    instances = du.create_instances(documents, settings, make_vocab(token_dict), rng)
    whole_multi_token_words = 0
    for instance in instances:
        original = original_ids(instance)
        chosen, start = set(instance["masked_lm_positions"]), 0
        for _, group in itertools.groupby(original):
            inside = [p in chosen for p in range(start, start + len(list(group)))]
            start += len(inside)
            assert all(inside) or not any(inside)
            whole_multi_token_words += len(inside) > 1 and all(inside)
    assert whole_multi_token_words > 300


def test_text_encoder_marks_word_starts_of_a_users_segmenter():
    token_dict = {t: i for i, t in enumerate(list(du.SPECIAL_TOKENS) + list("今天气好"))}
    encoder = du.TextEncoder(Tokenizer(token_dict), lambda text: ["今天", " ", "天气", "好"])
    assert encoder.encode("今天 天气好") == ([5, 6, 6, 7, 8], [True, False, True, False, True])
    assert du.default_word_segment("好天气 iPhone12，ok") == ["好", "天", "气", "iPhone12", "，", "ok"]


def test_whole_word_masking_keeps_wordpieces_together():
    # English WordPiece: a '##' piece continues the word before it.
    letters = "abcdefghij"
    tokens = list(du.SPECIAL_TOKENS) + list(letters) + ["##" + c for c in letters]
    token_dict = {t: i for i, t in enumerate(tokens)}
    tokenizer, rng = Tokenizer(token_dict), random.Random(3)
    encoder = du.TextEncoder(tokenizer)
    text = lambda: " ".join("".join(rng.choice(letters) for _ in range(rng.randint(1, 4)))
                            for _ in range(rng.randint(4, 12)))
    documents = [encoder.encode_document([text(), text()]) for _ in range(300)]
    settings = du.DataSettings("mlm_nsp", max_seq_length=48, max_predictions_per_seq=12,
                               short_seq_prob=0.0)
    instances = du.create_instances(documents, settings, make_vocab(token_dict), rng)
    pieces = 0
    for instance in instances:
        original = original_ids(instance)
        chosen = set(instance["masked_lm_positions"])
        for position in range(1, len(original)):
            if tokens[original[position]].startswith("##") and not tokens[original[position - 1]].startswith("["):
                pieces += 1
                assert (position in chosen) == (position - 1 in chosen)
    assert pieces > 1000


def unique_documents(rng, count):
    """Documents whose token ids are all different and increase through the corpus, so where a
    token came from (document, place) can be looked up."""
    documents, next_id = [], 5
    for _ in range(count):
        document = []
        for _ in range(rng.randint(1, 6)):
            ids = list(range(next_id, next_id + rng.randint(2, 8)))
            next_id += len(ids)
            document.append((ids, [True] * len(ids)))
        documents.append(document)
    origin = {i: d for d, document in enumerate(documents) for ids, _ in document for i in ids}
    return documents, origin


def test_nsp_pairs_are_half_random_and_truthful():
    token_dict, _ = cjk_vocab(12_000)
    vocab, rng = make_vocab(token_dict), random.Random(4)
    documents, origin = unique_documents(rng, 400)
    settings = du.DataSettings("mlm_nsp", max_seq_length=32)
    labels = collections.Counter()
    for _ in range(10):
        for instance in du.create_instances(documents, settings, vocab, rng):
            ids, segments = original_ids(instance), instance["segment_ids"]
            a = [i for i, s in zip(ids, segments) if s == 0 and i in origin]
            b = [i for i, s in zip(ids, segments) if s == 1 and i in origin]
            assert ids[0] == vocab.cls_id and ids[len(a) + 1] == vocab.sep_id and ids[-1] == vocab.sep_id
            is_random = instance["next_sentence_labels"] == [1]
            labels[is_random] += 1
            assert {origin[i] for i in a} == {origin[a[0]]}  # A is one document's text
            if is_random:
                assert all(origin[i] != origin[a[0]] for i in b)
            else:  # B is the same document's text after A
                assert all(origin[i] == origin[a[0]] for i in b) and b[0] > a[-1]
    assert abs(labels[True] / sum(labels.values()) - 0.5) < 0.01


def test_gpt_and_unilm_instances_pack_text_in_order():
    token_dict, _ = cjk_vocab(12_000)
    vocab, rng = make_vocab(token_dict), random.Random(5)
    documents, origin = unique_documents(rng, 400)
    gpt = du.create_instances(documents, du.DataSettings("gpt", 48), vocab, rng)
    # The sequences are the corpus cut in pieces, in order, nothing lost or repeated.
    pieces = [[i for i in g["input_ids"] if i in origin] for g in gpt]
    assert all(piece == sorted(piece) for piece in pieces)
    assert sorted(i for piece in pieces for i in piece) == sorted(origin)
    assert all(len(g["input_ids"]) <= 48 and g["input_ids"][0] == vocab.cls_id for g in gpt)
    for instance in du.create_instances(documents, du.DataSettings("unilm", 48), vocab, rng):
        ids, segments = instance["input_ids"], instance["segment_ids"]
        assert segments == sorted(segments) and 0 in segments and 1 in segments
        text = [i for i in ids if i in origin]
        assert text == sorted(text) and len({origin[i] for i in text}) == 1  # B follows A
        assert "masked_lm_positions" not in instance


def test_document_sentences_keep_each_sequence_inside_its_document():
    token_dict, _ = cjk_vocab(12_000)
    vocab, rng = make_vocab(token_dict), random.Random(7)
    documents, origin = unique_documents(rng, 400)

    def sources(ids):
        return {origin[i] for i in ids if i in origin}

    crossing = du.create_instances(documents, du.DataSettings("gpt", 48), vocab, rng)
    assert any(len(sources(g["input_ids"])) > 1 for g in crossing)  # the default crosses
    settings = du.DataSettings("gpt", 48, cross_documents=False)
    gpt = du.create_instances(documents, settings, vocab, rng)
    assert all(len(sources(g["input_ids"])) == 1 for g in gpt)
    assert all(g["input_ids"].count(vocab.sep_id) == 1 for g in gpt)  # no boundary inside
    assert sorted(i for g in gpt for i in g["input_ids"] if i in origin) == sorted(origin)
    settings = du.DataSettings("mlm", 48, cross_documents=False)
    for instance in du.create_instances(documents, settings, vocab, rng):
        ids = list(instance["input_ids"])
        for position, original in zip(instance["masked_lm_positions"], instance["masked_lm_ids"]):
            ids[position] = original
        assert len(sources(ids)) == 1


# ---------------------------------------------------------------------------------------------------
# Shards and reading
# ---------------------------------------------------------------------------------------------------


def test_prepare_in_parallel_writes_what_the_instance_rules_give(corpus, tmp_path):
    info = du.prepare([corpus], str(tmp_path), objective="mlm_nsp", max_seq_length=64,
                      documents_per_shard=400, workers=2, min_count=3, verbose=0)
    assert len(info["shards"]) == 4 and not list(tmp_path.glob("*.partial"))
    chunks = list(du.document_chunks([corpus], 400))
    expected = []
    for index, (documents, _) in enumerate(chunks):
        task = du.ShardTask(index, documents, "", str(tmp_path / "vocab.txt"), False, None,
                            du.DataSettings(**info["settings"]))
        expected.extend(du.shard_instances(task)[0])
    assert info["examples"] == len(expected)
    spec = du.feature_spec(du.read_info(str(tmp_path))["settings"])
    files = [str(tmp_path / shard["file"]) for shard in info["shards"]]
    written = [tf.io.parse_single_example(r, spec) for r in tf.data.TFRecordDataset(files)]
    for record, instance in zip(written, expected):
        length = len(instance["input_ids"])
        assert record["input_ids"].numpy()[:length].tolist() == instance["input_ids"]
        assert not record["input_ids"].numpy()[length:].any()
        count = len(instance["masked_lm_positions"])
        assert record["masked_lm_positions"].numpy()[:count].tolist() == instance["masked_lm_positions"]
        assert record["masked_lm_weights"].numpy().sum() == count
        assert record["next_sentence_labels"].numpy().tolist() == instance["next_sentence_labels"]


def test_parallel_prepare_from_an_unguarded_script_says_how_to_fix_it(corpus, tmp_path):
    # Spawned workers import the calling script: without a __main__ guard each worker would run
    # prepare() again, into the same directory.
    script = tmp_path / "unguarded.py"
    script.write_text("from pretraining import data_utils\n"
                      f"data_utils.prepare([{corpus!r}], {str(tmp_path / 'data')!r}, "
                      "documents_per_shard=400, workers=2, min_count=3, verbose=0)\n")
    result = subprocess.run([sys.executable, str(script)], env=subprocess_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert 'if __name__ == "__main__":' in result.stderr.splitlines()[-1]
    assert not (tmp_path / "data" / du.INFO_FILE).exists()


def stream(data_dir, batches, batch_size, **kwargs):
    dataset = du.load_dataset(data_dir, batch_size, seed=7, shuffle_buffer=300, **kwargs)
    return [b["input_ids"].numpy() for b in itertools.islice(dataset, batches)]


@pytest.mark.parametrize("group", [0, 4], ids=["in_order", "grouped_by_length"])
def test_reading_resumes_at_an_example_and_shards_split_the_global_batch(small_data, group):
    whole = np.concatenate(stream(small_data, 12, 8, group_by_length=group))
    assert np.array_equal(np.concatenate(stream(small_data, 8, 8, start_example=32,
                                                group_by_length=group)), whole[32:])
    # Two pipelines of 4 read, step by step, the 8 examples that one pipeline of 8 reads.
    halves = [stream(small_data, 12, 4, num_shards=2, shard_index=k, group_by_length=group)
              for k in (0, 1)]
    for step, batch in enumerate(np.split(whole, 12)):
        assert np.array_equal(np.concatenate([halves[0][step], halves[1][step]]),
                              np.concatenate([batch[0::2], batch[1::2]]))


@pytest.fixture(scope="module")
def review_data(corpus, tmp_path_factory):
    """MLM sequences of 128 that end with their review: lengths vary from batch to batch."""
    directory = str(tmp_path_factory.mktemp("review_data"))
    du.prepare([corpus], directory, objective="mlm", max_seq_length=128, max_predictions_per_seq=20,
               min_count=3, cross_documents=False, workers=1, verbose=0)
    return directory


def test_trimmed_batches_lose_only_padding(review_data):
    full = du.load_dataset(review_data, 4, seed=7, shuffle_buffer=300)
    trimmed = du.load_dataset(review_data, 4, seed=7, shuffle_buffer=300, length_multiple_of=8)
    lengths = []
    for whole, cut in itertools.islice(zip(full, trimmed), 40):
        ids = whole["input_ids"].numpy()
        longest = max(np.flatnonzero(row).max() + 1 for row in ids)
        length = cut["input_ids"].shape[1]
        assert length % 8 == 0 and longest <= length < longest + 8
        assert not ids[:, length:].any()
        for name, value in whole.items():
            expected = value.numpy()[:, :length] if name in ("input_ids", "segment_ids") else value
            np.testing.assert_array_equal(cut[name].numpy(), expected, err_msg=name)
        lengths.append(length)
    assert len(set(lengths)) > 1 and min(lengths) < 128  # the case the option is for


def test_grouping_by_length_sorts_each_window_and_resumes_inside_one(review_data):
    group, windows = 4, 3
    plain = stream(review_data, group * windows, 4)
    grouped = stream(review_data, group * windows, 4, group_by_length=group)
    rows = lambda batches: sorted(map(tuple, np.concatenate(batches)))  # noqa: E731
    real_lengths = lambda batch: np.count_nonzero(batch, axis=1)  # noqa: E731
    ascending_windows = 0
    for w in range(windows):
        window = grouped[w * group:(w + 1) * group]
        assert rows(window) == rows(plain[w * group:(w + 1) * group])  # the same examples
        spans = [(real_lengths(b).min(), real_lengths(b).max()) for b in window]
        ordered = sorted(spans)
        assert all(low[1] <= high[0] for low, high in zip(ordered, ordered[1:]))  # sorted apart
        ascending_windows += spans == ordered
    assert ascending_windows < windows  # dealt out in a drawn order, not shortest first
    # Resuming at step 6 (the middle of the second window) reads what the run read from there.
    resumed = stream(review_data, 6, 4, group_by_length=group, start_example=6 * 4)
    assert all(np.array_equal(a, b) for a, b in zip(resumed, grouped[6:]))
    # The point: cut to their longest, the grouped batches carry less padding.
    cut = lambda **kw: sum(b.size for b in stream(review_data, 12, 4, length_multiple_of=8, **kw))  # noqa: E731
    assert cut(group_by_length=group) < 0.9 * cut()


def test_resuming_between_batches_is_refused_when_grouping(review_data):
    with pytest.raises(ValueError, match="start_example=6 is not a whole number of batches of 4"):
        du.load_dataset(review_data, 4, start_example=6, group_by_length=4)


# ---------------------------------------------------------------------------------------------------
# Training and the exported model
# ---------------------------------------------------------------------------------------------------


def test_token_term_is_the_weighted_cross_entropy_and_hit_count():
    """Against a brute-force log-softmax and argmax in NumPy (batch 3, 5 predictions, vocab 7)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(3, 5, 7)).astype("float32")
    labels = rng.integers(0, 7, size=(3, 5))
    labels[0, :3] = logits[0, :3].argmax(-1)  # some hits for certain
    weights = rng.integers(0, 2, size=(3, 5)).astype("float32")
    total, count, hits = (float(keras.ops.convert_to_numpy(v)) for v in pt.token_term(labels, logits, weights))
    shifted = logits - logits.max(-1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    chosen = np.take_along_axis(log_probabilities, labels[..., None], -1)[..., 0]
    assert total == pytest.approx(-(chosen * weights).sum(), rel=1e-5)
    assert count == weights.sum()
    assert hits == ((logits.argmax(-1) == labels) * weights).sum() >= 1


@trains
def test_mlm_loss_falls_well_below_ln_vocab(trained, mlm_data):
    trainer, result = trained
    ln_vocab = math.log(du.read_info(mlm_data)["vocab_size"])
    losses = [record["mlm_loss"] for record in result["history"]]
    assert len(losses) == 150 and not result["interrupted"]
    assert abs(losses[0] - ln_vocab) < 0.3  # an untrained model guesses uniformly
    assert np.mean(losses[-20:]) < ln_vocab - 1.2
    assert result["history"][-1]["tokens_per_sec"] > 0


@trains
def test_exported_checkpoint_reproduces_the_training_model(trained, mlm_data):
    trainer, _ = trained
    output = trainer.output_dir
    assert {"bert_config.json", "config.json", "vocab.txt", "bert_model.ckpt.index",
            "model.safetensors"} <= set(os.listdir(output))
    batch = next(du.load_dataset(mlm_data, 4, seed=1).as_numpy_iterator())
    logits = trainer.train_model(trainer.objective.model_inputs(batch))
    logits = logits[0] if isinstance(logits, (list, tuple)) else logits  # a one-output model
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(logits, -1))
    inputs = [batch["input_ids"], batch["segment_ids"]]
    positions = batch["masked_lm_positions"]
    for checkpoint in ("bert_model.ckpt", "model.safetensors"):
        model = build_transformer_model(os.path.join(output, "bert_config.json"),
                                        os.path.join(output, checkpoint), with_mlm=True)
        probabilities = model.predict(inputs, verbose=0)
        gathered = np.take_along_axis(probabilities, positions[..., None], axis=1)
        np.testing.assert_allclose(gathered, expected, atol=1e-5)
    # Google names, as released BERTs have them
    names = dict(tf.train.list_variables(os.path.join(output, "bert_model.ckpt")))
    assert names["bert/embeddings/word_embeddings"] == [trainer.config["vocab_size"], 64]
    assert "cls/predictions/output_bias" in names and "bert/pooler/dense/kernel" in names


@trains
def test_continue_pretraining_from_a_checkpoint(trained, mlm_data, tmp_path):
    trainer, result = trained
    continued = pt.pretrain(os.path.join(trainer.output_dir, "bert_config.json"), mlm_data,
                            str(tmp_path), steps=3, batch_size=16, learning_rate=1e-5, log_every=1,
                            init_checkpoint=os.path.join(trainer.output_dir, "bert_model.ckpt"),
                            verbose=0)
    trained_loss = np.mean([r["mlm_loss"] for r in result["history"][-20:]])
    assert abs(continued["history"][0]["mlm_loss"] - trained_loss) < 0.5


@trains
@pytest.mark.parametrize("objective", ["gpt", "unilm"])
def test_language_models_start_at_ln_vocab_and_export(objective, corpus, tmp_path):
    (tmp_path / "part.txt").write_text("".join(open(corpus, encoding="utf-8").readlines()[:300]),
                                       encoding="utf-8")
    data, out = str(tmp_path / "data"), tmp_path / "out"
    cli.main(["prepare", "--input", str(tmp_path / "part.txt"), "--output", data, "--build-vocab",
              "--min-count", "2", "--objective", objective, "--max-seq-length", "32", "--workers", "1"])
    info = du.read_info(data)
    assert info["settings"].objective == objective
    result = pt.pretrain(TINY_MODEL, data, str(out), steps=2, batch_size=8, log_every=1,
                         shuffle_buffer=100, verbose=0)
    assert abs(result["history"][0]["lm_loss"] - math.log(info["vocab_size"])) < 0.3
    build_transformer_model(str(out / "bert_config.json"), str(out / "bert_model.ckpt"), with_mlm=True)


# ---------------------------------------------------------------------------------------------------
# Interruptions: SIGKILL and SIGTERM, then resume (subprocess and in-process runs)
# ---------------------------------------------------------------------------------------------------


def wait_for(condition, timeout, process=None):
    deadline = time.time() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended (rc {process.returncode}) before it was interrupted")
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def in_thread(function, *args, then=None):
    """Run function(*args), then `then()`, in a thread; its exceptions land in thread.errors."""
    def target():
        try:
            function(*args)
            then and then()
        except Exception as error:  # reported by the test, not lost in the thread
            thread.errors.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.errors = []
    thread.start()
    return thread


def assert_checkpoints_complete(output_dir):
    """Every checkpoint the state file lists reads whole."""
    state = tf.train.get_checkpoint_state(os.path.join(output_dir, pt.CHECKPOINT_DIR))
    assert state is not None and state.all_model_checkpoint_paths
    for path in state.all_model_checkpoint_paths:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)


@pytest.mark.tensorflow_only("Trainer's TF checkpoints; JaxTrainer's resume has its own test")
def test_sigkill_then_sigterm_then_resume_repeats_the_uninterrupted_losses(small_data, tmp_path):
    # Dropout stays on (0.1): its seed states are in the checkpoint, so resuming is exact.
    common = dict(checkpoint_every=5, learning_rate=1e-3, log_every=1, shuffle_buffer=200, seed=0)
    steps, interrupted = 60, str(tmp_path / "interrupted")
    log = open(tmp_path / "killed.log", "wb")  # a file, not a pipe: nobody reads while we train
    process = subprocess.Popen(cli_pretrain(small_data, interrupted, steps, "--checkpoint-every", "5"),
                               env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    checkpoint_state = os.path.join(interrupted, pt.CHECKPOINT_DIR, "checkpoint")
    killer = in_thread(wait_for, lambda: os.path.exists(checkpoint_state) and log_length(interrupted) >= 13,
                       240, process, then=lambda: process.send_signal(signal.SIGKILL))
    try:  # the reference run meanwhile, here
        reference = pt.pretrain(TINY_MODEL, small_data, str(tmp_path / "reference"), steps=steps,
                                batch_size=8, verbose=0, **common)
        killer.join(timeout=300)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert not killer.errors, killer.errors
    assert process.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    killed_at = log_length(interrupted)
    assert_checkpoints_complete(interrupted)
    state = tf.train.get_checkpoint_state(os.path.join(interrupted, pt.CHECKPOINT_DIR))
    saved_step = int(state.model_checkpoint_path.rsplit("-", 1)[1])
    assert 5 <= saved_step <= killed_at
    assert not any(name.startswith("bert_model.ckpt") for name in os.listdir(interrupted))

    # Restart in this process and stop it with SIGTERM: it checkpoints at the step it reached.
    running = threading.Event()
    running.set()
    in_thread(wait_for, lambda: log_length(interrupted) >= killed_at + 10 or not running.is_set(), 240,
              then=lambda: running.is_set() and os.kill(os.getpid(), signal.SIGTERM))
    try:
        stopped = pt.pretrain(TINY_MODEL, small_data, interrupted, steps=steps, batch_size=8,
                              verbose=0, **common)
    finally:
        running.clear()
    assert stopped["interrupted"] and stopped["step"] < steps
    state = tf.train.get_checkpoint_state(os.path.join(interrupted, pt.CHECKPOINT_DIR))
    assert state.model_checkpoint_path.endswith(f"ckpt-{stopped['step']}")
    assert stopped["history"][0]["step"] == saved_step + 1  # resumed at the saved step

    finished = pt.pretrain(TINY_MODEL, small_data, interrupted, steps=steps, batch_size=8,
                           verbose=0, **common)
    assert finished["history"][0]["step"] == stopped["step"] + 1 and not finished["interrupted"]
    expected, resumed = read_losses(str(tmp_path / "reference")), read_losses(interrupted)
    assert sorted(resumed) == sorted(expected) == list(range(1, steps + 1))
    # Same ops on the same data from the same state: equal to float precision (in practice exact).
    np.testing.assert_allclose([resumed[s] for s in expected], [expected[s] for s in expected],
                               rtol=0, atol=1e-6)
    assert reference["history"][-1]["loss"] == pytest.approx(resumed[steps], abs=1e-6)


@pytest.mark.backends("jax", reason="JaxTrainer's .npz checkpoints")
def test_jax_resume_from_a_checkpoint_repeats_the_uninterrupted_losses(small_data, tmp_path):
    # Dropout stays on (0.1): its seed states are in the checkpoint, so resuming is exact.
    common = dict(steps=6, batch_size=8, checkpoint_every=2, keep_checkpoints=2, learning_rate=1e-3,
                  log_every=1, shuffle_buffer=200, seed=0, verbose=0)
    reference = tmp_path / "reference"
    expected = pt.pretrain(TINY_MODEL, small_data, str(reference), **common)["history"]
    checkpoints = reference / pt.CHECKPOINT_DIR
    assert sorted(os.listdir(checkpoints)) == ["ckpt-4.npz", "ckpt-6.npz"]  # keep_checkpoints=2
    # The run as a kill after step 4's checkpoint would have left it: that checkpoint and the
    # log so far, nothing exported.
    stopped = tmp_path / "stopped"
    (stopped / pt.CHECKPOINT_DIR).mkdir(parents=True)
    shutil.copy(checkpoints / "ckpt-4.npz", stopped / pt.CHECKPOINT_DIR)
    shutil.copy(reference / "bert_config.json", stopped)
    resumed = pt.pretrain(TINY_MODEL, small_data, str(stopped), **common)["history"]
    assert [r["step"] for r in resumed] == [5, 6]
    # Same ops on the same data from the same state: equal to float precision.
    for name in ("loss", "mlm_loss", "nsp_loss", "grad_norm", "learning_rate"):
        np.testing.assert_allclose([r[name] for r in resumed], [r[name] for r in expected[4:]],
                                   rtol=0, atol=1e-6, err_msg=name)
    for name in ("bert_model.ckpt.index", "model.safetensors", "vocab.txt", "config.json"):
        assert (stopped / name).exists()


@pytest.mark.backends("torch", reason="the error for a backend without a training loop")
def test_pretraining_on_torch_says_which_backends_train(small_data, tmp_path):
    with pytest.raises(RuntimeError, match="TensorFlow or the JAX backend"):
        pt.pretrain(TINY_MODEL, small_data, str(tmp_path), steps=1, batch_size=8, verbose=0)


def test_each_backend_refuses_the_others_distribution_setting(small_data, tmp_path):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        with pytest.raises(ValueError, match="distribution .* is for the JAX backend"):
            pt.pretrain(TINY_MODEL, small_data, str(tmp_path), steps=1, batch_size=8,
                        distribution="data_parallel", verbose=0)
    elif backend == "jax":
        with pytest.raises(ValueError, match="strategy and tpu .* are for the TensorFlow backend"):
            pt.pretrain(TINY_MODEL, small_data, str(tmp_path), steps=1, batch_size=8,
                        strategy="mirrored", verbose=0)
        with pytest.raises(ValueError, match="distribution must be None, 'data_parallel'"):
            pt.pretrain(TINY_MODEL, small_data, str(tmp_path), steps=1, batch_size=8,
                        distribution="mirrored", verbose=0)
    else:
        pytest.skip("no training loop on this backend")


# ---------------------------------------------------------------------------------------------------
# MultiWorkerMirroredStrategy
# ---------------------------------------------------------------------------------------------------


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.tensorflow_only("tf.distribute.MultiWorkerMirroredStrategy; JAX's DataParallel "
                             "is tested in test_backends")
def test_two_workers_match_one_process_with_the_same_global_batch(small_data, tmp_path):
    steps, workers = 6, []
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    # Dropout off: each replica draws its own masks, which one process cannot reproduce.
    no_dropout = ["--dropout", "0", "--attention-dropout", "0", "--checkpoint-every", "3"]
    logs = [tmp_path / f"worker-{index}.log" for index in range(2)]
    for index, log in enumerate(logs):
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        with open(log, "wb") as output:
            workers.append(subprocess.Popen(
                cli_pretrain(small_data, str(tmp_path / "two"), steps, "--strategy", "multiworker",
                             *no_dropout),
                env=subprocess_env(TF_CONFIG=config), stdout=output, stderr=subprocess.STDOUT))
    try:
        model = dict(TINY_MODEL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        pt.pretrain(model, small_data, str(tmp_path / "one"), steps=steps, batch_size=8,
                    learning_rate=1e-3, log_every=1, shuffle_buffer=200, checkpoint_every=3, verbose=0)
        for worker in workers:
            worker.wait(timeout=300)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, log in zip(workers, logs):
        assert worker.returncode == 0, log.read_text(errors="replace")[-3000:]
    one, two = read_losses(str(tmp_path / "one")), read_losses(str(tmp_path / "two"))
    assert sorted(two) == list(range(1, steps + 1))
    with open(tmp_path / "one" / pt.LOG_FILE, encoding="utf-8") as f:
        first = json.loads(f.readline())  # an untrained model guesses uniformly
    assert abs(first["mlm_loss"] - math.log(du.read_info(small_data)["vocab_size"])) < 0.3
    assert abs(first["nsp_loss"] - math.log(2)) < 0.1
    # Sums over 2 replicas then all-reduced vs one sum: float32 rounding only.
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=0, atol=1e-5)
    assert not any(name.startswith(".worker") for name in os.listdir(tmp_path / "two"))
    two_dir = tmp_path / "two"
    build_transformer_model(str(two_dir / "bert_config.json"), str(two_dir / "bert_model.ckpt"),
                            with_mlm=True, with_nsp=True)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def test_pretrain_command_merges_a_settings_file_and_flags(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"steps": 10, "batch_size": 4, "learning_rate": 0.5,
                                    "config": "mini"}))
    args = cli.build_parser().parse_args(["pretrain", "--data", "d", "--output", "o", "--settings",
                                      str(settings), "--learning-rate", "0.01", "--hidden-size", "96"])
    arguments = pretraining.pretrain_arguments(args)
    assert arguments["config"] == "mini" and arguments["config_overrides"] == {"hidden_size": 96}
    assert (arguments["steps"], arguments["batch_size"], arguments["learning_rate"]) == (10, 4, 0.01)
    with pytest.raises(SystemExit, match="--steps"):
        pretraining.pretrain_arguments(cli.build_parser().parse_args(["pretrain", "--data", "d", "--output", "o"]))


@trains
def test_a_log_record_averages_its_window_of_updates(small_data, tmp_path):
    """With log_every=3 the records come at steps 1, 3, 6; the one at step 6 covers updates 4-6
    of the same run logged at every step (the same seed: the same batches and weights)."""
    common = dict(steps=6, batch_size=8, learning_rate=1e-3, shuffle_buffer=200, seed=0, verbose=0)
    each = pt.pretrain(TINY_MODEL, small_data, str(tmp_path / "each"), log_every=1, **common)["history"]
    windows = pt.pretrain(TINY_MODEL, small_data, str(tmp_path / "windows"), log_every=3,
                          **common)["history"]
    assert [r["step"] for r in windows] == [1, 3, 6]
    last = each[3:6]
    np.testing.assert_allclose(windows[-1]["grad_norm"], np.mean([r["grad_norm"] for r in last]),
                               rtol=1e-5)
    for name in ("mlm_loss", "mlm_accuracy", "nsp_loss"):
        values = [r[name] for r in last]
        # a mean weighted by each update's count of predictions: within the window's range
        assert min(values) - 1e-6 <= windows[-1][name] <= max(values) + 1e-6, name
        if name != "mlm_accuracy":  # it can be 0 for all three updates of a model this young
            assert windows[-1][name] != pytest.approx(values[-1], abs=1e-6), name  # not the last's
    assert windows[0]["mlm_loss"] == pytest.approx(each[0]["mlm_loss"], abs=1e-6)


@trains
def test_trimmed_batches_train_as_padded_ones(review_data, tmp_path):
    """Without dropout the padding changes nothing: the same losses with and without trimming."""
    config = dict(TINY_MODEL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    common = dict(steps=5, batch_size=4, learning_rate=1e-3, shuffle_buffer=300, seed=0,
                  log_every=1, verbose=0)
    batches = du.load_dataset(review_data, 4, seed=0, shuffle_buffer=300, length_multiple_of=8)
    assert min(b["input_ids"].shape[1] for b in itertools.islice(batches, 5)) < 128  # some are cut
    runs = [pt.pretrain(config, review_data, str(tmp_path / str(multiple)),
                        length_multiple_of=multiple, **common)["history"] for multiple in (0, 8)]
    padded, trimmed = ([r["mlm_loss"] for r in history] for history in runs)
    np.testing.assert_allclose(trimmed, padded, rtol=2e-5)
    assert padded[0] != pytest.approx(padded[-1], rel=1e-3)  # the weights did change
