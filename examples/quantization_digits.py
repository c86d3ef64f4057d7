"""Quantization-aware training on the digits CNN, then int8 PyTorch (stored and compiled) and int8 ONNX models.

python examples/quantization_digits.py
"""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch

from lightning_compress import QuantizationAwareTraining, compile_int8, convert_to_int8, export_onnx
from lightning_compress.demo import DigitsCNN, DigitsDataModule


def main(out_dir: str = "outputs/quantization_example") -> None:
    pl.seed_everything(0)
    dm, model = DigitsDataModule(), DigitsCNN()
    qat = QuantizationAwareTraining(
        weight_bits=8, activation_bits=8, start_step=23, freeze_bn_step=92, freeze_observers_step=115
    )
    trainer = pl.Trainer(
        max_epochs=6, accelerator="cpu", default_root_dir=out_dir, enable_progress_bar=False, callbacks=[qat]
    )
    trainer.fit(model, dm)

    # The trained model still fake-quantizes (and still loads its checkpoints strictly).
    int8 = convert_to_int8(model)  # int8 weights + scales, ~4x smaller state_dict
    os.makedirs(out_dir, exist_ok=True)
    torch.save(int8.state_dict(), os.path.join(out_dir, "model_int8_state_dict.pt"))
    path = export_onnx(model, os.path.join(out_dir, "model_int8.onnx"), example_input=torch.zeros(1, 1, 8, 8))

    x, y = dm.val_set.tensors
    model.eval()
    with torch.no_grad():
        for label, m in (("fake-quant", model), ("int8 PyTorch", int8)):
            print(f"{label:>12}: val accuracy {(m(x).argmax(1) == y).float().mean():.2%}")
    try:  # oneDNN int8 kernels with the QAT scales (x86 CPU, needs a C++ compiler for torch.compile)
        fast = compile_int8(model, x)
        print(f"{'int8 kernels':>12}: val accuracy {(fast(x).argmax(1) == y).float().mean():.2%} (compile_int8)")
    except RuntimeError as err:
        print(f"compile_int8 unavailable here: {err}")
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits = session.run(None, {"input": x.numpy()})[0]
        print(f"{'int8 ONNX':>12}: val accuracy {(logits.argmax(1) == y.numpy()).mean():.2%} ({path})")
    except ImportError:
        print(f"wrote {path}; pip install onnxruntime to run it")


if __name__ == "__main__":
    main()
