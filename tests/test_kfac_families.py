"""KFAC factors against curvlinops' KFACLinearOperator on every family of the compatibility table, layer by layer.

The families are scripts/vit_families.py's tiny random models. Their layers see different token counts: Swin's
attention runs on windows (``(B·W, 16, in)`` here) and its MLP on the whole stage (``(B, 64, in)``), SAM's
windowed blocks likewise; a single divisor for the pass made those ``Ā`` several times off. Each layer's ``A``
is divided by its own ``T`` (:mod:`lightning_taylor.curvature.kfac`), curvlinops' convention.
"""

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_vit
from safetensors.torch import save_file
from torch import nn

from lightning_taylor.curvature import (
    KroneckerAccumulator,
    KroneckerSums,
    kronecker_sums,
    load_kfac,
)
from lightning_taylor.deltas import TaskDeltas
from lightning_taylor.errors import InputError

_SCRIPT = Path(__file__).parents[1] / "scripts" / "vit_families.py"
_SPEC = importlib.util.spec_from_file_location("vit_families", _SCRIPT)
vit_families = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(vit_families)


def curvlinops_factors(model, layers, batches, approx):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from curvlinops import KFACLinearOperator
    weights = [model.get_submodule(name).weight for name in layers]
    for p in weights:
        p.requires_grad_(True)
    try:
        oracle = KFACLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), weights, batches,
                                    fisher_type="type-2", kfac_approx=approx, check_deterministic=False)
        if hasattr(oracle, "compute_kronecker_factors"):
            oracle.compute_kronecker_factors()
    finally:
        for p in weights:
            p.requires_grad_(False)
    return oracle._input_covariances, oracle._gradient_covariances


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", list(vit_families.FAMILIES))
def test_factors_equal_curvlinops_on_every_family(name, approx, one_thread):
    model = vit_families.build(name)
    x, y = vit_families._batch(name)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]  # two batches of unequal size: the counts are examples
    deltas = TaskDeltas(model, style="lora", rank=1, seed=0)  # the family's targets; adapts F.linear attention
    layers = deltas.names
    with deltas.disabled():
        ours = kronecker_sums(model, batches, layers, approx=approx)
        inputs, grads = curvlinops_factors(model, layers, batches, approx)
    assert ours.count == 4 and set(ours.tokens) == set(layers)
    for layer, (a, g) in ours.factors().items():
        assert a.abs().max() > 0 and g.abs().max() > 0, layer
        torch.testing.assert_close(a, inputs[layer], rtol=1e-10, atol=1e-12, msg=lambda m: f"{layer} Ā: {m}")
        torch.testing.assert_close(g * ours.count, grads[layer], rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{layer} Ḡ: {m}")
    if name.startswith("swin"):  # the case a single count got wrong: window tokens ≠ stage tokens
        assert ours.tokens["layers.0.blocks.0.attn.qkv"] == 16 and ours.tokens["layers.0.blocks.0.mlp.fc1"] == 64


LAYERS = ["blocks.0.attn.qkv", "blocks.1.mlp.fc2"]


@pytest.fixture(scope="module")
def sums_and_images():
    model = make_vit(seed=3)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, x, kronecker_sums(model, [(x, None)], LAYERS)


def test_a_single_token_count_is_every_layers(sums_and_images):
    """The format of checkpoints before per-layer counts: ``tokens`` one number."""
    _, _, sums = sums_and_images
    state = {"tasks": "merged", "terms": [], "current_task": 0, "records": [],
             "current": {"inputs": sums.inputs, "grads": sums.grads, "count": sums.count, "tokens": 5,
                         "estimator": "exact", "approx": "expand"}}
    accumulator = KroneckerAccumulator()
    accumulator.set_extra_state(state)
    assert accumulator.current.tokens == {name: 5 for name in LAYERS}
    for name, [(a, _)] in accumulator.factors(include_current=True).items():
        torch.testing.assert_close(a, sums.factors()[name][0], rtol=0, atol=0)
    with pytest.raises(InputError, match="`tokens` to be a token count for every layer.*`blocks.1.mlp.fc2` has none"):
        KroneckerSums(sums.inputs, sums.grads, sums.count, {"blocks.0.attn.qkv": 5})


def test_tasks_with_other_token_counts_are_refused(sums_and_images):
    model, x, sums = sums_and_images
    other = KroneckerSums(sums.inputs, sums.grads, sums.count, {**sums.tokens, "blocks.1.mlp.fc2": 9})
    for tasks in ("merged", "per_task"):
        accumulator = KroneckerAccumulator(tasks)
        accumulator.set_task(0, sums)
        with pytest.raises(InputError, match=r"`tokens` to be one token count of `blocks.1.mlp.fc2` over the tasks "
                                             r"\(5\), but got 9"):
            accumulator.set_task(1, other)
    larger = torch.randn(2, 3, 24, 24, dtype=torch.float64)  # 3 × 3 patches + CLS: 10 tokens, not 5
    with pytest.raises(InputError, match=r"`batches` to be batches of one image size \(`blocks.0.attn.qkv` saw 5 "
                                         r"tokens per row\), but got 10"):
        kronecker_sums(make_vit(seed=3, dynamic_img_size=True), [(x, None), (larger, None)], LAYERS)


def _write(path, sums: KroneckerSums, tokens: str, **meta) -> Path:
    tensors = {}
    for name, (a, g) in sums.factors().items():
        tensors[f"{name}.A"], tensors[f"{name}.G"] = a.contiguous(), g.contiguous()
    save_file(tensors, str(path), metadata={"approximation": "expand", "tasks_combined": "merged", "tasks": "0",
                                            "counts": str(sums.count), "examples": str(sums.count),
                                            "estimators": "exact", "tokens": tokens, **meta})
    return path


@pytest.mark.parametrize("tokens", ["5", json.dumps({name: 5 for name in LAYERS})])
def test_a_kfac_file_gives_back_its_sums_with_one_or_per_layer_counts(sums_and_images, tokens, tmp_path):
    _, _, sums = sums_and_images
    loaded = load_kfac(_write(tmp_path / "kfac.safetensors", sums, tokens))
    assert loaded.tokens == sums.tokens and loaded.tasks == [0] and loaded.counts == [sums.count]
    (back,) = loaded.sums()
    for key, value in sums.sums.items():
        torch.testing.assert_close(back.sums[key], value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change, match", [
    ({"tokens": "many"}, "`tokens` of `.*kfac.safetensors` to be a positive token count, or a JSON object"),
    ({"tokens": json.dumps({"blocks.0.attn.qkv": 5})}, "`tokens` of .* one per layer of"),
    ({"tokens": "0"}, "`tokens` of .* a positive token count"),
    ({"approximation": "exact"}, "`approximation` of .* 'expand' or 'reduce'"),
    ({"counts": "3,4"}, "`counts` of .* one positive example count per task of \\[0\\]"),
    ({"tasks_combined": "per_task"}, "`tensors` of .* <layer>.A / <layer>.G pairs of per_task tasks"),
])
def test_a_kfac_file_that_cannot_be_interpreted_is_named(sums_and_images, change, match, tmp_path):
    _, _, sums = sums_and_images
    path = _write(tmp_path / "kfac.safetensors", sums, change.pop("tokens", "5"), **change)
    with pytest.raises(InputError, match=match):
        load_kfac(path)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="`path` to be a readable safetensors file of KFAC factors"):
        load_kfac(tmp_path / "broken.safetensors")
