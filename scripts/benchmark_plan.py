"""What scripts/benchmark.py measures: its models, shapes, variants, peer environments and plans,
and the model FLOPs per token. Shared by the driver, the workers (which run in the peers'
environments: only the standard library here) and the report."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"
CACHE = BENCH / "cache"
RESULT_PREFIX = "@@BENCH "

MODELS = {
    "minilm": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
MODEL_TITLES = {"minilm": "MiniLM-L6-H384 (real checkpoint)", "base": "BERT-base size (random weights)"}
VOCAB_SIZE = 30522
INFERENCE_SHAPES = [(1, 128), (8, 128), (32, 128), (8, 512)]
TRAIN_SHAPE = (16, 128)
GENERATOR_FEEDS = ("plain generator", "DataGenerator.forfit")

# Environments: name -> (python, extra environment variables).
ENVIRONMENTS = {
    "main": (ROOT / ".venv" / "bin" / "python", {"KERAS_BACKEND": "tensorflow"}),
    "jax": (BENCH / "jax" / "bin" / "python", {"KERAS_BACKEND": "jax"}),
    "torch": (BENCH / "torch" / "bin" / "python", {"KERAS_BACKEND": "torch"}),
    "keras-hub": (BENCH / "keras-hub" / "bin" / "python", {"KERAS_BACKEND": "tensorflow"}),
    "bert4keras": (BENCH / "bert4keras" / "bin" / "python",
                   {"TF_KERAS": "1", "TF_USE_LEGACY_KERAS": "1"}),
}

# Variants: name -> (environment, implementation, mode, precision). bert4k variants run its
# default attention ('auto': its own batched matmuls on TensorFlow, keras.ops.dot_product_attention
# elsewhere); those in FUSED_ATTENTION run Keras's op instead, to show what the default changes.
VARIANTS = {
    "bert4k-tf-eager": ("main", "bert4k", "eager", "float32"),
    "bert4k-tf-graph": ("main", "bert4k", "graph", "float32"),
    "bert4k-tf-graph-fused": ("main", "bert4k", "graph", "float32"),
    "bert4k-tf-graph-bf16": ("main", "bert4k", "graph", "bfloat16"),
    "bert4k-tf-xla": ("main", "bert4k", "xla", "float32"),
    "bert4k-tf-xla-fused": ("main", "bert4k", "xla", "float32"),
    "bert4k-tf-xla-bf16": ("main", "bert4k", "xla", "bfloat16"),
    "bert4k-jax": ("jax", "bert4k", "xla", "float32"),
    "bert4k-jax-bf16": ("jax", "bert4k", "xla", "bfloat16"),
    "bert4k-torch": ("torch", "bert4k", "eager", "float32"),
    "bert4k-torch-bf16": ("torch", "bert4k", "eager", "bfloat16"),
    "transformers-torch": ("torch", "transformers", "eager", "float32"),
    "keras-hub-tf-graph": ("keras-hub", "keras_hub", "graph", "float32"),
    "keras-hub-tf-xla": ("keras-hub", "keras_hub", "xla", "float32"),
    "bert4keras-tf-graph": ("bert4keras", "bert4keras", "graph", "float32"),
    "bert4keras-tf-xla": ("bert4keras", "bert4keras", "xla", "float32"),
}
FUSED_ATTENTION = {"bert4k-tf-graph-fused", "bert4k-tf-xla-fused"}
# Measured again together in one process (Driver.run_head_to_head).
HEAD_TO_HEAD = ["keras-hub-tf-graph", "keras-hub-tf-xla", "bert4k-tf-graph", "bert4k-tf-xla"]
# What runs by default (about 20 minutes on 2 idle cores): MiniLM at two shapes with most variants,
# BERT-base at every shape with both TensorFlow modes of each Keras peer and transformers (--all:
# every variant, every shape, both models: about 50 minutes). --quick: a smoke run of about 10.
DEFAULT_PLAN = {
    "minilm": dict(shapes=[(1, 128), (8, 128)], variants=[
        "bert4k-tf-graph", "bert4k-tf-graph-fused", "bert4k-tf-graph-bf16", "bert4k-tf-xla",
        "bert4k-tf-xla-fused", "bert4k-tf-xla-bf16", "bert4k-jax", "bert4k-torch",
        "bert4k-torch-bf16", "transformers-torch", "keras-hub-tf-graph", "keras-hub-tf-xla",
        "bert4keras-tf-graph"]),
    "base": dict(shapes=INFERENCE_SHAPES, variants=[
        "bert4k-tf-graph", "bert4k-tf-graph-bf16", "bert4k-tf-xla", "transformers-torch",
        "keras-hub-tf-graph", "keras-hub-tf-xla", "bert4keras-tf-graph", "bert4keras-tf-xla"]),
}
QUICK_PLAN = {"minilm": dict(shapes=[(8, 128)], variants=[
    "bert4k-tf-graph", "bert4k-tf-graph-bf16", "bert4k-tf-xla", "bert4k-tf-xla-fused",
    "bert4k-jax", "transformers-torch", "keras-hub-tf-xla", "bert4keras-tf-graph"])}
TOKENIZERS = {  # name -> environment
    "bert4k": "main", "bert4keras": "bert4keras", "transformers-python": "torch",
    "transformers-rust": "torch",
}


def flops_per_token(model, length, training=False, pooled_only=False):
    """Encoder matmul FLOPs a token. pooled_only: the last block runs its queries, attention
    output and feed-forward at the first position alone (bert4k's pooled-only models), which
    spares (length - 1) / length of them."""
    c = MODELS[model]
    layers, hidden, inner = c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]
    forward = layers * (2 * (4 * hidden * hidden + 2 * hidden * inner) + 4 * length * hidden)
    if pooled_only:
        forward -= (length - 1) / length * (2 * (2 * hidden * hidden + 2 * hidden * inner) + 4 * length * hidden)
    return 3 * forward if training else forward


def model_dir(model):
    return CACHE / model
