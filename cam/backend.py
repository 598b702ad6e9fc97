"""Everything in cam that differs between Keras backends, and nothing else.

cam runs on Keras 3's TensorFlow, JAX and PyTorch backends (``KERAS_BACKEND``). The methods
are written with ``keras.ops`` and NumPy; only two things need the backend itself:

* :func:`compiled`: a function that runs layers (the trunk, the head, a batch of ablated
  activations scored through the head) compiled for the backend: ``tf.function`` on
  TensorFlow; ``jax.jit`` on JAX, with the model's weights passed in as arguments through
  ``keras.StatelessScope`` rather than baked into the compiled program as constants (a
  later change of the weights is seen, and the program does not hold a copy of them); on
  PyTorch the function runs eagerly under ``torch.no_grad``, or through ``torch.compile``
  when ``CAM_TORCH_COMPILE=1``.
* :func:`gradient`: the same for a function that returns per-image scores, returning the
  gradient of their sum with respect to its first argument (``tf.GradientTape``,
  ``jax.value_and_grad``, ``torch.autograd.grad``). Images in a batch do not interact in
  inference, so that is each image's own gradient.

Both return a :class:`Compiled` callable; :func:`tensor` and :func:`numpy` move arrays in
and out. TensorFlow is imported only when it is the backend.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np

#: The Keras backends cam runs on, and how to install each (with cam itself).
BACKENDS = {
    "tensorflow": 'pip install "cam[tensorflow]"',
    "jax": 'pip install "cam[jax]"',
    "torch": 'pip install "cam[torch]"',
}


def how_to_choose() -> str:
    return ("cam runs on Keras' " + ", ".join(repr(b) for b in BACKENDS) + " backends; set "
            "KERAS_BACKEND to one of them before importing keras, and install it with "
            + "; ".join(f"{b}: {cmd}" for b, cmd in BACKENDS.items()))


try:
    import keras
except ImportError as error:  # Keras imports its backend at once: it may not be installed
    raise ImportError(f"Keras could not load its backend "
                      f"({os.environ.get('KERAS_BACKEND', 'tensorflow, the default')}): "
                      f"{error}. {how_to_choose()}") from error


def name() -> str:
    """The Keras backend in use; a clear error when cam cannot run on it."""
    backend = keras.backend.backend()
    if backend not in BACKENDS:
        raise RuntimeError(f"Keras' backend is {backend!r}, which cam does not support. "
                           + how_to_choose())
    return backend


name()  # at import: a backend cam does not run on fails here, before any model is built


def tensor(array, dtype=None):
    """A backend tensor (on the backend's default device) from a NumPy array or number."""
    return keras.ops.convert_to_tensor(array, dtype=dtype)


def numpy(value) -> np.ndarray:
    """A backend tensor (or a NumPy array) as a NumPy array."""
    backend = name()
    if backend == "torch" and hasattr(value, "detach"):
        value = value.detach()
    if backend == "jax":
        import jax

        return np.asarray(jax.device_get(value))  # an explicit transfer (jax.transfer_guard)
    return keras.ops.convert_to_numpy(value)


def to_host(*tensors) -> list[np.ndarray]:
    """Several device tensors as NumPy arrays in one device-to-host copy: each is flattened
    to float32 and joined on the device, copied once, and cut apart again on the host.
    Integers (class indices) come back as int64; float32 holds them exactly below 2**24."""
    shapes = [tuple(keras.ops.shape(t)) for t in tensors]
    dtypes = [keras.backend.standardize_dtype(t.dtype) for t in tensors]
    flat = keras.ops.concatenate([keras.ops.reshape(keras.ops.cast(t, "float32"), (-1,))
                                  for t in tensors])
    joined = numpy(flat)
    out, start = [], 0
    for shape, dtype in zip(shapes, dtypes):
        size = int(np.prod(shape))
        part = joined[start:start + size].reshape(shape)
        out.append(part.astype(np.int64) if "int" in dtype else part)
        start += size
    return out


def accelerator_free_bytes() -> int | None:
    """Free memory of the device Keras computes on, in bytes; None on the CPU (or where the
    backend does not say)."""
    backend = name()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "cpu":
            return None
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info()[0])
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(
        tf.config.list_physical_devices("GPU")[0])
    used = tf.config.experimental.get_memory_info("GPU:0")["current"]
    total = details.get("memory_limit") or 16 * 2**30  # TensorFlow may not report the total
    return int(max(total - used, 0))


