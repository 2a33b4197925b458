"""A CSV logger for runs that resume: a resumed fit keeps appending to its run's ``metrics.csv``.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it opens a version folder that is not
empty. A pre-empted fit resumed into the same run directory would then lose the metrics logged before the
interruption, so :class:`ResumableCSVLogger` keeps the file and its header and appends to it.
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer, but an existing ``metrics.csv`` is continued, not removed."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                header = next(csv.reader(handle), [])
            self.metrics_keys = sorted(header)  # new columns rewrite the file with the union of both


class ResumableCSVLogger(CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` whose ``metrics.csv`` survives a resume into the same folder.

    Same arguments as Lightning's ``CSVLogger``.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
