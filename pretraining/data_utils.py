"""Pretraining data: raw text -> tokenized, packed, masked instances -> TFRecord shards -> tf.data.

Three layers, each usable alone:

* Instance creation (pure Python, no TensorFlow, testable on many samples): documents of
  sentences are tokenized word by word (so whole-word masking knows the word boundaries), then
  packed into one of four objectives:
    - ``mlm``: RoBERTa-style masked LM: sentences packed across documents up to
      ``max_seq_length`` (documents separated by ``[SEP]``), whole-word masking, no NSP;
    - ``mlm_nsp``: Google BERT: sentence pairs, 50% random next sentence, masked LM;
    - ``gpt``: causal LM on packed sequences (targets are the inputs shifted by one);
    - ``unilm``: seq2seq LM: ``[CLS] A [SEP] B [SEP]`` with B the text that follows A.
  Masking follows google-research/bert's create_pretraining_data.py: ``round(n * 0.15)`` tokens
  (at most ``max_predictions_per_seq``) chosen by whole words in random order, each replaced by
  ``[MASK]`` 80%, kept 10%, a random token 10%; ``[CLS]``/``[SEP]`` are never chosen.
* Writing (``prepare``): text files are read in chunks of documents, each chunk becomes one
  TFRecord shard written by a worker process, with a progress bar; ``dataset.json`` (written
  last) describes the shards. The feature names are Google's, so its run_pretraining.py reads
  our ``mlm_nsp`` shards too.
* Reading (``load_dataset``): a tf.data stream of the shards (interleave, shuffle, repeat, batch,
  prefetch) whose order depends only on the seed, so the position after ``n`` examples is found
  again by skipping ``n`` examples: resuming needs only the step number, on any strategy.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import importlib
import json
import multiprocessing
import os
import random
import shutil
import struct

import regex

from bert4k.tokenizers import Tokenizer, load_vocab, save_vocab

OBJECTIVES = ("mlm", "mlm_nsp", "gpt", "unilm")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
INFO_FILE = "dataset.json"
VOCAB_FILE = "vocab.txt"


# ---------------------------------------------------------------------------------------------------
# Raw text
# ---------------------------------------------------------------------------------------------------

# A sentence ends after a run of end punctuation (and closing quotes or brackets); a Latin full
# stop only when a space follows, so "3.5" and "e.g" stay whole.
SENTENCE_END = regex.compile(r"(?:[。！？!?；;…]+|\.(?=\s))[”’」』\"')）]*\s*")


def split_sentences(text):
    """The sentences of one line of text, each keeping its final punctuation."""
    sentences, start = [], 0
    for match in SENTENCE_END.finditer(text):
        sentences.append(text[start:match.end()].strip())
        start = match.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def text_lines(path):
    """Yield (line, bytes read so far) of a UTF-8 file; a decoding error names the file."""
    consumed = 0
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            for line in f:
                consumed += len(line.encode("utf-8"))
                yield line, consumed
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}).") from None


def detect_format(path):
    """'blank_lines' when the file has a blank line between text lines (Google's format: one
    sentence a line, documents separated by blank lines), else 'lines' (one document a line)."""
    seen_text = False
    for line, _ in text_lines(path):
        if line.strip():
            seen_text = True
        elif seen_text:
            return "blank_lines"
    return "lines"


def iter_documents(path, document_format="auto"):
    """Yield (document, bytes read so far): a document is a list of sentences.

    'blank_lines': each line is a sentence, a blank line ends the document. 'lines': each line is
    a document, split into sentences by punctuation. 'auto' picks one by looking at the file.
    """
    if document_format == "auto":
        document_format = detect_format(path)
    if document_format not in ("blank_lines", "lines"):
        raise ValueError(f"document_format must be 'auto', 'blank_lines' or 'lines', got {document_format!r}.")
    document, consumed = [], 0
    for line, consumed in text_lines(path):
        line = line.strip()
        if document_format == "lines":
            if line:
                yield split_sentences(line), consumed
        elif line:
            document.append(line)
        elif document:
            yield document, consumed
            document = []
    if document:
        yield document, consumed


# ---------------------------------------------------------------------------------------------------
# Vocabulary and words
# ---------------------------------------------------------------------------------------------------


def _is_cjk(ch):
    return Tokenizer._is_cjk_character(ch)


def build_vocab(texts, min_count=1, max_size=None, do_lower_case=False):
    """A character-level WordPiece vocabulary for training from scratch (Chinese in particular).

    Special tokens come first ([PAD]=0, [UNK], [CLS], [SEP], [MASK]); then characters seen at least
    `min_count` times, most frequent first, up to `max_size` tokens in all. A non-CJK letter or
    digit also gets its '##' continuation form, so WordPiece can spell any word of such
    characters (CJK characters and punctuation are always single tokens).
    """
    counts = collections.Counter()
    for text in texts:
        counts.update(ch for ch in (text.lower() if do_lower_case else text)
                      if not ch.isspace() and ch.isprintable())
    tokens = list(SPECIAL_TOKENS)
    for ch, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if count < min_count:
            break
        tokens.append(ch)
        if not _is_cjk(ch) and not Tokenizer._is_punctuation(ch):
            tokens.append("##" + ch)
        if max_size and len(tokens) >= max_size:
            break
    return {token: index for index, token in enumerate(tokens[:max_size] if max_size else tokens)}


# A word: a run of non-CJK letters, digits and combining marks, or any other single visible
# character (each CJK character and punctuation mark is a word of its own).
DEFAULT_WORD = regex.compile(r"[\p{L}\p{N}\p{M}]+|\S")


def default_word_segment(text):
    """The built-in word segmenter: BERT's own word boundaries (whitespace and punctuation; every
    CJK character alone). For Chinese whole words give a real segmenter such as jieba.lcut."""
    words = []
    for match in DEFAULT_WORD.finditer(text):
        word = match.group()
        if any(_is_cjk(ch) for ch in word):
            words.extend(regex.findall(r"\p{Han}|[^\p{Han}]+", word))
        else:
            words.append(word)
    return words


def resolve_word_segmenter(segmenter=None):
    """A function text -> list of words: None (built-in), a callable, 'jieba' (jieba.lcut, when
    installed) or 'module:function'."""
    if segmenter is None or segmenter == "default":
        return default_word_segment
    if callable(segmenter):
        return segmenter
    name = "jieba:lcut" if segmenter == "jieba" else segmenter
    module_name, _, function_name = name.partition(":")
    if not function_name:
        raise ValueError(f"word segmenter {segmenter!r}: expected 'jieba' or 'module:function'.")
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load word segmenter {segmenter!r}: {e}") from None


class TextEncoder:
    """Tokenizes sentences word by word: returns (token_ids, word_starts), word_starts[i] True
    where token i begins a word, so whole-word masking can keep each word's pieces together."""

    def __init__(self, tokenizer, word_segment=default_word_segment, cache_size=200_000):
        self.tokenizer = tokenizer
        self.word_segment = word_segment
        self.cache_size = cache_size
        self._cache = {}

    def word_ids(self, word):
        ids = self._cache.get(word)
        if ids is None:
            ids = self.tokenizer.encode(word)[0][1:-1]  # without [CLS] and [SEP]
            if len(self._cache) < self.cache_size:
                self._cache[word] = ids
        return ids

    def encode(self, sentence):
        token_ids, starts = [], []
        for word in self.word_segment(sentence):
            ids = self.word_ids(word.strip())
            if not ids:  # a segmenter may return spaces
                continue
            token_ids.extend(ids)
            starts.extend([True] + [False] * (len(ids) - 1))
        return token_ids, starts

    def encode_document(self, sentences):
        """The document's non-empty sentences as (token_ids, word_starts) pairs."""
        encoded = (self.encode(sentence) for sentence in sentences)
        return [sentence for sentence in encoded if sentence[0]]


