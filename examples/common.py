"""What the task examples share: their command line, and the small Chinese character-level BERT
they train when no checkpoint is given.

No Chinese checkpoint comes with the repository (MiniLM's English vocabulary holds only 244 CJK
characters), so by default the examples start from random weights: `configs/small_bert_config.json`
(hidden 128, 2 layers, 4 heads) over `configs/char_vocab.txt`, a character vocabulary built from
the bundled corpus by `build_char_vocab` (`python examples/common.py` rebuilds it). Give
`--config --checkpoint --vocab` to start from a pretrained model instead, for example the main
job's (`runs/main_job/model/bert_config.json`, `bert_model.ckpt`, `vocab.txt`).
"""

import argparse
import collections
import pathlib

import keras

from bert4k import assets
from bert4k.models import build_transformer_model
from bert4k.optimizers import Adam, extend_with_weight_decay
from bert4k.tokenizers import Tokenizer

CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"
SMALL_CONFIG = CONFIGS / "small_bert_config.json"
CHAR_VOCAB = CONFIGS / "char_vocab.txt"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_char_vocab(texts, min_count=3):
    """Special tokens, then every character seen min_count times (lowercased, most frequent
    first); letters and digits also as '##' pieces, so that a word splits into characters."""
    counts = collections.Counter(ch for text in texts for ch in text.lower() if not ch.isspace())
    chars = [ch for ch, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]
    pieces = ["##" + ch for ch in chars if ch.isalnum() and not Tokenizer._is_cjk_character(ch)]
    return SPECIAL_TOKENS + chars + pieces


def argument_parser(doc, epochs, batch_size, maxlen, limit=None, learning_rate=None):
    """The options every task example takes, with its own defaults (learning_rate: the one to
    train random weights with; from a checkpoint it is 5e-5 unless --learning-rate says)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", default=str(SMALL_CONFIG), help="bert_config.json / config.json")
    parser.add_argument("--checkpoint", help="checkpoint to start from (default: none, random weights)")
    parser.add_argument("--vocab", default=str(CHAR_VOCAB), help="vocab.txt")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--maxlen", type=int, default=maxlen, help="tokens per input")
    parser.add_argument("--limit", type=int, default=limit,
                        help="use at most this many training examples (and a tenth as many to test)")
    parser.add_argument("--learning-rate", type=float, help="default: %s from random weights, "
                        "5e-5 from a checkpoint" % (learning_rate or 3e-4))
    parser.add_argument("--seed", type=int, default=42)
    parser.set_defaults(scratch_learning_rate=learning_rate or 3e-4)
    return parser


def setup(args):
    """Seed everything; return the tokenizer."""
    keras.utils.set_random_seed(args.seed)
    if args.learning_rate is None:
        args.learning_rate = 5e-5 if args.checkpoint else args.scratch_learning_rate
    return Tokenizer(args.vocab, do_lower_case=True)


def build_model(args, tokenizer, **kwargs):
    """build_transformer_model on --config / --checkpoint; without a checkpoint the vocabulary
    size is the tokenizer's, whatever the config says."""
    if args.checkpoint is None:
        kwargs.setdefault("vocab_size", tokenizer.vocab_size)
    return build_transformer_model(args.config, args.checkpoint, **kwargs)


AdamW = extend_with_weight_decay(Adam, name="AdamW")


def optimizer(args):
    """AdamW, with LayerNorm and bias weights left out of weight decay as BERT does (on
    TensorFlow one fused kernel per variable: README, Performance)."""
    return AdamW(learning_rate=args.learning_rate, weight_decay_rate=0.01,
                 exclude_from_weight_decay=["Norm", "bias"])


def read_corpus(split, args):
    """(text, label) rows of the bundled sentiment corpus; --limit caps the training split, and
    the others at a tenth of it."""
    if args.limit is None:
        return assets.read_sentiment(split)
    return assets.read_sentiment(split, limit=args.limit if split == "train" else max(args.limit // 10, 8))


if __name__ == "__main__":
    vocab = build_char_vocab(text for text, _ in assets.read_sentiment("train"))
    CHAR_VOCAB.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    print(f"wrote {CHAR_VOCAB}: {len(vocab)} tokens")
