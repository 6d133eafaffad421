#!/usr/bin/env python
"""Per-token generation time as the output grows: the key/value cache against recomputing the prefix.

    .venv/bin/python scripts/benchmark_decoding.py [--lengths 16 32 64 128] [--batch 4]

A GPT-style model (application='lm', random weights, hidden 256, 4 layers; --hidden/--layers to
change) generates greedily (beam_search with topk=1) from a 16-token prompt, for each output
length, in two ways:
  cached    AutoRegressiveDecoder(model=transformer): the prompt once, then one cached step per
            token, which writes its key and value into the buffers and attends to the stored
            ones (bert4k.decoding: the buffers stay backend tensors, grow in power-of-two
            buckets and are touched only where a step needs them, so a step costs about the
            same at any length until reading the keys and values rivals the weights);
  uncached  bert4keras's way: a `predict` that runs the whole prefix again for every new token
            (O(length^2) per token with attention, O(length) in the dense layers).
It prints milliseconds per generated token (median of --repeats runs, after one warm-up run per
length; the cached column includes the prompt's run) and checks that both produce the same
tokens. A flat 'cached' column is what the cache is for; the uncached column grows with the
length. On a machine shared with other work, compare columns from one run, not across runs.
"""

import argparse
import statistics
import time

import numpy as np

from bert4k.decoding import AutoRegressiveDecoder
from bert4k.models import build_transformer_model


class Uncached(AutoRegressiveDecoder):
    """Recompute the whole prefix every step, as bert4keras did."""

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.keras_model = model

    @AutoRegressiveDecoder.wraps(default_rtype="probas")
    def predict(self, inputs, output_ids, states):
        token_ids = np.concatenate([inputs[0], output_ids], axis=1)
        probas = self.keras_model.predict_on_batch([token_ids, np.zeros_like(token_ids)])
        return probas[:, -1]


def timed(fn, repeats):
    fn()  # warm-up: graph tracing for the new shapes
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--batch", type=int, default=4, help="prompts decoded together")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
    args = parser.parse_args(argv)

    transformer = build_transformer_model(
        application="lm", with_mlm=True, return_keras_model=False, vocab_size=args.vocab,
        hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1), intermediate_size=4 * args.hidden,
        max_position=16 + max(args.lengths) + 1)
    rng = np.random.default_rng(0)
    prompts = [[list(rng.integers(5, args.vocab, 16)), [0] * 16] for _ in range(args.batch)]
    batch = [list(column) for column in zip(*prompts)]
    never = args.vocab  # an end id no model output can take: every run has its full length

    print(f"model: hidden {args.hidden}, {args.layers} layers; batch {args.batch}; prompt 16 tokens")
    print(f"{'new tokens':>10}  {'cached ms/token':>15}  {'uncached ms/token':>17}  {'ratio':>6}  same")
    for length in args.lengths:
        settings = dict(start_id=None, end_id=never, maxlen=length, minlen=length)
        cached = AutoRegressiveDecoder(model=transformer, **settings)
        uncached = Uncached(transformer.model, **settings)
        t_cached, out_cached = timed(lambda: cached.beam_search(batch, topk=1), args.repeats)
        t_uncached, out_uncached = timed(lambda: uncached.beam_search(batch, topk=1), args.repeats)
        same = [list(a) for a in out_cached] == [list(b) for b in out_uncached]
        print(f"{length:>10}  {1000 * t_cached / length:>15.2f}  {1000 * t_uncached / length:>17.2f}"
              f"  {t_uncached / t_cached:>6.1f}  {same}")


if __name__ == "__main__":
    main()
