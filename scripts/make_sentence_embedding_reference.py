"""Reference sentence embeddings of all-MiniLM-L6-v2, as sentence-transformers computes them.

sentence-transformers is not needed: the model directory's modules.json lists its pipeline
(Transformer -> Pooling -> Normalize), 1_Pooling/config.json says the pooling is the mean over
real tokens, and sentence_bert_config.json cuts inputs at max_seq_length 256 tokens. This script
runs exactly those steps with Hugging Face transformers (the tokenizer sentence-transformers
loads, AutoTokenizer, and BertModel) and checks each step's setting in the model directory, so a
changed model directory fails loudly instead of producing another pipeline's numbers.

Needs torch and transformers (not test dependencies):
    pip install torch==2.13.0 transformers
    python scripts/make_sentence_embedding_reference.py [--model-dir DIR]
        # writes tests/fixtures/sentence_embeddings.npz (default DIR: bert4k.assets.minilm_dir())
"""

import argparse
import json
import os

import numpy as np
import torch
from transformers import AutoTokenizer, BertModel

try:  # transformers 5 keeps the Python (original BERT) tokenizer under this name
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as BertTokenizer
except ImportError:  # transformers 4
    from transformers import BertTokenizer

FIXTURE = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                                        "sentence_embeddings.npz"))

# The example's own sentences first, then harder ones: case, accents, numbers, CJK, emoji, and one
# longer than max_seq_length (it must be cut at 256 tokens, [CLS] and [SEP] included).
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "How do I RESET my password?",
    "Café au lait costs €3.50 in Paris, naïvely speaking.",
    "北京是中国的首都。",
    "Emoji 😀 and symbols © ™ are rare in vocabularies.",
    "ok",
    " ".join(f"Sentence number {i} keeps going, and it never quite ends." for i in range(40)),
]


def check_pipeline(model_dir):
    """The settings below are what this script implements; fail if the directory says otherwise."""
    def read(*parts):
        with open(os.path.join(model_dir, *parts), encoding="utf-8") as f:
            return json.load(f)

    modules = [m["type"].rsplit(".", 1)[-1] for m in read("modules.json")]
    assert modules == ["Transformer", "Pooling", "Normalize"], modules
    pooling = read("1_Pooling", "config.json")
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
    assert modes == ["pooling_mode_mean_tokens"], modes
    return read("sentence_bert_config.json")["max_seq_length"]


def sentence_embeddings(model_dir, sentences):
    max_seq_length = check_pipeline(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # what sentence-transformers loads
    legacy = BertTokenizer(os.path.join(model_dir, "vocab.txt"), do_lower_case=True)
    batch = tokenizer(sentences, padding=True, truncation="longest_first",
                      max_length=max_seq_length, return_tensors="pt")
    for row, sentence in enumerate(sentences):  # the fast and the Python tokenizer agree here
        ids = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        pieces = legacy.convert_tokens_to_ids(legacy.tokenize(sentence))[: max_seq_length - 2]
        assert ids == legacy.build_inputs_with_special_tokens(pieces), sentence
    model = BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # sentence-transformers' Pooling
    embeddings = torch.nn.functional.normalize(mean, p=2, dim=1)  # its Normalize
    lengths = batch["attention_mask"].sum(1).numpy()
    return embeddings.numpy(), lengths, max_seq_length


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="the all-MiniLM-L6-v2 directory (default: bert4k's cache)")
    args = parser.parse_args()
    if args.model_dir is None:
        from bert4k import assets
        args.model_dir = str(assets.minilm_dir())
    embeddings, lengths, max_seq_length = sentence_embeddings(args.model_dir, SENTENCES)
    np.savez_compressed(
        FIXTURE,
        sentences=np.array(SENTENCES),
        embeddings=embeddings.astype(np.float32),
        lengths=lengths.astype(np.int32),
        max_seq_length=np.int32(max_seq_length),
    )
    print(f"wrote {FIXTURE}: embeddings {embeddings.shape}, token counts {lengths.tolist()}")


if __name__ == "__main__":
    main()
