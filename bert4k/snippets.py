"""Task toolkit: padding, truncation, Viterbi decoding and small text utilities, plus (from
``bert4k.feeding``) data feeding and parallel preprocessing.

Names and arguments follow bert4keras's ``snippets`` so existing scripts keep working: ``DataGenerator``,
``parallel_apply`` and ``AutoRegressiveDecoder`` are importable from here too. Everything here is NumPy /
standard library, so data-preparation scripts and worker processes can use this module without loading a
deep-learning framework.
"""

import builtins
import functools

import numpy as np

from bert4k.feeding import (  # noqa: F401  (bert4keras scripts import these from snippets)
    DataGenerator,
    keep_freed_memory,
    parallel_apply,
    parallel_apply_generator,
)

# ----------------------------------------------------------------------------------------------------------
# Small utilities
# ----------------------------------------------------------------------------------------------------------


def is_string(s):
    """Whether ``s`` is a text string."""
    return isinstance(s, str)


# bert4keras scripts import `open` from snippets (there a Python 2 shim); Python 3's is the same.
open = builtins.open  # noqa: A001


def convert_to_unicode(text, encoding="utf-8", errors="ignore"):
    """Decodes bytes to str; anything else is returned unchanged."""
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode(encoding, errors=errors)
    return text


def convert_to_str(text, encoding="utf-8", errors="ignore"):
    """Kept for bert4keras scripts: on Python 3 ``str`` and unicode are the same thing."""
    return convert_to_unicode(text, encoding, errors)


_FULL_WIDTH_SPACE = 0x3000
_FULL_WIDTH_FIRST, _FULL_WIDTH_LAST = 0xFF01, 0xFF5E  # '！' .. '～'
_FULL_TO_HALF_OFFSET = 0xFEE0  # distance from each full-width form to its ASCII character


def strQ2B(ustring):
    """Converts full-width (quanjiao) characters to their half-width (banjiao) ASCII forms."""

    def half_width(char):
        code = ord(char)
        if code == _FULL_WIDTH_SPACE:
            return " "
        if _FULL_WIDTH_FIRST <= code <= _FULL_WIDTH_LAST:
            return chr(code - _FULL_TO_HALF_OFFSET)
        return char

    return "".join(half_width(char) for char in ustring)


def to_array(*args):
    """Converts each argument to a NumPy array; a single argument gives a single array."""
    arrays = [np.array(a) for a in args]
    return arrays[0] if len(arrays) == 1 else arrays


def softmax(x, axis=-1):
    """NumPy softmax, shifted by the maximum so large logits do not overflow."""
    x = np.asarray(x)
    exp = np.exp(x - x.max(axis=axis, keepdims=True))
    return exp / exp.sum(axis=axis, keepdims=True)


def insert_arguments(**arguments):
    """Decorator for ``__init__``: adds keyword arguments with defaults, stored as attributes on ``self``."""

    def decorator(func):
        @functools.wraps(func)
        def wrapper(self, *args, **kwargs):
            for name, default in arguments.items():
                setattr(self, name, kwargs.pop(name, default))
            return func(self, *args, **kwargs)

        return wrapper

    return decorator


def delete_arguments(*arguments):
    """Decorator for ``__init__``: rejects keyword arguments a subclass does not support."""

    def decorator(func):
        @functools.wraps(func)
        def wrapper(self, *args, **kwargs):
            for name in arguments:
                if name in kwargs:
                    raise TypeError(
                        f"{type(self).__name__} got an unexpected keyword argument '{name}'"
                    )
            return func(self, *args, **kwargs)

        return wrapper

    return decorator


def longest_common_substring(source, target):
    """Longest common contiguous slice of two sequences.

    Returns ``(length, (i_start, i_end, j_start, j_end))`` with ``source[i_start:i_end] ==
    target[j_start:j_end]``; when several are equally long, the one ending first in ``source`` is given.
    """
    best, span = 0, (0, 0, 0, 0)
    previous = [0] * (len(target) + 1)  # previous[j]: common suffix length of source[:i-1], target[:j]
    for i, s in enumerate(source, 1):
        current = [0] * (len(target) + 1)
        for j, t in enumerate(target, 1):
            if s == t:
                current[j] = previous[j - 1] + 1
                if current[j] > best:
                    best = current[j]
                    span = (i - best, i, j - best, j)
        previous = current
    return best, span


