"""Optimizers and optimizer factories on the Keras 3 Optimizer.

bert4keras's ``extend_with_*`` functions turn any optimizer class into a derived class with extra
behaviour, and they compose in any order::

    AdamW = extend_with_weight_decay(Adam, name="AdamW")
    AdamWLR = extend_with_piecewise_linear_lr(AdamW, name="AdamWLR")
    optimizer = AdamWLR(learning_rate=1e-3, weight_decay_rate=0.01,
                        exclude_from_weight_decay=["Norm", "bias"],
                        lr_schedule={1000: 1, 2000: 0.1})

bert4keras built them by patching Keras 2's ``K.update``; here they are ordinary subclasses that
override the Keras 3 hooks (``build``, ``update_step``, ``_backend_apply_gradients``,
``_get_current_learning_rate``, ``assign*``), use ``keras.ops`` only, and so run on TensorFlow
(``tf.distribute`` included), JAX and PyTorch. Every derived class is registered under the name it
is given (``package="bert4k"``), keeps its arguments in ``get_config`` and its state in optimizer
variables, so ``.keras`` files and checkpoints restore it. As with bert4keras, a script that loads
a saved model calls the same ``extend_with_*`` first, which registers the class under its name.

What comes from Keras and what is written here:

* Reused: the update math of every Keras optimizer (Adam, Adamax, Lion, Lamb, SGD, ...; on
  TensorFlow, Adam's runs as TensorFlow's fused ``ResourceApplyAdam`` kernel, see ``Adam``),
  gradient clipping, loss scaling, ``LearningRateSchedule``, optimizer-variable creation and
  saving, and the distributed accumulator update ``_backend_increment_gradient_accumulators``.
* Written here, each with the reason next to it: the per-variable update rewrite that
  bert4keras's extensions share (``_ExtensibleOptimizer``), decoupled weight decay matched by regex
  on variable *paths*, the LAMB trust ratio, bert4keras's piecewise-linear multiplier, gradient
  accumulation that also works under ``MirroredStrategy`` and whose counter and schedule count real
  updates, Lookahead, lazy (row-sparse) updates, a zero-initialised EMA with optional bias
  correction, parameter-wise learning rates, Adam without bias correction, bert4keras's AdaFactor
  and Google BERT's warmup-then-linear-decay schedule.
"""

import collections
import re

import keras
import numpy as np
from keras import ops

LearningRateSchedule = keras.optimizers.schedules.LearningRateSchedule
Adamax = keras.optimizers.Adamax
Lion = keras.optimizers.Lion

__all__ = [
    "Adam",
    "Adamax",
    "AdaFactor",
    "Lion",
    "WarmupLinearDecay",
    "piecewise_linear",
    "extend_with_weight_decay",
    "extend_with_layer_adaptation",
    "extend_with_piecewise_linear_lr",
    "extend_with_gradient_accumulation",
    "extend_with_lookahead",
    "extend_with_lazy_optimization",
    "extend_with_exponential_moving_average",
    "extend_with_parameter_wise_lr",
]


# --------------------------------------------------------------------------------------------
# Variable selection and schedules
# --------------------------------------------------------------------------------------------


def _variable_path(variable):
    """The variable's path, e.g. ``Transformer-0-FeedForward-Norm/gamma``: the same string
    bert4keras matched against (Keras 2 variable names carried the layer name)."""
    return getattr(variable, "path", None) or variable.name


def _path_matches(variable, patterns):
    """True when any regular expression in ``patterns`` is found in the variable's path."""
    path = _variable_path(variable)
    return any(re.search(pattern, path) for pattern in patterns or ())


def _flags_by_path(variables, patterns):
    """One bool per variable: whether its path matches any of ``patterns``."""
    return [_path_matches(variable, patterns) for variable in variables]


def piecewise_linear(step, schedule):
    """bert4keras's piecewise-linear function of the step.

    ``schedule`` maps steps to values, e.g. ``{1000: 1, 2000: 0.1}``: from 0 (value 0 unless
    step 0 is given) the value rises linearly to 1 at step 1000, falls linearly to 0.1 at step
    2000 and stays 0.1 afterwards.
    """
    if not schedule:
        raise ValueError("A piecewise linear schedule needs at least one {step: value} entry.")
    points = sorted((int(step_at), float(value)) for step_at, value in schedule.items())
    if points[0][0] != 0:
        points.insert(0, (0, 0.0))
    step = ops.cast(step, "float32")
    result = ops.full_like(step, points[0][1])
    for (start, start_value), (end, end_value) in zip(points, points[1:]):
        slope = (end_value - start_value) / (end - start)
        result = ops.where(step >= start, start_value + slope * (step - start), result)
    return ops.where(step >= points[-1][0], points[-1][1], result)


