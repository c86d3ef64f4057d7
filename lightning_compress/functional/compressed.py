"""One compact file per model: prune → quantize → encode (the Deep Compression pipeline, Han et al. 2016).

:func:`save_compressed` realizes on disk what pruning and quantization promise in a report. Every
tensor of the model (parameters and buffers) is encoded on its own:

- a tensor with at least ``min_sparsity`` zeros is stored as a **bitmap** of its nonzero positions
  (one bit per entry) plus the nonzero values, in their own dtype — so the int8 codes of a
  converted model stay one byte each and a pruned fp32 weight costs ``1/32`` of its size plus its
  surviving values;
- any other tensor is stored as it is (int8 codes and their scales as int8 / fp32, the rest as is);
- multi-byte values are split into byte planes (all first bytes, then all second bytes, ...), which
  lets the entropy coder see the repetitive exponent bytes of floats;
- everything then goes through a standard-library entropy coder (``lzma`` by default, ``zlib``, or
  ``none``).

Nothing is rounded or approximated here: decoding gives back bit-identical tensors (a zero is a
``+0.0`` bit pattern; ``-0.0`` and NaN are kept as values), so a loaded model computes exactly what
the saved one did. The savings come from what the model already is — zeros from pruning, int8 codes
from :func:`~lightning_compress.convert_to_int8`.

**How the structure travels.** The file has three parts: a JSON header (names, dtypes, shapes,
encodings), the encoded tensor data, and — unless ``structure=False`` — the module itself pickled
with ``torch.save`` *without its tensors* (each parameter and buffer replaced by a ``meta`` tensor,
so the pickle is a few kilobytes). ``load_compressed(path)`` unpickles that structure and fills in
the tensors; like ``torch.load(weights_only=False)`` this runs code named in the file, so **load
only files you trust**, and the classes of the model must be importable. ``load_compressed(path,
model=template)`` never unpickles anything: it decodes the tensors (plain data) into a model you
built yourself, by name, with shape and dtype checked — the safe path for files from elsewhere (for
an int8 model, the template is ``convert_to_int8`` of a prepared model of the same architecture).
Files saved with ``structure=False`` hold only tensors and load only this way.

Hooks registered on the modules (forward hooks, state-dict hooks) are runtime attachments of a
training run (callbacks, profilers) and are not saved.

Example::

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    >>> with torch.no_grad():
    ...     model[0].weight[torch.rand(64, 64) < 0.9] = 0.0   # 90% pruned
    >>> directory = tempfile.mkdtemp()
    >>> torch.save(model.state_dict(), os.path.join(directory, "fp32.pt"))
    >>> path = os.path.join(directory, "model.lcz")
    >>> size = save_compressed(model, path)
    >>> size * 4 < os.path.getsize(os.path.join(directory, "fp32.pt"))   # > 4x smaller, structure included
    True
    >>> loaded = load_compressed(path)
    >>> x = torch.randn(3, 64)
    >>> torch.equal(loaded(x), model(x))
    True
"""

from __future__ import annotations

import copy
import io
import json
import lzma
import os
import struct
import zlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from lightning_compress._files import write_atomically
from lightning_compress.functional.sparse import pack_bits, unpack_bits

__all__ = ["MAGIC", "inspect_compressed", "load_compressed", "save_compressed"]

MAGIC = b"LCZ1"
"""First four bytes of every file :func:`save_compressed` writes."""

_FORMAT = "lightning_compress.compressed"
_VERSION = 1
_CODECS = ("lzma", "zlib", "none")
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _compress(data: bytes, codec: str) -> bytes:
    if codec == "lzma":
        return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    if codec == "zlib":
        return zlib.compress(data, 9)
    return data


def _decompress(data: bytes, codec: str) -> bytes:
    if codec == "lzma":
        return lzma.decompress(data)
    if codec == "zlib":
        return zlib.decompress(data)
    return data


