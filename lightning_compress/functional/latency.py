"""Measured CPU latency of a model in PyTorch and of an ONNX file in onnxruntime.

Numbers are medians of ``repeats`` timed calls after ``warmup`` untimed ones, with the thread count
stated in the result (latency depends on it more than on anything else on a CPU). A median, not a
mean: one preempted call on a shared machine would move a mean by a lot and a median not at all.

Example::

    >>> import torch
    >>> from torch import nn
    >>> result = torch_latency(nn.Linear(16, 4), torch.zeros(1, 16), batch=8, threads=1, repeats=5)
    >>> sorted(result)
    ['batch', 'median_ms', 'repeats', 'runtime', 'threads']
    >>> result["runtime"], result["batch"], result["threads"]
    ('pytorch', 8, 1)
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["as_batch", "compare_ms", "median_ms", "onnx_latency", "onnx_runner", "torch_latency", "torch_runner"]


def median_ms(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 30) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup`` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}.")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def compare_ms(
    runners: Mapping[str, Callable[[], Any]],
    *,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 30,
    rounds: int = 5,
) -> dict[str, float]:
    """Median milliseconds of each runner, measured **interleaved**: ``rounds`` passes over all runners.

    On a shared machine the load drifts; timing model A fully and then model B would charge the drift
    to one of them. Interleaving spreads it over all, so the ratios stay fair. Each runner gets
    ``warmup`` untimed calls, then ``repeats`` timed calls split over the rounds; a runner that raises
    is reported as ``nan`` after the others finished.

    Args:
        runners: name -> zero-argument callable doing one inference.
        threads: ``torch.set_num_threads`` for the measurement (restored after); ``None`` keeps it.
        warmup: untimed calls per runner.
        repeats: timed calls per runner in total.
        rounds: interleaved passes.
    """
    before = torch.get_num_threads()
    per_round = max(1, math.ceil(repeats / rounds))
    times: dict[str, list[float]] = {name: [] for name in runners}
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            for fn in runners.values():
                for _ in range(warmup):
                    fn()
            order = list(runners.items())
            for r in range(rounds):
                # Rotate who goes first: caches and allocator state favour a position, not a model.
                for name, fn in order[r % len(order) :] + order[: r % len(order)]:
                    for _ in range(per_round):
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def torch_runner(model: nn.Module, sample: Any, batch: int = 1) -> Callable[[], Any]:
    """A zero-argument callable running ``model`` (put in eval mode) on ``batch`` copies of ``sample``."""
    args, kwargs = _call_args(as_batch(sample, batch))
    model.eval()
    return lambda: model(*args, **kwargs)


def onnx_runner(path: str | os.PathLike[str], sample: Any, batch: int = 1, threads: int = 1) -> Callable[[], Any]:
    """A zero-argument callable running the ONNX file in onnxruntime (CPU, ``threads`` intra-op threads).

    Raises:
        ValueError: the graph has a different number of inputs than ``sample`` has tensors.
    """
    import onnxruntime as ort  # the [onnx] extra

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    args, kwargs = _call_args(as_batch(sample, batch))
    tensors: Sequence[Any] = [*args, *kwargs.values()]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise ValueError(f"{os.fspath(path)!r} has inputs {names}, the example input has {len(tensors)} tensors.")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
    return lambda: session.run(None, feed)


def as_batch(sample: Any, batch: int) -> Any:
    """``sample`` (one example, first dimension 1) repeated to ``batch`` rows; nested tuples/lists/dicts kept.

    Tensors whose first dimension is not 1 are left as they are (they are not batched inputs).
    """
    if isinstance(sample, torch.Tensor):
        if sample.dim() == 0 or sample.shape[0] != 1:
            return sample
        return sample.expand(batch, *sample.shape[1:]).contiguous()
    if isinstance(sample, Mapping):
        return {k: as_batch(v, batch) for k, v in sample.items()}
    if isinstance(sample, list | tuple):
        return type(sample)(as_batch(v, batch) for v in sample)
    return sample


def _call_args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def torch_latency(
    model: nn.Module,
    sample: Any,
    *,
    batch: int = 1,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 30,
) -> dict[str, Any]:
    """Median latency of one eager forward of ``model`` (eval mode, no grad) on ``batch`` copies of ``sample``.

    Args:
        model: the module; it is put in eval mode for the measurement and its mode restored after.
        sample: one example input with first dimension 1: a tensor, a tuple of positional inputs or a
            dict of keyword inputs.
        batch: rows per call.
        threads: intra-op threads for the measurement (``torch.set_num_threads``, restored after);
            ``None`` keeps the current setting.
        warmup: untimed calls first.
        repeats: timed calls.

    Returns:
        ``{"runtime": "pytorch", "median_ms", "batch", "threads", "repeats"}``.
    """
    args, kwargs = _call_args(as_batch(sample, batch))
    before = torch.get_num_threads()
    was_training = model.training
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.eval()
        with torch.inference_mode():
            ms = median_ms(lambda: model(*args, **kwargs), warmup=warmup, repeats=repeats)
    finally:
        torch.set_num_threads(before)
        model.train(was_training)
    return {
        "runtime": "pytorch",
        "median_ms": ms,
        "batch": batch,
        "threads": threads or before,
        "repeats": repeats,
    }


def onnx_latency(
    path: str | os.PathLike[str],
    sample: Any,
    *,
    batch: int = 1,
    threads: int = 1,
    warmup: int = 3,
    repeats: int = 30,
) -> dict[str, Any]:
    """Median latency of one onnxruntime ``run`` of the ONNX file ``path`` (CPU provider, all graph optimizations).

    The inputs are ``sample``'s tensors in order (positional ones, then keyword ones), repeated to
    ``batch`` rows, fed to the graph's inputs in their declared order.

    Args:
        path: the ``.onnx`` file.
        sample: one example input (see :func:`torch_latency`).
        batch: rows per call (the file needs a dynamic batch dimension for ``batch > 1``).
        threads: onnxruntime intra-op threads (inter-op: 1).
        warmup: untimed calls first.
        repeats: timed calls.

    Returns:
        ``{"runtime": "onnxruntime", "median_ms", "batch", "threads", "repeats"}``.

    Raises:
        ValueError: the graph has a different number of inputs than ``sample`` has tensors.
    """
    run = onnx_runner(path, sample, batch, threads)
    ms = median_ms(run, warmup=warmup, repeats=repeats)
    return {"runtime": "onnxruntime", "median_ms": ms, "batch": batch, "threads": threads, "repeats": repeats}
