"""Pretraining from raw text: `data_utils` (text -> TFRecord shards -> tf.data) and `pretraining`
(the distributed, resumable training loop and the final export).

This file also holds the `bert4k prepare` and `bert4k pretrain` command-line options: argparse
only, so building `bert4k`'s parser imports neither TensorFlow nor Keras.
"""

import json

PREPARE_HELP = "turn raw text files into TFRecord shards for pretraining"
PRETRAIN_HELP = "pretrain (or continue pretraining) a BERT on prepared shards"


def add_prepare_arguments(parser):
    add = parser.add_argument
    add("--input", nargs="+", required=True, help="UTF-8 text files: documents separated by "
        "blank lines (one sentence a line), or one document a line")
    add("--output", required=True, help="directory for the shards, dataset.json and vocab.txt")
    vocab = parser.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--vocab", help="vocab.txt to tokenize with (a released model's, to continue it)")
    vocab.add_argument("--build-vocab", action="store_true",
                       help="build a character vocabulary from the inputs")
    add("--min-count", type=int, default=1, help="with --build-vocab: drop rarer characters")
    add("--max-vocab-size", type=int, help="with --build-vocab: keep at most this many tokens")
    add("--do-lower-case", action="store_true")
    add("--objective", default="mlm", choices=["mlm", "mlm_nsp", "gpt", "unilm"])
    add("--max-seq-length", type=int, default=128)
    add("--max-predictions-per-seq", type=int, default=20)
    add("--masked-lm-prob", type=float, default=0.15)
    add("--short-seq-prob", type=float, default=0.1)
    add("--dupe-factor", type=int, default=1, help="passes over the data, each with new masks")
    add("--no-whole-word-mask", dest="whole_word_mask", action="store_false")
    add("--no-cross-documents", dest="cross_documents", action="store_false",
        help="MLM / GPT: end each sequence with its document (RoBERTa's DOC-SENTENCES) instead of "
        "packing the next document after a [SEP]")
    add("--word-segmenter", help="'jieba' or 'module:function' giving the words of a text "
        "(default: whitespace/punctuation words, every CJK character alone)")
    add("--format", dest="document_format", default="auto", choices=["auto", "blank_lines", "lines"])
    add("--documents-per-shard", type=int, default=5000)
    add("--workers", type=int, help="processes writing shards (default: CPU count)")
    add("--seed", type=int, default=12345)


def run_prepare(args):
    from pretraining.data_utils import prepare

    info = prepare(args.input, args.output, vocab=args.vocab, objective=args.objective,
                   max_seq_length=args.max_seq_length, masked_lm_prob=args.masked_lm_prob,
                   max_predictions_per_seq=args.max_predictions_per_seq,
                   whole_word_mask=args.whole_word_mask, short_seq_prob=args.short_seq_prob,
                   dupe_factor=args.dupe_factor, seed=args.seed,
                   cross_documents=args.cross_documents, do_lower_case=args.do_lower_case,
                   word_segmenter=args.word_segmenter, documents_per_shard=args.documents_per_shard,
                   workers=args.workers, document_format=args.document_format,
                   min_count=args.min_count, max_vocab_size=args.max_vocab_size)
    print(f"wrote {info['examples']} examples ({info['tokens']} tokens, vocabulary of "
          f"{info['vocab_size']}) in {len(info['shards'])} shards to {args.output}")


# Model-size flags -> Google bert_config keys.
MODEL_FLAGS = {
    "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
    "dropout": "hidden_dropout_prob", "attention_dropout": "attention_probs_dropout_prob",
    "max_position": "max_position_embeddings",
}
# Training flags, passed to pretrain() when given (None: the settings file's or the default).
TRAINING_FLAGS = ("steps", "batch_size", "learning_rate", "warmup_steps", "weight_decay",
                  "exclude_from_weight_decay", "grad_accum_steps", "lamb", "clip_norm",
                  "checkpoint_every", "keep_checkpoints", "log_every", "seed", "shuffle_buffer",
                  "length_multiple_of", "group_by_length", "init_checkpoint", "ignore_invalid_weights",
                  "strategy", "tpu", "distribution")


def add_pretrain_arguments(parser):
    add = parser.add_argument
    add("--data", required=True, help="a directory written by `bert4k prepare`")
    add("--output", required=True, help="checkpoints, logs and the final model; rerun to resume")
    add("--config", help="bert_config.json, or a size: tiny, mini, small, medium, base (default tiny)")
    add("--settings", help="JSON file of pretrain() arguments (flags given here win)")
    for flag in MODEL_FLAGS:
        add("--" + flag.replace("_", "-"), type=float if "dropout" in flag else int)
    add("--steps", type=int, help="optimizer updates")
    add("--batch-size", type=int, help="global batch size (all replicas and workers)")
    add("--learning-rate", type=float, help="peak learning rate (default 1e-4)")
    add("--warmup-steps", type=int, help="linear warmup, then linear decay (default 10%% of steps)")
    add("--weight-decay", type=float, help="decoupled weight decay rate (default 0.01)")
    add("--exclude-from-weight-decay", nargs="*", help="regexes of weights not decayed (default Norm bias)")
    add("--grad-accum-steps", type=int)
    add("--lamb", action="store_true", default=None, help="LAMB layer adaptation")
    add("--clip-norm", type=float, help="global gradient norm clip (default 1.0; 0 disables)")
    add("--checkpoint-every", type=int)
    add("--keep-checkpoints", type=int)
    add("--log-every", type=int)
    add("--seed", type=int)
    add("--shuffle-buffer", type=int)
    add("--length-multiple-of", type=int,
        help="cut each batch after its longest sequence, rounded up to a multiple of this "
             "(default 32; 0 keeps max_seq_length, as TPUs need)")
    add("--group-by-length", type=int,
        help="sort the sequences of this many batches by length before batching them, so that "
             "cutting after the longest removes most padding (default 16; 0: not)")
    add("--init-checkpoint", help="start from these weights (Google prefix, HF dir, .safetensors)")
    add("--ignore-invalid-weights", action="store_true", default=None,
        help="with --init-checkpoint: keep initial values for weights it lacks (e.g. NSP head)")
    add("--strategy", choices=["mirrored", "multiworker", "tpu"],
        help="TensorFlow backend: tf.distribute strategy (default: one device; multiworker "
             "reads TF_CONFIG)")
    add("--tpu", help="TensorFlow backend: TPU address (implies --strategy tpu)")
    add("--distribution", choices=["data_parallel"],
        help="JAX backend: keras.distribution.DataParallel over every local device "
             "(default: one device)")
    add("--verbose", type=int, default=1, help="0 silent, 1 progress bar, 2 one line per log")


def pretrain_arguments(args):
    """pretrain()'s keyword arguments from the settings file and the flags."""
    settings = {}
    if args.settings:
        with open(args.settings, encoding="utf-8") as f:
            settings = json.load(f)
    settings.update({name: getattr(args, name) for name in TRAINING_FLAGS
                     if getattr(args, name) is not None})
    overrides = {key: getattr(args, flag) for flag, key in MODEL_FLAGS.items()
                 if getattr(args, flag) is not None}
    config = args.config or settings.pop("config", None) or "tiny"
    settings.pop("config", None)
    for name in ("steps", "batch_size"):
        if name not in settings:
            raise SystemExit(f"bert4k pretrain: --{name.replace('_', '-')} is required "
                             "(as a flag or in --settings).")
    return dict(config=config, config_overrides=overrides, data_dir=args.data,
                output_dir=args.output, verbose=args.verbose, **settings)


def run_pretrain(args):
    from pretraining.pretraining import base_config, pretrain

    arguments = pretrain_arguments(args)
    arguments["config"] = {**base_config(arguments["config"]), **arguments.pop("config_overrides")}
    result = pretrain(**arguments)
    state = "interrupted at" if result["interrupted"] else "finished at"
    print(f"{state} step {result['step']}; output in {result['output_dir']}")
