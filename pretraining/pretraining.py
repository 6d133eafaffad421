"""Pretraining a BERT from prepared shards (see data_utils): `pretrain(config, data_dir, output_dir,
steps, batch_size, ...)`, also `bert4k pretrain`.

A custom training loop under tf.distribute (default / Mirrored / MultiWorkerMirrored / TPU)
rather than `model.fit`, because it gives what fit does not:
* exact resume: a tf.train.Checkpoint holds the weights, the dropout seed states, the optimizer
  and the step; the data position is a function of the step (data_utils.load_dataset), so a run
  restarted from a checkpoint reproduces the losses of an uninterrupted one;
* losses that are the same for any number of replicas: each term is a global mean (its sum over
  replicas divided by the global count, e.g. of masked tokens), and clipping uses the norm of the
  all-reduced gradient (Keras clips each replica's partial gradient before the all-reduce);
* checkpoints on SIGINT/SIGTERM at a step boundary that every worker agrees on.

On the JAX backend, `JaxTrainer` runs the same objectives, optimizer, data order, logs and
export with keras.distribution (DataParallel over several devices) in place of tf.distribute, and
resumes as exactly from its own .npz checkpoints. TensorFlow stays needed on both for the tf.data
reader of the shards and the Google checkpoint export; PyTorch is not supported here.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import time

import keras
import numpy as np
from keras import ops

from bert4k import configs, optimizers
from bert4k.checkpoints import save_weights_as_checkpoint, save_weights_as_safetensors
from bert4k.models import build_transformer_model
from pretraining import data_utils

# Google's small BERTs (arXiv:1908.08962) and BERT-base: (layers, hidden size, heads).
MODEL_SIZES = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
}
GOOGLE_DEFAULTS = dict(hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                       max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02)
CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"


# ---------------------------------------------------------------------------------------------------
# Model configuration
# ---------------------------------------------------------------------------------------------------


def base_config(config):
    """Google bert_config keys from a size name ('tiny' ... 'base'), a bert_config.json path or
    a dict, with Google's defaults for what it leaves out."""
    if isinstance(config, str) and config in MODEL_SIZES:
        layers, hidden, heads = MODEL_SIZES[config]
        config = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                      intermediate_size=4 * hidden)
    elif isinstance(config, (str, os.PathLike)):
        if not os.path.isfile(config):
            raise ValueError(f"config {config!r} is neither a size {sorted(MODEL_SIZES)} nor a file.")
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    elif not isinstance(config, dict):
        raise TypeError(f"config must be a size name {sorted(MODEL_SIZES)}, a bert_config.json "
                        f"path or a dict, got {config!r}.")
    # A Hugging Face config.json (continuing a released model) brings metadata we do not write.
    config = {key: value for key, value in config.items() if key not in configs.METADATA_KEYS
              and (key, value) != ("position_embedding_type", "absolute")}
    return {**GOOGLE_DEFAULTS, **config}


def model_config(config, vocab_size, max_seq_length):
    """base_config checked against the data: vocab_size comes from the data when not given."""
    config = base_config(config)
    config.setdefault("vocab_size", vocab_size)
    if config["vocab_size"] != vocab_size:
        raise ValueError(f"the model's vocab_size={config['vocab_size']} differs from the data's "
                         f"vocabulary ({vocab_size} tokens): prepare the data with the model's vocab.txt.")
    if config["max_position_embeddings"] < max_seq_length:
        raise ValueError(f"max_position_embeddings={config['max_position_embeddings']} is shorter "
                         f"than the data's max_seq_length={max_seq_length}.")
    return config


# The transformers class that holds each objective's heads (UniLM's attention mask has none).
HF_ARCHITECTURES = {"mlm": "BertForMaskedLM", "mlm_nsp": "BertForPreTraining",
                    "gpt": "BertLMHeadModel", "unilm": "BertForMaskedLM"}


def huggingface_config(config, pad_id, objective):
    """config.json for transformers (BertForMaskedLM / BertForPreTraining / BertLMHeadModel)."""
    hf = {key: config[key] for key in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
        "max_position_embeddings", "type_vocab_size", "initializer_range")}
    extra = {"is_decoder": True} if objective == "gpt" else {}
    return dict(architectures=[HF_ARCHITECTURES[objective]], model_type="bert",
                layer_norm_eps=1e-12, pad_token_id=pad_id, **extra, **hf)


# ---------------------------------------------------------------------------------------------------
# Objectives: which heads the model has, what the training model outputs, the loss terms
# ---------------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="bert4k_pretraining")
class GatherPositions(keras.layers.Layer):
    """[sequence (B, T, H), positions (B, P)] -> (B, P, H): the hidden states at the masked
    positions, so the MLM head and its softmax run on P positions instead of T."""

    def call(self, inputs):
        sequence, positions = inputs
        index = ops.expand_dims(ops.cast(positions, "int32"), -1)
        index = ops.repeat(index, ops.shape(sequence)[-1], axis=-1)
        return ops.take_along_axis(sequence, index, axis=1)

    def compute_output_shape(self, input_shape):
        sequence, positions = input_shape
        return (sequence[0], positions[1], sequence[2])


