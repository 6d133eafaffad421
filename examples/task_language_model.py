"""A GPT-style language model of Chinese reviews: train it, measure its perplexity, let it write.

Task, built from the bundled corpus: predict each next character of a review, [CLS] first and
[SEP] last (the first 64 tokens of each review). Reported: the per-character perplexity on the
test split, next to the perplexity of a unigram model (character frequencies of the training
split) as the baseline; then a few reviews sampled from short prompts.

Model: BERT's layout with a causal attention mask (application='lm') and the MLM head, tied to
the token embeddings, as output layer; cross-entropy on every real next token. Generation:
AutoRegressiveDecoder.random_sample (top-k sampling) with the key/value cache.

    python examples/task_language_model.py
    python examples/task_language_model.py "这本书" "房间"

Result at the default settings (random init, small config: hidden 128, 2 layers; 64 tokens,
batch 32, learning rate 3e-4, 1 epoch over the full training split): test perplexity 142 per
character (unigram baseline: 493), in 3 min 47 s on README's idle 2-core AMD EPYC VM. Samples
read as strings of common review phrases with little sense: "这本书的书。一般，还是我是一次的，
这个书不知道是我们不好是很好，但是很好".
"""

import collections

import keras
import numpy as np
from keras import ops

import common
from bert4k.decoding import AutoRegressiveDecoder
from bert4k.layers import Loss
from bert4k.snippets import DataGenerator, sequence_padding

PROMPTS = ["这本书", "酒店的服务", "这台电脑"]


class Generator(DataGenerator):
    def __init__(self, data, tokenizer, maxlen, batch_size):
        super().__init__(data, batch_size)
        self.tokenizer, self.maxlen = tokenizer, maxlen

    def __iter__(self, random=False):
        token_ids = []
        for is_end, (text, _) in self.sample(random):
            token_ids.append(self.tokenizer.encode(text, maxlen=self.maxlen)[0])
            if len(token_ids) == self.batch_size or is_end:
                token_ids = sequence_padding(token_ids, length=self.maxlen)
                yield ((token_ids, np.zeros_like(token_ids)),)
                token_ids = []


class NextTokenCrossEntropy(Loss):
    """Mean cross-entropy of predicting each next real (non-padding) token."""

    def compute_loss(self, inputs, mask=None):
        token_ids, probas = inputs
        targets = token_ids[:, 1:]
        weights = ops.cast(ops.not_equal(targets, 0), probas.dtype)
        loss = keras.losses.sparse_categorical_crossentropy(targets, probas[:, :-1])
        return ops.sum(loss * weights) / ops.sum(weights)


def perplexity(model, generator):
    """exp of the mean cross-entropy per predicted token over a whole split."""
    total_loss = total_tokens = 0.0
    for (token_ids, segment_ids), in generator.fortest():
        probas = model.predict_on_batch([token_ids, segment_ids])
        targets = token_ids[:, 1:]
        picked = np.take_along_axis(probas[:, :-1], targets[..., None], axis=-1)[..., 0]
        real = targets != 0
        total_loss -= np.log(np.maximum(picked[real], 1e-12)).sum()
        total_tokens += real.sum()
    return float(np.exp(total_loss / total_tokens))


def unigram_perplexity(tokenizer, train, test, maxlen):
    """The baseline: every next token drawn from the training split's token frequencies."""
    counts = collections.Counter()
    for text, _ in train:
        counts.update(tokenizer.encode(text, maxlen=maxlen)[0][1:])
    total = sum(counts.values())
    log_probas = [np.log((counts[i] + 1) / (total + tokenizer.vocab_size))  # add-one smoothing
                  for text, _ in test for i in tokenizer.encode(text, maxlen=maxlen)[0][1:]]
    return float(np.exp(-np.mean(log_probas)))


def main(argv=None):
    parser = common.argument_parser(__doc__, epochs=1, batch_size=32, maxlen=64)
    parser.add_argument("prompts", nargs="*", default=PROMPTS, help="beginnings of reviews")
    parser.add_argument("--samples", type=int, default=2, help="samples per prompt")
    args = parser.parse_args(argv)
    tokenizer = common.setup(args)
    train, test = common.read_corpus("train", args), common.read_corpus("test", args)

    bert = common.build_model(args, tokenizer, application="lm", with_mlm=True,
                              return_keras_model=False)
    output = NextTokenCrossEntropy(output_axis=1)([bert.model.inputs[0], bert.model.output])
    model = keras.Model(bert.model.inputs, output)
    model.compile(optimizer=common.optimizer(args))
    generator = Generator(train, tokenizer, args.maxlen, args.batch_size)
    model.fit(generator.forfit(), steps_per_epoch=len(generator), epochs=args.epochs)

    test_perplexity = perplexity(model, Generator(test, tokenizer, args.maxlen, args.batch_size))
    baseline = unigram_perplexity(tokenizer, train, test, args.maxlen)
    print(f"test perplexity: {test_perplexity:.2f}  (unigram baseline: {baseline:.2f})")

    decoder = AutoRegressiveDecoder(start_id=None, end_id=tokenizer._token_end_id,
                                    maxlen=args.maxlen, model=bert)
    for prompt in args.prompts:
        prompt_ids = tokenizer.encode(prompt)[0][:-1]  # [CLS] prompt, without [SEP]
        samples = decoder.random_sample([prompt_ids, [0] * len(prompt_ids)], n=args.samples, topk=5)
        for ids in samples:
            print(f"  {prompt}{tokenizer.decode(ids).replace(' ', '')}")
    return test_perplexity


if __name__ == "__main__":
    main()
