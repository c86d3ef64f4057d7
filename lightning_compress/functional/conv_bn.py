"""Find conv → BatchNorm pairs by the data flow (``torch.fx``), as onnxruntime and PT2E do.

A BatchNorm can be folded into a conv when the conv's output feeds the BatchNorm and nothing else, and
each is called once. torchvision-style blocks hold ``conv1`` / ``bn1`` as attributes and chain them in
``forward``, so the model is traced symbolically with ``torch.fx`` (no input needed) to see the flow.
A module whose ``forward`` cannot be traced (data-dependent control flow, unsupported Python) is
searched child by child; inside an untraceable module only pairs adjacent in an ``nn.Sequential`` are
trusted (there the conv's output feeds the BatchNorm and nothing else). Every BatchNorm left unfolded is
reported with the reason, never silently.

Example::

    >>> import torch
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    ...     def forward(self, x):
    ...         return torch.relu(self.bn1(self.conv1(x)))
    >>> found = find_conv_bn_pairs(Block(), ["conv1"])
    >>> found.pairs, found.unfolded
    ({'conv1': 'bn1'}, {})
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch.fx
from torch import nn

_CONV_TYPES = (nn.Conv1d, nn.Conv2d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class ConvBnPairs:
    """Result of :func:`find_conv_bn_pairs`.

    Attributes:
        pairs: ``{conv name: BatchNorm name}`` that can be folded.
        unfolded: ``{BatchNorm name: reason}`` for every other BatchNorm of the model.
        untraced: ``{module name: error}`` of modules searched by the ``nn.Sequential`` rule only
            (``""`` is the whole model).
    """

    pairs: dict[str, str] = field(default_factory=dict)
    unfolded: dict[str, str] = field(default_factory=dict)
    untraced: dict[str, str] = field(default_factory=dict)

    def message(self) -> str:
        """A human-readable account of the BatchNorms left unfolded (empty when all were folded)."""
        if not self.unfolded:
            return ""
        lines = [f"{bn}: {reason}" for bn, reason in self.unfolded.items()]
        text = f"{len(self.unfolded)} BatchNorm(s) left unfolded (they stay fp32 ops between int8 layers): "
        text += "; ".join(lines) + "."
        if self.untraced:
            where = ", ".join(f"{n or '<model>'} ({e})" for n, e in self.untraced.items())
            text += (
                f" torch.fx could not trace {where}; there only conv -> BatchNorm pairs adjacent in an "
                "nn.Sequential were folded. HINT: make that forward traceable, or chain the pair in an "
                "nn.Sequential."
            )
        return text


class _LeafTracer(torch.fx.Tracer):
    """Keeps convs, BatchNorms and linear layers (and their QAT / folded subclasses) as single calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:  # noqa: D102
        if isinstance(m, (*_CONV_TYPES, *_BN_TYPES, nn.Linear, nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _contains_bn(module: nn.Module) -> bool:
    return any(isinstance(m, _BN_TYPES) for m in module.modules())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _trace(module: nn.Module) -> torch.fx.Graph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warns about e.g. constant-folded Python values
        return _LeafTracer().trace(module)


def _graph_pairs(graph: torch.fx.Graph, root: nn.Module, prefix: str, wanted: set[str]) -> dict[str, str]:
    modules = dict(root.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), _BN_TYPES):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv, bn = modules.get(str(source.target)), modules[str(node.target)]
        conv_name, bn_name = _join(prefix, str(source.target)), _join(prefix, str(node.target))
        if (
            isinstance(conv, _CONV_TYPES)
            and conv_name in wanted
            and len(source.users) == 1  # the conv output feeds the BatchNorm only
            and calls[str(source.target)] == 1  # neither is shared between two places
            and calls[str(node.target)] == 1
            and _foldable(conv, bn)
        ):
            pairs[conv_name] = bn_name
    return pairs


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return bool(bn.track_running_stats) and bn.num_features == conv.out_channels  # type: ignore[union-attr]


def _adjacent_pairs(sequential: nn.Sequential, prefix: str, wanted: set[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    children = list(sequential.named_children())
    for (a_name, a), (b_name, b) in zip(children, children[1:], strict=False):
        conv_ok = isinstance(a, _CONV_TYPES) and _join(prefix, a_name) in wanted
        if conv_ok and isinstance(b, _BN_TYPES) and _foldable(a, b):
            pairs[_join(prefix, a_name)] = _join(prefix, b_name)
    return pairs


def _search(module: nn.Module, prefix: str, wanted: set[str], found: ConvBnPairs, traced: list[str]) -> None:
    if not _contains_bn(module):
        return
    try:
        graph = _trace(module)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: search the children instead
        first_line = str(err).splitlines()[0][:120] if str(err) else ""
        found.untraced[prefix] = f"{type(err).__name__}: {first_line}"
        if isinstance(module, nn.Sequential):
            found.pairs.update(_adjacent_pairs(module, prefix, wanted))
        for name, child in module.named_children():
            _search(child, _join(prefix, name), wanted, found, traced)
        return
    traced.append(prefix)
    found.pairs.update(_graph_pairs(graph, module, prefix, wanted))


def find_conv_bn_pairs(model: nn.Module, convs: Iterable[str]) -> ConvBnPairs:
    """Conv → BatchNorm pairs of ``model`` that can be folded, and why every other BatchNorm cannot.

    Args:
        model: the model (plain or QAT-prepared; already folded BatchNorms are not listed again).
        convs: names of the convs that may take a BatchNorm (e.g. the quantized ones).

    Returns:
        :class:`ConvBnPairs`.
    """
    from lightning_compress.functional.qat import FOLDED_BN_TYPES

    wanted = set(convs)
    found = ConvBnPairs()
    traced: list[str] = []
    _search(model, "", wanted, found, traced)
    paired = set(found.pairs.values())
    named = dict(model.named_modules())
    for name, module in named.items():
        if not isinstance(module, _BN_TYPES) or isinstance(module, FOLDED_BN_TYPES) or name in paired:
            continue
        if not module.track_running_stats:
            reason = "track_running_stats=False (batch statistics at inference cannot be folded)"
        elif not any(t == "" or name.startswith(t + ".") for t in traced):
            reason = "in a module torch.fx could not trace, and not right after a conv in an nn.Sequential"
        else:
            reason = "its input is not the output of one quantized conv used only by it"
        found.unfolded[name] = reason
    return found


# Ops a quantized value passes through unchanged in int8 (onnxruntime keeps them on int8 tensors, and
# quantization commutes with them): the value is quantized where the next quantized layer reads it.
_TRANSPARENT_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_TRANSPARENT_FUNCTIONS = ("relu", "max_pool1d", "max_pool2d", "flatten", "dropout", "reshape", "view")


def convs_needing_output_quantization(
    model: nn.Module, convs: Iterable[str], quantizing: Iterable[str], folded: Iterable[str]
) -> set[str] | None:
    """Quantized convs whose output must be quantized for an int8 runtime to run them in int8.

    onnxruntime runs a conv in int8 only if its output is quantized. A conv whose output reaches (through
    ReLU, max-pooling, reshapes, dropout or its folded BatchNorm) only quantized layers or the model's
    output needs nothing more; one whose output feeds anything else (a residual add, a Hardswish, a
    multiplication) gets its output fake-quantized in training, so that the trained model is the one
    deployed.

    Args:
        model: the model to trace with ``torch.fx``.
        convs: names of the quantized convs.
        quantizing: names of every module that quantizes its input (quantized layers, observed pools).
        folded: names of folded BatchNorms (transparent here).

    Returns:
        the conv names, or ``None`` when ``model`` cannot be traced (then no output is quantized).
    """
    try:
        graph = _trace(model)
    except Exception:  # noqa: BLE001 - untraceable: the caller keeps outputs float
        return None
    modules = dict(model.named_modules())
    convs, quantizing, folded = set(convs), set(quantizing), set(folded)

    def transparent(node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return str(node.target) in folded or isinstance(modules.get(str(node.target)), _TRANSPARENT_MODULES)
        if node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target))
            return name.lstrip("_").rstrip("_") in _TRANSPARENT_FUNCTIONS
        return False

    def quantizer(node: torch.fx.Node) -> bool:
        return node.op == "call_module" and str(node.target) in quantizing

    def add_or_cat(node: torch.fx.Node) -> bool:
        # The export lets these read the quantized copy of a tensor (int8 QLinearAdd / QLinearConcat).
        name = getattr(node.target, "__name__", str(node.target))
        return node.op in ("call_function", "call_method") and name in ("add", "iadd", "add_", "cat", "concat")

    def reaches_only_quantized(node: torch.fx.Node, seen: set[torch.fx.Node]) -> bool:
        quantized_here = any(quantizer(u) for u in node.users)
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output" or quantizer(user) or (quantized_here and add_or_cat(user)):
                continue
            unfolded_bn = str(user.target) not in folded and isinstance(modules.get(str(user.target)), _BN_TYPES)
            if user.op == "call_module" and unfolded_bn:
                # An unfolded BatchNorm (prepare_(fold_bn=False)) is folded only at conversion, after the
                # output would have been quantized: keep this output float.
                continue
            if not (transparent(user) and reaches_only_quantized(user, seen)):
                return False
        return True

    needed = set()
    for node in graph.nodes:
        if node.op == "call_module" and str(node.target) in convs and not reaches_only_quantized(node, set()):
            needed.add(str(node.target))
    return needed
