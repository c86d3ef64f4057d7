"""The quantization API in one namespace (re-exports; the README documents this module).

Where each part lives:

- :mod:`lightning_compress.functional.fake_quant`: integer ranges, scales, fake-quantization, BatchNorm folding;
- :mod:`lightning_compress.functional.qat`: QAT layer classes, :func:`prepare_` / :func:`calibrate_` /
  :func:`finalize_`, conv–BatchNorm pairs;
- :mod:`lightning_compress.functional.int8`: :class:`Int8Layer`, :class:`Int8Embedding`, :func:`convert_to_int8`,
  sizes;
- :mod:`lightning_compress.export.onnx`: :func:`export_onnx` (needs the ``[onnx]`` extra when called).
"""

from __future__ import annotations

from lightning_compress.export.onnx import export_onnx
from lightning_compress.functional.fake_quant import (
    SUPPORTED_ACTIVATION_BITS,
    SUPPORTED_WEIGHT_BITS,
    activation_qparams,
    activation_qrange,
    dequantize_weight,
    dequantize_weight_grouped,
    fake_quantize_activation,
    fake_quantize_weight,
    fake_quantize_weight_grouped,
    fold_batchnorm,
    group_weight_scale,
    quantize_weight,
    quantize_weight_grouped,
    weight_qrange,
    weight_scale,
)
from lightning_compress.functional.int8 import (
    Int8Embedding,
    Int8Layer,
    convert_to_int8,
    int8_embeddings,
    int8_layers,
    quantized_size_bytes,
)
from lightning_compress.functional.qat import (
    OPTIONAL_TYPES,
    QUANTIZABLE_TYPES,
    FoldedBatchNorm1d,
    FoldedBatchNorm2d,
    QATConv1d,
    QATConv2d,
    QATEmbedding,
    QATLinear,
    calibrate_,
    conv_bn_pairs,
    finalize_,
    is_qat,
    prepare_,
    qat_modules,
)

__all__ = [
    "OPTIONAL_TYPES",
    "QUANTIZABLE_TYPES",
    "SUPPORTED_ACTIVATION_BITS",
    "SUPPORTED_WEIGHT_BITS",
    "FoldedBatchNorm1d",
    "FoldedBatchNorm2d",
    "Int8Embedding",
    "Int8Layer",
    "QATConv1d",
    "QATConv2d",
    "QATEmbedding",
    "QATLinear",
    "activation_qparams",
    "activation_qrange",
    "calibrate_",
    "conv_bn_pairs",
    "convert_to_int8",
    "dequantize_weight",
    "dequantize_weight_grouped",
    "export_onnx",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "fake_quantize_weight_grouped",
    "finalize_",
    "fold_batchnorm",
    "group_weight_scale",
    "int8_embeddings",
    "int8_layers",
    "is_qat",
    "prepare_",
    "qat_modules",
    "quantize_weight",
    "quantize_weight_grouped",
    "quantized_size_bytes",
    "weight_qrange",
    "weight_scale",
]
