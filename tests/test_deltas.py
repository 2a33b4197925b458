import io

import pytest
import timm
import torch
from conftest import TINY_VIT, make_vit
from helpers import randomise_slot, train_stream

from lightning_taylor.deltas import (
    DEFAULT_TARGETS,
    LoRADelta,
    TaskDeltas,
    export_merged,
    load_deltas,
    load_merged,
    save_deltas,
)
from lightning_taylor.deltas.composition import uniform

STYLES = ["lora", "full", "ia3"]


def hand_built(vit: torch.nn.Module, deltas: TaskDeltas, weights: dict[int, float]) -> torch.nn.Module:
    """A plain timm model whose target weights are W0 + Σ w_t τ_t, built without the hooks."""
    plain = make_vit()
    plain.load_state_dict(vit.state_dict())
    with torch.no_grad():
        for name in deltas.names:
            W = plain.get_submodule(name).weight
            for task, w in weights.items():
                W += w * deltas.task_delta(name, task)
    return plain


def test_default_targets_are_every_block_projection(vit):
    deltas = TaskDeltas(vit, rank=2)
    depth = TINY_VIT["depth"]
    assert len(deltas.names) == 4 * depth
    assert deltas.names[:4] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert DEFAULT_TARGETS == ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2")
    assert deltas.targets == DEFAULT_TARGETS  # the automatic choice for a plain ViT


def test_lora_shapes_and_init(vit):
    deltas = TaskDeltas(vit, rank=2, seed=3)
    deltas.begin_task(0)
    qkv, fc1 = deltas.layer("blocks.0.attn.qkv"), deltas.layer("blocks.0.mlp.fc1")
    assert qkv.lora_A.shape == (6, 24) and qkv.lora_B.shape == (72, 6)  # qkv gets rank 3r
    assert fc1.lora_A.shape == (2, 24) and fc1.lora_B.shape == (96, 2)
    bound = 1 / (2 * 24) ** 0.5
    assert 0 < fc1.lora_A.abs().max() <= bound and fc1.lora_A.abs().max() > 0.5 * bound
    assert torch.count_nonzero(fc1.lora_B) == 0  # τ = 0 at the start of a task


def test_unknown_target_pattern_names_pattern_and_real_layers(vit):
    with pytest.raises(ValueError, match=r"`targets`.*'blocks\.\*\.mlp\.fc9'.*blocks\.0\.attn\.qkv"):
        TaskDeltas(vit, targets=["blocks.*.mlp.fc9"])


@pytest.mark.parametrize("bad", [dict(style="dora"), dict(rank=0), dict(qkv_rank_factor=-1), dict(seed=-2)])
def test_bad_arguments_are_named(vit, bad):
    (name, value), = bad.items()
    with pytest.raises(ValueError, match=f"`{name}`.*{value!r}"):
        TaskDeltas(vit, **bad)


@pytest.mark.parametrize("style", STYLES)
def test_composition_forward_equals_hand_built_weights(vit, images, style):
    deltas = TaskDeltas(vit, style=style, rank=2)
    train_stream(deltas, 3)
    weights = {0: 0.5, 1: -0.25, 2: 0.8}
    deltas.compose(weights)
    expected = hand_built(vit, deltas, weights)(images)
    assert not torch.allclose(expected, make_vit()(images))  # the deltas really change the model
    torch.testing.assert_close(vit(images), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("style", STYLES)
def test_live_slot_forward_equals_hand_built(vit, images, style):
    """ITA training forward: θ0 + τ_t with the slot live and earlier tasks banked but weighted 0."""
    deltas = TaskDeltas(vit, style=style, rank=2)
    train_stream(deltas, 2)
    deltas.begin_task(2)
    randomise_slot(deltas, 7)
    deltas.compose({2: 1.0})
    torch.testing.assert_close(vit(images), hand_built(vit, deltas, {2: 1.0})(images), rtol=1e-10, atol=1e-12)
    deltas.compose(uniform([0, 1, 2]))  # IEL training forward: the uniform composition, slot included
    expected = hand_built(vit, deltas, {0: 1 / 3, 1: 1 / 3, 2: 1 / 3})(images)
    torch.testing.assert_close(vit(images), expected, rtol=1e-10, atol=1e-12)


def test_lora_training_forward_never_forms_dense_delta(vit, images, monkeypatch):
    deltas = TaskDeltas(vit, rank=2)
    deltas.begin_task(0)
    randomise_slot(deltas, 0)
    deltas.compose({0: 1.0})

    def forbidden(*args, **kwargs):
        raise AssertionError("B·A was formed in the forward")

    monkeypatch.setattr(LoRADelta, "dense", forbidden)
    vit(images).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in deltas.slot_parameters())