def mlm_logits(model, hidden):
    """The model's own MLM head (same layer objects, so the same weights) on `hidden`."""
    x = model.get_layer("MLM-Dense")(hidden)
    x = model.get_layer("MLM-Norm")(x)
    x = model.get_layer("Embedding-Token")(x, mode="dense")
    return model.get_layer("MLM-Bias")(x)


def sequence_output(model):
    layers = [layer.name for layer in model.layers if layer.name.endswith("-FeedForward-Norm")]
    return model.get_layer(layers[-1]).output


def token_term(labels, logits, weights):
    """(sum of weighted cross-entropy, sum of weights, sum of weighted hits) in float32.
    keras.ops only, so the TensorFlow and the JAX training loops share the objectives."""
    logits = ops.cast(logits, "float32")
    weights = ops.cast(weights, "float32")
    labels = ops.cast(labels, "int32")
    # Not sparse_categorical_crossentropy and argmax: on TensorFlow their kernels (Keras's argmax
    # first rewrites every -0.0 logit, through a bit-cast) cost 5-10% of a small model's step.
    label_logits = ops.take_along_axis(logits, ops.expand_dims(labels, -1), axis=-1)[..., 0]
    losses = ops.logsumexp(logits, axis=-1) - label_logits
    hits = ops.cast(ops.greater_equal(label_logits, ops.max(logits, axis=-1)), "float32")
    return ops.sum(losses * weights), ops.sum(weights), ops.sum(hits * weights)


class Objective:
    """What an objective needs from the model. Every model has the MLM head (the LM head of GPT
    and UniLM too, as in bert4keras) and the pooler, so any checkpoint loads with with_mlm=True
    or with_pool=True (the pooler is trained only by NSP)."""

    application = "encoder"
    heads = dict(with_pool=True, with_mlm=True)


class MaskedLM(Objective):
    """RoBERTa-style masked LM: the loss only at the masked positions."""

    def training_model(self, model):
        positions = keras.Input((None,), dtype="int32", name="Input-Masked-Positions")
        gathered = GatherPositions(name="MLM-Gather")([sequence_output(model), positions])
        return keras.Model(model.inputs + [positions], self.outputs(model, gathered))

    def outputs(self, model, gathered):
        return [mlm_logits(model, gathered)]

    def model_inputs(self, batch):
        return [batch["input_ids"], batch["segment_ids"], batch["masked_lm_positions"]]

    def terms(self, batch, outputs):
        return {"mlm": token_term(batch["masked_lm_ids"], outputs[0], batch["masked_lm_weights"])}


class MaskedLMWithNSP(MaskedLM):
    """Google BERT: masked LM plus next-sentence prediction on the pooled [CLS]."""

    heads = dict(with_pool=True, with_nsp=True, with_mlm=True)

    def outputs(self, model, gathered):
        return [mlm_logits(model, gathered), model.get_layer("NSP-Proba").output]

    def terms(self, batch, outputs):
        labels = ops.cast(batch["next_sentence_labels"], "int32")  # [batch, 1]
        probabilities = ops.cast(outputs[1], "float32")
        chosen = ops.take_along_axis(probabilities, labels, axis=1)[:, 0]
        losses = -ops.log(ops.maximum(chosen, 1e-7))  # NSP-Proba ends in a softmax
        hits = ops.cast(ops.equal(ops.cast(ops.argmax(probabilities, -1), "int32"), labels[:, 0]),
                        "float32")
        nsp = (ops.sum(losses), ops.sum(ops.ones_like(losses)), ops.sum(hits))
        return {**super().terms(batch, outputs), "nsp": nsp}


class CausalLM(Objective):
    """GPT: every position predicts the next token (causal attention)."""

    application = "lm"

    def training_model(self, model):
        return keras.Model(model.inputs, [mlm_logits(model, sequence_output(model))])

    def model_inputs(self, batch):
        return [batch["input_ids"], batch["segment_ids"]]

    def target_weights(self, batch):
        """Which next tokens are predicted: all but padding."""
        return ops.not_equal(batch["input_ids"][:, 1:], 0)

    def terms(self, batch, outputs):
        return {"lm": token_term(batch["input_ids"][:, 1:], outputs[0][:, :-1], self.target_weights(batch))}


class Seq2SeqLM(CausalLM):
    """UniLM: [CLS] A [SEP] B [SEP]; A attends both ways, B causally, only B is predicted."""

    application = "unilm"

    def target_weights(self, batch):
        return ops.logical_and(ops.equal(batch["segment_ids"][:, 1:], 1), super().target_weights(batch))


