import os

import pytest
import torch
from PIL import Image

import main
from augment import build_transform
from datasets import Digits, UnreadableImageError, build_dataset
from helpers import make_image_folder
from utils import UserError


def parse(*argv):
    return main.get_args_parser().parse_args(list(argv))


def test_digits_is_a_fixed_stratified_split_served_at_the_input_size():
    train, val = Digits(True, 48), Digits(False, 48)
    assert (len(train), len(val)) == (1437, 360)
    assert sorted(set(val.targets)) == list(range(10))
    assert all(val.targets.count(c) in (35, 36, 37) for c in range(10))
    img, target = val[0]
    assert img.size == (48, 48) and img.mode == "RGB"
    assert target == Digits(False, 48).targets[0]


def test_default_dataset_is_digits_without_a_data_path_and_imagenet_with_one(tmp_path):
    args = parse("--input-size", "32")
    main.check_args(args)
    dataset, classes = build_dataset(True, args)
    assert (args.data_set, classes, dataset[0][0].shape) == ("DIGITS", 10, (3, 32, 32))
    args = parse("--data-path", make_image_folder(tmp_path, classes=3), "--input-size", "32")
    main.check_args(args)
    dataset, classes = build_dataset(False, args)
    assert (args.data_set, classes, len(dataset)) == ("IMNET", 3, 6)


def test_missing_data_is_named(tmp_path):
    with pytest.raises(UserError, match="data path not found: '.*nowhere'"):
        build_dataset(True, parse("--data-path", str(tmp_path / "nowhere"), "--data-set", "IMNET"))
    with pytest.raises(UserError, match="has no 'train' folder"):
        build_dataset(True, parse("--data-path", str(tmp_path), "--data-set", "IMNET"))
    (tmp_path / "val").mkdir()
    with pytest.raises(UserError, match=r"no images in .*val: Couldn't find any class folder"):
        build_dataset(False, parse("--data-path", str(tmp_path), "--data-set", "IMNET"))
    with pytest.raises(UserError, match="no CIFAR-100 data in"):
        build_dataset(False, parse("--data-path", str(tmp_path), "--data-set", "CIFAR"))


def test_unreadable_image_is_named(tmp_path):
    root = make_image_folder(tmp_path)
    bad = os.path.join(root, "train", "class1", "0.png")
    with open(bad, "r+b") as f:
        f.truncate(60)
    dataset, _ = build_dataset(True, parse("--data-path", root, "--data-set", "IMNET",
                                           "--input-size", "32"))
    with pytest.raises(UnreadableImageError, match=f"cannot read image {bad}"):
        [dataset[i] for i in range(len(dataset))]


def test_eval_transform_resizes_to_input_over_crop_ratio_then_center_crops():
    img = Image.new("RGB", (300, 200))
    args = parse("--input-size", "128")
    resize = build_transform(False, args).transforms[0]
    assert resize.size == int(128 / 0.875) == 146
    assert build_transform(False, args)(img).shape == (3, 128, 128)
    args = parse("--input-size", "224", "--eval-crop-ratio", "1.0")
    assert build_transform(False, args).transforms[0].size == 224


@pytest.mark.parametrize("flags", [["--ThreeAugment"], ["--ThreeAugment", "--src"],
                                   ["--aa", "rand-m10-mstd0.5-inc1"], ["--aa", "none"]])
def test_train_transforms_produce_input_sized_tensors(flags):
    # Magnitude 10 makes timm's increasing posterize ask for 0 bits, which Pillow >= 12 refuses.
    transform = build_transform(True, parse("--input-size", "48", *flags))
    img = Image.new("RGB", (64, 50), (120, 30, 200))
    torch.manual_seed(0)
    for _ in range(60):
        assert transform(img).shape == (3, 48, 48)


@pytest.mark.parametrize("flags", [[], ["--ThreeAugment"], ["--ThreeAugment", "--src"]])
def test_hflip_sets_the_probability_of_the_training_flip(flags):
    """--hflip 1 mirrors every training image, --hflip 0 none; evaluation never flips."""
    # Brighter to the right, so that every crop is too; below 128, where solarizing changes
    # nothing.
    img = Image.new("RGB", (64, 64))
    img.putdata([(2 * x,) * 3 for _ in range(64) for x in range(64)])

    def left_darker(transform):
        x = transform(img)
        return bool(x[:, :, :16].mean() < x[:, :, -16:].mean())

    plain = ["--input-size", "48", "--aa", "none", "--reprob", "0", "--color-jitter", "0"]
    torch.manual_seed(0)
    for prob, want in (("0", True), ("1", False)):
        transform = build_transform(True, parse(*plain, "--hflip", prob, *flags))
        assert [left_darker(transform) for _ in range(20)] == [want] * 20, prob
    assert left_darker(build_transform(False, parse(*plain, "--hflip", "1")))