#: Whether TF32 (10-bit mantissa) matmuls and convolutions are allowed; see :func:`allow_tf32`.
_PRECISION = {"tf32": False}


@contextlib.contextmanager
def allow_tf32(allow: bool = True):
    """Within this context, cam's compiled functions may run float32 matmuls and convolutions
    as TF32 on a GPU that has it (NVIDIA Ampere and later): faster, with about three decimal
    digits per product. Outside it (the default) they run at full float32 precision, so maps
    computed on a GPU equal the CPU's to about 1e-6 of the map (measured on an H200 with JAX:
    TF32 or JAX's default bfloat16 passes moved them by up to 9e-3). No effect on the CPU."""
    before = _PRECISION["tf32"]
    _PRECISION["tf32"] = bool(allow)
    try:
        yield
    finally:
        _PRECISION["tf32"] = before


def tf32_allowed() -> bool:
    return _PRECISION["tf32"]


@contextlib.contextmanager
def _precision():
    """The matmul and convolution precision of one compiled call, per :func:`allow_tf32`."""
    fast = _PRECISION["tf32"]
    backend = name()
    if backend == "jax":
        import jax

        with jax.default_matmul_precision("tensorfloat32" if fast else "highest"):
            yield
    elif backend == "torch":
        import torch

        before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = fast
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    elif not _tf_gpu():
        yield  # TF32 is a GPU format: nothing to set on the CPU
    else:
        import tensorflow as tf

        before = tf.config.experimental.tensor_float_32_execution_enabled()
        tf.config.experimental.enable_tensor_float_32_execution(fast)
        try:
            yield
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(before)


_TF_GPU: list = []


def _tf_gpu() -> bool:
    if not _TF_GPU:
        import tensorflow as tf

        _TF_GPU.append(bool(tf.config.list_physical_devices("GPU")))
    return _TF_GPU[0]


class Compiled:
    """A compiled function of backend tensors. ``traces`` counts how often it was traced
    (compiled anew for new shapes or dtypes); None on PyTorch without ``torch.compile``,
    which runs eagerly and traces nothing. ``calls`` counts the calls, which the tests use to
    pin how work is batched."""

    def __init__(self, call: Callable, traces: Callable[[], int | None], backend: str):
        self._call, self._traces, self.backend = call, traces, backend
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        with _precision():
            return self._call(*args)

    @property
    def traces(self) -> int | None:
        return self._traces()

    def __repr__(self) -> str:
        return f"Compiled(backend={self.backend!r}, traces={self.traces})"


def _variables(variables) -> list:
    return list(variables) if variables is not None else []


def compiled(fn: Callable, variables: Sequence = None, fuse: bool = False) -> Compiled:
    """``fn`` (backend tensors in, a tensor or a nested structure of tensors out) compiled for
    the backend. ``variables``: the Keras variables ``fn`` reads (a model's ``variables``);
    JAX passes their current values in as arguments on every call.

    ``fuse=True`` asks for a fusing compiler where the backend has one as an option: XLA on
    TensorFlow (``jit_compile=True``; JAX always compiles with XLA). It pays for small
    functions that are mostly elementwise work and reductions, such as masking a batch of
    activations and pooling them, which XLA compiles into fewer, fused kernels. A function
    XLA cannot compile (an operation it lacks) runs through plain ``tf.function`` instead,
    with a warning naming the error."""
    return _build(fn, _variables(variables), grad=False, fuse=fuse)


def gradient(fn: Callable, variables: Sequence = None) -> Compiled:
    """``fn(x, *args) -> (y, aux)`` with y of shape (B,) becomes a compiled
    ``(x, *args) -> (aux, d sum(y) / dx)``."""
    return _build(fn, _variables(variables), grad=True)


