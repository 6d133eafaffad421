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
  under torch.inference_mode(). bert4k's attention is its default ('auto': on TensorFlow its own
  batched matmuls); the '-fused' variants run keras.ops.dot_product_attention instead. '-bf16':
  bert4k built with dtype_policy='bfloat16' to predict (weights stored in bf16) and
  'mixed_bfloat16' to train (other Keras peers: keras.config.set_dtype_policy('mixed_bfloat16'));
  TensorFlow's graph mode runs bf16 matmuls through oneDNN (AVX512_BF16 or AMX), while its XLA
  has no fast bf16 kernel on a CPU. bert4k on JAX calls `bert4k.snippets.keep_freed_memory()`
  first, as its README advises for training on a CPU (its inference, in the same process, too).
  Warm-up calls (the first one compiles: its time is reported as 'first call'), then timed calls
  until --min-time seconds and at least --min-reps calls; the median (--statistic) is the time.
  tokens/s = batch * length / time. The process's CPU time per call / wall time is reported as
  'cores busy' (2 = both cores; less: the work did not spread, or another process took a core).
* Fine-tuning: a classifier (pooled [CLS] -> Dense(2) softmax, sparse cross-entropy, AdamW 2e-5,
  dropout 0.1 as in the configs) at 16x128: Keras `train_on_batch`; torch forward, backward,
  AdamW step. The AdamW is bert4k's `extend_with_weight_decay(Adam)` for bert4k on TensorFlow,
  Keras's for the other Keras variants, torch.optim.AdamW for transformers.
* Head to head: bert4k's and keras-hub's graph and XLA variants in one process (keras-hub's
  environment), calls interleaved: their inference at every shape, then, in a second process,
  their fine-tuning steps.
* Optimizer (--training): bert4k's Adam, whose update on TensorFlow is one fused
  `ResourceApplyAdam` kernel per variable, against Keras's Adam and AdamW and against itself with
  the kernel turned off: one update of the classifier's trainable variables (fixed dense
  gradients), calls interleaved; then the classifier's `train_on_batch` at 16x128 with
  `extend_with_weight_decay(Adam)`, kernel on and off, and with Keras's AdamW, interleaved
  (--optimizer-models, default the --models).
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
  environment in this run (TensorFlow eager and XLA, numpy, torch, JAX), TensorFlow's again after
  each model's jobs and at the end (the machine's speed drifts within a run); the best fp32 figure
  is the peak, and '% peak' = tokens/s * FLOPs/token / that peak, for every variant (bf16 ones
  too): a figure measured in a slow minute is set against the fastest minute's peak.
* Memory: the subprocess's peak resident set (ru_maxrss) after its inference runs, and after
  fine-tuning (which includes them); one process per peer, variant and model.
* Scaling: bert4k (--scaling-variant) with hierarchical positions, sequence length 128 -> 1024 at a
  fixed batch, then batch 1 -> 64 at length 128.
