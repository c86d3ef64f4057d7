"""The compression report: per-layer table + one section per callback, as JSON and Markdown.

Every size is labelled: ``measured`` is the byte count of a file that was written (an exported
artifact on disk, or a serialization written to a temporary file just to be measured) and
``estimated`` is computed from parameter counts and bit widths. The summary's headline ``ratio`` is
the best *measured* one — the baseline file's bytes over the smallest artifact's — and
``ratio_artifact`` names that artifact; the estimate is ``ratio_estimated``.

Built at the end of ``fit`` by the last compression callback on the trainer (so one combined report
covers pruning, quantization, distillation and decomposition together), written on rank zero as
``compression_report.json`` and ``compression_report.md`` into ``trainer.log_dir``.

A sharded model (FSDP2: DTensor parameters) is reported without gathering it on one rank: counts are
all-reduced (every rank builds the report), FLOPs come from one forward on every rank, and no temporary
file of the whole model is written, so only files the user asked for (exports) are measured; the
headline ``ratio`` is then ``None`` and ``ratio_estimated`` holds the estimate.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> report = CompressionReport.from_model(model, example_input=torch.randn(1, 4))
    >>> report.summary["params"], report.summary["flops"]
    (30, 48)
    >>> [row["kind"] for row in report.sizes]
    ['measured', 'measured', 'measured', 'estimated', 'estimated']
    >>> print(report.to_markdown().splitlines()[0])
    # Compression report
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_compress.functional.sparse import pack_state_dict
from lightning_compress.functional.stats import (
    LayerStats,
    effective_flops,
    is_sharded,
    model_stats,
    module_flops,
)
from lightning_compress.inputs import CapturedCall, as_call

__all__ = ["REPORT_BASENAME", "SUMMARY_KINDS", "CapturedCall", "CompressionReport", "as_call", "file_bytes", "size_row"]

REPORT_BASENAME = "compression_report"


SUMMARY_KINDS: dict[str, str] = {
    "params": "counted",
    "nonzero_params": "counted",
    "sparsity": "counted",
    "ratio": "measured",
    "ratio_artifact": "measured",
    "size_bytes_measured": "measured",
    "baseline": "measured",
    "baseline_bytes_measured": "measured",
    "size_bytes_estimated": "estimated",
    "fp32_bytes_estimated": "estimated",
    "ratio_estimated": "estimated",
    "flops": "counted",
    "effective_flops": "estimated",
}
"""What each summary key is: ``measured`` (bytes of a written file), ``estimated`` (from counts and bit
widths), ``counted`` (exact counts of the tensors)."""


def file_bytes(write: Callable[[str], Any], name: str = "model.pt") -> int:
    """Bytes of the file ``write(path)`` writes, measured on disk in a temporary directory removed after.

    ``name`` is the file's name: ``torch.save`` stores it inside the archive, so it changes the size by a
    few bytes per tensor.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        write(path)
        return os.path.getsize(path)


def size_row(artifact: str, nbytes: int, kind: str, path: str | None = None, note: str = "") -> dict[str, Any]:
    """One row of the report's sizes table."""
    return {"artifact": artifact, "bytes": int(nbytes), "kind": kind, "path": path, "note": note}


