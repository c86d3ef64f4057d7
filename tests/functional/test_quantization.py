from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.functional import quantization as Q


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16, 10),
    )


def _bytes(obj: object) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


# ------------------------------------------------------------------------------------ math vs reference
@pytest.mark.parametrize("bits", [8, 4])
def test_weight_fake_quant_matches_reference(bits: int) -> None:
    w = torch.randn(6, 5, 3)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().flatten(1).max(1).values / qmax
    expected = torch.clamp(torch.round(w / scale[:, None, None]), -qmax, qmax) * scale[:, None, None]
    got = Q.fake_quantize_weight(w, Q.weight_scale(w, bits), bits)
    torch.testing.assert_close(got, expected)
    assert got.unique(dim=None).numel() <= 6 * (2 * qmax + 1)
    codes, s = Q.quantize_weight(w, bits)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == qmax
    torch.testing.assert_close(codes.float() * s[:, None, None], expected)


def test_fake_quant_straight_through_gradient_and_exact_zero() -> None:
    w = torch.randn(4, 8)
    w[:, ::2] = 0.0
    w.requires_grad_(True)
    out = Q.fake_quantize_weight(w, Q.weight_scale(w, 8), 8)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # symmetric scale never clips: gradient passes everywhere
    assert torch.all(out[:, ::2] == 0)  # zero point 0: pruned weights stay exactly zero


def test_activation_qparams_reference() -> None:
    lo, hi = torch.tensor(-0.5), torch.tensor(2.0)
    scale, zp = Q.activation_qparams(lo, hi, 8)
    assert float(scale) == pytest.approx(2.5 / 255)
    assert int(zp) == round(0.5 / (2.5 / 255))
    x = torch.tensor([-0.5, 0.0, 1.0, 2.0, 5.0])
    y = Q.fake_quantize_activation(x, scale, zp, 8)
    expected = (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
    torch.testing.assert_close(y, expected)
    assert y[1] == 0.0  # zero is exactly representable
    # A range that does not contain 0 is widened to contain it.
    scale, zp = Q.activation_qparams(torch.tensor(1.0), torch.tensor(3.0), 8)
    assert int(zp) == 0 and float(scale) == pytest.approx(3.0 / 255)


def test_fold_batchnorm_matches_conv_then_bn() -> None:
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    bn.eval()
    x = torch.randn(2, 3, 7, 7)
    w, b = Q.fold_batchnorm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    torch.testing.assert_close(F.conv2d(x, w, b), bn(conv(x)), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ swap and inverse
def test_prepare_forward_matches_manual_reference() -> None:
    model = _mlp()
    x = torch.randn(8, 16)
    Q.prepare_(model)
    model.train()
    out = model(x)
    # Reference: every Linear sees a fake-quantized input (range observed on this very batch) and weight.
    h = x
    for layer in (model[0], model[2], model[4]):
        lo, hi = h.min(), h.max()
        scale, zp = Q.activation_qparams(lo, hi, 8)
        hq = (torch.clamp(torch.round(h / scale) + zp, 0, 255) - zp) * scale
        w = layer.weight
        ws = w.abs().max(1).values / 127
        wq = torch.clamp(torch.round(w / ws[:, None]), -127, 127) * ws[:, None]
        h = F.linear(hq, wq, layer.bias)
        if layer is not model[4]:
            h = h.relu()
    torch.testing.assert_close(out, h, atol=1e-5, rtol=1e-5)


def test_prepare_finalize_round_trip() -> None:
    model = _cnn()
    reference = copy.deepcopy(model)
    weights = [p for p in model.parameters()]
    keys = set(model.state_dict())
    names = Q.prepare_(model, fold_bn=True)
    assert names == ["0", "4", "7"]
    assert [p for p in model.parameters()] == weights  # the same Parameter objects (optimizers, other callbacks)
    assert set(model.state_dict()) == keys | {f"{n}.{b}" for n in names for b in ("weight_scale", "activation_range")}
    model.train()
    model(torch.randn(4, 1, 8, 8))
    Q.finalize_(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert set(model.state_dict()) == keys
    reference.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    reference.eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(x), reference(x))


def test_folded_bn_training_and_inference_forms() -> None:
    torch.manual_seed(1)
    model = _cnn()
    reference = copy.deepcopy(model)
    Q.prepare_(model, fold_bn=True)
    for _, m in Q.qat_modules(model):
        m.fake_quant_enabled = False  # isolate the folding arithmetic from the rounding
    x = torch.randn(16, 1, 8, 8)
    model.train()
    reference.train()
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)  # batch stats still update
    assert int(model[1].num_batches_tracked) == 1
    model.eval()
    reference.eval()
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)


