"""Channel pruning that really shrinks: ours (coupled groups + removal) vs Torch-Pruning's MetaPruner.

Digits (scikit-learn, 1,437 train / 360 val) upsampled to 3x32x32. For each model (a ResNet-style net of
BasicBlocks, a MobileNetV3-style net, an MLP on the flattened 8x8 digits):

1. dense: trained ``--pretrain + --epochs`` epochs;
2. ours: pretrained ``--pretrain`` epochs, then ``GradualPruning(structure="channels", shrink=True)``
   removes ``--ratio`` of the channels of the coupled groups during ``--epochs`` more (schedule reached at
   60%, removed at fit end);
3. unstructured: the same, ``GradualPruning(structure="unstructured")`` at the same ratio (zeros only);
4. torch-pruning: the pretrained model pruned one-shot by ``tp.pruner.MetaPruner`` with
   ``MagnitudeImportance(p=2)`` at ``pruning_ratio=--ratio`` (its default, per layer), classifier ignored,
   then fine-tuned ``--epochs`` epochs.

Printed: params, FLOPs (one image), bytes of the state dict, one-thread CPU latency at batch 1 and 32
(best of rounds, ms), validation accuracy.

    python benchmarks/shrink.py --pretrain 4 --epochs 4 --ratio 0.5
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torch_pruning as tp
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import GradualPruning
from lightning_compress.functional.shrink import cpu_latency
from lightning_compress.functional.stats import module_flops, serialized_bytes
from tests.zoo.mobilenet import MobileNetV3
from tests.zoo.resnet import BasicBlock, ResNet


def digits(size: int) -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    train, val = order[:1437], order[1437:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, example: torch.Tensor, lr: float = 3e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr
        self.example_input_array = example

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


MODELS = {
    "resnet": (lambda: ResNet(BasicBlock, [2, 2, 2], [32, 64, 128], num_classes=10), 32, "net.fc"),
    "mobilenet": (lambda: MobileNetV3(num_classes=10, last_channel=128), 32, "net.classifier.3"),
    "mlp": (mlp, 8, "net.5"),
}


def fit(model: Classifier, train: DataLoader, val: DataLoader, epochs: int, callbacks=()) -> float:
    model.train()  # measure() leaves copies in eval mode
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tempfile.mkdtemp(),
    )
    trainer.fit(model, train, val)
    return float(trainer.callback_metrics["val_acc"])


def measure(model: Classifier, size: int) -> dict[str, float]:
    channels = 3 if size != 8 else 1
    one, batch = torch.randn(1, channels, size, size), torch.randn(32, channels, size, size)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": module_flops(model.eval(), one).get("", 0),
        "bytes": serialized_bytes(model.state_dict()),
        "ms_b1": cpu_latency(model, one, min_run_time=0.5) * 1e3,
        "ms_b32": cpu_latency(model, batch, min_run_time=1.0) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--models", default="resnet,mobilenet,mlp")
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    for name in args.models.split(","):
        build, size, head = MODELS[name]
        train_set, val_set = digits(size)
        train = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
        val = DataLoader(val_set, batch_size=360)
        example = torch.zeros(2, *train_set.tensors[0].shape[1:])
        pl.seed_everything(0)
        base = Classifier(build(), example)
        fit(base, train, val, args.pretrain)
        rows = {}
        steps = args.epochs * len(train)

        dense = copy.deepcopy(base)
        rows["dense"] = (fit(dense, train, val, args.epochs), dense)

        variants = (
            ("ours (channels, shrunk)", "channels", 1),
            ("ours (channels, shrunk, widths x8)", "channels", 8),
            ("unstructured (zeros)", "unstructured", 1),
        )
        for label, structure, multiple in variants:
            model = copy.deepcopy(base)
            pruning = GradualPruning(
                args.ratio,
                structure=structure,
                shrink=structure == "channels",
                channel_multiple=multiple,
                end_step=int(0.6 * steps),
                update_every_n_steps=5,
                exclude=[head],
            )
            rows[label] = (fit(model, train, val, args.epochs, [pruning]), model)

        model = copy.deepcopy(base)
        ignored = [model.get_submodule(head)]
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=args.ratio,
            ignored_layers=ignored,
        )
        pruner.step()
        rows["torch-pruning MetaPruner"] = (fit(model, train, val, args.epochs), model)

        print(f"\n### {name} ({args.pretrain}+{args.epochs} epochs, ratio {args.ratio})\n")
        print("| variant | params | FLOPs | state_dict bytes | ms @1 | ms @32 | speed-up @32 | val acc |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        reference = None
        for label, (acc, model) in rows.items():
            m = measure(model, size)
            reference = reference or m
            print(
                f"| {label} | {m['params']:,} | {m['flops']:,} | {m['bytes']:,} | {m['ms_b1']:.3f} | "
                f"{m['ms_b32']:.2f} | {reference['ms_b32'] / m['ms_b32']:.2f}x | {acc:.4f} |"
            )


if __name__ == "__main__":
    main()