@dataclass
class CompressionReport:
    """What a compressed model looks like: sizes, per-layer stats, whole-model summary and callback sections."""

    layers: list[LayerStats]
    summary: dict[str, Any]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    sizes: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        bits: Mapping[str, float] | None = None,
        example_input: Any = None,
        sections: Mapping[str, dict[str, Any]] | None = None,
        artifacts: Sequence[tuple[str, str]] = (),
        baseline: dict[str, Any] | None = None,
    ) -> CompressionReport:
        """Measure ``model``: counts from actual zeros, files measured on disk, bytes at ``bits`` estimated.

        Args:
            model: the model as it is now.
            bits: bit width per module name (quantized layers); others count as 32.
            example_input: one input to count FLOPs on (tensor, tuple, dict or ``CapturedCall``).
            sections: extra sections (a callback's contribution each).
            artifacts: ``(description, path)`` of files written for this model (exports, compressed files):
                their sizes are measured with ``os.path.getsize``; missing files are listed as such.
            baseline: the size row every ratio is relative to (``size_row(...)``; the original model's
                fp32 ``state_dict`` file). Default: ``torch.save`` of ``model.state_dict()`` with floating
                tensors in fp32, measured.

        A sharded model (DTensor parameters, FSDP2) is counted with collectives: every rank must call this.
        """
        layers = model_stats(model, bits)
        dense = sum(layer.dense_bytes for layer in layers)
        effective = sum(layer.sparse_bytes for layer in layers)
        if is_sharded(model):
            # Writing the whole model to one file needs it gathered on one rank, which sharding exists to avoid.
            candidates = [
                size_row(what, os.path.getsize(path), "measured", path=path)
                for what, path in artifacts
                if os.path.isfile(path)
            ]
            if baseline is None:
                baseline = size_row(
                    "parameters at fp32 [sharded model: no file written]",
                    dense,
                    "estimated",
                    note="the model is sharded (FSDP2); a file of the whole model is written only for an export",
                )
            return cls._assemble(model, layers, example_input, sections, baseline, candidates, dense, effective)
        state = model.state_dict()
        if baseline is None:
            fp32 = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            baseline = size_row(
                "fp32 state_dict of this model (torch.save)",
                file_bytes(lambda p: torch.save(fp32, p)),
                "measured",
                note="written to a temporary file; no copy of the original model was kept",
            )
        candidates = [
            size_row(
                "state_dict (torch.save)",
                file_bytes(lambda p: torch.save(state, p)),
                "measured",
                note="written to a temporary file, not kept",
            ),
            size_row(
                "bitmap-sparse state_dict (save_sparse)",
                file_bytes(lambda p: torch.save(pack_state_dict(state), p)),
                "measured",
                note="written to a temporary file, not kept; lightning_compress.save_sparse writes it",
            ),
        ]
        for what, path in artifacts:
            if os.path.isfile(path):
                candidates.append(size_row(what, os.path.getsize(path), "measured", path=path))
        return cls._assemble(model, layers, example_input, sections, baseline, candidates, dense, effective)

    @classmethod
    def _assemble(
        cls,
        model: nn.Module,
        layers: list[LayerStats],
        example_input: Any,
        sections: Mapping[str, dict[str, Any]] | None,
        baseline: dict[str, Any],
        candidates: list[dict[str, Any]],
        dense: int,
        effective: int,
    ) -> CompressionReport:
        params = sum(layer.params for layer in layers)
        nonzeros = sum(layer.nonzeros for layer in layers)
        on_disk = [row for row in candidates if row["path"]]
        # The headline ratio is measured: a measured baseline over a measured file, or nothing.
        best = min(on_disk or candidates, key=lambda row: row["bytes"]) if candidates else None
        if baseline["kind"] != "measured":
            best = None
        sizes = [
            {**baseline, "artifact": f"{baseline['artifact']} [baseline]"},
            *candidates,
            size_row("parameters at fp32", dense, "estimated", note="params x 4 bytes"),
            size_row(
                "parameters at their bit widths, sparse ones as bitmap + nonzeros",
                effective,
                "estimated",
                note="what an ideal encoding of the counted values needs, before entropy coding",
            ),
        ]
        for row in sizes:
            row["ratio"] = round(baseline["bytes"] / row["bytes"], 3) if row["bytes"] else None
        not_measured = "not measured: the model is sharded and no export was written"
        summary: dict[str, Any] = {
            "params": params,
            "nonzero_params": nonzeros,
            "sparsity": 0.0 if params == 0 else 1.0 - nonzeros / params,
            "ratio": None if best is None else baseline["bytes"] / best["bytes"] if best["bytes"] else 1.0,
            "ratio_artifact": not_measured if best is None else best["path"] or best["artifact"],
            "size_bytes_measured": None if best is None else best["bytes"],
            "baseline": baseline["path"] or baseline["artifact"],
            "baseline_bytes_measured": baseline["bytes"] if baseline["kind"] == "measured" else None,
            "size_bytes_estimated": effective,
            "fp32_bytes_estimated": dense,
            "ratio_estimated": dense / effective if effective else 1.0,
        }
        if example_input is not None:
            args, kwargs = as_call(example_input)
            try:
                flops = module_flops(model, *args, **kwargs)
            except Exception as err:  # a report must not fail a finished training run
                summary["flops"] = f"not counted: the example input failed ({type(err).__name__}: {err})"
            else:
                summary["flops"] = flops.get("", 0)
                summary["effective_flops"] = effective_flops(flops, layers)
        return cls(layers=layers, summary=summary, sections=dict(sections or {}), sizes=sizes)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "summary": self.summary,
            "summary_kinds": {k: SUMMARY_KINDS.get(k, "-") for k in self.summary},
            "sizes": self.sizes,
            "layers": [layer.as_dict() for layer in self.layers],
            "sections": self.sections,
        }

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.as_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        """The report as Markdown: summary, one table row per layer, then each callback's section."""
        lines = ["# Compression report", "", "| metric | value | kind |", "| --- | --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} | {SUMMARY_KINDS.get(k, '-')} |" for k, v in self.summary.items()]
        lines += [
            "",
            "kind: `measured` = bytes of a file that was written; `estimated` = from counts and bit widths; "
            "`counted` = exact counts of the tensors.",
        ]
        if self.sizes:
            lines += ["", "## Sizes", "", "| artifact | bytes | kind | ratio | path | note |", "|" + " --- |" * 6]
            lines += [
                f"| {r['artifact']} | {r['bytes']} | {r['kind']} | {_fmt(r.get('ratio'))} | {r['path'] or '-'} "
                f"| {r['note'] or '-'} |"
                for r in self.sizes
            ]
        lines += [
            "",
            "| layer | type | params | nonzeros | sparsity | bits | bytes fp32 (estimated) "
            "| bytes compressed (estimated) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {s.name} | {s.type} | {s.params} | {s.nonzeros} | {s.sparsity:.2%} | {_fmt(s.bits)} "
            f"| {s.dense_bytes} | {s.sparse_bytes} |"
            for s in self.layers
        ]
        for title, section in self.sections.items():
            lines += ["", f"## {title}", ""]
            lines += [f"- **{k}**: {_fmt(v)}" for k, v in section.items() if not isinstance(v, list | dict)]
            rows = [v for v in section.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
            for table in rows:
                cols = list(table[0])
                lines += ["", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
                lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in table]
        return "\n".join(lines) + "\n"

    def write(self, directory: str | os.PathLike[str]) -> tuple[str, str]:
        """Write ``compression_report.json`` and ``.md`` into ``directory``; return both paths.

        Each file is written to a temporary name and renamed, so a crash never leaves half a report.
        """
        os.makedirs(directory, exist_ok=True)
        paths = []
        for ext, text in (("json", self.to_json()), ("md", self.to_markdown())):
            path = os.path.join(directory, f"{REPORT_BASENAME}.{ext}")
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
            paths.append(path)
        return paths[0], paths[1]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _fmt(value.item())
    return str(value)
