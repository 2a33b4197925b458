"""Small helpers shared by the tests."""

import torch

from lightning_taylor.deltas import TaskDeltas


def randomise_slot(deltas: TaskDeltas, seed: int, scale: float = 0.05) -> None:
    """Give the slot non-zero values in every tensor, so that nothing passes vacuously."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in deltas.slot_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p)
            base = 1.0 if deltas.style == "ia3" else 0.0  # IA3 scales start at 1, the others at 0
            p.copy_(base + scale * noise)


def train_stream(deltas: TaskDeltas, num_tasks: int, seed: int = 0) -> None:
    """Begin and 'train' (randomise) ``num_tasks`` tasks, banking each; the last stays in the slot too."""
    for task in range(num_tasks):
        deltas.begin_task(task)
        randomise_slot(deltas, seed + task)
    deltas.bank()


class SeenLogits(torch.nn.Module):
    """``model``'s logits of the first ``num_seen`` classes, as a submodule named ``model`` (Fisher references)."""

    def __init__(self, model: torch.nn.Module, num_seen: int) -> None:
        super().__init__()
        self.model, self.num_seen = model, num_seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, : self.num_seen]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
