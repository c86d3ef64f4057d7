"""Low-rank decomposition of ``nn.Linear`` / ``nn.Conv2d`` (and Hugging Face ``Conv1D``) layers into chains.

Pure torch + tensorly (always inside ``tl.backend_context("pytorch")``: never a global backend switch).
Each decomposed layer becomes a plain ``nn.Sequential`` that any runtime executes as ordinary layers:

- ``"svd"``: truncated SVD. ``Linear(I, O)`` becomes ``Linear(I, r) -> Linear(r, O)``; so does a
  Hugging Face ``Conv1D`` (its ``[in, out]`` weight is factored transposed); a 1x1 ``Conv2d`` becomes
  two 1x1 convs.
- ``"tucker2"``: Tucker-2 over the channel modes (Kim et al. 2016), ``1x1 (I->r_in) -> kxk core
  (r_in->r_out) -> 1x1 (r_out->O)``.
- ``"cp"``: CP / PARAFAC (Lebedev et al. 2015), ``1x1 (I->R) -> kx1 depthwise -> 1xk depthwise
  -> 1x1 (R->O)``, by alternating least squares written for conv kernels (:func:`cp_als`).

Stride, padding (numbers, ``"same"``/``"valid"``), padding mode, dilation and bias carry over
exactly; only ``groups == 1`` layers are decomposable. Ranks come from a fixed rank, a parameter
ratio, an energy threshold, VBMF (Nakajima et al. 2013) or a global budget.

Example::

    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(16, 32, 3, padding=1)
    >>> plan = LayerPlan("tucker2", (32, 16))  # full rank: exact
    >>> chain, error = decompose(conv, plan)
    >>> [type(m).__name__ for m in chain]
    ['Conv2d', 'Conv2d', 'Conv2d']
    >>> x = torch.randn(2, 16, 8, 8)
    >>> torch.allclose(chain(x), conv(x), atol=1e-4)
    True
    >>> ranks_for_ratio(conv, "tucker2", 0.25)
    (12, 6)
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Method = Literal["auto", "svd", "tucker2", "cp"]
METHODS: tuple[str, ...] = ("auto", "svd", "tucker2", "cp")
# "Conv1D" is Hugging Face's transformers.pytorch_utils.Conv1D (GPT-2): a Linear with its weight stored
# [in, out]; recognised by class name so transformers is not imported here.
DECOMPOSABLE_TYPES: tuple[str, ...] = ("Linear", "Conv2d", "Conv1D")

# Above this many entries an exact SVD of a Linear weight gets expensive (a full SVD of a 4096x4096
# matrix takes about a minute on two cores); when the rank is already known, a randomized SVD
# (Halko et al. 2011, `torch.svd_lowrank`) costs O(m n r) and is accurate with a little oversampling.
_EXACT_SVD_MAX_NUMEL = 1024 * 1024


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is decomposed: the method and its ranks.

    ``ranks`` is ``(r,)`` for ``"svd"`` and ``"cp"`` and ``(r_out, r_in)`` for ``"tucker2"``.
    """

    method: str
    ranks: tuple[int, ...]

    def as_dict(self) -> dict[str, object]:
        """Plain, JSON-able form (for checkpoints and reports)."""
        return {"method": self.method, "ranks": list(self.ranks)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> LayerPlan:
        """Inverse of :meth:`as_dict`."""
        return cls(str(data["method"]), tuple(int(r) for r in data["ranks"]))  # type: ignore[union-attr]


@dataclass(frozen=True)
class Geometry:
    """Shape of the data a layer sees: ``n`` = batch (or tokens for a Linear), spatial in/out sizes."""

    n: int = 1
    h_in: int = 1
    w_in: int = 1
    h_out: int = 1
    w_out: int = 1


# ---------------------------------------------------------------------------- layer kinds
def is_conv1d(layer: nn.Module) -> bool:
    """Hugging Face's ``Conv1D``: ``y = x @ W + b`` with ``W`` stored ``[in, out]`` (a transposed Linear)."""
    weight = getattr(layer, "weight", None)
    return type(layer).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2


def is_linear_like(layer: nn.Module) -> bool:
    """An ``nn.Linear`` or a Hugging Face ``Conv1D``: both become a chain of two ``nn.Linear``."""
    return isinstance(layer, nn.Linear) or is_conv1d(layer)


def is_decomposable(layer: nn.Module) -> bool:
    """A layer of a type this module factors (Linear, Hugging Face Conv1D, Conv2d)."""
    return is_linear_like(layer) or isinstance(layer, nn.Conv2d)


def channels(layer: nn.Module) -> tuple[int, int]:
    """``(out, in)`` channels / features of a decomposable layer."""
    o, i, _, _ = _dims(layer)
    return o, i


# ---------------------------------------------------------------------------- method choice
def is_pointwise(layer: nn.Module) -> bool:
    """A 1x1 convolution (a per-pixel Linear)."""
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) == (1, 1)


def resolve_method(layer: nn.Module, method: str) -> str:
    """The concrete method for ``layer``; raise if ``method`` cannot handle its type.

    ``"auto"`` picks SVD for ``Linear`` and 1x1 convs, Tucker-2 for larger kernels. ``"tucker2"`` and
    ``"cp"`` on a 1x1 conv fall back to SVD (for a 1x1 kernel both reduce to a truncated SVD).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}.")
    if is_linear_like(layer):
        if method in ("auto", "svd"):
            return "svd"
        raise ValueError(f"method={method!r} handles Conv2d layers only. HINT: Linear layers take 'svd' or 'auto'.")
    if isinstance(layer, nn.Conv2d):
        if is_pointwise(layer):
            return "svd"
        if method == "auto":
            return "tucker2"
        if method == "svd":
            raise ValueError(
                "method='svd' handles Linear and 1x1 Conv2d layers only. HINT: use 'tucker2', 'cp' or 'auto'."
            )
        return method
    raise ValueError(f"cannot decompose a {type(layer).__name__}; decomposable types are {list(DECOMPOSABLE_TYPES)}.")


def skip_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot be decomposed at all, or ``None``."""
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return f"grouped conv (groups={layer.groups}): only groups=1 is decomposable"
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros" and isinstance(layer.padding, str):
        return "string padding with a non-zero padding_mode"
    if min(_dims(layer)[:2]) < 2:
        return "a single input or output channel has nothing to factor"
    return None


