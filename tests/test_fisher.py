import io

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_vit
from helpers import relative_error

from lightning_taylor.curvature import FisherAccumulator, FisherSums, diagonal_fisher

TARGETS = [f"blocks.{b}.{layer}.{attr}" for b in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
           for attr in ("weight", "bias")] + ["head.weight", "head.bias"]


def brute_force_fisher(model, images, names, labels=None):
    """Σ_x Σ_c p_c(x) (∂ log p_c(x)/∂θ)², one example and one class at a time with autograd."""
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(images.shape[0]):
        with torch.enable_grad():
            for n in names:
                params[n].requires_grad_(True)
            log_probs = model(images[i : i + 1]).log_softmax(dim=-1)[0]
            classes = range(log_probs.shape[0]) if labels is None else [int(labels[i])]
            for c in classes:
                grads = torch.autograd.grad(log_probs[c], [params[n] for n in names], retain_graph=True)
                weight = log_probs[c].exp().detach() if labels is None else 1.0
                for n, g in zip(names, grads):
                    sums[n] += weight * g.square()
            for n in names:
                params[n].requires_grad_(False)
    return sums


def test_exact_matches_brute_force_float64(vit, images):
    fisher = diagonal_fisher(vit, [images[:4], images[4:]], TARGETS)
    reference = brute_force_fisher(vit, images, TARGETS)
    assert fisher.count == 6 and fisher.estimator == "exact"
    for name in TARGETS:
        assert reference[name].abs().max() > 0
        assert relative_error(fisher.sums[name], reference[name]) <= 1e-6, name
        assert fisher.sums[name].dtype == torch.float64


def test_head_fisher_has_the_closed_form(vit, images):
    """For the head, Σ_c p_c (e_c − p)_o² = p_o (1 − p_o): F_W[o, i] = Σ_x p_o (1 − p_o) h_i²."""
    features = vit.forward_head(vit.forward_features(images), pre_logits=True)
    probs = vit(images).softmax(-1)
    expected_weight = (probs * (1 - probs)).T @ features.square()
    fisher = diagonal_fisher(vit, [images], ["head.weight", "head.bias"])
    torch.testing.assert_close(fisher.sums["head.weight"], expected_weight, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(fisher.sums["head.bias"], (probs * (1 - probs)).sum(0), rtol=1e-10, atol=1e-14)


def test_batch_split_sums_equal_the_unsplit_sum(vit, images):
    whole = diagonal_fisher(vit, [images], TARGETS)
    split = diagonal_fisher(vit, [images[:1], images[1:4], images[4:]], TARGETS)
    assert whole.count == split.count == 6
    for name in TARGETS:
        torch.testing.assert_close(split.sums[name], whole.sums[name], rtol=1e-12, atol=1e-15)


def test_empirical_uses_the_true_labels(vit, images):
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    fisher = diagonal_fisher(vit, [(images, labels)], TARGETS[:4], estimator="empirical")
    reference = brute_force_fisher(vit, images, TARGETS[:4], labels=labels)
    for name in TARGETS[:4]:
        assert relative_error(fisher.sums[name], reference[name]) <= 1e-6


def test_topk_with_all_classes_is_exact_and_fewer_classes_is_less(vit, images):
    exact = diagonal_fisher(vit, [images], TARGETS[:2])
    full = diagonal_fisher(vit, [images], TARGETS[:2], estimator="topk", top_k=5)
    truncated = diagonal_fisher(vit, [images], TARGETS[:2], estimator="topk", top_k=2)
    torch.testing.assert_close(full.sums[TARGETS[0]], exact.sums[TARGETS[0]], rtol=1e-12, atol=0)
    assert (truncated.sums[TARGETS[0]] <= exact.sums[TARGETS[0]] + 1e-18).all()
    assert truncated.sums[TARGETS[0]].sum() < exact.sums[TARGETS[0]].sum()
    assert truncated.settings == {"top_k": 2}


def test_mc_is_unbiased_in_the_limit():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).double()
    inputs = torch.randn(6, 8, dtype=torch.float64)
    names = ["0.weight", "2.weight"]
    exact = diagonal_fisher(mlp, [inputs], names)
    mc = diagonal_fisher(mlp, [inputs], names, estimator="mc", samples=3000, generator=torch.Generator().manual_seed(0))
    assert mc.settings == {"samples": 3000}
    for name in names:
        assert relative_error(mc.sums[name], exact.sums[name]) < 0.05


