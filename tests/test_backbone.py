import json

import pytest
import torch
from safetensors.torch import load_file

from lightning_taylor.backbone import create_backbone, embedded_metadata, embedded_weights


def test_embedded_backbone_loads_the_shipped_weights_and_a_fresh_head():
    model = create_backbone("ignored", "embedded", num_classes=10, seed=3)
    shipped = load_file(embedded_weights())
    state = model.state_dict()
    assert set(shipped) == {k for k in state if not k.startswith("head.")}
    for key, value in shipped.items():
        assert torch.equal(state[key], value), key
    meta = embedded_metadata()
    assert json.loads(meta["model_kwargs"])["in_chans"] == 1 and float(meta["test_accuracy"]) > 0.75
    assert model.head.out_features == 10 and torch.count_nonzero(model.head.bias) == 0
    assert 0 < model.head.weight.std() < 0.03  # trunc-normal(0.02)
    again = create_backbone("ignored", "embedded", num_classes=10, seed=3)
    assert torch.equal(again.head.weight, model.head.weight)


def test_local_weights_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=8, embed_dim=24,
                               depth=1, num_heads=2)

    save_file(source.state_dict(), tmp_path / "w.safetensors")
    model = create_backbone("vit_tiny_patch16_224", str(tmp_path / "w.safetensors"), num_classes=4,
                            model_kwargs=dict(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2))
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_missing_weights_file_is_named():
    with pytest.raises(ValueError, match="`pretrained`.*'/nonexistent/w.safetensors'"):
        create_backbone("vit_tiny_patch16_224", "/nonexistent/w.safetensors", num_classes=4)