def _dims(layer: nn.Module) -> tuple[int, int, int, int]:
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features, 1, 1
    w = layer.weight
    if is_conv1d(layer):
        return int(w.shape[1]), int(w.shape[0]), 1, 1
    return int(w.shape[0]), int(w.shape[1]), int(w.shape[2]), int(w.shape[3])


def max_ranks(layer: nn.Module, method: str) -> tuple[int, ...]:
    """Largest meaningful ranks of ``method`` on ``layer``."""
    o, i, kh, kw = _dims(layer)
    if method == "svd":
        return (min(o, i),)
    if method == "tucker2":
        return (o, i)
    dims = sorted((o, i, kh, kw))
    return (dims[0] * dims[1] * dims[2],)  # generic upper bound of a 4-way CP rank


# ---------------------------------------------------------------------------- costs
def params_of(layer: nn.Module, plan: LayerPlan | None) -> int:
    """Parameters of ``layer`` (``plan=None``) or of its decomposition (bias included)."""
    o, i, kh, kw = _dims(layer)
    bias = o if getattr(layer, "bias", None) is not None else 0
    if plan is None:
        return o * i * kh * kw + bias  # the weight's own shape: already per group
    if plan.method == "svd":
        (r,) = plan.ranks
        return r * (i + o) + bias
    if plan.method == "tucker2":
        r_out, r_in = plan.ranks
        return i * r_in + r_in * r_out * kh * kw + r_out * o + bias
    (r,) = plan.ranks
    return r * (i + kh + kw + o) + bias


def macs_of(layer: nn.Module, plan: LayerPlan | None, geometry: Geometry) -> int:
    """Multiply-accumulates of one forward pass of ``layer`` or its decomposition."""
    o, i, kh, kw = _dims(layer)
    g = geometry
    out_px = g.n * g.h_out * g.w_out
    if plan is None:
        return o * i * kh * kw * out_px
    if plan.method == "svd":
        (r,) = plan.ranks
        return r * (i + o) * out_px  # stride/padding sit on the first 1x1: both run at output resolution
    if plan.method == "tucker2":
        r_out, r_in = plan.ranks
        return i * r_in * g.n * g.h_in * g.w_in + (r_in * r_out * kh * kw + r_out * o) * out_px
    (r,) = plan.ranks
    return r * i * g.n * g.h_in * g.w_in + r * kh * g.n * g.h_out * g.w_in + r * (kw + o) * out_px


# tensorly's HOOI (Tucker-2) stops on `tol` well before `n_iter_max`: 8-13 sweeps measured on random
# 64..512-channel 3x3 kernels at rank=0.25 with tol=1e-4. CP-ALS on conv kernels at these ranks runs to
# n_iter_max (its error still falls by more than 1e-4 per sweep), so it is counted in full.
_TYPICAL_HOOI_SWEEPS = 10


def _svd_flops(rows: int, cols: int) -> float:
    # LAPACK thin SVD with vectors, m = the shorter side: ~4 m^2 n + 8 m^3 (Golub & Van Loan).
    m, n = min(rows, cols), max(rows, cols)
    return 4.0 * m * m * n + 8.0 * m**3


def factorization_flops(layer: nn.Module, plan: LayerPlan, n_iter_max: int = 25) -> tuple[float, float]:
    """Estimated floating-point operations of :func:`decompose`: ``(matrix products, LAPACK)``.

    A cost model, not a measurement: matrix products (GEMM, float64 ones counted twice) and LAPACK
    factorizations / solves are returned apart because they run at very different speeds (and thread
    counts) on a CPU. CP counts all ``n_iter_max`` ALS sweeps, Tucker-2 a typical number of HOOI
    sweeps (it usually stops on ``tol`` earlier). Used to estimate the wall time before starting.
    """
    o, i, kh, kw = _dims(layer)
    numel = float(o * i * kh * kw)
    if plan.method == "svd":
        (r,) = plan.ranks
        if o * i > _EXACT_SVD_MAX_NUMEL and r * 4 <= min(o, i):
            return 2.0 * numel * (r + 10) * 6, _svd_flops(max(o, i), r + 10)  # randomized: 6 passes
        return 2.0 * numel * r, _svd_flops(o, i)
    if plan.method == "tucker2":
        r_out, r_in = plan.ranks
        k2 = kh * kw
        init_gemm = 2.0 * numel * (o + i) * 2 + 2.0 * numel * (r_out + r_in) * 2  # float64 Grams and V
        init_lapack = 9.0 * (o**3 + i**3)  # eigh
        sweeps = min(n_iter_max, _TYPICAL_HOOI_SWEEPS)
        sweep_gemm = 2.0 * numel * (2 * r_in + r_out) + 2.0 * r_in * o * k2 * r_out
        sweep_lapack = _svd_flops(o, r_in * k2) + _svd_flops(i, r_out * k2)
        return init_gemm + sweeps * sweep_gemm, init_lapack + sweeps * sweep_lapack
    (r,) = plan.ranks
    dims = (o, i, kh, kw)
    init_gemm = init_lapack = 0.0
    for d in dims:
        rest = numel / d
        if d <= rest:
            init_gemm += 2.0 * d * d * rest * 2
            init_lapack += 9.0 * d**3
        else:
            init_lapack += _svd_flops(d, int(rest))
    # Per sweep: the two large products (2 * numel * r each), the mode-by-mode contractions of the second
    # one, the Gram matrices; LAPACK: one float64 solve of an r x r system per mode.
    sweep_gemm = 4.0 * numel * r + 6.0 * r * numel / o + 2.0 * r * r * sum(dims)
    sweep_lapack = len(dims) * (2.0 / 3.0 * r**3 + 2.0 * r * r * sum(dims) / len(dims)) * 2
    return init_gemm + n_iter_max * sweep_gemm + 2.0 * numel * r, init_lapack + n_iter_max * sweep_lapack