# ---------------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """The ids instance creation needs."""

    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int
    random_ids: tuple  # replacement candidates for the 10% random tokens: every non-special token

    @classmethod
    def from_tokenizer(cls, tokenizer):
        token_dict = tokenizer._token_dict
        missing = [t for t in SPECIAL_TOKENS if t not in token_dict]
        if missing:
            raise ValueError(f"the vocabulary lacks the special tokens {missing}.")
        random_ids = tuple(i for t, i in sorted(token_dict.items(), key=lambda item: item[1])
                           if not Tokenizer._is_special(t))
        return cls(token_dict["[CLS]"], token_dict["[SEP]"], token_dict["[MASK]"],
                   token_dict["[PAD]"], random_ids)


@dataclasses.dataclass(frozen=True)
class MaskingSettings:
    masked_lm_prob: float = 0.15
    max_predictions_per_seq: int = 20
    whole_word_mask: bool = True


def word_spans(token_ids, word_starts, special_ids, whole_word=True):
    """[(start, end)] of the maskable words: runs that begin where word_starts is True (or at a
    position cut by truncation), special tokens excluded. Without whole_word, every token alone."""
    spans = []
    for index, token_id in enumerate(token_ids):
        if token_id in special_ids:
            continue
        if whole_word and spans and not word_starts[index] and spans[-1][1] == index:
            spans[-1] = (spans[-1][0], index + 1)
        else:
            spans.append((index, index + 1))
    return spans


