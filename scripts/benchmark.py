#!/usr/bin/env python
"""Speed and memory of bert4k against its peers, measured in one run on the same weights and inputs.

    bash scripts/benchmark_envs.sh            # once: the peers' environments under .bench/
    .venv/bin/python scripts/benchmark.py     # the default plan (about 15-20 minutes on 2 idle cores)
    .venv/bin/python scripts/benchmark.py --all    # every variant x shape x model (about 45 minutes)
    .venv/bin/python scripts/benchmark.py --quick  # smoke run (about 4 minutes)
    .venv/bin/python scripts/benchmark.py --inference --models base --variants bert4k-tf-xla,keras-hub-tf-xla
    .venv/bin/python scripts/benchmark.py --report-only   # the last run's tables again

Every measurement runs in a subprocess of the peer's own environment (bert4k on TensorFlow from
.venv; .bench/jax, .bench/torch, .bench/keras-hub, .bench/bert4keras from benchmark_envs.sh), which
prints its results as JSON lines; this process collects them, prints markdown tables and writes
them to --output (default .bench/results/: benchmark.json, benchmark.md, records.jsonl as they
arrive, logs/ with each subprocess's stderr). A peer whose environment is missing or fails is
reported as such, with the reason, and the rest goes on. Sections: --inference --training
--scaling --tokenizer --pretraining (none given: all).

What is measured and how:
* Models: the real all-MiniLM-L6-v2 checkpoint (6 layers, hidden 384, 12 heads, FFN 1536) and a
  BERT-base-sized model (12 layers, 768, 12 heads, 3072) with random weights drawn once (seed 0)
  and written to .bench/cache/base as Hugging Face safetensors (and, for bert4keras, a Google
  checkpoint written by bert4k). Every peer loads the same files, so outputs are comparable: the
  table gives each peer's largest |difference| from transformers on the first sequence of the
  first inference shape.
* Inputs: token ids drawn uniformly from [1000, vocab) (seed 0), [CLS] first and [SEP] last, no
  padding, segment ids 0; the same arrays for every peer.
* Inference: Keras models (bert4k, keras-hub, bert4keras) through `model.predict_on_batch` after
  `model.compile(jit_compile=..., run_eagerly=...)`: eager (run_eagerly), graph (tf.function, no
  XLA) or XLA (jit_compile=True; JAX always compiles); transformers' BertModel (SDPA attention)
  under torch.inference_mode(). bert4k's attention is its default (keras.ops.dot_product_attention);
  the '-explicit' variants run its explicit einsums instead. '-bf16': bert4k built with
  dtype_policy='mixed_bfloat16' (other Keras peers: keras.config.set_dtype_policy); on this CPU
  TensorFlow's graph mode runs bf16 matmuls through oneDNN (AMX), while its XLA has no fast bf16
  kernel. Warm-up calls (the first one compiles: its time is reported as
  'first call'), then timed calls until --min-time seconds and at least --min-reps calls; the
  median (--statistic) is the time. tokens/s = batch * length / time. The process's CPU time per
  call / wall time is reported as 'cores busy' (2 = both cores; less: the work did not spread, or
  another process took a core).
* Fine-tuning: a classifier (pooled [CLS] -> Dense(2) softmax, sparse cross-entropy, AdamW 2e-5,
  dropout 0.1 as in the configs) at 16x128: Keras `train_on_batch`; torch forward, backward,
  AdamW step.
* Fine-tuning from a Python generator: the same classifier (bert4k-tf-graph, MiniLM, 16x128),
  `model.fit` on an endless generator of 8 fixed batches as the first thing in a fresh process,
  from `DataGenerator.forfit` and from a plain generator; 5 warm-up steps, then the median step
  time and the page faults per step (ru_minflt) over 20 steps (8 with --quick).
* FLOPs per token, matmuls only (embedding look-ups, norms, softmax and activations are not
  counted), for L layers, hidden H, FFN size I, sequence length S:
      forward  = L * (2 * (4*H*H + 2*H*I) + 4*S*H)
  (2 FLOPs per multiply-add: Q, K, V and output projections 4*H*H, FFN 2*H*I, and Q.K^T plus
  P.V, 2*S*H each); a training step counts 3x the forward (backward = 2x forward). The pooler and
  classifier (per sequence, not per token) are left out.
* Peak: the fastest call of large square matmuls (fp32 and bf16; n = --matmul-size, smaller
  where a kernel is too slow: torch has no fast bf16 kernel without AVX512-BF16/AMX) in every
  environment in this run (TensorFlow eager and XLA, numpy, torch, JAX); the best fp32 figure is
  the peak, and '% peak' = tokens/s * FLOPs/token / that peak, for every variant (bf16 ones too).
* Memory: the subprocess's peak resident set (ru_maxrss) after its inference runs, and after
  fine-tuning (which includes them); one process per peer, variant and model.
* Scaling: bert4k (--scaling-variant) with hierarchical positions, sequence length 128 -> 1024 at a
  fixed batch, then batch 1 -> 64 at length 128.
* Tokenizers: one pass of `encode` per string (batch call for the Rust tokenizer as well), fresh
  tokenizer each pass, median of passes; over the bundled Chinese sentiment corpus (train split)
  and English text (docstrings of Python's standard library, a fixed module list), with
  MiniLM's uncased vocabulary. ids are compared with transformers' Python BertTokenizer.
* Pretraining: `pretraining.data_utils.prepare` (documents/s into TFRecords, MLM, whole-word
  masking, length 128) on the sentiment corpus (one document a line), then
  `pretraining.pretraining.pretrain` (MLM, MiniLM-sized model) whose log gives tokens/s.
Timings on a shared machine are noisy: the report gives the load average before and after.
"""

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
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
# default attention ('auto': keras.ops.dot_product_attention); those in EXPLICIT_ATTENTION run the
# explicit einsums instead, to show what the fused op changes.
VARIANTS = {
    "bert4k-tf-eager": ("main", "bert4k", "eager", "float32"),
    "bert4k-tf-graph": ("main", "bert4k", "graph", "float32"),
    "bert4k-tf-graph-explicit": ("main", "bert4k", "graph", "float32"),
    "bert4k-tf-graph-bf16": ("main", "bert4k", "graph", "bfloat16"),
    "bert4k-tf-xla": ("main", "bert4k", "xla", "float32"),
    "bert4k-tf-xla-explicit": ("main", "bert4k", "xla", "float32"),
    "bert4k-tf-xla-bf16": ("main", "bert4k", "xla", "bfloat16"),
    "bert4k-jax": ("jax", "bert4k", "xla", "float32"),
    "bert4k-jax-bf16": ("jax", "bert4k", "xla", "bfloat16"),
    "bert4k-torch": ("torch", "bert4k", "eager", "float32"),
    "transformers-torch": ("torch", "transformers", "eager", "float32"),
    "keras-hub-tf-graph": ("keras-hub", "keras_hub", "graph", "float32"),
    "keras-hub-tf-xla": ("keras-hub", "keras_hub", "xla", "float32"),
    "bert4keras-tf-graph": ("bert4keras", "bert4keras", "graph", "float32"),
    "bert4keras-tf-xla": ("bert4keras", "bert4keras", "xla", "float32"),
}
EXPLICIT_ATTENTION = {"bert4k-tf-graph-explicit", "bert4k-tf-xla-explicit"}
# Measured again together in one process (Driver.run_head_to_head).
HEAD_TO_HEAD = ["keras-hub-tf-graph", "keras-hub-tf-xla", "bert4k-tf-graph", "bert4k-tf-xla"]
# What runs by default (about 20 minutes on 2 idle cores): MiniLM at two shapes with most variants,
# BERT-base at every shape with both TensorFlow modes of each Keras peer and transformers (--all:
# every variant, every shape, both models: about 50 minutes). --quick: a smoke run of about 10.
DEFAULT_PLAN = {
    "minilm": dict(shapes=[(1, 128), (8, 128)], variants=[
        "bert4k-tf-graph", "bert4k-tf-graph-explicit", "bert4k-tf-graph-bf16", "bert4k-tf-xla",
        "bert4k-tf-xla-explicit", "bert4k-tf-xla-bf16", "bert4k-jax", "bert4k-torch",
        "transformers-torch", "keras-hub-tf-graph", "keras-hub-tf-xla", "bert4keras-tf-graph"]),
    "base": dict(shapes=INFERENCE_SHAPES, variants=[
        "bert4k-tf-graph", "bert4k-tf-graph-bf16", "bert4k-tf-xla", "transformers-torch",
        "keras-hub-tf-graph", "keras-hub-tf-xla", "bert4keras-tf-graph", "bert4keras-tf-xla"]),
}
QUICK_PLAN = {"minilm": dict(shapes=[(8, 128)], variants=[
    "bert4k-tf-graph", "bert4k-tf-graph-bf16", "bert4k-tf-xla", "bert4k-tf-xla-explicit",
    "bert4k-jax", "transformers-torch", "keras-hub-tf-xla", "bert4keras-tf-graph"])}