@keras.saving.register_keras_serializable(package="bert4k")
class WarmupLinearDecay(LearningRateSchedule):
    """Google BERT's learning rate: linear warmup, then linear decay to 0.

    As in BERT's ``optimization.py``: for ``step < warmup_steps`` the rate is
    ``peak_learning_rate * step / warmup_steps``; afterwards it is the polynomial (power 1) decay
    ``peak_learning_rate * (1 - step / total_steps)`` computed from step 0, reaching 0 at
    ``total_steps`` and staying there. Any Keras optimizer accepts it as ``learning_rate``.
    """

    def __init__(self, peak_learning_rate, warmup_steps, total_steps):
        if not 0 <= warmup_steps <= total_steps or total_steps <= 0:
            raise ValueError(
                "WarmupLinearDecay needs 0 <= warmup_steps <= total_steps and total_steps > 0; "
                f"got warmup_steps={warmup_steps}, total_steps={total_steps}."
            )
        self.peak_learning_rate = peak_learning_rate
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step):
        step = ops.cast(step, "float32")
        done = ops.minimum(step, self.total_steps) / self.total_steps
        decayed = self.peak_learning_rate * (1.0 - done)
        warmup = self.peak_learning_rate * step / max(self.warmup_steps, 1)
        return ops.where(step < self.warmup_steps, warmup, decayed)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
        }


# --------------------------------------------------------------------------------------------
# Base optimizers
# --------------------------------------------------------------------------------------------


def _dense_gradient(gradient, variable):
    """A row-sparse gradient (TensorFlow's ``IndexedSlices``, e.g. an embedding's) as a dense
    tensor, rows that share an index summed.

    Keras 3.15 keeps such gradients sparse inside the update math, and its element-wise ops
    (``ops.square``, ...) act on each slice before repeated rows are summed, so Adam's second
    moment of a token that occurs twice in a batch gets ``a**2 + b**2`` instead of ``(a + b)**2``.
    Non-linear updates need the summed rows; every optimizer here densifies first.
    """
    if not all(hasattr(gradient, name) for name in ("indices", "values", "dense_shape")):
        return gradient
    return ops.segment_sum(gradient.values, gradient.indices, num_segments=variable.shape[0])


@keras.saving.register_keras_serializable(package="bert4k")
class Adam(keras.optimizers.Adam):
    """Keras Adam plus bert4keras's ``bias_correction`` flag.

    ``bias_correction=True`` is exactly Keras's Adam. ``bias_correction=False`` is the update of
    Google BERT's AdamWeightDecayOptimizer: ``variable -= lr * m / (sqrt(v) + epsilon)`` with the
    raw moment estimates. Defaults follow bert4keras (``epsilon=1e-6``).

    On TensorFlow the update is one ``ResourceApplyAdam`` kernel per variable (the same formula,
    one multithreaded pass over the variable, its moments and its gradient) where Keras's
    element-wise ops make about a dozen passes: 111 ms against 570 ms for BERT-base's 109 M
    parameters on a 2-core AVX2 CPU (``scripts/benchmark.py --training``; README, Performance).
    It is skipped where the update must go through ``self.assign*`` (an extension that overrides
    them, e.g. gradient accumulation), with ``amsgrad`` and for float16 / bfloat16 variables.
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-6,
                 bias_correction=True, **kwargs):
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                         epsilon=epsilon, **kwargs)
        self.bias_correction = bias_correction

    def update_step(self, gradient, variable, learning_rate):
        gradient = _dense_gradient(gradient, variable)
        if self._takes_fused_kernel(variable):
            return self._fused_update_step(gradient, variable, learning_rate)
        if self.bias_correction:
            return super().update_step(gradient, variable, learning_rate)
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v),
                                        1 - self.beta_2))
        if self.amsgrad:
            v_hat = self._velocity_hats[index]
            self.assign(v_hat, ops.maximum(v_hat, v))
            v = v_hat
        self.assign_sub(variable, learning_rate * m / (ops.sqrt(v) + self.epsilon))

    def _takes_fused_kernel(self, variable):
        plain_assigns = all(getattr(type(self), name) is getattr(keras.optimizers.Adam, name)
                            for name in ("assign", "assign_add", "assign_sub"))
        # Half-precision variables keep Keras's ops: the kernel rounds differently in float16.
        full_precision = keras.backend.standardize_dtype(variable.dtype) in ("float32", "float64")
        return (keras.backend.backend() == "tensorflow" and plain_assigns and full_precision
                and not self.amsgrad)

    def _fused_update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        index = self._get_variable_index(variable)
        dtype = variable.dtype
        beta_1, beta_2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
        if self.bias_correction:
            step = ops.cast(self.iterations + 1, dtype)
            beta_1_power, beta_2_power = ops.power(beta_1, step), ops.power(beta_2, step)
        else:  # the kernel's step size lr * sqrt(1 - 0) / (1 - 0) is then lr itself
            beta_1_power = beta_2_power = ops.zeros((), dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=_tf_handle(variable), m=_tf_handle(self._momentums[index]),
            v=_tf_handle(self._velocities[index]), beta1_power=beta_1_power,
            beta2_power=beta_2_power, lr=ops.cast(learning_rate, dtype), beta1=beta_1,
            beta2=beta_2, epsilon=ops.cast(self.epsilon, dtype), grad=ops.cast(gradient, dtype))

    def get_config(self):
        return {**super().get_config(), "bias_correction": self.bias_correction}


def _tf_handle(variable):
    """The resource handle of a Keras or TensorFlow variable; under tf.distribute, inside
    ``strategy.extended.update``, the handle of the replica being updated."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


