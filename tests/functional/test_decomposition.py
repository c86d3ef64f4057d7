"""Numeric checks of the decomposition functions against reference computations."""

from __future__ import annotations

import math

import pytest
import tensorly as tl
import torch
from torch import nn

from lightning_compress.functional import decomposition as F
from lightning_compress.functional.stats import module_flops


def _conv(i: int = 6, o: int = 10, k: int | tuple[int, int] = 3, dtype: torch.dtype = torch.float64, **kw) -> nn.Conv2d:
    return nn.Conv2d(i, o, k, **kw).to(dtype)


CONV_CONFIGS = [
    dict(padding=1),
    dict(stride=2, padding=(1, 2), dilation=(2, 1)),
    dict(k=(3, 5), stride=(1, 2), padding=(2, 1), bias=False),
    dict(padding="same", dilation=2),
    dict(padding=1, padding_mode="circular"),
    dict(padding=(1, 2), padding_mode="reflect", k=(3, 5)),
]


@pytest.mark.parametrize("config", CONV_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_full_rank_tucker2_equals_original(config: dict) -> None:
    conv = _conv(**config)
    chain, error = F.decompose(conv, F.LayerPlan("tucker2", (10, 6)))
    x = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    torch.testing.assert_close(chain(x), conv(x), rtol=1e-9, atol=1e-9)
    assert error < 1e-10
    assert [m.stride for m in chain][1] == conv.stride and chain[1].padding_mode == conv.padding_mode


@pytest.mark.parametrize("config", [dict(), dict(stride=2, padding=1), dict(bias=False, stride=(2, 1))])
def test_full_rank_svd_of_pointwise_conv_and_linear(config: dict) -> None:
    conv = _conv(k=1, **config)
    chain, error = F.decompose(conv, F.LayerPlan("svd", (6,)))
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(chain(x), conv(x), rtol=1e-9, atol=1e-9)
    linear = nn.Linear(12, 7).double()
    chain, error = F.decompose(linear, F.LayerPlan("svd", (7,)))
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(chain(x), linear(x), rtol=1e-9, atol=1e-9)
    assert error < 1e-10


@pytest.mark.parametrize("config", CONV_CONFIGS[:3] + CONV_CONFIGS[4:], ids=str)
def test_cp_chain_equals_conv_with_reconstructed_kernel(config: dict) -> None:
    conv = _conv(**config)
    chain, error = F.decompose(conv, F.LayerPlan("cp", (8,)), n_iter_max=50)
    # Reference: one conv whose kernel is tensorly's own reconstruction of the CP factors.
    weights = [chain[0].weight, chain[1].weight, chain[2].weight, chain[3].weight]
    b = weights[0][:, :, 0, 0].T
    c, d = weights[1][:, 0, :, 0].T, weights[2][:, 0, 0, :].T
    a = weights[3][:, :, 0, 0]
    with tl.backend_context("pytorch"):
        kernel = tl.cp_to_tensor((torch.ones(8, dtype=torch.float64), [a, b, c, d]))
    reference = nn.Conv2d(
        6,
        10,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        padding_mode=conv.padding_mode,
        bias=conv.bias is not None,
    ).double()
    with torch.no_grad():
        reference.weight.copy_(kernel)
        if conv.bias is not None:
            reference.bias.copy_(conv.bias)
    x = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    torch.testing.assert_close(chain(x), reference(x), rtol=1e-9, atol=1e-9)
    w = conv.weight.detach()
    measured = float(torch.linalg.norm(w - kernel.detach()) / torch.linalg.norm(w))
    assert error == pytest.approx(measured, rel=1e-6)
    assert [m.groups for m in chain] == [1, 8, 8, 1]


def test_truncated_svd_error_is_eckart_young_optimal() -> None:
    linear = nn.Linear(40, 30).double()
    s = torch.linalg.svdvals(linear.weight.detach())
    for r in (1, 5, 20):
        _, error = F.decompose(linear, F.LayerPlan("svd", (r,)))
        assert error == pytest.approx(float(s[r:].norm() / s.norm()), rel=1e-9)


def test_randomized_svd_for_large_linear_is_near_optimal() -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(1100, 12, generator=g) @ torch.randn(12, 1000, generator=g)
    linear = nn.Linear(1000, 1100)
    with torch.no_grad():
        linear.weight.copy_(low + 1e-3 * torch.randn(1100, 1000, generator=g))
    assert linear.weight.numel() > F._EXACT_SVD_MAX_NUMEL  # takes the randomized path
    _, error = F.decompose(linear, F.LayerPlan("svd", (12,)))
    s = torch.linalg.svdvals(linear.weight.detach().double())
    assert error == pytest.approx(float(s[12:].norm() / s.norm()), rel=0.05)


def test_half_precision_and_requires_grad_weights() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1).to(torch.bfloat16)
    chain, error = F.decompose(conv, F.LayerPlan("tucker2", (4, 4)))
    assert all(p.dtype == torch.bfloat16 for p in chain.parameters())
    assert all(p.requires_grad and p.grad_fn is None and p.is_leaf for p in chain.parameters())
    assert 0 < error < 1