def test_model_mode_is_restored_and_parameters_untouched(vit, images):
    vit.train()
    diagonal_fisher(vit, [images], ["head.weight"])
    assert vit.training
    assert all(not p.requires_grad and p.grad is None for p in vit.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(param_names=["blocks.0.norm1.weight"]), "`param_names`.*nn.Linear.*'blocks.0.norm1.weight'"),
        (dict(param_names=["blocks.9.attn.qkv.weight"]), "`param_names`.*'blocks.9.attn.qkv.weight'"),
        (dict(param_names=["head.weight"], estimator="kfac"), "`estimator`.*'kfac'"),
        (dict(param_names=["head.weight"], samples=0), "`samples`.*0"),
    ],
)
def test_bad_arguments_are_named(vit, images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        diagonal_fisher(vit, [images], **kwargs)


def test_empirical_without_labels_is_an_error(vit, images):
    with pytest.raises(ValueError, match="`batches`.*pairs"):
        diagonal_fisher(vit, [images], ["head.weight"], estimator="empirical")


def _fisher(value: float, count: int) -> FisherSums:
    return FisherSums({"w": torch.full((2, 3), value, dtype=torch.float64)}, count)


def test_accumulator_ita_uses_past_tasks_and_iel_includes_the_current():
    acc = FisherAccumulator(prior=1e-5)
    acc.set_task(0, _fisher(6.0, 3))
    torch.testing.assert_close(acc.curvature(include_current=False)["w"], torch.full((2, 3), 1e-5, dtype=torch.float64))
    torch.testing.assert_close(acc.curvature(include_current=True)["w"], torch.full((2, 3), 1e-5 + 2.0, dtype=torch.float64))
    acc.set_task(1, _fisher(10.0, 2))
    # ITA at task 1: mean Fisher of task 0 plus the prior; IEL: true counts over tasks 0 and 1.
    torch.testing.assert_close(acc.curvature(False)["w"], torch.full((2, 3), 1e-5 + 2.0, dtype=torch.float64))
    torch.testing.assert_close(acc.curvature(True)["w"], torch.full((2, 3), 1e-5 + 16.0 / 5, dtype=torch.float64))
    acc.set_task(2, _fisher(0.0, 5))
    torch.testing.assert_close(acc.curvature(False)["w"], torch.full((2, 3), 1e-5 + 16.0 / 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="`task`"):
        acc.set_task(2, _fisher(1.0, 1))


def test_accumulator_state_survives_weights_only_checkpoint():
    acc = FisherAccumulator()
    acc.set_task(0, _fisher(6.0, 3))
    acc.set_task(1, _fisher(10.0, 2))
    buffer = io.BytesIO()
    torch.save(acc.state_dict(), buffer)
    buffer.seek(0)
    fresh = FisherAccumulator()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.current_task == 1 and fresh.past_count == 3 and fresh.current_count == 2
    torch.testing.assert_close(fresh.curvature(True)["w"], acc.curvature(True)["w"])


def test_fisher_mean_divides_after_summing():
    fisher = _fisher(6.0, 3)
    torch.testing.assert_close(fisher.mean(prior=1.0)["w"], torch.full((2, 3), 3.0, dtype=torch.float64))
    assert torch.equal(FisherSums({"w": torch.zeros(2)}, 0).mean(prior=0.5)["w"], torch.full((2,), 0.5))


def test_float32_model_gives_float32_sums(images):
    model = make_vit(dtype=torch.float32)
    fisher = diagonal_fisher(model, [images.float()], ["blocks.0.mlp.fc1.weight"])
    assert fisher.sums["blocks.0.mlp.fc1.weight"].dtype == torch.float32


# --- the fast paths: both squaring forms, micro-batching, blocking, vectorised backward ------------------


@pytest.mark.parametrize("form", ["gram", "direct"])
def test_both_squaring_forms_match_brute_force(vit, images, monkeypatch, form):
    import lightning_taylor.curvature._squaring as fisher_module

    monkeypatch.setattr(fisher_module, "_use_gram", lambda *args: form == "gram")
    fisher = diagonal_fisher(vit, [images[:4], images[4:]], TARGETS)
    reference = brute_force_fisher(vit, images, TARGETS)
    for name in TARGETS:
        assert relative_error(fisher.sums[name], reference[name]) <= 1e-6, name


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("estimator", ["exact", "mc", "topk"])
def test_results_do_not_depend_on_chunking(vit, images, estimator, chunk_size):
    """Micro-batches (chunk_size < K·B), several backwards per micro-batch (chunk_size < K) or none."""
    kwargs = dict(estimator=estimator, samples=4, top_k=3)
    whole = diagonal_fisher(vit, [images], TARGETS, generator=torch.Generator().manual_seed(3), **kwargs)
    chunked = diagonal_fisher(vit, [images], TARGETS, generator=torch.Generator().manual_seed(3),
                              chunk_size=chunk_size, **kwargs)
    assert chunked.count == whole.count == 6
    for name in TARGETS:
        assert whole.sums[name].abs().max() > 0
        torch.testing.assert_close(chunked.sums[name], whole.sums[name], rtol=1e-12, atol=1e-15)


def test_small_workspace_blocks_give_the_same_sums(vit, images, monkeypatch):
    import lightning_taylor.curvature._squaring as fisher_module

    whole = {form: None for form in ("gram", "direct")}
    for form in whole:
        monkeypatch.setattr(fisher_module, "_use_gram", lambda *args, form=form: form == "gram")
        monkeypatch.setattr(fisher_module, "_WORKSPACE", 1 << 30)
        whole[form] = diagonal_fisher(vit, [images], TARGETS)
        monkeypatch.setattr(fisher_module, "_WORKSPACE", 7)  # one example, token and output unit at a time
        blocked = diagonal_fisher(vit, [images], TARGETS)
        for name in TARGETS:
            torch.testing.assert_close(blocked.sums[name], whole[form].sums[name], rtol=1e-12, atol=1e-15)
    for name in TARGETS:
        torch.testing.assert_close(whole["gram"].sums[name], whole["direct"].sums[name], rtol=1e-10, atol=1e-15)


def test_per_cotangent_fallback_gives_the_same_sums(vit, images, monkeypatch):
    """Where vmap lacks a batching rule, one backward per cotangent runs instead (tried once per call)."""
    import lightning_taylor.curvature.diagonal as fisher_module

    vectorised = diagonal_fisher(vit, [images], TARGETS)
    tries = []

    def failing_vmap(fn):
        def run(*args):
            tries.append(1)
            raise RuntimeError("Batching rule not implemented for aten::something")
        return run

    monkeypatch.setattr(fisher_module.torch.func, "vmap", failing_vmap)
    looped = diagonal_fisher(vit, [images[:3], images[3:]], TARGETS)
    assert len(tries) == 1
    for name in TARGETS:
        torch.testing.assert_close(looped.sums[name], vectorised.sums[name], rtol=1e-12, atol=1e-15)


def test_parameters_that_require_grad_get_no_grad_and_change_nothing(images):
    """No graph through parameters, nor through the layers before the first target."""
    frozen = make_vit()
    trainable = make_vit().requires_grad_(True)
    expected_sums = diagonal_fisher(frozen, [images], TARGETS).sums
    recorded = []  # does autograd record the layers before the first target (blocks.0.attn.qkv)?
    for name in ("patch_embed", "blocks.0.norm1"):
        trainable.get_submodule(name).register_forward_hook(lambda m, args, out: recorded.append(out.requires_grad))
    fisher = diagonal_fisher(trainable, [images], TARGETS)
    assert recorded and not any(recorded)
    assert all(p.requires_grad and p.grad is None for p in trainable.parameters())
    for name in TARGETS:
        torch.testing.assert_close(fisher.sums[name], expected_sums[name], rtol=1e-12, atol=1e-15)


def test_topk_uses_the_reference_class_choice():
    """The k classes most often among the examples' top-k sets (not among their top-1 classes)."""
    from lightning_taylor.curvature._cotangents import topk_classes as _topk_classes

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.05, 0.3, 0.15], [0.05, 0.15, 0.3, 0.5]])
    # top-2 sets {0, 1}, {0, 2}, {3, 2}: classes 0 and 2 twice; top-1 counting would pick 0 and 3.
    assert _topk_classes(probs, 2).tolist() == [0, 2]


