"""Which int8 weight storage is fast *and* exact on the CPU that will run the model.

onnxruntime's x86 int8 kernels multiply uint8 activations by int8 weights. How they add the products
depends on the CPU:

- **With VNNI** (``avx512_vnni``, ``avx_vnni``, AMX ``amx_int8``): ``VPDPBUSD`` accumulates in 32 bits.
  Signed int8 weights are exact for every bit width and the fast path; ``uint8`` weights fall back to
  slower kernels (measured on an AMD Zen 4 with AVX512-VNNI: 2.5-3.9x slower models).
- **AVX2 without VNNI**: ``VPMADDUBSW`` adds pairs of products in *16-bit* registers, which saturate
  for weights beyond ±64 (2 x 255 x 127 > 32767): visible output errors. Weights within ±64 (7-bit
  codes) are exact; 8-bit codes are stored as ``uint8`` with zero point 128 (exact uint8 x uint8
  kernels, somewhat slower).
- **Arm64** (``sdot`` / ``udot``) accumulates in 32 bits: int8 weights are exact.

This module decides once, in :func:`weight_storage`, from the flags of the machine the export runs on
(:func:`cpu_int8_features`) or from a target the user names (``target_cpu``), and says why.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Literal

TargetCPU = Literal["auto", "vnni", "avx2", "arm64"]
TARGET_CPUS: tuple[str, ...] = ("auto", "vnni", "avx2", "arm64")
WEIGHT_DTYPES: tuple[str, ...] = ("auto", "uint8", "int8")
# Flags under which x86 int8 dot products accumulate in 32 bits (no int16 saturation).
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")


@dataclass(frozen=True)
class CpuInt8Features:
    """What the int8 kernels of a CPU can do.

    Attributes:
        architecture: ``"x86_64"``, ``"arm64"`` or what the platform reports.
        flags: the int8-relevant instruction-set flags found (``avx2``, ``avx512_vnni``, ...).
        exact_int8_weights: int8 x uint8 products accumulate without 16-bit saturation.
        source: where the flags came from (torch's cpuinfo, ``/proc/cpuinfo`` or the named target).
    """

    architecture: str
    flags: tuple[str, ...]
    exact_int8_weights: bool
    source: str

    @property
    def target(self) -> str:
        """The ``target_cpu`` name these features amount to."""
        if self.architecture == "arm64":
            return "arm64"
        return "vnni" if self.exact_int8_weights else "avx2"


def _normalise_arch(machine: str) -> str:
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "x64", "i686", "i386"):
        return "x86_64"
    if machine in ("aarch64", "arm64", "armv8", "armv8l"):
        return "arm64"
    return machine


def _flags_from_torch() -> dict[str, bool] | None:
    # torch bundles pytorch/cpuinfo (works on Linux, macOS, Windows); the accessor is private, so any
    # failure falls back to /proc/cpuinfo.
    try:
        import torch

        info = torch._C._cpu._get_cpu_capability()
    except Exception:  # noqa: BLE001 - a private accessor may vanish in any release
        return None
    return {k: bool(v) for k, v in info.items() if isinstance(v, bool)} if isinstance(info, dict) else None


def _flags_from_proc() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def cpu_int8_features() -> CpuInt8Features:
    """The int8 features of the CPU this process runs on.

    Example::

        >>> features = cpu_int8_features()
        >>> features.target in ("vnni", "avx2", "arm64") or features.architecture not in ("x86_64", "arm64")
        True
    """
    arch = _normalise_arch(platform.machine())
    wanted = ("avx2", *_VNNI_FLAGS)
    torch_flags = _flags_from_torch()
    if torch_flags is not None and any(k in torch_flags for k in wanted):
        flags, source = tuple(f for f in wanted if torch_flags.get(f)), "torch cpuinfo"
    else:
        proc = _flags_from_proc()
        flags, source = (tuple(f for f in wanted if f in proc), "/proc/cpuinfo") if proc else ((), "unknown")
    if arch == "arm64":
        return CpuInt8Features(arch, flags, True, source)
    exact = any(f in flags for f in _VNNI_FLAGS)
    return CpuInt8Features(arch, flags, exact, source)


def features_of_target(target_cpu: str) -> CpuInt8Features:
    """The features a named ``target_cpu`` stands for (``"auto"``: this machine's).

    Example::

        >>> features_of_target("avx2").exact_int8_weights, features_of_target("vnni").exact_int8_weights
        (False, True)
    """
    if target_cpu not in TARGET_CPUS:
        raise ValueError(
            f"target_cpu must be one of {list(TARGET_CPUS)}, got {target_cpu!r}. HINT: 'avx2' is exact on "
            "every x86 CPU; 'vnni' is fastest on CPUs with AVX-VNNI / AVX512-VNNI / AMX and on arm64."
        )
    if target_cpu == "auto":
        return cpu_int8_features()
    if target_cpu == "arm64":
        return CpuInt8Features("arm64", (), True, "target_cpu='arm64'")
    vnni = target_cpu == "vnni"
    return CpuInt8Features("x86_64", ("avx2", "avx512_vnni") if vnni else ("avx2",), vnni, f"target_cpu={target_cpu!r}")


@dataclass(frozen=True)
class WeightStorage:
    """The weight storage an export uses and why.

    Attributes:
        keep_int8_within: layers whose codes lie within ``±keep_int8_within`` stay int8, the others are
            stored uint8 with zero point 128; ``127`` keeps every layer int8, ``-1`` none.
        weight_dtype: the requested ``weight_dtype``.
        target: the ``target_cpu`` the choice was made for (``vnni``, ``avx2``, ``arm64``).
        reason: one sentence for reports and the ONNX metadata.
    """

    keep_int8_within: int
    weight_dtype: str
    target: str
    reason: str

    @property
    def summary(self) -> str:
        """``int8``, ``uint8`` or ``int8 for codes within ±64, else uint8``."""
        if self.keep_int8_within >= 127:
            return "int8"
        if self.keep_int8_within < 0:
            return "uint8"
        return f"int8 for codes within ±{self.keep_int8_within}, else uint8"


def weight_storage(weight_dtype: str = "auto", target_cpu: str = "auto") -> WeightStorage:
    """Decide how int8 weight codes are stored in an ONNX export.

    Args:
        weight_dtype: ``"auto"`` (decide from ``target_cpu``), ``"int8"`` or ``"uint8"`` (forced).
        target_cpu: the CPU that will run the model: ``"auto"`` (the one running this export),
            ``"vnni"`` (x86 with AVX-VNNI / AVX512-VNNI / AMX), ``"avx2"`` (x86 without VNNI, or
            unknown x86 machines: exact everywhere) or ``"arm64"``.

    Example::

        >>> weight_storage(target_cpu="vnni").summary
        'int8'
        >>> weight_storage(target_cpu="avx2").summary
        'int8 for codes within ±64, else uint8'
        >>> weight_storage("uint8", target_cpu="vnni").summary
        'uint8'
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {weight_dtype!r}.")
    features = features_of_target(target_cpu)
    described = f"{features.architecture} [{', '.join(features.flags) or 'no int8 flags'}] from {features.source}"
    if weight_dtype == "int8":
        return WeightStorage(127, weight_dtype, features.target, "weight_dtype='int8' forced")
    if weight_dtype == "uint8":
        return WeightStorage(-1, weight_dtype, features.target, "weight_dtype='uint8' forced")
    if features.exact_int8_weights:
        why = "int8 products accumulate in 32 bits: signed int8 weights are exact and fastest"
        return WeightStorage(127, weight_dtype, features.target, f"{described}: {why}")
    why = "no VNNI: int8 weights beyond ±64 saturate 16-bit sums, so 8-bit codes are stored uint8 (exact)"
    return WeightStorage(64, weight_dtype, features.target, f"{described}: {why}")
