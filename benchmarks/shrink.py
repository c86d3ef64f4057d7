"""Channel pruning that really shrinks: ours (coupled groups + removal) vs Torch-Pruning's MetaPruner.

Digits (scikit-learn, 1,437 train / 360 val) upsampled to 3x32x32. For each model (a ResNet-style net of
BasicBlocks, a MobileNetV3-style net, an MLP on the flattened 8x8 digits):

1. dense: trained ``--pretrain + --epochs`` epochs;
2. ours: pretrained ``--pretrain`` epochs, then ``GradualPruning(structure="channels", shrink=True)``
   removes ``--ratio`` of the channels of the coupled groups during ``--epochs`` more (schedule reached at
   60%, removed at fit end): ranked globally; with widths rounded up to multiples of 8; and with
   ``scope="layer"`` (every group loses ``--ratio`` of its channels, as Torch-Pruning's per-layer ratio);
3. unstructured: the same, ``GradualPruning(structure="unstructured")`` at the same ratio (zeros only);
4. torch-pruning: the pretrained model pruned one-shot by ``tp.pruner.MetaPruner`` with
   ``MagnitudeImportance(p=2)`` at ``pruning_ratio=--ratio`` (its default, per layer), classifier ignored,
   then fine-tuned ``--epochs`` epochs;
5. Lightning ``ModelPruning(pruning_fn="ln_structured", pruning_norm=2, pruning_dim=0)``: ``--ratio`` of the
   output rows of every conv / linear but the classifier, per layer, applied once at the end of the first of
   the ``--epochs`` (a float ``amount`` would compound every epoch), made permanent at fit end. It zeroes rows;
   nothing is removed.

Printed: params, FLOPs (one image), bytes of the state dict, one-thread CPU latency at batch 1 and 32
(ms; each round every variant is timed in turn, best of 0.2 s per round, median of ``--rounds`` rounds),
validation accuracy.

``--models bert``: a BERT-style encoder (Hugging Face ``BertForSequenceClassification``, random init) on a
token task (is the majority of 32 tokens in the upper half of the vocabulary), dense vs
``GradualPruning(structure="heads", shrink=True)`` vs heads plus the FFN hidden units
(``structure="channels"``), at ``--ratio``; also the largest output difference between the masked and the
shrunk model (measured by the callback on the example input just before and after the removal).

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
from pytorch_lightning.callbacks import ModelPruning
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import GradualPruning
from lightning_compress.functional.shrink import cpu_latency
from lightning_compress.functional.stats import module_flops, serialized_bytes
from tests.zoo.common import majority_tokens
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


def static(model: nn.Module, one: torch.Tensor) -> dict[str, float]:
    """Params, FLOPs of one input, bytes of the state dict."""
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": module_flops(model.eval(), one).get("", 0),
        "bytes": serialized_bytes(model.state_dict()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--models", default="resnet,mobilenet,mlp,bert")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds (median reported)")
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    for name in args.models.split(","):
        if name == "bert":
            bert(args)
            continue
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
            ("ours (channels, shrunk)", "channels", 1, "global"),
            ("ours (channels, shrunk, widths x8)", "channels", 8, "global"),
            ("ours (channels, shrunk, per-group ratio)", "channels", 1, "layer"),
            ("unstructured (zeros)", "unstructured", 1, "global"),
        )
        for label, structure, multiple, scope in variants:
            model = copy.deepcopy(base)
            pruning = GradualPruning(
                args.ratio,
                structure=structure,
                shrink=structure == "channels",
                channel_multiple=multiple,
                scope=scope,
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

        model = copy.deepcopy(base)
        anchor = model_pruning(model, head, args.ratio)
        rows["Lightning ModelPruning (ln_structured, zeros)"] = (fit(model, train, val, args.epochs, [anchor]), model)
        weights = [m.weight for m, _ in anchor._parameters_to_prune]
        zero_rows = sum(int((w.flatten(1).abs().sum(1) == 0).sum()) for w in weights)
        total_rows = sum(w.shape[0] for w in weights)
        print(f"ModelPruning: {zero_rows} of {total_rows} output rows of the pruned layers are zero")
        channels = 3 if size != 8 else 1
        one, batch = torch.randn(1, channels, size, size), torch.randn(32, channels, size, size)
        title = f"{name} ({args.pretrain}+{args.epochs} epochs, ratio {args.ratio})"
        print_table(title, rows, lambda m, one=one: static(m, one), {"ms_b1": one, "ms_b32": batch}, rounds=args.rounds)


def model_pruning(model: Classifier, head: str, ratio: float) -> ModelPruning:
    """Lightning's structured pruning anchor: ``ratio`` of every layer's output rows, once, after epoch 0."""
    layers = [(m, "weight") for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear) and n != head]
    return ModelPruning(
        pruning_fn="ln_structured",
        parameters_to_prune=layers,
        amount=lambda epoch: ratio if epoch == 0 else 0.0,
        pruning_norm=2,
        pruning_dim=0,
        use_global_unstructured=False,
        make_pruning_permanent=True,
        verbose=0,
    )


def interleaved_latency(models: list[nn.Module], inputs: dict[str, torch.Tensor], rounds: int) -> list[dict]:
    """Median over ``rounds`` of each model's best-of-rounds latency (ms), the models taking turns in every round.

    Other processes share the cores: measuring the variants one after the other lets a burst of load land on
    one of them; interleaved, every variant sees the same load, and the median drops the outliers.
    """
    times = [{k: [] for k in inputs} for _ in models]
    for _ in range(rounds):
        for model, out in zip(models, times, strict=True):
            for key, x in inputs.items():
                out[key].append(cpu_latency(model, x, min_run_time=0.2) * 1e3)
    return [{k: float(torch.tensor(v).median()) for k, v in t.items()} for t in times]


def print_table(title: str, rows: dict, static_fn, inputs: dict, extra: dict | None = None, rounds: int = 5) -> None:
    """Params, FLOPs, bytes (``static_fn``), interleaved latencies at batch 1 and 32, accuracy, [max diff]."""
    print(f"\n### {title}\n")
    extra = extra or {}
    tail = " | max abs(shrunk - masked)" if extra else ""
    print(f"| variant | params | FLOPs | state_dict bytes | ms @1 | ms @32 | speed-up @32 | val acc{tail} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---:" + (" | ---:" if extra else "") + " |")
    latencies = interleaved_latency([model.eval() for _, model in rows.values()], inputs, rounds)
    reference = None
    for (label, (acc, model)), ms in zip(rows.items(), latencies, strict=True):
        m = {**static_fn(model), **ms}
        reference = reference or m
        diff = f" | {extra[label]:.1e}" if label in extra else (" | -" if extra else "")
        print(
            f"| {label} | {m['params']:,} | {m['flops']:,} | {m['bytes']:,} | {m['ms_b1']:.3f} | "
            f"{m['ms_b32']:.2f} | {reference['ms_b32'] / m['ms_b32']:.2f}x | {acc:.4f}{diff} |"
        )


class Logits(nn.Module):
    """``ids -> logits`` of a Hugging Face sequence classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def bert(args: argparse.Namespace, vocab: int = 64, length: int = 32) -> None:
    """Dense vs heads removed vs heads and FFN units removed, on a 4-layer, 8-head BERT-style encoder."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        intermediate_size=512,
        max_position_embeddings=length,
        num_labels=2,
    )
    train = DataLoader(
        majority_tokens(2048, vocab, length), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    val = DataLoader(majority_tokens(512, vocab, length, seed=1), batch_size=512)
    example = torch.zeros(2, length, dtype=torch.long)
    pl.seed_everything(0)
    base = Classifier(Logits(BertForSequenceClassification(config)), example, lr=1e-3)
    fit(base, train, val, args.pretrain)
    steps = args.epochs * len(train)
    schedule = {"end_step": int(0.6 * steps), "update_every_n_steps": 5}
    rows, diffs = {}, {}
    dense = copy.deepcopy(base)
    rows["dense"] = (fit(dense, train, val, args.epochs), dense)
    variants = {
        "heads (shrunk)": ["heads"],
        "heads + FFN units (shrunk)": ["heads", "channels"],
    }
    for label, structures in variants.items():
        model = copy.deepcopy(base)
        callbacks = [
            GradualPruning(
                args.ratio,
                structure=s,
                shrink=True,
                exclude=["net.model.bert.pooler.dense", "net.model.classifier"],
                name=s,
                **schedule,
            )
            for s in structures
        ]
        rows[label] = (fit(model, train, val, args.epochs, callbacks), model)
        diffs[label] = max(cb._coupled.max_abs_diff for cb in callbacks)
    one, batch = torch.randint(0, vocab, (1, length)), torch.randint(0, vocab, (32, length))
    title = f"bert, 4 layers x 8 heads, hidden 128, FFN 512, {length} tokens ({args.pretrain}+{args.epochs} epochs)"
    inputs = {"ms_b1": one, "ms_b32": batch}
    print_table(title + f", ratio {args.ratio}", rows, lambda m: static(m, one), inputs, diffs, rounds=args.rounds)


if __name__ == "__main__":
    main()
