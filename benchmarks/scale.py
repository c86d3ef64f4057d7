"""How GradualPruning scales: mask-update time and memory against model size, and per-rank memory under FSDP2.

(a) ``update``: one ``GradualPruning`` mask update (scores, selection, masks applied to the weights) on a
stack of square ``nn.Linear`` layers, from 1M parameters up, in global and layer scope, unstructured and
channels. Each configuration runs in a fresh process; its peak resident memory is reset right before the
update (``/proc/self/clear_refs``) and read right after (``VmHWM``), so "extra" is what the update adds
on top of the model (the masks it keeps included), in multiples of the pruned weights' bytes.

(b) ``ranks``: per-rank peak memory while training with pruning + QAT on two CPU processes, under
``ModelParallelStrategy`` (FSDP2, ``fully_shard`` per layer) and under DDP; the peak is reset when
training starts, so model construction before sharding is not counted. Next to peak RSS, each rank counts
the bytes of its own parameters, gradients, optimizer state, buffers and compression-callback tensors (a
DTensor counts its local shard), at their largest over the steps.

Usage (from the repository root)::

    python benchmarks/scale.py update --sizes 1 10 30 100     # millions of parameters
    python benchmarks/scale.py ranks --params 30              # FSDP2 vs DDP, two processes each
    python benchmarks/scale.py ranks --params 30 --mmap-threshold 1048576   # glibc: free large blocks at once
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402
from torch import nn  # noqa: E402

WIDTHS = {1: 512, 10: 1024, 30: 2048, 100: 4096}


def stack(millions: float) -> nn.Sequential:
    """Square Linear layers (no bias) holding about ``millions`` x 1e6 weights."""
    width = WIDTHS.get(int(millions), 1024)
    layers = max(1, round(millions * 1e6 / width**2))
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def one_update(millions: float, scope: str, structure: str) -> dict[str, Any]:
    """Time and peak memory of one mask update (25% -> 50%) of GradualPruning on ``stack(millions)``.

    Measured in the state training is in: an SGD optimizer with momentum (its state is masked at an
    update) and the callback's masks from a first update, so "extra" is what an update adds on top of it.
    """
    from lightning_compress import GradualPruning

    torch.set_num_threads(1)
    model = stack(millions)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # momentum buffers exist, as after the first training step
    pruning = GradualPruning(0.5, scope=scope, structure=structure, schedule="linear", end_step=2)
    stub = SimpleNamespace(strategy=object(), optimizers=[optimizer])
    pruning.setup(stub, model, "fit")  # type: ignore[arg-type]
    pruning._window = (0, 2)
    pruning._params_of = {id(optimizer): list(pruning._targets)}  # what on_fit_start sets
    pruning._update(stub, 1)  # the first update (25%): masks exist afterwards, as in training
    weights = sum(p.numel() for p in model.parameters()) * 4
    held = sum(m.numel() * m.element_size() for m in pruning._masks.values())
    held += sum(m.numel() * m.element_size() for pairs in pruning._hot.values() for _, m in pairs)
    rss = _status("VmRSS")
    _reset_peak()
    started = time.perf_counter()
    pruning._update(stub, 2)  # the measured update, from 25% to 50% with masks kept
    seconds = time.perf_counter() - started
    peak = _status("VmHWM")
    return {
        "params_M": round(weights / 4 / 1e6, 2),
        "scope": scope,
        "structure": structure,
        "update_s": round(seconds, 3),
        "ns_per_param": round(seconds / (weights / 4) * 1e9, 2),
        "held_between_updates_x_weights": round(held / weights, 2),
        "extra_peak_MB": round((peak - rss) / 2**20, 1),
        "extra_peak_x_weights": round((peak - rss) / weights, 2),
        "sparsity": round(pruning._metrics["sparsity"], 4),
    }


def run_updates(sizes: list[float]) -> list[dict[str, Any]]:
    rows = []
    for millions in sizes:
        for scope in ("global", "layer"):
            for structure in ("unstructured", "channels"):
                cmd = [sys.executable, __file__, "_one", str(millions), scope, structure]
                out = subprocess.run(
                    cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------- (b) per-rank memory
def _nbytes(tensors: Any) -> float:
    """Bytes of the tensors' storage on this rank (a DTensor counts its local shard only)."""
    from lightning_compress.functional.distributed import local

    return float(sum(local(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


def local_tensor_bytes(model: nn.Module, optimizer: Any, callbacks: list[Any]) -> dict[str, float]:
    """This rank's parameters, gradients, optimizer state and compression-callback tensors, in bytes."""
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values()]
    held = []
    for c in callbacks:  # GradualPruning's masks (bool and the per-step float copies), Taylor sums, rewind copy
        for store in ("_masks", "_taylor", "_rewind"):
            held += list(getattr(c, store, {}).values())
        held += [m for pairs in getattr(c, "_hot", {}).values() for _, m in pairs]
    return {
        "params": _nbytes(params),
        "grads": _nbytes(p.grad for p in params if p.grad is not None),
        "optimizer_state": _nbytes(state),
        "buffers": _nbytes(model.buffers()),  # QAT's scales and observed ranges
        "callback_state": _nbytes(held),
    }


def rank_run(strategy_name: str, millions: float, out: str) -> None:
    """One two-process fit (this script re-launched by Lightning on each rank); each rank writes its peak."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_compress import GradualPruning, QuantizationAwareTraining

    width = WIDTHS.get(int(millions), 1024)

    class Big(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = stack(millions)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.randn(64, width)), batch_size=8)

    class Sharded(Big):
        def configure_model(self) -> None:
            for layer in self.net:
                fully_shard(layer)
            fully_shard(self)

    class Peak(pl.Callback):
        """Peak RSS over training, and the bytes of this rank's own tensors, counted one by one."""

        tensors: dict[str, float] = {}

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.start = _status("VmRSS")
            _reset_peak()

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            # Here the gradients exist (and, after the first step, the optimizer state): the largest tensor set.
            sizes = local_tensor_bytes(pl_module, optimizer, [c for c in trainer.callbacks if c is not self])
            self.tensors = {k: max(v, self.tensors.get(k, 0.0)) for k, v in sizes.items()}

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            row = {"strategy": strategy_name, "rank": trainer.global_rank, "rss_libraries_MB": libraries / 2**20}
            row["rss_at_start_MB"] = self.start / 2**20
            row["peak_MB"] = _status("VmHWM") / 2**20
            row.update({f"{k}_MB": v / 2**20 for k, v in self.tensors.items()})
            with open(os.path.join(out, f"{strategy_name}_rank{trainer.global_rank}.json"), "w") as fh:
                json.dump(row, fh)

    torch.set_num_threads(1)
    libraries = _status("VmRSS")  # the interpreter, torch and Lightning, before any model exists
    pl.seed_everything(0)
    fsdp = strategy_name == "fsdp2"
    model = Sharded() if fsdp else Big()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if fsdp else "ddp"
    callbacks = [GradualPruning(0.5, end_step=4, update_every_n_steps=2), QuantizationAwareTraining(), Peak()]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=6,
        max_epochs=None,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model)


def run_ranks(millions: float, out: str, mmap_threshold: int | None = None) -> list[dict[str, Any]]:
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if mmap_threshold is not None:
        # glibc serves blocks above this size with mmap and unmaps them when freed. Without it, the threshold
        # grows to the largest block freed so far (up to 32 MiB), and later blocks of that size come from the
        # heap, which keeps freed memory resident: peak RSS then counts memory no tensor holds any more.
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    rows = []
    for strategy in ("fsdp2", "ddp"):
        cmd = [sys.executable, __file__, "_ranks", strategy, str(millions), out]
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        for rank in (0, 1):
            with open(os.path.join(out, f"{strategy}_rank{rank}.json")) as fh:
                row = json.load(fh)
            row = {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}
            row["malloc_mmap_threshold"] = mmap_threshold
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    if sys.argv[1] == "_one":
        print(json.dumps(one_update(float(sys.argv[2]), sys.argv[3], sys.argv[4])))
        return
    if sys.argv[1] == "_ranks":
        rank_run(sys.argv[2], float(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    update = sub.add_parser("update")
    update.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 30, 100])
    ranks = sub.add_parser("ranks")
    ranks.add_argument("--params", type=float, default=10)
    ranks.add_argument("--out", default="/tmp/lightning_compress_scale")
    ranks.add_argument("--mmap-threshold", type=int, default=None, help="MALLOC_MMAP_THRESHOLD_ of the ranks (bytes)")
    args = parser.parse_args()
    if args.what == "update":
        run_updates(args.sizes)
    else:
        run_ranks(args.params, args.out, args.mmap_threshold)


if __name__ == "__main__":
    main()
