"""Data feeding: parallel preprocessing (``parallel_apply``) and ``DataGenerator`` with its tf.data
and ``keras.utils.PyDataset`` glue.

Split from ``bert4k.snippets`` (which re-exports every public name here, as bert4keras scripts import
them from there) because the two share worker processes and their error passing, and together were
half of that module. NumPy / standard library at import: TensorFlow is imported only inside
``DataGenerator.to_dataset`` (and ``keep_freed_memory`` uses it once it is imported), Keras only inside
``DataGenerator.to_pydataset``, so data-preparation scripts and worker processes can use this module
without loading a deep-learning framework.
"""

import collections
import ctypes
import functools
import itertools
import math
import multiprocessing.dummy
import pickle
import platform
import queue
import random as _py_random
import sys
import threading
import traceback

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Parallel map
# ----------------------------------------------------------------------------------------------------------


class _RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the ``__cause__`` of the error re-raised in the caller."""

    def __str__(self):
        return self.args[0]


def _portable_error(error):
    """The error itself when it survives pickling, else a RuntimeError with the same text."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        error = RuntimeError(f"{type(error).__name__}: {error}")
    error.__traceback__ = None  # tracebacks do not pickle; the text above carries it
    return error, text


def _raise_worker_error(error, text):
    if text is not None:  # from a process: attach the worker's traceback so the user sees where it failed
        raise error from _RemoteTraceback(f'\n"""\n{text}"""')
    raise error


def _reseed(seed):
    # Forked workers start with the parent's RNG state and would otherwise all draw the same numbers.
    np.random.seed(seed)
    _py_random.seed(seed)


_STOP = None  # placed in the task queue once per worker to end it


def _worker_loop(func, tasks, results, in_process, seed):
    """Runs in each worker: applies ``func`` to tasks until told to stop; never lets an error escape."""
    if seed is not False:
        _reseed(seed)
    while True:
        task = tasks.get()
        if task is _STOP:
            return
        index, item = task
        try:
            result = func(item)
            if in_process:
                # Pickle here: a result that cannot be pickled then fails in the worker, where we catch it,
                # instead of in the queue's feeder thread, where it would be lost and the caller would hang.
                result = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
            results.put((index, True, result))
        except BaseException as error:  # noqa: BLE001 - every failure must reach the caller
            results.put((index, False, _portable_error(error) if in_process else (error, None)))


def _worker_seeds(random_seeds, workers, dummy):
    """One seed per worker; ``False`` means leave its RNG alone."""
    if dummy or random_seeds is None or random_seeds is False:
        return [False] * workers  # threads share one RNG: reseeding would only disturb the caller's
    if random_seeds is True:
        return [None] * workers  # fresh OS entropy in each process
    seeds = list(random_seeds)
    return (seeds + [False] * workers)[:workers]