def _root_mean_square(x):
    return ops.sqrt(ops.mean(ops.square(x)))


@keras.saving.register_keras_serializable(package="bert4k")
class AdaFactor(keras.optimizers.Optimizer):
    """bert4keras's AdaFactor (https://arxiv.org/abs/1804.04235), with its arguments.

    Written here rather than taken from ``keras.optimizers.Adafactor`` because that one has no
    first moment (``beta1``), cannot turn off or exclude the parameter scaling, factors every
    matrix whatever its size and also keeps a full-size second moment, which gives up the memory
    saving that is the point of AdaFactor. Here the two largest axes of a variable are factored
    when the smaller of them has at least ``min_dim_size_to_factor`` entries; smaller variables
    keep a full second moment.

    ``learning_rate=None`` gives the relative step ``min(1 / sqrt(t), 0.01)`` (times 0.05
    without parameter scaling); ``beta2=None`` gives ``1 - t ** -0.8``.
    """

    def __init__(self, learning_rate=1e-3, beta1=0.0, beta2=None, epsilon1=1e-30,
                 epsilon2=1e-3, multiply_by_parameter_scale=True, clipping_threshold=1.0,
                 min_dim_size_to_factor=128, exclude_from_parameter_scale=None, **kwargs):
        # With a relative step the base class's learning-rate variable is a placeholder that
        # `_get_current_learning_rate` never reads.
        placeholder = 1.0 if learning_rate is None else learning_rate
        super().__init__(learning_rate=placeholder, **kwargs)
        self.relative_step = learning_rate is None
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon1 = epsilon1
        self.epsilon2 = epsilon2
        self.multiply_by_parameter_scale = multiply_by_parameter_scale
        self.clipping_threshold = clipping_threshold
        self.min_dim_size_to_factor = min_dim_size_to_factor
        self.exclude_from_parameter_scale = list(exclude_from_parameter_scale or [])

    def factored_axes(self, shape):
        """(axis averaged for the row statistic, axis averaged for the column statistic), i.e.
        the largest and second-largest axes, or None when the variable is not factored."""
        if len(shape) < 2:
            return None
        by_size = sorted(range(len(shape)), key=lambda axis: (shape[axis], axis))
        largest, second = by_size[-1], by_size[-2]
        if shape[second] < self.min_dim_size_to_factor:
            return None
        return largest, second

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._rows, self._columns, self._second_moments, self._first_moments = [], [], [], []
        self._parameter_scaled = []
        for variable in var_list:
            axes = self.factored_axes(variable.shape)
            self._rows.append(self._reduced_variable(variable, axes[0], "vr") if axes else None)
            self._columns.append(self._reduced_variable(variable, axes[1], "vc") if axes else None)
            self._second_moments.append(
                None if axes else self.add_variable_from_reference(variable, "v"))
            self._first_moments.append(
                self.add_variable_from_reference(variable, "m") if self.beta1 > 0 else None)
            self._parameter_scaled.append(
                self.multiply_by_parameter_scale
                and not _path_matches(variable, self.exclude_from_parameter_scale))

    def _reduced_variable(self, variable, axis, suffix):
        shape = list(variable.shape)
        shape[axis] = 1
        name = f"{_variable_path(variable).replace('/', '_')}_{suffix}"
        return self.add_variable(shape=tuple(shape), dtype=variable.dtype, name=name)

    def _get_current_learning_rate(self):
        if not self.relative_step:
            return super()._get_current_learning_rate()
        step = ops.cast(self.iterations + 1, "float32")
        learning_rate = ops.minimum(1.0 / ops.sqrt(step), 0.01)
        return learning_rate if self.multiply_by_parameter_scale else learning_rate * 0.05

    def _decay_rate(self, dtype):
        if self.beta2 is not None:
            return ops.cast(self.beta2, dtype)
        return 1.0 - ops.power(ops.cast(self.iterations + 1, dtype), -0.8)

    def _moving_average(self, average, value, decay):
        """Store and return ``decay * average + (1 - decay) * value``."""
        new_average = decay * average + (1.0 - decay) * value
        self.assign(average, new_average)
        return new_average

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        learning_rate = ops.cast(learning_rate, dtype)
        gradient = ops.cast(_dense_gradient(gradient, variable), dtype)
        beta2 = self._decay_rate(dtype)
        index = self._get_variable_index(variable)
        squared = ops.square(gradient) + self.epsilon1
        axes = self.factored_axes(variable.shape)
        if axes is None:
            estimate = self._moving_average(self._second_moments[index], squared, beta2)
        else:
            rows = self._moving_average(
                self._rows[index], ops.mean(squared, axes[0], keepdims=True), beta2)
            columns = self._moving_average(
                self._columns[index], ops.mean(squared, axes[1], keepdims=True), beta2)
            estimate = rows * columns / ops.mean(rows, axes[1], keepdims=True)
        update = gradient / ops.sqrt(estimate + self.epsilon1)
        if self.clipping_threshold is not None:
            clip = ops.maximum(1.0, _root_mean_square(update) / self.clipping_threshold)
            update = update / clip
        if self.beta1 > 0:
            update = self._moving_average(self._first_moments[index], update, self.beta1)
        if self._parameter_scaled[index]:
            update = update * ops.maximum(_root_mean_square(variable), self.epsilon2)
        self.assign_sub(variable, learning_rate * update)

    def get_config(self):
        config = super().get_config()
        config.update(
            learning_rate=None if self.relative_step else config["learning_rate"],
            beta1=self.beta1,
            beta2=self.beta2,
            epsilon1=self.epsilon1,
            epsilon2=self.epsilon2,
            multiply_by_parameter_scale=self.multiply_by_parameter_scale,
            clipping_threshold=self.clipping_threshold,
            min_dim_size_to_factor=self.min_dim_size_to_factor,
            exclude_from_parameter_scale=self.exclude_from_parameter_scale,
        )
        return config


