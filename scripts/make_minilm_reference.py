"""Reference outputs of the real MiniLM-L6-H384 BERT, computed by Hugging Face transformers.

Needs torch and transformers (not test dependencies):
    pip install torch==2.13.0 transformers safetensors
    python scripts/make_minilm_reference.py --model-dir DIR   # writes tests/fixtures/minilm_reference.npz

With --check-saved DIR (a directory holding a model.safetensors written by
bert4k.checkpoints.save_weights_as_safetensors), it instead loads that file with transformers'
BertModel and compares its outputs with the committed reference.
"""

import argparse
import os

import numpy as np
import torch
from transformers import BertConfig, BertModel

try:  # transformers 5 keeps the Python (original BERT) tokenizer under this name
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as BertTokenizer
except ImportError:  # transformers 4
    from transformers import BertTokenizer

# Pairs exercise segment ids; the batch pads to its longest member, exercising the padding mask.
SENTENCES = [
    ("The quick brown fox jumps over the lazy dog.", None),
    ("A man is playing a guitar on stage.", "Someone performs music for an audience."),
    ("Transformers changed natural language processing.", None),
    ("I can't believe it's already November!", None),
    ("Café au lait costs €3.50 in Paris, naïvely speaking.", None),
    ("How do I reset my password?", "Steps to recover a forgotten account password."),
    ("北京是中国的首都。", None),
    ("Numbers like 3.14159 and 2,718 appear in math.", None),
    ("short", None),
    ("The weather today is sunny with a light breeze from the west coast of the island, "
     "and tomorrow brings rain.", None),
    ("Γειά σου κόσμε — hello world in Greek.", "ΣΊΣΥΦΟΣ pushed the rock."),
    ("Emoji 😀 and symbols © ™ are rare in vocabularies.", None),
]

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "minilm_reference.npz")


def encode_batch(tokenizer):
    firsts = [a for a, _ in SENTENCES]
    seconds = [b for _, b in SENTENCES]
    ids, segments = [], []
    for a, b in zip(firsts, seconds):
        first = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(a))
        second = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(b)) if b else None
        ids.append(tokenizer.build_inputs_with_special_tokens(first, second))
        segments.append([0] * (len(first) + 2) + ([1] * (len(second) + 1) if second else []))
    length = max(map(len, ids))
    pad = lambda rows: np.array([r + [0] * (length - len(r)) for r in rows], dtype=np.int64)  # noqa
    return pad(ids), pad(segments)


def run(model, ids, segments):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            token_type_ids=torch.tensor(segments),
            attention_mask=torch.tensor((ids != 0).astype(np.int64)),
        )
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def make_reference(model_dir):
    tokenizer = BertTokenizer(os.path.join(model_dir, "vocab.txt"), do_lower_case=True)
    model = BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    ids, segments = encode_batch(tokenizer)
    sequence, pooled = run(model, ids, segments)
    np.savez_compressed(
        FIXTURE,
        texts=np.array([a for a, _ in SENTENCES]),
        pairs=np.array([b or "" for _, b in SENTENCES]),
        token_ids=ids.astype(np.int32),
        segment_ids=segments.astype(np.int32),
        sequence_output=sequence.astype(np.float32),
        pooled_output=pooled.astype(np.float32),
    )
    print(f"wrote {FIXTURE}: ids {ids.shape}, sequence {sequence.shape}")


def check_saved(saved_dir, model_dir):
    config = BertConfig.from_pretrained(model_dir)
    model = BertModel.from_pretrained(saved_dir, config=config, attn_implementation="eager").eval()
    reference = np.load(FIXTURE)
    sequence, pooled = run(model, reference["token_ids"].astype(np.int64),
                           reference["segment_ids"].astype(np.int64))
    seq_diff = np.abs(sequence - reference["sequence_output"]).max()
    pool_diff = np.abs(pooled - reference["pooled_output"]).max()
    print(f"transformers BertModel on bert4k's safetensors: max abs diff sequence {seq_diff:.2e}, "
          f"pooled {pool_diff:.2e}")
    assert seq_diff <= 1e-4 and pool_diff <= 1e-4


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="the MiniLM directory (config.json ...)")
    parser.add_argument("--check-saved", help="directory with a bert4k-written model.safetensors")
    args = parser.parse_args()
    if args.check_saved:
        check_saved(args.check_saved, args.model_dir)
    else:
        make_reference(args.model_dir)


if __name__ == "__main__":
    main()