TOKENIZERS = {  # name -> environment
    "bert4k": "main", "bert4keras": "bert4keras", "transformers-python": "torch",
    "transformers-rust": "torch",
}
ENGLISH_MODULES = [
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "email", "email.message", "enum", "functools", "gettext", "heapq",
    "http.client", "http.server", "inspect", "io", "ipaddress", "itertools", "json", "logging",
    "mailbox", "multiprocessing", "operator", "os", "pathlib", "pickle", "pydoc", "random", "re",
    "shutil", "socket", "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "tkinter", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "xml.dom.minidom", "zipfile",
]


# ---------------------------------------------------------------------------------------------------
# Shared helpers (the workers run this file too, in environments that may lack bert4k: only the
# standard library and numpy here)
# ---------------------------------------------------------------------------------------------------


def flops_per_token(model, length, training=False):
    c = MODELS[model]
    layers, hidden, inner = c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]
    forward = layers * (2 * (4 * hidden * hidden + 2 * hidden * inner) + 4 * length * hidden)
    return 3 * forward if training else forward


def make_inputs(batch, length, seed=0):
    import numpy as np

    rng = np.random.RandomState(seed + 1000 * batch + length)
    tokens = rng.randint(1000, VOCAB_SIZE, size=(batch, length)).astype("int32")
    tokens[:, 0], tokens[:, -1] = 101, 102
    segments = np.zeros_like(tokens)
    labels = rng.randint(0, 2, size=(batch,)).astype("int32")
    return tokens, segments, labels


def cpu_seconds():
    """This process's user + system CPU time, all threads."""
    t = os.times()
    return t.user + t.system


def measure(fn, warmup, min_time, min_reps, max_reps=50, statistic="median"):
    """Times of fn(): dict(first_call (the first call: it compiles), seconds (the median, or the
    minimum with statistic='min', of the timed calls), median_seconds, min_seconds, reps, cpu
    (median CPU seconds of the process per call: cpu / seconds is how many cores it kept busy)).
    Warm-up: the first call, then up to warmup - 1 more while warming has taken under min_time."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        if time.perf_counter() - start > min_time:
            break
        fn()
    times, cpus, began = [], [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - began < min_time and len(times) < max_reps):
        cpu, start = cpu_seconds(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        cpus.append(cpu_seconds() - cpu)
    return summarize(first, times, cpus, statistic)


def summarize(first, times, cpus, statistic):
    median = statistics.median(times)
    return dict(first_call=first, seconds=min(times) if statistic == "min" else median,
                median_seconds=median, min_seconds=min(times), reps=len(times),
                cpu=statistics.median(cpus))


def measure_interleaved(fns, warmup, min_time, min_reps, max_reps=50, statistic="median"):
    """`measure` for several functions (name -> fn) at once, their timed calls taken in turn, so
    that load from elsewhere on a shared machine falls on all of them alike: their ratios stay
    fair when their absolute times are not. Each gets at least min_reps calls and together
    min_time seconds per function."""
    first = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    for _ in range(warmup - 1):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    cpus = {name: [] for name in fns}
    began = time.perf_counter()
    while True:
        for name, fn in fns.items():
            cpu, start = cpu_seconds(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            cpus[name].append(cpu_seconds() - cpu)
        reps = len(times[name])
        elapsed = time.perf_counter() - began
        if reps >= min_reps and (elapsed >= min_time * len(fns) or reps >= max_reps):
            break
    return {name: summarize(first[name], times[name], cpus[name], statistic) for name in fns}


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(record):
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def model_dir(model):
    return CACHE / model


# ---------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------


def hf_tensors(directory):
    """name -> numpy array from model.safetensors, names without a 'bert.' prefix."""
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(directory) / "model.safetensors"))
    return {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in tensors.items()}


class KerasRunner:
    """bert4k, keras-hub and bert4keras: Keras models with predict_on_batch / train_on_batch."""

    def __init__(self, job):
        self.job = job
        self.mode = job["mode"]
        self.impl = job["impl"]
        self.directory = model_dir(job["model"])
        if self.impl == "bert4keras":
            import tensorflow as tf  # noqa: F401  (tf.keras is tf-keras here: TF_USE_LEGACY_KERAS=1)
            self.keras = tf.keras
        else:
            import keras

            self.keras = keras
            if job["precision"] == "bfloat16" and self.impl != "bert4k":
                keras.config.set_dtype_policy("mixed_bfloat16")

    def compile_options(self):
        return dict(jit_compile=self.mode == "xla", run_eagerly=self.mode == "eager")

    def build(self, pooled=False, dropout=True):
        """The encoder: [token ids, segment ids] -> sequence output, or the pooled output."""
        keras = self.keras
        if self.impl == "bert4k":
            from bert4k.models import build_transformer_model

            extra = {} if dropout else dict(dropout_rate=0.0, attention_dropout_rate=0.0)
            if self.job.get("hierarchical"):
                extra["hierarchical_position"] = True
            if self.job["precision"] == "bfloat16":  # the builder's option, as the README shows
                extra["dtype_policy"] = "mixed_bfloat16"
            if self.job["variant"] in EXPLICIT_ATTENTION:
                extra["attention_implementation"] = "explicit"
            return build_transformer_model(self.directory / "config.json", self.directory,
                                           with_pool=pooled, **extra)
        if self.impl == "bert4keras":
            from bert4keras.models import build_transformer_model

            return build_transformer_model(str(self.directory / "bert_config.json"),
                                           str(self.directory / "bert_model.ckpt"), with_pool=pooled)
        import keras_hub

        config = json.loads((self.directory / "config.json").read_text())
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"], hidden_dim=config["hidden_size"],
            intermediate_dim=config["intermediate_size"], dropout=0.1 if dropout else 0.0,
            max_sequence_length=config["max_position_embeddings"],
            num_segments=config["type_vocab_size"])
        load_keras_hub_weights(backbone, hf_tensors(self.directory))
        tokens = keras.Input((None,), dtype="int32", name="token_ids")
        segments = keras.Input((None,), dtype="int32", name="segment_ids")
        outputs = backbone({"token_ids": tokens, "segment_ids": segments,
                            "padding_mask": keras.ops.not_equal(tokens, 0)})
        return keras.Model([tokens, segments],
                           outputs["pooled_output" if pooled else "sequence_output"])

    def inference(self):
        model = self.build()
        model.compile(**self.compile_options())
        return lambda tokens, segments: to_numpy(model.predict_on_batch([tokens, segments]))

    def classifier(self):
        """pooled [CLS] -> Dense(2) softmax, compiled for training."""
        keras = self.keras
        encoder = self.build(pooled=True)
        probabilities = keras.layers.Dense(2, activation="softmax", name="Classifier")(encoder.output)
        model = keras.Model(encoder.inputs, probabilities)
        optimizer = keras.optimizers.AdamW(learning_rate=2e-5)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                      **self.compile_options())
        return model

    def training(self):
        model = self.classifier()
        return lambda tokens, segments, labels: model.train_on_batch([tokens, segments], labels)


def to_numpy(value):
    import numpy as np

    if isinstance(value, dict):
        value = value.get("sequence_output", next(iter(value.values())))
    if isinstance(value, (list, tuple)):
        value = value[0]
    if hasattr(value, "detach"):
        value = value.detach().cpu().float()
    return np.asarray(value, dtype="float32")


def load_keras_hub_weights(backbone, tensors):
    """Hugging Face BERT tensors into keras-hub's BertBackbone, by name (keras-hub's own
    converter, keras_hub/src/utils/transformers/convert_bert.py, reads through its preset loader;
    this is the same mapping from a plain dict)."""
    import numpy as np

    used = set()

    def get(*names):
        for name in names:
            if name in tensors:
                used.add(name)
                return tensors[name]
        raise KeyError(names)

    def norm(layer, prefix):
        layer.gamma.assign(get(prefix + ".weight", prefix + ".gamma"))
        layer.beta.assign(get(prefix + ".bias", prefix + ".beta"))

    def dense(variable_kernel, variable_bias, prefix):
        kernel = np.transpose(get(prefix + ".weight"))
        variable_kernel.assign(np.reshape(kernel, variable_kernel.shape))
        variable_bias.assign(np.reshape(get(prefix + ".bias"), variable_bias.shape))

    backbone.get_layer("token_embedding").embeddings.assign(get("embeddings.word_embeddings.weight"))
    backbone.get_layer("position_embedding").position_embeddings.assign(
        get("embeddings.position_embeddings.weight"))
    backbone.get_layer("segment_embedding").embeddings.assign(
        get("embeddings.token_type_embeddings.weight"))
    norm(backbone.get_layer("embeddings_layer_norm"), "embeddings.LayerNorm")
    for i in range(backbone.num_layers):
        block = backbone.get_layer(f"transformer_layer_{i}")
        attention, p = block._self_attention_layer, f"encoder.layer.{i}."
        for dense_layer, name in ((attention.query_dense, "attention.self.query"),
                                  (attention.key_dense, "attention.self.key"),
                                  (attention.value_dense, "attention.self.value"),
                                  (attention.output_dense, "attention.output.dense")):
            dense(dense_layer.kernel, dense_layer.bias, p + name)
        norm(block._self_attention_layer_norm, p + "attention.output.LayerNorm")
        dense(block._feedforward_intermediate_dense.kernel, block._feedforward_intermediate_dense.bias,
              p + "intermediate.dense")
        dense(block._feedforward_output_dense.kernel, block._feedforward_output_dense.bias,
              p + "output.dense")
        norm(block._feedforward_layer_norm, p + "output.LayerNorm")
    pooler = backbone.get_layer("pooled_dense")
    dense(pooler.kernel, pooler.bias, "pooler.dense")
    unused = sorted(set(tensors) - used - {"embeddings.position_ids"})
    if unused:
        raise ValueError(f"keras-hub loader left tensors unused: {unused}")


class TransformersRunner:
    """transformers' BertModel on torch (SDPA attention)."""

    def __init__(self, job):
        import torch

        self.torch = torch
        self.directory = str(model_dir(job["model"]))
        torch.manual_seed(0)

    def load(self):
        from transformers import BertModel

        return BertModel.from_pretrained(self.directory, attn_implementation="sdpa")

    def inference(self):
        torch = self.torch
        model = self.load().eval()

        def run(tokens, segments):
            with torch.inference_mode():
                out = model(input_ids=torch.from_numpy(tokens).long(),
                            token_type_ids=torch.from_numpy(segments).long(),
                            attention_mask=torch.from_numpy((tokens != 0).astype("int64")))
            return out.last_hidden_state.numpy()

        return run

    def training(self):
        torch = self.torch
        model = self.load().train()
        head = torch.nn.Linear(model.config.hidden_size, 2)
        parameters = list(model.parameters()) + list(head.parameters())
        optimizer = torch.optim.AdamW(parameters, lr=2e-5)

        def step(tokens, segments, labels):
            out = model(input_ids=torch.from_numpy(tokens).long(),
                        token_type_ids=torch.from_numpy(segments).long(),
                        attention_mask=torch.from_numpy((tokens != 0).astype("int64")))
            loss = torch.nn.functional.cross_entropy(head(out.pooler_output),
                                                     torch.from_numpy(labels).long())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        return step


