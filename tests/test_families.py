"""Every timm ViT family of the README's table: attach, train, Fisher, merge, export (scripts/vit_families.py)."""

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import train_stream

from lightning_taylor.callbacks import ITA, PreTuning
from lightning_taylor.data import TaskStreamDataModule
from lightning_taylor.deltas import TaskDeltas

_SPEC = importlib.util.spec_from_file_location("vit_families", Path(__file__).parents[1] / "scripts" / "vit_families.py")
vit_families = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(vit_families)

#: Families whose attention applies ``qkv.weight`` by ``F.linear`` (adapted so that the layer runs).
SPLIT_BIAS = {"eva02_tiny_patch14_224", "beit_base_patch16_224", "swinv2_tiny_window8_256"}


@pytest.mark.parametrize("name", list(vit_families.FAMILIES))
def test_family_attaches_trains_gets_fisher_merges_and_exports(name, tmp_path):
    info = vit_families.check_family(name, str(tmp_path))
    qkv_blocks = [n.rpartition(".")[0] for n in info["names"] if n.endswith("attn.qkv")]
    assert info["adapted"] == (qkv_blocks if name in SPLIT_BIAS else [])
    assert qkv_blocks or name == "eva02_large_patch14_224"  # its q / k / v are separate layers


def test_presets_follow_the_family_layout():
    swin = TaskDeltas(vit_families.build("swin_tiny_patch4_window7_224"), rank=1)
    assert swin.targets[0] == "layers.*.blocks.*.attn.qkv"
    assert swin.names[:2] == ["layers.0.blocks.0.attn.qkv", "layers.0.blocks.0.attn.proj"]
    # Swin's top-level `layers` is also a method of TaskDeltas: the state_dict keys stay the layer names.
    assert "layers.1.blocks.0.mlp.fc2.lora_B" in swin.state_dict()
    assert swin.layer("layers.1.blocks.0.mlp.fc2").lora_B.shape == (16 * 2, 1)
    train_stream(swin, 2)
    resumed = TaskDeltas(vit_families.build("swin_tiny_patch4_window7_224"), rank=1)
    resumed.load_state_dict(swin.state_dict())  # banks re-created under the same keys
    assert resumed.banked_tasks == [0, 1] and resumed.state_dict().keys() == swin.state_dict().keys()
    torch.testing.assert_close(resumed.task_delta("layers.1.blocks.0.attn.qkv", 1),
                               swin.task_delta("layers.1.blocks.0.attn.qkv", 1), rtol=0, atol=0)

    eva = TaskDeltas(vit_families.build("eva02_large_patch14_224"), rank=1)
    assert {n.split(".", 2)[2] for n in eva.names} == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj",
                                                        "mlp.fc1_g", "mlp.fc1_x", "mlp.fc2"}


def test_targets_override_the_preset():
    model = vit_families.build("beit_base_patch16_224")
    deltas = TaskDeltas(model, rank=1, targets=["blocks.1.attn.qkv"])
    assert deltas.names == ["blocks.1.attn.qkv"] and deltas.adapted == ["blocks.1.attn"]
    deltas.check_reach(model)


@pytest.mark.parametrize("name", sorted(SPLIT_BIAS))
def test_adapted_attention_is_bit_exact_and_its_delta_acts(name):
    model = vit_families.build(name)
    plain = vit_families.build(name)
    x, _ = vit_families._batch(name)
    deltas = TaskDeltas(model, style="full", rank=1)
    deltas.begin_task(0)
    deltas.compose({0: 1.0})
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))  # the same F.linear call, through the layer
        qkv = deltas.names[0]
        deltas.layer(qkv).delta[0, 0] = 0.5  # only the qkv delta is non-zero
        assert not torch.allclose(model(x), plain(x))
        deltas.detach()
        assert torch.equal(model(x), plain(x))
    assert list(model.state_dict()) == list(plain.state_dict())
    attention = model.get_submodule(qkv.rpartition(".")[0])
    assert isinstance(attention.q_bias, torch.nn.Parameter) and attention.qkv.bias is None


@pytest.mark.parametrize("style", ["lora", "full", "ia3"])
def test_split_bias_deltas_equal_a_weight_change(style):
    """θ0 + Σ w_t τ_t through the adapted layer equals plain timm with the weights changed by hand."""
    name = "beit_base_patch16_224"
    model, plain = vit_families.build(name), vit_families.build(name)
    x, _ = vit_families._batch(name)
    deltas = TaskDeltas(model, style=style, rank=2)
    train_stream(deltas, 2)
    deltas.compose({0: 0.7, 1: 0.4})
    with torch.no_grad():
        for layer in deltas.names:
            plain.get_submodule(layer).weight += 0.7 * deltas.task_delta(layer, 0) + 0.4 * deltas.task_delta(layer, 1)
        torch.testing.assert_close(model(x), plain(x), rtol=1e-10, atol=1e-12)


class _BeitModule(L.LightningModule):
    """A user's module around a tiny BEiT (its attention applies `qkv.weight` by F.linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=10, img_size=16,
                                       patch_size=8, embed_dim=24, depth=1, num_heads=2, in_chans=1)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_beit(tmp_path) -> tuple[_BeitModule, ITA]:
    L.seed_everything(0, verbose=False)
    module = _BeitModule()
    callback = ITA(1.0, rank=2, pretuning=PreTuning(probe_epochs=1, align_epochs=1, align_epochs_per_task=1,
                                                     samples_per_class=8), head_fisher_samples=8, seed=0)
    data = TaskStreamDataModule("digits", num_tasks=5, epochs_per_task=1, batch_size=16, image_size=16)
    L.Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, limit_train_batches=2,
              limit_val_batches=0, enable_progress_bar=False, logger=False, enable_checkpointing=False,
              enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback]).fit(module, data)
    return module, callback


def test_ita_on_beit_trains_the_qkv_deltas_and_gets_their_fisher(tmp_path):
    module, callback = _fit_beit(tmp_path)
    deltas = module.task_deltas
    assert deltas.adapted == ["blocks.0.attn"] and deltas.banked_tasks == [0, 1]
    for name in deltas.names:
        for task in (0, 1):
            assert deltas.task_delta(name, task).abs().max() > 0, (name, task)
        assert callback.accumulator.current[f"{name}.weight"].abs().max() > 0, name


def test_the_first_task_boundary_refuses_a_target_whose_delta_is_ignored(tmp_path, monkeypatch):
    import lightning_taylor.deltas.task_deltas as task_deltas

    monkeypatch.setattr(task_deltas, "split_bias_attentions", lambda model, names: {})  # as without the adapter
    with pytest.raises(ValueError, match=r"`targets`.*forward runs in beit_base_patch16_224 \(Beit\).*'blocks\.0\.attn\.qkv'"):
        _fit_beit(tmp_path)
