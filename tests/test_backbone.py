import json

import pytest
import torch
from safetensors.torch import load_file

from lightning_taylor.model.backbone import (
    create_backbone,
    embedded_metadata,
    embedded_weights,
)


def test_embedded_backbone_loads_the_shipped_weights_and_a_fresh_head():
    model = create_backbone(None, "embedded", num_classes=10, seed=3)
    shipped = load_file(embedded_weights())
    state = model.state_dict()
    assert set(shipped) == {k for k in state if not k.startswith("head.")}
    for key, value in shipped.items():
        assert torch.equal(state[key], value), key
    meta = embedded_metadata()
    assert json.loads(meta["model_kwargs"])["in_chans"] == 1 and float(meta["test_accuracy"]) > 0.75
    assert model.head.out_features == 10 and torch.count_nonzero(model.head.bias) == 0
    assert 0 < model.head.weight.std() < 0.03  # trunc-normal(0.02)
    again = create_backbone(None, "embedded", num_classes=10, seed=3)
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


SMALL = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2)


def test_weights_of_another_head_size_and_channels_load(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("vit_tiny_patch16_224", num_classes=7, **SMALL)  # a 7-class head, 3 channels
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    model = create_backbone("vit_tiny_patch16_224", str(tmp_path / "w.safetensors"), num_classes=4, model_kwargs=SMALL)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert model.head.out_features == 4 and torch.count_nonzero(model.head.bias) == 0
    # A 1-channel model takes the file's stem summed over its channels (timm's adapt_input_conv).
    gray = create_backbone("vit_tiny_patch16_224", str(tmp_path / "w.safetensors"), num_classes=4,
                           model_kwargs={**SMALL, "in_chans": 1})
    assert torch.allclose(gray.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(1, keepdim=True))
    # A larger input resamples the position embedding (timm's checkpoint filter), nothing else changes.
    larger = create_backbone("vit_tiny_patch16_224", str(tmp_path / "w.safetensors"), num_classes=4,
                             model_kwargs={**SMALL, "img_size": 24})
    assert larger.pos_embed.shape == (1, 1 + 9, 24) and torch.equal(larger.cls_token, source.cls_token)


def test_checkpoint_files_with_a_nested_state_dict_load(tmp_path):
    import timm

    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, **SMALL)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
               tmp_path / "w.pth")
    model = create_backbone("vit_tiny_patch16_224", str(tmp_path / "w.pth"), num_classes=2, model_kwargs=SMALL)
    assert torch.equal(model.pos_embed, source.pos_embed)


def test_input_size_follows_the_patch_embedding():
    from lightning_taylor.model.backbone import input_size
    from lightning_taylor.model.module import IncrementalViT

    assert IncrementalViT().input_size == (1, 28, 28)  # the embedded backbone
    model = IncrementalViT("vit_tiny_patch16_224", pretrained=False, model_kwargs={**SMALL, "img_size": 24})
    assert model.input_size == (3, 24, 24)
    assert input_size(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None
