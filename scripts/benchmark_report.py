"""The tables of scripts/benchmark.py: markdown from the records its workers emitted, and the
README block they are written into."""

import json
from pathlib import Path

from benchmark_plan import (GENERATOR_FEEDS, HEAD_TO_HEAD, MODEL_TITLES, MODELS, TRAIN_SHAPE, VARIANTS,
                            flops_per_token)

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
        if r["kind"] in ("inference", "training", "scaling", "headtohead", "headtohead-training"):
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
        self.peak32 = max((r["gflops"] for r in peaks if r["dtype"] == "float32"), default=None)
        self.peak16 = max((r["gflops"] for r in peaks if r["dtype"] == "bfloat16"), default=None)

    def select(self, **criteria):
        return [r for r in self.records if all(r.get(k) == v for k, v in criteria.items())]

    def shapes(self, kind, model):
        """The (batch, length) shapes measured, by length then batch."""
        found = {(r["batch"], r["length"]) for r in self.select(kind=kind, model=model)}
        return sorted(found, key=lambda shape: (shape[1], shape[0]))

    def one(self, **criteria):
        found = self.select(**criteria)
        return found[0] if found else None

    def fraction(self, record, training=False, peak=None):
        peak = peak or self.peak32
        if not record or not peak:
            return None
        flops = flops_per_token(record["model"], record["length"], training,
                                record.get("pooled_only", False))
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
            f"- timing: {a.warmup} warm-up call(s) (the first compiles), then the "
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
        if self.select(kind="optimizer_update"):
            lines += [self.optimizer_table(), ""]
        if self.select(kind="headtohead") or self.select(kind="headtohead-training"):
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
        """The fastest measurement of each library and dtype; where one was measured more than
        once (TensorFlow's, through the run), the slowest beside it, to show the drift."""
        rows = ["### Matmul peak (square matmuls, n = %d)" % self.d.args.matmul_size, "",
                "| library | fp32 GFLOP/s | bf16 GFLOP/s |", "|---|---:|---:|"]
        peaks = self.select(kind="peak")
        libraries = list(dict.fromkeys(r["library"] for r in peaks))
        for library in libraries:
            cells = []
            for dtype in ("float32", "bfloat16"):
                found = [r for r in peaks if r["library"] == library and r["dtype"] == dtype]
                speeds = [r["gflops"] for r in found if "gflops" in r]
                cell = fmt(max(speeds)) if speeds else ("error" if found else "-")
                if len(speeds) > 1:
                    cell += f" (slowest of {len(speeds)}: {fmt(min(speeds))})"
                cells.append(cell)
            rows.append(f"| {library} | {cells[0]} | {cells[1]} |")
        rows.append(f"| **peak used** | **{fmt(self.peak32)}** | **{fmt(self.peak16)}** |")
        return "\n".join(rows)

    def model_table(self, model):
        c = MODELS[model]
        shapes = [tuple(s) for s in self.d.args.plan[model]["shapes"]]
        title = (f"### {MODEL_TITLES[model]}: tokens/s (% of fp32 peak)\n\nFLOPs/token (forward): "
                 + ", ".join(f"{fmt(flops_per_token(model, n) / 1e6, 1)} M at length {n}"
                             for n in sorted({s[1] for s in shapes}))
                 + "; training step 3x. Training: a classifier step with AdamW, bert4k's "
                 "(`extend_with_weight_decay(Adam)`) for bert4k on TensorFlow, Keras's for the other "
                 "Keras variants, torch.optim.AdamW for transformers. bert4k's classifier (`with_pool`) "
                 "runs its last block at [CLS] alone: its % counts the "
                 f"{fmt(flops_per_token(model, TRAIN_SHAPE[1], True, True) / 1e6, 1)} M FLOPs a token "
                 f"it runs, the others' {fmt(flops_per_token(model, TRAIN_SHAPE[1], True) / 1e6, 1)} M."
                 + f" L={c['num_hidden_layers']}, H={c['hidden_size']}, "
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

    def optimizer_table(self):
        rows = ["### Optimizer: bert4k's Adam (one fused TensorFlow kernel per variable) against Keras's",
                "",
                "One update of the classifier's trainable variables (fixed dense gradients), the "
                "optimizers' calls interleaved in one process; x: against keras.optimizers.Adam. "
                "Then whole `train_on_batch` steps of bert4k's classifier with bert4k's AdamW "
                "(`extend_with_weight_decay(Adam)`), the kernel on and off, and with Keras's AdamW, "
                "interleaved; x: against Keras's AdamW.", "",
                "| model | optimizer | update ms | x |", "|---|---|---:|---:|"]
        for model in self.d.args.optimizer_models:
            updates = self.select(kind="optimizer_update", model=model)
            reference = next((r for r in updates if r["optimizer"] == "keras.optimizers.Adam"), None)
            for r in updates:
                ratio = f"x{reference['seconds'] / r['seconds']:.2f}" if reference else "-"
                rows.append(f"| {model} ({r['parameters'] / 1e6:.1f} M parameters) | {r['optimizer']} | "
                            f"{r['seconds'] * 1000:.0f} | {ratio} |")
        rows += ["", "| model | training step | seconds/step | tokens/s | x |", "|---|---|---:|---:|---:|"]
        for model in self.d.args.optimizer_models:
            # Records of runs before 2026-12-03 name the kernel, not the optimizer.
            steps = {r.get("optimizer") or f"bert4k AdamW, {r['kernel']}": r
                     for r in self.select(kind="optimizer_step", model=model)}
            reference = steps.get("keras.optimizers.AdamW")
            for name, r in steps.items():
                ratio = f"x{r['tokens_per_s'] / reference['tokens_per_s']:.2f}" if reference else "-"
                rows.append(f"| {model} | {r['batch']}x{r['length']}, {name} | "
                            f"{r['seconds']:.3f} | {fmt(r['tokens_per_s'])} | {ratio} |")
        return "\n".join(rows)

    def head_to_head_table(self):
        rows = ["### Head to head: bert4k and keras-hub in one process, calls interleaved", "",
                "tokens/s (x: against the faster keras-hub mode at that shape). The same Keras "
                "and TensorFlow (keras-hub's environment); load from other processes falls on "
                "both alike. Inference in one process, fine-tuning steps in another.", ""]
        for model in self.d.args.models:
            columns = [(kind, shape) for kind in ("headtohead", "headtohead-training")
                       for shape in self.shapes(kind, model)]
            if not columns:
                continue
            titles = [("train " if kind == "headtohead-training" else "") + f"{b}x{n}"
                      for kind, (b, n) in columns]
            rows += [f"{MODEL_TITLES[model]}:", "", "| variant | " + " | ".join(titles) + " |",
                     "|---" * (len(columns) + 1) + "|"]
            for variant in HEAD_TO_HEAD:
                cells = []
                for kind, (b, n) in columns:
                    r = self.one(kind=kind, model=model, variant=variant, batch=b, length=n)
                    hub = self.best("keras-hub-", model, kind, (b, n))
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
                "| tokenizer | corpus | strings | passes | strings/s | characters/s | vs bert4keras "
                "| ids differing from transformers Python |", "|---|---|---:|---:|---:|---:|---:|---:|"]
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
                rows.append(f"| {r['tokenizer']} | {corpus} | {r['strings']} | {r.get('passes', '-')} "
                            f"| {fmt(r['strings_per_s'])} "
                            f"| {fmt(r['chars_per_s'])} | {speedup} | {differing} |")
            baseline = self.one(kind="tokenizer-headtohead", tokenizer="bert4keras", corpus=corpus)
            for r in self.select(kind="tokenizer-headtohead", corpus=corpus):
                speedup = f"x{r['strings_per_s'] / baseline['strings_per_s']:.2f}" if baseline else "-"
                rows.append(f"| {r['tokenizer']}, head to head | {corpus} | {r['strings']} "
                            f"| {r['passes']} | {fmt(r['strings_per_s'])} | {fmt(r['chars_per_s'])} "
                            f"| {speedup} | - |")
        if self.select(kind="tokenizer-headtohead"):
            rows += ["", "'head to head': bert4k's and bert4keras's passes interleaved in one process."]
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
            for kind, what in (("headtohead", "inference"), ("headtohead-training", "training")):
                for shape in self.shapes(kind, model):
                    mine = self.best("bert4k-", model, kind, shape)
                    theirs = self.best("keras-hub-", model, kind, shape)
                    if mine and theirs:
                        ratio = mine["tokens_per_s"] / theirs["tokens_per_s"]
                        row(f"{model} {what} {shape[0]}x{shape[1]}: bert4k >= keras-hub, head to head",
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
            for backend in ("bert4k-tf-graph", "bert4k-tf-xla", "bert4k-jax", "bert4k-torch"):
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
                    fused = self.one(kind="inference", model=model, variant=backend + "-fused",
                                     batch=r["batch"], length=r["length"])
                    if fused:
                        row(f"{model} {backend} {r['batch']}x{r['length']}: Keras's fused attention "
                            "op vs bert4k's default (batched matmuls)",
                            f"x{fused['tokens_per_s'] / r['tokens_per_s']:.2f} (above 1: Keras's op "
                            "faster)", None)
        for corpus in ("sentiment", "english"):
            mine = self.one(kind="tokenizer", tokenizer="bert4k", corpus=corpus)
            old = self.one(kind="tokenizer", tokenizer="bert4keras", corpus=corpus)
            hf = self.one(kind="tokenizer", tokenizer="transformers-python", corpus=corpus)
            if mine and old:
                ratio = mine["strings_per_s"] / old["strings_per_s"]
                row(f"tokenizer >= 3x bert4keras ({corpus})", f"x{ratio:.2f}", ratio >= 3)
            pair = [self.one(kind="tokenizer-headtohead", tokenizer=name, corpus=corpus)
                    for name in ("bert4k", "bert4keras")]
            if all(pair):
                ratio = pair[0]["strings_per_s"] / pair[1]["strings_per_s"]
                row(f"tokenizer >= 3x bert4keras ({corpus}), head to head", f"x{ratio:.2f}", ratio >= 3)
            if mine and hf:
                ratio = mine["strings_per_s"] / hf["strings_per_s"]
                same = json.loads(Path(mine["ids_file"]).read_text()) == json.loads(Path(hf["ids_file"]).read_text())
                row(f"tokenizer faster than transformers Python, same ids ({corpus})",
                    f"x{ratio:.2f}; ids {'identical' if same else 'DIFFER'}", ratio > 1 and same)
        return "\n".join(rows)



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