@pytest.mark.parametrize(
    ("layer", "plan"),
    [
        (nn.Conv2d(16, 24, 3, stride=2, padding=1), F.LayerPlan("tucker2", (8, 5))),
        (nn.Conv2d(16, 24, (3, 5), stride=(2, 1), padding=(1, 2)), F.LayerPlan("cp", (7,))),
        (nn.Conv2d(16, 24, 1, stride=2), F.LayerPlan("svd", (5,))),
        (nn.Linear(16, 24), F.LayerPlan("svd", (5,))),
    ],
    ids=["tucker2", "cp", "svd-conv", "svd-linear"],
)
def test_macs_and_params_match_measurement(layer: nn.Module, plan: F.LayerPlan) -> None:
    x = torch.randn(2, 16, 10, 12) if isinstance(layer, nn.Conv2d) else torch.randn(2, 3, 16)
    y = layer(x)
    geometry = (
        F.Geometry(n=2, h_in=10, w_in=12, h_out=y.shape[-2], w_out=y.shape[-1])
        if isinstance(layer, nn.Conv2d)
        else F.Geometry(n=6)
    )
    chain = F.build_chain(layer, plan)
    assert 2 * F.macs_of(layer, None, geometry) == module_flops(layer, x)[""]
    assert 2 * F.macs_of(layer, plan, geometry) == module_flops(chain, x)[""]
    assert F.params_of(layer, plan) == sum(p.numel() for p in chain.parameters())
    assert F.params_of(layer, None) == sum(p.numel() for p in layer.parameters())


def _factor_params(method: str, o: int, i: int, kh: int, kw: int, ranks: tuple[int, ...]) -> int:
    """Weights of a rank-``ranks`` factorization of an ``o x i x kh x kw`` kernel, written out by hand."""
    if method == "svd":  # Linear(i, r) -> Linear(r, o)
        return ranks[0] * i + o * ranks[0]
    if method == "tucker2":  # 1x1 (i -> r_in), kh x kw core (r_in -> r_out), 1x1 (r_out -> o)
        r_out, r_in = ranks
        return i * r_in + r_in * r_out * kh * kw + r_out * o
    (r,) = ranks  # CP: 1x1 (i -> r), kh x 1 depthwise, 1 x kw depthwise, 1x1 (r -> o)
    return i * r + r * kh + r * kw + r * o


# Expected ranks by hand: SVD r = floor(ratio * o * i / (o + i)); CP r = floor(ratio * o*i*k*k / (o + i + 2k));
# Tucker-2 ranks (a * o, a * i) floored, with a the positive root of 73728 a^2 + 20480 a = ratio * 73728
# for the 64 -> 128, 3x3 conv (a = 0.1184, 0.3780, 0.6413).
RATIO_CASES = [
    (nn.Linear(300, 200), "svd", 0.05, (6,)),
    (nn.Linear(300, 200), "svd", 0.25, (30,)),
    (nn.Linear(300, 200), "svd", 0.6, (72,)),
    (nn.Conv2d(64, 128, 3), "cp", 0.05, (18,)),
    (nn.Conv2d(64, 128, 3), "cp", 0.25, (93,)),
    (nn.Conv2d(64, 128, 3), "cp", 0.6, (223,)),
    (nn.Conv2d(64, 128, 3), "tucker2", 0.05, (15, 7)),
    (nn.Conv2d(64, 128, 3), "tucker2", 0.25, (48, 24)),
    (nn.Conv2d(64, 128, 3), "tucker2", 0.6, (82, 41)),
]


