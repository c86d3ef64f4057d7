import torch
from torch import nn

from lightning_compress.functional import stats


def test_counts_from_actual_zeros() -> None:
    layer = nn.Linear(10, 10)
    with torch.no_grad():
        layer.weight[:, :7] = 0
    s = stats.layer_stats(layer, "fc")
    assert (s.params, s.nonzeros) == (110, 40)
    assert abs(s.sparsity - 70 / 110) < 1e-12
    assert stats.sparsity(layer.weight) == 0.7
    assert stats.global_sparsity([layer.weight, layer.bias]) == 70 / 110


def test_bytes() -> None:
    assert stats.bytes_at(10, 4) == 5
    assert stats.bytes_at(3, 8) == 3
    # bitmap (2 bytes for 10 entries) + 3 fp32 values, vs 40 dense bytes
    assert stats.sparse_bytes(10, 3, 32) == 2 + 12
    assert stats.sparse_bytes(10, 10, 32) == 40  # dense wins when nothing is zero


def test_flops_match_formula() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 4))
    flops = stats.module_flops(model, torch.randn(2, 3, 5, 5))
    conv = 2 * 2 * 8 * 5 * 5 * 3 * 3 * 3
    fc = 2 * 2 * 200 * 4
    assert flops["0"] == conv and flops["3"] == fc and flops[""] == conv + fc
    with torch.no_grad():
        model[3].weight[:, :100] = 0  # half the Linear's weights
    effective = stats.effective_flops(flops, stats.model_stats(model))
    assert effective == conv + fc - round(fc * stats.layer_stats(model[3]).sparsity)


def test_serialized_bytes_measures_torch_save() -> None:
    small, big = nn.Linear(4, 4), nn.Linear(64, 64)
    assert stats.serialized_bytes(big.state_dict()) > 64 * 64 * 4 > stats.serialized_bytes(small.state_dict())


def test_empty_tensor_has_zero_sparsity() -> None:
    assert stats.sparsity(torch.empty(0)) == 0.0
    assert stats.global_sparsity([]) == 0.0


def test_layer_stats_count_only_the_module_own_parameters() -> None:
    block = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    assert stats.layer_stats(block).params == 0  # a container owns nothing itself
    assert [(s.name, s.params) for s in stats.model_stats(block)] == [("0", 8), ("1", 6)]


def test_flops_counting_leaves_the_model_untouched() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    running_mean = model[1].running_mean.clone()
    stats.module_flops(model, torch.randn(8, 4) + 5.0)
    assert torch.equal(model[1].running_mean, running_mean)  # counted in eval mode: no statistics update
    assert model.training  # and the mode is restored
