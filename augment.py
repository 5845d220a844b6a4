"""Image transforms: DeiT's training transform (timm's RandAugment / random erasing pipeline),
ThreeAugment (DeiT III, used by the Mamba® pretraining stages) and the evaluation transform."""
import random

from PIL import ImageFilter, ImageOps
from timm.data import auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms


class GaussianBlur:
    """Gaussian blur with a radius drawn uniformly from [radius_min, radius_max]."""

    def __init__(self, radius_min=0.1, radius_max=2.0):
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(
            radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    def __call__(self, img):
        return ImageOps.solarize(img)


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, keeping the meaning older Pillow gave 0 bits (a black image): timm's
    "inc1" RandAugment asks for 0 bits at magnitude 10, which Pillow >= 12 refuses."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform):
    for t in transform.transforms:
        ops = getattr(t, "ops", None) or [op for sub in getattr(t, "policy", []) for op in sub]
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def three_augment(args):
    """DeiT III's ThreeAugment: random resized crop (0.08-1, bicubic) (or, with --src, a simple
    random crop) + horizontal flip (probability --hflip), then one of grayscale / solarize /
    Gaussian blur, then colour jitter, then normalisation. No RandAugment, no random erasing."""
    size = args.input_size
    if args.src:
        primary = [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                   transforms.RandomCrop(size, padding=4, padding_mode="reflect"),
                   transforms.RandomHorizontalFlip(args.hflip)]
    else:
        primary = [RandomResizedCropAndInterpolation(size, scale=(0.08, 1.0),
                                                     interpolation="bicubic"),
                   transforms.RandomHorizontalFlip(args.hflip)]
    secondary = [transforms.RandomChoice([transforms.Grayscale(num_output_channels=3),
                                          Solarization(), GaussianBlur()])]
    if args.color_jitter:
        secondary.append(transforms.ColorJitter(args.color_jitter, args.color_jitter,
                                                args.color_jitter))
    final = [transforms.ToTensor(),
             transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(primary + secondary + final)


def build_transform(is_train, args):
    """DeiT's transforms. Evaluation resizes the shorter side to input_size / eval_crop_ratio
    (bicubic) and center-crops input_size. (DeiT skips that at 32 px, assuming 32 px CIFAR
    images; here every dataset gets the same evaluation preprocessing.)"""
    if is_train:
        if args.ThreeAugment:
            return three_augment(args)
        return _fix_posterize(create_transform(
            input_size=args.input_size, is_training=True, hflip=args.hflip,
            color_jitter=args.color_jitter,
            auto_augment=None if args.aa in ("", "none") else args.aa,
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount))
    return transforms.Compose([
        transforms.Resize(int(args.input_size / args.eval_crop_ratio),
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(args.input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
