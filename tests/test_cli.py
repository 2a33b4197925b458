"""Every shipped config parses and instantiates; the stream schedule is enforced."""

from pathlib import Path

import pytest

from lightning_taylor.callbacks import IEL, ITA, SecondOrder
from lightning_taylor.cli import cli

CONFIGS = sorted(str(p) for p in Path(__file__).parents[1].joinpath("configs").rglob("*.yaml"))
OFFLINE = ["--model.pretrained", "false", "--trainer.logger", "false"]  # no hub look-up in tests


def test_configs_are_found():
    names = {str(Path(p).relative_to(Path(p).parents[1])) for p in CONFIGS}
    assert {"digits/ita.yaml", "digits/iel.yaml", "mnist/ita.yaml", "mnist/iel.yaml", "glyphs/ita.yaml", "glyphs/iel.yaml", "cifar100/ita.yaml",
            "cifar100/iel.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: "/".join(Path(p).parts[-2:]))
def test_shipped_config_parses_and_instantiates(config):
    if "imagefolder" in config:
        pytest.skip("a template whose root is a placeholder: tests/test_data.py fits it on a fake folder")
    # The embedded streams' configs use the embedded backbone offline.
    pretrained = [] if any(name in config for name in ("digits", "mnist", "glyphs")) else OFFLINE
    # Method options from the command line, in both spellings (lightning_taylor/cli/overrides.py).
    method_options = ["--method.fisher_batch_size", "7", "--trainer.callbacks.max_grad_norm=50"]
    parsed = cli(["--config", config, *pretrained, *method_options], run=False)
    data, model, trainer = parsed.datamodule, parsed.model, parsed.trainer
    assert model.hparams.num_classes == data.num_classes
    assert model.task_ranges == data.task_ranges  # the class partition (uneven for cars196)
    assert model.hparams.epochs_per_task == data.epochs_per_task
    algorithms = [c for c in trainer.callbacks if isinstance(c, SecondOrder)]
    assert len(algorithms) == 1
    assert algorithms[0].curvature_settings.batch_size == 7 and algorithms[0].penalty_settings.max_grad_norm == 50
    if Path(config).stem in ("ita", "iel"):
        assert type(algorithms[0]) is {"ita": ITA, "iel": IEL}[Path(config).stem]
    if Path(config).parent.name == "mnist":
        assert data.dataset == "mnist" and model.hparams.lr == 0.002
    if "glyphs" in Path(config).parts:
        assert data.dataset == "glyphs" and model.hparams.pretrained == "embedded:glyphs"


def test_cifar100_config_has_the_reference_values():
    parsed = cli(["--config", next(c for c in CONFIGS if c.endswith("cifar100/ita.yaml")), *OFFLINE], run=False)
    ita = next(c for c in parsed.trainer.callbacks if isinstance(c, ITA))
    assert (ita.strength, ita.lambda_fisher, ita.lambda_l2) == (0.02, 0.025, 0.001)
    assert ita.delta_settings.rank == 16 and parsed.model.hparams.lr == 3e-4
    assert parsed.trainer.accumulate_grad_batches == 16 and parsed.datamodule.batch_size == 8
    assert parsed.datamodule.epochs_per_task == 20 and parsed.datamodule.num_tasks == 10


def test_inconsistent_max_epochs_is_refused(tmp_path):
    args = ["fit", "--config", next(c for c in CONFIGS if c.endswith("digits/ita.yaml")),
            "--trainer.max_epochs", "7", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"`trainer.max_epochs` to be num_tasks × epochs_per_task = 5 × 5 = 25.*got 7"):
        cli(args)
