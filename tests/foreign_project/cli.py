"""A stand-in for someone else's LightningCLI project: its own LightningModule, DataModule and config.

Nothing here imports lightning-taylor. The project gains ITA only through a file of the repository's
``callbacks/`` folder, added on the command line (from the repository root)::

    python tests/foreign_project/cli.py fit --config tests/foreign_project/config.yaml \
        --trainer.callbacks+=callbacks/ita_eval_checkpoint.yaml

The module keeps its ViT under ``encoder`` (not ``backbone``) and trains with cross-entropy over the current
task's classes; the DataModule serves plain loaders over a small synthetic tensor data set and says which task
is being trained (``current_task``), how many tasks there are and how many classes each owns.
"""

from __future__ import annotations

import lightning as L
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset


class TaskClassifier(L.LightningModule):
    """A small timm ViT classifier over all classes of the stream, trained on the current task's classes."""

    def __init__(self, num_classes: int = 4, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        # A tiny random ViT keeps the test fast; a real project would load pre-trained weights here.
        self.encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                                         img_size=16, patch_size=8, in_chans=1, embed_dim=24, depth=2, num_heads=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        data = self.trainer.datamodule
        first = data.current_task * data.classes_per_task
        logits = self(x)[:, first : first + data.classes_per_task]  # task-local cross-entropy
        loss = F.cross_entropy(logits, y - first)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())
        return {"logits": logits, "target": y}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class SyntheticStream(L.LightningDataModule):
    """Class-incremental stream over 1×16×16 tensors: class ``c`` is a fixed random pattern plus noise.

    Task ``t`` owns the labels ``[t·k, (t+1)·k)``. One ``fit`` runs the whole stream: the task is
    ``trainer.current_epoch // epochs_per_task``, so the trainer needs ``reload_dataloaders_every_n_epochs: 1``
    and ``max_epochs = num_tasks · epochs_per_task``.
    """

    def __init__(self, num_tasks: int = 2, classes_per_task: int = 2, epochs_per_task: int = 1,
                 train_per_class: int = 24, test_per_class: int = 16, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.num_tasks, self.classes_per_task, self.epochs_per_task = num_tasks, classes_per_task, epochs_per_task
        self.batch_size, self.seed = batch_size, seed
        generator = torch.Generator().manual_seed(seed)  # the data do not depend on the global seed
        classes = num_tasks * classes_per_task
        patterns = torch.randn(classes, 1, 16, 16, generator=generator)

        def split(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.arange(classes).repeat_interleave(per_class)
            return patterns[y] + 0.8 * torch.randn(len(y), 1, 16, 16, generator=generator), y

        self.train, self.test = split(train_per_class), split(test_per_class)

    @property
    def current_task(self) -> int:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    @staticmethod
    def _labels(data: tuple[torch.Tensor, torch.Tensor], start: int, stop: int) -> TensorDataset:
        x, y = data
        keep = (y >= start) & (y < stop)
        return TensorDataset(x[keep], y[keep])

    def train_dataloader(self) -> DataLoader:
        first = self.current_task * self.classes_per_task
        shuffle = torch.Generator().manual_seed(self.seed + self.trainer.current_epoch)
        return DataLoader(self._labels(self.train, first, first + self.classes_per_task), batch_size=self.batch_size,
                          shuffle=True, generator=shuffle)

    def val_dataloader(self) -> DataLoader:  # every task seen so far
        return DataLoader(self._labels(self.test, 0, (self.current_task + 1) * self.classes_per_task), batch_size=64)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(TaskClassifier, SyntheticStream, args=args, run=run)


if __name__ == "__main__":
    main()
