"""Release 0.1's module paths still import for one release, warn once, and give the objects of their new homes."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from lightning_taylor._moved import MOVED

#: a name users imported from each old path (release 0.1's documented API) and where it lives now
OLD_NAMES = {
    "lightning_taylor.alignment": ("align_head", "lightning_taylor.head.probing"),
    "lightning_taylor.backbone": ("create_backbone", "lightning_taylor.model.backbone"),
    "lightning_taylor.module": ("IncrementalViT", "lightning_taylor.model.module"),
    "lightning_taylor.drift_compensation": ("compensate_drift", "lightning_taylor.head.drift"),
    "lightning_taylor.callbacks.pretuning": ("PreTuning", "lightning_taylor.head.pretuning"),
    "lightning_taylor.fisher": ("diagonal_fisher", "lightning_taylor.curvature.diagonal"),
    "lightning_taylor.kfac": ("kronecker_sums", "lightning_taylor.curvature.kfac"),
    "lightning_taylor.kfac_accumulator": ("KroneckerAccumulator", "lightning_taylor.curvature.accumulators"),
    "lightning_taylor.kfac_penalties": ("kfac_delta_penalty", "lightning_taylor.penalties.kfac"),
    "lightning_taylor.editing": ("Composition", "lightning_taylor.deltas.composition"),
    "lightning_taylor.evaluation": ("evaluate", "lightning_taylor.runs.evaluate"),
    "lightning_taylor.run": ("load_run", "lightning_taylor.runs.load"),
    "lightning_taylor.edit": ("apply_edit", "lightning_taylor.runs.edit"),
    "lightning_taylor.edit_cli": ("main", "lightning_taylor.cli.edit"),
    "lightning_taylor.threads": ("auto_threads", "lightning_taylor.cli.threads"),
}


def test_every_moved_path_is_covered():
    assert set(OLD_NAMES) == set(MOVED)


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_path_warns_and_resolves_to_the_new_object(old, monkeypatch):
    name, home = OLD_NAMES[old]
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=f"`{old}` moved to `{MOVED[old][0]}`"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(home), name)
    assert name in dir(module)
    with pytest.raises(AttributeError, match=f"{old}.*no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018 - the look-up is the test


def test_from_import_of_an_old_path_works_in_a_fresh_interpreter():
    """What a user's 0.1 script does: nothing imported before, ``from old import name``."""
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    from lightning_taylor.editing import Composition\nexcept DeprecationWarning as w:\n"
            "    print('warned:', w)\n"
            "warnings.simplefilter('ignore')\nfrom lightning_taylor.editing import Composition\n"
            "from lightning_taylor.deltas import Composition as New\nprint(Composition is New)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "warned: `lightning_taylor.editing` moved to `lightning_taylor.deltas.composition`" in done.stdout
    assert done.stdout.strip().endswith("True")