def _tensor_slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool, torch.Tensor]]:
    """Every parameter and buffer (persistent or not) as ``(qualified name, owner, attribute, is_param, tensor)``.

    Shared modules and tied tensors appear under every name that reaches them.
    """
    for prefix, module in model.named_modules(remove_duplicate=False):
        for is_param, slots in ((True, module._parameters), (False, module._buffers)):
            for attr, tensor in slots.items():
                if tensor is not None:
                    yield (f"{prefix}.{attr}" if prefix else attr), module, attr, is_param, tensor


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def _shuffle(data: bytes, itemsize: int) -> bytes:
    # Byte planes: for floats the sign/exponent bytes repeat a lot and compress well once adjacent.
    if itemsize == 1 or not data:
        return data
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(-1, itemsize)
    return t.t().contiguous().numpy().tobytes()


def _unshuffle(data: bytes, itemsize: int) -> bytes:
    if itemsize == 1 or not data:
        return data
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(itemsize, -1)
    return t.t().contiguous().numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).clone()


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the file")
    return dtype


def _encode(t: torch.Tensor, min_sparsity: float) -> tuple[dict[str, Any], list[bytes]]:
    """Header entry and data blobs of one tensor."""
    t = t.detach().cpu()
    itemsize = t.element_size()
    entry: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    numel = t.numel()
    if numel >= 64 and itemsize in _INT_OF_SIZE and not t.is_complex():
        # A zero is the all-zero bit pattern, so -0.0 and NaN stay values and decoding is bit-exact.
        bits = t.reshape(-1).contiguous().view(_INT_OF_SIZE[itemsize])
        mask = bits != 0
        nonzeros = int(mask.sum())
        if 1.0 - nonzeros / numel >= min_sparsity:
            values = _raw_bytes(t.reshape(-1)[mask])
            entry.update(encoding="bitmap", nonzeros=nonzeros)
            return entry, [pack_bits(mask).numpy().tobytes(), _shuffle(values, itemsize)]
    entry["encoding"] = "dense"
    return entry, [_shuffle(_raw_bytes(t), itemsize)]


def _decode(entry: dict[str, Any], blobs: list[bytes]) -> torch.Tensor:
    dtype, shape = _dtype(entry["dtype"]), entry["shape"]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if entry["encoding"] == "dense":
        return _from_bytes(_unshuffle(blobs[0], itemsize), dtype, shape)
    numel = torch.Size(shape).numel()
    mask = unpack_bits(torch.frombuffer(bytearray(blobs[0]), dtype=torch.uint8), numel)
    values = _from_bytes(_unshuffle(blobs[1], itemsize), dtype, [entry["nonzeros"]])
    out = torch.zeros(numel, dtype=dtype)
    out[mask] = values
    return out.reshape(shape)


def _skeleton(model: nn.Module, tensors: dict[int, torch.Tensor]) -> bytes:
    """``torch.save`` bytes of ``model`` with every tensor replaced by a ``meta`` tensor and no hooks."""
    memo: dict[int, Any] = {}
    for t in tensors.values():
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    for module in model.modules():
        for key, value in vars(module).items():
            # Hooks belong to the run (callbacks, profilers) and would drag it into the pickle.
            if "hook" in key and isinstance(value, dict):
                memo[id(value)] = type(value)()
    buffer = io.BytesIO()
    try:
        torch.save(copy.deepcopy(model, memo), buffer)
    except Exception as err:
        raise ValueError(
            f"model ({type(model).__name__}) cannot be pickled ({type(err).__name__}: {err}). HINT: define its "
            "classes at module level, or save with structure=False and load into a template model."
        ) from err
    return buffer.getvalue()