OBJECTIVES = {"mlm": MaskedLM, "mlm_nsp": MaskedLMWithNSP, "gpt": CausalLM, "unilm": Seq2SeqLM}


def build_models(config, objective, init_checkpoint=None, ignore_invalid_weights=False):
    """(builder, training model) from a Google bert_config dict: the builder's Keras model has
    every head, for saving; the training model shares its layers and outputs what the
    objective's loss reads."""
    transformer = build_transformer_model(
        None, init_checkpoint, application=objective.application, return_keras_model=False,
        ignore_invalid_weights=ignore_invalid_weights, **objective.heads,
        **configs.config_to_arguments(config, "bert"))
    return transformer, objective.training_model(transformer.model)


# ---------------------------------------------------------------------------------------------------
# Optimizer and distribution
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingSettings:
    steps: int
    batch_size: int  # global: summed over replicas and workers
    learning_rate: float = 1e-4
    warmup_steps: int = None  # default 10% of steps
    weight_decay: float = 0.01
    exclude_from_weight_decay: tuple = ("Norm", "bias")
    grad_accum_steps: int = 1
    lamb: bool = False
    clip_norm: float = 1.0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    shuffle_buffer: int = 10_000
    length_multiple_of: int = 32  # batches cut to their longest sequence, see load_dataset; 0: not
    group_by_length: int = 16  # batches whose sequences are sorted together, see load_dataset; 0: not

    def __post_init__(self):
        if self.warmup_steps is None:
            self.warmup_steps = self.steps // 10
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}.")


def optimizer_class(weight_decay, lamb, grad_accum_steps):
    """Adam, plus bert4k.optimizers' decoupled weight decay, LAMB trust ratio and gradient
    accumulation as asked (each class is derived once: it is registered by name)."""
    key = (bool(weight_decay), bool(lamb), grad_accum_steps > 1)
    if key not in _OPTIMIZER_CLASSES:
        cls = optimizers.Adam
        if key[0]:
            cls = optimizers.extend_with_weight_decay(cls, name="PretrainingAdamW")
        if key[1]:
            cls = optimizers.extend_with_layer_adaptation(cls, name=cls.__name__ + "Lamb")
        if key[2]:
            cls = optimizers.extend_with_gradient_accumulation(cls, name=cls.__name__ + "Accumulated")
        _OPTIMIZER_CLASSES[key] = cls
    return _OPTIMIZER_CLASSES[key]


_OPTIMIZER_CLASSES = {}


def make_optimizer(settings):
    schedule = optimizers.WarmupLinearDecay(settings.learning_rate, settings.warmup_steps, settings.steps)
    kwargs = dict(learning_rate=schedule)
    if settings.weight_decay:
        kwargs.update(weight_decay_rate=settings.weight_decay,
                      exclude_from_weight_decay=list(settings.exclude_from_weight_decay))
    if settings.lamb:
        kwargs["exclude_from_layer_adaptation"] = list(settings.exclude_from_weight_decay)
    if settings.grad_accum_steps > 1:
        kwargs["grad_accum_steps"] = settings.grad_accum_steps
    return optimizer_class(settings.weight_decay, settings.lamb, settings.grad_accum_steps)(**kwargs)


def make_strategy(strategy=None, tpu=None):
    """None: the default (one device); 'mirrored': all local devices; 'multiworker': the cluster
    in TF_CONFIG; 'tpu': the TPU at `tpu`; or a tf.distribute.Strategy."""
    import tensorflow as tf

    if tpu is not None and strategy in (None, "tpu"):
        strategy = "tpu"
    if strategy is None or isinstance(strategy, tf.distribute.Strategy):
        return strategy or tf.distribute.get_strategy()
    if strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if strategy == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy='multiworker' reads the cluster from TF_CONFIG, which is not set.")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if strategy == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"strategy must be None, 'mirrored', 'multiworker' or 'tpu', got {strategy!r}.")