class _WorkerPool:
    """Threads or processes reading (index, item) tasks from one queue and writing results to another."""

    _POLL_SECONDS = 0.5  # how often a waiting caller checks that no worker process has died

    def __init__(self, func, workers, dummy, random_seeds):
        if workers < 1:
            raise ValueError(f"parallel_apply: workers must be >= 1, got {workers}")
        self.in_process = not dummy
        if dummy:
            self.tasks, self.results = queue.Queue(), queue.Queue()
            start = functools.partial(threading.Thread, daemon=True)
        else:
            import multiprocessing

            context = multiprocessing.get_context()
            self.tasks, self.results = context.Queue(), context.Queue()
            start = functools.partial(context.Process, daemon=True)
        self.workers = [
            start(target=_worker_loop, args=(func, self.tasks, self.results, self.in_process, seed))
            for seed in _worker_seeds(random_seeds, workers, dummy)
        ]
        for worker in self.workers:
            worker.start()

    def submit(self, index, item):
        self.tasks.put((index, item))

    def receive(self, block=True):
        """The next finished ``(index, result)``; ``None`` when ``block`` is False and nothing is ready."""
        while True:
            try:
                index, ok, payload = self.results.get(block, self._POLL_SECONDS)
                break
            except queue.Empty:
                if not block:
                    return None
                self._check_workers_alive()
        if not ok:
            _raise_worker_error(*payload)
        return index, (pickle.loads(payload) if self.in_process else payload)

    def _check_workers_alive(self):
        if not self.in_process:
            return  # a thread catches every error of func, so it cannot vanish without a word
        dead = [w for w in self.workers if w.exitcode is not None]
        if dead:
            raise RuntimeError(
                f"parallel_apply: a worker process died (exit code {dead[0].exitcode}) before "
                "returning its result"
            )

    def close(self, finished):
        """Stops the workers: politely once every task is done, at once when the caller gave up early."""
        if self.in_process:
            self._stop_processes(finished)
        else:
            self._stop_threads(finished)

    def _stop_processes(self, finished):
        for worker in self.workers:
            if finished:
                self.tasks.put(_STOP)
            else:
                worker.terminate()
        for worker in self.workers:
            worker.join()
        for q in (self.tasks, self.results):
            q.close()
            q.cancel_join_thread()  # items left after terminate() must not block interpreter exit

    def _stop_threads(self, finished):
        # Threads cannot be killed: drop the tasks they have not started, then each ends after its current
        # one. An abandoned pool is not waited for (its threads are daemons).
        while not finished:
            try:
                self.tasks.get(block=False)
            except queue.Empty:
                break
        for _ in self.workers:
            self.tasks.put(_STOP)
        if finished:
            for worker in self.workers:
                worker.join()


def parallel_apply_generator(func, iterable, workers, max_queue_size, dummy=False, random_seeds=True):
    """Applies ``func`` to every item in parallel, yielding ``(index, result)`` as results arrive.

    Args:
        func: a function of one item. For processes it must be picklable where the start method is not
            ``fork`` (a module-level function, not a lambda).
        iterable: the items; it is read lazily, so it may be a large generator.
        workers: number of worker processes (or threads with ``dummy=True``).
        max_queue_size: at most ``max_queue_size + workers`` items are in flight (read but not yet
            yielded), which bounds memory however long ``iterable`` is.
        dummy: threads instead of processes.
        random_seeds: for processes: ``True`` gives each a fresh NumPy / ``random`` seed so they draw
            different numbers; a list gives one seed per process; ``False`` or ``None`` leaves them as
            forked. Threads share the caller's RNG and are never reseeded.

    An error raised by ``func`` is raised here, with its type and message (and, from a process, the
    worker's traceback as its cause); the workers are then stopped.
    """
    pool = _WorkerPool(func, workers, dummy, random_seeds)
    capacity = max(1, max_queue_size) + workers
    finished = False
    try:
        in_flight = 0
        for index, item in enumerate(iterable):
            if in_flight >= capacity:
                yield pool.receive()
                in_flight -= 1
            pool.submit(index, item)
            in_flight += 1
            # Hand out what is already done, so results stream out while the input is still being read.
            while in_flight and (ready := pool.receive(block=False)) is not None:
                yield ready
                in_flight -= 1
        for _ in range(in_flight):
            yield pool.receive()
        finished = True
    finally:
        pool.close(finished)


def parallel_apply(
    func,
    iterable,
    workers,
    max_queue_size,
    callback=None,
    dummy=False,
    random_seeds=True,
    unordered=True,
):
    """Applies ``func`` to every item of ``iterable`` in parallel (see ``parallel_apply_generator``).

    Without ``callback`` the results are returned as a list: in completion order, or in input order when
    ``unordered=False``. With ``callback`` each result is passed to it as it arrives and nothing is
    returned (this keeps memory flat for very long inputs).
    """
    results = parallel_apply_generator(func, iterable, workers, max_queue_size, dummy, random_seeds)
    if callback is not None:
        for _, result in results:
            callback(result)
        return None
    if unordered:
        return [result for _, result in results]
    return [result for _, result in sorted(results, key=lambda pair: pair[0])]


# ----------------------------------------------------------------------------------------------------------
# Data generators
# ----------------------------------------------------------------------------------------------------------