def test_gradients_reach_only_the_slot(vit, images):
    deltas = TaskDeltas(vit, rank=2)
    train_stream(deltas, 1)
    deltas.begin_task(1)
    randomise_slot(deltas, 1)
    deltas.compose(uniform([0, 1]))
    slot_before = [p for p in deltas.slot_parameters()]
    vit(images).square().sum().backward()
    assert [p for p in deltas.slot_parameters()] == slot_before  # the same Parameter objects all along
    assert all(not p.requires_grad for p in vit.parameters())
    assert all(not b.requires_grad for b in deltas.buffers())


@pytest.mark.parametrize("style", STYLES)
def test_merge_then_unmerge_restores_base_weights(vit, images, style):
    deltas = TaskDeltas(vit, style=style, rank=2)
    train_stream(deltas, 3)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    deltas.compose(uniform([0, 1, 2]))
    unmerged_logits = vit(images)
    deltas.merge()
    assert deltas.merged
    torch.testing.assert_close(vit(images), unmerged_logits, rtol=1e-10, atol=1e-12)
    changed = vit.get_submodule("blocks.1.mlp.fc2").weight
    assert not torch.allclose(changed, before["blocks.1.mlp.fc2.weight"])
    with pytest.raises(RuntimeError, match="unmerge"):
        deltas.compose({0: 1.0})
    deltas.unmerge()
    for key, value in vit.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)  # bit for bit
    torch.testing.assert_close(vit(images), unmerged_logits, rtol=1e-10, atol=1e-12)


def test_safe_merge_names_the_non_finite_task(vit):
    deltas = TaskDeltas(vit, style="full")
    train_stream(deltas, 2)
    with torch.no_grad():
        deltas.layer("blocks.1.attn.proj").delta_task0[0, 0] = float("nan")
    deltas.compose(uniform([0, 1]))
    with pytest.raises(ValueError, match="task 0 in layer `blocks.1.attn.proj`"):
        deltas.merge()
    assert not deltas.merged


def test_base_state_dict_keeps_plain_timm_keys(vit):
    plain_keys = set(make_vit().state_dict())
    TaskDeltas(vit, rank=2)
    assert set(vit.state_dict()) == plain_keys
    vit.load_state_dict(make_vit(seed=5).state_dict())  # a plain timm checkpoint loads strictly