def mask_tokens(token_ids, spans, rng, vocab, settings):
    """Google's masked-LM rule; returns (masked_ids, positions, labels), positions ascending.

    round(len * masked_lm_prob) tokens (len counts [CLS]/[SEP], as Google does; at least 1, at
    most max_predictions_per_seq) are taken word by word in random order, skipping any word that
    would overshoot, so a word is always masked whole. Each taken token becomes [MASK] with
    probability 0.8, stays itself 0.1, or becomes a random non-special token 0.1.
    """
    target = min(settings.max_predictions_per_seq,
                 max(1, int(round(len(token_ids) * settings.masked_lm_prob))))
    spans = list(spans)
    rng.shuffle(spans)
    chosen = []
    for start, end in spans:
        if len(chosen) >= target:
            break
        if len(chosen) + end - start > target:
            continue
        chosen.extend(range(start, end))
    masked = list(token_ids)
    for position in chosen:
        draw = rng.random()
        if draw < 0.8:
            masked[position] = vocab.mask_id
        elif draw >= 0.9:
            masked[position] = vocab.random_ids[rng.randrange(len(vocab.random_ids))]
    positions = sorted(chosen)
    return masked, positions, [token_ids[p] for p in positions]


def masked_instance(token_ids, word_starts, segment_ids, rng, vocab, settings, **extra):
    special = {vocab.cls_id, vocab.sep_id}
    spans = word_spans(token_ids, word_starts, special, settings.whole_word_mask)
    masked, positions, labels = mask_tokens(token_ids, spans, rng, vocab, settings)
    return dict(input_ids=masked, segment_ids=segment_ids, masked_lm_positions=positions,
                masked_lm_ids=labels, **extra)


# ---------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------


def split_long(sentence, capacity):
    """Cut a sentence longer than `capacity` tokens into pieces, at word starts where possible."""
    ids, starts = sentence
    pieces = []
    while len(ids) > capacity:
        cut = max((i for i in range(1, capacity + 1) if i < len(ids) and starts[i]), default=capacity)
        pieces.append((ids[:cut], starts[:cut]))
        ids, starts = ids[cut:], [True] + starts[cut + 1:]
    pieces.append((ids, starts))
    return pieces


def target_length(capacity, rng, short_seq_prob):
    """Google's short_seq_prob: sometimes a shorter target, so fine-tuning's short inputs are
    seen in pretraining too."""
    if rng.random() < short_seq_prob:
        return rng.randint(2, capacity)
    return capacity


def pack_documents(documents, max_seq_length, rng, vocab, short_seq_prob=0.0, cross_documents=True):
    """Yield (token_ids, word_starts) of `[CLS] ... [SEP]` sequences of whole sentences:
    RoBERTa's FULL-SENTENCES packing, crossing documents with a [SEP] between them, or with
    `cross_documents=False` its DOC-SENTENCES, where a sequence ends with its document (shorter
    sequences, padded later, but every token's context is its own document)."""
    capacity = max_seq_length - 2
    ids, starts = [], []
    target = target_length(capacity, rng, short_seq_prob)

    def finish():
        return [vocab.cls_id] + ids + [vocab.sep_id], [True] + starts + [True]

    for document in documents:
        if ids and not cross_documents:
            yield finish()
            ids, starts = [], []
            target = target_length(capacity, rng, short_seq_prob)
        if ids and len(ids) + 1 < target:  # a document boundary inside the sequence
            ids.append(vocab.sep_id)
            starts.append(True)
        for sentence in document:
            for piece_ids, piece_starts in split_long(sentence, capacity):
                if ids and len(ids) + len(piece_ids) > target:
                    yield finish()
                    ids, starts = [], []
                    target = target_length(capacity, rng, short_seq_prob)
                ids, starts = ids + piece_ids, starts + piece_starts
    if ids:
        yield finish()


def _concat(sentences):
    ids, starts = [], []
    for sentence_ids, sentence_starts in sentences:
        ids += sentence_ids
        starts += sentence_starts
    return ids, starts


def truncate_pair(a, b, max_tokens, rng):
    """Google's truncate_seq_pair: drop tokens of the longer side, front or back at random."""
    a_ids, a_starts = list(a[0]), list(a[1])
    b_ids, b_starts = list(b[0]), list(b[1])
    while len(a_ids) + len(b_ids) > max_tokens:
        ids, starts = (a_ids, a_starts) if len(a_ids) > len(b_ids) else (b_ids, b_starts)
        if rng.random() < 0.5:
            del ids[0], starts[0]
        else:
            ids.pop()
            starts.pop()
    return (a_ids, a_starts), (b_ids, b_starts)