def _attach_names(names, values):
    """Wraps values in dicts keyed by (possibly nested) names, as Keras inputs are named."""
    if isinstance(names, str):
        return {names: values}
    if all(isinstance(n, str) for n in names):
        return dict(zip(names, values))
    return tuple(_attach_names(n, v) for n, v in zip(names, values))


def _map_leaves(fn, types, shapes):
    """Walks ``types`` and ``shapes`` together; ``fn(dtype, shape)`` at each dtype leaf."""
    if isinstance(types, dict):
        return {key: _map_leaves(fn, types[key], shapes[key]) for key in types}
    if isinstance(types, (list, tuple)):
        return tuple(_map_leaves(fn, t, s) for t, s in zip(types, shapes))
    return fn(types, shapes)


def _as_tuples(template, value):
    """Turns lists into tuples wherever the template has a tuple, so tf.data sees the declared structure."""
    if isinstance(template, dict):
        return {key: _as_tuples(template[key], value[key]) for key in template}
    if isinstance(template, tuple):
        return tuple(_as_tuples(t, v) for t, v in zip(template, value))
    return value


def _as_keras_structure(value):
    """bert4keras generators yield ``[token_ids, segment_ids], labels``; Keras 3 on TensorFlow
    takes only tuples and dicts as the structure of a generator's batch (a list there raises a
    TypeError from tf.data), so lists of arrays become tuples. Lists of numbers stay data."""
    if isinstance(value, dict):
        return {key: _as_keras_structure(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_as_keras_structure(item) for item in value]
        if isinstance(value, tuple) or (items and all(map(_is_array_or_structure, items))):
            return tuple(items)
    return value


def _is_array_or_structure(value):
    return isinstance(value, (tuple, dict)) or (hasattr(value, "shape") and hasattr(value, "dtype"))


_NOTHING = object()  # marks an empty iterator, since None may be a legitimate item

# glibc <malloc.h> mallopt parameters, and the limits glibc's own heuristic raises them to on 64-bit.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8
_MMAP_THRESHOLD_MAX = 32 * 2**20
_freed_memory_kept = False


def keep_freed_memory():
    """Keeps freed memory in the process for the next step's tensors (glibc's malloc); True if it
    acted. Nothing happens without glibc, or a second time.

    TensorFlow: the first time a ``tf.data.Dataset.from_generator`` runs in a process (``model.fit``
    on a Python generator builds one), TensorFlow sets malloc's trim threshold to 128 KB, which also
    freezes the mmap threshold where it stands: 1-2 MiB after TensorFlow's import. From then on every
    larger tensor is mapped from the kernel and unmapped when freed, page by page: a training step of
    a small BERT (32x128) took 110,000 page faults and 550 ms instead of 3,400 and 240 ms. This lets
    TensorFlow make its one change now, then sets the limits glibc's own heuristic grows to (mmap 32
    MiB, trim 64 MiB). ``DataGenerator`` calls it; call it yourself before fitting on another Python
    generator. Nothing happens before TensorFlow is imported (then no generator dataset has run).

    JAX (Keras's backend, or JAX imported without Keras): XLA's CPU runtime takes a step's
    temporaries as one block (770 MiB for a MiniLM training step at 16x128) on one of its own
    threads, and glibc maps a block that size from the kernel, outside the main heap, and unmaps it
    when freed: every step faults its pages in again (200,000 page faults; the step took 1,010-1,080
    ms against 610-740 without them). This serves every thread from the main heap, never maps and
    never trims, so the process keeps its peak memory (RSS 1.6 -> 2.3 GiB there). It is for
    training: one heap for every thread slowed MiniLM's 1x128 inference (x0.88). Call it first
    thing, before any JAX computation: threads keep the heaps they already have, so once JAX's
    runtime has started it does nothing and returns False.
    """
    global _freed_memory_kept
    if _freed_memory_kept or platform.libc_ver()[0] != "glibc":
        return False
    tf = sys.modules.get("tensorflow")
    early_jax = _keras_backend() == "jax" and not _jax_runtime_started()
    if tf is None and not early_jax:
        return False
    _freed_memory_kept = True  # TensorFlow and JAX's threads change malloc once, so once is enough
    if tf is not None:
        for _ in tf.data.Dataset.from_generator(lambda: iter(()), output_signature=tf.TensorSpec((), tf.int32)):
            pass
    mallopt = ctypes.CDLL(None).mallopt
    if early_jax:  # every thread from the main heap, never mapped, never trimmed
        return bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
                    and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX))