def make_runner(job):
    return TransformersRunner(job) if job["impl"] == "transformers" else KerasRunner(job)


def worker_group(job):
    """Inference of several variants of one environment in one process, their calls interleaved
    (measure_interleaved); records say interleaved=True, and their RSS is the group's."""
    import numpy as np

    infers = {}
    for member in job["group"]:
        started = time.perf_counter()
        infers[member["variant"]] = make_runner(dict(job, **member)).inference()
        emit(dict(variant=member["variant"], model=job["model"], kind="load",
                  seconds=time.perf_counter() - started))
    for index, (batch, length) in enumerate(job["shapes"]):
        tokens, segments, _ = make_inputs(batch, length)
        fns = {name: (lambda infer=infer: infer(tokens, segments)) for name, infer in infers.items()}
        results = measure_interleaved(fns, **job["timing"])
        for member in job["group"]:
            name = member["variant"]
            if index == 0 and member.get("save_output"):
                np.save(member["save_output"], infers[name](tokens, segments)[0])
            emit(dict(variant=name, model=job["model"], kind=job.get("kind", "inference"),
                      batch=batch, length=length, interleaved=True, **results[name],
                      tokens_per_s=batch * length / results[name]["seconds"], rss_mib=rss_mib()))


def worker_model(job):
    """Inference shapes then the fine-tuning step, for one variant and one model."""
    import numpy as np

    base = dict(variant=job["variant"], model=job["model"])
    runner = make_runner(job)
    timing = job["timing"]
    if job["shapes"]:
        started = time.perf_counter()
        infer = runner.inference()
        emit(dict(base, kind="load", seconds=time.perf_counter() - started))
        for batch, length in job["shapes"]:
            tokens, segments, _ = make_inputs(batch, length)
            times = measure(lambda: infer(tokens, segments), **timing)
            if [batch, length] == list(job["shapes"][0]) and job.get("save_output"):
                np.save(job["save_output"], infer(tokens, segments)[0])
            emit(dict(base, kind="inference", batch=batch, length=length, **times,
                      tokens_per_s=batch * length / times["seconds"], rss_mib=rss_mib()))
        del infer
    if job["train"]:
        batch, length = job["train"]
        tokens, segments, labels = make_inputs(batch, length)
        step = runner.training()
        times = measure(lambda: step(tokens, segments, labels), **timing)
        emit(dict(base, kind="training", batch=batch, length=length, **times,
                  tokens_per_s=batch * length / times["seconds"], rss_mib=rss_mib()))


def worker_generator_fit(job):
    """model.fit on a Python generator, first thing in a fresh process, as a fine-tuning script
    does: from bert4k's DataGenerator.forfit (which calls keep_freed_memory) or from a plain
    generator of the same batches (TensorFlow's malloc setting stays)."""
    import keras

    from bert4k.snippets import DataGenerator

    batch, length = job["batch"], job["length"]
    batches = [make_inputs(batch, length, seed) for seed in range(8)]
    batches = [((tokens, segments), labels) for tokens, segments, labels in batches]

    class Batches(DataGenerator):
        def __iter__(self, random=False):
            yield from self.data

    def plain_generator():  # Keras takes a generator, not any iterator
        while True:
            yield from batches

    if job["feed"] == "DataGenerator.forfit":
        stream = Batches(batches, batch_size=1).forfit(random=False)
    else:
        stream = plain_generator()
    model = KerasRunner(dict(job, variant="bert4k-tf-graph", impl="bert4k", mode="graph",
                             precision="float32")).classifier()
    marks = []

    def mark(*_, **__):
        marks.append((time.perf_counter(), cpu_seconds(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))

    warmup, steps = job["warmup_steps"], job["steps"]
    model.fit(stream, steps_per_epoch=warmup + steps, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=mark)])
    timed = marks[warmup - 1:]
    step = statistics.median(b[0] - a[0] for a, b in zip(timed, timed[1:]))
    wall, cpu, faults = (timed[-1][i] - timed[0][i] for i in range(3))
    emit(dict(kind="generator_fit", feed=job["feed"], model=job["model"], batch=batch, length=length,
              steps=steps, seconds=step, cpu=step * cpu / wall, page_faults_per_step=faults / steps,
              tokens_per_s=batch * length / step, rss_mib=rss_mib()))


def worker_scaling(job):
    """bert4k at growing lengths (hierarchical positions past 512) and growing batches."""
    runner = KerasRunner(dict(job, hierarchical=True))
    infer = runner.inference()
    for batch, length in job["shapes"]:
        tokens, segments, _ = make_inputs(batch, length)
        times = measure(lambda: infer(tokens, segments), **job["timing"])
        emit(dict(variant=job["variant"], model=job["model"], kind="scaling", batch=batch,
                  length=length, **times, tokens_per_s=batch * length / times["seconds"],
                  rss_mib=rss_mib()))


def worker_peak(job):
    """The best time of large square matmuls in this environment, fp32 and bf16. A kernel too
    slow for n x n (no native bf16: torch falls back to a scalar loop) is timed at a smaller n."""
    import numpy as np

    results = []

    def run(library, dtype, make):
        """make(n) -> a function computing one n x n matmul."""
        try:
            n = job["n"]
            probe = make(512)
            probe()
            start = time.perf_counter()
            probe()
            estimate = (time.perf_counter() - start) * (n / 512) ** 3
            while n > 512 and estimate > 2.0:  # keep each call under ~2 s
                n //= 2
                estimate /= 8
            times = measure(make(n), warmup=1, min_time=1.0, min_reps=3, max_reps=10)
            results.append(dict(library=library, dtype=dtype, n=n, seconds=times["min_seconds"],
                                gflops=2 * n**3 / times["min_seconds"] / 1e9, cpu=times["cpu"]))
        except Exception as error:  # e.g. no bf16 kernel at all
            results.append(dict(library=library, dtype=dtype, error=repr(error)[:300]))

    def operands(n):
        return (np.random.RandomState(0).standard_normal((n, n)).astype("float32"),
                np.random.RandomState(1).standard_normal((n, n)).astype("float32"))

    env = job["env"]
    if env == "main":
        import tensorflow as tf

        def numpy_mm(n):
            a, b = operands(n)
            return lambda: a @ b

        run("numpy", "float32", numpy_mm)
        xla = tf.function(lambda p, q: tf.linalg.matmul(p, q), jit_compile=True)
        for dtype in ("float32", "bfloat16"):
            def tf_mm(n, compiled=False, dtype=dtype):
                a, b = (tf.constant(x, dtype=dtype) for x in operands(n))
                return (lambda: xla(a, b).numpy()) if compiled else (lambda: tf.linalg.matmul(a, b).numpy())

            run("tensorflow", dtype, tf_mm)
            run("tensorflow-xla", dtype, lambda n, dtype=dtype: tf_mm(n, True, dtype))
    elif env == "torch":
        import torch

        for dtype in (torch.float32, torch.bfloat16):
            def torch_mm(n, dtype=dtype):
                a, b = (torch.from_numpy(x).to(dtype) for x in operands(n))
                return lambda: torch.matmul(a, b)

            run("torch", str(dtype).replace("torch.", ""), torch_mm)
    elif env == "jax":
        import jax
        import jax.numpy as jnp

        mm = jax.jit(jnp.matmul)
        for dtype in ("float32", "bfloat16"):
            def jax_mm(n, dtype=dtype):
                a, b = (jnp.asarray(x, dtype=dtype) for x in operands(n))
                return lambda: mm(a, b).block_until_ready()

            run("jax", dtype, jax_mm)
    for record in results:
        emit(dict(kind="peak", env=env, **record))