def measure_throughput(num_threads: int | None = None) -> tuple[float, float]:
    """Measured FLOP/s of this machine now: ``(float32 matrix product on num_threads threads, LAPACK SVD on one)``.

    Best of five short runs each (about 0.1 s in all): the fastest run is the least disturbed by other
    processes, and :func:`factorization_flops` divided by these rates estimates a decomposition's time.
    """
    import time

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 2304, generator=g), torch.randn(2304, 256, generator=g)
    wide = torch.randn(192, 576, generator=g)

    def best(fn: Callable[[], object]) -> float:
        seconds = math.inf
        for _ in range(5):
            start = time.perf_counter()
            fn()
            seconds = min(seconds, time.perf_counter() - start)
        return max(seconds, 1e-9)

    with torch.no_grad():
        with threads(num_threads):
            gemm = 2.0 * 256 * 2304 * 256 / best(lambda: a @ b)
        with single_thread():
            lapack = _svd_flops(192, 576) / best(lambda: torch.linalg.svd(wide, full_matrices=False))
    return gemm, lapack


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Run torch ops on ``count`` threads (``None``: leave the setting alone), restoring the setting after."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def factorization_threads(requested: int | None = None) -> tuple[int, str | None]:
    """Threads for CP's matrix products, and why fewer than ``torch.get_num_threads()`` when so.

    ``requested`` (an int) is used as given. ``None``: ``torch.get_num_threads()``, capped by the cores
    that other processes leave free right now (:func:`_busy_elsewhere`; at least 1). Threads that wait
    on each other lose badly when other processes hold the cores: measured on two cores at a load
    average of 5, ten ALS sweeps of a 512x512x3x3 kernel at rank 572 took 1.8 s on one thread and
    6.2 s on two, and the CP of a whole ResNet-18-sized model 43 s vs 127 s.

    Returns:
        The thread count and, when other processes capped it, a sentence saying so (for the progress log).
    """
    wanted = torch.get_num_threads()
    if requested is not None:
        return int(requested), None
    busy = _busy_elsewhere()
    if busy is None:
        return wanted, None
    cores = os.cpu_count() or 1  # system-wide, like the counts of runnable threads
    free = max(1, round(cores - busy))
    if free >= wanted:
        return wanted, None
    return free, (
        f"{free} of {wanted} threads: {busy:g} threads of other processes running on {cores} cores "
        "(pass num_threads to choose)"
    )


