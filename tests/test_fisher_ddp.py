"""DDP: each rank sums the Fisher over its own shard, then sums and counts are reduced; 2 ranks = 1 rank.

Two CPU processes (gloo) split a data set of odd size without padding (rank 0 gets 4 examples, rank 1
gets 3), compute ``diagonal_fisher`` on their shard, call ``FisherSums.all_reduce`` and write what they
hold to files; the parent compares every rank's result with one process over the whole data set.
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_vit

from lightning_taylor.curvature import FisherSums, diagonal_fisher

NAMES = ["blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.1.mlp.fc2.weight", "head.weight", "head.bias"]
NUM_EXAMPLES = 7  # odd: the shards differ in size


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(NUM_EXAMPLES, 3, 16, 16, generator=generator, dtype=torch.float64)
    return images, torch.randint(5, (NUM_EXAMPLES,), generator=generator)


def fisher_over(images: torch.Tensor, labels: torch.Tensor, estimator: str) -> FisherSums:
    batches = [(images[i : i + 3], labels[i : i + 3]) for i in range(0, images.shape[0], 3)]
    return diagonal_fisher(make_vit(), batches, NAMES, estimator=estimator)


ESTIMATORS = ("exact", "empirical")  # deterministic estimators: the same terms on 1 or 2 ranks


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        images, labels = dataset()
        shard = torch.arange(NUM_EXAMPLES)[rank::world_size]  # every example exactly once, no padding
        for estimator in ESTIMATORS:
            fisher = fisher_over(images[shard], labels[shard], estimator)
            local_count = fisher.count
            fisher.all_reduce()
            torch.save({"sums": fisher.sums, "count": fisher.count, "local_count": local_count,
                        "estimator": fisher.estimator}, Path(out_dir) / f"{estimator}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> Path:
    """One 2-process gloo run for all estimators (spawning and importing dominate the test's time)."""
    out_dir = tmp_path_factory.mktemp("fisher_ddp")
    mp.spawn(_worker, args=(2, str(out_dir / "init"), str(out_dir)), nprocs=2, join=True)
    return out_dir


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_two_ranks_equal_one_rank(two_rank_results, estimator):
    single = fisher_over(*dataset(), estimator)
    assert single.count == NUM_EXAMPLES
    local_counts = []
    for rank in range(2):
        result = torch.load(two_rank_results / f"{estimator}_rank{rank}.pt", weights_only=True)
        local_counts.append(result["local_count"])
        assert result["count"] == NUM_EXAMPLES and result["estimator"] == estimator
        for name in NAMES:
            assert single.sums[name].dtype == result["sums"][name].dtype == torch.float64
            assert single.sums[name].abs().max() > 0
            # Entries that vanish analytically (the key bias: softmax ignores shifts) hold rounding noise.
            scale = float(single.sums[name].abs().max())
            torch.testing.assert_close(result["sums"][name], single.sums[name], rtol=1e-10, atol=1e-10 * scale)
    assert local_counts == [4, 3]
