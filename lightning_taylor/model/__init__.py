"""The pre-trained timm backbone (hub, file or the embedded tiny ViT) and the LightningModule around it."""

from lightning_taylor.model.backbone import (
           EMBEDDED,
           create_backbone,
           embedded_weights,
           input_size,
           load_weights,
)
from lightning_taylor.model.module import IncrementalViT, TaskCosine

__all__ = ["EMBEDDED", "IncrementalViT", "TaskCosine", "create_backbone", "embedded_weights", "input_size",
           "load_weights"]
