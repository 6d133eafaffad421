"""The main job: pretrain a small BERT on the bundled Chinese corpus, then measure what it buys.

    python examples/main_job.py                 # 11-14 minutes on README's 2-core AVX2 VM
    python examples/main_job.py --seeds 3       # a third run of each model: about 4 minutes more

1. Pretraining data: the texts of the training reviews (data/sentiment.zip, labels left out)
   become a character vocabulary and RoBERTa-style whole-word-masked sequences (TFRecords), each
   inside one review (DOC-SENTENCES: fine-tuning reads one review at a time too).
2. Pretraining: a small BERT (hidden 128, 2 layers) learns masked-character prediction from
   scratch; the model is written to OUTPUT/model as bert_config.json + vocab.txt + a Google-format
   checkpoint (bert_model.ckpt), which every example takes (--config --checkpoint --vocab).
3. Fine-tuning: the pretrained model classifies the sentiment of the 16,883 labelled training
   reviews (`--labels` for fewer) from the mean of its token states, one epoch, the learning rate
   warmed up and decayed to 0; each batch holds reviews of similar length (`--group-by-length`),
   padded to its longest.
4. The same architecture, vocabulary, data and settings from random weights, for comparison.
   Each is fine-tuned `--seeds` times (classifier and dropout seeds; for the random model also its
   weights), so that a gain is told from the seed's own effect (about 0.5-1 point here).
5. A table: test accuracy (the 2,111 test reviews, mean and range over the seeds) with and
   without pretraining, time, tokens/s, and where the model is.

Rerunning with the same --output reuses the finished pretraining (an interrupted one resumes).
Why these settings, with the measurements and the variants tried: examples/main_job.md.
"""

import argparse
import os
import pathlib
import sys
import time

import numpy as np

from bert4k import assets
from bert4k.tokenizers import Tokenizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # task_sentiment_classification

# Keras (so TensorFlow) is imported in the functions that use it: prepare()'s worker processes
# import this script, and each would spend seconds importing TensorFlow for nothing.

SMALL_BERT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/main_job", help="where data and model go")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--pretrain-batch-size", type=int, default=32)
    parser.add_argument("--pretrain-length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--pretrain-learning-rate", type=float, default=2e-3, help="peak")
    parser.add_argument("--labels", type=int, default=0,
                        help="labelled training reviews to fine-tune on (0: all 16,883)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--maxlen", type=int, default=128, help="tokens per review when fine-tuning")
    parser.add_argument("--group-by-length", type=int, default=16,
                        help="fine-tuning batches hold reviews of similar length drawn from this many "
                             "batches (1: as drawn)")
    parser.add_argument("--learning-rate", type=float, default=5e-4,
                        help="fine-tuning peak (10%% warmup, then linear decay to 0)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--seeds", type=int, default=2,
                        help="fine-tuning runs per model, seeds --seed, --seed + 1, ...")
    return parser