def _build(fn, variables, grad, fuse=False):
    backend = name()
    if backend == "tensorflow":
        return _tensorflow(fn, variables, grad, fuse)
    return {"jax": _jax, "torch": _torch}[backend](fn, variables, grad)


def _tensorflow(fn, variables, grad, fuse=False) -> Compiled:
    import tensorflow as tf

    if grad:
        def body(x, *args):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y, aux = fn(x, *args)
            return aux, tape.gradient(y, x)
    else:
        def body(*args):
            return fn(*args)
    # TensorFlow counts retracing per code object, which every ``body`` shares: a partial has
    # none, so each compiled function is counted on its own (no false "excessive retracing"
    # warning when cam builds many functions of one shape).
    function = tf.function(functools.partial(body), reduce_retracing=True)
    if not fuse:
        return Compiled(function, function.experimental_get_tracing_count, "tensorflow")
    fused = tf.function(functools.partial(body), reduce_retracing=True, jit_compile=True)
    state = {"use_xla": True}

    def call(*args):
        if state["use_xla"]:
            try:
                return fused(*args)
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
                out = function(*args)  # a real error in fn raises here, and XLA is kept
                state["use_xla"] = False
                warnings.warn(f"XLA could not compile {getattr(fn, '__name__', fn)!r}, so it "
                              f"runs without fusing ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:200]})", RuntimeWarning,
                              stacklevel=2)
                return out
        return function(*args)

    return Compiled(call, lambda: fused.experimental_get_tracing_count()
                    + function.experimental_get_tracing_count(), "tensorflow")


def _jax(fn, variables, grad) -> Compiled:
    import jax
    import jax.numpy as jnp

    count = [0]

    def body(values, *args):
        count[0] += 1  # runs only while jax traces
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            if not grad:
                return fn(*args)
            x, rest = args[0], args[1:]

            def total(x):
                y, aux = fn(x, *rest)
                return jnp.sum(y), aux

            (_, aux), dx = jax.value_and_grad(total, has_aux=True)(x)
            return aux, dx

    function = jax.jit(body)
    return Compiled(lambda *args: function([v.value for v in variables], *args),
                    lambda: count[0], "jax")


def _torch(fn, variables, grad) -> Compiled:
    import torch

    use_compile = os.environ.get("CAM_TORCH_COMPILE", "") in ("1", "true", "yes")
    count = [0]

    def traced(*args):
        count[0] += 1  # with torch.compile this runs only while dynamo traces
        return fn(*args)

    inner = torch.compile(traced) if use_compile else fn
    if grad:
        def call(x, *args):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                y, aux = inner(x, *args)
                (dx,) = torch.autograd.grad(y.sum(), x)
            return keras.tree.map_structure(lambda t: t.detach(), aux), dx
    else:
        def call(*args):
            with torch.no_grad():
                return inner(*args)
    return Compiled(call, (lambda: count[0]) if use_compile else (lambda: None), "torch")


def take_targets(scores, targets):
    """``scores[i, targets[i]]`` for each row i: (B, classes), (B,) ints -> (B,)."""
    index = keras.ops.expand_dims(keras.ops.cast(targets, "int32"), 1)
    return keras.ops.take_along_axis(scores, index, axis=1)[:, 0]


def repeat_rows(value, n):
    """A (1, ...) tensor broadcast to (n, ...)."""
    shape = keras.ops.shape(value)
    return keras.ops.broadcast_to(value, (n, *shape[1:]))


def concat_numpy(parts: Any) -> np.ndarray:
    """Backend tensors joined on the first axis, as one NumPy array (one copy to the host)."""
    return numpy(keras.ops.concatenate(list(parts), axis=0))


def pad_rows(value, rows: int):
    """``value`` (n, ...) with its last row repeated to make ``rows`` rows (n <= rows)."""
    extra = rows - keras.ops.shape(value)[0]
    if extra == 0:
        return value
    return keras.ops.concatenate([value, repeat_rows(value[-1:], extra)], axis=0)