@pytest.mark.parametrize(("layer", "method", "ratio", "expected"), RATIO_CASES, ids=lambda v: str(v)[:20])
def test_ranks_for_ratio_closed_form(layer: nn.Module, method: str, ratio: float, expected: tuple[int, ...]) -> None:
    ranks = F.ranks_for_ratio(layer, method, ratio)
    assert ranks == expected
    o, i, *k = layer.weight.shape
    kh, kw = (k + [1, 1])[:2]
    target = ratio * layer.weight.numel()
    assert _factor_params(method, o, i, kh, kw, ranks) <= target
    if method != "tucker2":  # one rank more would not fit: the largest rank within the share
        assert _factor_params(method, o, i, kh, kw, (ranks[0] + 1,)) > target
    else:  # the next point on the proportional line (o : i = 2 : 1) would not fit
        assert _factor_params(method, o, i, kh, kw, (ranks[0] + 2, ranks[1] + 1)) > target
    # params_of (bias included) agrees with the hand count
    assert F.params_of(layer, F.LayerPlan(method, ranks)) == _factor_params(method, o, i, kh, kw, ranks) + o


def test_allocate_budget_shares_one_energy_threshold() -> None:
    # A = Linear(8, 8) with weight diag(4, 2, 1, 1, 0, ...): energies 16, 4, 1, 1 of 22, so rank 1 keeps 0.73
    # of it; a rank-r SVD costs 16 r params (dense 64). B = Linear(16, 16) identity: flat spectrum, rank r
    # keeps r / 16 and costs 32 r (dense 256). With a budget of 144 params the largest common threshold e
    # is 0.25: A needs rank 1 (16), B rank 4 (128); e > 0.25 gives B rank 5 (160) and no longer fits.
    # Giving every layer the same rank, or the same share of its own rank, would not produce (1, 4).
    a, b = nn.Linear(8, 8, bias=False), nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])))
        b.weight.copy_(torch.eye(16))
    layers = [(a, "svd", F.Geometry()), (b, "svd", F.Geometry())]
    plans = F.allocate_budget(layers, budget=144, fixed=0, metric="params")
    assert plans == [F.LayerPlan("svd", (1,)), F.LayerPlan("svd", (4,))]
    # 16 params outside the decomposed layers: 128 left, e = 3/16 gives A 1 (16) and B 3 (96).
    assert F.allocate_budget(layers, budget=144, fixed=16, metric="params") == [
        F.LayerPlan("svd", (1,)),
        F.LayerPlan("svd", (3,)),
    ]
    # min_reduction 2.5: B's rank 4 (128 params, 2x below dense 256) would stay dense at 256 and break the
    # budget, so the threshold drops to 3/16: B rank 3 (96, 2.67x below dense).
    assert F.allocate_budget(layers, budget=144, fixed=0, metric="params", min_reduction=2.5) == [
        F.LayerPlan("svd", (1,)),
        F.LayerPlan("svd", (3,)),
    ]


def test_energy_rank_reference() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert [F.energy_rank(s, e) for e in (0.5, 16 / 22, 0.8, 21 / 22, 0.99, 1.0)] == [1, 1, 2, 3, 4, 4]


def test_vbmf_threshold_constant() -> None:
    # Nakajima et al. 2013: tau_thr = 2.5129 for a square matrix.
    assert F._tau_threshold(1.0) == pytest.approx(2.5129, abs=1e-4)


@pytest.mark.parametrize(("shape", "rank", "noise"), [((50, 50), 3, 0.5), ((40, 120), 8, 0.2), ((200, 64), 12, 1.0)])
def test_vbmf_recovers_planted_rank(shape: tuple[int, int], rank: int, noise: float) -> None:
    g = torch.Generator().manual_seed(1)
    signal = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
    assert F.vbmf_rank(signal + noise * torch.randn(*shape, generator=g)) == rank
    assert F.vbmf_rank(torch.randn(*shape, generator=g)) == 0


