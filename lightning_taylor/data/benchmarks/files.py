"""Reading a benchmark's metadata files (split files, label tables), with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import yaml

from lightning_taylor.data.benchmarks.base import Benchmark

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's loader: 30,000 entries in ~0.3 s, not 3 s


def _keys(benchmark: Benchmark, root: str, file: Path, content: Any, keys: Sequence[str],
          same_length: bool = True) -> dict:
    if not isinstance(content, dict) or any(k not in content for k in keys):
        raise benchmark.missing(root, f"The file `{file}` should be a mapping with the keys {list(keys)}.")
    lengths = {len(content[k]) if isinstance(content[k], list) else -1 for k in keys}
    if -1 in lengths or (same_length and len(lengths) != 1):
        length = " of one length" if same_length else ""
        raise benchmark.missing(root, f"The file `{file}` should hold lists{length} under {list(keys)}.")
    return content


def read_yaml(benchmark: Benchmark, root: str, file: Path, keys: Sequence[str]) -> dict:
    """The mapping in YAML ``file``, which must hold equally long lists under ``keys``."""
    try:
        content = yaml.load(file.read_text(), Loader=_Loader)
    except (OSError, yaml.YAMLError) as err:
        raise benchmark.missing(root, f"The file `{file}` could not be read as YAML ({err}).") from err
    return _keys(benchmark, root, file, content, keys)


def read_json(benchmark: Benchmark, root: str, file: Path, keys: Sequence[str], same_length: bool = True) -> dict:
    """The mapping in JSON ``file``, which must hold lists under ``keys`` (equally long if ``same_length``)."""
    try:
        content = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise benchmark.missing(root, f"The file `{file}` could not be read as JSON ({err}).") from err
    return _keys(benchmark, root, file, content, keys, same_length)


def read_table(benchmark: Benchmark, root: str, file: Path, columns: int) -> list[list[str]]:
    """The rows of a whitespace-separated text table (``<id> <value>`` files), each of ``columns`` fields
    (the last field keeps any spaces)."""
    try:
        lines = file.read_text().splitlines()
    except OSError as err:
        raise benchmark.missing(root, f"The file `{file}` could not be read ({err}).") from err
    rows = [line.split(maxsplit=columns - 1) for line in lines if line.strip()]
    bad = next((i for i, row in enumerate(rows) if len(row) != columns), None)
    if bad is not None:
        raise benchmark.missing(root, f"Line {bad + 1} of `{file}` should have {columns} fields: {lines[bad]!r}.")
    return rows
