"""Tokenizers: parity with Hugging Face's Python BertTokenizer (fixture made by
scripts/make_tokenizer_reference.py), closed-form truncation, rematch, vocab files, SentencePiece."""

import hashlib
import json
import os
import unicodedata
import zipfile
from pathlib import Path

import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st

from bert4k.tokenizers import SpTokenizer, Tokenizer, load_vocab, save_vocab

REPO = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((REPO / 'tests' / 'fixtures' / 'tokenizer_reference.json').read_text(encoding='utf-8'))
CORPUS_ZIP = REPO / 'data' / 'sentiment.zip'
SPECIALS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']


@pytest.fixture(scope='session')
def minilm_vocab(minilm_dir):
    path = Path(minilm_dir) / 'vocab.txt'
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == REFERENCE['minilm_vocab_sha256'], f'{path} is not the vocab the fixture was made with'
    return path


@pytest.fixture(scope='session')
def tokenizers(minilm_vocab):
    """(vocab name, do_lower_case, split_special_tokens) -> Tokenizer, built once."""
    vocabs = {'minilm': minilm_vocab, 'synthetic': {t: i for i, t in enumerate(REFERENCE['synthetic_vocab'])}}
    return {(name, lower, split): Tokenizer(vocab, do_lower_case=lower, split_special_tokens=split)
            for name, vocab in vocabs.items() for lower in (True, False) for split in (True, False)}


@pytest.fixture(scope='session')
def uncased(tokenizers):
    return tokenizers['minilm', True, False]


def corpus_lines(count):
    with zipfile.ZipFile(CORPUS_ZIP) as archive:
        lines = archive.read('sentiment/sentiment.train.data').decode('utf-8').splitlines()
    return [line.rsplit('\t', 1)[0] for line in lines[:count]]


# ---------------------------------------------------------------- parity with Hugging Face


GROUPS = sorted({(c['vocab'], c['do_lower_case'], c.get('split_special_tokens', False))
                 for c in REFERENCE['cases']})


@pytest.mark.parametrize('group', GROUPS, ids=lambda g: f'{g[0]}-lower{g[1]}-split{g[2]}')
def test_tokens_and_ids_equal_hugging_face(tokenizers, group):
    tokenizer = tokenizers[group]
    cases = [c for c in REFERENCE['cases']
             if (c['vocab'], c['do_lower_case'], c.get('split_special_tokens', False)) == group]
    failures = []
    for case in cases:
        tokens = tokenizer.tokenize(case['text'])
        token_ids, segment_ids = tokenizer.encode(case['text'])
        if tokens[1:-1] != case['tokens'] or token_ids != case['ids'] or set(segment_ids) - {0}:
            failures.append((case['text'], tokens[1:-1], case['tokens']))
    assert not failures, f'{len(failures)} of {len(cases)} differ, e.g. (text, ours, HF): {failures[:3]}'


def test_fixture_covers_what_the_brief_asks():
    texts = {c['text'] for c in REFERENCE['cases']}
    assert len(REFERENCE['cases']) >= 600
    for needle in ['ΣΊΣΥΦΟΣ', 'x' * 101, 'hello [MASK] world', '👨\u200d👩\u200d👧\u200d👦 family', 'a\x00b']:
        assert needle in texts
    assert any('\u4e00' <= ch <= '\u9fff' for text in texts for ch in text)


def test_special_ids_and_vocab_size(uncased):
    assert uncased.vocab_size == 30522
    assert (uncased._token_pad_id, uncased._token_unk_id, uncased._token_start_id,
            uncased._token_end_id, uncased._token_mask_id) == (0, 100, 101, 102, 103)
    assert uncased.token_to_id('never-a-token') == 100
    assert uncased.id_to_token(7592) == 'hello'
    assert uncased.ids_to_tokens(uncased.tokens_to_ids(['hello', '[MASK]'])) == ['hello', '[MASK]']
    with pytest.raises(KeyError, match='30522'):
        uncased.id_to_token(30522)


def test_special_tokens_in_text_stay_whole_unless_split(tokenizers):
    kept, split = tokenizers['minilm', True, False], tokenizers['minilm', True, True]
    assert kept.tokenize('hello [MASK] world') == ['[CLS]', 'hello', '[MASK]', 'world', '[SEP]']
    assert split.tokenize('hello [MASK] world') == ['[CLS]', 'hello', '[', 'mask', ']', 'world', '[SEP]']
    assert kept.tokenize('[mask]')[1:-1] == ['[', 'mask', ']']  # specials match case-sensitively


