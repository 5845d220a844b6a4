"""Which samples each rank sees in an epoch, in what order, and with which random seed.

Training samples travel as ``(index, seed)`` pairs, the seed a pure function of (run seed,
epoch, rank, position in the epoch), and ``SeededDataset`` reseeds python / numpy / torch with
it before loading and augmenting the image. Augmentations then depend neither on the number of
data loader workers nor on what ran before, so an epoch can be replayed, or resumed at any
step, exactly.
"""
import math

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from utils import derive_seed, seed_everything


class RASampler(Sampler):
    """Repeated augmentation (Hoffer et al. 2020, as in DeiT): a shuffled epoch in which each
    image appears ``num_repeats`` times, the copies spread over the ranks. Each rank takes
    ceil(N / world) samples, so an epoch still has about N samples in all. (The official code
    floored that to a multiple of 256, which leaves a small dataset with no samples at all.)"""

    def __init__(self, dataset, num_replicas, rank, shuffle=True, seed=0, num_repeats=3):
        self.dataset_len = len(dataset)
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.num_repeats = num_repeats
        self.epoch = 0
        self.num_samples = math.ceil(self.dataset_len * num_repeats / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.num_selected_samples = math.ceil(self.dataset_len / num_replicas)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.dataset_len, generator=g)
        else:
            indices = torch.arange(self.dataset_len)
        indices = indices.repeat_interleave(self.num_repeats).tolist()
        indices += indices[:self.total_size - len(indices)]
        mine = indices[self.rank:self.total_size:self.num_replicas]
        return iter(mine[:self.num_selected_samples])

    def __len__(self):
        return self.num_selected_samples

    def set_epoch(self, epoch):
        self.epoch = epoch


class ShardSampler(Sampler):
    """Distributed evaluation without padding: rank r takes samples r, r + world, ... so every
    sample is counted exactly once (DistributedSampler would repeat some to even the ranks)."""

    def __init__(self, dataset, num_replicas, rank):
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class SeededSampler(Sampler):
    """Wrap a per-rank sampler: yield ``(index, seed)`` and optionally start ``start``
    samples into the epoch (to resume it mid-way)."""

    def __init__(self, sampler, seed, rank):
        self.sampler = sampler
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        self.sampler.set_epoch(epoch)
        self.epoch = epoch
        self.start = start

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            if position >= self.start:
                yield index, derive_seed(self.seed, self.epoch, self.rank, position)

    def __len__(self):
        return max(len(self.sampler) - self.start, 0)


class SeededDataset(Dataset):
    """Index with ``(index, seed)``: reseed every generator, then load and transform."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        seed_everything(seed)
        return self.dataset[index]


def build_train_sampler(dataset, args):
    """Repeated augmentation across ranks when asked for and there are several ranks (as in
    DeiT: on one process it would put the copies of an image in the same batch), else a plain
    shuffle; both reshuffle per epoch from ``args.seed``."""
    if args.repeated_aug and args.world_size > 1:
        base = RASampler(dataset, args.world_size, args.rank, shuffle=True, seed=args.seed)
    else:
        base = DistributedSampler(dataset, num_replicas=args.world_size, rank=args.rank,
                                  shuffle=True, seed=args.seed)
    return SeededSampler(base, args.seed, args.rank)


def build_eval_sampler(dataset, args):
    if args.dist_eval and args.world_size > 1:
        return ShardSampler(dataset, args.world_size, args.rank)
    return torch.utils.data.SequentialSampler(dataset)