def test_mc_settings_sampling_and_reproducibility(vit, images):
    def mc(batches, seed):
        return diagonal_fisher(vit, batches, TARGETS[:2], estimator="mc", samples=2,
                               generator=torch.Generator().manual_seed(seed))

    first, again, other = mc([images], 5), mc([images[:2], images[2:]], 5), mc([images], 6)
    assert first.estimator == "mc" and first.settings == {"samples": 2} and first.count == 6
    assert not torch.equal(first.sums[TARGETS[0]], other.sums[TARGETS[0]])
    # Batches draw their uniforms in order, so splitting the data differently draws the same labels.
    torch.testing.assert_close(again.sums[TARGETS[0]], first.sums[TARGETS[0]], rtol=1e-12, atol=1e-15)


def test_progress_reports_examples_after_each_batch(vit, images):
    seen = []
    diagonal_fisher(vit, [images[:4], images[4:5], images[5:]], ["head.weight"], progress=seen.append)
    assert seen == [4, 5, 6]


def test_unused_layer_has_zero_fisher_and_shared_or_in_place_layers_are_refused():
    class Net(torch.nn.Module):
        def __init__(self, mode: str) -> None:
            super().__init__()
            self.mode = mode
            self.a, self.unused, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            # "functional": the weight of `a` is applied without calling `a`, so no input/output is captured
            h = F.linear(x, self.a.weight, self.a.bias) if self.mode == "functional" else self.a(x)
            self.unused(h)  # output discarded
            if self.mode == "in_place":
                h.mul_(2.0)
            h = torch.tanh(self.b(torch.tanh(h)))
            return self.head(torch.tanh(self.b(h)) if self.mode == "shared" else h)

    x = torch.randn(5, 3, dtype=torch.float64)
    names = ["a.weight", "unused.weight", "b.weight", "head.bias"]
    fisher = diagonal_fisher(Net("plain").double(), [x], names)
    assert fisher.sums["unused.weight"].abs().max() == 0 and fisher.sums["a.weight"].abs().max() > 0
    with pytest.raises(ValueError, match="`param_names`.*called once.*'b'"):
        diagonal_fisher(Net("shared").double(), [x], names)
    with pytest.raises(ValueError, match="`param_names`.*in place.*'a'"):
        diagonal_fisher(Net("in_place").double(), [x], names)
    with pytest.raises(ValueError, match="`param_names`.*forward runs.*'a'.*Net applies this weight without calling"):
        diagonal_fisher(Net("functional").double(), [x], names)


