"""A tiny ImageFolder for tests: ``root/{train,val}/<class>/<n>.png``, each class a distinct
colour plus noise so that a model can tell them apart."""
import os

import numpy as np
from PIL import Image


def make_image_folder(root, classes=2, train_per_class=4, val_per_class=2, size=40, seed=0):
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            base = np.zeros(3)
            base[c % 3] = 200
            for i in range(per_class):
                pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return str(root)
