"""Tokenizers with the bert4keras API: WordPiece (pure Python) and SentencePiece, plus vocab helpers.

`Tokenizer` gives exactly the tokens and ids of Hugging Face's Python `BertTokenizer` (called
`BertTokenizerLegacy` in transformers 5) for the same vocab and casing, including its handling of special
tokens written in the text. Where HF's Rust tokenizer disagrees with its Python one (final sigma, NFC
composition, specials broken by control characters) we follow the Python one.

Speed comes from whole-string C-level passes (`str.translate` with tables that classify each code point
once, `lower`, `unicodedata.normalize`) instead of per-character Python calls, and from caching the
WordPiece split of each word.
"""

import os
import re
import tempfile
import unicodedata
from itertools import chain


_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)
_WORD_CACHE_LIMIT = 1 << 17  # words; cleared when full, so memory stays bounded on endless streams


def _is_space(ch):
    """BERT's whitespace: ' ', \\t, \\n, \\r and the Zs category."""
    return ch in ' \t\n\r' or unicodedata.category(ch) == 'Zs'


def _is_control(ch):
    """BERT's control characters: every C* category except \\t, \\n, \\r (those count as spaces)."""
    return ch not in '\t\n\r' and unicodedata.category(ch).startswith('C')


def _is_punctuation(ch):
    """BERT's punctuation: all non-alphanumeric ASCII symbols, and the P* categories."""
    code = ord(ch)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(ch).startswith('P')


def _is_cjk_character(ch):
    """CJK ideographs (the blocks BERT puts spaces around); Hangul and kana are not among them."""
    code = ord(ch)
    return any(low <= code <= high for low, high in _CJK_RANGES)


class _CharTable(dict):
    """A `str.translate` table that classifies each code point the first time it is seen. Unchanged
    chars map to their code point: translate is fastest on ints."""

    __slots__ = ('_rule',)

    def __init__(self, rule):
        super().__init__()
        self._rule = rule

    def __missing__(self, code):
        value = self[code] = self._rule(chr(code))
        return value


def _clean_rule(ch):
    if ch in '\x00\ufffd' or _is_control(ch):
        return None
    return ' ' if _is_space(ch) else ord(ch)


def _split_rule(ch):
    # Spaces around punctuation and CJK make them words of their own after str.split().
    return f' {ch} ' if _is_punctuation(ch) or _is_cjk_character(ch) else ord(ch)


def _drop_mn_rule(ch):
    return None if unicodedata.category(ch) == 'Mn' else ord(ch)


_CLEAN = _CharTable(_clean_rule)
_SPLIT = _CharTable(_split_rule)
_DROP_MN = _CharTable(_drop_mn_rule)
_SPLIT_DROP_MN = _CharTable(lambda ch: None if _drop_mn_rule(ch) is None else _split_rule(ch))


def _is_word_boundary(ch):
    return ch.isspace() or isinstance(_SPLIT[ord(ch)], str)  # punctuation and CJK map to ' c '


def _clean_char(ch):
    value = _CLEAN[ord(ch)]
    return ch if isinstance(value, int) else value or ''


def load_vocab(dict_path, encoding='utf-8', simplified=False, startswith=None):
    """Read a vocab file, one token a line, id = line number (later duplicates win, as in HF).

    With `simplified=True`, return `(new_token_dict, keep_tokens)`: the tokens of `startswith` first, then
    every token except multi-character ones containing CJK or punctuation (the tokenizer never produces
    them, since it splits CJK and punctuation into single characters); `keep_tokens` are their old ids,
    to slice the embedding matrix with.
    """
    if not os.path.isfile(dict_path):
        raise FileNotFoundError(f'vocab file not found: {os.fspath(dict_path)!r}')
    token_dict = {}
    with open(dict_path, encoding=encoding) as reader:
        for index, line in enumerate(reader):
            token_dict[line.rstrip('\n')] = index
    if not simplified:
        return token_dict
    new_token_dict, keep_tokens = {}, []
    for token in startswith or []:
        if token not in token_dict:
            raise KeyError(f'startswith token {token!r} is not in the vocab {os.fspath(dict_path)!r}')
        new_token_dict[token] = len(new_token_dict)
        keep_tokens.append(token_dict[token])
    for token, index in sorted(token_dict.items(), key=lambda item: item[1]):
        if token in new_token_dict:
            continue
        stem = TokenizerBase.stem(token)
        if len(token) > 1 and any(_is_cjk_character(c) or _is_punctuation(c) for c in stem):
            continue
        new_token_dict[token] = len(new_token_dict)
        keep_tokens.append(index)
    return new_token_dict, keep_tokens


