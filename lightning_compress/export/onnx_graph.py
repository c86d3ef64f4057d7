"""Rewrites of an exported QDQ ONNX graph so onnxruntime runs its layers with int8 kernels.

The exporter writes the quantized model faithfully (``DequantizeLinear`` of int8 weight initializers,
``QuantizeLinear → DequantizeLinear`` on layer inputs), but onnxruntime only fuses int8 kernels for some
patterns. Each pass below rewrites one pattern into an equivalent one it does fuse. All passes work on one
:class:`GraphIndex` (producers, consumers, initializers), built once per graph and kept up to date by its
edit methods, then written back with :meth:`GraphIndex.commit`.

Needs the ``onnx`` package (the ``[onnx]`` extra); imported only by the export.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper


class GraphIndex:
    """Nodes, producers, consumers and initializers of an ONNX graph, kept consistent while it is edited.

    Nodes are held in a Python list (protobuf repeated fields copy on insert, so edits through them
    would not reach the graph); :meth:`commit` writes the list and the initializers back to ``model``.
    ``Constant`` nodes and ``Identity`` copies of initializers become initializers on construction, so
    every pass can look weights, scales and zero points up in one place.
    """

    def __init__(self, model: ModelProto) -> None:
        self.model = model
        self.nodes: list[NodeProto] = list(model.graph.node)
        self.initializers: dict[str, TensorProto] = {i.name: i for i in model.graph.initializer}
        self._constants_to_initializers()
        self.producer: dict[str, NodeProto] = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    # ------------------------------------------------------------------ reading
    def array(self, name: str) -> np.ndarray | None:
        """The value of initializer ``name`` (``None`` when ``name`` is computed by a node)."""
        tensor = self.initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def users(self, name: str) -> list[NodeProto]:
        """The nodes that read tensor ``name``."""
        return self.consumers.get(name, [])

    def position(self, node: NodeProto) -> int:
        """Index of ``node`` in the node list (by identity: two nodes may compare equal)."""
        return next(i for i, n in enumerate(self.nodes) if n is node)

    # ------------------------------------------------------------------ editing
    def set_initializer(self, name: str, array: np.ndarray) -> None:
        """Add initializer ``name`` or replace its value."""
        self.initializers[name] = numpy_helper.from_array(array, name)

    def insert(self, position: int, nodes: list[NodeProto]) -> None:
        """Insert ``nodes`` (in order) before the node at ``position``."""
        self.nodes[position:position] = nodes
        for node in nodes:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def remove(self, node: NodeProto) -> None:
        """Remove ``node`` from the graph and the index."""
        del self.nodes[self.position(node)]
        for name in node.output:
            if self.producer.get(name) is node:
                del self.producer[name]
        for name in node.input:
            self.consumers[name] = [n for n in self.consumers.get(name, []) if n is not node]

    def replace(self, node: NodeProto, nodes: list[NodeProto]) -> None:
        """Put ``nodes`` where ``node`` was."""
        position = self.position(node)
        self.remove(node)
        self.insert(position, nodes)

    def set_input(self, node: NodeProto, position: int, name: str) -> None:
        """Make ``node`` read ``name`` as its input number ``position``."""
        old = node.input[position]
        node.input[position] = name
        if old not in node.input:
            self.consumers[old] = [n for n in self.users(old) if n is not node]
        self.consumers.setdefault(name, []).append(node)

    def rename_output(self, node: NodeProto, old: str, new: str) -> None:
        """Make ``node`` write ``new`` instead of ``old`` (readers of ``old`` must get a new producer)."""
        node.output[list(node.output).index(old)] = new
        del self.producer[old]
        self.producer[new] = node

    def remove_dead(self) -> None:
        """Drop nodes whose outputs nobody reads and initializers no node reads."""
        graph_outputs = {o.name for o in self.model.graph.output}
        while True:
            dead = [n for n in self.nodes if not any(self.users(o) or o in graph_outputs for o in n.output)]
            if not dead:
                break
            for node in dead:
                self.remove(node)
        for name in [name for name in self.initializers if not self.users(name)]:
            del self.initializers[name]

    def commit(self) -> None:
        """Write the nodes and initializers back into the model."""
        graph = self.model.graph
        nodes = [_copy(n) for n in self.nodes]  # detached from the fields cleared below
        initializers = [_copy(i) for i in self.initializers.values()]
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(initializers)

    def _constants_to_initializers(self) -> None:
        kept = []
        for node in self.nodes:
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                tensor = _copy(helper.get_attribute_value(node.attribute[0]))
                tensor.name = node.output[0]
                self.initializers[tensor.name] = tensor
            elif node.op_type == "Identity" and node.input[0] in self.initializers:
                self.set_initializer(node.output[0], numpy_helper.to_array(self.initializers[node.input[0]]))
            else:
                kept.append(node)
        self.nodes = kept


def _copy(message: Any) -> Any:
    out = type(message)()
    out.CopyFrom(message)
    return out


def _attribute(node: NodeProto, name: str, default: Any) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


# ---------------------------------------------------------------------------------------------- passes
def weights_to_uint8(index: GraphIndex, keep_int8_within: int = -1) -> None:
    """Store int8 weight codes as ``uint8`` with zero point 128 (the same values, still symmetric).

    On x86 CPUs without VNNI, onnxruntime's uint8 x int8 kernels add pairs of products in 16-bit
    registers (``VPMADDUBSW``): 2 x 255 x 127 overflows int16 and visibly corrupts outputs, while
    2 x 255 x 64 does not. uint8 x uint8 kernels never saturate. The codes are shifted by 128 (exact).
    Layers whose codes all lie within ``±keep_int8_within`` stay int8.
    """
    for node in index.nodes:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        codes, zero = index.array(node.input[0]), index.array(node.input[2])
        if codes is None or zero is None or codes.dtype != np.int8 or zero.dtype != np.int8 or np.any(zero != 0):
            continue
        if codes.size and int(np.abs(codes.astype(np.int16)).max()) <= keep_int8_within:
            continue
        # New names: an initializer shared with another reader keeps its int8 value for that reader.
        codes_name, zero_name = node.input[0] + "_uint8", node.input[2] + "_uint8"
        index.set_initializer(codes_name, (codes.astype(np.int16) + 128).astype(np.uint8))
        index.set_initializer(zero_name, np.full(zero.shape, 128, np.uint8))
        index.set_input(node, 0, codes_name)
        index.set_input(node, 2, zero_name)


def _rank(index: GraphIndex, name: str) -> int | None:
    """Rank of tensor ``name`` from the graph's shape information, ``None`` when it is not recorded."""
    graph = index.model.graph
    for info in (*graph.value_info, *graph.input, *graph.output):
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return None


