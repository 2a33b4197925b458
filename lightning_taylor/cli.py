"""The ``lightning-taylor`` command: a LightningCLI over :class:`IncrementalViT` and the task-stream data.

``lightning-taylor fit --config configs/digits/ita.yaml`` runs a whole stream in one ``fit``;
``--ckpt_path`` resumes mid-stream; ``--print_config`` shows every option. The trainer's epoch schedule
follows from the data: ``max_epochs = num_tasks × epochs_per_task``, data reloaded and the model validated
at every task boundary. These are linked, so setting them by hand is refused.

``lightning-taylor edit RUN [--drop K ...] [--keep K ...] [--factor K=M ...] [--layer-factor 'PATTERN:K=M']
[--mask-removed] [--export FILE]`` edits a finished run's composition (unlearning, specialisation,
reweighting), prints and saves the per-task accuracy before and after, and optionally exports the merged
model for plain timm; see :mod:`lightning_taylor.edit` (``lightning-taylor edit --help``).
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.module import IncrementalViT


class TaylorCLI(LightningCLI):
    """LightningCLI with the stream's schedule taken from the data module.

    ``max_epochs`` and ``check_val_every_n_epoch`` follow from ``num_tasks × epochs_per_task``; leave them
    unset (a value that disagrees is refused). Loaders are rebuilt every epoch (cheap), so a task boundary is
    never missed, also after resuming mid-task.
    """

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
        parser.link_arguments("data.epochs_per_task", "model.epochs_per_task")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.classes_per_task", "model.classes_per_task", apply_on="instantiate")

    def before_fit(self) -> None:
        data, trainer = self.datamodule, self.trainer
        configured = self.config[self.subcommand].trainer.max_epochs
        if configured is not None and configured != data.max_epochs:
            raise ValueError(
                f"Expected `trainer.max_epochs` to be num_tasks × epochs_per_task = {data.num_tasks} × "
                f"{data.epochs_per_task} = {data.max_epochs} (or unset), but got {configured}."
            )
        trainer.fit_loop.max_epochs = data.max_epochs
        trainer.check_val_every_n_epoch = data.epochs_per_task


def cli(args: list[str] | None = None, run: bool = True) -> TaylorCLI:
    """Build (and with ``run``, execute) the CLI; ``args`` default to the command line."""
    return TaylorCLI(
        IncrementalViT,
        TaskStreamDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"num_sanity_val_steps": 0, "reload_dataloaders_every_n_epochs": 1},
    )


def main() -> None:
    """Console-script entry point (returns nothing, so the exit status is 0)."""
    if sys.argv[1:2] == ["edit"]:  # a plain subcommand next to LightningCLI's fit / validate / test / ...
        from lightning_taylor.edit import main as edit_main

        edit_main(sys.argv[2:])
        return
    cli()


if __name__ == "__main__":
    main()