def worker_identity(strategy):
    """(is_chief, task id) of this process: the chief writes checkpoints, logs and the model."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", None) or 0
    if task_type in (None, "chief"):
        return True, task_id
    has_chief = "chief" in (resolver.cluster_spec().as_dict() if resolver else {})
    return (task_type == "worker" and task_id == 0 and not has_chief), task_id


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag read between steps, so the run checkpoints and exits
    cleanly instead of dying mid-step."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        except ValueError:  # not the main thread: signals stay as they are
            pass
        return self

    def handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _TrainerBase:
    """What the TensorFlow and the JAX loops share: the model config and its checks, the output
    files, the export and the run loop (steps, logs, checkpoints, SIGINT/SIGTERM). Subclasses
    give the distribution, the data stream, the update step and the checkpoint format."""

    def _setup(self, config, data_dir, output_dir, settings, replicas, scope, init_checkpoint,
               ignore_invalid_weights, verbose):
        self.data_dir, self.output_dir, self.settings = data_dir, output_dir, settings
        self.verbose = verbose if self.is_chief else 0
        self.info = data_utils.read_info(data_dir)
        if self.info["pad_id"] != 0:
            raise ValueError(f"[PAD] must have id 0 (the model masks id 0), it has {self.info['pad_id']}.")
        self.objective = OBJECTIVES[self.info["settings"].objective]()
        self.config = model_config(config, self.info["vocab_size"], self.info["settings"].max_seq_length)
        if settings.batch_size % replicas:
            raise ValueError(f"batch_size={settings.batch_size} is not a multiple of the "
                             f"{replicas} replicas.")
        os.makedirs(output_dir, exist_ok=True)
        self.write_config()
        keras.utils.set_random_seed(settings.seed)
        with scope:
            self.transformer, self.train_model = build_models(
                self.config, self.objective, init_checkpoint, ignore_invalid_weights)
            self.optimizer = make_optimizer(settings)
            self.optimizer.build(self.train_model.trainable_variables)

    # -- files --------------------------------------------------------------------------------

    def write_config(self):
        """bert_config.json in the output directory (the chief's job); a run to resume must
        have been started with the same model."""
        path = os.path.join(self.output_dir, "bert_config.json")
        if os.path.isdir(os.path.join(self.output_dir, CHECKPOINT_DIR)) and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
            if previous != self.config:
                changed = sorted(k for k in set(previous) | set(self.config)
                                 if previous.get(k) != self.config.get(k))
                raise ValueError(f"{self.output_dir!r} holds checkpoints of another model "
                                 f"(differing in {changed}); resume with the same config or use a "
                                 "new output directory.")
        if self.is_chief:
            data_utils.write_json_atomic(os.path.join(self.output_dir, "bert_config.json"), self.config)

    def export(self):
        """bert_config.json + config.json + vocab.txt + bert_model.ckpt (Google) + model.safetensors."""
        if not self.is_chief:
            return
        out = self.output_dir
        data_utils.write_json_atomic(os.path.join(out, "config.json"),
                                     huggingface_config(self.config, self.info["pad_id"],
                                                        self.info["settings"].objective))
        shutil.copyfile(os.path.join(self.data_dir, self.info["vocab_file"]), os.path.join(out, "vocab.txt"))
        save_weights_as_checkpoint(self.transformer, os.path.join(out, "bert_model.ckpt"))
        save_weights_as_safetensors(self.transformer, os.path.join(out, "model.safetensors"))

    # -- the loop -----------------------------------------------------------------------------

    def run(self):
        """Train to settings.steps from the last checkpoint; export the model at the end.
        Returns a dict: step, interrupted, history (the logged records of this run)."""
        step = self.restore()
        iterator = iter(self.dataset(self.micro_step_count() * self.settings.batch_size))
        logger = TrainingLogger(self, step)
        interrupted = False
        with StopRequest() as stop:
            while step < self.settings.steps:
                learning_rate = float(self.optimizer.learning_rate)
                totals, interrupted = self.run_update(iterator, stop.requested)
                step += 1
                logger.update(step, totals, learning_rate)
                if interrupted or step % self.settings.checkpoint_every == 0 or step == self.settings.steps:
                    self.save_checkpoint()
                if interrupted:
                    break
        logger.close()
        if not interrupted:
            self.export()
        return dict(step=step, interrupted=interrupted, history=logger.history,
                    output_dir=self.output_dir)


def _require_backend(name, trainer):
    if keras.backend.backend() != name:
        raise RuntimeError(
            f"{trainer} runs on the {name} backend, and Keras runs on {keras.backend.backend()!r}: "
            "pretrain() picks the trainer of the backend (TensorFlow or JAX; set KERAS_BACKEND).")


class Trainer(_TrainerBase):
    """One pretraining run on TensorFlow: model, optimizer, checkpoint and data under one
    tf.distribute strategy."""

    def __init__(self, config, data_dir, output_dir, settings, strategy=None, tpu=None,
                 init_checkpoint=None, ignore_invalid_weights=False, verbose=1):
        import tensorflow as tf

        _require_backend("tensorflow", "Trainer")
        self.strategy = make_strategy(strategy, tpu)  # first: MultiWorker must precede other ops
        self.is_chief, self.task_id = worker_identity(self.strategy)
        self._setup(config, data_dir, output_dir, settings, self.strategy.num_replicas_in_sync,
                    self.strategy.scope(), init_checkpoint, ignore_invalid_weights, verbose)
        self.micro_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="micro_steps")
        self.checkpoint = tf.train.Checkpoint(
            micro_steps=self.micro_steps, model=list(self.transformer.model.variables),
            optimizer=list(self.optimizer.variables))
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self.checkpoint_write_dir(), max_to_keep=settings.keep_checkpoints)
        self.train_step = self.make_train_step()

    def checkpoint_write_dir(self):
        """The chief's checkpoints are the real ones; the other workers must save too (saving
        may run collectives) but into a private directory, deleted after each save."""
        if self.is_chief:
            return os.path.join(self.output_dir, CHECKPOINT_DIR)
        return os.path.join(self.output_dir, f".worker-{self.task_id}")

    def micro_step_count(self):
        return int(self.micro_steps.numpy())

    @property
    def on_tpu(self):
        import tensorflow as tf

        tpu_strategies = (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy)
        return isinstance(self.strategy, tpu_strategies)

    @property
    def length_multiple_of(self):
        # A TPU compiles one program for one shape: every batch keeps max_seq_length there, and
        # grouping by length would buy nothing.
        return None if self.on_tpu else self.settings.length_multiple_of

    @property
    def group_by_length(self):
        return 0 if self.on_tpu else self.settings.group_by_length

    def restore(self):
        """Resume from the chief's last complete checkpoint; returns the update step."""
        import tensorflow as tf

        directory = os.path.join(self.output_dir, CHECKPOINT_DIR)
        if self.is_chief and os.path.isdir(directory):
            for name in os.listdir(directory):  # a save killed midway leaves its *_temp folder
                if name.endswith("_temp"):
                    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        latest = tf.train.latest_checkpoint(directory)
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        return self.micro_step_count() // self.settings.grad_accum_steps

    def save_checkpoint(self):
        self.manager.save(checkpoint_number=self.micro_step_count() // self.settings.grad_accum_steps)
        if not self.is_chief:
            shutil.rmtree(self.checkpoint_write_dir(), ignore_errors=True)

    # -- steps --------------------------------------------------------------------------------

    def dataset(self, start_example):
        def per_worker(context):
            return data_utils.load_dataset(
                self.data_dir, context.get_per_replica_batch_size(self.settings.batch_size),
                seed=self.settings.seed, start_example=start_example,
                num_shards=context.num_input_pipelines, shard_index=context.input_pipeline_id,
                shuffle_buffer=self.settings.shuffle_buffer, length_multiple_of=self.length_multiple_of,
                group_by_length=self.group_by_length)

        return self.strategy.distribute_datasets_from_function(per_worker)

    def make_train_step(self):
        import tensorflow as tf

        strategy, variables = self.strategy, self.train_model.trainable_variables

        def replica_step(batch, stop):
            context = tf.distribute.get_replica_context()
            with tf.GradientTape() as tape:
                outputs = self.train_model(self.objective.model_inputs(batch), training=True)
                outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
                terms = self.objective.terms(batch, outputs)
                counts = context.all_reduce("SUM", [count for _, count, _ in terms.values()])
                loss = tf.add_n([total / tf.maximum(count, 1.0)
                                 for (total, _, _), count in zip(terms.values(), counts)])
            gradients = tape.gradient(loss, variables)
            gradients, norm = clip_by_global_norm(gradients, self.settings.clip_norm)
            self.optimizer.apply_gradients(zip(gradients, variables))
            statistics = {"tokens": tf.reduce_sum(tf.cast(batch["input_ids"] != 0, tf.float32)),
                          "stop": stop / context.num_replicas_in_sync,
                          "grad_norm": norm / context.num_replicas_in_sync}
            for name, (total, count, hits) in terms.items():
                statistics.update({f"{name}_sum": total, f"{name}_count": count, f"{name}_hits": hits})
            return statistics

        # No autograph: nothing here branches on tensors, and converting the code costs seconds.
        @tf.function(autograph=False)
        def train_step(iterator, stop):
            step = tf.autograph.experimental.do_not_convert(replica_step)
            statistics = strategy.run(step, args=(next(iterator), stop))
            return {name: strategy.reduce("SUM", value, axis=None) for name, value in statistics.items()}

        return train_step

    def run_update(self, iterator, stop_requested):
        """One optimizer update (grad_accum_steps micro-batches); returns the summed statistics
        and whether any worker asked to stop (all-reduced, so every worker stops together)."""
        import tensorflow as tf

        totals = {}
        for _ in range(self.settings.grad_accum_steps):
            stop = tf.constant(1.0 if stop_requested else 0.0)
            statistics = self.train_step(iterator, stop)
            self.micro_steps.assign_add(1)
            for name, value in statistics.items():
                totals[name] = totals.get(name, 0.0) + float(value)
        totals["grad_norm"] /= self.settings.grad_accum_steps
        return totals, totals.pop("stop") > 0


def make_distribution(distribution=None):
    """None: one device; 'data_parallel': keras.distribution.DataParallel over every local
    device; or a keras.distribution object (DataParallel, ModelParallel)."""
    # Keras exports no Distribution base class to test against: anything with a data layout and
    # a scope is one.
    if distribution is None or hasattr(distribution, "get_data_layout"):
        return distribution
    if distribution == "data_parallel":
        return keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    raise ValueError("distribution must be None, 'data_parallel' or a keras.distribution "
                     f"object (DataParallel, ModelParallel), got {distribution!r}.")


def batch_replicas(distribution):
    """Into how many parts the distribution splits the batch dimension."""
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    return int(mesh.shape[list(mesh.axis_names).index(distribution.batch_dim_name)])


class JaxTrainer(_TrainerBase):
    """One pretraining run on JAX: the objectives, optimizer, data order, logs and export of
    `Trainer`, with keras.distribution in place of tf.distribute.

    `distribution`: None (the default device), 'data_parallel' (keras.distribution.DataParallel
    on every local device: weights replicated, each device takes a slice of the batch) or
    another keras.distribution object. The update is one jitted function of the training model's
    stateless call. The batch is one global (sharded) array, so every loss term is already the
    global mean and the clipping norm that of the whole gradient: the same arithmetic as
    `Trainer` with any number of replicas, XLA inserting the all-reduces. One process: multi-host
    JAX (jax.distributed) is not set up here.

    Checkpoints are `checkpoints/ckpt-{step}.npz`: the micro-step and every variable of the
    model (dropout seed states included) and of the optimizer, so resuming is exact. TensorFlow
    is still needed for the tf.data reader of the shards and for the Google checkpoint export.
    """

    def __init__(self, config, data_dir, output_dir, settings, distribution=None,
                 init_checkpoint=None, ignore_invalid_weights=False, verbose=1):
        _require_backend("jax", "JaxTrainer")
        _hide_accelerators_from_tensorflow()
        self.distribution = make_distribution(distribution)
        self.is_chief, self.task_id = True, 0
        scope = self.distribution.scope() if self.distribution else contextlib.nullcontext()
        self._setup(config, data_dir, output_dir, settings, batch_replicas(self.distribution),
                    scope, init_checkpoint, ignore_invalid_weights, verbose)
        self.micro_steps = 0
        self.train_step = self.make_train_step()

    def checkpoint_variables(self):
        return list(self.transformer.model.variables) + list(self.optimizer.variables)

    @staticmethod
    def stable_path(variable):
        """The variable's path without Keras's uniquifying suffixes ('seed_generator_3',
        'pretraining_adam_w_1'), which count the objects made so far in the process."""
        return re.sub(r"_\d+(?=/|$)", "", variable.path)

    def micro_step_count(self):
        return self.micro_steps

    def checkpoint_files(self):
        """{update step: path} of the complete checkpoints (a save writes a temporary file
        first and renames it, so a killed save leaves none half-written under these names)."""
        directory = os.path.join(self.output_dir, CHECKPOINT_DIR)
        found = {}
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                match = re.fullmatch(r"ckpt-(\d+)\.npz", name)
                if match:
                    found[int(match.group(1))] = os.path.join(directory, name)
        return found

    def restore(self):
        """Resume from the last checkpoint; returns the update step."""
        files = self.checkpoint_files()
        if files:
            variables = self.checkpoint_variables()
            # By position: the same config and settings build the same variables in the same
            # order. The paths and shapes are checked, so a changed setting fails loudly.
            with np.load(files[max(files)]) as stored:
                paths = [str(p) for p in stored["paths"]]
                values = [stored[f"v{index}"] for index in range(len(paths))]
                micro_steps = int(stored["micro_steps"])
            differing = [f"{path} {value.shape} vs {self.stable_path(v)} {tuple(v.shape)}"
                         for path, value, v in zip(paths, values, variables)
                         if path != self.stable_path(v) or value.shape != tuple(v.shape)]
            if differing or len(paths) != len(variables):
                raise ValueError(
                    f"{files[max(files)]!r} holds other variables than this model and optimizer "
                    f"(changed optimizer settings?): {len(paths)} stored, {len(variables)} "
                    f"here; first differences: {differing[:3]}")
            for variable, value in zip(variables, values):
                variable.assign(value)
            self.micro_steps = micro_steps
        return self.micro_steps // self.settings.grad_accum_steps

    def save_checkpoint(self):
        step = self.micro_steps // self.settings.grad_accum_steps
        directory = os.path.join(self.output_dir, CHECKPOINT_DIR)
        os.makedirs(directory, exist_ok=True)
        variables = self.checkpoint_variables()
        arrays = {f"v{i}": ops.convert_to_numpy(v.value) for i, v in enumerate(variables)}
        temporary = os.path.join(directory, f".ckpt-{step}.npz.tmp")
        with open(temporary, "wb") as f:
            np.savez(f, micro_steps=self.micro_steps,
                     paths=np.array([self.stable_path(v) for v in variables]), **arrays)
        os.replace(temporary, os.path.join(directory, f"ckpt-{step}.npz"))
        files = self.checkpoint_files()
        for old in sorted(files)[:-self.settings.keep_checkpoints]:
            os.remove(files[old])

    # -- steps --------------------------------------------------------------------------------

    def dataset(self, start_example):
        """The global batches, as arrays laid out by the distribution (batch split over the
        devices), from the same tf.data stream as `Trainer`'s one-pipeline case."""
        dataset = data_utils.load_dataset(
            self.data_dir, self.settings.batch_size, seed=self.settings.seed,
            start_example=start_example, shuffle_buffer=self.settings.shuffle_buffer,
            length_multiple_of=self.settings.length_multiple_of,
            group_by_length=self.settings.group_by_length)
        for batch in dataset.as_numpy_iterator():
            if self.distribution is not None:
                batch = {name: keras.distribution.distribute_tensor(
                    value, self.distribution.get_data_layout(value.shape))
                    for name, value in batch.items()}
            yield batch

    def make_train_step(self):
        import jax

        model, optimizer, objective = self.train_model, self.optimizer, self.objective
        clip_norm = self.settings.clip_norm

        def loss_and_terms(trainable, non_trainable, batch):
            outputs, non_trainable = model.stateless_call(
                trainable, non_trainable, objective.model_inputs(batch), training=True)
            outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
            terms = objective.terms(batch, outputs)
            loss = sum(total / ops.maximum(count, 1.0) for total, count, _ in terms.values())
            return loss, (non_trainable, terms)

        gradient_of = jax.value_and_grad(loss_and_terms, has_aux=True)

        def train_step(trainable, non_trainable, optimizer_state, batch):
            (_, (non_trainable, terms)), gradients = gradient_of(trainable, non_trainable, batch)
            norm = ops.sqrt(sum(ops.sum(ops.square(g)) for g in gradients))
            if clip_norm:
                scale = clip_norm / ops.maximum(norm, clip_norm)
                gradients = [g * scale for g in gradients]
            trainable, optimizer_state = optimizer.stateless_apply(
                optimizer_state, gradients, trainable)
            tokens = ops.sum(ops.cast(ops.not_equal(batch["input_ids"], 0), "float32"))
            statistics = {"tokens": tokens, "grad_norm": norm}
            for name, (total, count, hits) in terms.items():
                statistics.update({f"{name}_sum": total, f"{name}_count": count,
                                   f"{name}_hits": hits})
            return trainable, non_trainable, optimizer_state, statistics

        # The old state is not needed after a step: donating it lets XLA update in place.
        return jax.jit(train_step, donate_argnums=(0, 1, 2))

    def run_update(self, iterator, stop_requested):
        """One optimizer update (grad_accum_steps micro-batches); returns the summed statistics
        and the stop request (one process: nobody else to agree with)."""
        groups = (self.train_model.trainable_variables, self.train_model.non_trainable_variables,
                  self.optimizer.variables)
        totals = {}
        for _ in range(self.settings.grad_accum_steps):
            *state, statistics = self.train_step(*[[v.value for v in group] for group in groups],
                                                 next(iterator))
            # Back into the Keras variables at once (a reference swap, no copy): the next step,
            # the learning-rate schedule, checkpoints and the export all read them.
            for group, values in zip(groups, state):
                for variable, value in zip(group, values):
                    variable.assign(value)
            self.micro_steps += 1
            for name, value in statistics.items():
                totals[name] = totals.get(name, 0.0) + float(value)
        totals["grad_norm"] /= self.settings.grad_accum_steps
        return totals, stop_requested


def _hide_accelerators_from_tensorflow():
    """tf.data feeds the JAX loop; without this TensorFlow would also claim every GPU's memory."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow's devices were set up already: too late, and harmless on CPU
        pass


def clip_by_global_norm(gradients, clip_norm):
    """Scale every replica's gradient so that their sum (what the optimizer applies) has a global
    norm of at most clip_norm; returns (gradients, norm of the sum)."""
    import tensorflow as tf

    gradients = [tf.convert_to_tensor(g) for g in gradients]  # embeddings give IndexedSlices
    context = tf.distribute.get_replica_context()
    summed = context.all_reduce("SUM", gradients) if context.num_replicas_in_sync > 1 else gradients
    norm = tf.linalg.global_norm(summed)
    if not clip_norm:
        return gradients, norm
    scale = clip_norm / tf.maximum(norm, clip_norm)
    return [g * scale for g in gradients], norm


def _scalar_metadata():
    """What tf.summary.scalar attaches to a value, built without the tensorboard package (which
    tensorflow-cpu does not install) so that TensorBoard shows our values as scalars."""
    from tensorflow.core.framework import summary_pb2

    plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
    return summary_pb2.SummaryMetadata(plugin_data=plugin, data_class=summary_pb2.DATA_CLASS_SCALAR
                                       ).SerializeToString()


class TrainingLogger:
    """Loss, accuracy, tokens/s and learning rate: a progress bar, TensorBoard scalars and a JSON
    line per logged step (train_log.jsonl, appended across restarts)."""

    SHOWN = ("loss", "mlm_accuracy", "nsp_accuracy", "lm_accuracy", "learning_rate", "tokens_per_sec")

    def __init__(self, trainer, step):
        import tensorflow as tf

        self.tf = tf
        self.scalar_metadata = _scalar_metadata()
        self.every = trainer.settings.log_every
        self.active = trainer.is_chief
        self.history = []
        # Sums over the updates since the last record: a record's loss and accuracy are its
        # window's, not its last batch's (one batch's loss is too noisy to read a trend from).
        self.window, self.window_updates, self.started = {}, 0, time.time()
        self.bar = keras.utils.Progbar(trainer.settings.steps, verbose=trainer.verbose,
                                       stateful_metrics=self.SHOWN) if self.active else None
        if self.active:
            self.bar.update(step)
            self.writer = tf.summary.create_file_writer(os.path.join(trainer.output_dir, "logs"))
            self.log = open(os.path.join(trainer.output_dir, LOG_FILE), "a", encoding="utf-8")

    def update(self, step, totals, learning_rate):
        for name, value in totals.items():
            self.window[name] = self.window.get(name, 0.0) + value
        self.window_updates += 1
        if not self.active or (step % self.every and step != 1):
            return
        elapsed = time.time() - self.started
        window = dict(self.window, grad_norm=self.window["grad_norm"] / self.window_updates)
        record = dict(step=step, **metrics(window), learning_rate=learning_rate,
                      tokens_per_sec=window["tokens"] / max(elapsed, 1e-9))
        self.window, self.window_updates, self.started = {}, 0, time.time()
        self.history.append(record)
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        with self.writer.as_default(step=step):
            for name, value in record.items():
                if name != "step":
                    self.tf.summary.write(name, self.tf.constant(value, self.tf.float32),
                                          metadata=self.scalar_metadata)
        self.bar.update(step, [(k, record[k]) for k in self.SHOWN if k in record])

    def close(self):
        if self.active:
            self.writer.flush()
            self.log.close()


def metrics(totals):
    """loss (the sum of the terms' means), {term}_loss and {term}_accuracy, grad_norm, from the
    summed statistics of one or more updates."""
    record = {}
    for name in sorted({key.rsplit("_", 1)[0] for key in totals if key.endswith("_count")}):
        count = max(totals[f"{name}_count"], 1.0)
        record[f"{name}_loss"] = totals[f"{name}_sum"] / count
        record[f"{name}_accuracy"] = totals[f"{name}_hits"] / count
    record["loss"] = sum(v for k, v in record.items() if k.endswith("_loss"))
    record["grad_norm"] = totals["grad_norm"]
    return record


def pretrain(config, data_dir, output_dir, steps, batch_size, strategy=None, tpu=None,
             distribution=None, init_checkpoint=None, ignore_invalid_weights=False, verbose=1,
             **settings):
    """Pretrain (or continue pretraining) a BERT on a prepared data directory.

    config: a size name ('tiny', 'mini', 'small', 'medium', 'base'), a bert_config.json path, or
    a dict of Google bert_config keys (vocab_size defaults to the data's vocabulary).
    batch_size: the global batch. Further settings (TrainingSettings): learning_rate,
    warmup_steps, weight_decay, exclude_from_weight_decay, grad_accum_steps, lamb, clip_norm,
    checkpoint_every, keep_checkpoints, log_every, seed, shuffle_buffer, length_multiple_of,
    group_by_length.
    init_checkpoint: weights to start from (Google checkpoint prefix, HF directory or
    .safetensors) when output_dir has no checkpoint yet.
    strategy / tpu (TensorFlow backend): see make_strategy. distribution (JAX backend):
    'data_parallel' or a keras.distribution object, see make_distribution.

    Re-running with the same output_dir resumes from its last checkpoint. At the end output_dir
    holds bert_config.json, config.json, vocab.txt, bert_model.ckpt.* and model.safetensors.
    """
    settings = TrainingSettings(steps=steps, batch_size=batch_size, **settings)
    common = dict(init_checkpoint=init_checkpoint, ignore_invalid_weights=ignore_invalid_weights,
                  verbose=verbose)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        if distribution is not None:
            raise ValueError("distribution (keras.distribution) is for the JAX backend; on "
                             "TensorFlow use strategy='mirrored', 'multiworker' or 'tpu'.")
        trainer = Trainer(config, data_dir, output_dir, settings, strategy=strategy, tpu=tpu, **common)
    elif backend == "jax":
        if strategy is not None or tpu is not None:
            raise ValueError("strategy and tpu (tf.distribute) are for the TensorFlow backend; on "
                             "JAX use distribution='data_parallel'.")
        trainer = JaxTrainer(config, data_dir, output_dir, settings, distribution=distribution,
                             **common)
    else:
        raise RuntimeError(f"pretraining runs on the TensorFlow or the JAX backend, not on "
                           f"{backend!r}: set KERAS_BACKEND=tensorflow or jax.")
    return trainer.run()