def global_average_pools(index: GraphIndex) -> None:
    """``ReduceMean`` over the two spatial dims of an NCHW tensor (keeping them) → ``GlobalAveragePool``.

    The torch.export-based exporter writes ``nn.AdaptiveAvgPool2d(1)`` as ``ReduceMean``, the TorchScript
    one as ``GlobalAveragePool``; only the latter has an int8 kernel (``QLinearGlobalAveragePool``). The
    two compute the same values on 4-d inputs.
    """
    for node in [n for n in index.nodes if n.op_type == "ReduceMean" and len(n.input) == 2]:
        axes = index.array(node.input[1])
        rank = _rank(index, node.input[0])
        if axes is None or rank != 4 or not _attribute(node, "keepdims", 1):
            continue
        if sorted(int(a) % rank for a in axes.reshape(-1)) != [2, 3]:
            continue
        pool = helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name + "_global")
        index.replace(node, [pool])


# Ops through which per-tensor quantization commutes exactly (monotonic or pure data movement):
# Q(maxpool(x)) == maxpool(Q(x)), Q(flatten(x)) == flatten(Q(x)).
_COMMUTES_WITH_QUANTIZE = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
# Producers after which a hoisted Q -> DQ lets onnxruntime run them (or what follows) in int8.
_HOIST_TARGETS = ("Relu", "Conv", "Add", "GlobalAveragePool", "AveragePool", "Clip", "Concat")


