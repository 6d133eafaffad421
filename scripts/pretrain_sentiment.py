"""Pretrain a small BERT from scratch on the bundled Chinese corpus (data/sentiment.zip).

    python scripts/pretrain_sentiment.py --output runs/sentiment [--size tiny] [--steps 600]

Steps: the 16,883 training reviews become a text file (one review a line); `prepare` builds a
character vocabulary and RoBERTa-style whole-word-masked sequences of 128 tokens; `pretrain`
trains (rerunning the same command resumes from the last checkpoint); the MLM loss curve and the
tokens/s reached are printed. OUTPUT/model then holds bert_config.json, config.json, vocab.txt,
bert_model.ckpt.* and model.safetensors, and reference.npz: this model's MLM probabilities on a
few test reviews.

    /path/to/python-with-transformers scripts/pretrain_sentiment.py --check-transformers OUTPUT/model

loads model.safetensors with transformers' BertForPreTraining (torch, no TensorFlow or Keras
needed) and compares its MLM probabilities with reference.npz. `--transformers-python PATH` in
the first form runs that check at the end.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

SIZES = {  # Google bert_config keys; dropout as in BERT
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "small2": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024),
}


def prepare_corpus(output, data_dir, max_seq_length, workers):
    from bert4k import assets
    from pretraining import data_utils

    if os.path.exists(os.path.join(data_dir, data_utils.INFO_FILE)):
        return data_dir, data_utils.read_info(data_dir)
    os.makedirs(output, exist_ok=True)
    corpus = os.path.join(output, "sentiment_train.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.writelines(text.replace("\n", " ") + "\n" for text, _ in assets.read_sentiment("train"))
    started = time.time()
    info = data_utils.prepare([corpus], data_dir, objective="mlm", max_seq_length=max_seq_length,
                              max_predictions_per_seq=max(20, round(max_seq_length * 0.15)),
                              min_count=2, workers=workers, documents_per_shard=2000)
    print(f"prepared {info['examples']} sequences, {info['tokens']} tokens, vocabulary "
          f"{info['vocab_size']}, in {time.time() - started:.0f}s")
    return data_dir, info


def write_reference(model_dir, max_seq_length):
    """MLM probabilities of our exported model on test reviews with a few characters masked."""
    import numpy as np

    from bert4k import assets
    from bert4k.models import build_transformer_model
    from bert4k.tokenizers import Tokenizer

    tokenizer = Tokenizer(os.path.join(model_dir, "vocab.txt"))
    rows = [tokenizer.encode(text, maxlen=max_seq_length)[0]
            for text, _ in assets.read_sentiment("test", limit=4)]
    length = max(map(len, rows))
    token_ids = np.zeros((len(rows), length), "int32")
    for i, row in enumerate(rows):
        row = list(row)
        for position in range(3, len(row) - 1, 7):
            row[position] = tokenizer._token_mask_id
        token_ids[i, :len(row)] = row
    model = build_transformer_model(os.path.join(model_dir, "bert_config.json"),
                                    os.path.join(model_dir, "bert_model.ckpt"), with_mlm=True)
    probabilities = model.predict([token_ids, np.zeros_like(token_ids)], verbose=0)
    np.savez(os.path.join(model_dir, "reference.npz"), token_ids=token_ids, probabilities=probabilities)


def check_transformers(model_dir):
    """Load model.safetensors in transformers and compare with reference.npz (real tokens only)."""
    import numpy as np
    import torch
    from transformers import BertForMaskedLM, BertForPreTraining

    reference = np.load(os.path.join(model_dir, "reference.npz"))
    token_ids = torch.tensor(reference["token_ids"], dtype=torch.long)
    mask = token_ids != 0
    worst = {}
    for model_class in (BertForPreTraining, BertForMaskedLM):
        model, info = model_class.from_pretrained(model_dir, output_loading_info=True)
        model.eval()
        problems = {k: v for k, v in info.items() if v}
        with torch.no_grad():
            outputs = model(input_ids=token_ids, attention_mask=mask.long())
        logits = outputs.prediction_logits if model_class is BertForPreTraining else outputs.logits
        probabilities = torch.softmax(logits, -1).numpy()
        difference = np.abs(probabilities - reference["probabilities"])[mask.numpy()].max()
        worst[model_class.__name__] = float(difference)
        print(f"{model_class.__name__}: loading problems {problems or 'none'}; "
              f"max |p_transformers - p_bert4k| = {difference:.2e}")
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/sentiment")
    parser.add_argument("--data", help="prepared data to reuse (default OUTPUT/data)")
    # tiny (L2-H128) reads ~8,700 tokens/s on 2 CPU cores: 600 steps of 32 x 128 are one pass
    # over the corpus in ~2.5 minutes (L2-H256 ~3,400 tokens/s, mini L4-H256 ~1,700).
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--transformers-python", help="a Python with torch + transformers")
    parser.add_argument("--check-transformers", metavar="MODEL_DIR")
    args = parser.parse_args(argv)
    if args.check_transformers:
        worst = check_transformers(args.check_transformers)
        return 0 if max(worst.values()) < 1e-4 else 1

    from pretraining.pretraining import pretrain

    data_dir, info = prepare_corpus(args.output, args.data or os.path.join(args.output, "data"),
                                    args.max_seq_length, args.workers)
    model_dir = os.path.join(args.output, "model")
    started = time.time()
    result = pretrain(SIZES[args.size], data_dir, model_dir, steps=args.steps,
                      batch_size=args.batch_size, learning_rate=args.learning_rate,
                      warmup_steps=args.steps // 10, log_every=20, checkpoint_every=200)
    history = result["history"]
    if not history:
        print("nothing left to train: the run had already finished")
        return 0
    print(json.dumps(dict(
        size=args.size, steps=result["step"], seconds=round(time.time() - started),
        ln_vocab=round(math.log(info["vocab_size"]), 3),
        first_loss=round(history[0]["mlm_loss"], 3), last_loss=round(history[-1]["mlm_loss"], 3),
        last_accuracy=round(history[-1]["mlm_accuracy"], 3),
        tokens_per_sec=round(sum(r["tokens_per_sec"] for r in history[1:]) / max(len(history) - 1, 1)),
        curve=[(r["step"], round(r["mlm_loss"], 2)) for r in history])))
    if result["interrupted"]:
        return 1
    write_reference(model_dir, args.max_seq_length)
    if args.transformers_python:
        return subprocess.call([args.transformers_python, os.path.abspath(__file__),
                                "--check-transformers", model_dir])
    return 0


if __name__ == "__main__":
    sys.exit(main())
