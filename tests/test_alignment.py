import io

import pytest
import torch
from torch import nn

from lightning_taylor.head import (
    ClassMixtures,
    align_head,
    alignment_epochs,
    fit_class_mixtures,
    head_fisher,
    linear_probe,
)


def clusters(seed: int = 0, per_cluster: int = 60, dim: int = 4, scale: float = 0.3):
    """Class c has two clusters, at +(5 + 5c) and −(5 + 5c) along axis c: well separated, 2 components each."""
    generator = torch.Generator().manual_seed(seed)
    features, labels, means = [], [], {}
    for c in range(3):
        centre = torch.zeros(dim)
        centre[c] = 5.0 + 5.0 * c
        means[c] = torch.stack([centre, -centre])
        for m in means[c]:
            features.append(m + scale * torch.randn(per_cluster, dim, generator=generator))
            labels.append(torch.full((per_cluster,), c))
    return torch.cat(features), torch.cat(labels), means


def make_head(out_features: int, in_features: int, seed: int = 0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(in_features, out_features).to(dtype)
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight, std=0.02)
        head.bias.zero_()
    return head


def accuracy(head: nn.Linear, features, labels, classes) -> float:
    with torch.no_grad():
        logits = head(features.to(head.weight.dtype))[:, list(classes)]
    predicted = torch.tensor(list(classes))[logits.argmax(dim=1)]
    return (predicted == labels).double().mean().item()


@pytest.fixture(scope="module")
def fitted():
    features, labels, means = clusters()
    return fit_class_mixtures(features, labels, n_components=2, seed=0), means


def test_fit_recovers_cluster_means(fitted):
    mixtures, means = fitted
    assert mixtures.classes == [0, 1, 2] and mixtures.feature_dim == 4
    for c in range(3):
        weights, fitted_means, variances = mixtures.components(c)
        order = fitted_means[:, c].argsort(descending=True)  # the + cluster first, as in `means`
        assert torch.allclose(fitted_means[order], means[c], atol=0.15)
        assert torch.allclose(weights, torch.full((2,), 0.5), atol=1e-6)
        assert torch.allclose(variances, torch.full_like(variances, 0.09), atol=0.05)


def test_fit_is_deterministic_and_uses_fewer_components_for_small_classes():
    features, labels, _ = clusters()
    features = torch.cat([features, torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 3.0, 4.0]])])
    labels = torch.cat([labels, torch.tensor([7, 7])])
    a = fit_class_mixtures(features, labels, n_components=5, seed=3)
    b = fit_class_mixtures(features, labels, n_components=5, seed=3)
    assert a.classes == [0, 1, 2, 7]
    assert [len(a.components(c)[0]) for c in a.classes] == [5, 5, 5, 2]
    for c in a.classes:
        for x, y in zip(a.components(c), b.components(c)):
            assert torch.equal(x, y)


def test_sampling_is_deterministic_with_right_labels(fitted):
    mixtures, means = fitted
    x1, y1 = mixtures.sample([2, 0], 50, torch.Generator().manual_seed(5))
    x2, y2 = mixtures.sample([2, 0], 50, torch.Generator().manual_seed(5))
    x3, _ = mixtures.sample([2, 0], 50, torch.Generator().manual_seed(6))
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.shape == (100, 4) and y1.dtype == torch.long
    assert y1.tolist() == [2] * 50 + [0] * 50
    # Every sample lies near one of its class's cluster centres.
    for x, y in zip(x1, y1):
        assert (means[int(y)] - x).norm(dim=1).min() < 2.0
    assert mixtures.sample([1], 3, torch.Generator().manual_seed(0), dtype=torch.float64)[0].dtype == torch.float64


def test_sampling_unknown_class_is_a_clear_error(fitted):
    mixtures, _ = fitted
    message = "Expected `classes` to be classes with fitted mixtures [0, 1, 2], but got [5]."
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        mixtures.sample([0, 5], 4, torch.Generator())
    with pytest.raises(ValueError, match="non-empty"):
        mixtures.sample([], 4, torch.Generator())