def save_compressed(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    min_sparsity: float = 0.1,
    codec: Literal["lzma", "zlib", "none"] = "lzma",
    structure: bool = True,
) -> int:
    """Write ``model`` to ``path`` as small as its zeros and integer codes allow; return the bytes written.

    Works on any ``nn.Module``: a pruned fp32 model, an int8 model from
    :func:`~lightning_compress.convert_to_int8` (pruned or not), a decomposed one. See the module
    docstring for the format and its trust model.

    The file is written to a temporary name in the same directory and renamed, so ``path`` is
    either the complete new file or untouched.

    Args:
        model: the module to save (its parameters and buffers; non-CPU tensors are copied to CPU).
        path: the file to write, in an existing directory (suffix free; ``.lcz`` is used by the report).
        min_sparsity: a tensor with at least this fraction of zeros is stored as bitmap + nonzeros.
        codec: the standard-library entropy coder over everything: ``"lzma"`` (smallest; a few MB/s),
            ``"zlib"`` (faster, larger) or ``"none"``.
        structure: also store the pickled module structure, so :func:`load_compressed` needs no
            template. ``False`` writes tensors only (load with ``load_compressed(path, model=...)``).

    Returns:
        The size of the written file in bytes (``os.path.getsize(path)``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` has no parameters or buffers, holds ``meta`` tensors, or an argument is out of range.
        FileNotFoundError: the directory of ``path`` does not exist.

    Example::

        >>> import os, tempfile, torch
        >>> from torch import nn
        >>> model = nn.Linear(256, 10)
        >>> path = os.path.join(tempfile.mkdtemp(), "linear.lcz")
        >>> save_compressed(model, path) == os.path.getsize(path)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if codec not in _CODECS:
        raise ValueError(f"codec must be one of {_CODECS}, got {codec!r}.")
    if not 0.0 <= float(min_sparsity) <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}. HINT: a fraction, not a percentage.")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"path {path!r}: the directory {directory!r} does not exist. HINT: create it first.")
    if os.path.isdir(path):
        raise IsADirectoryError(f"path {path!r} is a directory; give a file name inside it.")

    tensors, names = _unique_tensors(model)
    if not tensors:
        raise ValueError(f"model ({type(model).__name__}) has no parameters or buffers: there is nothing to compress.")

    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    offset = 0
    for key, t in tensors.items():
        entry, parts = _encode(t, float(min_sparsity))
        entry["names"] = [n for n, _ in names[key]]
        entry["parameter"] = names[key][0][1]
        entry["requires_grad"] = bool(t.requires_grad)
        entry["blobs"] = []
        for part in parts:
            entry["blobs"].append([offset, len(part)])
            blobs.append(part)
            offset += len(part)
        entries.append(entry)
    structure_blob = [offset, 0]
    if structure:
        pickled = _skeleton(model, tensors)
        structure_blob = [offset, len(pickled)]
        blobs.append(pickled)
    header = {
        "format": _FORMAT,
        "version": _VERSION,
        "codec": codec,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "structure": structure_blob if structure else None,
        "tensors": entries,
    }
    header_bytes = _compress(json.dumps(header, separators=(",", ":")).encode(), codec)
    body = _compress(b"".join(blobs), codec)

    header_line = MAGIC + struct.pack("<4sI", codec.encode().ljust(4, b"\0"), len(header_bytes))
    write_atomically(path, [header_line, header_bytes, body])
    return os.path.getsize(path)


def _unique_tensors(model: nn.Module) -> tuple[dict[int, torch.Tensor], dict[int, list[tuple[str, bool]]]]:
    """Unique tensors in first-seen order, and every ``(name, is_parameter)`` of each: tied ones are stored once."""
    tensors: dict[int, torch.Tensor] = {}
    names: dict[int, list[tuple[str, bool]]] = {}
    for qualified, _, _, is_param, t in _tensor_slots(model):
        if t.is_meta:
            raise ValueError(f"model holds a meta tensor ({qualified!r}) without data: nothing to save.")
        if t.layout != torch.strided or t.is_quantized:
            raise ValueError(
                f"model tensor {qualified!r} has layout {t.layout} / dtype {t.dtype}: only dense tensors are "
                "supported. HINT: use lightning_compress.convert_to_int8 for int8 models."
            )
        tensors.setdefault(id(t), t)
        names.setdefault(id(t), []).append((qualified, is_param))
    return tensors, names


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], bytes]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path!r} does not exist or is not a file.")
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != MAGIC or len(data) < 12:
        raise ValueError(f"path {path!r} is not a file written by save_compressed (no {MAGIC!r} signature).")
    raw_codec, header_len = struct.unpack("<4sI", data[4:12])
    codec = raw_codec.rstrip(b"\0").decode(errors="replace")
    if codec not in _CODECS:
        raise ValueError(f"path {path!r}: unknown codec {codec!r}; the file is damaged or from a newer version.")
    try:
        header = json.loads(_decompress(data[12 : 12 + header_len], codec))
        body = _decompress(data[12 + header_len :], codec)
    except (lzma.LZMAError, zlib.error, ValueError) as err:
        raise ValueError(f"path {path!r}: the file is damaged ({err}).") from err
    if header.get("format") != _FORMAT or header.get("version") != _VERSION:
        raise ValueError(
            f"path {path!r}: format {header.get('format')!r} version {header.get('version')!r} not supported."
        )
    return header, body


def inspect_compressed(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of a file written by :func:`save_compressed`: tensors, encodings, codec. Nothing is unpickled.

    Example::

        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "m.lcz")
        >>> _ = save_compressed(torch.nn.Linear(8, 2), path)
        >>> [(t["names"], t["encoding"]) for t in inspect_compressed(path)["tensors"]]
        [(['weight'], 'dense'), (['bias'], 'dense')]
    """
    return _read(path)[0]