def test_allocate_budget_meets_budget_and_is_monotone() -> None:
    torch.manual_seed(0)
    layers = [
        (nn.Conv2d(32, 64, 3), "tucker2", F.Geometry(1, 8, 8, 6, 6)),
        (nn.Linear(256, 128), "svd", F.Geometry(4)),
    ]
    full = sum(F.params_of(m, None) for m, _, _ in layers)
    previous = None
    for share in (0.2, 0.4, 0.7):
        plans = F.allocate_budget(layers, budget=int(share * full), fixed=0, metric="params")
        total = sum(F.params_of(m, p) for (m, _, _), p in zip(layers, plans, strict=True))
        assert total <= share * full
        ranks = [p.ranks if p else None for p in plans]
        if previous is not None and None not in ranks and None not in previous:
            assert all(a >= b for r, q in zip(ranks, previous, strict=True) for a, b in zip(r, q, strict=True))
        previous = ranks
    with pytest.raises(ValueError, match="cannot be met"):
        F.allocate_budget(layers, budget=10, fixed=0)


def test_structure_round_trip_through_state_dict() -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 16, 5), nn.Conv2d(8, 8, 1)
    )
    plans = {
        "0": F.LayerPlan("tucker2", (3, 2)),
        "1": F.LayerPlan("cp", (4,)),
        "3": F.LayerPlan("svd", (2,)),
        "4": F.LayerPlan("svd", (3,)),
    }
    for name, plan in plans.items():
        F.set_submodule_(model, name, F.decompose(model.get_submodule(name), plan)[0])
    fresh = nn.Sequential(
        nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 16, 5), nn.Conv2d(8, 8, 1)
    )
    found = F.structure_from_state_dict(fresh, model.state_dict())
    assert found == plans
    F.apply_structure_(fresh, found)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert {k: F.plan_from_chain(fresh.get_submodule(k)) for k in plans} == plans


def test_method_resolution_and_skips() -> None:
    assert F.resolve_method(nn.Linear(4, 4), "auto") == "svd"
    assert F.resolve_method(nn.Conv2d(4, 4, 3), "auto") == "tucker2"
    assert F.resolve_method(nn.Conv2d(4, 4, 1), "cp") == "svd"
    with pytest.raises(ValueError, match="Conv2d layers only"):
        F.resolve_method(nn.Linear(4, 4), "cp")
    with pytest.raises(ValueError, match="Linear and 1x1"):
        F.resolve_method(nn.Conv2d(4, 4, 3), "svd")
    with pytest.raises(ValueError, match="method must be one of"):
        F.resolve_method(nn.Conv2d(4, 4, 3), "tt")
    assert "groups=4" in F.skip_reason(nn.Conv2d(8, 8, 3, groups=4))
    assert F.skip_reason(nn.Conv2d(1, 8, 3)) is not None
    assert F.skip_reason(nn.Conv2d(8, 8, 3)) is None
    assert F.max_ranks(nn.Conv2d(8, 16, 3), "tucker2") == (16, 8)
    assert math.prod(F.max_ranks(nn.Conv2d(8, 16, 3), "cp")) == 8 * 3 * 3


def test_grouped_conv_costs_match_measurement() -> None:
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=4)
    x = torch.randn(2, 32, 6, 6)
    assert F.params_of(conv, None) == sum(p.numel() for p in conv.parameters())
    assert 2 * F.macs_of(conv, None, F.Geometry(2, 6, 6, 6, 6)) == module_flops(conv, x)[""]


@pytest.mark.parametrize("shape", [(20, 90), (90, 20), (30, 30)])
def test_gram_svd_and_singular_values_match_lapack(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(*shape, generator=g, dtype=torch.float64)
    u_ref, s_ref, vh_ref = torch.linalg.svd(m, full_matrices=False)
    torch.testing.assert_close(F.singular_values(m), s_ref)
    u, s, vh = F.gram_svd(m, n_eigenvecs=7)
    assert u.shape == (shape[0], 7) and vh.shape == (7, shape[1])
    torch.testing.assert_close(s, s_ref[:7])
    torch.testing.assert_close(u.T @ u, torch.eye(7, dtype=torch.float64))
    # the same best rank-7 approximation
    torch.testing.assert_close(u * s @ vh, u_ref[:, :7] * s_ref[:7] @ vh_ref[:7])


def test_single_thread_restores_setting() -> None:
    torch.set_num_threads(2)
    try:
        with F.single_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_check_layers_refuses_a_pruning_mask_without_zeros_and_a_few_zeros() -> None:
    # (QAT layers: tests/zoo/test_zoo_decomposition.py, through the callbacks.)
    from lightning_compress.functional import decomposition_plan as planning

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    planning.check_layers(model, [("0", model[0]), ("2", model[2])])  # dense float layers pass
    torch.nn.utils.prune.identity(model[0], "weight")  # a mask of ones: no zeros, only weight_orig/weight_mask
    with pytest.raises(ValueError, match=r"'0': it carries a pruning mask"):
        planning.check_layers(model, [("0", model[0])])
    with torch.no_grad():
        model[2].weight[0, :1] = 0.0  # 1 of 32 weights (3%) exactly zero
    with pytest.raises(ValueError, match=r"'2': 3% of its weights are exactly zero"):
        planning.check_layers(model, [("2", model[2])])


# ---------------------------------------------------------------------------- CP by alternating least squares
def _planted_cp(shape: tuple[int, ...], rank: int, noise: float, seed: int) -> tuple[torch.Tensor, float]:
    """A sum of ``rank`` random rank-one terms plus Gaussian noise; returns it and ||noise|| / ||tensor||."""
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(d, rank, generator=g, dtype=torch.float64) for d in shape]
    letters = "abcdefgh"[: len(shape)]
    signal = torch.einsum(",".join(f"{c}r" for c in letters) + "->" + letters, *factors)
    e = torch.randn(shape, generator=g, dtype=torch.float64)
    e = e * (noise * signal.norm() / e.norm())
    tensor = signal + e
    return tensor, float(e.norm() / tensor.norm())


