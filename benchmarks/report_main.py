"""The main job's realized compression and latency, measured: `configs/main.yaml` vs the same model trained fp32.

For each seed:
1. trains the digits CNN without compression (same epochs, data, seed) and writes its fp32
   `state_dict` with `torch.save` -> the baseline file and the baseline accuracy;
2. runs the main job exactly as `make run` does (`lightning-compress fit --config configs/main.yaml`,
   through `build_cli`), which writes `model_compressed.lcz` and the report;
3. loads `model_compressed.lcz` with `load_compressed` and measures its accuracy on the validation
   split here, independently of the report.

Prints one row per seed: file sizes on disk, the realized ratio, accuracies, and the report's latency
table of the last seed.

    python benchmarks/report_main.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import pytorch_lightning as pl
import torch

from lightning_compress import load_compressed
from lightning_compress.cli import build_cli
from lightning_compress.demo import DigitsCNN, DigitsDataModule


def accuracy(model: torch.nn.Module, data: DigitsDataModule) -> float:
    x, y = (torch.cat(t) for t in zip(*data.val_dataloader(), strict=True))
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--config", default="configs/main.yaml")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    latency = None
    for seed in args.seeds:
        out = tempfile.mkdtemp(prefix=f"main_seed{seed}_")
        data = DigitsDataModule(batch_size=64)
        data.setup()
        pl.seed_everything(seed)
        fp32 = DigitsCNN()
        pl.Trainer(
            max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
        ).fit(fp32, data)
        fp32_path = os.path.join(out, "model_fp32.pt")
        torch.save(fp32.state_dict(), fp32_path)

        cli = build_cli(
            [
                "fit",
                "--config",
                args.config,
                f"--seed_everything={seed}",
                f"--trainer.default_root_dir={out}/main",
                "--trainer.enable_progress_bar=false",
            ]
        )
        with open(os.path.join(cli.trainer.log_dir, "compression_report.json")) as fh:
            report = json.load(fh)
        compressed = report["summary"]["ratio_artifact"]
        loaded = load_compressed(compressed)
        rows.append(
            {
                "seed": seed,
                "fp32_file": os.path.getsize(fp32_path),
                "compressed_file": os.path.getsize(compressed),
                "ratio_vs_fp32_file": os.path.getsize(fp32_path) / os.path.getsize(compressed),
                "report_ratio": report["summary"]["ratio"],
                "fp32_acc": accuracy(fp32, data),
                "compressed_acc": accuracy(loaded, data),
                "sparsity": report["summary"]["sparsity"],
            }
        )
        latency = report["sections"].get("latency (measured)")
        print(json.dumps(rows[-1]))
    print(
        "\n| seed | fp32 state_dict file | model_compressed.lcz | ratio | fp32 acc | compressed acc | drop (points) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['seed']} | {r['fp32_file']} | {r['compressed_file']} | {r['ratio_vs_fp32_file']:.2f} "
            f"| {r['fp32_acc']:.4f} | {r['compressed_acc']:.4f} | {100 * (r['fp32_acc'] - r['compressed_acc']):+.2f} |"
        )
    if latency:
        print(f"\nlatency, last seed: batch {latency['batch']}, {latency['threads']} thread(s), {latency['how']}")
        print("| model | runtime | median ms | speed-up vs original (PyTorch) |\n| --- | --- | ---: | ---: |")
        for r in latency["rows"]:
            print(f"| {r['model']} | {r['runtime']} | {r['median_ms']} | {r.get('speedup_vs_original_pytorch', '-')} |")


if __name__ == "__main__":
    main()
