"""Remove half of a small BERT's attention heads while it trains, and half of its FFN units.

    pip install 'lightning-compress[examples,shrink]' transformers
    python examples/shrink_heads.py

A 2-layer, 4-head BERT classifier (random init, nothing downloaded) learns whether most of 16 tokens lie in
the upper half of the vocabulary. ``structure="heads"`` masks each pruned head's query/key/value rows and
the output projection's columns together; ``structure="channels"`` does the same for FFN hidden units.
At step 40 both are cut away, the rest of training runs on the smaller model, and the result reloads from
its checkpoint with ``load_shrunk``.
"""

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from lightning_compress import GradualPruning, load_shrunk


def tokens(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    upper = torch.rand(n, 16, generator=g) < torch.rand(n, 1, generator=g) * 0.6 + 0.2
    x = torch.randint(0, 32, (n, 16), generator=g) + upper.long() * 32
    return TensorDataset(x, (upper.float().mean(1) > 0.5).long())


class TinyBert(pl.LightningModule):
    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=heads,
            intermediate_size=64,
            max_position_embeddings=16,
        )
        self.bert = BertForSequenceClassification(config)
        self.example_input_array = torch.zeros(2, 16, dtype=torch.long)  # the heads are tried on it

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return F.cross_entropy(self(ids), y)

    def validation_step(self, batch, batch_idx):
        ids, y = batch
        self.log("val_acc", (self(ids).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


if __name__ == "__main__":
    pl.seed_everything(0)
    schedule = {"end_step": 30, "update_every_n_steps": 5, "shrink": True, "shrink_at_step": 40}
    callbacks = [
        GradualPruning(0.5, structure="heads", scope="layer", name="heads", **schedule),
        # FFN units; the pooler -> classifier group is left alone
        GradualPruning(0.5, structure="channels", exclude=["bert.bert.pooler.dense", "bert.classifier"], **schedule),
    ]
    trainer = pl.Trainer(max_epochs=3, callbacks=callbacks, logger=False, enable_checkpointing=False)
    model = TinyBert()
    before = sum(p.numel() for p in model.parameters())
    trainer.fit(
        model, DataLoader(tokens(512, 0), batch_size=32, shuffle=True), DataLoader(tokens(128, 1), batch_size=128)
    )
    trainer.save_checkpoint("heads.ckpt")
    reloaded = load_shrunk(TinyBert, "heads.ckpt")
    heads = [layer.attention.self.num_attention_heads for layer in reloaded.bert.bert.encoder.layer]
    after = sum(p.numel() for p in reloaded.parameters())
    print(f"val_acc={trainer.callback_metrics['val_acc']:.4f}  params {before} -> {after}  heads per layer {heads}")
