"""Sequence labelling with a CRF: put the punctuation back into Chinese reviews.

Task, built from the bundled corpus: the punctuation marks of a review are removed, and each
remaining character is labelled with the mark that followed it: none, comma (，、；： and their
ASCII forms), full stop (。.…), exclamation mark (！!) or question mark (？?). Spaces are dropped.
The model must restore the marks from the bare characters.

Model: BERT, a Dense layer of per-character label scores, and a ConditionalRandomField on top
(its transition scores learn which labels follow which); trained on the CRF's negative
log-likelihood, decoded with ViterbiDecoder. Reported: micro precision / recall / F1 over the
punctuation marks of the test split (a mark counts when its position and kind are both right).

    python examples/task_sequence_labeling_crf.py
    python examples/task_sequence_labeling_crf.py "这家酒店位置很好服务也不错下次还会来"

Result at the default settings (random init, small config: hidden 128, 2 layers; the first 64
characters of each review, batch 32, learning rate 3e-4, 1 epoch over the full training split):
test F1 0.079 (precision 0.458, recall 0.043), in 1 min 45 s on README's idle 2-core AMD EPYC VM
(147 ms a step). Weak: trained from scratch for one epoch, the model has learnt the sure cases (a
question mark after 吗) and stays silent elsewhere; the marks need more Chinese than that.
Starting from the main job's pretrained model helps at a learning rate suited to its small size:
`--config runs/main_job/model/bert_config.json --checkpoint runs/main_job/model/bert_model.ckpt
--vocab runs/main_job/model/vocab.txt --learning-rate 1e-3` gave F1 0.127 (precision 0.492,
recall 0.073) against 0.078 from random weights at 1e-3; at the 5e-5 the examples take by
default from a checkpoint (meant for BERT-base), 0.048.
"""

import keras
import numpy as np
from keras import ops

import common
from bert4k.layers import ConditionalRandomField
from bert4k.snippets import DataGenerator, ViterbiDecoder, sequence_padding

LABELS = ["", "，", "。", "！", "？"]
MARKS = {**dict.fromkeys("，,、；;：:", 1), **dict.fromkeys("。.…", 2), **dict.fromkeys("！!", 3),
         **dict.fromkeys("？?", 4)}
CRF_LEARNING_RATE = 0.02  # the transitions' learning rate, whatever the encoder's (bert4keras: 2e-5 x 1000)


def strip_punctuation(text):
    """(characters, label of each): the text without marks or spaces, and the mark after each."""
    chars, labels = [], []
    for ch in text:
        if ch in MARKS:
            if chars and labels[-1] == 0:  # of a run of marks, the first one counts
                labels[-1] = MARKS[ch]
        elif not ch.isspace():
            chars.append(ch)
            labels.append(0)
    return chars, labels


def encode(tokenizer, chars, maxlen):
    """[CLS] + one token per character + [SEP] (characters the vocab lacks become [UNK])."""
    chars = chars[: maxlen - 2]
    tokens = [tokenizer._token_start] + [ch.lower() for ch in chars] + [tokenizer._token_end]
    return tokenizer.tokens_to_ids(tokens)


class Generator(DataGenerator):
    def __init__(self, data, tokenizer, maxlen, batch_size):
        super().__init__([strip_punctuation(text) for text, _ in data], batch_size)
        self.tokenizer, self.maxlen = tokenizer, maxlen

    def __iter__(self, random=False):
        token_ids, labels = [], []
        for is_end, (chars, tags) in self.sample(random):
            token_ids.append(encode(self.tokenizer, chars, self.maxlen))
            labels.append([0] + tags[: self.maxlen - 2] + [0])
            if len(token_ids) == self.batch_size or is_end:
                token_ids = sequence_padding(token_ids, length=self.maxlen)
                yield (token_ids, np.zeros_like(token_ids)), sequence_padding(labels, self.maxlen)
                token_ids, labels = [], []


def predict_labels(model, crf, tokenizer, texts_chars, maxlen, batch_size=64):
    """Viterbi-decoded labels of each character (list of character lists in, label lists out)."""
    token_ids = sequence_padding([encode(tokenizer, c, maxlen) for c in texts_chars], length=maxlen)
    scores = model.predict([token_ids, np.zeros_like(token_ids)], batch_size=batch_size, verbose=0)
    viterbi = ViterbiDecoder(ops.convert_to_numpy(crf.trans))
    results = []
    for chars, row in zip(texts_chars, scores):
        length = min(len(chars), maxlen - 2) + 2
        results.append(list(viterbi.decode(row[:length])[1:-1]))
    return results


def f1_score(gold, predicted):
    """Micro precision, recall and F1 over the marks (label != 0)."""
    true_positives = n_gold = n_predicted = 0
    for g, p in zip(gold, predicted):
        g, p = np.array(g[: len(p)]), np.array(p)
        true_positives += ((g == p) & (g != 0)).sum()
        n_gold, n_predicted = n_gold + (g != 0).sum(), n_predicted + (p != 0).sum()
    precision, recall = true_positives / max(n_predicted, 1), true_positives / max(n_gold, 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)


def punctuate(chars, labels):
    return "".join(ch + LABELS[label] for ch, label in zip(chars, labels))


def main(argv=None):
    parser = common.argument_parser(__doc__, epochs=1, batch_size=32, maxlen=64)
    parser.add_argument("texts", nargs="*", help="unpunctuated texts to punctuate after training")
    args = parser.parse_args(argv)
    tokenizer = common.setup(args)
    train, test = common.read_corpus("train", args), common.read_corpus("test", args)

    bert = common.build_model(args, tokenizer)
    scores = keras.layers.Dense(len(LABELS), name="Label-Scores")(bert.output)
    crf = ConditionalRandomField(lr_multiplier=CRF_LEARNING_RATE / args.learning_rate)
    output = crf([scores, ops.not_equal(bert.inputs[0], 0)])
    model = keras.Model(bert.inputs, output)
    model.compile(loss=crf.sparse_loss, optimizer=common.optimizer(args),
                  metrics=[crf.sparse_accuracy])
    generator = Generator(train, tokenizer, args.maxlen, args.batch_size)
    model.fit(generator.forfit(), steps_per_epoch=len(generator), epochs=args.epochs)

    test = [strip_punctuation(text) for text, _ in test]
    predicted = predict_labels(model, crf, tokenizer, [chars for chars, _ in test], args.maxlen)
    precision, recall, f1 = f1_score([labels for _, labels in test], predicted)
    print(f"test precision: {precision:.4f}  recall: {recall:.4f}  F1: {f1:.4f}")
    for (chars, labels), tags in zip(test[:3], predicted):
        print(f"  gold:      {punctuate(chars[:args.maxlen - 2], labels)}")
        print(f"  predicted: {punctuate(chars, tags)}")
    for text in args.texts:
        chars, _ = strip_punctuation(text)
        print(f"  {punctuate(chars, predict_labels(model, crf, tokenizer, [chars], args.maxlen)[0])}")
    return f1


if __name__ == "__main__":
    main()