def test_words_longer_than_word_maxlen_are_unk(minilm_vocab):
    default = Tokenizer(minilm_vocab, do_lower_case=True)
    assert default.tokenize('a' * 100 + ' b')[1:-2] != ['[UNK]']
    assert default.tokenize('a' * 101 + ' b') == ['[CLS]', '[UNK]', 'b', '[SEP]']
    assert Tokenizer(minilm_vocab, word_maxlen=5).tokenize('abcdef abc')[1:-1] == ['[UNK]', 'abc']


def test_pre_tokenize_keeps_whole_vocab_words():
    vocab = {t: i for i, t in enumerate(SPECIALS + ['中国', '中', '国', '人', '##人'])}
    tokenizer = Tokenizer(vocab, pre_tokenize=lambda text: ['中国', '人'] if text == '中国人' else [text])
    assert tokenizer.tokenize('中国人') == ['[CLS]', '中国', '人', '[SEP]']
    assert tokenizer.encode('中国人')[0] == [vocab[t] for t in ('[CLS]', '中国', '人', '[SEP]')]
    assert Tokenizer(vocab).tokenize('中国人') == ['[CLS]', '中', '国', '人', '[SEP]']


def test_encode_applies_token_translate():
    vocab = {t: i for i, t in enumerate(SPECIALS + ['a', 'b'])}
    tokenizer = Tokenizer(vocab, token_translate={'a': 'b'})
    assert tokenizer.tokenize('a b') == ['[CLS]', 'b', 'b', '[SEP]']
    assert tokenizer.encode('a b')[0] == [vocab[t] for t in ('[CLS]', 'b', 'b', '[SEP]')]


# ---------------------------------------------------------------- encode, truncation


LETTERS = 'abcdefghijklmnopqrstuvwxyz'
LETTER_VOCAB = {t: i for i, t in enumerate(SPECIALS + list(LETTERS))}


def expected_pair_lengths(a, b, target):
    """Closed form of longest-first truncation of lengths a, b to a total of target, ties cutting a."""
    excess = a + b - target
    if excess <= 0:
        return a, b
    if a - b >= excess:
        return a - excess, b
    if b - a >= excess:
        return a, b - excess
    return target // 2, target - target // 2


@pytest.mark.parametrize('n', [0, 1, 3, 6, 10])
@pytest.mark.parametrize('m', [0, 2, 5, 9])
@pytest.mark.parametrize('maxlen', [6, 9, 12, 30])
def test_encode_pair_truncates_longest_first(n, m, maxlen):
    tokenizer = Tokenizer(LETTER_VOCAB)
    first, second = ' '.join(LETTERS[:n]), ' '.join(LETTERS[10:10 + m])
    # Lengths count [CLS] A [SEP] and [CLS] B [SEP]; B's [CLS] is dropped after truncating (bert4keras).
    a, b = expected_pair_lengths(n + 2, m + 2, maxlen + 1)
    ids, segments = tokenizer.encode(first, second, maxlen=maxlen)
    expected = ([2] + [5 + i for i in range(a - 2)] + [3]
                + [5 + 10 + i for i in range(b - 2)] + [3])
    assert ids == expected
    assert segments == [0] * a + [1] * (b - 1)
    assert len(ids) <= maxlen


def test_encode_without_maxlen_and_with_other_patterns():
    tokenizer = Tokenizer(LETTER_VOCAB)
    assert tokenizer.encode('a b', 'c') == ([2, 5, 6, 3, 7, 3], [0, 0, 0, 0, 1, 1])
    assert tokenizer.encode('a b', 'c', pattern='S*ES*E') == ([2, 5, 6, 3, 2, 7, 3], [0, 0, 0, 0, 1, 1, 1])
    assert tokenizer.encode(['[CLS]', 'a', '[SEP]']) == ([2, 5, 3], [0, 0, 0])
    assert tokenizer.encode('a b c d', maxlen=4, truncate_from='left') == ([2, 7, 8, 3], [0] * 4)


def test_tokenize_maxlen_keeps_the_end_token():
    tokenizer = Tokenizer(LETTER_VOCAB)
    assert tokenizer.tokenize('a b c d e', maxlen=4) == ['[CLS]', 'a', 'b', '[SEP]']
    assert tokenizer.tokenize('a b', maxlen=10) == ['[CLS]', 'a', 'b', '[SEP]']
    with pytest.raises(ValueError, match='maxlen'):
        tokenizer.tokenize('a b', maxlen=0)


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize('text, expected', [
    ('Hello world, how are you?', 'hello world, how are you?'),
    ("I don't think it's unaffable.", "i don't think it's unaffable."),
    ('pi is 3.14, e is 2.718.', 'pi is 3.14, e is 2.718.'),
    ('(hello) world', '(hello) world'),
    ('我，中文！', '我，中文！'),
    ('hello [MASK] world', 'hello world'),
])
def test_decode(uncased, text, expected):
    assert uncased.decode(uncased.encode(text)[0]) == expected


