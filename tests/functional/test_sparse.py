import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_compress.functional.sparse import (
    load_sparse,
    pack_bits,
    pack_state_dict,
    save_sparse,
    unpack_bits,
    unpack_state_dict,
)


@settings(max_examples=50, deadline=None)
@given(numel=st.integers(1, 100), density=st.floats(0, 1), seed=st.integers(0, 99))
def test_bits_round_trip(numel: int, density: float, seed: int) -> None:
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(seed)) < density
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 7) // 8
    assert torch.equal(unpack_bits(packed, numel), mask)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 20), density=st.floats(0, 1), seed=st.integers(0, 99))
def test_state_dict_round_trip_is_exact(rows: int, cols: int, density: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    state = {"w": w, "step": torch.tensor(3), "h": torch.randn(3, dtype=torch.float64)}
    back = unpack_state_dict(pack_state_dict(state, min_sparsity=0.0))
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype


def test_saved_file_is_smaller_and_loads_strictly(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():
        w = model[0].weight
        w[w.abs() < w.abs().flatten().kthvalue(int(0.9 * w.numel())).values] = 0  # 90% zeros
    dense_path, sparse_path = tmp_path / "dense.pt", tmp_path / "sparse.pt"
    torch.save(model.state_dict(), dense_path)
    size = save_sparse(model.state_dict(), sparse_path)
    assert size == sparse_path.stat().st_size
    # 256x256 fp32 = 262 KB dense; 8 KB bitmap + ~26 KB of values when 90% sparse
    assert size < 0.25 * dense_path.stat().st_size
    fresh = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    fresh.load_state_dict(load_sparse(sparse_path))
    x = torch.randn(4, 256)
    assert torch.equal(fresh(x), model(x))


def test_which_tensors_are_packed() -> None:
    quarter = torch.arange(1.0, 17.0)
    quarter[:4] = 0.0  # exactly 25% zeros: packed at min_sparsity=0.25
    small = torch.tensor([0.0, 0.0, 1.0, 2.0])  # fewer than 8 entries: left as it is
    packed = pack_state_dict({"q": quarter, "dense": torch.arange(1.0, 17.0), "small": small}, min_sparsity=0.25)
    assert isinstance(packed["q"], dict) and packed["q"]["values"].tolist() == list(range(5, 17))
    assert torch.equal(packed["dense"], torch.arange(1.0, 17.0)) and torch.equal(packed["small"], small)


def test_packed_tensors_keep_their_dtype() -> None:
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        w = torch.tensor([0.0, 1.5, 0.0, -2.25, 0.0, 0.0, 3.0, 0.0, 0.0, 0.5], dtype=dtype)
        packed = pack_state_dict({"w": w})
        assert isinstance(packed["w"], dict)
        back = unpack_state_dict(packed)["w"]
        assert back.dtype == dtype and torch.equal(back, w)


def test_exactly_ten_percent_zeros_pass_a_tenth() -> None:
    w = torch.arange(1.0, 11.0)
    w[3] = 0.0  # 1 of 10
    assert isinstance(pack_state_dict({"w": w}, min_sparsity=0.1)["w"], dict)
    assert not isinstance(pack_state_dict({"w": w}, min_sparsity=0.11)["w"], dict)