# --------------------------------------------------------------------------------------------
# The machinery the extensions share
# --------------------------------------------------------------------------------------------

# What an extension may look at when it rewrites one variable's update.
_UpdateStep = collections.namedtuple("_UpdateStep", "gradient variable old_value learning_rate")


class _ExtensibleOptimizer:
    """Mixin placed once in every derived optimizer's bases.

    bert4keras's extensions each rewrote the new value of a variable proposed by the optimizer
    they wrap (its ``K.update`` patch). Keras 3 has no such hook, so this mixin adds one:
    ``update_step`` keeps the variable's value, lets the base optimizer's ``update_step`` move it,
    and passes the proposed value through ``_transform_update(step, new_value)``. Each extension
    overrides it and calls ``super()`` first, so in ``extend_with_b(extend_with_a(Adam))`` a's
    rewrite is applied before b's, as in bert4keras. State is created the same way, through
    ``_build_extension``. All state changes go through ``self.assign*`` inside ``update_step``,
    which is where ``tf.distribute`` runs per-device updates, so the extensions work under
    ``MirroredStrategy``.
    """

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._build_extension(var_list)

    def _build_extension(self, var_list):
        """Create the extensions' state: each calls ``super()`` first, then adds its own."""

    def update_step(self, gradient, variable, learning_rate):
        gradient = _dense_gradient(gradient, variable)
        old_value = ops.copy(ops.convert_to_tensor(variable))
        super().update_step(gradient, variable, learning_rate)
        proposed = ops.convert_to_tensor(variable)
        step = _UpdateStep(gradient, variable, old_value, learning_rate)
        new_value = self._transform_update(step, proposed)
        if new_value is not proposed:
            self.assign(variable, new_value)

    def _transform_update(self, step, new_value):
        """Return the value ``step.variable`` takes this update; extensions override this."""
        return new_value

    def _get_current_learning_rate(self):
        # Keras calls a LearningRateSchedule with its raw step counter, which counts micro-steps
        # under gradient accumulation; here it gets `iterations`, the number of real updates.
        if isinstance(self._learning_rate, LearningRateSchedule):
            return self._learning_rate(self.iterations)
        return super()._get_current_learning_rate()

    def _for_variable(self, per_variable, variable):
        """The entry of a per-variable list (made in ``build``) that belongs to ``variable``."""
        return per_variable[self._get_variable_index(variable)]


def _extensible_bases(base_optimizer):
    if not (isinstance(base_optimizer, type)
            and issubclass(base_optimizer, keras.optimizers.Optimizer)):
        raise TypeError("extend_with_* expects a keras.optimizers.Optimizer subclass, "
                        f"got {base_optimizer!r}.")
    if issubclass(base_optimizer, _ExtensibleOptimizer):
        return (base_optimizer,)
    return (_ExtensibleOptimizer, base_optimizer)