def test_decode_given_tokens(uncased):
    assert uncased.decode(None, tokens=['[CLS]', 'una', '##ffa', '##ble', '[SEP]']) == 'unaffable'


# ---------------------------------------------------------------- rematch


def test_rematch_exact_spans(uncased, tokenizers):
    text = 'Hello, CAFÉ 中文!'
    assert uncased.rematch(text, uncased.tokenize(text)) == [
        [], [0, 1, 2, 3, 4], [5], [7, 8, 9, 10], [12], [13], [14], []]
    text = 'e\u0301 İx ' + 'y' * 101 + ' [MASK]'  # NFC pair, lowercase growing, an unk word, a special
    assert uncased.tokenize(text)[1:-1] == ['e', 'ix', '[UNK]', '[MASK]']
    assert uncased.rematch(text, uncased.tokenize(text)) == [
        [], [0, 1], [3, 4], list(range(6, 107)), list(range(108, 114)), []]
    cased = tokenizers['synthetic', False, False]
    text = 'Café cafe\u0301 Σ ΣΟ'  # cased: no lowercasing, but NFC still composes e + U+0301
    assert cased.tokenize(text)[1:-1] == ['Café', 'café', 'Σ', '[UNK]']
    assert cased.rematch(text, cased.tokenize(text))[1:-1] == [[0, 1, 2, 3], [5, 6, 7, 8, 9], [11], [13, 14]]


def strip_accents_lower(text):
    return ''.join(c for c in unicodedata.normalize('NFD', text.lower()) if unicodedata.category(c) != 'Mn')


REMATCH_TEXTS = ['Héllo, Wörld! naïve CAFÉ', 'unaffable tokenization', '混合mixed文本text123，好！',
                 'Ångström résumé 3.14', 'tab\there\r\nnew\u200bline'] + corpus_lines(30)


@pytest.mark.parametrize('text', REMATCH_TEXTS)
def test_rematch_spans_map_back_to_tokens(uncased, text):
    tokens = uncased.tokenize(text)
    mapping = uncased.rematch(text, tokens)
    assert len(mapping) == len(tokens) and mapping[0] == mapping[-1] == []
    previous_end = -1
    for token, span in zip(tokens[1:-1], mapping[1:-1]):
        assert span and span == list(range(span[0], span[-1] + 1)) and span[0] > previous_end
        previous_end = span[-1]
        if token != '[UNK]':
            assert strip_accents_lower(text[span[0]:span[-1] + 1]) == uncased.stem(token)


# ---------------------------------------------------------------- any text


TEXT_WITH_SPECIALS = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(SPECIALS + [' ', '\x00'])),
                              max_size=8).map(''.join).map(lambda s: s[:200])


@settings(max_examples=200, deadline=None)
@given(text=TEXT_WITH_SPECIALS, lower=st.booleans())
def test_any_text_tokenizes_and_rematches(tokenizers, text, lower):
    tokenizer = tokenizers['minilm', lower, False]
    tokens = tokenizer.tokenize(text)
    assert tokenizer.encode(text)[0] == tokenizer.tokens_to_ids(tokens)  # encode's own ids path
    ids, segments = tokenizer.encode(text, text[::-1], maxlen=64)
    assert tokens[0] == '[CLS]' and tokens[-1] == '[SEP]' and len(ids) == len(segments) <= 64
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    mapping = tokenizer.rematch(text, tokens)
    assert len(mapping) == len(tokens)
    assert all(0 <= i < len(text) for span in mapping for i in span)
    assert all(span for token, span in zip(tokens[1:-1], mapping[1:-1]))


# ---------------------------------------------------------------- vocab files


def test_save_and_load_vocab_round_trip(tmp_path, minilm_vocab):
    token_dict = load_vocab(minilm_vocab)
    assert len(token_dict) == 30522 and token_dict['[MASK]'] == 103
    save_vocab(tmp_path / 'vocab.txt', token_dict)
    assert load_vocab(tmp_path / 'vocab.txt') == token_dict
    assert (tmp_path / 'vocab.txt').read_bytes() == Path(minilm_vocab).read_bytes()