def random_document_index(count, exclude, rng):
    index = rng.randrange(count - 1)
    return index + 1 if index >= exclude else index


def sentence_pairs(documents, document_index, rng, max_seq_length, short_seq_prob, random_next_prob):
    """Google's create_instances_from_document: yield (A, B, is_random_next) from one document.

    Sentences are gathered into a chunk of about the target length; A is its first 1..n-1
    sentences and B the rest, or (with random_next_prob) text from a random other document, the
    unused sentences going back. Unlike Google, the coin is thrown before looking at the chunk:
    a one-sentence chunk whose coin says "actual next" is cut inside (B still is the text that
    follows A), so labels stay 50/50 even on corpora of one-sentence documents.
    """
    document = documents[document_index]
    max_tokens = max_seq_length - 3
    target = target_length(max_tokens, rng, short_seq_prob)
    chunk, length, i = [], 0, 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i][0])
        if i == len(document) - 1 or length >= target:
            is_random_next = len(documents) > 1 and rng.random() < random_next_prob
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) > 1 else 1
            a = _concat(chunk[:a_end])
            if is_random_next:
                b = random_text(documents, document_index, target - len(a[0]), rng)
                i -= len(chunk) - a_end  # the unused sentences start the next chunk
            elif len(chunk) > 1:
                b = _concat(chunk[a_end:])
            else:
                a, b = cut_inside(a, rng)
            if a[0] and b[0]:
                a, b = truncate_pair(a, b, max_tokens, rng)
                yield a, b, is_random_next
            chunk, length = [], 0
            target = target_length(max_tokens, rng, short_seq_prob)
        i += 1


def random_text(documents, document_index, length, rng):
    other = documents[random_document_index(len(documents), document_index, rng)]
    start = rng.randrange(len(other))
    sentences, total = [], 0
    for sentence in other[start:]:
        sentences.append(sentence)
        total += len(sentence[0])
        if total >= length:
            break
    return _concat(sentences)


def cut_inside(sentence, rng):
    """Split one sentence into (A, B) at a random word start (any token when it is one word)."""
    ids, starts = sentence
    cuts = [i for i in range(1, len(ids)) if starts[i]] or list(range(1, len(ids)))
    if not cuts:
        return sentence, ([], [])
    cut = rng.choice(cuts)
    return (ids[:cut], starts[:cut]), (ids[cut:], [True] + starts[cut + 1:])


def pair_sequence(a, b, vocab):
    ids = [vocab.cls_id] + a[0] + [vocab.sep_id] + b[0] + [vocab.sep_id]
    starts = [True] + a[1] + [True] + b[1] + [True]
    segments = [0] * (len(a[0]) + 2) + [1] * (len(b[0]) + 1)
    return ids, starts, segments


# ---------------------------------------------------------------------------------------------------
# Instances per objective
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Everything that decides what a shard holds (saved in dataset.json)."""

    objective: str = "mlm"
    max_seq_length: int = 128
    masked_lm_prob: float = 0.15
    max_predictions_per_seq: int = 20
    whole_word_mask: bool = True
    short_seq_prob: float = 0.1
    dupe_factor: int = 1
    seed: int = 12345
    cross_documents: bool = True  # MLM and GPT packing: see pack_documents

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.max_seq_length < 8:
            raise ValueError(f"max_seq_length={self.max_seq_length} is too short (at least 8).")

    @property
    def masking(self):
        return MaskingSettings(self.masked_lm_prob, self.max_predictions_per_seq, self.whole_word_mask)

    @property
    def feature_lengths(self):
        """{feature: length} of each TFRecord example, Google's names."""
        lengths = dict(input_ids=self.max_seq_length, input_mask=self.max_seq_length,
                       segment_ids=self.max_seq_length)
        if self.objective in ("mlm", "mlm_nsp"):
            predictions = self.max_predictions_per_seq
            lengths.update(masked_lm_positions=predictions, masked_lm_ids=predictions,
                           masked_lm_weights=predictions)
        if self.objective == "mlm_nsp":
            lengths["next_sentence_labels"] = 1
        return lengths


