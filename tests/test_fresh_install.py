"""What a fresh machine needs: every import declared, CI running the README's commands, the demo as typed.

A module installed by hand makes a local run green and a fresh install red; these tests make the gap visible
wherever the suite runs (and `.ci/run` runs it in a virtual environment it creates itself).
"""

import ast
import configparser
import csv
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ declared imports


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(text: str) -> set[str]:
    names = (re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line.strip()) for line in text.splitlines())
    return {_normalise(m.group(0)) for m in names if m}


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    """``install_requires`` and each extra of setup.cfg, as normalised distribution names."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = {name: _requirements(value) for name, value in cfg.items("options.extras_require")}
    return _requirements(cfg.get("options", "install_requires")), extras


def _third_party_imports(folder: Path) -> dict[str, str]:
    """Top-level modules imported anywhere in ``folder``'s Python files (inside functions too) -> one file."""
    # The repository's own modules (tests also import benchmarks/ and scripts/ by path) are not third-party.
    local = {p.stem for sub in ("tests", "benchmarks", "scripts", "examples") for p in (ROOT / sub).rglob("*.py")}
    local |= {p.name for p in folder.rglob("*") if p.is_dir()}
    found: dict[str, str] = {}
    for file in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local and top != "lightning_taylor":
                    found.setdefault(top, str(file.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("folder, extras", [("lightning_taylor", ()), ("tests", ("test",))])
def test_every_imported_module_is_declared(folder, extras):
    core, extra = _declared()
    allowed = core.union(*(extra[name] for name in extras))
    owners = metadata.packages_distributions()
    undeclared = []
    for module, file in _third_party_imports(ROOT / folder).items():
        distributions = {_normalise(d) for d in owners.get(module, [])}
        if not distributions & allowed:
            undeclared.append(f"{module} ({', '.join(sorted(distributions)) or 'not installed'}), imported by {file}")
    where = "install_requires" + "".join(f" or the [{name}] extra" for name in extras)
    assert not undeclared, f"imported but not declared in setup.cfg's {where}: {undeclared}"


# ------------------------------------------------------------------------------------ README and CI


def _quick_start_commands() -> list[str]:
    """The shell lines of the README's quick start (its ```bash blocks, up to the next heading)."""
    text = (ROOT / "README.md").read_text()
    section = re.split(r"\n#{2,} ", text.split("## Quick start", 1)[1], maxsplit=1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_commands_in_a_new_virtual_environment():
    readme = _quick_start_commands()
    install = [line for line in readme if line.startswith("pip install")]
    tests = [line for line in readme if "pytest" in line]
    assert len(install) == 1 and len(tests) == 1, readme
    assert "lightning-taylor fit" in readme
    script = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    venv = next(i for i, line in enumerate(script) if re.search(r"python3? -m venv ", line))
    activate = next(i for i, line in enumerate(script) if re.search(r"(source|\.) .*/bin/activate", line))
    assert venv < activate < script.index(install[0]) < script.index(tests[0]) == len(script) - 1
    assert not any(line.startswith(("pip ", "python -m pip")) for line in script if line != install[0]), \
        "CI must install only what the README's command installs"


def test_the_readme_main_command_runs_the_demo_to_its_accuracy_matrix(tmp_path):
    """`lightning-taylor fit` as a user types it (the console script of this environment), only made short."""
    executable = Path(sys.executable).with_name("lightning-taylor")
    command = str(executable) if executable.exists() else shutil.which("lightning-taylor")
    assert command, "the `lightning-taylor` console script is not installed (pip install -e \".[test]\")"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LIGHTNING_TAYLOR_TRACEBACK", None)
    # Short: 2 tasks of 1 epoch, 2 batches (the glyph stream keeps its fixed split: test_fraction does not apply).
    short = ["--data.num_tasks", "2", "--data.epochs_per_task", "1",
             "--trainer.limit_train_batches", "2",
             "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"]
    result = subprocess.run([command, "fit", *short], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    runs = sorted(tmp_path.glob("runs/*/*/version_0/accuracy_class_il.csv"))
    assert len(runs) == 1, sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))[:20]
    with open(runs[0]) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["after_task"] for row in rows] == ["0", "1"]
    assert 0.0 <= float(rows[-1]["average_accuracy"]) <= 1.0
    assert "class_il accuracy (%)" in result.stdout + result.stderr  # the matrix the demo prints