def test_save_vocab_leaves_no_partial_file(tmp_path):
    path = tmp_path / 'vocab.txt'
    path.write_text('old\n', encoding='utf-8')
    with pytest.raises(TypeError):
        save_vocab(path, {'a': 0, 7: 1})  # a non-str token fails while writing
    with pytest.raises(ValueError, match='gaps'):
        save_vocab(path, {'a': 0, 'b': 2})
    assert path.read_text(encoding='utf-8') == 'old\n' and os.listdir(tmp_path) == ['vocab.txt']


def test_load_vocab_simplified(tmp_path):
    tokens = ['[PAD]', '[UNK]', 'a', '##b', '中', '中国', '##国', '，', '##，', 'a,', '[CLS]', '[SEP]', 'ab']
    path = tmp_path / 'vocab.txt'
    path.write_text(''.join(t + '\n' for t in tokens), encoding='utf-8')
    new_dict, keep = load_vocab(path, simplified=True, startswith=['[PAD]', '[UNK]', '[CLS]', '[SEP]'])
    assert list(new_dict) == ['[PAD]', '[UNK]', '[CLS]', '[SEP]', 'a', '##b', '中', '，', 'ab']
    assert list(new_dict.values()) == list(range(9))
    assert keep == [0, 1, 10, 11, 2, 3, 4, 7, 12]


def test_missing_vocab_and_bad_arguments(tmp_path):
    missing = tmp_path / 'nope' / 'vocab.txt'
    with pytest.raises(FileNotFoundError, match='nope'):
        load_vocab(missing)
    with pytest.raises(FileNotFoundError, match='nope'):
        Tokenizer(str(missing))
    with pytest.raises(TypeError, match='token_dict'):
        Tokenizer(['[CLS]', '[SEP]'])
    with pytest.raises(TypeError, match='token_dict'):
        Tokenizer({})
    with pytest.raises(TypeError, match='int ids'):
        Tokenizer({'a': '0'})


# ---------------------------------------------------------------- SentencePiece


@pytest.fixture(scope='session')
def sp_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp('sp')
    words = ('the quick brown fox jumps over lazy dog model token piece sentence train data text '
             'hello world learning machine language keras bert tiny small test').split()
    lines = [' '.join(words[(i * 7 + j * 3) % len(words)] for j in range(4 + i % 9)) for i in range(3000)]
    (directory / 'corpus.txt').write_text('\n'.join(lines + corpus_lines(50)), encoding='utf-8')
    sentencepiece.SentencePieceTrainer.train(
        input=str(directory / 'corpus.txt'), model_prefix=str(directory / 'sp'), vocab_size=300,
        model_type='unigram', pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=['[MASK]'],
        character_coverage=0.98, minloglevel=2)
    return directory / 'sp.model'


def test_sp_tokenizer_round_trip(sp_model):
    tokenizer = SpTokenizer(sp_model)
    assert tokenizer.vocab_size == 300
    assert (tokenizer._token_pad_id, tokenizer._token_unk_id, tokenizer._token_end_id) == (0, 1, 3)
    assert tokenizer._token_start_id is None and tokenizer._token_mask_id == 4
    for text in ['the quick brown fox', 'hello world model', 'tiny test data text']:
        ids, segments = tokenizer.encode(text)
        assert ids[-1] == 3 and segments == [0] * len(ids)
        assert tokenizer.decode(ids) == text
        tokens = tokenizer.tokenize(text)
        assert tokens[-1] == '</s>' and tokenizer.tokens_to_ids(tokens) == ids
        mapping = tokenizer.rematch(text, tokens)
        assert mapping[-1] == [] and all(0 <= i < len(text) for span in mapping for i in span)
        assert ''.join(text[i] for span in mapping for i in span).replace(' ', '') == text.replace(' ', '')
    for i in range(tokenizer.vocab_size):
        assert tokenizer.token_to_id(tokenizer.id_to_token(i)) == i


def test_sp_tokenizer_decorations_and_truncation(sp_model):
    tokenizer = SpTokenizer(sp_model, token_start='<s>')
    ids, segments = tokenizer.encode('hello world', 'the dog')
    assert ids[0] == 2 and ids.count(3) == 2 and ids.count(2) == 1
    assert segments == [0] * (ids.index(3) + 1) + [1] * (len(ids) - ids.index(3) - 1)
    assert len(tokenizer.encode('the quick brown fox jumps over the lazy dog', maxlen=5)[0]) == 5
    assert tokenizer.decode([2, 4] + tokenizer.encode('hello')[0]) == '[MASK] hello'
    with pytest.raises(FileNotFoundError, match='missing.model'):
        SpTokenizer(sp_model.parent / 'missing.model')