def create_instances(documents, settings, vocab, rng):
    """Every instance of the objective from encoded documents (lists of (ids, starts)), for
    `dupe_factor` passes with fresh masks and pairings, shuffled as Google does."""
    documents = [document for document in documents if document]
    instances = []
    for _ in range(settings.dupe_factor):
        instances.extend(INSTANCE_MAKERS[settings.objective](documents, settings, vocab, rng))
    rng.shuffle(instances)
    return instances


def mlm_instances(documents, settings, vocab, rng):
    for ids, starts in pack_documents(documents, settings.max_seq_length, rng, vocab,
                                      settings.short_seq_prob, settings.cross_documents):
        yield masked_instance(ids, starts, [0] * len(ids), rng, vocab, settings.masking)


def nsp_instances(documents, settings, vocab, rng):
    if len(documents) < 2:
        raise ValueError("the NSP objective needs at least two documents per shard.")
    for index in range(len(documents)):
        for a, b, is_random in sentence_pairs(documents, index, rng, settings.max_seq_length,
                                              settings.short_seq_prob, random_next_prob=0.5):
            ids, starts, segments = pair_sequence(a, b, vocab)
            yield masked_instance(ids, starts, segments, rng, vocab, settings.masking,
                                  next_sentence_labels=[int(is_random)])


def gpt_instances(documents, settings, vocab, rng):
    for ids, _ in pack_documents(documents, settings.max_seq_length, rng, vocab,
                                 settings.short_seq_prob, settings.cross_documents):
        yield dict(input_ids=ids, segment_ids=[0] * len(ids))


def unilm_instances(documents, settings, vocab, rng):
    for index in range(len(documents)):
        for a, b, _ in sentence_pairs(documents, index, rng, settings.max_seq_length,
                                      settings.short_seq_prob, random_next_prob=0.0):
            ids, _, segments = pair_sequence(a, b, vocab)
            yield dict(input_ids=ids, segment_ids=segments)


INSTANCE_MAKERS = {"mlm": mlm_instances, "mlm_nsp": nsp_instances, "gpt": gpt_instances,
                   "unilm": unilm_instances}


def padded_features(instance, settings, pad_id=0):
    """{feature: fixed-length list}: Google's layout (input_mask 1 on real tokens; masked-LM
    lists padded with position 0, id 0, weight 0)."""
    length = len(instance["input_ids"])
    features = dict(instance, input_mask=[1] * length)
    if "masked_lm_positions" in instance:
        features["masked_lm_weights"] = [1.0] * len(instance["masked_lm_positions"])
    padded = {}
    for name, size in settings.feature_lengths.items():
        values = list(features[name])
        pad = pad_id if name == "input_ids" else 0
        padded[name] = values + [pad] * (size - len(values))
    return padded


# ---------------------------------------------------------------------------------------------------
# Writing shards
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShardTask:
    index: int
    documents: list  # raw documents: lists of sentence strings
    path: str
    vocab_path: str
    do_lower_case: bool
    word_segmenter: object
    settings: DataSettings


@functools.lru_cache(maxsize=4)
def _text_encoder(vocab_path, do_lower_case, word_segmenter):
    tokenizer = Tokenizer(vocab_path, do_lower_case=do_lower_case)
    return TextEncoder(tokenizer, resolve_word_segmenter(word_segmenter))


def shard_instances(task):
    encoder = _text_encoder(task.vocab_path, task.do_lower_case, task.word_segmenter)
    vocab = Vocabulary.from_tokenizer(encoder.tokenizer)
    documents = [encoder.encode_document(document) for document in task.documents]
    rng = random.Random(f"{task.settings.seed}:{task.index}")
    return create_instances(documents, task.settings, vocab, rng), vocab


def write_shard(task):
    """Create one shard's instances and write them to task.path (via a temporary name, so a
    shard file is whole or absent). Returns (index, examples, tokens, masked tokens)."""
    instances, vocab = shard_instances(task)
    partial = task.path + ".partial"
    tokens = predictions = 0
    with open(partial, "wb") as f:
        for instance in instances:
            f.write(tfrecord(encode_example(padded_features(instance, task.settings, vocab.pad_id))))
            tokens += len(instance["input_ids"])
            predictions += len(instance.get("masked_lm_positions", ()))
    os.replace(partial, task.path)
    return task.index, len(instances), tokens, predictions


# TFRecord files of tf.train.Example protos, written without TensorFlow: a worker process that
# imported TensorFlow would spend seconds on the import alone. Formats: TFRecord is
# (length u64, masked crc32c of length, data, masked crc32c of data); an Example is the protobuf
# Example{features: Features{map<string, Feature>}} with packed Int64List / FloatList values.


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


CRC32C_TABLE = _crc32c_table()