@pytest.mark.parametrize(("shape", "rank"), [((12, 10, 3, 3), 5), ((9, 8, 7), 4), ((16, 6, 3, 5), 6)])
def test_cp_als_reaches_the_noise_level_of_a_planted_low_rank_tensor(shape: tuple[int, ...], rank: int) -> None:
    tensor, noise = _planted_cp(shape, rank, noise=1e-3, seed=0)
    factors, errors = F.cp_als(tensor, rank, n_iter_max=500, tol=1e-12, seed=0)
    # The planted rank-R tensor is itself a candidate at distance ||noise||, so the best CP of rank R has
    # relative error <= noise; ALS from the SVD start must get within a small factor of it.
    assert [tuple(f.shape) for f in factors] == [(d, rank) for d in shape]
    letters = "abcdefgh"[: len(shape)]
    approx = torch.einsum(",".join(f"{c}r" for c in letters) + "->" + letters, *factors)
    error = float((tensor - approx).norm() / tensor.norm())
    assert error <= 1.5 * noise
    assert errors[-1] == pytest.approx(error, rel=1e-6, abs=1e-9)  # the tracked error is the true one


def test_cp_decompose_of_a_planted_kernel_reports_its_true_error() -> None:
    kernel, noise = _planted_cp((12, 10, 3, 3), 5, noise=1e-3, seed=1)
    conv = _conv(10, 12, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(kernel)
    chain, error = F.decompose(conv, F.LayerPlan("cp", (5,)), n_iter_max=500, tol=1e-12)
    assert error <= 1.5 * noise
    # The chain computes the conv with the reconstructed kernel: its output is as close as the kernel is.
    x = torch.randn(2, 10, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert float((chain(x) - conv(x)).norm() / conv(x).norm()) <= 3 * noise


@pytest.mark.parametrize(("shape", "rank"), [((16, 12, 3, 3), 10), ((20, 6, 3, 3), 30), ((8, 7, 5), 6)])
def test_cp_als_follows_tensorly_parafac_iterate_for_iterate(shape: tuple[int, ...], rank: int) -> None:
    # Reference: tensorly's own parafac with the same initialisation and stopping rule (what decompose used
    # before); rank 30 > 20 and > 6 exercises the random columns of the initialisation.
    from tensorly.decomposition import parafac

    g = torch.Generator().manual_seed(3)
    tensor = torch.randn(shape, generator=g, dtype=torch.float64)
    factors, errors = F.cp_als(tensor, rank, n_iter_max=15, tol=1e-6, seed=4)
    with tl.backend_context("pytorch"):
        cp, reference = parafac(
            tensor, rank, init="svd", svd=F.gram_svd, n_iter_max=15, tol=1e-6, random_state=4, return_errors=True
        )
        expected = tl.cp_to_tensor(cp)
    assert len(errors) == len(reference)
    torch.testing.assert_close(torch.tensor(errors), torch.tensor([float(e) for e in reference]), rtol=1e-6, atol=1e-9)
    with tl.backend_context("pytorch"):
        ours = tl.cp_to_tensor((torch.ones(rank, dtype=torch.float64), factors))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * float(tensor.abs().max()))


def test_cp_is_deterministic_given_the_seed() -> None:
    conv = _conv(8, 12, 3)  # rank 20 > 3: the spatial factors start with random columns
    plan = F.LayerPlan("cp", (20,))
    first, error_1 = F.decompose(conv, plan, seed=7)
    second, error_2 = F.decompose(conv, plan, seed=7)
    third, _ = F.decompose(conv, plan, seed=8)
    assert error_1 == error_2
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[1].weight, third[1].weight)


