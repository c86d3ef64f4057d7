import io
import os

import pytest
import torch
from torch import nn

from lightning_compress import GradualPruning, QuantizationAwareTraining, convert_to_int8
from lightning_compress.functional.compressed import inspect_compressed, load_compressed, save_compressed
from tests.helpers import TinyMLP, trainer


def _prune_(model: nn.Module, fraction: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                m.weight[torch.rand(m.weight.shape, generator=g) < fraction] = 0.0


def _fp32_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@pytest.fixture(scope="module")
def qat_model(tmp_path_factory):
    """A TinyMLP trained 2 epochs with pruning to 70% and QAT (real Trainer.fit)."""
    model = TinyMLP(hidden=64)
    callbacks = [GradualPruning(0.7, end_step=8, update_every_n_steps=2), QuantizationAwareTraining(start_step=2)]
    trainer(tmp_path_factory.mktemp("qat"), callbacks, max_epochs=2).fit(model)
    return model


def test_pruned_fp32_round_trip_is_bitwise_and_smaller(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 10))
    _prune_(model, 0.8)
    model.eval()
    path = tmp_path / "m.lcz"
    size = save_compressed(model, path)
    assert size == os.path.getsize(path)
    loaded = load_compressed(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    # 80% zeros: a bitmap (1/32) plus 20% of the values, then lzma -> well under a third of fp32
    assert size < _fp32_bytes(model) / 3
    encodings = {t["names"][0]: t["encoding"] for t in inspect_compressed(path)["tensors"]}
    assert encodings["0.weight"] == "bitmap" and encodings["1.running_mean"] == "dense"


def test_int8_and_pruned_int8_round_trip(tmp_path, qat_model) -> None:
    int8 = convert_to_int8(qat_model).eval()
    codes = [t for t in int8.state_dict().values() if t.dtype == torch.int8]
    assert codes and sum(int((c == 0).sum()) for c in codes) > 0  # pruned zeros survive as int8 zero codes
    path = tmp_path / "int8.lcz"
    size = save_compressed(int8, path)
    loaded = load_compressed(path)
    x = torch.randn(8, 16)
    assert torch.equal(loaded(x), int8(x))
    for k, v in int8.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v) and loaded.state_dict()[k].dtype == v.dtype
    # int8 codes of ~70%-pruned weights; on a model this small the pickled structure (~3 kB) weighs in
    assert size * 4 < _fp32_bytes(TinyMLP(hidden=64))
    # the safe path: no pickle, tensors into a template of the same architecture
    template = convert_to_int8(qat_model)
    for t in template.state_dict().values():
        t.zero_()
    save_compressed(int8, tmp_path / "plain.lcz", structure=False)
    load_compressed(tmp_path / "plain.lcz", model=template)
    assert torch.equal(template.eval()(x), int8(x))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8, bias=False)
        self.b = nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.full((8,), 2.0), persistent=False)

    def forward(self, x):
        return self.b(self.a(x)) * self.scale


def test_ties_non_persistent_buffers_and_special_values(tmp_path) -> None:
    model = Tied()
    with torch.no_grad():
        w = torch.zeros(64)
        w[:4] = torch.tensor([-0.0, float("nan"), 1.5, float("inf")])
        model.a.weight.copy_(w.reshape(8, 8))
    save_compressed(model, tmp_path / "t.lcz")
    loaded = load_compressed(tmp_path / "t.lcz")
    assert loaded.a.weight is loaded.b.weight  # still tied
    bits = model.a.weight.detach().view(torch.int32)
    assert torch.equal(loaded.a.weight.detach().view(torch.int32), bits)  # -0.0 and NaN bit-exact
    assert torch.equal(loaded.scale, model.scale)
    (entry,) = [t for t in inspect_compressed(tmp_path / "t.lcz")["tensors"] if "a.weight" in t["names"]]
    assert entry["names"] == ["a.weight", "b.weight"] and entry["encoding"] == "bitmap"


def test_bad_input_names_the_argument_and_writes_nothing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="path .*does not exist"):
        save_compressed(nn.Linear(2, 2), tmp_path / "missing" / "m.lcz")
    with pytest.raises(ValueError, match="model .*no parameters or buffers"):
        save_compressed(nn.ReLU(), tmp_path / "m.lcz")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        save_compressed({"w": torch.zeros(2)}, tmp_path / "m.lcz")
    with pytest.raises(ValueError, match="codec"):
        save_compressed(nn.Linear(2, 2), tmp_path / "m.lcz", codec="gzip")
    with pytest.raises(ValueError, match="meta tensor"):
        save_compressed(nn.Linear(2, 2, device="meta"), tmp_path / "m.lcz")

    class Local(nn.Linear):
        pass

    with pytest.raises(ValueError, match="model .*cannot be pickled.*structure=False"):
        save_compressed(Local(2, 2), tmp_path / "m.lcz")
    assert list(tmp_path.iterdir()) == []  # nothing half-written

    # an existing file is replaced whole or not at all
    good = tmp_path / "m.lcz"
    save_compressed(nn.Linear(4, 4), good)
    before = good.read_bytes()
    with pytest.raises(ValueError):
        save_compressed(nn.Linear(2, 2, device="meta"), good)
    assert good.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.lcz"]

    (tmp_path / "junk.bin").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a file written by save_compressed"):
        load_compressed(tmp_path / "junk.bin")
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_compressed(tmp_path / "nothere.lcz")
    with pytest.raises(ValueError, match="missing in the file"):
        load_compressed(good, model=nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"is torch.float32 \(3, 3\), the file holds torch.float32 \(4, 4\)"):
        load_compressed(good, model=nn.Linear(3, 3))
    save_compressed(nn.Linear(4, 4), tmp_path / "plain.lcz", structure=False)
    with pytest.raises(ValueError, match="structure=False: pass model="):
        load_compressed(tmp_path / "plain.lcz")