* Tokenizers: one pass of `encode` per string (batch call for the Rust tokenizer as well), fresh
  tokenizer each pass, median of at least --tokenizer-passes passes and --min-time seconds; over
  the bundled Chinese sentiment corpus (train split) and English text (docstrings of Python's standard library, a fixed module list), with
  MiniLM's uncased vocabulary. ids are compared with transformers' Python BertTokenizer.
* Pretraining: `pretraining.data_utils.prepare` (documents/s into TFRecords, MLM, whole-word
  masking, length 128) on the sentiment corpus (one document a line), then
  `pretraining.pretraining.pretrain` (MLM, MiniLM-sized model) whose log gives tokens/s.
Timings on a shared machine are noisy: the report gives the load average before and after.
The code: benchmark_plan.py (what is measured), benchmark_workers.py (the measurements, each run in
its peer's environment), benchmark_report.py (the tables); this file drives them.
"""

import argparse
import json
import os
import platform
import subprocess
import threading
import time
from pathlib import Path

from benchmark_plan import (BENCH, DEFAULT_PLAN, ENVIRONMENTS, GENERATOR_FEEDS, HEAD_TO_HEAD, INFERENCE_SHAPES,
                            MODELS, QUICK_PLAN, RESULT_PREFIX, ROOT, TOKENIZERS, TRAIN_SHAPE, VARIANTS)
from benchmark_report import README_BEGIN, README_END, Report, write_readme
from benchmark_workers import run_worker

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
        load from other processes cannot tilt. Inference at the model's shapes, then, in a second
        process, the fine-tuning steps (BERT-base's four training models take 14 GiB together).
        bert4keras cannot join: with TF_USE_LEGACY_KERAS=1, `import keras` gives Keras 2 in that
        process."""
        a = self.args
        group = []
        for variant in HEAD_TO_HEAD:
            _, impl, mode, precision = VARIANTS[variant]
            group.append(dict(variant=variant, impl=impl, mode=mode, precision=precision))
        job = dict(job="group", model=model, group=group, timing=self.timing())
        if a.inference:
            shapes = [list(s) for s in a.plan[model]["shapes"]]
            self.run("keras-hub", dict(job, kind="headtohead", shapes=shapes), f"head-to-head-{model}")
        if a.training:
            self.run("keras-hub", dict(job, kind="headtohead-training", train=list(TRAIN_SHAPE)),
                     f"head-to-head-training-{model}")

    def measure_peak(self, env, label):
        """Square matmuls in env: run at the start, after each model's jobs and at the end, as
        the machine's speed drifts within a run; the report takes the fastest."""
        self.run(env, dict(job="peak", env=env, n=self.args.matmul_size), label, timeout=600)

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
            self.measure_peak(env, f"peak-{env}")
        for pass_index in range(a.passes if (a.inference or a.training) else 0):
            for model in a.models:
                self.run_model_jobs(model, pass_index)
                self.measure_peak("main", f"peak-main-after-{model}-{pass_index + 1}")
        if a.training:
            for feed in GENERATOR_FEEDS:
                job = dict(job="generator_fit", feed=feed, model="minilm", batch=TRAIN_SHAPE[0],
                           length=TRAIN_SHAPE[1], warmup_steps=5, steps=8 if a.quick else 20)
                self.run("main", job, "generator-fit-" + feed.replace(" ", "-").lower())
            for model in a.optimizer_models:
                job = dict(job="optimizer", model=model, train=TRAIN_SHAPE, timing=self.timing())
                self.run("main", job, f"optimizer-{model}")
        if a.head_to_head and (a.inference or a.training):
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
                           min_time=a.min_time, limit=a.tokenizer_limit)
                self.run(env, job, f"tokenizer-{name}")
            # bert4k's and bert4keras's passes interleaved in one process (bert4keras's
            # environment; bert4k from PYTHONPATH): a ratio that load from elsewhere cannot tilt.
            self.run("bert4keras", dict(job, tokenizer=["bert4k", "bert4keras"]),
                     "tokenizer-head-to-head")
        if a.pretraining and corpora:
            job = dict(job="pretraining", model=a.pretraining_model, work_dir=str(BENCH / "pretraining"),
                       corpus_file=corpora["sentiment"], documents=a.pretraining_documents,
                       workers=[1, os.cpu_count() or 1] if not a.quick else [os.cpu_count() or 1],
                       length=128, batch=16, steps=a.pretraining_steps)
            self.run("main", job, "pretraining")
        self.measure_peak("main", "peak-main-at-end")
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
                   help="skip the head-to-head runs of bert4k and keras-hub in one process "
                        "(inference and fine-tuning)")
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="measure bert4k's TensorFlow variants one process each, not interleaved")
    p.add_argument("--matmul-size", type=int, default=3072)
    p.add_argument("--scaling-variant", default="bert4k-tf-graph")
    p.add_argument("--scaling-models", help="default minilm")
    p.add_argument("--scaling-batch", type=int, default=4, help="batch of the length sweep")
    p.add_argument("--optimizer-models", help="models of the optimizer measurement (default: --models)")
    p.add_argument("--tokenizer-passes", type=int,
                   help="encode passes per corpus at least, and --min-time seconds of them "
                        "(default 2, quick 1)")
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
    a.optimizer_models = a.optimizer_models.split(",") if a.optimizer_models else list(a.models)
    a.tokenizer_passes = a.tokenizer_passes or (1 if q else 2)
    a.tokenizer_limit = a.tokenizer_limit or (2000 if q else None)
    a.pretraining_steps = a.pretraining_steps or (4 if q else 8)
    a.pretraining_documents = a.pretraining_documents or (2000 if q else 8000)
    Path(a.output).mkdir(parents=True, exist_ok=True)
    return a


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