def _busy_elsewhere() -> float | None:
    """Threads of other processes running now: median of 10 reads of ``/proc/loadavg`` over ~0.1 s.

    The 4th field counts the runnable threads of the whole system, this one included (subtracted).
    The instantaneous count rather than the 1-minute load average, which still holds this process's
    own training threads at fit end. ``None`` where ``/proc/loadavg`` does not exist (not Linux).
    """
    import statistics
    import time

    samples = []
    try:
        for _ in range(10):
            with open("/proc/loadavg") as f:
                samples.append(int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(0.01)
    except (OSError, ValueError, IndexError):
        return None
    return float(statistics.median(samples))


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run LAPACK work on one thread, restoring the setting after.

    The factorizations here are many small SVD / eigh / solve calls: measured on two cores, threaded
    LAPACK was ~2x slower than one thread when idle and up to 100x slower when other processes share
    the cores (OpenMP workers spin-waiting; a 572x572 solve: 0.023 s on one thread, 0.11 s on two),
    while one thread is steady. Matrix products (GEMM) do gain from threads and run outside this.
    """
    with threads(1):
        yield


# ---------------------------------------------------------------------------- spectra and ranks
def _weight(layer: nn.Module) -> torch.Tensor:
    # SVD refuses fp16/bf16 (upcast; float64 stays float64) and factors of a requires_grad weight would
    # keep requiring grad (detach).
    w = layer.weight.detach()
    if is_conv1d(layer):
        w = w.T  # [in, out] -> [out, in], the Linear layout every factorization here assumes
    return w if w.dtype in (torch.float32, torch.float64) else w.to(torch.float32)


@single_thread()
def spectra(layer: nn.Module, method: str) -> list[torch.Tensor]:
    """Singular values that rank selection looks at, one vector per decomposed mode.

    ``"svd"``: the weight as an ``O x I`` matrix. ``"tucker2"``: the mode-0 (output) and mode-1
    (input) unfoldings, as in Kim et al. 2016. ``"cp"``: the larger of the two, CP having one rank.
    """
    w = _weight(layer)
    o, i = w.shape[0], w.shape[1]
    if method == "svd":
        return [singular_values(w.reshape(o, i))]
    s_out = singular_values(w.reshape(o, -1))
    s_in = singular_values(w.transpose(0, 1).reshape(i, -1))
    if method == "tucker2":
        return [s_out, s_in]
    return [s_out if len(s_out) >= len(s_in) else s_in]


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values, descending, from the eigenvalues of the smaller Gram matrix (in float64).

    A conv kernel's unfoldings are very wide (``O x I*k*k``), where LAPACK's SVD is slow (about 6 s
    for 512 x 4608 on two cores) while ``eigvalsh`` of the 512 x 512 Gram matrix takes ~0.2 s; float64
    keeps the squared condition number harmless.
    """
    m = matrix.detach().double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt().flip(0)


def gram_svd(
    matrix: torch.Tensor, n_eigenvecs: int | None = None, **kwargs: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD; for a wide matrix through an eigendecomposition of its Gram matrix (float64 inside).

    Same contract as tensorly's SVD functions (``U[:, :n]``, ``S[:n]``, ``V[:n, :]``), passed to
    ``partial_tucker`` / ``parafac`` as ``svd=``: their SVD initialisation and every HOOI step take
    the leading left singular vectors of wide unfoldings, where this is 10-30x faster than LAPACK's
    SVD. ``U`` is always orthonormal (eigenvectors); rows of ``V`` for zero singular values are ~0.
    The Gram product runs on the caller's threads, the LAPACK calls on one (:func:`single_thread`).
    """
    rows, cols = matrix.shape
    n = min(rows, cols) if n_eigenvecs is None else min(int(n_eigenvecs), rows, cols)
    if rows > cols:  # tall: LAPACK is fast here
        with single_thread():
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :n], s[:n], vh[:n]
    m = matrix.double()
    gram = m @ m.T  # a matrix product: runs on the caller's threads
    with single_thread():
        values, vectors = torch.linalg.eigh(gram)
    s = values.flip(0)[:n].clamp_min(0.0).sqrt()
    u = vectors.flip(1)[:, :n]
    v = (u.T @ m) / torch.where(s > 0, s, torch.ones_like(s))[:, None]
    return u.to(matrix.dtype), s.to(matrix.dtype), v.to(matrix.dtype)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` of the squared sum (at least 1).

    Example::

        >>> energy_rank(torch.tensor([3.0, 2.0, 1.0]), 0.9)
        2
    """
    power = singular_values.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    return max(
        1,
        min(
            len(power),
            int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1,
        ),
    )


def ranks_for_energy(layer: nn.Module, method: str, energy: float) -> tuple[int, ...]:
    """Ranks that keep ``energy`` of each mode's spectral energy."""
    return tuple(energy_rank(s, energy) for s in spectra(layer, method))


def ranks_for_ratio(layer: nn.Module, method: str, ratio: float) -> tuple[int, ...]:
    """Ranks whose decomposition holds about ``ratio`` of the layer's parameters (at least rank 1).

    Tucker-2 keeps the output/input rank proportional to the channel counts.
    """
    o, i, kh, kw = _dims(layer)
    target = ratio * o * i * kh * kw
    if method == "svd":
        return (max(1, min(min(o, i), int(target // (o + i)))),)
    if method == "cp":
        return (max(1, min(max_ranks(layer, "cp")[0], int(target // (o + i + kh + kw)))),)
    # i*a*i + (a*o)(a*i)*k + a*o*o = target, solved for the fraction a of each channel count.
    quad, lin = o * i * kh * kw, i * i + o * o
    a = (-lin + math.sqrt(lin * lin + 4 * quad * target)) / (2 * quad)
    return (max(1, min(o, int(a * o))), max(1, min(i, int(a * i))))


@single_thread()
def vbmf_rank(matrix: torch.Tensor) -> int:
    """Rank of a matrix by empirical variational Bayesian matrix factorization (EVBMF).

    Implements the global analytic solution of Nakajima, Sugiyama, Babacan & Tomioka (JMLR 2013,
    "Global analytic solution of fully-observed variational Bayesian matrix factorization") with the
    noise variance estimated too. With ``L <= M`` the matrix sides, ``alpha = L / M`` and the
    normalised squared singular values ``x_h = gamma_h^2 / (M sigma^2)``, the free energy as a function
    of the noise variance is, up to constants,

    ``sum_h psi(x_h)``, ``psi(x) = x - log x + [x > x_thr] * psi1(x)``,
    ``psi1(x) = log(tau + 1) + alpha * log(tau / alpha + 1) - tau``,
    ``tau(x) = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2``,

    and a component survives iff ``x_h > x_thr = (1 + tau_thr)(1 + alpha / tau_thr)`` where ``tau_thr``
    is the positive root of ``log(tau + 1) + alpha * log(tau / alpha + 1) - tau`` (2.5129 for alpha=1).
    The noise variance minimising the free energy is found by a log-spaced search then a golden-section
    refinement; the rank is the number of surviving components.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> signal = torch.randn(60, 5, generator=g) @ torch.randn(5, 80, generator=g)
        >>> vbmf_rank(signal + 0.1 * torch.randn(60, 80, generator=g))
        5
    """
    m = matrix.detach().double()
    if m.shape[0] > m.shape[1]:
        m = m.T
    L, M = m.shape
    s2 = singular_values(m) ** 2
    if float(s2.sum()) == 0.0:
        return 1
    alpha = L / M
    tau_thr = _tau_threshold(alpha)
    x_thr = (1 + tau_thr) * (1 + alpha / tau_thr)

    def free_energy(sigma2: torch.Tensor) -> torch.Tensor:  # sigma2: [K] -> [K]
        x = s2[None, :] / (M * sigma2[:, None])
        base = x - torch.log(x)
        d = x - (1 + alpha)
        tau = 0.5 * (d + torch.sqrt(torch.clamp(d * d - 4 * alpha, min=0.0)))
        extra = torch.log(tau + 1) + alpha * torch.log(tau / alpha + 1) - tau
        return (base + torch.where(x > x_thr, extra, torch.zeros_like(x))).sum(1)

    # sigma^2 lies between "every value is noise" (mean power) and a floor where the smallest singular
    # value alone would already be signal.
    upper = float(s2.sum()) / (L * M)
    lower = max(float(s2[-1]) / (M * x_thr), upper * 1e-8)
    grid = torch.logspace(math.log10(lower), math.log10(upper), 256, dtype=torch.float64)
    best = int(torch.argmin(free_energy(grid)))
    lo, hi = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, len(grid) - 1)])
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        fa, fb = free_energy(torch.tensor([math.exp(a), math.exp(b)], dtype=torch.float64))
        if fa <= fb:
            hi = b
        else:
            lo = a
    sigma2 = math.exp((lo + hi) / 2)
    return int((s2 / (M * sigma2) > x_thr).sum())


def _tau_threshold(alpha: float) -> float:
    # Positive root of log(tau + 1) + alpha log(tau / alpha + 1) - tau (concave, positive just above 0).
    def f(t: float) -> float:
        return math.log(t + 1) + alpha * math.log(t / alpha + 1) - t

    lo, hi = 1e-9, 10.0 + 10.0 * alpha
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def ranks_for_vbmf(layer: nn.Module, method: str) -> tuple[int, ...]:
    """VBMF ranks of the unfoldings (Kim et al. 2016 use this for Tucker-2); at least 1."""
    w = _weight(layer)
    o, i = w.shape[0], w.shape[1]
    if method == "svd":
        return (max(1, vbmf_rank(w.reshape(o, i))),)
    r_out = max(1, vbmf_rank(w.reshape(o, -1)))
    r_in = max(1, vbmf_rank(w.transpose(0, 1).reshape(i, -1)))
    return (r_out, r_in) if method == "tucker2" else (max(r_out, r_in),)


def allocate_budget(
    layers: Sequence[tuple[nn.Module, str, Geometry]],
    *,
    budget: int,
    fixed: int,
    metric: Literal["params", "flops"] = "params",
    min_reduction: float = 1.0,
) -> list[LayerPlan | None]:
    """Ranks for every layer so the whole model costs at most ``budget`` params (or MACs).

    One global energy threshold is shared by all layers (found by bisection), so every layer keeps the
    same fraction of its spectral energy and layers with fast-decaying spectra give up more ranks.
    ``fixed`` is the cost of everything not decomposed. A layer whose cost would drop by less than
    ``min_reduction`` stays dense (``None``) and counts at full cost.

    Raises:
        ValueError: if even rank 1 everywhere does not fit the budget.
    """
    cumulative = []
    for layer, method, _ in layers:
        cums = []
        for s in spectra(layer, method):
            p = s.double() ** 2
            cums.append(torch.cumsum(p, 0) / max(float(p.sum()), 1e-300))
        cumulative.append(cums)

    def cost(layer: nn.Module, plan: LayerPlan | None, geometry: Geometry) -> int:
        return params_of(layer, plan) if metric == "params" else macs_of(layer, plan, geometry)

    def plans_at(energy: float) -> tuple[list[LayerPlan | None], int]:
        plans: list[LayerPlan | None] = []
        total = fixed
        for (layer, method, geometry), cums in zip(layers, cumulative, strict=True):
            ranks = tuple(
                max(1, min(len(c), int(torch.searchsorted(c, torch.tensor(energy, dtype=torch.float64))) + 1))
                for c in cums
            )
            plan: LayerPlan | None = LayerPlan(method, ranks)
            dense = cost(layer, None, geometry)
            if cost(layer, plan, geometry) * min_reduction > dense:
                plan = None
            plans.append(plan)
            total += dense if plan is None else cost(layer, plan, geometry)
        return plans, total

    plans, total = plans_at(0.0)
    if total > budget:
        raise ValueError(
            f"a budget of {budget} {metric} cannot be met: rank 1 everywhere still costs {total} "
            f"({fixed} outside the decomposed layers). HINT: raise the budget or include more layers."
        )
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if plans_at(mid)[1] <= budget:
            lo = mid
        else:
            hi = mid
    return plans_at(lo)[0]


# ---------------------------------------------------------------------------- CP by alternating least squares
def khatri_rao(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product, rows in the row-major order of ``tensor.reshape(d0, -1)``.

    Row ``(i, j, ...)`` of the result is ``matrices[0][i] * matrices[1][j] * ...`` (element-wise over the
    rank), so ``tensor.reshape(d0, -1) @ khatri_rao([B, C, D])`` is the mode-0 MTTKRP of a 4-way tensor.
    """
    out = matrices[0]
    for m in matrices[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, out.shape[1])
    return out


def cp_als(
    tensor: torch.Tensor, rank: int, *, n_iter_max: int = 25, tol: float = 1e-4, seed: int = 0
) -> tuple[list[torch.Tensor], list[float]]:
    """CP decomposition ``tensor ~ sum_r F0[:, r] o F1[:, r] o ...`` by alternating least squares.

    The same iteration as tensorly's ``parafac(tensor, rank, init="svd", tol=tol)`` (unit weights, modes
    updated in order, stop when the relative error changes by less than ``tol``) and the same
    initialisation (leading left singular vectors of each unfolding, the first scaled by the singular
    values, missing columns drawn uniformly from ``numpy.random.RandomState(seed)``), so it reaches the
    same factors and error; what differs is the cost of one iteration. tensorly forms the Khatri-Rao
    product of all other factors for every mode; for a conv kernel ``O x I x kh x kw`` that matrix has
    ``O*I*kw`` rows for a spatial mode (450M entries for a 512x512x3x3 kernel at rank 572). Here each
    iteration makes two large matrix products, ``W_(0) @ khatri_rao(F1, F2, ...)`` for the first mode and
    ``F0^T @ W_(0)``, whose result is contracted mode by mode (with each factor right after its update)
    for every other mode: ``2 * numel * rank`` multiply-adds per product instead of one per mode over an
    exploded matrix. The error comes from the Gram matrices and the last MTTKRP (no reconstruction).

    Matrix products run on the current torch threads; the small LAPACK solves of the normal equations
    (``rank x rank``, in float64) run on one thread (:func:`single_thread`).

    Args:
        tensor: a real tensor with at least 3 modes (float32 or float64).
        rank: number of rank-one terms.
        n_iter_max: most ALS sweeps.
        tol: stop when the relative error changes by less than this between two sweeps.
        seed: seed of the random columns of the initialisation.

    Returns:
        The factors (``tensor.shape[m] x rank`` each; the scale is carried by the factors, all weights
        are 1) and the relative error ``||T - T_hat|| / ||T||`` after every sweep.

    Raises:
        FloatingPointError: if the iteration produced non-finite factors.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> a, b, c = (torch.randn(n, 2, generator=g, dtype=torch.float64) for n in (6, 5, 4))
        >>> t = torch.einsum("ir,jr,kr->ijk", a, b, c)
        >>> factors, errors = cp_als(t, 2, n_iter_max=200, tol=1e-12)
        >>> errors[-1] < 1e-6
        True
    """
    import numpy as np

    if tensor.dim() < 3:
        raise ValueError(f"cp_als needs a tensor with at least 3 modes, got shape {tuple(tensor.shape)}.")
    dims = tuple(int(d) for d in tensor.shape)
    n_modes = len(dims)
    rng = np.random.RandomState(seed)
    factors = []
    for mode in range(n_modes):
        u, s = _left_singular(torch.movedim(tensor, mode, 0).reshape(dims[mode], -1), rank)
        if mode == 0:
            u = u * s[None, :]  # carry the tensor's scale, as tensorly does without normalisation
        if u.shape[1] < rank:  # a mode shorter than the rank: fill with random columns (tensorly's draw)
            fill = rng.random_sample((dims[mode], rank - u.shape[1]))
            u = torch.cat([u, torch.as_tensor(fill, dtype=tensor.dtype, device=tensor.device)], dim=1)
        factors.append(u)
    w0 = tensor.reshape(dims[0], -1)
    norm2 = float(tensor.double().pow(2).sum())
    grams = [(f.T @ f).double() for f in factors]

    def hadamard_except(skip: int) -> torch.Tensor:
        out = torch.ones_like(grams[0])
        for j, g in enumerate(grams):
            if j != skip:
                out = out * g
        return out

    errors: list[float] = []
    for _ in range(n_iter_max):
        # First mode: the one product with the unfolded tensor and all other factors.
        mttkrp = w0 @ khatri_rao(factors[1:])
        factors[0] = _solve_normal_equations(hadamard_except(0), mttkrp)
        grams[0] = (factors[0].T @ factors[0]).double()
        # Every other mode from one contraction with the new first factor: (rank, d1, d2, ...).
        t = (factors[0].T @ w0).reshape(rank, *dims[1:])
        for k in range(1, n_modes):
            mttkrp = t
            for j in range(n_modes - 1, k, -1):  # contract the trailing modes with their current factors
                mttkrp = (mttkrp * factors[j].T.reshape(rank, *([1] * (mttkrp.dim() - 2)), dims[j])).sum(-1)
            mttkrp = mttkrp.T  # (d_k, rank)
            factors[k] = _solve_normal_equations(hadamard_except(k), mttkrp)
            grams[k] = (factors[k].T @ factors[k]).double()
            if k < n_modes - 1:  # fold the updated factor in for the modes after it
                t = (t * factors[k].T.reshape(rank, dims[k], *([1] * (t.dim() - 2)))).sum(1)
        # ||T - T_hat||^2 = ||T||^2 + ||T_hat||^2 - 2 <T, T_hat>; <T, T_hat> from the last mode's MTTKRP.
        norm_hat2 = float(hadamard_except(-1).sum())
        inner = float((mttkrp.double() * factors[-1].double()).sum())
        errors.append(math.sqrt(abs(norm2 + norm_hat2 - 2 * inner) / max(norm2, 1e-300)))
        if len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    if not all(bool(torch.isfinite(f).all()) for f in factors):
        raise FloatingPointError(
            f"CP-ALS at rank {rank} on a tensor of shape {dims} produced non-finite factors. HINT: a lower rank, "
            "or method='tucker2'."
        )
    return factors, errors


def _left_singular(matrix: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading ``min(n, rows, cols)`` left singular vectors and values (see :func:`gram_svd`; no ``V``)."""
    rows, cols = matrix.shape
    n = min(n, rows, cols)
    if rows > cols:
        with single_thread():
            u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :n], s[:n]
    m = matrix.double()
    gram = m @ m.T
    with single_thread():
        values, vectors = torch.linalg.eigh(gram)
    s = values.flip(0)[:n].clamp_min(0.0).sqrt()
    return vectors.flip(1)[:, :n].to(matrix.dtype), s.to(matrix.dtype)


def _solve_normal_equations(gram: torch.Tensor, mttkrp: torch.Tensor) -> torch.Tensor:
    """``mttkrp @ gram^-1`` (``gram`` symmetric, float64), by a pseudo-inverse when it is singular."""
    rhs = mttkrp.T.double()
    with single_thread():
        solution, info = torch.linalg.solve_ex(gram, rhs)
        if int(info) != 0 or not bool(torch.isfinite(solution).all()):
            # Singular normal equations (a zero or rank-deficient factor): least-squares solution.
            solution = torch.linalg.pinv(gram, hermitian=True) @ rhs
    return solution.T.to(mttkrp.dtype)


# ---------------------------------------------------------------------------- building chains
def _padding_pair(padding: str | tuple[int, ...]) -> tuple[str | tuple[int, int], str | tuple[int, int]]:
    if isinstance(padding, str):
        return padding, padding
    return (padding[0], 0), (0, padding[1])


def build_chain(layer: nn.Module, plan: LayerPlan) -> nn.Sequential:
    """The empty (uninitialised) replacement of ``layer`` for ``plan``: shapes, strides and bias only.

    Used to rebuild a decomposed model's structure before its weights are loaded from a checkpoint.
    """
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    has_bias = getattr(layer, "bias", None) is not None
    o, i, kh, kw = _dims(layer)
    if is_linear_like(layer):
        (r,) = plan.ranks
        return nn.Sequential(nn.Linear(i, r, bias=False, **factory), nn.Linear(r, o, bias=has_bias, **factory))
    conv: nn.Conv2d = layer  # type: ignore[assignment]
    common = {"padding_mode": conv.padding_mode, **factory}
    if plan.method == "svd":
        (r,) = plan.ranks
        return nn.Sequential(
            nn.Conv2d(
                i,
                r,
                1,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                bias=False,
                **common,
            ),
            nn.Conv2d(r, o, 1, bias=has_bias, **factory),
        )
    if plan.method == "tucker2":
        r_out, r_in = plan.ranks
        return nn.Sequential(
            nn.Conv2d(i, r_in, 1, bias=False, **factory),
            nn.Conv2d(
                r_in,
                r_out,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                bias=False,
                **common,
            ),
            nn.Conv2d(r_out, o, 1, bias=has_bias, **factory),
        )
    if plan.method == "cp":
        (r,) = plan.ranks
        return _cp_chain(conv, r, has_bias, factory)
    raise ValueError(f"unknown decomposition method {plan.method!r}; expected one of {list(METHODS[1:])}.")


def _cp_chain(conv: nn.Conv2d, rank: int, has_bias: bool, factory: dict[str, Any]) -> nn.Sequential:
    """``1x1 (I->R) -> kx1 depthwise -> 1xk depthwise -> 1x1 (R->O)``: stride, padding, dilation split by axis."""
    o, i, kh, kw = _dims(conv)
    common = {"padding_mode": conv.padding_mode, **factory}
    pad_h, pad_w = _padding_pair(conv.padding)
    return nn.Sequential(
        nn.Conv2d(i, rank, 1, bias=False, **factory),
        nn.Conv2d(
            rank,
            rank,
            (kh, 1),
            stride=(conv.stride[0], 1),
            padding=pad_h,
            dilation=(conv.dilation[0], 1),
            groups=rank,
            bias=False,
            **common,
        ),
        nn.Conv2d(
            rank,
            rank,
            (1, kw),
            stride=(1, conv.stride[1]),
            padding=pad_w,
            dilation=(1, conv.dilation[1]),
            groups=rank,
            bias=False,
            **common,
        ),
        nn.Conv2d(rank, o, 1, bias=has_bias, **factory),
    )


def plan_from_chain(chain: nn.Module) -> LayerPlan | None:
    """Recognise a chain built by :func:`build_chain` and return its plan (``None`` if it is not one)."""
    if not isinstance(chain, nn.Sequential):
        return None
    mods = list(chain)
    if len(mods) == 2 and all(isinstance(m, nn.Linear) for m in mods):
        return LayerPlan("svd", (mods[0].out_features,))
    if not all(isinstance(m, nn.Conv2d) for m in mods):
        return None
    if len(mods) == 2:
        return LayerPlan("svd", (mods[0].out_channels,))
    if len(mods) == 3:
        return LayerPlan("tucker2", (mods[1].out_channels, mods[1].in_channels))
    if len(mods) == 4:
        return LayerPlan("cp", (mods[0].out_channels,))
    return None


def plan_from_state_dict(layer: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str) -> LayerPlan | None:
    """The plan a checkpoint's ``state_dict`` holds for the layer at ``prefix`` (``None``: not decomposed).

    The shapes alone say it: ``<prefix>0.weight`` ... ``<prefix>{1,2,3}.weight`` are the factors of the
    chain (two for SVD, three for Tucker-2, four for CP).
    """
    if prefix + "weight" in state_dict or prefix + "0.weight" not in state_dict:
        return None
    n = 0
    while f"{prefix}{n}.weight" in state_dict:
        n += 1
    first = state_dict[prefix + "0.weight"]
    if is_linear_like(layer) and n == 2:
        return LayerPlan("svd", (int(first.shape[0]),))
    if isinstance(layer, nn.Conv2d):
        if n == 2:
            return LayerPlan("svd", (int(first.shape[0]),))
        if n == 3:
            core = state_dict[prefix + "1.weight"]
            return LayerPlan("tucker2", (int(core.shape[0]), int(core.shape[1])))
        if n == 4:
            return LayerPlan("cp", (int(first.shape[0]),))
    raise ValueError(
        f"the state dict holds {n} factor weights under {prefix!r} for a {type(layer).__name__}, which no "
        "decomposition produces (Linear: 2; Conv2d: 2 (SVD), 3 (Tucker-2) or 4 (CP))."
    )


def decompose(
    layer: nn.Module,
    plan: LayerPlan,
    *,
    n_iter_max: int = 25,
    tol: float = 1e-4,
    seed: int = 0,
    num_threads: int | None = None,
) -> tuple[nn.Sequential, float]:
    """Decompose ``layer`` according to ``plan``; return the chain and the relative weight error.

    The error is ``||W - W_hat||_F / ||W||_F`` of the reconstructed kernel. ``n_iter_max`` and ``tol``
    bound the Tucker (HOOI) and CP (ALS) iterations: both start from an SVD initialisation, so a few
    iterations suffice (tensorly's CP default ``tol=1e-8`` rarely stops early).

    Threads: CP (:func:`cp_als`) runs its matrix products on ``num_threads`` threads (``None``: the current
    ``torch.get_num_threads()``) and its LAPACK solves on one. SVD and Tucker-2 are made of LAPACK
    factorizations (tensorly's HOOI calls LAPACK's SVD) and run on one thread (:func:`single_thread`).
    The torch thread setting is restored afterwards.
    """
    chain = build_chain(layer, plan)
    w = _weight(layer)
    with torch.no_grad():
        if plan.method == "cp":
            (r,) = plan.ranks
            with threads(num_threads):
                (a, b, c, d), _ = cp_als(w, r, n_iter_max=n_iter_max, tol=tol, seed=seed)
                approx = a @ khatri_rao([b, c, d]).T
            chain[0].weight.copy_(b.T[:, :, None, None])
            chain[1].weight.copy_(c.T[:, None, :, None])
            chain[2].weight.copy_(d.T[:, None, None, :])
            chain[3].weight.copy_(a[:, :, None, None])
        else:
            with single_thread():
                approx = _decompose_lapack(w, plan, chain, n_iter_max=n_iter_max, tol=tol, seed=seed)
        if getattr(layer, "bias", None) is not None:
            chain[-1].bias.copy_(layer.bias.detach())
        error = float(torch.linalg.norm(w - approx.reshape(w.shape)) / torch.linalg.norm(w).clamp_min(1e-12))
    chain.train(layer.training)
    return chain, error


def _decompose_lapack(
    w: torch.Tensor, plan: LayerPlan, chain: nn.Sequential, *, n_iter_max: int, tol: float, seed: int
) -> torch.Tensor:
    """SVD / Tucker-2 factors of ``w`` copied into ``chain``; returns the reconstructed weight."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    o, i = w.shape[0], w.shape[1]
    if plan.method == "svd":
        (r,) = plan.ranks
        u, s, vh = _truncated_svd(w.reshape(o, i), r, seed)
        root = s.sqrt()
        first, second = root[:, None] * vh, u * root[None, :]  # split sqrt(s) for balanced factors
        chain[0].weight.copy_(first.reshape(chain[0].weight.shape))
        chain[1].weight.copy_(second.reshape(chain[1].weight.shape))
        return second @ first
    with tl.backend_context("pytorch"):
        # modes=[0, 1]: only the channel modes are reduced; the spatial modes stay whole.
        (core, (u_out, u_in)), _ = partial_tucker(
            w,
            rank=list(plan.ranks),
            modes=[0, 1],
            init="svd",
            svd=gram_svd,
            n_iter_max=n_iter_max,
            tol=tol,
            random_state=seed,
        )
        approx = tl.tenalg.multi_mode_dot(core, [u_out, u_in], modes=[0, 1])
    chain[0].weight.copy_(u_in.T[:, :, None, None])
    chain[1].weight.copy_(core)
    chain[2].weight.copy_(u_out[:, :, None, None])
    return approx


def _truncated_svd(matrix: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if matrix.numel() <= _EXACT_SVD_MAX_NUMEL or rank * 4 > min(matrix.shape):
        if matrix.shape[0] < matrix.shape[1]:  # LAPACK is much faster on tall matrices: transpose
            v, s, uh = torch.linalg.svd(matrix.T, full_matrices=False)
            return uh.T[:, :rank], s[:rank], v.T[:rank]
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    # Large matrix, small rank: randomized SVD (oversampled, two power iterations) is exact enough and
    # orders of magnitude cheaper than a full SVD.
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        u, s, v = torch.svd_lowrank(matrix, q=min(rank + 10, min(matrix.shape)), niter=2)
    finally:
        torch.random.set_rng_state(state)
    return u[:, :rank], s[:rank], v[:, :rank].T


# ---------------------------------------------------------------------------- model surgery
def set_submodule_(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` by ``module`` in place."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_structure_(model: nn.Module, plans: Mapping[str, LayerPlan]) -> None:
    """Replace each named layer by the empty chain of its plan (weights to be loaded afterwards)."""
    for name, plan in plans.items():
        layer = model.get_submodule(name)
        if plan_from_chain(layer) == plan:
            continue
        if not is_decomposable(layer):
            raise ValueError(f"cannot rebuild {name!r} as {plan.method}: it is a {type(layer).__name__}.")
        set_submodule_(model, name, build_chain(layer, plan))


def structure_from_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = ""
) -> dict[str, LayerPlan]:
    """Plans of every Linear/Conv2d of ``model`` that ``state_dict`` holds in decomposed form."""
    out = {}
    for name, module in model.named_modules():
        if name and is_decomposable(module):
            plan = plan_from_state_dict(module, state_dict, f"{prefix}{name}.")
            if plan is not None:
                out[name] = plan
    return out


def measure_latency(module: nn.Module, example: torch.Tensor, min_run_time: float = 0.05) -> float:
    """Median seconds of one forward of ``module`` on ``example`` (no grad, eval mode, current threads)."""
    from torch.utils import benchmark

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(example)  # warm-up (allocator, kernels)
            timer = benchmark.Timer(
                stmt="module(example)",
                globals={"module": module, "example": example},
                num_threads=torch.get_num_threads(),
            )
            return float(timer.blocked_autorange(min_run_time=min_run_time).median)
    finally:
        module.train(was_training)
