"""bert4k: BERT-style pretraining and fine-tuning on Keras 3."""

__version__ = "0.1.0"
