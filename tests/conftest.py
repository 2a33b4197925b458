import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch

#: Constructor arguments of the tiny ViT used across the tests (4 patches + CLS token, 2 blocks).
TINY_VIT = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5)


def make_vit(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY_VIT, **overrides})
    return model.to(dtype).eval().requires_grad_(False)


@pytest.fixture
def vit() -> torch.nn.Module:
    return make_vit()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A tiny finished ITA run directory (tests/finished_run.py), built once and shared: do not modify it."""
    from finished_run import make_run

    return make_run(tmp_path_factory.mktemp("finished_run"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster than two cores shared with other processes (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