@pytest.mark.parametrize(("outside", "inside"), [(2, 1), (1, 2), (2, None)])
def test_cp_runs_products_on_num_threads_and_lapack_on_one(
    monkeypatch: pytest.MonkeyPatch, outside: int, inside: int | None
) -> None:
    seen: dict[str, set[int]] = {"products": set(), "lapack": set()}
    khatri_rao, solve_ex = F.khatri_rao, torch.linalg.solve_ex

    def spy_products(*args: object) -> torch.Tensor:
        seen["products"].add(torch.get_num_threads())
        return khatri_rao(*args)

    def spy_lapack(*args: object, **kwargs: object) -> object:
        seen["lapack"].add(torch.get_num_threads())
        return solve_ex(*args, **kwargs)

    monkeypatch.setattr(F, "khatri_rao", spy_products)
    monkeypatch.setattr(torch.linalg, "solve_ex", spy_lapack)
    before = torch.get_num_threads()
    torch.set_num_threads(outside)
    try:
        F.decompose(_conv(6, 10, 3), F.LayerPlan("cp", (8,)), n_iter_max=3, num_threads=inside)
        assert torch.get_num_threads() == outside  # restored
    finally:
        torch.set_num_threads(before)
    assert seen == {"products": {inside or outside}, "lapack": {1}}


def test_cp_refuses_a_matrix_and_survives_a_zero_kernel() -> None:
    with pytest.raises(ValueError, match="at least 3 modes"):
        F.cp_als(torch.randn(4, 5), 2)
    conv = _conv(4, 6, 3)
    with torch.no_grad():
        conv.weight.zero_()
    # Singular normal equations: solved by the pseudo-inverse, so the factors stay finite (and the
    # chain computes zero), rather than a LAPACK failure or NaN weights.
    chain, _ = F.decompose(conv, F.LayerPlan("cp", (3,)), n_iter_max=3)
    assert all(torch.isfinite(m.weight).all() for m in chain)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(chain(x), conv(x))


def test_factorization_cost_model_grows_with_the_work() -> None:
    small, large = _conv(64, 64, 3), _conv(128, 128, 3)
    cp = [F.factorization_flops(c, F.LayerPlan("cp", (r,)), 25) for c, r in ((small, 32), (large, 32), (large, 64))]
    assert cp[0][0] < cp[1][0] < cp[2][0] and cp[0][1] < cp[2][1]
    # CP counts every sweep: the two large products alone are 4 * numel * rank FLOPs per sweep.
    per_sweep = F.factorization_flops(large, F.LayerPlan("cp", (64,)), 26)[0] - cp[2][0]
    assert per_sweep >= 4 * 128 * 128 * 9 * 64
    gemm, lapack = F.measure_throughput(1)
    assert gemm > 1e7 and lapack > 1e6  # FLOP/s of any CPU this runs on


@pytest.mark.parametrize(
    ("busy", "requested", "expected"),
    [(0.0, None, 2), (0.4, None, 2), (1.0, None, 1), (5.0, None, 1), (5.0, 2, 2), (0.0, 1, 1), (None, None, 2)],
)
def test_factorization_threads_leave_busy_cores_alone(
    monkeypatch: pytest.MonkeyPatch, busy: float | None, requested: int | None, expected: int
) -> None:
    import os

    monkeypatch.setattr(F, "_busy_elsewhere", lambda: busy)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads, why = F.factorization_threads(requested)
    finally:
        torch.set_num_threads(before)
    # Two cores, `busy` of them running other processes' threads: the rest (rounded, at least 1) are free.
    assert threads == expected
    assert (why is None) == (expected == 2 or requested is not None)
    if why is not None:
        assert f"{busy:g} threads of other processes running on 2 cores" in why and "num_threads" in why


def test_busy_elsewhere_reads_a_count() -> None:
    busy = F._busy_elsewhere()
    assert busy is None or busy >= 0