def load_compressed(
    path: str | os.PathLike[str], model: nn.Module | None = None, *, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load a file written by :func:`save_compressed`; the model computes exactly what the saved one did.

    Args:
        path: the file.
        model: ``None`` rebuilds the saved module from the pickled structure in the file (**trusted
            files only**, as with ``torch.load(weights_only=False)``). A module of the same architecture
            instead receives the decoded tensors by name (shapes and dtypes checked, nothing unpickled)
            and is returned.
        map_location: device the tensors are placed on.

    Returns:
        The loaded module (``model`` itself when given), in eval mode if it was saved in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not such a file, or ``model`` does not match the file's tensors.

    Example::

        >>> import os, tempfile, torch
        >>> from torch import nn
        >>> path = os.path.join(tempfile.mkdtemp(), "m.lcz")
        >>> _ = save_compressed(nn.Linear(8, 2), path, structure=False)
        >>> template = load_compressed(path, model=nn.Linear(8, 2))   # safe: no pickle involved
        >>> tuple(template.weight.shape)
        (2, 8)
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be None or a torch.nn.Module, got {type(model).__name__}.")
    header, body = _read(path)
    decoded = []
    for entry in header["tensors"]:
        t = _decode(entry, [body[o : o + n] for o, n in entry["blobs"]]).to(map_location)
        decoded.append((entry, t))

    if model is None:
        if header["structure"] is None:
            raise ValueError(
                f"path {os.fspath(path)!r} was saved with structure=False: pass model=<a module of the same "
                f"architecture ({header['model_class']})> to load its tensors into."
            )
        o, n = header["structure"]
        model = torch.load(io.BytesIO(body[o : o + n]), weights_only=False)
        assert isinstance(model, nn.Module)
        slots = {q: (m, a, p) for q, m, a, p, _ in _tensor_slots(model)}
        for entry, t in decoded:
            value: torch.Tensor = nn.Parameter(t, requires_grad=entry["requires_grad"]) if entry["parameter"] else t
            for qualified in entry["names"]:
                owner, attr, is_param = slots[qualified]
                (owner._parameters if is_param else owner._buffers)[attr] = value
        return model

    slots = {q: t for q, _, _, _, t in _tensor_slots(model)}
    in_file = {q for entry, _ in decoded for q in entry["names"]}
    missing, unexpected = sorted(set(slots) - in_file), sorted(in_file - set(slots))
    if missing or unexpected:
        raise ValueError(
            f"model does not match {os.fspath(path)!r} (saved from {header['model_class']}): "
            f"missing in the file {missing[:10]}, not in the model {unexpected[:10]}."
        )
    with torch.no_grad():
        for entry, t in decoded:
            for qualified in entry["names"]:
                target = slots[qualified]
                if target.shape != t.shape or target.dtype != t.dtype:
                    raise ValueError(
                        f"model tensor {qualified!r} is {target.dtype} {tuple(target.shape)}, the file holds "
                        f"{t.dtype} {tuple(t.shape)}."
                    )
        for entry, t in decoded:
            for qualified in entry["names"]:
                slots[qualified].copy_(t)
    return model
