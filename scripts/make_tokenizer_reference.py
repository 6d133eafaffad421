"""Write tests/fixtures/tokenizer_reference.json: Hugging Face BertTokenizer outputs for bert4k's tests.

Run with a Python that has transformers 5 and tokenizers (torch is not needed):

    python scripts/make_tokenizer_reference.py [--vocab /path/to/all-MiniLM-L6-v2/vocab.txt]

Without --vocab it uses $BERT4K_MINILM_DIR/vocab.txt, else the copy bert4k.assets fetches and caches.

The truth is the Python tokenizer (`BertTokenizerLegacy` in transformers 5, `BertTokenizer` in 4).
The Rust one (`BertTokenizer`/`BertTokenizerFast` in transformers 5) is run too; where it disagrees its
tokens are stored as `fast_tokens` and listed on stdout.

Cases: hand-written edge cases, random strings from many Unicode blocks (fixed seed, only characters whose
category has not changed since Unicode 3.2, so the fixture holds on any Python), lines of the Chinese
sentiment corpus; each with do_lower_case True and False; on the MiniLM vocab (uncased) and on a small
cased synthetic vocab stored in the fixture itself.
"""

import argparse
import hashlib
import json
import os
import random
import sys
import unicodedata
import zipfile
from pathlib import Path

import tokenizers
import transformers
# transformers 5: BertTokenizer is the Rust one, the Python one lives on as BertTokenizerLegacy.
from transformers.models.bert.tokenization_bert import BertTokenizer as RustBertTokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as PythonBertTokenizer

REPO = Path(__file__).resolve().parents[1]

HAND_CASES = [
    '', ' ', '\t\n\r ', 'hello', 'Hello, World!', 'The quick brown fox jumps over the lazy dog.',
    "I can't believe it's not butter; isn't it?", 'unaffable', 'UNAFFABLE Unaffable', 'hello   world',
    '  leading and trailing  ', 'tokenization tokenizer tokenize', 'HuggingFace Transformers',
    'café naïve Ångström résumé coöperate façade jalapeño', 'CAFÉ NAÏVE ÅNGSTRÖM', 'e\u0301 cafe\u0301',
    'a\u0308\u0301 o\u0328\u0301', '\u0301 leading combining mark', 'İstanbul ıi', 'straße STRASSE ß',
    'ΣΊΣΥΦΟΣ', 'ΟΔΟΣ ΟΔΟΣ. ΑΣ.Β Σ', 'ς σ Σ ος', 'Ελληνικά γράμματα', 'Привет, мир! Ёлка ёжик',
    'مرحبا بالعالم', 'שלום עולם', 'สวัสดีครับ ภาษาไทย', 'नमस्ते दुनिया', 'हिन्दी', '한국어 텍스트', 'ｶﾀｶﾅ ひらがな カタカナ',
    '中文分词测试', '我喜欢这部电影，很好看！', '北京欢迎你。Beijing welcomes you.', '混合mixed文本text123',
    '日本語の文章です。', '𠀀𠀁 𪜀 𫝀 𫠠 𬺰', '\uf900\uf901 \ufa0e \U0002f800', '⺀⼀ ㍻ ㈱',
    '😀 😃😄', '👍🏽 👍🏿', '👨\u200d👩\u200d👧\u200d👦 family', '🏳️\u200d🌈 flag', '❤️ ☺️', '🇫🇷🇯🇵',
    'a\x00b', 'bell\x07 ring', 'replace\ufffdment', 'tab\tsep', 'crlf\r\nline', 'vt\x0bff\x0c', '\x1c\x1d\x1e\x1f',
    '\x85nel', 'line\u2028sep\u2029para', 'zero\u200bwidth', 'zw\u200cnj zw\u200dj', '\ufeffbom', '\u00a0nbsp\u3000ideo',
    '\u2002en\u2003em\u2009thin', 'soft\u00adhyphen', 'rtl\u200fmark\u202e', '\ue000private\uf8ff',
    'ＦＵＬＬＷＩＤＴＨ ｆｕｌｌ １２３ ！？（）', '，。！？；：“”‘’（）【】《》、', '...!!!???', '!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~',
    '¡¿«»—–…‰′″§¶†‡•', '≠ ≤ ≥ ≮ a≠b', '½ ² ³ ¼ ℃ ™ ©', '\u1fef\u037e \u0387', 'ﬁnance ﬂow', 'Ⅻ ⅻ ①②',
    'x' * 100, 'x' * 101, 'y' * 150 + ' short', 'supercalifragilisticexpialidocious' * 3, 'é' * 101,
    '3.14159 1,000,000 -42 +7 1e-5 0x1F 2024-01-01 12:30', '$100 €50 ¥1000 £20',
    'https://example.com/path?query=1&b=2#frag', 'user@example.com', 'C:\\Users\\test\\file.txt',
    '#hashtag @mention', 'camelCaseWord snake_case_word kebab-case-word', "O'Neil's rock'n'roll",
    'hello [MASK] world', 'hello[MASK]world', '[MASK]', '[SEP]', '[CLS] a [SEP] b [SEP]', '[PAD][UNK]',
    '[mask] [Mask]', '[[MASK]]', '[MASK][MASK]', '[MA\x00SK] [MA\u200bSK]', 'x[MA\x00SK]', '[MASK ]',
    'the [MASK] is ΣΟΦΟΣ', '[unused1] [UNK]x', 'ＣＬＳ [CLS]', 'Hello [MASK]! Ça va?',
    'The Ὀδυσσεύς', 'Ǆemal ǅ ǆ', 'ǰ ΐ ﬃ', 'ŉ', 'Ⓐⓑ', 'ℌ𝔢𝔩𝔩𝔬 𝐛𝐨𝐥𝐝', 'a\u0345', 'ΐ\u0345',
]