def test_calibrate_is_ptq() -> None:
    model = _mlp()
    Q.prepare_(model, ema_decay=0.0)  # decay 0: the range of the last batch
    batches = [(torch.randn(8, 16) * (i + 1), torch.zeros(8)) for i in range(3)]
    assert Q.calibrate_(model, batches, num_batches=2) == 2
    x = batches[1][0]
    torch.testing.assert_close(model[0].activation_range, torch.stack([x.min(), x.max()]))
    assert not model.training and not model[0].observer_enabled
    frozen = model[0].activation_range.clone()
    model.train()
    model(torch.randn(8, 16) * 100)
    assert torch.equal(model[0].activation_range, frozen)


# ------------------------------------------------------------------------------------ conversion
@pytest.mark.parametrize("fold_bn", [True, False])
def test_convert_matches_fake_quant_and_is_4x_smaller(fold_bn: bool) -> None:
    model = _cnn()
    Q.prepare_(model, fold_bn=fold_bn)
    x = torch.randn(64, 1, 8, 8)
    model.train()
    model(x)
    model.eval()
    int8 = Q.convert_to_int8(model)
    assert model[0].__class__ is Q.QATConv2d  # the original is untouched
    with torch.no_grad():
        torch.testing.assert_close(int8(x), model(x), atol=1e-4, rtol=1e-4)
    assert {m.weight_int8.dtype for m in Q.int8_layers(int8).values()} == {torch.int8}
    assert isinstance(int8[1], nn.Identity) == fold_bn


def test_linear_int8_state_dict_ratio_and_outputs() -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    fp32_bytes = _bytes(model.state_dict())
    Q.prepare_(model)
    model.train()
    x = torch.randn(32, 256)
    model(x)
    model.eval()
    int8 = Q.convert_to_int8(model)
    ratio = fp32_bytes / _bytes(int8.state_dict())
    assert ratio >= 3.8
    with torch.no_grad():
        fast = int8(x)
        h = torch.fake_quantize_per_tensor_affine(
            F.relu(int8[0](x)), int8[2].input_scale, int8[2].input_zero_point, 0, 255
        )
        reference = F.linear(h, int8[2].weight_int8.float() * int8[2].weight_scale[:, None], int8[2].bias)
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-4)


def test_pruned_zeros_survive_conversion_and_4bit_range() -> None:
    model = _cnn()
    with torch.no_grad():
        for m in (model[0], model[4], model[7]):
            m.weight.view(m.weight.shape[0], -1)[:, ::2] = 0.0
    Q.prepare_(model, weight_bits={"0": 8, "4": 4, "7": 4}, fold_bn=True)
    model.train()
    model(torch.randn(8, 1, 8, 8))
    int8 = Q.convert_to_int8(model)
    for i in (0, 4, 7):
        codes = int8[i].weight_int8.view(int8[i].weight_int8.shape[0], -1)
        assert torch.all(codes[:, ::2] == 0) and torch.all(codes[:, 1::2].abs().sum(1) > 0)
    assert int(int8[4].weight_int8.abs().max()) == 7 and int(int8[0].weight_int8.abs().max()) == 127


def test_convert_requires_prepared_model() -> None:
    with pytest.raises(ValueError, match="no QAT layer"):
        Q.convert_to_int8(_mlp())


# ------------------------------------------------------------------------------------ ONNX
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _session(path: str) -> tuple[object, list[str]]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = path + ".opt.onnx"
    so.log_severity_level = 3
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(path + ".opt.onnx").graph.node]
    return session, ops


