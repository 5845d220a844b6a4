"""Datasets: ImageNet-style folders, CIFAR-10/100 and iNaturalist 2018/2019 from local copies,
and DIGITS, a small real image dataset shipped inside scikit-learn, so that a fresh machine can
train and evaluate with no download. Every dataset reports its number of classes.

An image that cannot be decoded stops the run with an error naming the file (rather than
being skipped): silently training on less data would change the run without anyone noticing.
"""
import json
import os

import numpy as np
import torch
from PIL import Image
from torchvision import datasets as tv_datasets
from torchvision.datasets.folder import ImageFolder, default_loader

from augment import build_transform
from utils import UserError

DATASETS = ("IMNET", "CIFAR", "CIFAR10", "INAT", "INAT19", "DIGITS")


class UnreadableImageError(Exception):
    """An image in the data that PIL cannot decode (corrupt, truncated or not an image)."""


def checked_loader(path):
    try:
        return default_loader(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read image {path} ({err}); remove or replace the "
                                   f"file and rerun") from None


def _folder_error(err):
    # torchvision appends the list of supported extensions: useful, but not in one line.
    return str(err).split(". Supported extensions")[0].rstrip(".")


def image_folder(root, split, transform):
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise UserError(f"data path {root} has no '{split}' folder (expected "
                        f"{os.path.join(root, split, '<class>', '<image>')})")
    try:
        return ImageFolder(path, transform=transform, loader=checked_loader)
    except FileNotFoundError as err:
        raise UserError(f"no images in {path}: {_folder_error(err)}") from None


class INatDataset(ImageFolder):
    """iNaturalist 2018/2019 as DeiT reads it: ``{train,val}{year}.json`` and
    ``categories.json`` in ``root``; targets are the ``category`` level of the taxonomy,
    numbered in order of first appearance in the training annotations."""

    def __init__(self, root, train=True, year=2018, transform=None, category="name"):
        self.root = root
        self.transform = transform
        self.target_transform = None
        self.loader = checked_loader
        data = _read_json(root, f"{'train' if train else 'val'}{year}.json")
        categories = _read_json(root, "categories.json")
        targeter = {}
        for elem in _read_json(root, f"train{year}.json")["annotations"]:
            targeter.setdefault(categories[int(elem["category_id"])][category], len(targeter))
        self.nb_classes = len(targeter)
        self.classes = list(targeter)
        self.samples = []
        for elem in data["images"]:
            parts = elem["file_name"].split("/")
            target = targeter[categories[int(parts[2])][category]]
            self.samples.append((os.path.join(root, parts[0], parts[2], parts[3]), target))
        self.targets = [t for _, t in self.samples]
        self.imgs = self.samples


def _read_json(root, name):
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise UserError(f"iNaturalist annotation file not found: {path}")
    with open(path) as f:
        return json.load(f)


class Digits(torch.utils.data.Dataset):
    """scikit-learn's handwritten digits: 1797 8x8 grayscale images of 10 classes, split
    80/20 (stratified, fixed seed: 1437 train / 360 val), served as RGB images upsampled
    (bicubic) to ``size`` so that the usual transforms apply."""

    def __init__(self, train, size, transform=None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        train_idx, val_idx = train_test_split(np.arange(len(images)), test_size=0.2,
                                              stratify=digits.target, random_state=0)
        idx = train_idx if train else val_idx
        self.images = images[idx]
        self.targets = digits.target[idx].tolist()
        self.classes = [str(c) for c in range(10)]
        self.size = size
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index]).resize((self.size, self.size),
                                                         Image.Resampling.BICUBIC)
        img = img.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def build_dataset(is_train, args):
    """(dataset, number of classes) for the train or val split of ``args.data_set``."""
    transform = build_transform(is_train, args)
    if args.data_set == "DIGITS":
        return Digits(is_train, args.input_size, transform), 10
    root = args.data_path
    if not root or not os.path.isdir(root):
        raise UserError(f"data path not found: {root!r} (--data-path, for --data-set "
                        f"{args.data_set})")
    if args.data_set == "IMNET":
        dataset = image_folder(root, "train" if is_train else "val", transform)
        return dataset, len(dataset.classes)
    if args.data_set in ("CIFAR", "CIFAR10"):
        cls, name, folder = ((tv_datasets.CIFAR100, "CIFAR-100", "cifar-100-python")
                             if args.data_set == "CIFAR" else
                             (tv_datasets.CIFAR10, "CIFAR-10", "cifar-10-batches-py"))
        try:
            dataset = cls(root, train=is_train, transform=transform, download=False)
        except RuntimeError:
            raise UserError(f"no {name} data in {root} (expected the python version in "
                            f"{os.path.join(root, folder)}; nothing is downloaded)") from None
        return dataset, len(dataset.classes)
    year = 2018 if args.data_set == "INAT" else 2019
    dataset = INatDataset(root, train=is_train, year=year, transform=transform,
                          category=args.inat_category)
    return dataset, dataset.nb_classes
