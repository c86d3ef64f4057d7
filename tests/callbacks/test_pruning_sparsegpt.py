"""criterion="sparsegpt" in a real fit: one-shot reconstruction from the recorded training inputs, masks then kept."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_compress import GradualPruning, QuantizationAwareTraining
from lightning_compress.functional.qat import qat_modules
from lightning_compress.functional.sparsegpt import sparsegpt_prune_
from tests.callbacks.test_pruning_wanda import FrozenMLP
from tests.helpers import TinyMLP, trainer

ONE_SHOT = {"criterion": "sparsegpt", "schedule": "one_shot", "scope": "layer"}


def test_weights_equal_a_standalone_reconstruction_from_the_batches_after_start_step(tmp_path: Any) -> None:
    model = FrozenMLP()  # lr = 0: only the reconstruction moves the weights
    seen: list[torch.Tensor] = []
    model.net[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()) if m.training else None)
    reference = copy.deepcopy(model)
    pruning = GradualPruning(0.5, start_step=2, calibration_batches=3, include=["net.0", "net.2"], **ONE_SHOT)
    trainer(tmp_path, [pruning], max_epochs=-1, max_steps=7, limit_val_batches=0).fit(model)
    # Steps 2, 3 and 4 were recorded (net.0 sees the model input); the reconstruction ran before step 5.
    masks = sparsegpt_prune_(reference, seen[2:5], 0.5, include=["net.0", "net.2"])
    for name in ("net.0.weight", "net.2.weight"):
        got = model.get_parameter(name).detach()
        assert torch.equal(got != 0, masks[name])
        assert torch.allclose(got, reference.get_parameter(name), atol=1e-6)
    assert torch.equal(model.net[4].weight, reference.net[4].weight)  # not selected: untouched


def test_two_four_masks_stay_while_training_goes_on(tmp_path: Any) -> None:
    model = TinyMLP(optimizer="adamw", lr=0.01, weight_decay=0.1)
    pruning = GradualPruning(structure="2:4", calibration_batches=2, include=["net.0", "net.2"], **ONE_SHOT)
    trainer(tmp_path, [pruning], max_epochs=3, limit_val_batches=0).fit(model)
    for layer in (model.net[0], model.net[2]):
        keep = layer.weight.detach() != 0
        assert keep.reshape(layer.weight.shape[0], -1, 4).sum(-1).eq(2).all()
    assert pruning.report_section(None, model)["measured_sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"criterion": "sparsegpt", "scope": "layer"}, "schedule must be 'one_shot', got Cubic"),
        ({"criterion": "sparsegpt", "schedule": "one_shot"}, "scope must be 'layer', got 'global'"),
        ({**ONE_SHOT, "structure": "channels"}, "structure 'unstructured' or an N:M"),
        ({**ONE_SHOT, "rewind_to_step": 1, "end_step": 5}, "rewind_to_step=1"),
        ({**ONE_SHOT, "structure": "2:4", "target_sparsity": 0.3}, "target_sparsity must be 0.5"),
        ({**ONE_SHOT, "calibration_batches": 0}, "calibration_batches"),
        (
            {**ONE_SHOT, "structure": "2:4", "overrides": {"net.2": 0.3}},
            r"overrides\['net.2'\] with structure '2:4' must be 0.5 \(pruned 2:4\) or 0 \(left dense\), got 0.3",
        ),
    ],
)
def test_unsupported_combinations_are_refused_in_the_constructor(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradualPruning(**kwargs)


def test_two_four_with_an_override_of_zero_leaves_that_layer_dense(tmp_path: Any) -> None:
    model = FrozenMLP()  # lr = 0: only the reconstruction moves the weights
    before = copy.deepcopy(model.state_dict())
    pruning = GradualPruning(
        structure="2:4", calibration_batches=2, include=["net.0", "net.2"], overrides={"net.2": 0.0}, **ONE_SHOT
    )
    trainer(tmp_path, [pruning], max_steps=4, max_epochs=-1, limit_val_batches=0).fit(model)
    assert (model.net[0].weight.detach() != 0).reshape(32, -1, 4).sum(-1).eq(2).all()
    assert not torch.equal(model.net[0].weight, before["net.0.weight"])  # reconstructed
    assert torch.equal(model.net[2].weight, before["net.2.weight"])


def test_a_conv_layer_is_refused_before_the_first_step(tmp_path: Any) -> None:
    class WithConv(TinyMLP):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(self.conv(x[:, None])[:, 0])

    run = trainer(tmp_path, [GradualPruning(0.5, **ONE_SHOT)], max_steps=2, max_epochs=-1)
    with pytest.raises(ValueError, match=r"supports \['Linear', 'Conv1D'\].*conv.weight \(Conv1d\)"):
        run.fit(WithConv())
    assert run.global_step == 0


def test_a_training_step_that_bypasses_forward_is_reported(tmp_path: Any) -> None:
    class Bypass(TinyMLP):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

    # Told at the first batch, not only once recording starts at start_step.
    run = trainer(tmp_path, [GradualPruning(0.5, start_step=3, **ONE_SHOT)], max_steps=5, max_epochs=-1)
    with pytest.raises(ValueError, match="training batch 0 ran without calling it"):
        run.fit(Bypass())
    assert run.global_step == 1  # the end of the first batch, two steps before start_step


def test_reconstruction_replays_do_not_update_quantization_observers(tmp_path: Any) -> None:
    calls: list[tuple[bool, bool]] = []  # (grad enabled, observing) of every forward of a QAT layer

    class Record(pl.Callback):
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            for _, layer in qat_modules(pl_module):  # swapped in by QuantizationAwareTraining's setup
                layer.register_forward_pre_hook(lambda m, a: calls.append((torch.is_grad_enabled(), m._observes())))

    model = TinyMLP().eval()  # eval mode: QAT observes through its training-batch flag
    qat = QuantizationAwareTraining(start_step=0)
    pruning = GradualPruning(0.5, calibration_batches=2, include=["net.0", "net.2"], **ONE_SHOT)
    trainer(tmp_path, [qat, pruning, Record()], max_steps=4, max_epochs=-1, limit_val_batches=0).fit(model)
    replays = [observing for grad, observing in calls if not grad]
    training = [observing for grad, observing in calls if grad]
    assert replays and not any(replays)  # the replays ran (one pass per stage) and observed nothing
    assert training and all(training)


SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "ddp_sparsegpt.py")


@pytest.mark.xdist_group("ddp")
def test_under_ddp_every_rank_reconstructs_from_the_inputs_of_all_ranks(tmp_path: Any) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")

    def standalone(inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        model = FrozenMLP()
        model.load_state_dict(r0["initial"])
        sparsegpt_prune_(model, inputs, 0.5, include=["net.0", "net.2"])
        return model.state_dict()

    expected = standalone(r0["inputs"] + r1["inputs"])  # the Hessians summed over both ranks
    for name in ("net.0.weight", "net.2.weight"):
        assert torch.equal(r0["final"][name], r1["final"][name])
        assert torch.allclose(r0["final"][name], expected[name], atol=1e-5)
    # The ranks saw different data: one rank's inputs alone would have given other weights.
    assert not torch.allclose(standalone(r0["inputs"])["net.0.weight"], expected["net.0.weight"], atol=1e-5)


def test_resume_after_the_reconstruction_keeps_its_masks_and_does_not_run_it_again(tmp_path: Any) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1, filename="{step}")
    first = GradualPruning(0.5, start_step=1, calibration_batches=2, include=["net.0", "net.2"], **ONE_SHOT)
    trainer(tmp_path, [first, ckpt], enable_checkpointing=True, max_epochs=-1, max_steps=6).fit(TinyMLP())
    path = tmp_path / "ckpt" / "step=6.ckpt"
    saved = torch.load(path, weights_only=False)
    masks = saved["callbacks"][first.state_key]["masks"]
    assert set(masks) == {"net.0.weight", "net.2.weight"}
    assert all(abs(float((~m).float().mean()) - 0.5) < 0.05 for m in masks.values())

    model = TinyMLP()
    second = GradualPruning(0.5, start_step=1, calibration_batches=2, include=["net.0", "net.2"], **ONE_SHOT)
    trainer(tmp_path, [second], max_epochs=-1, max_steps=12, limit_val_batches=0).fit(model, ckpt_path=str(path))
    for name, mask in masks.items():
        weight = model.get_parameter(name).detach()
        # The checkpoint's masks hold through 6 more training steps: no second reconstruction, no revival.
        assert torch.equal(weight != 0, mask), name