@pytest.mark.parametrize("activation_bits", [8, None])
def test_export_onnx_int8_initializers_and_int8_kernels(tmp_path, activation_bits: int | None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    x = torch.randn(256, 64)
    fp32_path = str(tmp_path / "fp32.onnx")
    torch.onnx.export(model, (x,), fp32_path, dynamo=False, input_names=["input"])
    Q.prepare_(model, activation_bits=activation_bits)
    model.train()
    model(x)
    model.eval()
    path = Q.export_onnx(model, str(tmp_path / "int8.onnx"), x[:1])
    graph = onnx.load(path).graph
    weights = [i for i in graph.initializer if len(i.dims) == 2]
    # 8-bit weight initializers (8-bit codes become uint8 with zero point 128: exact on AVX2-only CPUs).
    assert weights and all(i.data_type == onnx.TensorProto.UINT8 for i in weights)
    import os

    assert os.path.getsize(fp32_path) / os.path.getsize(path) >= 3.3  # biases and scales stay fp32
    session, ops = _session(path)
    assert not any(op in ("Gemm", "FusedGemm", "MatMul") for op in ops), ops  # no fp32 matmul left
    assert any(op in ("QGemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat") for op in ops)
    got = session.run(None, {"input": x.numpy()})[0]  # dynamic batch: traced with 1 row, run with 256
    with torch.no_grad():
        expected = model(x).numpy()
    agreement = float((got.argmax(1) == expected.argmax(1)).mean())
    assert agreement >= 0.97
    if activation_bits is not None:  # static scales: the same arithmetic up to int rounding of the bias
        assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


def test_export_onnx_conv_and_keyword_inputs(tmp_path) -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _cnn()
            self.extra = nn.Linear(3, 10)

        def forward(self, image: torch.Tensor, *, side: torch.Tensor) -> torch.Tensor:
            return self.body(image) + self.extra(side)

    model = TwoInputs()
    Q.prepare_(model, fold_bn=True)
    image, side = torch.randn(16, 1, 8, 8), torch.randn(16, 3)
    model.train()
    model(image, side=side)
    model.eval()
    path = Q.export_onnx(model, str(tmp_path / "m.onnx"), {"image": image[:2], "side": side[:2]})
    session, ops = _session(path)
    # Both convs run as int8 QLinearConv: the second one's input Q/DQ was hoisted through MaxPool.
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops and "FusedConv" not in ops, ops
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, (image.numpy(), side.numpy()), strict=True)))[0]
    with torch.no_grad():
        expected = model(image, side=side).numpy()
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


def test_export_onnx_requires_example_input(tmp_path) -> None:
    model = _mlp()
    Q.prepare_(model)
    with pytest.raises(ValueError, match="example_input"):
        Q.export_onnx(model, str(tmp_path / "m.onnx"), None)
    assert not (tmp_path / "m.onnx").exists()


def test_export_onnx_weight_storage(tmp_path) -> None:
    model = _mlp()
    Q.prepare_(model, weight_bits={"0": 7, "2": 8, "4": 7})
    model.train()
    model(torch.randn(8, 16))

    def dtypes(weight_dtype: str) -> list[int]:
        path = Q.export_onnx(model, str(tmp_path / "m.onnx"), torch.randn(1, 16), weight_dtype=weight_dtype)
        graph = onnx.load(path).graph
        return [i.data_type for i in graph.initializer if len(i.dims) == 2]

    int8, uint8 = onnx.TensorProto.INT8, onnx.TensorProto.UINT8
    assert dtypes("int8") == [int8, int8, int8]
    assert dtypes("uint8") == [uint8, uint8, uint8]
    assert sorted(dtypes("auto")) == sorted([int8, uint8, int8])  # 7-bit codes fit the fast signed kernels
    with pytest.raises(ValueError, match="weight_dtype"):
        Q.export_onnx(model, str(tmp_path / "x.onnx"), torch.randn(1, 16), weight_dtype="int4")


def test_conv1d_prepare_convert_export(tmp_path) -> None:
    model = nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12, 4)
    )
    names = Q.prepare_(model, fold_bn=True)
    assert names == ["0", "4"] and isinstance(model[1], Q.FoldedBatchNorm1d)
    x = torch.randn(32, 3, 12)
    model.train()
    model(x)
    model.eval()
    int8 = Q.convert_to_int8(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(int8(x), expected, atol=1e-4, rtol=1e-4)
    session, ops = _session(Q.export_onnx(model, str(tmp_path / "c1.onnx"), x[:1]))
    got = session.run(None, {"input": x.numpy()})[0]
    assert (got.argmax(1) == expected.numpy().argmax(1)).mean() >= 0.97
    assert np.abs(got - expected.numpy()).max() < 0.05 * np.abs(expected.numpy()).max()
