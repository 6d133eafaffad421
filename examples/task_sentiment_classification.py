"""Sentiment classification of Chinese reviews: is a review positive or negative?

Data: the bundled corpus (data/sentiment.zip: hotel, book, laptop, ... reviews labelled 0/1;
16,883 train / 2,111 valid / 2,111 test). Model: BERT, the pooled [CLS] vector, Dense(2,
softmax), trained with cross-entropy; reports accuracy on the valid and test splits.

    python examples/task_sentiment_classification.py
    python examples/task_sentiment_classification.py --config runs/main_job/model/bert_config.json \
        --checkpoint runs/main_job/model/bert_model.ckpt --vocab runs/main_job/model/vocab.txt

Result at the default settings (random init, small config: hidden 128, 2 layers; maxlen 64,
batch 32, learning rate 1e-3, 2 epochs over the full training split): test accuracy 0.853
(valid 0.851). It took 2 min 43 s on README's idle 2-core AMD EPYC VM (130 ms a step); before
DataGenerator undid TensorFlow's malloc setting (`keep_freed_memory`), 5 min 6 s (280 ms a step,
the same accuracies). `--epochs 1` halves that. A Chinese BERT-base reaches about 0.95 on this
corpus (bert4keras's example): pretraining is what closes the gap.
"""

import keras
import numpy as np

import common
from bert4k.snippets import DataGenerator, sequence_padding


class Generator(DataGenerator):
    """Batches of ((token_ids, segment_ids), labels), each padded to its longest review rounded up
    to a multiple of 32, or to maxlen (a few shapes: XLA and JAX compile once per shape). With
    `group_by_length` k > 1, shuffled passes batch reviews of similar length (character count) out
    of every k batches, so the batches carry little padding (the main job takes 16). (A tuple, not
    a list: Keras 3's generator adapter takes a list for one array.)"""

    def __init__(self, data, tokenizer, maxlen, batch_size, group_by_length=1):
        super().__init__(data, batch_size, length_of=lambda item: len(item[0]),
                         group_by_length=group_by_length)
        self.tokenizer, self.maxlen = tokenizer, maxlen

    def __iter__(self, random=False):
        token_ids, labels = [], []
        for is_end, (text, label) in self.sample(random):
            token_ids.append(self.tokenizer.encode(text, maxlen=self.maxlen)[0])
            labels.append([label])
            if len(token_ids) == self.batch_size or is_end:
                # Never past maxlen: the model's position embeddings may end there.
                token_ids = sequence_padding(token_ids, multiple_of=32)[:, :self.maxlen]
                yield (token_ids, np.zeros_like(token_ids)), np.array(labels)
                token_ids, labels = [], []


def accuracy(model, generator):
    correct = total = 0
    for inputs, labels in generator.fortest():
        predicted = model.predict_on_batch(inputs).argmax(axis=-1)
        correct += (predicted == labels[:, 0]).sum()
        total += len(labels)
    return correct / total


def main(argv=None):
    parser = common.argument_parser(__doc__, epochs=2, batch_size=32, maxlen=64,
                                    learning_rate=1e-3)
    args = parser.parse_args(argv)
    tokenizer = common.setup(args)
    train, valid, test = (common.read_corpus(split, args) for split in ("train", "valid", "test"))
    train_generator, valid_generator, test_generator = (
        Generator(data, tokenizer, args.maxlen, args.batch_size) for data in (train, valid, test)
    )

    bert = common.build_model(args, tokenizer, with_pool=True)
    output = keras.layers.Dropout(0.1)(bert.output)
    output = keras.layers.Dense(2, activation="softmax")(output)
    model = keras.Model(bert.inputs, output)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=common.optimizer(args),
                  metrics=["accuracy"])
    model.fit(train_generator.forfit(), steps_per_epoch=len(train_generator), epochs=args.epochs)

    valid_accuracy = accuracy(model, valid_generator)
    test_accuracy = accuracy(model, test_generator)
    print(f"valid accuracy: {valid_accuracy:.4f}  test accuracy: {test_accuracy:.4f}")
    return test_accuracy


if __name__ == "__main__":
    main()