def worker_tokenizer(job):
    """One encode pass over each corpus with a fresh tokenizer; ids written for comparison."""
    vocab = str(model_dir("minilm") / "vocab.txt")
    name = job["tokenizer"]
    if name == "bert4k":
        from bert4k.tokenizers import Tokenizer

        def make():
            tokenizer = Tokenizer(vocab, do_lower_case=True)
            return lambda texts: [tokenizer.encode(t)[0] for t in texts]
    elif name == "bert4keras":
        from bert4keras.tokenizers import Tokenizer

        def make():
            tokenizer = Tokenizer(vocab, do_lower_case=True)
            return lambda texts: [tokenizer.encode(t)[0] for t in texts]
    elif name == "transformers-python":
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

        def make():
            tokenizer = BertTokenizerLegacy(vocab, do_lower_case=True)
            return lambda texts: [tokenizer.encode(t) for t in texts]
    else:
        from transformers.models.bert.tokenization_bert import BertTokenizer

        def make(batch=False):
            tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
            if batch:
                return lambda texts: tokenizer(list(texts))["input_ids"]
            return lambda texts: [tokenizer(t)["input_ids"] for t in texts]
    modes = [("", make)]
    if name == "transformers-rust":
        modes.append((" (batch)", lambda: make(batch=True)))
    for corpus in job["corpora"]:
        texts = Path(job["corpus_files"][corpus]).read_text(encoding="utf-8").split("\n")
        texts = texts[: job["limit"]] if job.get("limit") else texts
        characters = sum(map(len, texts))
        for suffix, maker in modes:
            times = []
            for _ in range(job["passes"]):
                encode = maker()
                start = time.perf_counter()
                ids = encode(texts)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            label = (name + suffix).replace(" (", "-").replace(")", "")
            out = Path(job["ids_dir"]) / f"{label}-{corpus}.json"
            out.write_text(json.dumps([list(map(int, x)) for x in ids]))
            emit(dict(kind="tokenizer", tokenizer=name + suffix, corpus=corpus, strings=len(texts),
                      characters=characters, seconds=seconds, strings_per_s=len(texts) / seconds,
                      chars_per_s=characters / seconds, ids_file=str(out)))


def worker_pretraining(job):
    """prepare() on the sentiment corpus, then a few pretrain() steps."""
    from pretraining import data_utils, pretraining

    work = Path(job["work_dir"])
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    corpus = work / "corpus.txt"
    lines = Path(job["corpus_file"]).read_text(encoding="utf-8").split("\n")[: job["documents"]]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = work / "data"
    for workers in job["workers"]:
        shutil.rmtree(data, ignore_errors=True)
        start = time.perf_counter()
        info = data_utils.prepare([str(corpus)], str(data), vocab=str(model_dir("minilm") / "vocab.txt"),
                                  objective="mlm", max_seq_length=job["length"], do_lower_case=True,
                                  document_format="lines", workers=workers, verbose=0)
        seconds = time.perf_counter() - start
        emit(dict(kind="prepare", workers=workers, documents=len(lines), seconds=seconds,
                  documents_per_s=len(lines) / seconds, examples=info["examples"],
                  tokens=info["tokens"], tokens_per_s=info["tokens"] / seconds))
    fill = info["tokens"] / (info["examples"] * job["length"])
    config = dict(MODELS[job["model"]], vocab_size=info["vocab_size"], hidden_act="gelu",
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                  max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02)
    start = time.perf_counter()
    result = pretraining.pretrain(config, str(data), str(work / "run"), steps=job["steps"],
                                  batch_size=job["batch"], log_every=1, verbose=0,
                                  checkpoint_every=10**9)
    total = time.perf_counter() - start
    history = result["history"]
    steady = [r["tokens_per_sec"] for r in history[2:]] or [history[-1]["tokens_per_sec"]]
    nonpad = statistics.median(steady)
    emit(dict(kind="pretrain", model=job["model"], batch=job["batch"], length=job["length"],
              steps=job["steps"], seconds_total=total, nonpad_tokens_per_s=nonpad, fill=fill,
              tokens_per_s=nonpad / fill, rss_mib=rss_mib()))


def worker_assets(job):
    """.bench/cache/{minilm,base}: config.json (= bert_config.json), vocab.txt, model.safetensors
    (HF names) and bert_model.ckpt (Google names, for bert4keras), plus the English corpus."""
    import numpy as np

    from bert4k.assets import minilm_dir, read_sentiment
    from bert4k.checkpoints import save_weights_as_checkpoint
    from bert4k.models import build_transformer_model

    source = minilm_dir()
    for model in job["models"]:
        target = model_dir(model)
        if (target / "bert_model.ckpt.index").exists() and (target / "model.safetensors").exists():
            continue
        target.mkdir(parents=True, exist_ok=True)
        config = json.loads((source / "config.json").read_text())
        shutil.copy(source / "vocab.txt", target / "vocab.txt")
        if model == "minilm":
            shutil.copy(source / "model.safetensors", target / "model.safetensors")
        else:
            config.update(MODELS[model], _name_or_path="bert4k-benchmark-random-base")
            write_random_bert(target / "model.safetensors", config)
        (target / "config.json").write_text(json.dumps(config, indent=2))
        (target / "bert_config.json").write_text(json.dumps(config, indent=2))
        transformer = build_transformer_model(target / "config.json", target, with_pool=True,
                                              return_keras_model=False)
        save_weights_as_checkpoint(transformer, str(target / "bert_model.ckpt"))
        emit(dict(kind="asset", model=model, path=str(target)))
    sentiment = CACHE / "sentiment.txt"
    if not sentiment.exists():
        sentiment.write_text("\n".join(t.replace("\n", " ") for t, _ in read_sentiment("train")),
                             encoding="utf-8")
    english = CACHE / "english.txt"
    if not english.exists():
        english.write_text("\n".join(english_paragraphs()), encoding="utf-8")
    emit(dict(kind="corpora", sentiment=str(sentiment), english=str(english)))
    del np


