"""The measurements of scripts/benchmark.py, each run as `benchmark.py --worker JOB` in the
environment of the peer it measures (bert4k's .venv, or .bench/<peer>): they may lack bert4k, so
the module imports only the standard library at its top and each library inside the worker that
uses it. Results are printed as JSON lines (`emit`) for the driver to collect."""

import json
import os
import platform
import resource
import shutil
import statistics
import time
from pathlib import Path

from benchmark_plan import CACHE, FUSED_ATTENTION, MODELS, RESULT_PREFIX, VOCAB_SIZE, model_dir

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
# Timing
# ---------------------------------------------------------------------------------------------------


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


# Enough calls for min_time at every measured shape (MiniLM 1x128 takes about 20 ms a call);
# a cap of 50 timed it for about 1 s instead of the 3 s the report states.
MAX_REPS = 1000


def measure(fn, warmup, min_time, min_reps, max_reps=MAX_REPS, statistic="median"):
    """Times of fn(): dict(first_call (the first call: it compiles), seconds (the median, or the
    minimum with statistic='min', of the timed calls), median_seconds, min_seconds, reps, cpu
    (median CPU seconds of the process per call: cpu / seconds is how many cores it kept busy)).
    Warm-up: `warmup` calls, however long they take: TensorFlow's second training step still
    faults in about 900 MiB of fresh pages (BERT-base 16x128: 7 s against 3 s from the third on)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
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


def measure_interleaved(fns, warmup, min_time, min_reps, max_reps=MAX_REPS, statistic="median"):
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
            if self.impl == "bert4k" and keras.backend.backend() == "jax":
                from bert4k.snippets import keep_freed_memory

                keep_freed_memory()  # as the README advises for training on a CPU: before JAX starts
            if job["precision"] == "bfloat16" and self.impl != "bert4k":
                keras.config.set_dtype_policy("mixed_bfloat16")

    def compile_options(self):
        return dict(jit_compile=self.mode == "xla", run_eagerly=self.mode == "eager")

    def build(self, pooled=False, dropout=True, training=False):
        """The encoder: [token ids, segment ids] -> sequence output, or the pooled output."""
        keras = self.keras
        if self.impl == "bert4k":
            from bert4k.models import build_transformer_model

            extra = {} if dropout else dict(dropout_rate=0.0, attention_dropout_rate=0.0)
            if self.job.get("hierarchical"):
                extra["hierarchical_position"] = True
            if self.job["precision"] == "bfloat16":  # the builder's options, as the README shows
                extra["dtype_policy"] = "mixed_bfloat16" if training else "bfloat16"
            if self.job["variant"] in FUSED_ATTENTION:
                extra["attention_implementation"] = "fused"
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

    def fine_tuning_optimizer(self):
        """The AdamW a library's users fine-tune with: bert4k's on TensorFlow (one fused kernel
        per variable), Keras's elsewhere (on PyTorch Keras's own runs torch's multi-tensor ops)."""
        keras = self.keras
        if self.impl == "bert4k" and keras.backend.backend() == "tensorflow":
            return bert4k_adamw()
        return keras.optimizers.AdamW(learning_rate=2e-5)

    def classifier(self, optimizer=None):
        """pooled [CLS] -> Dense(2) softmax, compiled for training (default: fine_tuning_optimizer)."""
        keras = self.keras
        encoder = self.build(pooled=True, training=True)
        probabilities = keras.layers.Dense(2, activation="softmax", name="Classifier")(encoder.output)
        model = keras.Model(encoder.inputs, probabilities)
        # bert4k's pooled-only encoder runs its last block at [CLS] alone: the report counts the
        # FLOPs it runs (benchmark_plan.flops_per_token).
        self.pooled_only = any(layer.name.endswith("-First-Position") for layer in model.layers)
        optimizer = optimizer or self.fine_tuning_optimizer()
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                      **self.compile_options())
        return model

    def training(self):
        model = self.classifier()
        return lambda tokens, segments, labels: model.train_on_batch([tokens, segments], labels)