@pytest.mark.parametrize("style", STYLES)
def test_checkpoint_round_trip_recreates_banks(vit, images, style):
    deltas = TaskDeltas(vit, style=style, rank=2)
    train_stream(deltas, 2)
    deltas.begin_task(2)
    randomise_slot(deltas, 9)
    deltas.compose(uniform([0, 1, 2]))
    reference = vit(images)
    buffer = io.BytesIO()
    torch.save(deltas.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    fresh_vit = make_vit()
    fresh = TaskDeltas(fresh_vit, style=style, rank=2)
    fresh.load_state_dict(state)
    assert fresh.current_task == 2 and fresh.banked_tasks == [0, 1]
    fresh.compose(uniform([0, 1, 2]))
    torch.testing.assert_close(fresh_vit(images), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("style", STYLES)
def test_save_load_safetensors_round_trip(vit, images, style, tmp_path):
    deltas = TaskDeltas(vit, style=style, rank=2)
    train_stream(deltas, 3)
    deltas.compose({0: 0.2, 1: 0.3, 2: 0.5})
    reference = vit(images)
    save_deltas(deltas, tmp_path / "deltas.safetensors", metadata={"note": "test"})

    fresh_vit = make_vit()
    fresh = TaskDeltas(fresh_vit, style=style, rank=2)
    assert load_deltas(fresh, tmp_path / "deltas.safetensors") == [0, 1, 2]
    fresh.compose({0: 0.2, 1: 0.3, 2: 0.5})
    torch.testing.assert_close(fresh_vit(images), reference, rtol=1e-12, atol=1e-12)

    other = TaskDeltas(make_vit(), style=style, rank=3)
    if style == "lora":
        with pytest.raises(ValueError, match="rank='3'.*but got rank='2'"):
            load_deltas(other, tmp_path / "deltas.safetensors")


@pytest.mark.parametrize("style", STYLES)
def test_exported_merged_model_loads_into_plain_timm(vit, images, style, tmp_path):
    deltas = TaskDeltas(vit, style=style, rank=2)
    train_stream(deltas, 3)
    composition = uniform([0, 1, 2])
    deltas.compose(composition)
    reference = vit(images)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    export_merged(vit, deltas, tmp_path / "merged.safetensors", composition, "vit_tiny_patch16_224", TINY_VIT)
    for key, value in vit.state_dict().items():  # exporting leaves the live model as it was
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)

    from safetensors.torch import load_file

    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT).double().eval()
    plain.load_state_dict(load_file(tmp_path / "merged.safetensors"))  # strict: exactly timm's keys
    torch.testing.assert_close(plain(images), reference, rtol=1e-10, atol=1e-12)
    loaded = load_merged(tmp_path / "merged.safetensors")  # timm builds float32: float32 tolerance
    torch.testing.assert_close(loaded(images.float()).double(), reference, rtol=1e-4, atol=1e-5)