def hoist_quantize(index: GraphIndex) -> None:
    """Copy a layer-input ``Q → DQ`` up through pooling/reshapes to the op producing the tensor.

    In ``conv → relu → maxpool → flatten → Q → DQ → gemm`` the conv's output is not re-quantized where
    onnxruntime looks for it, so the conv would run in fp32 and max-pooling on floats. The same ``Q → DQ``
    (same scale) placed right after the relu gives identical values after the max-pool (quantization
    commutes with max-pooling and reshapes) and lets onnxruntime fuse ``QLinearConv`` and pool on uint8.
    Other readers of the quantized tensor (a residual branch) then read the quantized values too: a
    change of at most half a step of a scale observed on that very tensor.
    """
    for q in [n for n in index.nodes if n.op_type == "QuantizeLinear"]:
        tensor = q.input[0]
        node = index.producer.get(tensor)
        moved = False
        while node is not None and node.op_type in _COMMUTES_WITH_QUANTIZE:
            if moved and len(index.users(tensor)) != 1:
                break  # an intermediate value with other readers must keep its float value
            tensor = node.input[0]
            node = index.producer.get(tensor)
            moved = True
        if not moved or node is None or node.op_type not in _HOIST_TARGETS or len(index.users(tensor)) != 1:
            continue
        hoisted = tensor + "_hoisted"
        index.rename_output(node, tensor, hoisted)
        index.insert(
            index.position(node) + 1,
            [
                helper.make_node("QuantizeLinear", [hoisted, *q.input[1:]], [hoisted + "_q"]),
                helper.make_node("DequantizeLinear", [hoisted + "_q", *q.input[1:]], [tensor]),
            ],
        )


def merge_duplicate_quantize(index: GraphIndex) -> None:
    """Make one ``QuantizeLinear`` of the same tensor with the same scale and zero point out of several.

    Two quantized layers reading one tensor (a ResNet block's ``conv1`` and ``downsample``) each export
    their own ``Q`` with equal values; onnxruntime fuses a producer with its quantization only when the
    output has a single ``Q`` reader, so the duplicates are merged.
    """
    for tensor in list(index.consumers):
        quantizers = [n for n in index.users(tensor) if n.op_type == "QuantizeLinear" and n.input[0] == tensor]
        kept: list[NodeProto] = []
        for q in quantizers:
            twin = next((k for k in kept if _same_quantization(index, k, q)), None)
            if twin is None:
                kept.append(q)
                continue
            for reader in list(index.users(q.output[0])):
                for position, name in enumerate(reader.input):
                    if name == q.output[0]:
                        index.set_input(reader, position, twin.output[0])
            index.remove(q)


def _same_quantization(index: GraphIndex, a: NodeProto, b: NodeProto) -> bool:
    if _attribute(a, "axis", 1) != _attribute(b, "axis", 1) or len(a.input) != len(b.input):
        return False
    for name_a, name_b in zip(a.input[1:], b.input[1:], strict=True):
        value_a, value_b = index.array(name_a), index.array(name_b)
        if value_a is None or value_b is None or value_a.dtype != value_b.dtype:
            return False
        if not np.array_equal(value_a, value_b):
            return False
    return True


def _bypass(index: GraphIndex, q: NodeProto, dq: NodeProto) -> None:
    """Remove ``x → Q → DQ → y``: readers of ``y`` read ``x`` (a graph output ``y`` = ``Identity(x)``)."""
    source, target = q.input[0], dq.output[0]
    if any(o.name == target for o in index.model.graph.output):
        index.replace(dq, [helper.make_node("Identity", [source], [target])])
    else:
        for reader in list(index.users(target)):
            for position, name in enumerate(reader.input):
                if name == target:
                    index.set_input(reader, position, source)
        index.remove(dq)
    if not index.users(q.output[0]):
        index.remove(q)


def _qdq_pairs(index: GraphIndex) -> list[tuple[NodeProto, NodeProto]]:
    pairs = []
    for q in index.nodes:
        if q.op_type != "QuantizeLinear":
            continue
        readers = index.users(q.output[0])
        if len(readers) == 1 and readers[0].op_type == "DequantizeLinear":
            pairs.append((q, readers[0]))
    return pairs


def drop_redundant_quantize(index: GraphIndex) -> None:
    """Remove a layer-output ``Q → DQ`` that another quantization right after it makes redundant.

    The export quantizes each quantized layer's output (with the range observed in QAT) so that
    onnxruntime has an int8 output to fuse with. Where the value is re-quantized anyway (``DQ → Q``,
    ``DQ → Relu → Q``: the next layer's input) the first rounding only adds error; where the value is a
    graph output (logits) it only costs precision. Both are removed.
    """
    graph_outputs = {o.name for o in index.model.graph.output}
    for q, dq in _qdq_pairs(index):
        readers = index.users(dq.output[0])
        if len(readers) == 1 and readers[0].op_type == "Relu":
            readers = index.users(readers[0].output[0])
        requantized = bool(readers) and all(r.op_type == "QuantizeLinear" for r in readers)
        if requantized or dq.output[0] in graph_outputs:
            producer = index.producer.get(q.input[0])
            if producer is not None and producer.op_type != "DequantizeLinear":
                _bypass(index, q, dq)