def bert4k_adamw(base=None):
    """`extend_with_weight_decay(Adam)` as BERT fine-tunes: LayerNorm and biases not decayed."""
    from bert4k import optimizers as O

    base = base or O.Adam
    AdamW = O.extend_with_weight_decay(base, name=f"Benchmark{base.__name__}W")
    return AdamW(learning_rate=2e-5, weight_decay_rate=0.01, exclude_from_weight_decay=["Norm", "bias"])


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
    """Several variants of one environment in one process, their calls interleaved
    (measure_interleaved): inference at job['shapes'], or with job['train'] = [batch, length] their
    fine-tuning steps. Records say interleaved=True, and their RSS is the group's."""
    import numpy as np

    training = bool(job.get("train"))
    calls, pooled_only = {}, {}
    for member in job["group"]:
        started = time.perf_counter()
        runner = make_runner(dict(job, **member))
        calls[member["variant"]] = runner.training() if training else runner.inference()
        pooled_only[member["variant"]] = getattr(runner, "pooled_only", False)
        emit(dict(variant=member["variant"], model=job["model"], kind="load",
                  seconds=time.perf_counter() - started))
    for index, (batch, length) in enumerate([job["train"]] if training else job["shapes"]):
        tokens, segments, labels = make_inputs(batch, length)
        inputs = (tokens, segments, labels) if training else (tokens, segments)
        fns = {name: (lambda call=call: call(*inputs)) for name, call in calls.items()}
        results = measure_interleaved(fns, **job["timing"])
        for member in job["group"]:
            name = member["variant"]
            if index == 0 and member.get("save_output") and not training:
                np.save(member["save_output"], calls[name](tokens, segments)[0])
            emit(dict(variant=name, model=job["model"], kind=job.get("kind", "inference"),
                      batch=batch, length=length, interleaved=True, **results[name],
                      tokens_per_s=batch * length / results[name]["seconds"], rss_mib=rss_mib(),
                      pooled_only=pooled_only[name]))


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
                  tokens_per_s=batch * length / times["seconds"], rss_mib=rss_mib(),
                  pooled_only=getattr(runner, "pooled_only", False)))


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


def worker_optimizer(job):
    """bert4k's Adam (TensorFlow's fused ResourceApplyAdam kernel) against Keras's optimizers and
    against itself with the kernel turned off: one update of a model's trainable variables (fixed
    dense gradients), the optimizers' calls interleaved; then whole training steps of the
    classifier with `extend_with_weight_decay(Adam)`, kernel on and off, and with Keras's AdamW,
    interleaved."""
    import keras
    import numpy as np
    import tensorflow as tf

    from bert4k import optimizers as O

    class KernelOff(O.Adam):
        def _takes_fused_kernel(self, variable):
            return False

    runner = KerasRunner(dict(job, variant="bert4k-tf-graph", impl="bert4k", mode="graph",
                              precision="float32"))
    variables = runner.build(pooled=True, training=True).trainable_variables
    rng = np.random.RandomState(0)
    gradients = [tf.constant(rng.normal(0, 1e-3, v.shape).astype("float32")) for v in variables]
    optimizers = {
        "keras.optimizers.Adam": keras.optimizers.Adam(2e-5),
        "keras.optimizers.AdamW": keras.optimizers.AdamW(2e-5),
        "bert4k Adam": O.Adam(2e-5),
        "bert4k Adam, kernel off": KernelOff(2e-5),
        "bert4k extend_with_weight_decay(Adam)": bert4k_adamw(),
    }
    updates = {}
    for name, optimizer in optimizers.items():
        optimizer.build(variables)
        updates[name] = tf.function(lambda optimizer=optimizer: optimizer.apply(gradients, variables))
    parameters = sum(int(np.prod(v.shape)) for v in variables)
    for name, times in measure_interleaved(updates, **job["timing"]).items():
        emit(dict(kind="optimizer_update", optimizer=name, model=job["model"], parameters=parameters,
                  **times))
    batch, length = job["train"]
    tokens, segments, labels = make_inputs(batch, length)
    steps = {}
    for name, optimizer in (("bert4k AdamW, kernel on", bert4k_adamw()),
                            ("bert4k AdamW, kernel off", bert4k_adamw(KernelOff)),
                            ("keras.optimizers.AdamW", keras.optimizers.AdamW(2e-5))):
        model = runner.classifier(optimizer)
        steps[name] = lambda model=model: model.train_on_batch([tokens, segments], labels)
    for name, times in measure_interleaved(steps, **job["timing"]).items():
        emit(dict(kind="optimizer_step", optimizer=name, model=job["model"], batch=batch,
                  length=length, **times, tokens_per_s=batch * length / times["seconds"]))


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


