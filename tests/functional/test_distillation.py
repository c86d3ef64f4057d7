import math

import pytest
import torch
from torch import nn

from lightning_compress.functional import distillation as D


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """Hinton et al.: T^2 * mean over rows of sum_c p_t (log p_t - log p_s), in float64 by hand."""
    s = student.double().reshape(-1, student.shape[-1]) / temperature
    t = teacher.double().reshape(-1, teacher.shape[-1]) / temperature
    log_ps = s - s.exp().sum(-1, keepdim=True).log()
    log_pt = t - t.exp().sum(-1, keepdim=True).log()
    return float((log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * temperature**2)


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 7)])
@pytest.mark.parametrize("temperature", [1.0, 2.5, 8.0])
def test_soft_target_kl_matches_reference(shape: tuple[int, ...], temperature: float) -> None:
    student, teacher = torch.randn(shape) * 3, torch.randn(shape) * 3
    got = float(D.soft_target_kl(student, teacher, temperature))
    assert got == pytest.approx(reference_kl(student, teacher, temperature), rel=1e-5, abs=1e-7)
    unscaled = float(D.soft_target_kl(student, teacher, temperature, scale=False))
    assert unscaled == pytest.approx(got / temperature**2, rel=1e-5)


def test_soft_target_kl_on_a_class_axis_other_than_last() -> None:
    student, teacher = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)  # per-pixel classes on axis 1
    got = float(D.soft_target_kl(student, teacher, 2.0, dim=1))
    ref = reference_kl(student.movedim(1, -1), teacher.movedim(1, -1), 2.0)
    assert got == pytest.approx(ref, rel=1e-5)


def test_t_squared_scaling_keeps_the_gradient_size_at_high_temperature() -> None:
    # Hinton et al. 2015, section 2.1: for zero-mean logits and T >> |z|, the gradient of T^2 * KL with
    # respect to the student's logits tends to (z_s - z_t) / C per row (divided by N for the batch mean).
    n, c = 4, 6
    zs, zt = torch.randn(n, c), torch.randn(n, c)
    zs, zt = zs - zs.mean(-1, keepdim=True), zt - zt.mean(-1, keepdim=True)
    zs.requires_grad_(True)
    D.soft_target_kl(zs, zt, temperature=500.0).backward()
    torch.testing.assert_close(zs.grad, (zs.detach() - zt) / (c * n), rtol=1e-2, atol=1e-5)
    # Without T^2 the gradient would vanish like 1/T^2.
    scaled, zs.grad = zs.grad, None
    D.soft_target_kl(zs, zt, temperature=500.0, scale=False).backward()
    torch.testing.assert_close(zs.grad * 500.0**2, scaled, rtol=1e-3, atol=1e-5)


def test_teacher_gets_no_gradient() -> None:
    student, teacher = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    D.soft_target_kl(student, teacher, 2.0).backward()
    D.logit_mse(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


def test_logit_mse_and_combination_match_reference() -> None:
    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    assert float(D.logit_mse(student, teacher)) == pytest.approx(float(((student - teacher) ** 2).mean()), rel=1e-6)
    task = torch.tensor(1.7)
    for alpha in (0.0, 0.3, 1.0):
        got = D.distillation_loss(task, student, teacher, alpha=alpha, temperature=3.0)
        ref = (1 - alpha) * 1.7 + alpha * reference_kl(student, teacher, 3.0)
        assert float(got) == pytest.approx(ref, rel=1e-5)
    got = D.distillation_loss(task, student, teacher, alpha=0.5, loss="mse")
    assert float(got) == pytest.approx(0.85 + 0.5 * float(((student - teacher) ** 2).mean()), rel=1e-6)


def test_half_precision_logits_are_upcast() -> None:
    student, teacher = torch.randn(16, 10) * 4, torch.randn(16, 10) * 4
    full = D.soft_target_kl(student, teacher, 4.0)
    half = D.soft_target_kl(student.bfloat16(), teacher.bfloat16(), 4.0)
    assert half.dtype == torch.float32
    ref = reference_kl(student.bfloat16().float(), teacher.bfloat16().float(), 4.0)
    assert float(half) == pytest.approx(ref, rel=1e-5)
    assert float(half) == pytest.approx(float(full), rel=0.05)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: D.soft_target_kl(torch.zeros(2, 3), torch.zeros(2, 3), 0.0), "temperature must be > 0"),
        (lambda: D.soft_target_kl(torch.zeros(2, 3), torch.zeros(2, 3), -1.0), "temperature must be > 0"),
        (lambda: D.soft_target_kl(torch.zeros(2, 3), torch.zeros(2, 4)), r"teacher output shape \(2, 4\)"),
        (lambda: D.logit_mse(torch.zeros(2, 3), torch.zeros(3, 3)), "incompatible"),
        (
            lambda: D.distillation_loss(torch.tensor(1.0), torch.zeros(1, 2), torch.zeros(1, 2), alpha=1.5),
            "alpha",
        ),
        (lambda: D.logit_loss(torch.zeros(1, 2), torch.zeros(1, 2), "l1"), "loss must be one of"),
        (lambda: D.make_adapter((2, 8, 4, 4), (2, 16, 2, 2)), "differ in more than their width"),
        (lambda: D.make_adapter((2, 8), (2, 16, 3)), "differ in more than their width"),
        (lambda: D.make_adapter((2, 8, 5), (2, 16, 6)), "differ in more than their width"),
        (lambda: D.make_adapter((8,), (16,)), "rank 1"),
        (lambda: D.select_output({"out": torch.zeros(1)}), "cannot find the logits"),
        (lambda: D.select_output((torch.zeros(1),), key=3), "cannot find the logits"),
    ],
)
def test_bad_input(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("student", "teacher", "kind"),
    [
        ((4, 8), (4, 16), nn.Linear),
        ((4, 5, 8), (4, 5, 16), nn.Linear),
        ((4, 8, 6), (4, 16, 6), nn.Conv1d),
        ((4, 8, 3, 3), (4, 16, 3, 3), nn.Conv2d),
        ((2, 8, 2, 3, 3), (2, 4, 2, 3, 3), nn.Conv3d),
    ],
)
def test_adapters_map_width_and_learn(student, teacher, kind) -> None:
    adapter = D.make_adapter(student, teacher)
    assert isinstance(adapter, kind)
    s, t = torch.randn(student), torch.randn(teacher)
    assert adapter(s).shape == t.shape
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.5)
    first = float(D.feature_mse(s, t, adapter).detach())
    for _ in range(20):
        optimizer.zero_grad()
        D.feature_mse(s, t, adapter).backward()
        optimizer.step()
    assert float(D.feature_mse(s, t, adapter).detach()) < first


def test_feature_mse_without_adapter_and_agreement() -> None:
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    assert float(D.feature_mse(s, t)) == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-6)
    student = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.0, 1.0], [0.5, 0.4, 0.1]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.9, 0.0, 0.0]])
    assert float(D.top1_agreement(student, teacher)) == 0.75


def test_select_output_forms() -> None:
    logits = torch.randn(2, 3)

    class Out:
        def __init__(self) -> None:
            self.logits, self.hidden = logits, torch.zeros(1)

    assert D.select_output(logits) is logits
    assert D.select_output({"logits": logits}) is logits
    assert D.select_output(Out()) is logits
    assert D.select_output(Out(), "hidden").shape == (1,)
    assert D.select_output((logits, None)) is logits
    assert D.select_output([None, logits], key=-1) is logits
    assert D.select_output({"y": logits}, key="y") is logits
    assert math.isfinite(float(D.soft_target_kl(logits, logits * 2, 2.0)))