def crc32c(data):
    crc, table = 0xFFFFFFFF, CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data):
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _varint(value):
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Varints of every id of a vocabulary up to 16,384 tokens, looked up: a shard holds millions of
# values, and encoding each in Python took half of prepare()'s time.
_VARINT_TABLE = [_varint(value) for value in range(1 << 14)]


def _packed_varints(values):
    if not values:
        return b""
    smallest, largest = min(values), max(values)
    if smallest >= 0 and largest < 0x80:  # one byte each: the value itself
        return bytes(values)
    if smallest >= 0 and largest < len(_VARINT_TABLE):
        return b"".join([_VARINT_TABLE[v] for v in values])
    return b"".join(_varint(v) for v in values)


def _field(number, payload):
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(features):
    """A serialized tf.train.Example: masked_lm_weights as floats, everything else int64."""
    entries = b""
    for name, values in features.items():
        if name == "masked_lm_weights":
            feature = _field(2, _field(1, struct.pack(f"<{len(values)}f", *values)))
        else:
            feature = _field(3, _field(1, _packed_varints(values)))
        entries += _field(1, _field(1, name.encode()) + _field(2, feature))
    return _field(1, entries)


def document_chunks(paths, documents_per_shard, document_format="auto"):
    """Yield (documents, bytes of input they came from), `documents_per_shard` at a time."""
    chunk, previous = [], 0
    for path in paths:
        consumed = 0
        for document, consumed in iter_documents(path, document_format):
            chunk.append(document)
            if len(chunk) >= documents_per_shard:
                yield chunk, consumed - previous
                chunk, previous = [], consumed
        previous -= os.path.getsize(path)  # the next file's offsets start at 0 again
    if chunk:
        yield chunk, -previous