def save_vocab(dict_path, token_dict, encoding='utf-8'):
    """Write tokens one a line in id order; the file appears whole or not at all."""
    ordered = sorted(token_dict.items(), key=lambda item: item[1])
    if [index for _, index in ordered] != list(range(len(ordered))):
        raise ValueError('token ids must be 0..n-1 without gaps, or reloading would renumber them')
    bad = [token for token, _ in ordered if '\n' in token or '\r' in token]
    if bad:
        raise ValueError(f'tokens containing line breaks cannot be saved one a line: {bad[:3]!r}')
    directory = os.path.dirname(os.path.abspath(dict_path))
    fd, temp_path = tempfile.mkstemp(dir=directory, prefix='.vocab-', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w', encoding=encoding, newline='\n') as writer:
            writer.writelines(token + '\n' for token, _ in ordered)
        os.replace(temp_path, dict_path)
    except BaseException:
        os.unlink(temp_path)
        raise


def _truncate_longest_first(maxlen, index, *sequences):
    """Shorten the longest sequence (the first one on ties) one item at a time at position `index`
    until the total length is at most maxlen, as bert4keras's truncate_sequences; None stays None."""
    lengths = [len(s) if s else 0 for s in sequences]
    while sum(lengths) > maxlen:
        lengths[lengths.index(max(lengths))] -= 1
    result = []
    for sequence, length in zip(sequences, lengths):
        cut = len(sequence) - length if sequence else 0
        if cut:
            start = index if index >= 0 else len(sequence) + index + 1 - cut
            if start < 0 or start + cut > len(sequence):
                raise ValueError(f'maxlen={maxlen} leaves no room for the special tokens')
            sequence = sequence[:start] + sequence[start + cut:]
        result.append(sequence)
    return result


class TokenizerBase:
    """What WordPiece and SentencePiece tokenizers share: decorations, truncation, id conversion."""

    def __init__(self, token_start='[CLS]', token_end='[SEP]', pre_tokenize=None, token_translate=None,
                 token_pad='[PAD]', token_unk='[UNK]', token_mask='[MASK]'):
        self._token_pad, self._token_unk, self._token_mask = token_pad, token_unk, token_mask
        self._token_start, self._token_end = token_start, token_end
        self._pre_tokenize = pre_tokenize
        self._token_translate = dict(token_translate or {})
        self._token_translate_inv = {v: k for k, v in self._token_translate.items()}
        for name in ('pad', 'unk', 'mask', 'start', 'end'):
            token = getattr(self, f'_token_{name}')
            setattr(self, f'_token_{name}_id', self._known_id(token))

    def _known_id(self, token):
        """The id of token, or None when the vocab lacks it."""
        raise NotImplementedError

    def tokenize(self, text, maxlen=None):
        """Tokens of text, with the start/end tokens, truncated before the end token to maxlen."""
        tokens = self._tokenize(text)
        if self._token_translate:
            tokens = [self._token_translate.get(t) or t for t in tokens]
        tokens = self._decorated(tokens, self._token_start, self._token_end)
        if maxlen is not None:
            tokens = _truncate_longest_first(maxlen, -int(self._token_end is not None) - 1, tokens)[0]
        return tokens

    def encode(self, first_text, second_text=None, maxlen=None, pattern='S*E*E', truncate_from='right'):
        """(token_ids, segment_ids) of `[CLS] A [SEP] B [SEP]` ('S*ES*E' keeps B's [CLS]), truncated
        longest-first to maxlen; texts may also be given as token lists."""
        first = self._text_ids(first_text)
        second = None if second_text is None else self._text_ids(second_text)
        drop_second_start = pattern == 'S*E*E' and second is not None and self._token_start is not None
        if maxlen is not None:
            if truncate_from == 'right':
                index = -int(self._token_end is not None) - 1
            elif truncate_from == 'left':
                index = int(self._token_start is not None)
            else:
                index = truncate_from
            # B's start token still counts here and goes afterwards, as in bert4keras.
            first, second = _truncate_longest_first(maxlen + drop_second_start, index, first, second)
        token_ids = first
        segment_ids = [0] * len(token_ids)
        if second is not None:
            second_ids = second[drop_second_start:]
            token_ids += second_ids
            segment_ids += [1] * len(second_ids)
        return token_ids, segment_ids

    @staticmethod
    def _decorated(items, start, end):
        """items (a fresh list) with `start` before and `end` after, each unless None."""
        if start is not None:
            items.insert(0, start)
        if end is not None:
            items.append(end)
        return items

    def _text_ids(self, text):
        """The ids of tokenize(text), or of a list of tokens."""
        return self.tokens_to_ids(self.tokenize(text) if isinstance(text, str) else text)

    def tokens_to_ids(self, tokens):
        return [self.token_to_id(token) for token in tokens]

    def ids_to_tokens(self, ids):
        return [self.id_to_token(i) for i in ids]

    @property
    def vocab_size(self):
        return self._vocab_size

    @staticmethod
    def stem(token):
        """The text a token stands for: a '##' continuation piece without its '##'."""
        return token[2:] if token.startswith('##') and len(token) > 2 else token

    _is_space = staticmethod(_is_space)
    _is_punctuation = staticmethod(_is_punctuation)
    _is_cjk_character = staticmethod(_is_cjk_character)
    _is_control = staticmethod(_is_control)

    @staticmethod
    def _is_special(token):
        return len(token) > 1 and token[0] == '[' and token[-1] == ']'


class Tokenizer(TokenizerBase):
    """WordPiece tokenizer, token for token Hugging Face's Python BertTokenizer.

    `token_dict` is a vocab path or a token->id dict. `word_maxlen`: a longer word becomes one unk token.
    `strip_accents=None` strips accents exactly when lowercasing, as BERT does. Special tokens of the
    vocab written in the text stay single tokens unless `split_special_tokens=True`.
    """

    def __init__(self, token_dict, do_lower_case=False, word_maxlen=100, strip_accents=None,
                 split_special_tokens=False, **kwargs):
        if isinstance(token_dict, (str, os.PathLike)):
            token_dict = load_vocab(token_dict)
        if not isinstance(token_dict, dict) or not token_dict:
            raise TypeError(f'token_dict must be a vocab file path or a non-empty dict token->id, '
                            f'got {type(token_dict).__name__}')
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in token_dict.items()):
            raise TypeError('token_dict must map str tokens to int ids')
        self._token_dict = token_dict
        self._token_dict_inv = {v: k for k, v in token_dict.items()}
        self._vocab_size = len(token_dict)
        self._do_lower_case = do_lower_case
        self._strip_accents = do_lower_case if strip_accents is None else strip_accents
        self._word_maxlen = word_maxlen
        self._split_special_tokens = split_special_tokens
        self._longest_piece = max(len(self.stem(token)) for token in token_dict)
        self._word_cache, self._ids_cache = {}, {}  # word -> its pieces' tokens / ids
        super().__init__(**kwargs)
        specials = {self._token_start, self._token_end, self._token_pad, self._token_unk, self._token_mask}
        self._specials = {t for t in specials if t and t in token_dict}
        # Longest first, so a special that is a prefix of another never wins over it.
        alternatives = '|'.join(map(re.escape, sorted(self._specials, key=len, reverse=True)))
        self._special_re = re.compile(alternatives) if alternatives and not split_special_tokens else None

    def _known_id(self, token):
        return self._token_dict.get(token) if token is not None else None

    def token_to_id(self, token):
        return self._token_dict.get(token, self._token_unk_id)

    def tokens_to_ids(self, tokens):
        get, unk = self._token_dict.get, self._token_unk_id
        return [get(token, unk) for token in tokens]

    def id_to_token(self, i):
        try:
            return self._token_dict_inv[i]
        except KeyError:
            raise KeyError(f'id {i!r} is not in the vocab (size {self._vocab_size})') from None

    def _text_ids(self, text):
        """encode's ids of a text straight from words, through the word -> ids cache: a Chinese
        character is one lookup instead of two (word -> tokens -> ids): x1.17 on the sentiment
        corpus, x1.08 on English (scripts/benchmark.py's corpora, fresh tokenizers, interleaved)."""
        if not isinstance(text, str) or self._token_translate:
            return super()._text_ids(text)
        start, end = (None if t is None else self.token_to_id(t)
                      for t in (self._token_start, self._token_end))
        return self._decorated(self._tokenize(text, as_ids=True), start, end)

    def _tokenize(self, text, as_ids=False):
        """Tokens (or their ids) without decorations: text cut around special tokens, each piece
        tokenized alone."""
        if self._special_re is None or not self._special_re.search(text):
            return self._tokenize_segment(text, as_ids)
        tokens, position = [], 0
        for match in self._special_re.finditer(text):
            tokens += self._tokenize_segment(text[position:match.start()], as_ids)
            tokens.append(self._token_dict[match.group()] if as_ids else match.group())
            position = match.end()
        return tokens + self._tokenize_segment(text[position:], as_ids)

    def _tokenize_segment(self, text, as_ids=False):
        if self._pre_tokenize is None:
            return self._word_pieces(self._basic_words(text), as_ids)
        tokens = []
        for word in self._pre_tokenize(text):
            known = word.lower() if self._do_lower_case else word
            if known in self._token_dict:
                tokens.append(self._token_dict[known] if as_ids else known)
            else:
                tokens += self._word_pieces(self._basic_words(word), as_ids)
        return tokens

    def _basic_words(self, text):
        """BERT's BasicTokenizer: drop controls, NFC, lowercase, strip accents, split punctuation/CJK."""
        if not text.isprintable() or '\ufffd' in text:  # isprintable: no C*/Z* other than ' '
            text = text.translate(_CLEAN)
        if not text.isascii():
            text = unicodedata.normalize('NFC', text)
        if self._special_re is not None and self._special_re.search(text):
            # A special that only appears once controls are dropped ('[MA\x00SK]') is kept whole
            # when it is a whole word, as HF's never_split does.
            words = []
            for word in text.split():
                words += [word] if word in self._specials else self._normalize(word).split()
            return words
        return self._normalize(text).split()

    def _normalize(self, text):
        # Whole-string lower() equals BERT's per-word lower(): spaces end the final-sigma context.
        if self._do_lower_case:
            text = text.lower()
        if not self._strip_accents:
            return text.translate(_SPLIT)
        if not text.isascii():
            text = unicodedata.normalize('NFD', text)
        return text.translate(_SPLIT_DROP_MN)

    def _word_pieces(self, words, as_ids=False):
        cache = self._ids_cache if as_ids else self._word_cache
        cache_get, split = cache.get, self._split_word_cached
        return list(chain.from_iterable([cache_get(word) or split(word, cache, as_ids)
                                         for word in words]))

    def _split_word_cached(self, word, cache, as_ids):
        if len(cache) >= _WORD_CACHE_LIMIT:
            cache.clear()
        pieces = self._split_word(word)
        cache[word] = pieces = tuple(self.tokens_to_ids(pieces)) if as_ids else pieces
        return pieces

    def _split_word(self, word):
        """Greedy longest-match-first WordPiece; a word with an unmatched rest is one unk token."""
        if len(word) > self._word_maxlen:
            return (self._token_unk,)
        vocab, pieces, start = self._token_dict, [], 0
        while start < len(word):
            prefix = '##' if start else ''
            for end in range(min(len(word), start + self._longest_piece), start, -1):
                piece = prefix + word[start:end]
                if piece in vocab:
                    break
            else:
                return (self._token_unk,)
            pieces.append(piece)
            start = end
        return tuple(pieces)

    def decode(self, ids, tokens=None):
        """Text of ids: specials dropped, '##' pieces glued, spaces only where words were apart."""
        tokens = self.ids_to_tokens(ids) if tokens is None else tokens
        tokens = [self._token_translate_inv.get(t) or t for t in tokens]
        text, previous = '', ''
        for token in tokens:
            if self._is_special(token):
                continue
            if token.startswith('##') and len(token) > 2:
                text += token[2:]
            else:
                text += self._separator(previous, token) + token
            previous = token
        text = re.sub(r"' (s|t|re|ve|m|ll|d)\b", r"'\1", text)  # it ' s -> it's
        text = re.sub(r'(\d)\. (\d)', r'\1.\2', text)  # 3. 14 -> 3.14
        return text.strip()

    @staticmethod
    def _separator(previous, token):
        if not previous or _is_glued(previous[-1]) or _is_glued(token[0]):
            return ''
        if len(token) == 1 and _is_punctuation(token) and token not in '([{<¿¡':
            return ''
        if len(previous) == 1 and previous in '([{<¿¡+-/=@#$':
            return ''
        return ' '

    def rematch(self, text, tokens):
        """For each token, the indices of the characters of `text` it came from ([] for [CLS]/[SEP]
        and for tokens not found). Lowercasing, accent stripping and NFC are undone exactly."""
        normalized, sources = self._normalized_with_sources(text)
        mapping, offset, last = [], 0, len(tokens) - 1
        for k, token in enumerate(tokens):
            added = (k == 0 and token == self._token_start) or (k == last and token == self._token_end)
            span = None if added else self._find_token(normalized, token, offset)
            mapping.append(_merge_sources(sources[span[0]:span[1]]) if span else [])
            offset = span[1] if span else offset
        return mapping

    def _find_token(self, normalized, token, offset):
        """(start, end) of token in the normalized text at or after offset, or None."""
        start = _skip_spaces(normalized, offset)
        if token == self._token_unk and start < len(normalized) and not normalized.startswith(token, start):
            end = start + 1  # an unk token stands for one whole word
            if not _is_word_boundary(normalized[start]):
                while end < len(normalized) and not _is_word_boundary(normalized[end]):
                    end += 1
            return start, end
        piece = self.stem(token)
        start = normalized.find(piece, offset)
        return None if start < 0 else (start, start + len(piece))

    def _normalized_with_sources(self, text):
        """The text as the tokenizer sees it, and for each of its characters the original indices."""
        chars, sources, position = [], [], 0
        matches = list(self._special_re.finditer(text)) if self._special_re is not None else []
        for match in matches + [None]:
            end = match.start() if match else len(text)
            pairs = self._normalize_with_sources(text, position, end)
            chars += [ch for ch, _ in pairs]
            sources += [source for _, source in pairs]
            if match:
                chars += [' '] + list(match.group()) + [' ']
                sources += [()] + [(i,) for i in range(match.start(), match.end())] + [()]
                position = match.end()
        return ''.join(chars), sources

    def _normalize_with_sources(self, text, start, end):
        segment = text[start:end]
        cleaned = segment.translate(_CLEAN)
        if segment.isascii() and len(cleaned) == len(segment) and not self._specials & set(cleaned.split()):
            # Plain ASCII: every step maps one char to one char.
            normalized = cleaned.lower() if self._do_lower_case else cleaned
            return list(zip(normalized, [(i,) for i in range(start, end)]))
        cleaned = [(_clean_char(text[i]), i) for i in range(start, end)]
        cleaned = [(ch, i) for ch, i in cleaned if ch]
        if unicodedata.is_normalized('NFC', ''.join(ch for ch, _ in cleaned)):
            chars = [(ch, (i,)) for ch, i in cleaned]  # each char of an NFC string is NFC alone
        else:
            chars = []
            for group in _nfc_groups(cleaned):
                sources = tuple(i for _, i in group)  # one tuple shared by the group's output chars
                chars += [(ch, sources) for ch in _nfc(''.join(ch for ch, _ in group))]
        result, word = [], []
        for item in chars + [(' ', ())]:
            if not item[0].isspace():
                word.append(item)
                continue
            result += self._normalize_word_with_sources(word) + [item]
            word = []
        return result[:-1]

    def _normalize_word_with_sources(self, word):
        """Lowercase and strip accents of one word (final sigma depends on the whole word), each
        resulting char keeping the source indices of the char it came from."""
        text = ''.join(ch for ch, _ in word)
        if text in self._specials and not self._split_special_tokens:
            return word  # never_split: specials stay as written
        if self._do_lower_case:
            lowered, position, lowered_word = text.lower(), 0, []
            for ch, source in word:
                width = len(ch.lower())  # lower() maps char by char, only sigma looks at context
                lowered_word += [(c, source) for c in lowered[position:position + width]]
                position += width
            word = lowered_word
        if self._strip_accents:
            word = [(c, source) for ch, source in word
                    for c in unicodedata.normalize('NFD', ch).translate(_DROP_MN)]
        return word