def _finish(new_optimizer, base_optimizer, name, feature):
    """Name the derived class (default ``<Base>With<Feature>``) and register it by that name."""
    name = name or f"{base_optimizer.__name__}With{feature}"
    new_optimizer.__name__ = new_optimizer.__qualname__ = name
    new_optimizer.__module__ = __name__
    return keras.saving.register_keras_serializable(package="bert4k", name=name)(new_optimizer)


def _as_list(patterns):
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns or [])


# --------------------------------------------------------------------------------------------
# The extensions
# --------------------------------------------------------------------------------------------


def _step_ignores_value(optimizer_class):
    """Whether the class's update moves a variable by an amount that does not depend on its value
    (Adam, SGD, Adamax, Lion as Keras and bert4k define them; not LAMB or AdaFactor)."""
    independent = (Adam, keras.optimizers.Adam, keras.optimizers.SGD, Adamax, Lion)
    return any(optimizer_class.update_step is known.update_step for known in independent)


def extend_with_weight_decay(BaseOptimizer, name=None):
    """Add decoupled weight decay: ``variable -= lr * weight_decay_rate * variable`` each update.

    Arguments: ``weight_decay_rate=0.01``, ``exclude_from_weight_decay=[regex, ...]`` matched
    against variable paths (``['Norm', 'bias']`` leaves every ``*-Norm/*`` and every bias alone).

    Keras's own ``weight_decay`` is not used: it matches ``var_names`` against the bare variable
    name (``gamma``, not ``Embedding-Norm/gamma``), and it decays before ``update_step``, so layer
    adaptation wrapped around it (LAMB) would not see the decay term. Here the decay is part of
    the update that outer extensions rewrite, as in bert4keras.

    Where nothing else rewrites the update and the wrapped optimizer's step does not read the
    variable (Adam, SGD, Adamax, Lion), the two commute, and the variable is scaled by
    ``1 - lr * weight_decay_rate`` first: one pass over it instead of a copy of the old value and
    two more (BERT-base's AdamW update on TensorFlow: see README, Performance).
    """

    class WeightDecay(*_extensible_bases(BaseOptimizer)):
        def __init__(self, *args, weight_decay_rate=0.01, exclude_from_weight_decay=(),
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.weight_decay_rate = weight_decay_rate
            # Not `self.exclude_from_weight_decay`: that is a Keras method.
            self.weight_decay_exclusions = _as_list(exclude_from_weight_decay)

        def _build_extension(self, var_list):
            super()._build_extension(var_list)
            self._decay_excluded = _flags_by_path(var_list, self.weight_decay_exclusions)

        def update_step(self, gradient, variable, learning_rate):
            if not self._decays_first():
                return super().update_step(gradient, variable, learning_rate)
            if not self._for_variable(self._decay_excluded, variable):
                self.assign(variable, ops.multiply(variable, 1 - self._decay(learning_rate, variable)))
            BaseOptimizer.update_step(self, _dense_gradient(gradient, variable), variable,
                                      learning_rate)

        def _decays_first(self):
            cls = type(self)
            return (not issubclass(BaseOptimizer, _ExtensibleOptimizer)
                    and _step_ignores_value(BaseOptimizer)
                    and cls.update_step is WeightDecay.update_step
                    and cls._transform_update is WeightDecay._transform_update)

        def _decay(self, learning_rate, variable):
            return ops.cast(learning_rate, variable.dtype) * self.weight_decay_rate

        def _transform_update(self, step, new_value):
            new_value = super()._transform_update(step, new_value)
            if self._for_variable(self._decay_excluded, step.variable):
                return new_value
            return new_value - self._decay(step.learning_rate, step.variable) * step.old_value

        def get_config(self):
            return {**super().get_config(), "weight_decay_rate": self.weight_decay_rate,
                    "exclude_from_weight_decay": self.weight_decay_exclusions}

    return _finish(WeightDecay, BaseOptimizer, name, "WeightDecay")


def extend_with_layer_adaptation(BaseOptimizer, name=None):
    """Add LAMB's layer adaptation (https://arxiv.org/abs/1904.00962).

    Each variable's step ``delta`` (everything the wrapped optimizer and inner extensions do,
    weight decay included) is rescaled to ``delta * ||variable|| / ||delta / lr||``, i.e. to the
    size ``lr * ||variable||``, unless either norm is zero. Argument:
    ``exclude_from_layer_adaptation=[regex, ...]`` on variable paths.

    Keras's ``Lamb`` is one fixed optimizer; this adds the trust ratio to any optimizer.
    """

    class LayerAdaptation(*_extensible_bases(BaseOptimizer)):
        def __init__(self, *args, exclude_from_layer_adaptation=(), **kwargs):
            super().__init__(*args, **kwargs)
            self.exclude_from_layer_adaptation = _as_list(exclude_from_layer_adaptation)

        def _build_extension(self, var_list):
            super()._build_extension(var_list)
            self._adaptation_excluded = _flags_by_path(var_list,
                                                       self.exclude_from_layer_adaptation)

        def _transform_update(self, step, new_value):
            new_value = super()._transform_update(step, new_value)
            if self._for_variable(self._adaptation_excluded, step.variable):
                return new_value
            delta = new_value - step.old_value
            learning_rate = ops.maximum(ops.cast(step.learning_rate, step.variable.dtype),
                                        keras.config.epsilon())
            weight_norm = ops.sqrt(ops.sum(ops.square(step.old_value)))
            update_norm = ops.sqrt(ops.sum(ops.square(delta / learning_rate)))
            usable = ops.logical_and(weight_norm > 0, update_norm > 0)
            ratio = ops.where(usable, weight_norm / ops.where(usable, update_norm, 1.0), 1.0)
            return step.old_value + delta * ratio

        def get_config(self):
            return {**super().get_config(),
                    "exclude_from_layer_adaptation": self.exclude_from_layer_adaptation}

    return _finish(LayerAdaptation, BaseOptimizer, name, "LayerAdaptation")


def extend_with_piecewise_linear_lr(BaseOptimizer, name=None):
    """Multiply the learning rate by bert4keras's piecewise-linear function of the update count.

    Argument: ``lr_schedule={step: multiplier, ...}``, e.g. ``{1000: 1, 2000: 0.1}``: linear
    warmup from 0 to 1 over 1000 updates, linear decay to 0.1 by update 2000, then flat (see
    ``piecewise_linear``). It multiplies whatever the learning rate is, a float or a Keras
    ``LearningRateSchedule``, so everything that reads ``optimizer.learning_rate`` sees it.
    """

    class PiecewiseLinearLR(*_extensible_bases(BaseOptimizer)):
        def __init__(self, *args, lr_schedule=None, **kwargs):
            super().__init__(*args, **kwargs)
            # JSON turns the integer keys into strings; int() brings them back.
            schedule = {0: 1} if lr_schedule is None else lr_schedule
            self.lr_schedule = {int(step): float(value) for step, value in schedule.items()}
            piecewise_linear(0, self.lr_schedule)  # fail early on an empty schedule

        def _get_current_learning_rate(self):
            multiplier = piecewise_linear(self.iterations, self.lr_schedule)
            return ops.multiply(super()._get_current_learning_rate(), multiplier)

        def get_config(self):
            return {**super().get_config(), "lr_schedule": self.lr_schedule}

    return _finish(PiecewiseLinearLR, BaseOptimizer, name, "PiecewiseLinearLR")


def extend_with_gradient_accumulation(BaseOptimizer, name=None):
    """Update once every ``grad_accum_steps`` calls, with the mean of their gradients.

    ``optimizer.iterations`` counts real updates (not calls), and learning-rate schedules,
    Adam's bias correction and the other extensions all see that count.

    Written here instead of Keras's ``gradient_accumulation_steps`` because, in Keras 3.15, (1)
    the update runs inside ``ops.cond``, and under ``tf.distribute.MirroredStrategy`` the gradient
    all-reduce inside that branch fails (``merge_call called while defining a new graph``), and
    (2) Keras calls learning-rate schedules with the micro-step count. Here the wrapped update
    runs at every call on the running mean of the gradients, and every state change it makes goes
    through ``self.assign*``, which keep the old value except on the last call of a cycle (the
    masking bert4keras did by patching ``K.update``). No branch, so it works on every backend and
    under ``tf.distribute``; the price is running the update math (and, with several replicas,
    the all-reduce) on every call.

    Keras's own ``weight_decay``, ``use_ema`` and ``gradient_accumulation_steps`` change state
    outside ``update_step`` and would act at every call, so they are refused here; use
    ``extend_with_weight_decay`` and ``extend_with_exponential_moving_average``.
    """

    class GradientAccumulation(*_extensible_bases(BaseOptimizer)):
        def __init__(self, *args, grad_accum_steps=2, **kwargs):
            super().__init__(*args, **kwargs)
            if int(grad_accum_steps) != grad_accum_steps or grad_accum_steps < 1:
                raise ValueError("grad_accum_steps must be an integer >= 1, "
                                 f"got {grad_accum_steps!r}.")
            conflicts = [argument for argument in
                         ("weight_decay", "use_ema", "gradient_accumulation_steps")
                         if getattr(self, argument)]
            if conflicts:
                raise ValueError(
                    "extend_with_gradient_accumulation cannot be combined with Keras's "
                    f"{conflicts}: they would act on every micro-step. Use "
                    "extend_with_weight_decay / extend_with_exponential_moving_average / "
                    "grad_accum_steps instead."
                )
            self.grad_accum_steps = int(grad_accum_steps)
            self._is_update_call = None  # while applying: does this call end a cycle?

        @property
        def iterations(self):
            return ops.floor_divide(self._iterations, self.grad_accum_steps)

        def _build_extension(self, var_list):
            super()._build_extension(var_list)
            self._gradient_sums = self.add_optimizer_variables(var_list, "gradient_sum")

        def _backend_apply_gradients(self, grads, trainable_variables):
            steps = self.grad_accum_steps
            is_update = ops.equal(ops.mod(self._iterations + 1, steps), 0)
            sums = [self._for_variable(self._gradient_sums, v) for v in trainable_variables]
            previous = [ops.convert_to_tensor(s) for s in sums]
            totals = [ops.add(p, g) for p, g in zip(previous, grads)]
            self._is_update_call = is_update
            try:
                super()._backend_apply_gradients([t / steps for t in totals], trainable_variables)
            finally:
                self._is_update_call = None
            # The sums become 0 after an update, else the running totals; Keras's accumulator
            # hook (distribution-aware) adds the difference.
            increments = [ops.where(is_update, 0.0, t) - p for t, p in zip(totals, previous)]
            self._backend_increment_gradient_accumulators(increments, sums)

        def assign(self, variable, value):
            if self._is_update_call is not None:
                value = ops.where(self._is_update_call, value, ops.convert_to_tensor(variable))
            super().assign(variable, value)

        def assign_add(self, variable, value):
            super().assign_add(variable, self._masked_increment(value))

        def assign_sub(self, variable, value):
            super().assign_sub(variable, self._masked_increment(value))

        def _masked_increment(self, value):
            if self._is_update_call is None:
                return value
            return ops.where(self._is_update_call, value, 0.0)

        def get_config(self):
            return {**super().get_config(), "grad_accum_steps": self.grad_accum_steps}

    return _finish(GradientAccumulation, BaseOptimizer, name, "GradientAccumulation")


def extend_with_lookahead(BaseOptimizer, name=None):
    """Add Lookahead (https://arxiv.org/abs/1907.08610).

    Slow weights start as the weights before the first update; after every
    ``steps_per_slow_update`` (k) updates they move ``slow_step_size`` (alpha) of the way to the
    fast weights, ``slow += alpha * (fast - slow)``, and the fast weights are reset to them.
    (bert4keras started its slow weights at zero and synchronised at update 0; this follows the
    paper.) Keras has no Lookahead.
    """

    class Lookahead(*_extensible_bases(BaseOptimizer)):
        def __init__(self, *args, steps_per_slow_update=5, slow_step_size=0.5, **kwargs):
            super().__init__(*args, **kwargs)
            self.steps_per_slow_update = steps_per_slow_update
            self.slow_step_size = slow_step_size

        def _build_extension(self, var_list):
            super()._build_extension(var_list)
            self._slow_weights = self.add_optimizer_variables(var_list, "slow_weight")

        def _transform_update(self, step, new_value):
            new_value = super()._transform_update(step, new_value)
            slow_variable = self._for_variable(self._slow_weights, step.variable)
            first_update = ops.equal(self.iterations, 0)
            slow = ops.where(first_update, step.old_value, ops.convert_to_tensor(slow_variable))
            synchronise = ops.equal(ops.mod(self.iterations + 1, self.steps_per_slow_update), 0)
            slow = ops.where(synchronise, slow + self.slow_step_size * (new_value - slow), slow)
            self.assign(slow_variable, slow)
            return ops.where(synchronise, slow, new_value)

        def get_config(self):
            return {**super().get_config(), "steps_per_slow_update": self.steps_per_slow_update,
                    "slow_step_size": self.slow_step_size}

    return _finish(Lookahead, BaseOptimizer, name, "Lookahead")


def extend_with_lazy_optimization(BaseOptimizer, name=None):
    """Move only the rows whose gradient is non-zero (e.g. the embeddings of tokens in the batch).

    Argument: ``include_in_lazy_optimization=[regex, ...]`` on variable paths. A row is a slice
    along the last axis; the wrapped optimizer's own state (Adam's moments, ...) still updates,
    only the variable's step is masked, as in bert4keras. Keras has nothing like it.
    """

    class LazyOptimization(*_extensible_bases(BaseOptimizer)):
        def __init__(self, *args, include_in_lazy_optimization=(), **kwargs):
            super().__init__(*args, **kwargs)
            self.include_in_lazy_optimization = _as_list(include_in_lazy_optimization)

        def _build_extension(self, var_list):
            super()._build_extension(var_list)
            self._lazy = _flags_by_path(var_list, self.include_in_lazy_optimization)

        def _transform_update(self, step, new_value):
            new_value = super()._transform_update(step, new_value)
            if not self._for_variable(self._lazy, step.variable):
                return new_value
            touched = ops.any(ops.not_equal(step.gradient, 0), axis=-1, keepdims=True)
            return ops.where(touched, new_value, step.old_value)

        def get_config(self):
            return {**super().get_config(),
                    "include_in_lazy_optimization": self.include_in_lazy_optimization}

    return _finish(LazyOptimization, BaseOptimizer, name, "LazyOptimization")


def extend_with_exponential_moving_average(BaseOptimizer, name=None):
    """Keep an exponential moving average of the weights, bert4keras style.

    Argument: ``ema_momentum=0.999``. After each update ``ema = m * ema + (1 - m) * weight``,
    starting from zero. ``apply_ema_weights(bias_correction=True)`` backs up the weights and puts
    ``ema / (1 - m ** iterations)`` (or the raw ``ema``) in their place, e.g. for evaluation;
    ``reset_old_weights()`` puts the backed-up weights back.

    Keras's ``use_ema`` is not used: its average starts from the first weights rather than zero
    (so bert4keras's bias correction would be wrong), it updates on every micro-step under
    gradient accumulation, and ``fit`` overwrites the weights with it at the end of training.
    Its ``ema_momentum`` argument and config entry are shared.
    """

    class ExponentialMovingAverage(*_extensible_bases(BaseOptimizer)):
        def __init__(self, *args, ema_momentum=0.999, **kwargs):
            if kwargs.get("use_ema"):
                raise ValueError("Use either Keras's use_ema or "
                                 "extend_with_exponential_moving_average, not both.")
            if not 0 <= ema_momentum <= 1:
                raise ValueError(f"ema_momentum must be in [0, 1], got {ema_momentum}.")
            super().__init__(*args, ema_momentum=ema_momentum, **kwargs)
            self._old_weights = None

        def _build_extension(self, var_list):
            super()._build_extension(var_list)
            self._ema_weights = self.add_optimizer_variables(var_list, "ema")

        def _transform_update(self, step, new_value):
            new_value = super()._transform_update(step, new_value)
            average = self._for_variable(self._ema_weights, step.variable)
            momentum = ops.cast(self.ema_momentum, step.variable.dtype)
            self.assign(average, momentum * average + (1 - momentum) * new_value)
            return new_value

        def _averaged_weights(self):
            return [(weight, average) for weight, average
                    in zip(self._trainable_variables, self._ema_weights) if average is not None]

        def apply_ema_weights(self, bias_correction=True):
            """Back up the model's weights, then replace them with their moving averages."""
            updates = int(ops.convert_to_numpy(self.iterations))
            if updates == 0:
                raise ValueError("apply_ema_weights() needs at least one update: "
                                 "the average is still empty.")
            scale = 1.0 - self.ema_momentum**updates if bias_correction else 1.0
            pairs = self._averaged_weights()
            self._old_weights = [ops.convert_to_numpy(weight) for weight, _ in pairs]
            for weight, average in pairs:
                weight.assign(ops.convert_to_numpy(average) / scale)

        def reset_old_weights(self):
            """Put back the weights backed up by apply_ema_weights()."""
            if self._old_weights is None:
                raise ValueError("reset_old_weights() restores what apply_ema_weights() "
                                 "backed up; call that first.")
            for (weight, _), value in zip(self._averaged_weights(), self._old_weights):
                weight.assign(value)

    return _finish(ExponentialMovingAverage, BaseOptimizer, name, "ExponentialMovingAverage")


def extend_with_parameter_wise_lr(BaseOptimizer, name=None):
    """Scale each variable's step by per-variable multipliers.

    Argument: ``paramwise_lr_schedule={name_substring: multiplier}``: a variable's step is
    multiplied by every multiplier whose key occurs in its path (``{'Embedding': 0.1}`` trains
    the embeddings ten times slower). Keras has no per-variable learning rate short of
    splitting the variables between several optimizers.
    """

    class ParameterWiseLR(*_extensible_bases(BaseOptimizer)):
        def __init__(self, *args, paramwise_lr_schedule=None, **kwargs):
            super().__init__(*args, **kwargs)
            schedule = paramwise_lr_schedule or {}
            self.paramwise_lr_schedule = {str(key): float(value) for key, value in schedule.items()}

        def _build_extension(self, var_list):
            super()._build_extension(var_list)
            self._lr_multipliers = [self._multiplier(_variable_path(v)) for v in var_list]

        def _multiplier(self, path):
            matching = [value for key, value in self.paramwise_lr_schedule.items() if key in path]
            return float(np.prod(matching))

        def _transform_update(self, step, new_value):
            new_value = super()._transform_update(step, new_value)
            multiplier = self._for_variable(self._lr_multipliers, step.variable)
            if multiplier == 1.0:
                return new_value
            return step.old_value + (new_value - step.old_value) * multiplier

        def get_config(self):
            return {**super().get_config(), "paramwise_lr_schedule": self.paramwise_lr_schedule}

    return _finish(ParameterWiseLR, BaseOptimizer, name, "ParameterWiseLR")