def test_split_bias_attention_qkv_matches_brute_force():
    """BEiT applies `qkv.weight` by F.linear with separate q / v biases: the Fisher routes it through the layer."""
    torch.manual_seed(0)
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=24,
                             depth=1, num_heads=2, num_classes=4).double().eval().requires_grad_(False)
    with torch.no_grad():  # timm starts the biases at zero; make them matter
        beit.blocks[0].attn.q_bias.normal_()
        beit.blocks[0].attn.v_bias.normal_()
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = ["blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight"]
    fisher = diagonal_fisher(beit, [images], names)
    reference = brute_force_fisher(beit, images, names)
    for name in names:
        assert reference[name].abs().max() > 0
        assert relative_error(fisher.sums[name], reference[name]) <= 1e-9, name
    assert beit.blocks[0].attn.qkv.bias is None and isinstance(beit.blocks[0].attn.q_bias, torch.nn.Parameter)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(param_names=[]), "`param_names`.*non-empty"),
        (dict(param_names=["head.weight"], chunk_size=0), "`chunk_size`.*0"),
        (dict(param_names=["head.weight"], top_k=0), "`top_k`.*0"),
    ],
)
def test_more_bad_arguments_are_named(vit, images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        diagonal_fisher(vit, [images], **kwargs)


def test_empirical_labels_out_of_range_and_inference_mode_are_errors(vit, images):
    with pytest.raises(ValueError, match=r"`batches`.*labels in \[0, 5\)"):
        diagonal_fisher(vit, [(images, torch.tensor([0, 1, 2, 3, 4, 5]))], ["head.weight"], estimator="empirical")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        diagonal_fisher(vit, [images], ["head.weight"])


def test_all_reduce_without_process_group_is_a_no_op():
    fisher = _fisher(6.0, 3)
    assert fisher.all_reduce() is fisher and fisher.count == 3


def test_accumulator_records_estimator_count_and_settings():
    acc = FisherAccumulator()
    acc.set_task(0, FisherSums({"w": torch.ones(2)}, 4, "mc", {"samples": 8}))
    acc.set_task(1, FisherSums({"w": torch.ones(2)}, 3, "exact", {}))
    assert acc.records == [
        {"task": 0, "estimator": "mc", "count": 4, "settings": {"samples": 8}},
        {"task": 1, "estimator": "exact", "count": 3, "settings": {}},
    ]
    buffer = io.BytesIO()
    torch.save(acc.state_dict(), buffer)
    buffer.seek(0)
    fresh = FisherAccumulator()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.records == acc.records