def tokenizer_makers(name, vocab):
    """[(label, make)]: make() builds a fresh tokenizer and returns its encode(texts) -> ids."""
    if name in ("bert4k", "bert4keras"):
        if name == "bert4k":
            from bert4k.tokenizers import Tokenizer
        else:
            from bert4keras.tokenizers import Tokenizer

        def make():
            tokenizer = Tokenizer(vocab, do_lower_case=True)
            return lambda texts: [tokenizer.encode(t)[0] for t in texts]
        return [(name, make)]
    if name == "transformers-python":
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

        def make():
            tokenizer = BertTokenizerLegacy(vocab, do_lower_case=True)
            return lambda texts: [tokenizer.encode(t) for t in texts]
        return [(name, make)]
    from transformers.models.bert.tokenization_bert import BertTokenizer

    def make(batch=False):
        tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
        if batch:
            return lambda texts: tokenizer(list(texts))["input_ids"]
        return lambda texts: [tokenizer(t)["input_ids"] for t in texts]
    return [(name, make), (name + " (batch)", lambda: make(batch=True))]


def worker_tokenizer(job):
    """Encode passes over each corpus, each with a fresh tokenizer (its caches cold, as a single
    pass over a corpus would find them), at least `passes` and `min_time` seconds of them (at most
    50): a pass of bert4k's takes half a second, short enough for a moment's load to halve it.
    The median pass counts; ids written for comparison. With several tokenizers (a list; kind
    'tokenizer-headtohead') their passes are interleaved in this one process, so that load from
    elsewhere falls on all of them alike."""
    vocab = str(model_dir("minilm") / "vocab.txt")
    names = job["tokenizer"] if isinstance(job["tokenizer"], list) else [job["tokenizer"]]
    makers = [pair for name in names for pair in tokenizer_makers(name, vocab)]
    kind = "tokenizer-headtohead" if len(names) > 1 else "tokenizer"
    for corpus in job["corpora"]:
        texts = Path(job["corpus_files"][corpus]).read_text(encoding="utf-8").split("\n")
        texts = texts[: job["limit"]] if job.get("limit") else texts
        characters = sum(map(len, texts))
        times, ids = {label: [] for label, _ in makers}, {}

        def enough(t):
            return len(t) >= job["passes"] and (sum(t) >= job.get("min_time", 0) or len(t) >= 50)
        while not all(enough(t) for t in times.values()):
            for label, make in makers:
                encode = make()
                start = time.perf_counter()
                ids[label] = encode(texts)
                times[label].append(time.perf_counter() - start)
        for label, _ in makers:
            seconds = statistics.median(times[label])
            record = dict(kind=kind, tokenizer=label, corpus=corpus, strings=len(texts),
                          characters=characters, seconds=seconds,
                          strings_per_s=len(texts) / seconds, chars_per_s=characters / seconds,
                          passes=len(times[label]))
            if kind == "tokenizer":
                out = Path(job["ids_dir"]) / f"{label.replace(' (', '-').replace(')', '')}-{corpus}.json"
                out.write_text(json.dumps([list(map(int, x)) for x in ids[label]]))
                record["ids_file"] = str(out)
            emit(record)


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
     "generator_fit": worker_generator_fit, "optimizer": worker_optimizer,
     "tokenizer": worker_tokenizer, "pretraining": worker_pretraining, "assets": worker_assets,
     "versions": worker_versions}[job["job"]](job)