def _merge_sources(sources):
    """Sorted union of source index tuples; runs of one shared tuple (an NFC group) count once."""
    indices, previous = set(), None
    for source in sources:
        if source is not previous:
            indices.update(source)
            previous = source
    return sorted(indices)


def _skip_spaces(text, position):
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def _nfc_groups(chars):
    """Split (char, index) pairs into runs that NFC composes only within, e.g. 'e' + U+0301.

    A mark joins the run before it; another char joins when NFC merges it with the run's last chars
    (3 are enough: a starter only composes with the one or two starters right before it, as Hangul)."""
    groups = []
    for ch, i in chars:
        if groups:
            head = ''.join(c for c, _ in groups[-1][-3:])
            is_mark = unicodedata.combining(ch) and not head[-1].isspace()
            if is_mark or _nfc(head + ch) != _nfc(head) + _nfc(ch):
                groups[-1].append((ch, i))
                continue
        groups.append([(ch, i)])
    return groups


def _nfc(text):
    return unicodedata.normalize('NFC', text)


def _is_glued(ch):
    """Characters written without spaces around them: CJK and other wide (full-width) characters."""
    return unicodedata.east_asian_width(ch) in 'WF'


class SpTokenizer(TokenizerBase):
    """SentencePiece tokenizer with the same interface; defaults suit T5 (no start token, '</s>' end)."""

    def __init__(self, sp_model_path, token_start=None, token_end='</s>', **kwargs):
        if not os.path.isfile(sp_model_path):
            raise FileNotFoundError(f'sentencepiece model not found: {os.fspath(sp_model_path)!r}')
        import sentencepiece  # here: WordPiece users need not load it

        self.sp_model = sentencepiece.SentencePieceProcessor(model_file=os.fspath(sp_model_path))
        self._vocab_size = self.sp_model.get_piece_size()
        for name, model_id in (('token_pad', self.sp_model.pad_id()), ('token_unk', self.sp_model.unk_id())):
            kwargs.setdefault(name, self.sp_model.id_to_piece(model_id) if model_id >= 0 else None)
        super().__init__(token_start=token_start, token_end=token_end, **kwargs)

    def _known_id(self, token):
        if token is None:
            return None
        i = self.sp_model.piece_to_id(token)
        return i if self.sp_model.id_to_piece(i) == token else None

    def token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def id_to_token(self, i):
        return self.sp_model.id_to_piece(int(i)) if 0 <= i < self._vocab_size else ''

    def _tokenize(self, text):
        if self._pre_tokenize is not None:
            text = ' '.join(self._pre_tokenize(text))
        return self.sp_model.encode(text, out_type=str)

    def _is_special(self, i):
        return self.sp_model.is_control(i) or self.sp_model.is_unknown(i) or self.sp_model.is_unused(i)

    def _is_decodable(self, i):
        return 0 <= i < self._vocab_size and not self._is_special(i)

    def decode(self, ids):
        pieces = self.ids_to_tokens(i for i in ids if self._is_decodable(i))
        return self.sp_model.decode([self._token_translate_inv.get(p) or p for p in pieces])

    def rematch(self, text, tokens):
        """Character indices of text for each token, from sentencepiece's own alignment."""
        pieces = iter(self._piece_offsets(text))
        mapping = []
        for token in tokens:
            piece = next(pieces, None) if token not in (self._token_start, self._token_end) else None
            mapping.append(list(range(piece[1], piece[2])) if piece and piece[0] == token else [])
        return mapping

    def _piece_offsets(self, text):
        """[(piece, start, end)] in characters of text."""
        try:  # sentencepiece >= 0.2.1
            result = self.sp_model.encode(text, out_type='offset_mapping')
            return [(piece, start, end) for piece, (start, end) in zip(result['pieces'], result['offsets'])]
        except ValueError:  # older: byte offsets only
            byte_to_char = [i for i, ch in enumerate(text) for _ in ch.encode('utf-8')] + [len(text)]
            proto = self.sp_model.encode(text, out_type='immutable_proto')
            return [(p.piece, byte_to_char[p.begin], byte_to_char[p.end]) for p in proto.pieces]