def test_state_round_trips_with_weights_only_and_update_keeps_old_classes(fitted):
    mixtures, _ = fitted
    buffer = io.BytesIO()
    torch.save(mixtures.state_dict(), buffer)
    buffer.seek(0)
    restored = ClassMixtures.from_state_dict(torch.load(buffer, weights_only=True))
    assert restored.classes == mixtures.classes
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(restored.sample([0, 1, 2], 8, gen_a)[0], mixtures.sample([0, 1, 2], 8, gen_b)[0])

    # New classes at a later task are added; the earlier classes stay.
    features = torch.randn(20, 4, generator=torch.Generator().manual_seed(2)) + 40.0
    restored.update(fit_class_mixtures(features, torch.tensor([3] * 10 + [4] * 10), n_components=2))
    assert restored.classes == [0, 1, 2, 3, 4]
    assert torch.equal(restored.components(1)[1], mixtures.components(1)[1])

    # As a submodule, the mixtures travel with the parent's state_dict.
    parent, other = nn.Module(), nn.Module()
    parent.mixtures, other.mixtures = restored, ClassMixtures()
    buffer = io.BytesIO()
    torch.save(parent.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.mixtures.classes == [0, 1, 2, 3, 4]
    assert torch.equal(other.mixtures.components(4)[2], restored.components(4)[2])


def test_fit_input_errors():
    with pytest.raises(ValueError, match="one per feature row"):
        fit_class_mixtures(torch.randn(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="n_components"):
        fit_class_mixtures(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), n_components=0)


def test_linear_probe_learns_task_rows_and_leaves_others_bitwise():
    features, labels, _ = clusters()
    task = labels >= 1  # classes 1 and 2 form the task; their head rows are 1 and 2 of 5
    x, y = features[task], labels[task]
    # Make the task linearly separable through the origin: shift class 2 away from class 1.
    x = x + torch.where(y[:, None] == 2, 3.0, -3.0)
    head = make_head(5, 4)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    start = accuracy(head, x, y, range(1, 3))
    linear_probe(head, x, y, range(1, 3), epochs=3, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert accuracy(head, x, y, range(1, 3)) > max(start, 0.95)
    for key in ("weight", "bias"):
        others = [0, 3, 4]
        assert torch.equal(head.state_dict()[key][others], before[key][others])
        assert not torch.equal(head.state_dict()[key][1:3], before[key][1:3])
    assert head.weight.grad is None

    # Deterministic given the generator, and it works under inference mode.
    again = make_head(5, 4)
    again.load_state_dict(before)
    with torch.inference_mode():
        linear_probe(again, x, y, range(1, 3), epochs=3, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.weight, head.weight) and torch.equal(again.bias, head.bias)


def test_linear_probe_errors():
    head = make_head(4, 3)
    with pytest.raises(ValueError, match=r"Expected `labels` to be labels of `classes` range\(2, 4\), but got \[0\]"):
        linear_probe(head, torch.randn(3, 3), torch.tensor([2, 0, 3]), range(2, 4))
    with pytest.raises(ValueError, match="one per feature row"):
        linear_probe(head, torch.randn(3, 3), torch.tensor([2, 3]), range(2, 4))
    with pytest.raises(ValueError, match="non-empty"):
        linear_probe(head, torch.randn(2, 3), torch.tensor([2, 3]), range(2, 2))
    with pytest.raises(ValueError, match="rows of the head"):
        linear_probe(head, torch.randn(2, 3), torch.tensor([2, 3]), range(2, 6))


def test_align_head_improves_accuracy_and_leaves_unseen_rows_bitwise():
    # Linearly separable mixtures: class c has clusters at 6 e_c ± 2 e_3.
    generator = torch.Generator().manual_seed(0)
    features, labels = [], []
    for c in range(3):
        for sign in (1.0, -1.0):
            centre = torch.zeros(4)
            centre[c], centre[3] = 6.0, 2.0 * sign
            features.append(centre + 0.5 * torch.randn(40, 4, generator=generator))
            labels.append(torch.full((40,), c))
    mixtures = fit_class_mixtures(torch.cat(features), torch.cat(labels), n_components=2)
    head = make_head(6, 4, seed=1)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    x, y = mixtures.sample([0, 1, 2], 200, torch.Generator().manual_seed(123))
    start = accuracy(head, x, y, [0, 1, 2])
    align_head(head, mixtures, [0, 1, 2], epochs=alignment_epochs(0, base=4), per_class=64, batch_size=32,
               lr=0.05, generator=torch.Generator().manual_seed(0))
    assert accuracy(head, x, y, [0, 1, 2]) > max(start + 0.2, 0.9)
    for key in ("weight", "bias"):
        assert torch.equal(head.state_dict()[key][3:], before[key][3:])

    again = make_head(6, 4, seed=1)
    align_head(again, mixtures, [0, 1, 2], epochs=4, per_class=64, batch_size=32, lr=0.05,
               generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.weight, head.weight)
    with pytest.raises(ValueError, match=r"fitted mixtures \[0, 1, 2\], but got \[4\]"):
        align_head(make_head(6, 4), mixtures, [0, 4], epochs=1)
    with pytest.raises(ValueError, match="temperature"):
        align_head(make_head(6, 4), mixtures, [0, 1], epochs=1, temperature=0.0)


def test_alignment_epochs():
    assert [alignment_epochs(t) for t in range(3)] == [10, 15, 20]
    assert alignment_epochs(2, base=1, per_task=3) == 7
    with pytest.raises(ValueError, match="task"):
        alignment_epochs(-1)


def brute_force_head_fisher(head: nn.Linear, features, classes):
    """Σ_x Σ_{c ∈ S} p_c (∂ log p_c / ∂θ)² over the logits of S, one example and class at a time."""
    weight = head.weight.detach().clone().requires_grad_(True)
    bias = head.bias.detach().clone().requires_grad_(True)
    sums = [torch.zeros_like(weight), torch.zeros_like(bias)]
    for x in features:
        log_probs = (weight @ x + bias)[classes].log_softmax(dim=0)
        for c in range(len(classes)):
            grads = torch.autograd.grad(log_probs[c], [weight, bias], retain_graph=True)
            for total, g in zip(sums, grads):
                total += log_probs[c].exp().detach() * g.square()
    return sums


def test_head_fisher_matches_brute_force_float64():
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(5, 7).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(7, 5, generator=generator, dtype=torch.float64))
        head.bias.copy_(torch.randn(7, generator=generator, dtype=torch.float64))
    features = torch.randn(9, 5, generator=generator, dtype=torch.float64)
    classes = [0, 1, 2, 4]
    sum_weight, sum_bias, count = head_fisher(head, features, classes)
    ref_weight, ref_bias = brute_force_head_fisher(head, features, classes)
    assert count == 9 and sum_weight.dtype == torch.float64
    assert torch.allclose(sum_weight, ref_weight, rtol=1e-10, atol=1e-12)
    assert torch.allclose(sum_bias, ref_bias, rtol=1e-10, atol=1e-12)
    assert sum_weight[[0, 1, 2, 4]].abs().min() > 0
    assert not sum_weight[[3, 5, 6]].any() and not sum_bias[[3, 5, 6]].any()

    without_bias = nn.Linear(5, 7, bias=False).double()
    with torch.no_grad():
        without_bias.weight.copy_(head.weight)
    assert head_fisher(without_bias, features, classes)[1] is None
    with pytest.raises(ValueError, match=r"shape \(N, 5\)"):
        head_fisher(head, features[:, :4], classes)