def prepare_data(output, length):
    """Pretraining sequences from the training reviews' texts (one document a line)."""
    from pretraining import data_utils

    data_dir = os.path.join(output, "data")
    if os.path.exists(os.path.join(data_dir, data_utils.INFO_FILE)):
        return data_dir
    os.makedirs(output, exist_ok=True)
    corpus = os.path.join(output, "sentiment_train_texts.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.writelines(text.replace("\n", " ") + "\n" for text, _ in assets.read_sentiment("train"))
    data_utils.prepare([corpus], data_dir, objective="mlm", max_seq_length=length,
                       max_predictions_per_seq=round(length * 0.15) + 1, min_count=2,
                       cross_documents=False, documents_per_shard=2000,
                       workers=min(os.cpu_count() or 1, 4))
    return data_dir


def pretrain(args, data_dir, model_dir):
    """Pretrain (or resume, or reuse); the seconds and tokens/s of this run's steps, if any."""
    from pretraining.pretraining import pretrain as run_pretraining

    started = time.time()
    result = run_pretraining(SMALL_BERT, data_dir, model_dir, steps=args.pretrain_steps,
                             batch_size=args.pretrain_batch_size,
                             learning_rate=args.pretrain_learning_rate,
                             warmup_steps=args.pretrain_steps // 10, checkpoint_every=200,
                             log_every=50, seed=args.seed)
    if result["interrupted"]:
        raise SystemExit(f"pretraining was interrupted at step {result['step']}; rerun to resume")
    history = result["history"]
    if not history:
        return dict(seconds=None, tokens_per_sec=None, mlm_loss=None, mlm_accuracy=None)
    return dict(seconds=time.time() - started,
                tokens_per_sec=np.mean([r["tokens_per_sec"] for r in history[1:] or history]),
                mlm_loss=history[-1]["mlm_loss"], mlm_accuracy=history[-1]["mlm_accuracy"])


def finetune(args, model_dir, pretrained, train, test, seed):
    """Sentiment classifier on the mean of the token states: from the checkpoint, or from random
    weights. (Masked-LM pretraining trains the token states, never [CLS] or the pooler: the mean
    reads what it learnt directly.)"""
    import keras
    import task_sentiment_classification as sentiment  # this directory

    from bert4k.models import build_transformer_model
    from bert4k.optimizers import WarmupLinearDecay

    keras.utils.set_random_seed(seed)
    tokenizer = Tokenizer(os.path.join(model_dir, "vocab.txt"))
    checkpoint = os.path.join(model_dir, "bert_model.ckpt") if pretrained else None
    bert = build_transformer_model(os.path.join(model_dir, "bert_config.json"), checkpoint)
    tokens = keras.ops.not_equal(bert.inputs[0], 0)
    output = keras.layers.GlobalAveragePooling1D()(bert.output, mask=tokens)
    output = keras.layers.Dropout(0.1)(output)
    output = keras.layers.Dense(2, activation="softmax")(output)
    model = keras.Model(bert.inputs, output)
    generator = sentiment.Generator(train, tokenizer, args.maxlen, args.batch_size, args.group_by_length)
    # Decayed to 0, the last updates are small: the accuracy then depends much less on the seed.
    steps = len(generator) * args.epochs
    schedule = WarmupLinearDecay(args.learning_rate, steps // 10, steps)
    model.compile(loss="sparse_categorical_crossentropy",
                  optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01), metrics=["accuracy"])
    print(f"\nfine-tuning {'the pretrained model' if pretrained else 'from random weights'} "
          f"on {len(train)} labelled reviews (seed {seed})")
    started = time.time()
    # On TensorFlow a dataset without tf.data's autotuning: fit then returns at its last step.
    feed = generator.forfit_dataset() if keras.backend.backend() == "tensorflow" else generator.forfit()
    model.fit(feed, steps_per_epoch=len(generator), epochs=args.epochs)
    seconds = time.time() - started
    tokens = args.epochs * sum(len(tokenizer.encode(text, maxlen=args.maxlen)[0]) for text, _ in train)
    accuracy = sentiment.accuracy(model, sentiment.Generator(test, tokenizer, args.maxlen, 64))
    print(f"test accuracy {accuracy:.4f}")
    return dict(accuracy=accuracy, seconds=seconds, tokens_per_sec=tokens / seconds)


def finetune_seeds(args, model_dir, pretrained, train, test):
    """`args.seeds` fine-tuning runs: accuracy is their mean, `accuracies` each one."""
    runs = [finetune(args, model_dir, pretrained, train, test, args.seed + i)
            for i in range(max(args.seeds, 1))]
    accuracies = [run["accuracy"] for run in runs]
    return dict(accuracy=float(np.mean(accuracies)), accuracies=accuracies,
                seconds=sum(run["seconds"] for run in runs),
                tokens_per_sec=float(np.mean([run["tokens_per_sec"] for run in runs])))


def accuracy_cell(run):
    accuracies = run["accuracies"]
    if len(accuracies) == 1:
        return f"test accuracy {accuracies[0]:.4f}"
    return (f"test accuracy {run['accuracy']:.4f} (mean of {len(accuracies)}: "
            f"{min(accuracies):.4f}-{max(accuracies):.4f})")


def gain_verdict(pretrained, random):
    """Whether the seeds tell the two models apart: only when one's worst run beats the other's best."""
    if min(len(run["accuracies"]) for run in (pretrained, random)) < 2:
        return "one seed each: noise not measured, use --seeds 3"
    if min(pretrained["accuracies"]) > max(random["accuracies"]):
        return "every pretrained run beats every random one"
    if max(pretrained["accuracies"]) < min(random["accuracies"]):
        return "every random run beats every pretrained one"
    return "the seeds' ranges overlap: not told apart from noise"


def labelled_subset(rows, size, seed):
    """`size` training reviews drawn at random (all of them for 0)."""
    if not size or size >= len(rows):
        return rows
    chosen = np.random.default_rng(seed).choice(len(rows), size, replace=False)
    return [rows[i] for i in sorted(chosen)]


def print_table(args, pretraining, with_pretraining, from_scratch, model_dir, total_seconds):
    def cell(value, form):
        return "reused" if value is None else form.format(value)

    rows = [
        ("pretraining (MLM)", "loss " + cell(pretraining["mlm_loss"], "{:.2f}")
         + ", acc " + cell(pretraining["mlm_accuracy"], "{:.3f}"),
         cell(pretraining["seconds"], "{:.0f}"), cell(pretraining["tokens_per_sec"], "{:,.0f}")),
    ] + [
        (name, accuracy_cell(run), f"{run['seconds']:.0f}",
         f"{run['tokens_per_sec']:,.0f}")
        for name, run in (("fine-tune, pretrained", with_pretraining),
                          ("fine-tune, random init", from_scratch))
    ]
    epochs = f"{args.epochs} epoch{'s' if args.epochs > 1 else ''}"
    print(f"\nbert4k main job: {args.labels or 'all'} labelled reviews, {epochs}, test set 2,111 reviews")
    widths = [max(len(str(r[i])) for r in rows + [("run", "result", "seconds", "tokens/s")])
              for i in range(4)]
    for row in [("run", "result", "seconds", "tokens/s")] + rows:
        print("  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w)
                        for i, (v, w) in enumerate(zip(row, widths))))
    gain = with_pretraining["accuracy"] - from_scratch["accuracy"]
    verdict = gain_verdict(with_pretraining, from_scratch)
    print(f"pretraining gain: {gain * 100:+.1f} accuracy points ({verdict}); "
          f"total {total_seconds / 60:.1f} min")
    print(f"model: {os.path.abspath(model_dir)} (bert_config.json, vocab.txt, bert_model.ckpt)")
    print(f"  e.g. python examples/task_sentiment_classification.py --config {model_dir}/bert_config.json "
          f"--checkpoint {model_dir}/bert_model.ckpt --vocab {model_dir}/vocab.txt")


def main(argv=None):
    args = argument_parser().parse_args(argv)
    started = time.time()
    model_dir = os.path.join(args.output, "model")
    pretraining = pretrain(args, prepare_data(args.output, args.pretrain_length), model_dir)
    train = labelled_subset(assets.read_sentiment("train"), args.labels, args.seed)
    test = assets.read_sentiment("test")
    with_pretraining = finetune_seeds(args, model_dir, True, train, test)
    from_scratch = finetune_seeds(args, model_dir, False, train, test)
    print_table(args, pretraining, with_pretraining, from_scratch, model_dir, time.time() - started)
    return dict(pretraining=pretraining, pretrained=with_pretraining, random=from_scratch)


if __name__ == "__main__":
    main()