def _keras_backend():
    keras = sys.modules.get("keras")
    if keras is not None:
        return keras.backend.backend()
    return "jax" if "jax" in sys.modules else None


def _jax_runtime_started():
    try:
        from jax._src import xla_bridge  # JAX has no public way to ask without starting it
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        return True  # cannot tell: leave malloc alone


class DataGenerator:
    """Base class for feeding data to a model, as in bert4keras.

    Subclass it and write ``__iter__(self, random=False)`` yielding batches (for ``forfit`` /
    ``to_pydataset``) or single samples (for ``to_dataset``, where tf.data does the batching), usually
    by looping over ``self.sample(random)``::

        class Generator(DataGenerator):
            def __iter__(self, random=False):
                batch_ids, batch_labels = [], []
                for is_end, (text, label) in self.sample(random):
                    batch_ids.append(tokenizer.encode(text)[0])
                    batch_labels.append([label])
                    if len(batch_ids) == self.batch_size or is_end:
                        yield sequence_padding(batch_ids), sequence_padding(batch_labels)
                        batch_ids, batch_labels = [], []

        train_generator = Generator(train_data, batch_size=32)
        model.fit(train_generator.forfit(), steps_per_epoch=len(train_generator), epochs=3)

    Shuffling uses NumPy's global RNG, so ``np.random.seed`` makes runs repeatable.

    Batches padded to their own longest sequence carry less padding when their sequences are of
    similar length. Given ``length_of`` (an item's length, e.g. ``lambda item: len(item[0])``), a
    shuffled pass sorts the items of every ``group_by_length`` batches by length and hands out that
    window's batches in a random order (as pretraining's ``group_by_length`` does; 1 leaves the
    batches as drawn). ``__iter__`` should then batch every ``batch_size`` items, as above, and
    pad each batch to its own longest (``sequence_padding(batch_ids, multiple_of=32)``). Ordered
    passes keep the data's order.
    """

    def __init__(self, data, batch_size=32, buffer_size=None, length_of=None, group_by_length=16):
        self.data = data
        self.batch_size = batch_size
        self.steps = math.ceil(len(data) / batch_size) if hasattr(data, "__len__") else None
        self.buffer_size = buffer_size or batch_size * 1000
        if length_of is not None and not callable(length_of):
            raise TypeError(f"length_of must be a function of an item, got {length_of!r}")
        if length_of is not None and not (isinstance(group_by_length, int) and group_by_length >= 1):
            raise ValueError(f"group_by_length must be a whole number of batches >= 1, got {group_by_length!r}")
        self.length_of = length_of
        self.group_by_length = group_by_length

    def __len__(self):
        if self.steps is None:
            raise TypeError(
                f"{type(self).__name__}: the data has no length, so the number of steps is unknown; "
                "pass steps_per_epoch to fit yourself"
            )
        return self.steps

    def __iter__(self, random=False):
        raise NotImplementedError(f"{type(self).__name__} must define __iter__(self, random=False)")

    def sample(self, random=False):
        """Yields ``(is_end, item)`` for every item of the data, ``is_end`` True for the last one.

        With ``random`` the order is shuffled: fully when the data has a length, otherwise through a
        buffer of ``buffer_size`` items (streams cannot be shuffled whole).
        """
        if not random:
            items = iter(self.data)
        elif self.steps is not None:
            items = (self.data[i] for i in np.random.permutation(len(self.data)))
        else:
            items = self._buffer_shuffled()
        if random and self.length_of is not None and self.group_by_length > 1:
            items = self._grouped_by_length(items)
        previous = next(items, _NOTHING)
        if previous is _NOTHING:
            return
        for item in items:
            yield False, previous
            previous = item
        yield True, previous

    def _buffer_shuffled(self):
        buffer = []
        for item in self.data:
            buffer.append(item)
            if len(buffer) > self.buffer_size:
                yield _pop_random(buffer)
        while buffer:
            yield _pop_random(buffer)

    def _grouped_by_length(self, items):
        window_size = self.batch_size * self.group_by_length
        while window := list(itertools.islice(items, window_size)):
            window.sort(key=self.length_of)  # stable: equal lengths keep their shuffled order
            batches = [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
            # Only the data's last window can end in a short batch; it stays last, so __iter__'s
            # batches (every batch_size items, then is_end) still cut the stream where the window does.
            full = len(batches) - (len(batches[-1]) < self.batch_size)
            for i in np.random.permutation(full).tolist() + list(range(full, len(batches))):
                yield from batches[i]

    def forfit(self, random=True):
        """Loops over ``__iter__(random)`` forever: the stream ``fit`` takes with ``steps_per_epoch``.

        Batches may be padded to their own longest sequence. On TensorFlow, Keras reads the first two
        batches and fixes every dimension in which they agree, then fails on (or, given a Python
        generator, hangs after) a later batch that differs there. So with ``random`` (the order is
        a draw anyway) the second batch of each pass is the one of the next ``SIGNATURE_LOOKAHEAD``
        whose shape differs from the first's along the most axes; the others follow in their order.
        Under TensorFlow it first calls ``keep_freed_memory()``.
        """
        keep_freed_memory()
        return self._passes(random, shapes_apart=random)

    def _passes(self, random, shapes_apart=False):
        while True:
            produced_any = False
            batches = map(_as_keras_structure, self.__iter__(random))
            for batch in _second_batch_shaped_apart(batches) if shapes_apart else batches:
                produced_any = True
                yield batch
            if not produced_any:
                raise ValueError(
                    f"{type(self).__name__} produced nothing in a pass over its data (is the data a "
                    "generator that can only be read once?); forfit would loop forever"
                )

    def forfit_dataset(self, random=True, prefetch=2):
        """``forfit(random)`` as a ``tf.data.Dataset`` of its batches, for ``model.fit`` on TensorFlow
        (with ``steps_per_epoch=len(self)``); the same batches in the same order.

        Unlike Keras's own dataset around ``forfit()``, tf.data's autotuning is off: with it, ``fit``
        on a generator waited 10-50 s after its last step, while the autotuning thread finished its
        sleep (measured fine-tuning a small BERT on 2 cores). ``prefetch`` batches are made ahead
        in a background thread. The signature comes from the first ``1 + SIGNATURE_LOOKAHEAD``
        batches: an axis is free where they differ (the batch axis always), fixed elsewhere.
        """
        import tensorflow as tf  # tf.data glue, as in to_dataset

        keep_freed_memory()
        stream = self._passes(random, shapes_apart=random)  # forfit's very stream
        ahead = list(itertools.islice(stream, 1 + SIGNATURE_LOOKAHEAD))
        shapes = [_leaf_shapes(batch) for batch in ahead]
        specs = iter([
            tf.TensorSpec(_axes_they_share([s[i] for s in shapes]), tf.as_dtype(np.asarray(array).dtype))
            for i, array in enumerate(_leaves(ahead[0]))
        ])
        signature = _map_leaves(lambda *_: next(specs), ahead[0], ahead[0])  # lists become tuples

        def batches():
            for batch in itertools.chain(ahead, stream):
                yield _as_tuples(signature, batch)

        options = tf.data.Options()
        options.autotune.enabled = False
        dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
        return dataset.prefetch(prefetch).with_options(options)

    def fortest(self, random=False):
        """One pass over ``__iter__(random)``, in order by default: for evaluation and prediction.
        Under TensorFlow it first calls ``keep_freed_memory()``, as ``predict`` on it is a generator
        dataset too."""
        keep_freed_memory()
        # A generator: Keras refuses other iterators (a map object) as data.
        return (_as_keras_structure(batch) for batch in self.__iter__(random))

    def to_dataset(self, types, shapes, names=None, padded_batch=False, random=True):
        """An endless ``tf.data.Dataset`` built from ``forfit(random)``.

        Here ``__iter__`` yields single samples and tf.data batches them by ``batch_size``; as the
        stream is endless, a batch may hold the end of one pass and the start of the next.

        Args:
            types: dtype of each sample component, e.g. ``('int32', 'int32')``, nested like the samples.
            shapes: shape of each component, e.g. ``([None], [None])``.
            names: optional input names (a string, a tuple of strings, or nested tuples of them for
                ``(inputs, targets)``); each component is then fed under its name, as Keras models with
                named ``Input`` layers expect.
            padded_batch: pad the samples of a batch to a common length (``None`` dimensions are padded
                to the longest sample of the batch, fixed ones to the given size).
            random: shuffle the samples on each pass (an addition to bert4keras, for tests and eval).
        """
        import tensorflow as tf  # tf.data glue: the only TensorFlow import of this module

        if names is not None:
            types, shapes = _attach_names(names, types), _attach_names(names, shapes)
        types = _map_leaves(lambda t, s: t, types, shapes)  # lists become tuples, as samples will

        def rank_only(dtype, shape):
            return tf.TensorSpec([None] * len(shape), tf.as_dtype(dtype))

        def full_spec(dtype, shape):
            return tf.TensorSpec(shape, tf.as_dtype(dtype))

        def samples():
            for sample in self._passes(random):
                if names is not None:
                    sample = _attach_names(names, sample)
                yield _as_tuples(types, sample)

        signature = _map_leaves(rank_only if padded_batch else full_spec, types, shapes)
        keep_freed_memory()
        dataset = tf.data.Dataset.from_generator(samples, output_signature=signature)
        if padded_batch:
            padded_shapes = _map_leaves(lambda t, s: tf.TensorShape(s), types, shapes)
            return dataset.padded_batch(self.batch_size, padded_shapes=padded_shapes)
        return dataset.batch(self.batch_size)

    def to_pydataset(self, random=True, workers=1, use_multiprocessing=False, max_queue_size=10):
        """A ``keras.utils.PyDataset`` serving ``forfit(random)``, for ``model.fit`` on any backend.

        Each epoch takes ``len(self)`` batches from the stream, so ``__iter__`` should yield that many
        per pass. Keras's batch index is ignored: the generator already decides the order, and its
        ``__iter__`` cannot jump to a batch.

        ``workers > 1`` runs that many Keras threads pulling from the one stream (batches may then come
        slightly out of order: use ``workers=1`` for ``predict``). With
        ``use_multiprocessing=True`` the batches are made in one background process (``__iter__`` is
        sequential, so more processes would each redo the whole pass) and handed to Keras through a
        queue, which keeps tokenization off the training process.

        On TensorFlow, Keras fixes every dimension that is equal in the first two batches (``forfit``
        makes them differ where it can); a later batch padded shorter there is zero-padded up to it
        (see ``DataGeneratorPyDataset``).
        """
        keep_freed_memory()
        return _pydataset_class()(self, random, workers, use_multiprocessing, max_queue_size)


SIGNATURE_LOOKAHEAD = 16


def _second_batch_shaped_apart(batches, lookahead=SIGNATURE_LOOKAHEAD):
    """``batches`` with one of the ``lookahead`` after the first moved up to second place: the one
    whose shape differs from the first's along the most axes (the earliest such; none moved if
    they all have the first's shape)."""
    first = next(batches, _NOTHING)
    if first is _NOTHING:
        return
    ahead = list(itertools.islice(batches, lookahead))
    yield first
    if ahead:
        reference = _leaf_shapes(first)
        scores = [_count_axes_differing(_leaf_shapes(batch), reference) for batch in ahead]
        yield ahead.pop(scores.index(max(scores)))
    yield from ahead
    yield from batches


def _count_axes_differing(shapes, reference):
    """In how many (array, axis) pairs, the batch axis aside, ``shapes`` differ from ``reference``."""
    if len(shapes) != len(reference):
        return 0
    return sum(
        a[axis] != b[axis]
        for a, b in zip(shapes, reference)
        if len(a) == len(b)
        for axis in range(1, len(a))  # Keras leaves the batch axis free anyway
    )


def _axes_they_share(shapes):
    """One array's shape over several batches: None on the batch axis and wherever they differ."""
    return [None] + [size if all(shape[axis] == size for shape in shapes) else None
                     for axis, size in enumerate(shapes[0][1:], 1)]


def _leaves(batch):
    """A (tuple / list / dict) batch's arrays, in a fixed order."""
    if isinstance(batch, dict):
        return [leaf for key in batch for leaf in _leaves(batch[key])]
    if isinstance(batch, (list, tuple)):
        return [leaf for item in batch for leaf in _leaves(item)]
    return [batch]


def _leaf_shapes(batch):
    """Shapes of a (tuple / list / dict) batch's arrays, in a fixed order."""
    return [tuple(np.shape(leaf)) for leaf in _leaves(batch)]


def _pop_random(items):
    """Removes and returns a random element in O(1): swap it with the last one first."""
    i = np.random.randint(len(items))
    items[i], items[-1] = items[-1], items[i]
    return items.pop()


def _produce_batches(generator, random, batches, seed):
    """Background process of ``to_pydataset(use_multiprocessing=True)``: streams batches into a queue."""
    _reseed(seed)
    try:
        for batch in generator._passes(random, shapes_apart=random):
            batches.put((True, batch))
    except BaseException as error:  # noqa: BLE001 - the consumer must learn why the stream stopped
        batches.put((False, _portable_error(error)))


class _ProcessBatchStream:
    """Iterator over batches made by ``_produce_batches`` in a daemon process."""

    def __init__(self, generator, random, max_queue_size):
        import multiprocessing

        context = multiprocessing.get_context()
        self.batches = context.Queue(max(1, max_queue_size))
        seed = int(np.random.randint(2**31))  # drawn here so np.random.seed in the caller still counts
        self.process = context.Process(
            target=_produce_batches, args=(generator, random, self.batches, seed), daemon=True
        )
        self.process.start()

    def __next__(self):
        while True:
            try:
                ok, payload = self.batches.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(
                        f"to_pydataset: the batch process died (exit code {self.process.exitcode})"
                    ) from None
        if not ok:
            _raise_worker_error(*payload)
        return payload

    def close(self):
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()
        self.batches.close()
        self.batches.cancel_join_thread()


def _map_batch(fn, *batches):
    """Applies ``fn`` leaf by leaf to batches of the same (tuple / list / dict) structure."""
    first = batches[0]
    if isinstance(first, dict):
        return {key: _map_batch(fn, *(b[key] for b in batches)) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_map_batch(fn, *parts) for parts in zip(*batches))
    return fn(*batches)


def _merged_shape(array, shape):
    """Per dimension: the common size, or None where they differ (as Keras infers a signature)."""
    if shape is None or np.ndim(array) != len(shape):
        return None  # ranks differ: Keras refuses such batches itself, with its own message
    return tuple(a if a == b else None for a, b in zip(np.shape(array), shape))


def _pad_to_signature(array, signature):
    """Zero-pads the sequence dimensions that Keras fixed from its first batches (batch axis excluded)."""
    array = np.asarray(array)
    if signature is None or array.ndim != len(signature):
        return array
    pad_width = [(0, 0)]
    for axis, (size, fixed) in enumerate(zip(array.shape[1:], signature[1:]), 1):
        if fixed is None or size == fixed:
            pad_width.append((0, 0))
        elif size < fixed:
            pad_width.append((0, fixed - size))
        else:
            raise ValueError(
                f"to_pydataset: a batch has size {size} on axis {axis}, but Keras fixed that axis to "
                f"{fixed} from the first batches it read. Pad that axis to a fixed length, or use "
                "to_dataset(types, shapes) to declare the shapes."
            )
    return np.pad(array, pad_width) if any(after for _, after in pad_width) else array


def _in_keras_worker_thread():
    """Whether this thread is one of a Keras PyDataset enqueuer's workers (a thread pool's)."""
    return isinstance(threading.current_thread(), multiprocessing.dummy.DummyProcess)


@functools.cache
def _pydataset_class():
    """Defined on first use so that importing this module does not import Keras."""
    import keras

    class DataGeneratorPyDataset(keras.utils.PyDataset):
        """Serves a DataGenerator's endless ``forfit`` stream to Keras, ``len(generator)`` batches an epoch.

        On TensorFlow, Keras reads the first batches before the first epoch ("peeks") to infer the
        dataset's signature, fixing every dimension that happens to be equal in them. Two things follow:
        - the peeked batches are handed out again first in the epoch, so an epoch is one pass and
          predict() keeps the data's order;
        - a later batch padded shorter along a dimension Keras fixed (for example no text in it reaches
          ``maxlen``) is zero-padded up to that size instead of failing the epoch.
        With ``workers > 1``, Keras starts its worker threads (a ``multiprocessing.dummy`` pool) just
        before it calls ``on_epoch_begin``; their reads are epoch reads whenever they come, as only the
        thread that runs fit peeks.
        """

        def __init__(self, generator, random, workers, use_multiprocessing, max_queue_size):
            # Keras's own processes would each copy the generator and repeat its batches; ours is one.
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max_queue_size)
            self.generator = generator
            self.random = random
            self.steps = generator.steps
            self._make_stream = (
                functools.partial(_ProcessBatchStream, generator, random, max_queue_size)
                if use_multiprocessing
                else functools.partial(generator._passes, random, shapes_apart=random)
            )
            self._stream = None
            self._lock = threading.Lock()
            self._within_epoch = False
            self._peeked = collections.deque()
            self._signature = None  # leaf by leaf, the shape Keras inferred from the batches it peeked at
            self._next_peek_is_new = True  # a peek after an epoch began comes from a new Keras adapter

        @property
        def num_batches(self):
            return self.steps  # None: endless, and fit needs steps_per_epoch

        def __getitem__(self, index):
            with self._lock:
                if not self._within_epoch and not _in_keras_worker_thread():
                    return self._peek()
                batch = self._peeked.popleft() if self._peeked else self._next_batch()
                if self._signature is not None:
                    batch = _map_batch(_pad_to_signature, batch, self._signature)
                return batch

        def _peek(self):
            batch = self._next_batch()
            self._peeked.append(batch)
            if self._next_peek_is_new:
                self._signature = _map_batch(np.shape, batch)
                self._next_peek_is_new = False
            else:
                self._signature = _map_batch(_merged_shape, batch, self._signature)
            return batch

        def __iter__(self):
            # A plain loop over the dataset reads the stream directly, with nothing kept for later.
            for _ in range(self.steps) if self.steps is not None else itertools.count():
                with self._lock:
                    batch = self._peeked.popleft() if self._peeked else self._next_batch()
                yield batch

        def _next_batch(self):
            if self._stream is None:
                self._stream = self._make_stream()
            return next(self._stream)

        def on_epoch_begin(self):
            self._within_epoch = True
            self._next_peek_is_new = True

        def on_epoch_end(self):
            self._within_epoch = False

        def close(self):
            """Stops the background batch process, if any."""
            stream = getattr(self, "_stream", None)  # __init__ may have failed before setting it
            if isinstance(stream, _ProcessBatchStream):
                stream.close()
            self._stream = None

        def __del__(self):
            self.close()

    DataGeneratorPyDataset.__qualname__ = "DataGeneratorPyDataset"  # found by pickle via __getattr__
    DataGeneratorPyDataset.__module__ = __name__
    return DataGeneratorPyDataset


def __getattr__(name):
    # DataGeneratorPyDataset subclasses keras.utils.PyDataset: built when first asked for, keeping
    # this module free of Keras (and findable by pickle, which looks the class up here).
    if name == "DataGeneratorPyDataset":
        return _pydataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