def longest_common_subsequence(source, target):
    """Longest common (not necessarily contiguous) subsequence of two sequences.

    Returns ``(length, mapping)`` where mapping lists the matched ``(i, j)`` index pairs in increasing
    order; when several subsequences are equally long, one of them is given.
    """
    n, m = len(source), len(target)
    table = np.zeros((n + 1, m + 1), dtype=np.int64)  # table[i, j]: LCS length of source[:i], target[:j]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            if source[i - 1] == target[j - 1]:
                table[i, j] = table[i - 1, j - 1] + 1
            else:
                table[i, j] = max(table[i - 1, j], table[i, j - 1])
    mapping, i, j = [], n, m
    while i > 0 and j > 0:
        if source[i - 1] == target[j - 1]:
            mapping.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif table[i - 1, j] >= table[i, j - 1]:
            i -= 1
        else:
            j -= 1
    return int(table[n, m]), mapping[::-1]


# ----------------------------------------------------------------------------------------------------------
# Padding, truncation and splitting
# ----------------------------------------------------------------------------------------------------------


def _target_lengths(arrays, length, seq_dims, multiple_of=None):
    """Per sequence dimension: the requested length, or the longest input where none is given
    (rounded up to a multiple of ``multiple_of``)."""
    if length is None or np.isscalar(length):
        length = [length] * seq_dims
    if len(length) != seq_dims:
        raise ValueError(f"length has {len(length)} entries but seq_dims is {seq_dims}")
    longest = [max((a.shape[d] if a.ndim > d else 0) for a in arrays) for d in range(seq_dims)]
    if multiple_of:
        longest = [bucket_length(m, multiple_of) for m in longest]
    return [int(l) if l is not None else m for l, m in zip(length, longest)]


