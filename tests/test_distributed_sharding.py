"""How a global batch is split between ranks, and what a single process sees (no process group needed)."""

from __future__ import annotations

import pytest
import torch

from compressor.train.data import TensorLoader, cifar_transform
from compressor.train.distributed import Distributed, ShardedLoader, current, tensors_sha256
from compressor.errors import ConfigError


def _loader(n: int = 23, batch: int = 8, seed: int = 5) -> TensorLoader:
    inputs = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return TensorLoader(inputs, torch.arange(n) % 10, batch, shuffle=True, seed=seed, transform=cifar_transform(True))


@pytest.mark.parametrize("world", [2, 3])
def test_rank_slices_put_together_are_the_single_process_batches(world):
    single = list(_loader())
    shards = [list(ShardedLoader(_loader(), rank, world, drop_small=False)) for rank in range(world)]
    assert all(len(s) == len(single) for s in shards)
    for step, (inputs, labels) in enumerate(single):
        # Same shuffle AND the same random crops/flips: the augmentation is drawn for the whole batch.
        assert torch.equal(torch.cat([s[step][0] for s in shards]), inputs)
        assert torch.equal(torch.cat([s[step][1] for s in shards]), labels)
        sizes = [len(s[step][1]) for s in shards]
        assert max(sizes) - min(sizes) <= 1


def test_generator_advances_as_in_a_single_process():
    # What makes a checkpoint written by N ranks resume exactly on M ranks.
    single, sharded = _loader(), ShardedLoader(_loader(), 1, 2, drop_small=True)
    for _ in single:
        pass
    for _ in sharded:
        pass
    assert torch.equal(single.generator.get_state(), sharded.generator.get_state())


def test_training_skips_a_last_batch_smaller_than_the_process_count_on_every_rank():
    # 23 = 2 × 8 + 7 at batch 8; with 8 ranks the last batch (7) would leave a rank with nothing.
    shards = [ShardedLoader(_loader(), rank, 8, drop_small=True) for rank in range(8)]
    assert all(len(s) == 2 and len(list(s)) == 2 for s in shards)
    evaluation = [list(ShardedLoader(_loader(), rank, 8, drop_small=False)) for rank in range(8)]
    assert sum(len(labels) for shard in evaluation for _, labels in shard) == 23  # every example, once


def test_a_single_process_uses_model_and_loaders_untouched():
    context = current(torch.device("cpu"))
    assert not context.active and context.is_main
    loader, model = _loader(), torch.nn.Linear(2, 2)
    assert context.shard(loader, train=True) is loader
    assert context.wrap(model) is model
    assert context.agree("mask", {"w": torch.ones(3, dtype=torch.bool)}) == [
        tensors_sha256({"w": torch.ones(3, dtype=torch.bool)})]


def test_what_cannot_be_split_is_refused():
    two = Distributed(world_size=2, rank=0)
    with pytest.raises(ConfigError, match="cannot be split"):
        two.shard([(torch.zeros(2, 4), torch.zeros(2))], train=True)
    with pytest.raises(ConfigError, match="global batch"):
        two.shard(_loader(batch=1), train=True)


def test_checksum_sees_values_names_and_dtypes():
    mask = {"a": torch.tensor([True, False]), "b": torch.tensor([True])}
    assert tensors_sha256(mask) == tensors_sha256(dict(reversed(list(mask.items()))))  # order-free
    assert tensors_sha256(mask) != tensors_sha256({**mask, "a": torch.tensor([False, True])})
    assert tensors_sha256(mask) != tensors_sha256({"c": mask["a"], "b": mask["b"]})
    assert tensors_sha256({"x": torch.zeros(2)}) != tensors_sha256({"x": torch.zeros(2, dtype=torch.float64)})