def write_random_bert(path, config, seed=0):
    """BERT weights with Hugging Face names, N(0, 0.02) matrices, zero biases, unit norms."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    h, i = config["hidden_size"], config["intermediate_size"]

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype("float32")

    def norm(prefix):
        return {prefix + ".weight": np.ones(h, "float32"), prefix + ".bias": np.zeros(h, "float32")}

    def dense(prefix, out, inp):
        return {prefix + ".weight": normal(out, inp), prefix + ".bias": np.zeros(out, "float32")}

    tensors = {
        "embeddings.word_embeddings.weight": normal(config["vocab_size"], h),
        "embeddings.position_embeddings.weight": normal(config["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": normal(config["type_vocab_size"], h),
        **norm("embeddings.LayerNorm"), **dense("pooler.dense", h, h),
    }
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        for name in ("query", "key", "value"):
            tensors.update(dense(p + "attention.self." + name, h, h))
        tensors.update(dense(p + "attention.output.dense", h, h))
        tensors.update(norm(p + "attention.output.LayerNorm"))
        tensors.update(dense(p + "intermediate.dense", i, h))
        tensors.update(dense(p + "output.dense", h, i))
        tensors.update(norm(p + "output.LayerNorm"))
    save_file(tensors, str(path), metadata={"format": "pt"})


def english_paragraphs():
    """Paragraphs of English prose from the docstrings of a fixed list of stdlib modules."""
    import importlib
    import inspect
    import re

    seen, paragraphs = set(), []
    for module_name in ENGLISH_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:
            continue
        objects = [module] + [getattr(module, n) for n in sorted(dir(module)) if not n.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj)
                                          or inspect.isfunction(obj)) else None
            for paragraph in re.split(r"\n\s*\n", doc or ""):
                text = " ".join(paragraph.split())
                letters = sum(c.isalpha() or c == " " for c in text)
                if len(text) >= 40 and letters >= 0.85 * len(text) and text not in seen:
                    seen.add(text)
                    paragraphs.append(text)
    return paragraphs


def worker_versions(job):
    import importlib.metadata as md

    names = ["keras", "tensorflow-cpu", "tensorflow", "tf-keras", "keras-hub", "bert4keras", "jax",
             "jaxlib", "torch", "transformers", "tokenizers", "numpy"]
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    emit(dict(kind="versions", env=job["env"], python=platform.python_version(), packages=found))


def run_worker(job):
    {"model": worker_model, "group": worker_group, "scaling": worker_scaling, "peak": worker_peak,
     "generator_fit": worker_generator_fit,
     "tokenizer": worker_tokenizer, "pretraining": worker_pretraining, "assets": worker_assets,
     "versions": worker_versions}[job["job"]](job)


# ---------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------


class Driver:
    def __init__(self, args):
        self.args = args
        self.records = []
        self.failures = []
        self.logs = Path(args.output) / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.stream = Path(args.output) / "records.jsonl"  # every record as it arrives
        self.stream.write_text("")
        self.python = {name: Path(p) for name, (p, _) in ENVIRONMENTS.items()}
        for override in args.python or []:
            name, _, path = override.partition("=")
            self.python[name] = Path(path)

    def available(self, env):
        return self.python[env].exists()

    def run(self, env, job, label, timeout=None):
        """Run a job in env's Python; returns its records (and keeps them)."""
        if not self.available(env):
            self.failures.append(dict(label=label, reason=f"no environment: {self.python[env]} "
                                      "(run scripts/benchmark_envs.sh)"))
            print(f"  {label}: skipped, no environment {self.python[env]}", flush=True)
            return []
        environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
                           PYTHONPATH=str(ROOT), **ENVIRONMENTS[env][1])
        log = self.logs / f"{label}.log"
        started = time.time()
        records = []
        with open(log, "w") as err:
            process = subprocess.Popen(
                [str(self.python[env]), str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                stdout=subprocess.PIPE, stderr=err, text=True, env=environment, cwd=str(ROOT))
            timer = threading.Timer(timeout or self.args.timeout, process.kill)
            timer.start()
            try:
                for line in process.stdout:  # records as they come: a later crash keeps them
                    if line.startswith(RESULT_PREFIX):
                        record = json.loads(line[len(RESULT_PREFIX):])
                        records.append(record)
                        with open(self.stream, "a") as f:
                            f.write(json.dumps(record) + "\n")
                code = process.wait()
            finally:
                timed_out = not timer.is_alive() and process.returncode not in (0, None)
                timer.cancel()
            if timed_out:
                code = f"timeout after {timeout or self.args.timeout}s"
        elapsed = time.time() - started
        if code != 0:
            tail = [l for l in log.read_text(errors="replace").splitlines() if l.strip()][-3:]
            reason = f"exit {code}: " + " | ".join(tail)[-600:]
            self.failures.append(dict(label=label, reason=reason))
            print(f"  {label}: FAILED ({reason[:300]})", flush=True)
        print(f"  {label}: {len(records)} results in {elapsed:.0f}s", flush=True)
        self.records.extend(records)
        return records

    def run_model_jobs(self, model, pass_index):
        """One pass over a model's variants (later passes in reverse order, so that no variant
        is always measured at the same moment of the run). bert4k's own TensorFlow variants
        (environment 'main') run their inference together, interleaved, unless --no-interleave;
        every variant's training step runs in a process of its own (its memory is its own)."""
        a = self.args
        shapes = [list(s) for s in a.plan[model]["shapes"]] if a.inference else []
        train = list(TRAIN_SHAPE) if a.training else None
        variants = list(a.plan[model]["variants"])
        variants = variants[::-1] if pass_index % 2 else variants
        suffix = f"-pass{pass_index + 1}" if a.passes > 1 else ""

        def job_for(variant, **extra):
            env, impl, mode, precision = VARIANTS[variant]
            return dict(job="model", variant=variant, model=model, impl=impl, mode=mode,
                        precision=precision, timing=self.timing(),
                        save_output=str(Path(a.output) / f"out-{variant}-{model}.npy"), **extra)

        grouped = [v for v in variants if VARIANTS[v][0] == "main"] if a.interleave else []
        if shapes and len(grouped) > 1:
            group = [{k: job_for(v)[k] for k in ("variant", "impl", "mode", "precision",
                                                 "save_output")} for v in grouped]
            self.run("main", dict(job="group", model=model, group=group, shapes=shapes,
                                  timing=self.timing()), f"bert4k-tf-interleaved-{model}{suffix}")
        else:
            grouped = []
        for variant in variants:
            own_shapes = [] if variant in grouped else shapes
            if own_shapes or train:
                self.run(VARIANTS[variant][0], job_for(variant, shapes=own_shapes, train=train),
                         f"{variant}-{model}{suffix}")

    def run_head_to_head(self, model):
        """bert4k and keras-hub in one process (keras-hub's environment, which has the same
        Keras and TensorFlow; bert4k comes from PYTHONPATH), calls interleaved: a comparison that
        load from other processes cannot tilt. bert4keras cannot join: with TF_USE_LEGACY_KERAS=1,
        `import keras` gives Keras 2 in that process."""
        a = self.args
        group = []
        for variant in HEAD_TO_HEAD:
            _, impl, mode, precision = VARIANTS[variant]
            group.append(dict(variant=variant, impl=impl, mode=mode, precision=precision))
        shapes = [list(s) for s in a.plan[model]["shapes"]]
        self.run("keras-hub", dict(job="group", kind="headtohead", model=model, group=group,
                                   shapes=shapes, timing=self.timing()),
                 f"head-to-head-{model}")

    def timing(self):
        a = self.args
        return dict(warmup=a.warmup, min_time=a.min_time, min_reps=a.min_reps, statistic=a.statistic)

    def main(self):
        a = self.args
        started = time.time()
        self.load_before = os.getloadavg()
        for stale in Path(a.output).glob("out-*.npy"):
            stale.unlink()
        print(f"load average before: {self.load_before}", flush=True)
        assets = self.run("main", dict(job="assets", models=sorted(set(a.models) | {"minilm"})),
                          "assets", timeout=1800)
        corpora = next((r for r in assets if r["kind"] == "corpora"), None)
        for env in ENVIRONMENTS:
            if self.available(env):
                self.run(env, dict(job="versions", env=env), f"versions-{env}", timeout=120)
        for env in ("main", "torch", "jax"):
            self.run(env, dict(job="peak", env=env, n=a.matmul_size), f"peak-{env}", timeout=600)
        for pass_index in range(a.passes if (a.inference or a.training) else 0):
            for model in a.models:
                self.run_model_jobs(model, pass_index)
        if a.training:
            for feed in GENERATOR_FEEDS:
                job = dict(job="generator_fit", feed=feed, model="minilm", batch=TRAIN_SHAPE[0],
                           length=TRAIN_SHAPE[1], warmup_steps=5, steps=8 if a.quick else 20)
                self.run("main", job, "generator-fit-" + feed.replace(" ", "-").lower())
        if a.inference and a.head_to_head:
            for model in a.models:
                self.run_head_to_head(model)
        if a.scaling:
            env, impl, mode, precision = VARIANTS[a.scaling_variant]
            lengths = [128, 256, 512, 1024]
            batches = [1, 2, 4, 8, 16, 32, 64] if not a.quick else [1, 8]
            shapes = [[a.scaling_batch, n] for n in lengths] + [[b, 128] for b in batches]
            for model in a.scaling_models:
                job = dict(job="scaling", variant=a.scaling_variant, model=model, impl=impl, mode=mode,
                           precision=precision, shapes=shapes, timing=self.timing())
                self.run(env, job, f"scaling-{a.scaling_variant}-{model}")
        if a.tokenizer and corpora:
            ids_dir = Path(a.output) / "tokenizer_ids"
            ids_dir.mkdir(parents=True, exist_ok=True)
            for name, env in TOKENIZERS.items():
                job = dict(job="tokenizer", tokenizer=name, corpora=["sentiment", "english"],
                           corpus_files=corpora, ids_dir=str(ids_dir), passes=a.tokenizer_passes,
                           limit=a.tokenizer_limit)
                self.run(env, job, f"tokenizer-{name}")
        if a.pretraining and corpora:
            job = dict(job="pretraining", model=a.pretraining_model, work_dir=str(BENCH / "pretraining"),
                       corpus_file=corpora["sentiment"], documents=a.pretraining_documents,
                       workers=[1, os.cpu_count() or 1] if not a.quick else [os.cpu_count() or 1],
                       length=128, batch=16, steps=a.pretraining_steps)
            self.run("main", job, "pretraining")
        self.load_after = os.getloadavg()
        self.wall = time.time() - started
        self.machine = machine()
        print(f"load average after: {self.load_after}", flush=True)
        report = Report(self).markdown()
        out = Path(a.output)
        (out / "benchmark.md").write_text(report)
        (out / "benchmark.json").write_text(json.dumps(dict(
            records=self.records, failures=self.failures, load_before=self.load_before,
            load_after=self.load_after, wall_s=self.wall, args=vars(a), machine=self.machine), indent=1))
        print()
        print(report)
        print(f"written to {out / 'benchmark.md'} and {out / 'benchmark.json'}")
        if a.readme:
            write_readme(a.readme, report)


def machine():
    info = dict(cores=os.cpu_count(), platform=platform.platform())
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["simd"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
                break
    except OSError:
        pass
    try:
        meminfo = Path("/proc/meminfo").read_text().split("\n")[0]
        info["memory_gib"] = round(int(meminfo.split()[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


# ---------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------


def busy_cores(record):
    return record["cpu"] / record.get("median_seconds", record["seconds"])


def fmt(x, digits=0):
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


CONTENDED = 1.4  # cores busy below this: another process took CPU time during the measurement


def best_passes(records):
    """With --passes N, each measurement's best pass (most tokens/s); other records as they are."""
    best, others = {}, []
    for r in records:
        if r["kind"] in ("inference", "training", "scaling", "headtohead"):
            key = (r["kind"], r["variant"], r["model"], r["batch"], r["length"])
            if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                best[key] = r
        elif r["kind"] != "load":
            others.append(r)
    return others + list(best.values())


class Report:
    def __init__(self, driver):
        self.d = driver
        self.records = best_passes(driver.records)
        peaks = [r for r in self.records if r["kind"] == "peak" and "gflops" in r]
        self.peaks = peaks
        self.peak32 = max((r["gflops"] for r in peaks if r["dtype"] == "float32"), default=None)
        self.peak16 = max((r["gflops"] for r in peaks if r["dtype"] == "bfloat16"), default=None)

    def select(self, **criteria):
        return [r for r in self.records if all(r.get(k) == v for k, v in criteria.items())]

    def one(self, **criteria):
        found = self.select(**criteria)
        return found[0] if found else None

    def fraction(self, record, training=False, peak=None):
        peak = peak or self.peak32
        if not record or not peak:
            return None
        flops = flops_per_token(record["model"], record["length"], training)
        return record["tokens_per_s"] * flops / (peak * 1e9)

    def markdown(self):
        d, a = self.d, self.d.args
        m = self.d.machine
        lines = [
            "### Machine and run",
            "",
            f"- CPU: {m.get('cpu', '?')}, {m['cores']} cores, SIMD: {' '.join(m.get('simd', []))}; "
            f"{m.get('memory_gib', '?')} GiB",
            f"- load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in d.load_before)}; "
            f"after: {', '.join(f'{x:.2f}' for x in d.load_after)}; wall time {d.wall / 60:.1f} min"
            + (" (--quick)" if a.quick else ""),
            f"- timing: up to {a.warmup} warm-up call(s) (the first compiles), then the "
            f"{a.statistic} of at least {a.min_reps} calls and {a.min_time:g} s. 'cores busy' = the "
            "process's CPU time / wall time: under 2 means the work did not spread over both "
            "cores, or another process was competing for them",
            f"- † after a figure: cores busy under {CONTENDED} during that measurement (contended, "
            "or the work did not spread); 'shared': bert4k's TensorFlow variants were measured in "
            "one process, their calls interleaved, so their ratios are fair under load; their "
            "inference RSS is the whole group's"
            + (f"; best of {a.passes} passes" if getattr(a, "passes", 1) > 1 else ""),
        ]
        for r in self.select(kind="versions"):
            packages = ", ".join(f"{k} {v}" for k, v in r["packages"].items())
            lines.append(f"- env `{r['env']}`: Python {r['python']}, {packages}")
        lines += ["", self.peak_table(), ""]
        for model in a.models:
            if self.select(kind="inference", model=model) or self.select(kind="training", model=model):
                lines += [self.model_table(model), ""]
        if self.select(kind="generator_fit"):
            lines += [self.generator_fit_table(), ""]
        if self.select(kind="headtohead"):
            lines += [self.head_to_head_table(), ""]
        if self.select(kind="scaling"):
            lines += [self.scaling_table(), ""]
        if self.select(kind="tokenizer"):
            lines += [self.tokenizer_table(), ""]
        if self.select(kind="prepare") or self.select(kind="pretrain"):
            lines += [self.pretraining_table(), ""]
        lines += [self.goals(), ""]
        if d.failures:
            lines += ["### Not measured", ""]
            lines += [f"- {f['label']}: {f['reason']}" for f in d.failures]
            lines.append("")
        return "\n".join(lines)

    def peak_table(self):
        rows = ["### Matmul peak (square matmuls, n = %d)" % self.d.args.matmul_size, "",
                "| library | fp32 GFLOP/s | bf16 GFLOP/s |", "|---|---:|---:|"]
        libraries = sorted({r["library"] for r in self.select(kind="peak")},
                           key=lambda x: [r["library"] for r in self.select(kind="peak")].index(x))
        for library in libraries:
            cells = []
            for dtype in ("float32", "bfloat16"):
                r = self.one(kind="peak", library=library, dtype=dtype)
                cells.append(fmt(r.get("gflops")) if r and "gflops" in r else
                             ("error" if r else "-"))
            rows.append(f"| {library} | {cells[0]} | {cells[1]} |")
        rows.append(f"| **peak used** | **{fmt(self.peak32)}** | **{fmt(self.peak16)}** |")
        return "\n".join(rows)

    def model_table(self, model):
        c = MODELS[model]
        shapes = [tuple(s) for s in self.d.args.plan[model]["shapes"]]
        title = (f"### {MODEL_TITLES[model]}: tokens/s (% of fp32 peak)\n\nFLOPs/token (forward): "
                 + ", ".join(f"{fmt(flops_per_token(model, n) / 1e6, 1)} M at length {n}"
                             for n in sorted({s[1] for s in shapes}))
                 + f"; training step 3x. L={c['num_hidden_layers']}, H={c['hidden_size']}, "
                 f"I={c['intermediate_size']}.\n")
        header = ("| variant | " + " | ".join(f"{b}x{n}" for b, n in shapes)
                  + f" | train {TRAIN_SHAPE[0]}x{TRAIN_SHAPE[1]} | first call 8x128 s "
                  "| cores busy 8x128 / train | RSS infer / train MiB | max abs diff vs transformers |")
        rows = [title, header, "|---" * (len(shapes) + 6) + "|"]
        reference = Path(self.d.args.output) / f"out-transformers-torch-{model}.npy"
        for variant in self.d.args.plan[model]["variants"]:
            infer = {(r["batch"], r["length"]): r
                     for r in self.select(kind="inference", model=model, variant=variant)}
            train = self.one(kind="training", model=model, variant=variant)
            if not infer and not train:
                continue
            cells = []

            def flag(r):
                return "†" if busy_cores(r) < CONTENDED else ""

            for shape in shapes:
                r = infer.get(shape)
                cells.append(f"{fmt(r['tokens_per_s'])} ({self.fraction(r):.0%}){flag(r)}"
                             if r else "-")
            cells.append(f"{fmt(train['tokens_per_s'])} ({self.fraction(train, True):.0%})"
                         f"{flag(train)}" if train else "-")
            first = infer.get((8, 128))
            cells.append(fmt(first["first_call"], 1) if first else "-")
            busy = [f"{busy_cores(r):.1f}" if r else "-" for r in (first, train)]
            cells.append(" / ".join(busy))
            rss_infer = max((r["rss_mib"] for r in infer.values()), default=None)
            shared = " (shared)" if any(r.get("interleaved") for r in infer.values()) else ""
            cells.append(f"{fmt(rss_infer)}{shared} / {fmt(train['rss_mib']) if train else '-'}")
            cells.append(self.output_difference(variant, model, reference))
            rows.append(f"| {variant} | " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def output_difference(self, variant, model, reference, numbers=False):
        """max |mine - reference| over the first shape's first sequence, as text; or
        (absolute, relative to max |reference|) with numbers=True."""
        import numpy as np

        mine = Path(self.d.args.output) / f"out-{variant}-{model}.npy"
        if not (mine.exists() and reference.exists()):
            return None if numbers else "-"
        if mine == reference or variant == "transformers-torch":
            return (0.0, 0.0) if numbers else "(reference)"
        expected = np.load(reference)
        difference = float(np.max(np.abs(np.load(mine) - expected)))
        if numbers:
            return difference, difference / float(np.max(np.abs(expected)))
        return f"{difference:.1e}"

    def generator_fit_table(self):
        reference = self.one(kind="training", variant="bert4k-tf-graph", model="minilm",
                             batch=TRAIN_SHAPE[0], length=TRAIN_SHAPE[1])
        batch, length = TRAIN_SHAPE
        rows = [f"### Fine-tuning from a Python generator: bert4k-tf-graph, {MODEL_TITLES['minilm']}, "
                f"{batch}x{length}", "",
                "`model.fit` on a generator as the first thing in a fresh process. TensorFlow's "
                "generator dataset then sets malloc's trim threshold to 128 KB (and so its mmap "
                "threshold stays low); `DataGenerator.forfit` undoes that (`keep_freed_memory`). "
                "x: against `train_on_batch` (the table above, its own process).", "",
                "| feed | seconds/step | tokens/s | x | page faults/step | cores busy | RSS MiB |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for feed in GENERATOR_FEEDS:
            r = self.one(kind="generator_fit", feed=feed)
            if r:
                ratio = f"x{r['tokens_per_s'] / reference['tokens_per_s']:.2f}" if reference else "-"
                rows.append(f"| {feed} | {r['seconds']:.3f} | {fmt(r['tokens_per_s'])} | {ratio} | "
                            f"{fmt(r['page_faults_per_step'])} | {busy_cores(r):.1f} | {fmt(r['rss_mib'])} |")
        return "\n".join(rows)

    def head_to_head_table(self):
        rows = ["### Head to head: bert4k and keras-hub in one process, calls interleaved", "",
                "tokens/s (x: against the faster keras-hub mode at that shape). The same Keras "
                "and TensorFlow (keras-hub's environment); load from other processes falls on "
                "both alike.", ""]
        for model in self.d.args.models:
            records = self.select(kind="headtohead", model=model)
            if not records:
                continue
            shapes = sorted({(r["batch"], r["length"]) for r in records},
                            key=lambda s: (s[1], s[0]))
            rows += [f"{MODEL_TITLES[model]}:", "",
                     "| variant | " + " | ".join(f"{b}x{n}" for b, n in shapes) + " |",
                     "|---" * (len(shapes) + 1) + "|"]
            for variant in HEAD_TO_HEAD:
                cells = []
                for b, n in shapes:
                    r = self.one(kind="headtohead", model=model, variant=variant, batch=b, length=n)
                    hub = self.best("keras-hub-", model, "headtohead", (b, n))
                    cells.append(f"{fmt(r['tokens_per_s'])} (x{r['tokens_per_s'] / hub['tokens_per_s']:.2f})"
                                 if r and hub else "-")
                rows.append(f"| {variant} | " + " | ".join(cells) + " |")
            rows.append("")
        return "\n".join(rows)

    def scaling_table(self):
        rows = []
        for model in self.d.args.scaling_models:
            records = self.select(kind="scaling", model=model)
            if not records:
                continue
            variant = records[0]["variant"]
            rows += [f"### Scaling: {variant}, {MODEL_TITLES[model]}, hierarchical positions", "",
                     "| batch x length | seconds | tokens/s | FLOPs/token (M) | GFLOP/s | % fp32 peak "
                     "| time vs previous row | first call s | cores busy |",
                     "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            previous = None
            for r in records:
                gflops = r["tokens_per_s"] * flops_per_token(model, r["length"]) / 1e9
                ratio = (f"x{r['seconds'] / previous['seconds']:.2f}" if previous and (
                    previous["batch"] == r["batch"] or previous["length"] == r["length"]) else "")
                rows.append(f"| {r['batch']}x{r['length']} | {r['seconds']:.3f} | {fmt(r['tokens_per_s'])} "
                            f"| {flops_per_token(model, r['length']) / 1e6:.1f} | {fmt(gflops)} "
                            f"| {self.fraction(r):.0%} | {ratio} | {r['first_call']:.1f} "
                            f"| {busy_cores(r):.1f} |")
                previous = r
            rows.append("")
        return "\n".join(rows)

    def tokenizer_table(self):
        rows = ["### Tokenizers (MiniLM uncased vocab; encode with [CLS]/[SEP])", "",
                "| tokenizer | corpus | strings | strings/s | characters/s | vs bert4keras "
                "| ids differing from transformers Python |", "|---|---|---:|---:|---:|---:|---:|"]
        import json as _json

        ids_cache = {}

        def ids(record):
            path = record["ids_file"]
            if path not in ids_cache:
                ids_cache[path] = _json.loads(Path(path).read_text())
            return ids_cache[path]

        for corpus in ("sentiment", "english"):
            reference = self.one(kind="tokenizer", tokenizer="transformers-python", corpus=corpus)
            baseline = self.one(kind="tokenizer", tokenizer="bert4keras", corpus=corpus)
            for r in self.select(kind="tokenizer", corpus=corpus):
                speedup = (f"x{r['strings_per_s'] / baseline['strings_per_s']:.2f}" if baseline else "-")
                if reference:
                    differing = sum(x != y for x, y in zip(ids(r), ids(reference)))
                    differing = f"{differing} / {r['strings']}"
                else:
                    differing = "-"
                rows.append(f"| {r['tokenizer']} | {corpus} | {r['strings']} | {fmt(r['strings_per_s'])} "
                            f"| {fmt(r['chars_per_s'])} | {speedup} | {differing} |")
        return "\n".join(rows)

    def pretraining_table(self):
        rows = ["### Pretraining", ""]
        for r in self.select(kind="prepare"):
            rows.append(f"- `prepare` (MLM, length 128, {r['workers']} worker(s)): {r['documents']} documents "
                        f"in {r['seconds']:.1f} s = **{fmt(r['documents_per_s'])} documents/s** "
                        f"({r['examples']} examples, {fmt(r['tokens_per_s'])} tokens/s)")
        for r in self.select(kind="pretrain"):
            fraction = r["tokens_per_s"] * flops_per_token(r["model"], r["length"], True) / (self.peak32 * 1e9) \
                if self.peak32 else None
            rows.append(f"- `pretrain` (MLM, {MODEL_TITLES[r['model']].split(' (')[0]}, {r['batch']}x{r['length']}, "
                        f"{r['steps']} steps): **{fmt(r['tokens_per_s'])} tokens/s** "
                        f"({fmt(r['nonpad_tokens_per_s'])} non-padding tokens/s, the log's figure; "
                        f"{r['fill']:.0%} of positions are tokens), "
                        f"{fraction:.0%} of fp32 peak (encoder FLOPs only); RSS {fmt(r['rss_mib'])} MiB")
        return "\n".join(rows)

    # -- goals ----------------------------------------------------------------------------------

    def best(self, prefix, model, kind, shape, precision="float32"):
        found = [r for r in self.select(kind=kind, model=model, batch=shape[0], length=shape[1])
                 if r["variant"].startswith(prefix) and VARIANTS[r["variant"]][3] == precision]
        return max(found, key=lambda r: r["tokens_per_s"], default=None)

    def goals(self):
        rows = ["### Goals (issue 8)", "", "| goal | measured | met |", "|---|---|---|"]

        def row(goal, measured, met):
            rows.append(f"| {goal} | {measured} | {'yes' if met else 'no' if met is not None else '-'} |")

        for model in self.d.args.models:
            for kind, shapes in (("inference", [tuple(s) for s in self.d.args.plan[model]["shapes"]]),
                                 ("training", [TRAIN_SHAPE])):
                for shape in shapes:
                    mine = self.best("bert4k-", model, kind, shape)
                    for peer in ("keras-hub-", "bert4keras-"):
                        theirs = self.best(peer, model, kind, shape)
                        if mine and theirs:
                            ratio = mine["tokens_per_s"] / theirs["tokens_per_s"]
                            row(f"{model} {kind} {shape[0]}x{shape[1]}: bert4k >= {peer[:-1]}",
                                f"{mine['variant']} {fmt(mine['tokens_per_s'])} vs {theirs['variant']} "
                                f"{fmt(theirs['tokens_per_s'])} tokens/s (x{ratio:.2f})", ratio >= 1.0)
        for model in self.d.args.models:
            shapes = sorted({(r["batch"], r["length"]) for r in self.select(kind="headtohead",
                                                                           model=model)})
            for shape in shapes:
                mine = self.best("bert4k-", model, "headtohead", shape)
                theirs = self.best("keras-hub-", model, "headtohead", shape)
                if mine and theirs:
                    ratio = mine["tokens_per_s"] / theirs["tokens_per_s"]
                    row(f"{model} inference {shape[0]}x{shape[1]}: bert4k >= keras-hub, head to head",
                        f"{mine['variant']} vs {theirs['variant']}: x{ratio:.2f}", ratio >= 1.0)
        mine = self.best("bert4k-", "base", "inference", (8, 128))
        if mine:
            f = self.fraction(mine)
            row("base 8x128 inference >= 85% of fp32 peak", f"{mine['variant']}: {f:.0%}", f >= 0.85)
        mine = self.best("bert4k-", "base", "training", TRAIN_SHAPE)
        if mine:
            f = self.fraction(mine, True)
            row("base 16x128 training step >= 75% of fp32 peak", f"{mine['variant']}: {f:.0%}", f >= 0.75)
        for model in self.d.args.models:
            fast = self.best("bert4k-", model, "inference", (8, 128), precision="bfloat16")
            slow = self.best("bert4k-", model, "inference", (8, 128))
            if fast and slow:
                ratio = fast["tokens_per_s"] / slow["tokens_per_s"]
                row(f"{model}: fastest bert4k bf16 >= 1.5x fastest bert4k fp32 (8x128)",
                    f"{fast['variant']} {fmt(fast['tokens_per_s'])} vs {slow['variant']} "
                    f"{fmt(slow['tokens_per_s'])} tokens/s (x{ratio:.2f})", ratio >= 1.5)
            for backend in ("bert4k-tf-graph", "bert4k-tf-xla", "bert4k-jax"):
                fast = self.one(kind="inference", model=model, variant=backend + "-bf16", batch=8, length=128)
                slow = self.one(kind="inference", model=model, variant=backend, batch=8, length=128)
                if fast and slow:
                    ratio = fast["tokens_per_s"] / slow["tokens_per_s"]
                    diff = self.output_difference(backend + "-bf16", model, Path(
                        self.d.args.output) / f"out-{backend}-{model}.npy", numbers=True)
                    # Hidden states reach |6| or more: bf16's 8-bit mantissa alone spaces values
                    # there 2^-5 apart, so 1e-2 is taken relative to the largest output.
                    ok_diff = diff is not None and diff[1] <= 1e-2
                    shown = (f"max abs diff {diff[0]:.1e} = {diff[1]:.1e} of max abs output"
                             if diff else "no outputs")
                    row(f"{model} {backend} bf16 >= 1.5x its fp32 (8x128), outputs within 1e-2 "
                        "(relative)",
                        f"x{ratio:.2f}; {shown}", ratio >= 1.5 and ok_diff)
            for backend in ("bert4k-tf-graph", "bert4k-tf-xla"):  # informational: no goal
                for r in self.select(kind="inference", model=model, variant=backend):
                    explicit = self.one(kind="inference", model=model, variant=backend + "-explicit",
                                        batch=r["batch"], length=r["length"])
                    if explicit:
                        row(f"{model} {backend} {r['batch']}x{r['length']}: fused attention vs "
                            "explicit einsums", f"x{r['tokens_per_s'] / explicit['tokens_per_s']:.2f}"
                            " (above 1: fused faster)", None)
        for corpus in ("sentiment", "english"):
            mine = self.one(kind="tokenizer", tokenizer="bert4k", corpus=corpus)
            old = self.one(kind="tokenizer", tokenizer="bert4keras", corpus=corpus)
            hf = self.one(kind="tokenizer", tokenizer="transformers-python", corpus=corpus)
            if mine and old:
                ratio = mine["strings_per_s"] / old["strings_per_s"]
                row(f"tokenizer >= 3x bert4keras ({corpus})", f"x{ratio:.2f}", ratio >= 3)
            if mine and hf:
                ratio = mine["strings_per_s"] / hf["strings_per_s"]
                same = json.loads(Path(mine["ids_file"]).read_text()) == json.loads(Path(hf["ids_file"]).read_text())
                row(f"tokenizer faster than transformers Python, same ids ({corpus})",
                    f"x{ratio:.2f}; ids {'identical' if same else 'DIFFER'}", ratio > 1 and same)
        return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    sections = ("inference", "training", "scaling", "tokenizer", "pretraining")
    for section in sections:
        p.add_argument("--" + section, action="store_true", help=f"run the {section} section")
    p.add_argument("--quick", action="store_true", help="smoke run: MiniLM, 8x128, few variants, short timings")
    p.add_argument("--all", action="store_true", help="every variant at every shape on both models")
    p.add_argument("--models", help="comma-separated: minilm,base (default both; --quick: minilm)")
    p.add_argument("--variants", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--shapes", help="inference shapes, e.g. 1x128,8x128,32x128,8x512")
    p.add_argument("--warmup", type=int, help="warm-up calls (the first compiles); default 2, quick 1")
    p.add_argument("--min-time", type=float, help="timed seconds per measurement (default 3, quick 1)")
    p.add_argument("--min-reps", type=int, help="timed calls per measurement at least (default 3, quick 2)")
    p.add_argument("--statistic", choices=["median", "min"], default="median",
                   help="of the timed calls (min is steadier on a shared machine)")
    p.add_argument("--passes", type=int, default=1,
                   help="measure every variant this many times (alternating order) and report "
                        "each one's best pass: steadier on a shared machine, N times longer")
    p.add_argument("--no-head-to-head", dest="head_to_head", action="store_false",
                   help="skip the head-to-head inference of bert4k and keras-hub in one process")
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="measure bert4k's TensorFlow variants one process each, not interleaved")
    p.add_argument("--matmul-size", type=int, default=3072)
    p.add_argument("--scaling-variant", default="bert4k-tf-graph")
    p.add_argument("--scaling-models", help="default minilm")
    p.add_argument("--scaling-batch", type=int, default=4, help="batch of the length sweep")
    p.add_argument("--tokenizer-passes", type=int, help="default 2, quick 1")
    p.add_argument("--tokenizer-limit", type=int, help="strings per corpus (default all; quick 2000)")
    p.add_argument("--pretraining-model", default="minilm", choices=sorted(MODELS))
    p.add_argument("--pretraining-steps", type=int, help="default 8, quick 4")
    p.add_argument("--pretraining-documents", type=int, help="default 8000, quick 2000 (of 16,883)")
    p.add_argument("--python", action="append", metavar="ENV=PATH",
                   help="use another Python for an environment (main, jax, torch, keras-hub, bert4keras)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    p.add_argument("--output", default=str(BENCH / "results"))
    p.add_argument("--report-only", action="store_true",
                   help="print the tables of the last run in --output again, measuring nothing")
    p.add_argument("--readme", metavar="PATH",
                   help="also write the tables into PATH (README.md) between the lines "
                        f"{README_BEGIN!r} and {README_END!r}")
    a = p.parse_args(argv)
    if a.worker:
        return a
    if not any(getattr(a, s) for s in sections):
        for s in sections:
            setattr(a, s, True)
    q = a.quick
    default = QUICK_PLAN if q else DEFAULT_PLAN
    a.models = a.models.split(",") if a.models else list(default)
    variants = a.variants.split(",") if a.variants else None
    for v in variants or []:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; expected one of {', '.join(VARIANTS)}")
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")] if a.shapes else None
    a.plan = {}
    for model in a.models:
        if model not in MODELS:
            p.error(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
        plan = default.get(model) or DEFAULT_PLAN[model]
        a.plan[model] = dict(
            variants=variants or (list(VARIANTS) if a.all else plan["variants"]),
            shapes=shapes or (INFERENCE_SHAPES if a.all else plan["shapes"]))
    a.warmup = a.warmup or (1 if q else 2)
    a.min_time = a.min_time if a.min_time is not None else (1.0 if q else 3.0)
    a.min_reps = a.min_reps or (2 if q else 3)
    a.scaling_models = a.scaling_models.split(",") if a.scaling_models else ["minilm"]
    a.tokenizer_passes = a.tokenizer_passes or (1 if q else 2)
    a.tokenizer_limit = a.tokenizer_limit or (2000 if q else None)
    a.pretraining_steps = a.pretraining_steps or (4 if q else 8)
    a.pretraining_documents = a.pretraining_documents or (2000 if q else 8000)
    Path(a.output).mkdir(parents=True, exist_ok=True)
    return a


README_BEGIN = "<!-- benchmark.py tables: begin -->"
README_END = "<!-- benchmark.py tables: end -->"


def write_readme(path, report):
    """Replace what lies between README_BEGIN and README_END in `path` with `report` (the rest of
    the file, prose included, stays as it is)."""
    text = Path(path).read_text(encoding="utf-8")
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"--readme: {path} has no {README_BEGIN!r} ... {README_END!r} block")
    # One heading level down: the tables sit under the README's own "## Performance" heading.
    tables = "\n".join("#" + line if line.startswith("### ") else line
                       for line in report.splitlines())
    text = text[:start + len(README_BEGIN)] + "\n\n" + tables.strip() + "\n\n" + text[end:]
    Path(path).write_text(text, encoding="utf-8")
    print(f"tables written into {path}")


def report_only(args):
    """Render the tables again from --output's benchmark.json (e.g. after changing the report)."""
    saved = json.loads((Path(args.output) / "benchmark.json").read_text())
    driver = argparse.Namespace(records=saved["records"], failures=saved["failures"],
                                load_before=saved["load_before"], load_after=saved["load_after"],
                                wall=saved["wall_s"], args=argparse.Namespace(**saved["args"]),
                                machine=saved["machine"])
    driver.args.output = args.output
    saved_args = vars(driver.args)
    saved_args.setdefault("statistic", "median")
    saved_args.setdefault("passes", 1)
    if "plan" not in saved_args:  # a run from before per-model plans
        saved_args["plan"] = {m: dict(variants=saved_args["variants"], shapes=saved_args["shapes"])
                              for m in saved_args["models"]}
    report = Report(driver).markdown()
    (Path(args.output) / "benchmark.md").write_text(report)
    print(report)
    if args.readme:
        write_readme(args.readme, report)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        run_worker(json.loads(args.worker))
    elif args.report_only:
        report_only(args)
    else:
        Driver(args).main()


if __name__ == "__main__":
    main()