def bucket_length(length, multiple_of):
    """``length`` rounded up to a multiple of ``multiple_of`` (at least one multiple)."""
    if int(multiple_of) < 1:
        raise ValueError(f"multiple_of must be a positive integer, got {multiple_of!r}")
    return max(1, -(-int(length) // int(multiple_of))) * int(multiple_of)


def _common_feature_shape(arrays, seq_dims):
    """The trailing (non-sequence) shape shared by every non-empty input."""
    shapes = {a.shape[seq_dims:] for a in arrays if a.size > 0}
    if len(shapes) > 1:
        raise ValueError(
            f"sequence_padding: inputs differ beyond the first {seq_dims} dimension(s): {sorted(shapes)}"
        )
    return shapes.pop() if shapes else ()


def _common_dtype(arrays):
    # An empty list becomes float64 in NumPy; it must not turn a batch of token ids into floats.
    non_empty = [a.dtype for a in arrays if a.size > 0]
    return np.result_type(*non_empty) if non_empty else arrays[0].dtype


def sequence_padding(inputs, length=None, value=0, seq_dims=1, mode="post", multiple_of=None):
    """Pads (and truncates) a list of sequences into one array.

    Args:
        inputs: sequences (lists or arrays); the first ``seq_dims`` dimensions are padded.
        length: target length: an int for every sequence dimension, a tuple with one entry per
            dimension (``None`` entries mean "longest input"), or ``None`` for the longest input.
            Longer sequences are cut to it, keeping their beginning.
        value: the padding value.
        mode: ``'post'`` pads at the end, ``'pre'`` at the beginning.
        multiple_of: round the "longest input" lengths up to a multiple of this (bucketing, e.g.
            32). A model compiled with XLA (``jit_compile=True``) compiles once per input shape,
            which takes seconds; batches padded to their own longest sequence would give nearly
            every batch a new shape, bucketed ones at most ``maxlen / multiple_of`` shapes. The
            extra positions are padding: the attention mask hides them, so outputs at the real
            positions do not change. Explicit ``length`` entries are kept as given.

    Returns:
        An array of shape ``[len(inputs), *lengths, *feature_shape]`` with the inputs' dtype.
    """
    if mode not in ("post", "pre"):
        raise ValueError(f'sequence_padding: mode must be "post" or "pre", got {mode!r}')
    if len(inputs) == 0:
        raise ValueError("sequence_padding needs at least one sequence")
    arrays = [np.asarray(x) for x in inputs]
    lengths = _target_lengths(arrays, length, seq_dims, multiple_of)
    feature_shape = _common_feature_shape(arrays, seq_dims)
    outputs = np.full([len(arrays), *lengths, *feature_shape], value, dtype=_common_dtype(arrays))
    for output, array in zip(outputs, arrays):
        if array.size == 0:
            continue
        kept = array[tuple(slice(0, l) for l in lengths)]
        if mode == "post":
            where = tuple(slice(0, n) for n in kept.shape[:seq_dims])
        else:
            where = tuple(slice(l - n, l) for l, n in zip(lengths, kept.shape[:seq_dims]))
        output[where] = kept
    return outputs


def truncate_sequences(maxlen, indices, *sequences):
    """Pops items from the currently longest sequence until the total length is at most ``maxlen``.

    The sequences (lists) are changed in place and also returned, all of them, in order. ``indices`` is
    the position popped in every sequence (for example ``-2`` keeps a trailing ``[SEP]``), or one
    position per sequence. Ties go to the first longest sequence.
    """
    if maxlen < 0:
        raise ValueError(f"truncate_sequences: maxlen must be >= 0, got {maxlen}")
    sequences = list(sequences)
    if not isinstance(indices, (list, tuple)):
        indices = [indices] * len(sequences)
    total = sum(len(s) for s in sequences)
    while total > maxlen:
        longest = max(range(len(sequences)), key=lambda k: len(sequences[k]))  # max keeps the first
        sequences[longest].pop(indices[longest])
        total -= 1
    return sequences


def text_segmentate(text, maxlen, seps="\n", strips=None):
    """Splits text into pieces of at most ``maxlen`` characters, cutting at separators.

    ``seps`` lists separator characters from coarse to fine: the text is cut after the first one and
    neighbouring parts are merged again while they fit; a part that is still too long is cut by the next
    separator. A part with no separator left to cut is kept whole, even if longer than ``maxlen``.
    Every piece is stripped of whitespace and then of ``strips``.
    """
    text = text.strip().strip(strips)
    if not seps or len(text) <= maxlen:
        return [text]
    separator, finer_seps = seps[0], seps[1:]
    words = text.split(separator)
    pieces, current = [], ""
    for k, word in enumerate(words):
        part = word if k == len(words) - 1 else word + separator  # each separator stays with its text
        # Start a new piece when this one would overflow; a bare separator (empty word) never starts one.
        if current and word and len(current) + len(part) > maxlen:
            pieces.extend(text_segmentate(current, maxlen, finer_seps, strips))
            current = ""
        current += part
    if current:
        pieces.extend(text_segmentate(current, maxlen, finer_seps, strips))
    return pieces


# ----------------------------------------------------------------------------------------------------------
# Viterbi decoding
# ----------------------------------------------------------------------------------------------------------


class ViterbiDecoder:
    """Best label path under emission plus transition scores (log space), as for a CRF.

    ``trans[i, j]`` scores label ``i`` followed by label ``j``. ``starts`` / ``ends`` optionally list the
    labels allowed first / last (for example to forbid a sequence that starts inside an entity).
    """

    def __init__(self, trans, starts=None, ends=None):
        self.trans = np.asarray(trans)
        self.num_labels = len(self.trans)
        self.non_starts = self._forbidden(starts)
        self.non_ends = self._forbidden(ends)

    def _forbidden(self, allowed):
        if allowed is None:
            return []
        allowed = set(allowed)
        return [label for label in range(self.num_labels) if label not in allowed]

    def decode(self, nodes):
        """``nodes[t, label]``: emission score; returns the highest-scoring label per position."""
        nodes = np.array(nodes, dtype=np.float64)  # a copy: the caller's scores are left untouched
        nodes[0, self.non_starts] = -np.inf
        nodes[-1, self.non_ends] = -np.inf
        scores = nodes[0]  # scores[j]: best score of a path ending with label j
        backpointers = []
        for emission in nodes[1:]:
            candidates = scores[:, None] + self.trans + emission[None, :]  # [previous, current]
            best_previous = candidates.argmax(axis=0)
            backpointers.append(best_previous)
            scores = candidates[best_previous, np.arange(self.num_labels)]
        path = [int(scores.argmax())]
        for best_previous in reversed(backpointers):
            path.append(int(best_previous[path[-1]]))
        return np.array(path[::-1])


def __getattr__(name):
    # Both names import Keras, so they are built only when first asked for, keeping snippets light:
    # DataGeneratorPyDataset (bert4k.feeding) subclasses keras.utils.PyDataset; bert4keras scripts
    # import AutoRegressiveDecoder from snippets, but it lives in bert4k.decoding beside the cache.
    if name == "DataGeneratorPyDataset":
        from bert4k.feeding import DataGeneratorPyDataset

        return DataGeneratorPyDataset
    if name == "AutoRegressiveDecoder":
        from bert4k.decoding import AutoRegressiveDecoder

        return AutoRegressiveDecoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