_INT8_MULTI_INPUT = ("Add", "Concat")


def int8_residuals(index: GraphIndex) -> None:
    """Let onnxruntime run residual ``Add`` (and ``Concat``) in int8: ``QLinearAdd`` / ``QLinearConcat``.

    onnxruntime fuses ``DQ → Add → Q`` only when *every* input comes from a ``DequantizeLinear``. A
    residual branch reads the block input as a float, although that tensor is quantized for the next
    conv right next to it (``x → Q → DQ → conv``). The float input is replaced by that ``DQ``'s output:
    the same value up to half a step of the scale observed on ``x``. Done only where the op's output
    is itself quantized (directly or through a ``Relu``), otherwise nothing would run in int8.
    """
    for node in [n for n in index.nodes if n.op_type in _INT8_MULTI_INPUT]:
        readers = index.users(node.output[0])
        if len(readers) == 1 and readers[0].op_type == "Relu":
            readers = index.users(readers[0].output[0])
        if not any(r.op_type == "QuantizeLinear" for r in readers):
            continue
        replacements = {}
        for position, name in enumerate(node.input):
            producer = index.producer.get(name)
            if producer is not None and producer.op_type == "DequantizeLinear":
                continue
            dq = _dequantized_copy(index, name)
            if dq is None:
                break
            replacements[position] = dq
        else:
            for position, name in replacements.items():
                index.set_input(node, position, name)


def _dequantized_copy(index: GraphIndex, tensor: str) -> str | None:
    """The output of ``tensor → Q → DQ`` already in the graph (with constant scale), if there is one."""
    for q in index.users(tensor):
        if q.op_type != "QuantizeLinear" or q.input[1] not in index.initializers:
            continue
        for dq in index.users(q.output[0]):
            if dq.op_type == "DequantizeLinear" and list(dq.input[1:]) == list(q.input[1:]):
                return dq.output[0]
    return None


def integer_matmuls(index: GraphIndex, dynamic_inputs: bool = True) -> None:
    """Rewrite float-output ``Gemm`` over an int8 ``DequantizeLinear`` weight to an int8 kernel.

    onnxruntime fuses ``DQ → Gemm → (Relu) → Q`` into an int8 ``QGemm``; a Gemm whose output is not
    re-quantized would run in fp32 after dequantizing its weight on every call. With a statically
    quantized input it becomes onnxruntime's ``QGemm`` without output scale (fp32 output, one fused
    kernel) plus the fp32 bias: the same arithmetic, int8 kernels. A weight-only layer becomes
    ``MatMulInteger(x_q, W_q^T) * (x_scale * w_scale) + b`` with a per-call ``DynamicQuantizeLinear`` of its
    input (onnxruntime fuses it), as ``quantize_dynamic`` does: *not* the same arithmetic as the PyTorch
    weight-only model, whose input stays float — the input is rounded to 8 bits per tensor at run time,
    which costs accuracy where a few tokens are much larger than the rest (``activation_granularity="token"``
    quantizes per row instead). With ``dynamic_inputs=False`` weight-only layers are left as they are
    (float input, dequantized weight: the PyTorch model's numbers, fp32 kernels).
    """
    for node in [n for n in index.nodes if n.op_type == "Gemm"]:
        if _requantized(index, node.output[0]) or not _plain_transposed_gemm(node):
            continue
        found = _int8_weight(index, node.input[1])
        if found is None:
            continue
        weight_dq, codes, w_scale, w_zero = found
        input_dq = index.producer.get(node.input[0])
        static = _static_input_quantization(index, input_dq)
        if not static and not dynamic_inputs:
            _float_dequantize(index, weight_dq)
            continue
        prefix = node.output[0] + "_int"
        index.set_initializer(prefix + "_wT", np.ascontiguousarray(codes.T))
        index.set_initializer(prefix + "_w", codes)
        index.set_initializer(prefix + "_wzp", w_zero)
        if static:
            assert input_dq is not None
            nodes = _static_matmul(index, prefix, input_dq, w_scale.astype(np.float32))
        else:
            nodes = _dynamic_matmul(index, prefix, node.input[0], w_scale.astype(np.float32))
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [prefix + "_scaled", node.input[2]], [node.output[0]]))
        else:
            nodes.append(helper.make_node("Identity", [prefix + "_scaled"], [node.output[0]]))
        index.replace(node, nodes)
    _weight_only_matmuls(index, dynamic_inputs)