def prepare(inputs, output_dir, vocab=None, objective="mlm", max_seq_length=128,
            masked_lm_prob=0.15, max_predictions_per_seq=20, whole_word_mask=True,
            short_seq_prob=0.1, dupe_factor=1, seed=12345, cross_documents=True,
            do_lower_case=False, word_segmenter=None, documents_per_shard=5000, workers=None,
            document_format="auto", min_count=1, max_vocab_size=None, verbose=1):
    """Turn text files into TFRecord shards under output_dir; return the dataset info.

    vocab: a vocab.txt path, or None to build a character vocabulary from the inputs
    (`build_vocab` with min_count / max_vocab_size). word_segmenter: None (built-in), 'jieba',
    'module:function' or a picklable function text -> words. workers: processes writing shards
    in parallel (default: the CPU count; 1 writes in this process). Each shard holds
    `documents_per_shard` documents; NSP draws its random sentences from the same shard.
    cross_documents: see `pack_documents` (MLM and GPT; NSP and UniLM pairs keep to a document).
    """
    refuse_in_worker_bootstrap()
    paths = [os.fspath(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input text file not found: {path!r}")
    settings = DataSettings(objective, max_seq_length, masked_lm_prob, max_predictions_per_seq,
                            whole_word_mask, short_seq_prob, dupe_factor, seed, cross_documents)
    os.makedirs(output_dir, exist_ok=True)
    vocab_path = install_vocab(paths, output_dir, vocab, document_format, min_count,
                               max_vocab_size, do_lower_case)
    resolve_word_segmenter(word_segmenter)  # fail here, not in a worker
    tasks = (
        (ShardTask(index, documents, os.path.join(output_dir, f"part-{index:05d}.tfrecord"),
                   vocab_path, do_lower_case, word_segmenter, settings), size)
        for index, (documents, size) in enumerate(
            document_chunks(paths, documents_per_shard, document_format))
    )
    results = run_tasks(tasks, workers or os.cpu_count() or 1,
                        total_bytes=sum(os.path.getsize(p) for p in paths), verbose=verbose)
    token_dict = load_vocab(vocab_path)
    segmenter_name = word_segmenter if isinstance(word_segmenter, (str, type(None))) else repr(word_segmenter)
    info = dict(
        settings=dataclasses.asdict(settings), vocab_file=VOCAB_FILE, vocab_size=len(token_dict),
        pad_id=token_dict["[PAD]"], do_lower_case=do_lower_case, word_segmenter=segmenter_name,
        shards=[dict(file=os.path.basename(r["path"]), examples=r["examples"]) for r in results],
        examples=sum(r["examples"] for r in results), tokens=sum(r["tokens"] for r in results),
        masked_tokens=sum(r["predictions"] for r in results),
    )
    write_json_atomic(os.path.join(output_dir, INFO_FILE), info)
    return info


def install_vocab(paths, output_dir, vocab, document_format, min_count, max_size, do_lower_case):
    """Copy the given vocab, or build one from the inputs, to output_dir/vocab.txt."""
    target = os.path.join(output_dir, VOCAB_FILE)
    if vocab is not None:
        if os.path.abspath(vocab) != os.path.abspath(target):
            shutil.copyfile(vocab, target)
        return target
    texts = (sentence for path in paths for document, _ in iter_documents(path, document_format)
             for sentence in document)
    save_vocab(target, build_vocab(texts, min_count, max_size, do_lower_case))
    return target


class ShardProgress:
    """A progress bar over the bytes of input whose shards are written."""

    def __init__(self, total_bytes, verbose):
        import keras

        self.bar = keras.utils.Progbar(max(total_bytes, 1), unit_name="byte", verbose=verbose)
        self.done_bytes = 0
        self.results = []

    def record(self, task, size, outcome):
        index, examples, tokens, predictions = outcome
        self.results.append(dict(index=index, path=task.path, examples=examples, tokens=tokens,
                                 predictions=predictions))
        self.done_bytes += size
        self.bar.update(self.done_bytes, [("examples", sum(r["examples"] for r in self.results))])


UNGUARDED_SCRIPT = (
    "prepare(workers > 1) starts worker processes, which import the script that called it "
    "(multiprocessing 'spawn'); a script that calls prepare() at its top level then runs again in "
    "each worker: put the call under `if __name__ == \"__main__\":`, or pass workers=1.")


def refuse_in_worker_bootstrap():
    """Stop a spawned worker that is re-running an unguarded script before it writes anything."""
    # multiprocessing sets _inheriting while a new process imports its parent's main module.
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(UNGUARDED_SCRIPT)


def run_tasks(tasks, workers, total_bytes, verbose=1):
    """write_shard over (task, input bytes) pairs, `workers` processes at a time; at most two
    tasks per worker are queued, so a large corpus is never held in memory whole."""
    progress = ShardProgress(total_bytes, verbose)
    if workers <= 1:
        for task, size in tasks:
            progress.record(task, size, write_shard(task))
    else:
        _run_in_pool(tasks, workers, progress)
    return sorted(progress.results, key=lambda r: r["index"])


def _run_in_pool(tasks, workers, progress):
    context = multiprocessing.get_context("spawn")  # never fork a process that holds TF
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            pending = {}
            for task, size in tasks:
                pending[pool.submit(write_shard, task)] = (task, size)
                if len(pending) >= 2 * workers:
                    _collect(pending, progress, concurrent.futures.FIRST_COMPLETED)
            _collect(pending, progress, concurrent.futures.ALL_COMPLETED)
    except concurrent.futures.process.BrokenProcessPool as error:
        raise RuntimeError(f"a worker process of prepare() died ({error}). If it was out of "
                           f"memory, pass fewer workers. {UNGUARDED_SCRIPT}") from None


def _collect(pending, progress, mode):
    done, _ = concurrent.futures.wait(pending, return_when=mode)
    for future in done:
        task, size = pending.pop(future)
        progress.record(task, size, future.result())


def write_json_atomic(path, value):
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def read_info(data_dir):
    path = os.path.join(data_dir, INFO_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path!r} not found: {data_dir!r} is not a prepared dataset (run `bert4k prepare`), "
            "or its preparation did not finish.")
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    info["settings"] = DataSettings(**info["settings"])
    return info


def load_dataset(data_dir, batch_size, seed=0, start_example=0, num_shards=1, shard_index=0,
                 shuffle_buffer=10_000, cycle_length=4, length_multiple_of=None, group_by_length=0):
    """An endless tf.data stream of batches {feature: int32/float32 tensor} from a prepared dir.

    The global order of examples depends only on `seed` (shard files shuffled each epoch,
    interleaved deterministically, then a seeded shuffle buffer), so `start_example` examples are
    skipped to resume exactly where a run stopped. With several input pipelines (workers),
    pipeline k takes examples k, k+n, ... of that global order: n pipelines with batch b together
    read what one pipeline with batch n*b reads.
    length_multiple_of: cut each batch's sequences after its longest one, rounded up to a multiple
    of this (None: every batch is max_seq_length long, as static shapes such as TPUs' need).
    Sequences that end with their document are often much shorter than max_seq_length, and the
    padding would cost as much compute as the tokens.
    group_by_length: k > 1 reads k batches at a time, sorts their sequences by length and deals
    them out as k batches in a seeded random order, so that a batch holds sequences of similar
    lengths and length_multiple_of cuts away most of its padding. A window of k batches is the
    unit of the order: resuming inside one replays it and skips the batches already taken.
    """
    import tensorflow as tf

    info = read_info(data_dir)
    files = [os.path.join(data_dir, shard["file"]) for shard in info["shards"] if shard["examples"]]
    if not files:
        raise ValueError(f"{data_dir!r} holds no examples.")
    spec = feature_spec(info["settings"])
    dataset = tf.data.Dataset.from_tensor_slices(files)
    dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
    dataset = dataset.interleave(tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(files)),
                                 block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                                 deterministic=True)
    if shuffle_buffer > 1:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
    if group_by_length > 1:
        dataset = grouped_batches(tf, dataset, spec, batch_size, seed, start_example, num_shards,
                                  shard_index, group_by_length)
    else:
        dataset = dataset.skip(start_example)
        if num_shards > 1:
            dataset = dataset.shard(num_shards, shard_index)
        dataset = dataset.batch(batch_size, drop_remainder=True)
        dataset = dataset.map(lambda records: parse_batch(tf, records, spec),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if length_multiple_of:
        dataset = dataset.map(lambda batch: trim_batch(tf, batch, length_multiple_of),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def feature_spec(settings):
    import tensorflow as tf

    return {name: tf.io.FixedLenFeature([length], tf.float32 if name == "masked_lm_weights" else tf.int64)
            for name, length in settings.feature_lengths.items() if name != "input_mask"}


def parse_batch(tf, records, spec):
    features = tf.io.parse_example(records, spec)
    return {name: value if value.dtype == tf.float32 else tf.cast(value, tf.int32)
            for name, value in features.items()}


SEQUENCE_FEATURES = ("input_ids", "segment_ids")  # one value a position; the rest index positions


def grouped_batches(tf, dataset, spec, batch_size, seed, start_example, num_shards, shard_index, group):
    """load_dataset's batches with group_by_length: each window of `group` global batches is
    sorted whole, then pipeline k takes rows k, k+n, ... of each global batch, so that n pipelines
    together still read what one pipeline reads. (Each pipeline so parses every record of the
    window, not only its own: parsing costs little next to a training step.)"""
    global_batch = batch_size * num_shards
    windows_done, batches_taken = window_position(start_example, global_batch, group)
    dataset = dataset.skip(windows_done * group * global_batch)
    dataset = dataset.batch(global_batch * group, drop_remainder=True)
    dataset = dataset.map(lambda records: parse_batch(tf, records, spec),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.enumerate(start=windows_done).flat_map(
        lambda window, examples: sorted_batches(tf, examples, global_batch, seed, window))
    if num_shards > 1:
        dataset = dataset.map(lambda batch: {name: value[shard_index::num_shards]
                                             for name, value in batch.items()})
    return dataset.skip(batches_taken)


def window_position(start_example, global_batch, group):
    """(windows of `group` batches wholly read, batches read of the next) after start_example."""
    batches, partial = divmod(start_example, global_batch)
    if partial:
        raise ValueError(f"start_example={start_example} is not a whole number of batches of "
                         f"{global_batch}: runs resume only between steps.")
    return divmod(batches, group)


def sorted_batches(tf, examples, batch_size, seed, window):
    """A window's examples sorted by length, cut into batches, in an order drawn from (seed, window)."""
    by_length = tf.argsort(sequence_lengths(tf, examples), stable=True)
    count = tf.shape(by_length)[0] // batch_size
    draws = tf.random.stateless_uniform([count], seed=tf.stack([window, tf.constant(seed, tf.int64)]))
    order = tf.gather(tf.reshape(by_length, [count, batch_size]), tf.argsort(draws))
    return tf.data.Dataset.from_tensor_slices(order).map(
        lambda rows: {name: tf.gather(value, rows) for name, value in examples.items()})


def sequence_lengths(tf, batch):
    """Each sequence's length: its tokens before the padding ([PAD] = 0, at the end)."""
    return tf.reduce_sum(tf.cast(batch["input_ids"] != 0, tf.int32), axis=1)


def trim_batch(tf, batch, multiple_of):
    """The batch with its sequence features cut after the longest sequence (padding is [PAD] = 0,
    at the end), rounded up to a multiple of `multiple_of`: only the padding goes."""
    longest = tf.reduce_max(sequence_lengths(tf, batch))
    length = tf.minimum((longest + multiple_of - 1) // multiple_of * multiple_of,
                        tf.shape(batch["input_ids"])[1])
    return {name: value[:, :length] if name in SEQUENCE_FEATURES else value
            for name, value in batch.items()}
