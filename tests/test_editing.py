import pytest
import torch
from helpers import train_stream

from lightning_taylor.deltas import TaskDeltas
from lightning_taylor.deltas.composition import (
    Composition,
    check_layer_patterns,
    reweight,
    specialise,
    uniform,
    unlearn,
)


def test_uniform_and_edits_follow_the_paper():
    comp = uniform([0, 1, 2, 3])
    assert comp.weights == {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}
    assert unlearn(comp, [2]).weights == {0: 0.25, 1: 0.25, 2: 0.0, 3: 0.25}
    renormalised = unlearn(comp, [2], renormalise=True).weights
    assert renormalised == pytest.approx({0: 1 / 3, 1: 1 / 3, 2: 0.0, 3: 1 / 3})
    assert specialise(comp, [1, 3]).weights == pytest.approx({0: 0.0, 1: 0.5, 2: 0.0, 3: 0.5})
    assert reweight(comp, {0: 2.0}).weights == {0: 0.5, 1: 0.25, 2: 0.25, 3: 0.25}


def test_per_layer_factors_apply_only_to_matching_layers():
    comp = unlearn(uniform([0, 1]), [1], layers="blocks.1.*")
    assert comp.weights == {0: 0.5, 1: 0.5}
    assert comp.for_layer("blocks.1.mlp.fc1") == {0: 0.5, 1: 0.0}
    assert comp.for_layer("blocks.0.mlp.fc1") == {0: 0.5, 1: 0.5}
    twice = reweight(comp, {0: 3.0}, layers="blocks.*.mlp.*")
    assert twice.for_layer("blocks.1.mlp.fc1") == {0: 1.5, 1: 0.0}


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: unlearn(c, [7]), r"`tasks`.*\[7\]"),
        (lambda c: specialise(c, []), "`keep`"),
        (lambda c: unlearn(c, [0, 1], renormalise=True), "`tasks`.*proper subset"),
        (lambda c: reweight(c, {5: 1.0}), "`factors`"),
    ],
)
def test_bad_edits_are_named(edit, match):
    with pytest.raises(ValueError, match=match):
        edit(uniform([0, 1]))
    with pytest.raises(ValueError, match="`tasks`"):
        uniform([])


def test_unlearning_task_k_equals_the_composition_without_it(vit, images):
    deltas = TaskDeltas(vit, rank=2)
    train_stream(deltas, 4)
    deltas.compose(unlearn(uniform(range(4)), [1]))
    edited = vit(images)
    deltas.compose(Composition({0: 0.25, 2: 0.25, 3: 0.25}))
    torch.testing.assert_close(edited, vit(images), rtol=0, atol=0)
    deltas.compose(uniform(range(4)))
    assert not torch.allclose(edited, vit(images))


def test_per_layer_unlearning_changes_only_those_layers(vit, images):
    deltas = TaskDeltas(vit, rank=2)
    train_stream(deltas, 2)
    deltas.compose(unlearn(uniform([0, 1]), [0], layers="blocks.1.*"))
    for name, layer, linear in deltas.layers():
        expected = deltas.task_delta(name, 1) / 2
        if not name.startswith("blocks.1."):
            expected = expected + deltas.task_delta(name, 0) / 2
        torch.testing.assert_close(layer.composed_delta(linear.weight), expected)


def test_layer_patterns_must_match_a_layer_and_factors_be_finite():
    layers = ["blocks.0.attn.qkv", "blocks.1.mlp.fc1"]
    check_layer_patterns(reweight(uniform([0, 1]), {1: 0.0}, layers="blocks.1.*"), layers)
    with pytest.raises(ValueError, match=r"`layer_factors`.*'head\*'.*blocks\.0\.attn\.qkv"):
        check_layer_patterns(reweight(uniform([0, 1]), {1: 0.0}, layers="head*"), layers)
    for bad in (float("nan"), float("inf"), -float("inf"), "2", None, True):
        with pytest.raises(ValueError, match="`factors`.*finite"):
            reweight(uniform([0, 1]), {0: bad})
    assert reweight(uniform([0, 1]), {0: -3}).weights == {0: -1.5, 1: 0.5}  # negative factors are fine