def _weight_only_matmuls(index: GraphIndex, dynamic_inputs: bool = True) -> None:
    """``MatMul(x, Transpose(DequantizeLinear(W_q)))`` of a float input to the per-call int8 form.

    ``F.linear`` on an input of more than two dims exports as that ``MatMul`` (then an ``Add`` of the bias),
    not as ``Gemm``. With a statically quantized input onnxruntime fuses it into ``MatMulIntegerToFloat``
    itself; with a float input (weight-only layers) onnxruntime would fuse ``DequantizeLinear`` → ``MatMul``
    into an 8-bit ``MatMulNBits`` at its session default accuracy level (slower than fp32 in ``benchmarks/``,
    and rounding the input all the same), so it gets the ``DynamicQuantizeLinear`` → ``MatMulInteger`` form of
    :func:`integer_matmuls`, as ``quantize_dynamic`` does; ``dynamic_inputs=False``: :func:`_float_dequantize`.
    """
    for node in [n for n in index.nodes if n.op_type == "MatMul"]:
        transpose = index.producer.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or list(_attribute(transpose, "perm", [])) != [1, 0]:
            continue
        found = _int8_weight(index, transpose.input[0])
        input_dq = index.producer.get(node.input[0])
        if found is None or (input_dq is not None and input_dq.op_type == "DequantizeLinear"):
            continue  # no int8 weight, or a statically quantized input (onnxruntime's own fusion handles it)
        weight_dq, codes, w_scale, w_zero = found
        if not dynamic_inputs:
            _float_dequantize(index, weight_dq)
            continue
        prefix = node.output[0] + "_int"
        index.set_initializer(prefix + "_wT", np.ascontiguousarray(codes.T))
        index.set_initializer(prefix + "_wzp", w_zero)
        nodes = _dynamic_matmul(index, prefix, node.input[0], w_scale.astype(np.float32))
        nodes.append(helper.make_node("Identity", [prefix + "_scaled"], [node.output[0]]))
        index.replace(node, nodes)


def _int8_weight(index: GraphIndex, name: str) -> tuple[NodeProto, np.ndarray, np.ndarray, np.ndarray] | None:
    """``(DequantizeLinear node, codes, scale, zero point)`` when ``name`` is a dequantized 2-d int8 initializer."""
    weight_dq = index.producer.get(name)
    if weight_dq is None or weight_dq.op_type != "DequantizeLinear" or len(weight_dq.input) < 3:
        return None
    codes, scale, zero = (index.array(n) for n in weight_dq.input[:3])
    if codes is None or scale is None or zero is None or codes.ndim != 2 or codes.dtype not in (np.int8, np.uint8):
        return None
    return weight_dq, codes, scale, zero


def _float_dequantize(index: GraphIndex, weight_dq: NodeProto) -> None:
    """A per-channel weight ``DequantizeLinear`` as ``(Cast(codes) - zero) * scale``: the same numbers.

    onnxruntime fuses ``DequantizeLinear`` → ``MatMul`` into ``MatMulNBits`` at its session default
    ``session.qdq_matmulnbits_accuracy_level=4``, which rounds the *input* to int8: the plain arithmetic
    keeps the input float (onnxruntime folds it into an fp32 weight when the session starts; the file keeps
    the int8 codes).
    """
    codes, scale, zero = weight_dq.input[:3]
    axis = int(_attribute(weight_dq, "axis", 1))
    rank = index.array(codes).ndim  # type: ignore[union-attr]
    shape = [-1 if d == axis % rank else 1 for d in range(rank)]
    prefix = weight_dq.output[0] + "_float"
    index.set_initializer(prefix + "_scale", index.array(scale).astype(np.float32).reshape(shape))  # type: ignore[union-attr]
    index.set_initializer(prefix + "_zero", index.array(zero).astype(np.float32).reshape(shape))  # type: ignore[union-attr]
    index.replace(
        weight_dq,
        [
            helper.make_node("Cast", [codes], [prefix + "_codes"], to=TensorProto.FLOAT),
            helper.make_node("Sub", [prefix + "_codes", prefix + "_zero"], [prefix + "_centred"]),
            helper.make_node("Mul", [prefix + "_centred", prefix + "_scale"], [weight_dq.output[0]]),
        ],
    )


