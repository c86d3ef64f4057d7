"""The compression report: per-layer table + one section per callback, as JSON and Markdown.

Built at the end of ``fit`` by the last compression callback on the trainer (so one combined report
covers pruning, quantization, distillation and decomposition together), written on rank zero as
``compression_report.json`` and ``compression_report.md`` into ``trainer.log_dir``.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> report = CompressionReport.from_model(model, example_input=torch.randn(1, 4))
    >>> report.summary["params"], report.summary["flops"]
    (30, 48)
    >>> print(report.to_markdown().splitlines()[0])
    # Compression report
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_compress.functional.sparse import pack_state_dict
from lightning_compress.functional.stats import (
    LayerStats,
    effective_flops,
    model_stats,
    module_flops,
    serialized_bytes,
)
from lightning_compress.inputs import CapturedCall, as_call

__all__ = ["REPORT_BASENAME", "CapturedCall", "CompressionReport", "as_call"]

REPORT_BASENAME = "compression_report"


@dataclass
class CompressionReport:
    """What a compressed model looks like: per-layer stats, whole-model summary and callback sections."""

    layers: list[LayerStats]
    summary: dict[str, Any]
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        bits: Mapping[str, float] | None = None,
        example_input: Any = None,
        sections: Mapping[str, dict[str, Any]] | None = None,
    ) -> CompressionReport:
        """Measure ``model``: counts from actual zeros, bytes at ``bits``, FLOPs if an input is given."""
        layers = model_stats(model, bits)
        params = sum(layer.params for layer in layers)
        nonzeros = sum(layer.nonzeros for layer in layers)
        dense = sum(layer.dense_bytes for layer in layers)
        effective = sum(layer.sparse_bytes for layer in layers)
        summary: dict[str, Any] = {
            "params": params,
            "nonzero_params": nonzeros,
            "sparsity": 0.0 if params == 0 else 1.0 - nonzeros / params,
            "dense_bytes": dense,
            "size_bytes": effective,
            "ratio": dense / effective if effective else 1.0,
            "state_dict_bytes_on_disk": serialized_bytes(model.state_dict()),
            "sparse_state_dict_bytes_on_disk": serialized_bytes(pack_state_dict(model.state_dict())),
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
        return cls(layers=layers, summary=summary, sections=dict(sections or {}))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "summary": self.summary,
            "layers": [layer.as_dict() for layer in self.layers],
            "sections": self.sections,
        }

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.as_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        """The report as Markdown: summary, one table row per layer, then each callback's section."""
        lines = ["# Compression report", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in self.summary.items()]
        lines += [
            "",
            "| layer | type | params | nonzeros | sparsity | bits | bytes (fp32) | bytes (compressed) |",
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
