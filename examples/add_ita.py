"""Add ITA to an existing Lightning project: your LightningModule stays as it is; ITA is a callback.

    python examples/add_ita.py     # the embedded digits stream, offline, about a minute on 2 CPU cores
"""

import lightning as L
import torch
import torch.nn.functional as F

from lightning_taylor.model.backbone import create_backbone


class MyViT(L.LightningModule):
    """A LightningModule as you would write it: a timm ViT, cross-entropy, AdamW. Nothing here knows ITA."""

    def __init__(self, lr: float = 3e-4) -> None:
        super().__init__()
        # Your timm model, e.g. timm.create_model("vit_base_patch16_224.augreg_in21k", pretrained=True,
        # num_classes=100); here the ViT that ships with lightning-taylor, so the example runs offline.
        self.model = create_backbone("vit_tiny_patch16_224", "embedded", num_classes=10)
        self.lr = lr

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        first = self.trainer.datamodule.current_task * 2  # train on the current task's two classes
        return F.cross_entropy(self(x)[:, first : first + 2], y - first)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


# ---- what adding ITA takes ------------------------------------------------------------------------------
from lightning_taylor.callbacks import ITA, ContinualEvaluation  # noqa: E402
from lightning_taylor.data import TaskStreamDataModule  # noqa: E402

if __name__ == "__main__":
    L.seed_everything(0)
    stream = TaskStreamDataModule("digits", num_tasks=5, epochs_per_task=2)  # or your own DataModule
    trainer = L.Trainer(
        max_epochs=stream.max_epochs, reload_dataloaders_every_n_epochs=1, check_val_every_n_epoch=2,
        num_sanity_val_steps=0, default_root_dir="runs/examples/add_ita",
        callbacks=[ITA(alpha=100.0, lambda_fisher=1.0, rank=4), ContinualEvaluation()],
    )
    trainer.fit(MyViT(), stream)