def test_begin_task_is_deterministic_in_seed_and_task():
    a, b = TaskDeltas(make_vit(), rank=2, seed=4), TaskDeltas(make_vit(), rank=2, seed=4)
    a.begin_task(0)
    a.begin_task(1)
    b.begin_task(1)
    for pa, pb in zip(a.slot_parameters(), b.slot_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    c = TaskDeltas(make_vit(), rank=2, seed=5)
    c.begin_task(1)
    assert not torch.equal(next(a.slot_parameters()), next(c.slot_parameters()))


def test_compose_rejects_unknown_tasks(vit):
    deltas = TaskDeltas(vit, rank=2)
    train_stream(deltas, 2)
    with pytest.raises(ValueError, match=r"Unknown tasks: \[4\]"):
        deltas.compose({0: 0.5, 4: 0.5})


def test_disabled_runs_the_base_model(vit, images):
    reference = make_vit()(images)
    deltas = TaskDeltas(vit, rank=2)
    train_stream(deltas, 2)
    deltas.compose(uniform([0, 1]))
    with deltas.disabled():
        torch.testing.assert_close(vit(images), reference, rtol=0, atol=0)
    assert not torch.allclose(vit(images), reference)


def test_detach_removes_the_hooks(vit, images):
    reference = make_vit()(images)
    deltas = TaskDeltas(vit, rank=2)
    train_stream(deltas, 1)
    deltas.compose({0: 1.0})
    deltas.detach()
    torch.testing.assert_close(vit(images), reference, rtol=0, atol=0)


def test_repr_shows_tasks_and_shapes(vit):
    deltas = TaskDeltas(vit, rank=2)
    train_stream(deltas, 2)
    text = repr(deltas)
    assert "banked=[0, 1]" in text and "lora_A=(6, 24)" in text and "style='lora'" in text


class _Toy(torch.nn.Module):
    """Two linear layers; ``mode`` makes ``a`` applied by F.linear (module not called) or its output discarded."""

    def __init__(self, mode: str = "plain") -> None:
        super().__init__()
        self.mode = mode
        self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(3, 2)

    def forward(self, x):
        if self.mode == "functional":
            h = torch.nn.functional.linear(x, self.a.weight, self.a.bias)
        else:
            h = self.a(x)
        return self.b(x) if self.mode == "discarded" else self.b(x) + h[:, :2]


def test_guard_passes_when_every_delta_reaches_the_output(vit):
    deltas = TaskDeltas(vit, rank=2)
    deltas.check_reach(vit)  # probe made from the model's input size
    assert all(p.grad is None for p in deltas.slot_parameters()) and vit.training is False
    toy = _Toy()
    TaskDeltas(toy, targets=["a", "b"]).check_reach(toy, torch.randn(2, 3))


@pytest.mark.parametrize("mode, match", [
    ("functional", r"`targets`.*forward runs in _Toy's forward.*'a'.*F\.linear"),
    ("discarded", r"`targets`.*output reaches _Toy's output.*'a'"),
])
def test_guard_names_a_target_whose_delta_would_be_ignored(mode, match):
    toy = _Toy(mode)
    deltas = TaskDeltas(toy, targets=["a", "b"])
    with pytest.raises(ValueError, match=match):
        deltas.check_reach(toy, torch.randn(2, 3))


def test_guard_refuses_another_model_a_detached_state_and_an_unknown_input_size(vit):
    deltas = TaskDeltas(vit, rank=2)
    with pytest.raises(ValueError, match="`model`.*attached to"):
        deltas.check_reach(make_vit())
    deltas.detach()
    with pytest.raises(RuntimeError, match="detached"):
        deltas.check_reach(vit)
    toy = _Toy()
    with pytest.raises(ValueError, match="`probe`.*_Toy.*pass a probe batch"):
        TaskDeltas(toy, targets=["a"]).check_reach(toy)


def test_default_targets_without_a_known_block_layout_name_the_family():
    with pytest.raises(ValueError, match=r"`targets`.*_Toy.*blocks\.\*.*\['a', 'b'\]"):
        TaskDeltas(_Toy())


def test_the_banked_part_of_a_composition_is_folded_into_the_weight(vit, images):
    """One matmul with W0 + C instead of two (IEL trains through the composition): the same output as the
    unfolded sum, θ0 exactly when disabled, and rebuilt when W0 changes in place (e.g. a state-dict load)."""
    deltas = TaskDeltas(vit, rank=2)
    train_stream(deltas, 2)
    deltas.begin_task(2)
    randomise_slot(deltas, 7)
    deltas.compose({0: 0.5, 1: 0.25, 2: 0.25})
    layer = deltas.layer("blocks.0.attn.qkv")
    folded = vit(images)
    assert layer.folded is not None
    for _, delta, _ in deltas.layers():
        delta.reads_base_output = True  # the unfolded path: x W0ᵀ + x Cᵀ
    torch.testing.assert_close(vit(images), folded, rtol=1e-12, atol=1e-12)
    for _, delta, _ in deltas.layers():
        delta.reads_base_output = False
    with deltas.disabled():
        plain = vit(images)
    deltas.detach()
    assert torch.equal(plain, vit(images))  # disabled: exactly nn.Linear's forward
    deltas.attach()
    with torch.no_grad():
        vit.get_submodule("blocks.0.attn.qkv").weight.mul_(2.0)
    doubled = vit(images)
    with torch.no_grad():
        vit.get_submodule("blocks.0.attn.qkv").weight.mul_(0.5)
    assert not torch.allclose(doubled, folded)
    torch.testing.assert_close(vit(images), folded, rtol=1e-12, atol=1e-12)