SPECIALS_SPLIT_CASES = ['hello [MASK] world', '[CLS] a [SEP] b', 'x[MA\x00SK]', '[PAD][UNK]']

# (first, last) code points of blocks to draw random characters from.
UNICODE_BLOCKS = [
    (0x20, 0x7E), (0x00, 0x1F), (0x7F, 0x9F), (0xA0, 0xFF), (0x100, 0x24F), (0x250, 0x2FF), (0x300, 0x36F),
    (0x370, 0x3FF), (0x400, 0x4FF), (0x530, 0x58F), (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F),
    (0xE00, 0xE7F), (0x1100, 0x11FF), (0x1E00, 0x1EFF), (0x1F00, 0x1FFF), (0x2000, 0x206F), (0x2100, 0x22FF),
    (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xE0FF), (0xF900, 0xFAFF), (0xFB00, 0xFB4F),
    (0xFE70, 0xFEFF), (0xFF00, 0xFFEF), (0xFFF0, 0xFFFF), (0x1D400, 0x1D7FF), (0x20000, 0x2A6DF),
]

SYNTHETIC_VOCAB = (
    ['[PAD]', '[unused0]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '<S>', '<T>']
    + list('!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~0123456789')
    + [c for c in 'abcdefghijklmnopqrstuvwxyz'] + [c.upper() for c in 'abcdefghijklmnopqrstuvwxyz']
    + ['##' + c for c in 'abcdefghijklmnopqrstuvwxyz'] + ['##' + c for c in '0123456789']
    + ['Hello', 'hello', 'World', 'world', 'The', 'the', 'play', '##ing', '##ed', '##s', 'un', '##aff',
       '##able', 'café', 'Café', 'é', 'É', '##é', 'Å', 'å', 'ö', '##ö', 'naïve', 'Σ', 'σ', 'ς', 'ο', '##ς',
       '##σ', '##ο', 'при', '##вет', 'мир', '中', '国', '人', '我', '喜', '欢', '你', '好', '##国', '中国',
       '，', '。', '！', '？', '##，', '😀', 'ß', 'İ', 'e', '\u0301', '##\u0301', 'ÿ']
)
SYNTHETIC_CASES = [
    'Hello World', 'hello world HELLO', 'playing played plays unaffable', 'Café café CAFÉ cafe\u0301',
    'naïve NAÏVE', 'ΣΟΣ σος', 'привет мир Привет', '中国人 我喜欢你，你好！', '中国 国中', 'Ångström å',
    'abc123 A1b2', 'ß İ ÿ Ÿ', 'e\u0301 \u0301', '😀 😀😀', '[MASK] hello [MASK]', '<S> and <T>',
    'zzz' * 40, 'unknown-character: ж', 'x' * 101,
]


def stable_chars(block):
    """Assigned characters whose category is the same in Unicode 3.2 and in the running Python."""
    low, high = block
    chars = []
    for code in range(low, high + 1):
        ch = chr(code)
        category = unicodedata.category(ch)
        if category not in ('Cn', 'Cs') and unicodedata.ucd_3_2_0.category(ch) == category:
            chars.append(ch)
    return chars


def random_texts(count, seed):
    rng = random.Random(seed)
    pools = [chars for chars in map(stable_chars, UNICODE_BLOCKS) if chars]
    texts = []
    for _ in range(count):
        blocks = rng.sample(pools, rng.randint(1, 3)) + [[' '] * 3 + list('abcdefghij')]
        length = rng.randint(1, 40)
        texts.append(''.join(rng.choice(rng.choice(blocks)) for _ in range(length)))
    return texts


def corpus_lines(corpus_zip, count, seed, max_chars=60):
    with zipfile.ZipFile(corpus_zip) as archive:
        lines = archive.read('sentiment/sentiment.train.data').decode('utf-8').splitlines()
    texts = [line.rsplit('\t', 1)[0][:max_chars] for line in random.Random(seed).sample(lines, count)]
    return texts


def run_case(vocab_name, python_tok, rust_tok, text, do_lower_case, split_special_tokens=False):
    if split_special_tokens:
        # transformers 5's Python tokenize(split_special_tokens=True) still keeps specials that stand
        # between spaces (it drops the flag before _tokenize); v4 and the Rust tokenizer split them all.
        tokens = python_tok._tokenize(text, split_special_tokens=True)
        ids = python_tok.build_inputs_with_special_tokens(python_tok.convert_tokens_to_ids(tokens))
    else:
        tokens, ids = python_tok.tokenize(text), python_tok.encode(text)
    assert ids[1:-1] == python_tok.convert_tokens_to_ids(tokens)
    case = {'vocab': vocab_name, 'text': text, 'do_lower_case': do_lower_case, 'tokens': tokens, 'ids': ids}
    if split_special_tokens:
        case['split_special_tokens'] = True
    fast_tokens = rust_tok.tokenize(text, split_special_tokens=split_special_tokens)
    if fast_tokens != tokens:
        case['fast_tokens'] = fast_tokens
    return case


def default_vocab():
    if os.environ.get('BERT4K_MINILM_DIR'):
        return Path(os.environ['BERT4K_MINILM_DIR']) / 'vocab.txt'
    sys.path.insert(0, str(REPO))  # bert4k need not be installed in this reference environment
    from bert4k import assets
    return assets.minilm_dir() / 'vocab.txt'


def make_tokenizers(vocab_file, do_lower_case):
    python_tok = PythonBertTokenizer(str(vocab_file), do_lower_case=do_lower_case)
    rust_tok = RustBertTokenizer(vocab=dict(python_tok.vocab), do_lower_case=do_lower_case)
    return python_tok, rust_tok


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--vocab', help='vocab.txt of all-MiniLM-L6-v2 (uncased, 30522 tokens)')
    parser.add_argument('--corpus', default=REPO / 'data' / 'sentiment.zip', type=Path)
    parser.add_argument('--out', default=REPO / 'tests' / 'fixtures' / 'tokenizer_reference.json', type=Path)
    parser.add_argument('--seed', default=20240601, type=int)
    args = parser.parse_args()
    if args.vocab is None:
        args.vocab = default_vocab()

    minilm_texts = HAND_CASES + random_texts(160, args.seed) + corpus_lines(args.corpus, 40, args.seed)
    synthetic_file = args.out.parent / 'synthetic_vocab.tmp.txt'
    args.out.parent.mkdir(parents=True, exist_ok=True)
    synthetic_file.write_text(''.join(token + '\n' for token in SYNTHETIC_VOCAB), encoding='utf-8')
    cases = []
    try:
        for vocab_name, vocab_file, texts in (('minilm', Path(args.vocab), minilm_texts),
                                              ('synthetic', synthetic_file, SYNTHETIC_CASES + HAND_CASES[:40])):
            for do_lower_case in (True, False):
                python_tok, rust_tok = make_tokenizers(vocab_file, do_lower_case)
                cases += [run_case(vocab_name, python_tok, rust_tok, text, do_lower_case) for text in texts]
                if vocab_name == 'minilm':
                    cases += [run_case(vocab_name, python_tok, rust_tok, text, do_lower_case, True)
                              for text in SPECIALS_SPLIT_CASES]
    finally:
        synthetic_file.unlink()

    reference = {
        'generator': 'scripts/make_tokenizer_reference.py',
        'reference': f'{PythonBertTokenizer.__module__}.{PythonBertTokenizer.__name__}',
        'transformers': transformers.__version__, 'tokenizers': tokenizers.__version__,
        'unidata_version': unicodedata.unidata_version,
        'minilm_vocab_sha256': hashlib.sha256(Path(args.vocab).read_bytes()).hexdigest(),
        'synthetic_vocab': SYNTHETIC_VOCAB,
        'cases': cases,
    }
    args.out.write_text(json.dumps(reference, ensure_ascii=False, separators=(',', ':')) + '\n', encoding='utf-8')
    disagreements = [case for case in cases if 'fast_tokens' in case]
    print(f'{len(cases)} cases written to {args.out} ({args.out.stat().st_size} bytes)')
    print(f'{len(disagreements)} cases where the Rust tokenizer disagrees with the Python one:')
    for case in disagreements:
        print(f"  {case['vocab']} lower={case['do_lower_case']} {case['text']!r}: "
              f"python {case['tokens']} rust {case['fast_tokens']}")


if __name__ == '__main__':
    main()
