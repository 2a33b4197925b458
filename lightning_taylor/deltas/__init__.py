"""Per-task weight deltas (LoRA, full, IA3) on a model's linear layers: bank, compose, edit, merge, save, export."""

from lightning_taylor.deltas.adapters import routed, split_bias_attentions
from lightning_taylor.deltas.composition import (
    Composition,
    check_layer_patterns,
    reweight,
    specialise,
    uniform,
    unlearn,
)
from lightning_taylor.deltas.io import (
    export_merged,
    load_deltas,
    load_merged,
    merged_state_dict,
    save_deltas,
)
from lightning_taylor.deltas.presets import DEFAULT_TARGETS, default_targets
from lightning_taylor.deltas.reach import check_reach, probe_input
from lightning_taylor.deltas.styles import (
    DeltaStyle,
    FullDelta,
    IA3Delta,
    LinearDelta,
    LoRADelta,
)
from lightning_taylor.deltas.task_deltas import TaskDeltas, find_targets

__all__ = [
    "Composition",
    "check_layer_patterns",
    "reweight",
    "specialise",
    "uniform",
    "unlearn",
    "DEFAULT_TARGETS",
    "DeltaStyle",
    "FullDelta",
    "IA3Delta",
    "LinearDelta",
    "LoRADelta",
    "TaskDeltas",
    "check_reach",
    "default_targets",
    "export_merged",
    "find_targets",
    "load_deltas",
    "load_merged",
    "merged_state_dict",
    "probe_input",
    "routed",
    "save_deltas",
    "split_bias_attentions",
]