def _requantized(index: GraphIndex, output: str) -> bool:
    """Whether every reader of ``output`` (through one ``Relu``) is a ``QuantizeLinear``."""
    users = index.users(output)
    if len(users) == 1 and users[0].op_type == "Relu":
        users = index.users(users[0].output[0])
    return bool(users) and all(u.op_type == "QuantizeLinear" for u in users)


def _plain_transposed_gemm(node: NodeProto) -> bool:
    """``Y = X W^T + b`` exactly (what ``F.linear`` exports to)."""
    transposed_a = _attribute(node, "transA", 0)
    return not transposed_a and bool(_attribute(node, "transB", 0)) and _attribute(node, "alpha", 1.0) == 1.0


def _static_input_quantization(index: GraphIndex, input_dq: NodeProto | None) -> bool:
    return (
        input_dq is not None
        and input_dq.op_type == "DequantizeLinear"
        and len(input_dq.input) > 2
        and input_dq.input[1] in index.initializers
        and input_dq.input[2] in index.initializers
    )


def _static_matmul(index: GraphIndex, prefix: str, input_dq: NodeProto, w_scale: np.ndarray) -> list[NodeProto]:
    """Integer matmul of the already-quantized input, rescaled by ``x_scale * w_scale``."""
    x_q, x_scale_name, x_zero = input_dq.input[:3]
    if index.array(x_q) is None:
        _register_ms_domain(index)
        # onnxruntime's QGemm with no output scale returns fp32: one fused int8 kernel (the MatMulInteger
        # form below is not fused into one when the input is already quantized).
        index.set_initializer(prefix + "_wscale", w_scale.astype(np.float32))
        return [
            helper.make_node(
                "QGemm",
                [x_q, x_scale_name, x_zero, prefix + "_w", prefix + "_wscale", prefix + "_wzp"],
                [prefix + "_scaled"],
                domain="com.microsoft",
                transB=1,
            )
        ]
    x_scale = float(index.array(x_scale_name))  # type: ignore[arg-type]
    index.set_initializer(prefix + "_scale", (w_scale * x_scale).astype(np.float32))
    return [
        helper.make_node("MatMulInteger", [x_q, prefix + "_wT", x_zero, prefix + "_wzp"], [prefix + "_i32"]),
        helper.make_node("Cast", [prefix + "_i32"], [prefix + "_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [prefix + "_f", prefix + "_scale"], [prefix + "_scaled"]),
    ]


def _register_ms_domain(index: GraphIndex) -> None:
    """Declare onnxruntime's ``com.microsoft`` operator domain (``QGemm``) in the model."""
    if not any(o.domain == "com.microsoft" for o in index.model.opset_import):
        index.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _dynamic_matmul(index: GraphIndex, prefix: str, x: str, w_scale: np.ndarray) -> list[NodeProto]:
    """Weight-only layer: quantize the input per call (onnxruntime fuses this into DynamicQuantizeMatMul)."""
    index.set_initializer(prefix + "_scale", w_scale)
    return [
        helper.make_node("DynamicQuantizeLinear", [x], [prefix + "_xq", prefix + "_xs", prefix + "_xzp"]),
        helper.make_node(
            "MatMulInteger", [prefix + "_xq", prefix + "_wT", prefix + "_xzp", prefix + "_wzp"], [prefix + "_i32"]
        ),
        # The scales' product first, then one Mul of the cast result: the pattern of quantize_dynamic's
        # graphs, which onnxruntime fuses into one DynamicQuantizeMatMul kernel.
        helper.make_node("Mul", [prefix + "_xs", prefix + "_scale"], [prefix + "_scales"]),
        helper.make_node("Cast", [prefix + "_i32"], [prefix + "_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [prefix + "_f", prefix + "_scales"], [prefix + "_scaled"]),
    ]
