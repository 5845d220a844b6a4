import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from samplers import (RASampler, SeededDataset, SeededSampler, ShardSampler, build_eval_sampler,
                      build_train_sampler)


class Noise(Dataset):
    """Each item draws from python, numpy and torch generators, like augmentations do."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return torch.tensor([index, random.random(), np.random.rand(), torch.rand(()).item()])


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_ra_sampler_gives_every_rank_samples_on_a_small_dataset(world):
    data = range(10)
    per_rank = [list(RASampler(data, world, rank, seed=0)) for rank in range(world)]
    assert all(len(indices) == -(-10 // world) for indices in per_rank)
    assert all(0 <= i < 10 for indices in per_rank for i in indices)


def test_ra_sampler_repeats_images_across_ranks_and_reshuffles_per_epoch():
    samplers = [RASampler(range(1000), 4, rank, seed=0) for rank in range(4)]
    first = [list(s) for s in samplers]
    assert [len(x) for x in first] == [250] * 4
    # Copies of an image go to neighbouring ranks: the 4 ranks together see ~N/3 images.
    assert 300 <= len(set(sum(first, []))) <= 400
    for s in samplers:
        s.set_epoch(1)
    assert [list(s) for s in samplers] != first


def test_shard_sampler_counts_every_sample_once():
    shards = [list(ShardSampler(range(11), 3, rank)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_seeded_sampler_resumes_mid_epoch_with_the_same_samples_and_seeds():
    sampler = SeededSampler(RASampler(range(20), 2, 1, seed=5), seed=5, rank=1)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=4)
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4
    assert len({seed for _, seed in full}) == len(full)


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentation_randomness_does_not_depend_on_loader_workers(workers):
    def epoch(num_workers, start=0):
        sampler = SeededSampler(torch.utils.data.DistributedSampler(range(12), 1, 0, seed=1),
                                seed=1, rank=0)
        sampler.set_epoch(2, start=start)
        loader = DataLoader(SeededDataset(Noise()), sampler=sampler, batch_size=3,
                            num_workers=num_workers)
        return torch.cat(list(loader))

    reference = epoch(0)
    assert torch.equal(epoch(workers), reference)
    assert torch.equal(epoch(workers, start=6), reference[6:])


def test_train_sampler_is_repeated_augmentation_only_with_several_ranks():
    args = SimpleNamespace(repeated_aug=True, world_size=1, rank=0, seed=0, dist_eval=True)
    assert not isinstance(build_train_sampler(range(10), args).sampler, RASampler)
    assert isinstance(build_eval_sampler(range(10), args), torch.utils.data.SequentialSampler)
    args.world_size = 2
    assert isinstance(build_train_sampler(range(10), args).sampler, RASampler)
    assert isinstance(build_eval_sampler(range(10), args), ShardSampler)


def test_copies_of_an_image_on_other_ranks_and_epochs_get_other_augmentation_seeds():
    """Repeated augmentation only helps if each copy of an image is augmented differently."""
    def epoch(rank, number):
        sampler = SeededSampler(RASampler(range(20), 3, rank, seed=5), seed=5, rank=rank)
        sampler.set_epoch(number)
        return list(sampler)

    ranks = [epoch(rank, 3) for rank in range(3)]
    # RASampler deals the 3 copies of each image to the 3 ranks at the same position.
    assert [i for i, _ in ranks[0]] == [i for i, _ in ranks[1]] == [i for i, _ in ranks[2]]
    seeds = [{seed for _, seed in pairs} for pairs in ranks]
    assert not (seeds[0] & seeds[1] or seeds[0] & seeds[2] or seeds[1] & seeds[2])
    assert not seeds[0] & {seed for _, seed in epoch(0, 4)}
