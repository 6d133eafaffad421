"""Fill in [MASK]ed characters with a BERT's masked-language-model head.

Any checkpoint with the MLM head (Google's cls/predictions/* variables) works:

    python examples/basic_masked_language_model.py --config bert_config.json \
        --checkpoint bert_model.ckpt --vocab vocab.txt "这家酒店的服务[MASK]好。"

With no --checkpoint it uses the main job's model (README's first command writes
runs/main_job/model/: bert_config.json, bert_model.ckpt, vocab.txt), when that exists. On a fresh
clone it does not, and there is no Chinese checkpoint with an MLM head in the repository (MiniLM, a
sentence-transformers model, ships without one: its predictions would be noise), so the script
first trains the small config as a masked LM on the bundled corpus for --epochs: a miniature of
pretraining (15% of the characters chosen; of those 80% become [MASK], 10% a random character, 10%
stay), so that the demo runs anywhere.

Reported: the top predictions for each [MASK] of the example sentences, and the accuracy of the top
prediction on the test split with 15% of each review's characters replaced by [MASK].

Result at the default settings on a fresh clone (the small config, hidden 128, 2 layers, trained
here for 1 epoch: maxlen 64, batch 32, learning rate 3e-4; 2 min 42 s on README's idle 2-core AMD
EPYC VM): accuracy 0.057 on masked test characters. That is the first stage of MLM training: the
model has learnt the character frequencies (its guesses are ， 的 是 for every [MASK]) and not yet the
context, which takes far more steps than a demo can spend. The main job's model (1,500 pretraining
steps) does a little better: accuracy 0.066, in 16 s as there is nothing to train, its top guess
still ， for every [MASK] of the example sentences. Meaningful fills need a checkpoint pretrained
for far longer.
"""

import pathlib

import numpy as np

import common
from bert4k.snippets import DataGenerator, sequence_padding

PRETRAINED = pathlib.Path(__file__).resolve().parents[1] / "runs" / "main_job" / "model"
TEXTS = [
    "这家酒店的服务[MASK]好，房间也很干净。",
    "这本书的内容很丰富，值得一[MASK]。",
    "电脑的屏[MASK]有点小，但是运行速度很快。",
    "物流太慢了，[MASK][MASK]也不好，不会再买了。",
]
MASK_RATE = 0.15


def mask_tokens(token_ids, tokenizer, rng, training=True):
    """(masked ids, weights): 15% of the non-special tokens chosen (weight 1); in training 80% of
    those become [MASK], 10% a random token and 10% stay, in evaluation all become [MASK]."""
    token_ids = np.array(token_ids)
    chosen = rng.random(len(token_ids)) < MASK_RATE
    chosen[[0, -1]] = False  # [CLS] and [SEP]
    masked = token_ids.copy()
    action = rng.random(len(token_ids)) if training else np.zeros(len(token_ids))
    masked[chosen & (action < 0.8)] = tokenizer._token_mask_id
    replace = chosen & (action >= 0.8) & (action < 0.9)
    masked[replace] = rng.integers(5, tokenizer.vocab_size, replace.sum())  # past the specials
    return masked, chosen.astype("float32")


class Generator(DataGenerator):
    """((masked ids, segment ids), original ids, weights): Keras weighs the loss by the last."""

    def __init__(self, data, tokenizer, maxlen, batch_size, training=True, seed=0):
        super().__init__(data, batch_size)
        self.tokenizer, self.maxlen, self.training = tokenizer, maxlen, training
        self.rng = np.random.default_rng(seed)

    def __iter__(self, random=False):
        if not self.training:
            self.rng = np.random.default_rng(0)  # the same masks on every pass
        inputs, targets, weights = [], [], []
        for is_end, (text, _) in self.sample(random):
            token_ids = self.tokenizer.encode(text, maxlen=self.maxlen)[0]
            masked, chosen = mask_tokens(token_ids, self.tokenizer, self.rng, self.training)
            inputs.append(masked)
            targets.append(token_ids)
            weights.append(chosen)
            if len(inputs) == self.batch_size or is_end:
                inputs = sequence_padding(inputs, length=self.maxlen)
                yield ((inputs, np.zeros_like(inputs)), sequence_padding(targets, self.maxlen),
                       sequence_padding(weights, self.maxlen))
                inputs, targets, weights = [], [], []


def masked_accuracy(model, generator):
    correct = total = 0.0
    for inputs, targets, weights in generator.fortest():
        predicted = model.predict_on_batch(inputs).argmax(-1)
        correct += ((predicted == targets) * weights).sum()
        total += weights.sum()
    return correct / max(total, 1)


def fill(model, tokenizer, text, top=5):
    token_ids, segment_ids = tokenizer.encode(text)
    probas = model.predict([np.array([token_ids]), np.array([segment_ids])], verbose=0)[0]
    positions = [i for i, t in enumerate(token_ids) if t == tokenizer._token_mask_id]
    return [tokenizer.ids_to_tokens(np.argsort(-probas[i])[:top]) for i in positions]


def main(argv=None):
    parser = common.argument_parser(__doc__, epochs=1, batch_size=32, maxlen=64)
    parser.set_defaults(config=None, vocab=None)  # resolved below
    parser.add_argument("texts", nargs="*", default=TEXTS, help="texts with [MASK] tokens")
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.config is None and (PRETRAINED / "bert_model.ckpt.index").exists():
        args.config, args.vocab = PRETRAINED / "bert_config.json", PRETRAINED / "vocab.txt"
        args.checkpoint = PRETRAINED / "bert_model.ckpt"
    args.config, args.vocab = args.config or common.SMALL_CONFIG, args.vocab or common.CHAR_VOCAB
    tokenizer = common.setup(args)
    model = common.build_model(args, tokenizer, with_mlm=True)

    if args.checkpoint is None:
        print(f"No checkpoint given and none in {PRETRAINED}: training a masked LM first.")
        model.compile(loss="sparse_categorical_crossentropy", optimizer=common.optimizer(args),
                      weighted_metrics=["sparse_categorical_accuracy"])
        generator = Generator(common.read_corpus("train", args), tokenizer, args.maxlen,
                              args.batch_size, seed=args.seed)
        model.fit(generator.forfit(), steps_per_epoch=len(generator), epochs=args.epochs)

    test = Generator(common.read_corpus("test", args), tokenizer, args.maxlen, args.batch_size,
                     training=False)
    accuracy = masked_accuracy(model, test)
    print(f"accuracy on masked test characters: {accuracy:.4f}")
    for text in args.texts:
        print(f"  {text}")
        for position, candidates in enumerate(fill(model, tokenizer, text), 1):
            print(f"    [MASK] {position}: {' '.join(candidates)}")
    return accuracy


if __name__ == "__main__":
    main()
