"""Feature-norm maps: where high-norm artifact tokens sit in a Vision Mamba's residual stream.

The analysis behind Figure 1 of Mamba® ("Vision Mamba ALSO Needs Registers"): Vim's patch
tokens carry high-norm artifacts in background regions, Mamba®'s registers remove them. For each
image and each (model, checkpoint) pair this tool

* renders the per-patch L2 norm over channels of the residual stream (pre-norm, fp32) leaving a
  block (default: the last) as a grid heat map, ``Input | model 1 | model 2 | ...``;
* plots the distribution of patch-token norms at layers 7, 15, 19 and 23 (log density);
* scores artifacts per layer: the share of patch tokens whose norm exceeds k x that layer's
  median, and the max / median ratio; printed as a table and written to ``feature_norms.json``;
* optionally (``--register-maps``) maps the cosine similarity of each register's output (Vim:
  the class token) to every patch token.

Example (the paper's panels are 28x28 grids, i.e. 448 px with interpolated pos_embed)::

    python visualize.py --model vim_small_patch16_224 --checkpoint vim_s_midclstok_80p5acc.pth \\
        --model mambar_small_patch16_224 --checkpoint mambar_small_patch16_224.pth \\
        --image dog.jpg --input-size 448 --out outputs/norms
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

import models_mambar
import models_vim
from checkpoints import check_fit, load_state_dict_file
from utils import UserError
from vision_mamba import VisionMambaBackbone

MODEL_MODULES = (models_mambar, models_vim)
# The layers whose norm distributions the paper plots (0-indexed, depth-24 models).
DISTRIBUTION_LAYERS = (7, 15, 19, 23)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE = "china.jpg"  # ships with scikit-learn, so the tool works offline


# --------------------------------------------------------------------------- computations

@torch.no_grad()
def layer_norms(model: VisionMambaBackbone, images: torch.Tensor) -> torch.Tensor:
    """(depth, B, H, W): L2 norm over channels of every patch token of the fp32 residual stream
    leaving each block (r + h, what the next block normalises), in grid layout.

    The model should be in eval mode (dropout and drop path would make the norms random).
    """
    out = model.forward_tokens(images.float(), return_residuals=True)
    norms = torch.stack([r.norm(dim=-1) for r in out["residual_patch_tokens"]])
    return norms.reshape(*norms.shape[:2], *model.patch_embed.grid_size)


def patch_norm_map(model: VisionMambaBackbone, images: torch.Tensor, layer: int = -1
                   ) -> torch.Tensor:
    """(B, H, W) residual-stream patch norms leaving block ``layer`` (negative counts back)."""
    return layer_norms(model, images)[layer]


@torch.no_grad()
def register_similarity(model: VisionMambaBackbone, images: torch.Tensor) -> torch.Tensor:
    """(B, n, H, W): cosine similarity of each register's output (after norm_f) to every patch
    token's output; Vim's single class token counts as one register."""
    out = model.forward_tokens(images.float())
    patches = F.normalize(out["patch_tokens"].float(), dim=-1)
    registers = F.normalize(out["register_tokens"].float(), dim=-1)
    sim = torch.einsum("bnd,bpd->bnp", registers, patches)
    return sim.reshape(*sim.shape[:2], *model.patch_embed.grid_size)


def artifact_score(norms: torch.Tensor | np.ndarray, k: float = 3.0) -> Dict[str, float]:
    """Artifact statistics of one layer's patch-token norms (any shape, pooled).

    ``share_above_k_median``: fraction of tokens with norm > k x median; ``max_over_median``:
    the largest norm relative to the median. A map without outliers scores 0 and ~1.
    """
    values = np.asarray(norms, dtype=np.float64).ravel()
    median = float(np.median(values))
    return {"median": median, "max": float(values.max()),
            "max_over_median": float(values.max() / median),
            "share_above_k_median": float(np.mean(values > k * median))}


def distribution_layers(depth: int) -> List[int]:
    """The paper's layers 7, 15, 19, 23, clipped to a model of ``depth`` blocks."""
    return sorted({min(layer, depth - 1) for layer in DISTRIBUTION_LAYERS})


# --------------------------------------------------------------------------- inputs

def available_models() -> List[str]:
    return sorted(name for module in MODEL_MODULES
                  for name in timm.list_models(module=module.__name__))


def build_model(name: str, checkpoint: Optional[str], input_size: int,
                device: torch.device) -> VisionMambaBackbone:
    """The model built for ``input_size`` in fp32 eval mode, with the checkpoint's weights
    (pos_embed interpolated to the new grid, class count taken from its head) if given."""
    if name not in available_models():
        raise UserError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    state_dict = load_state_dict_file(checkpoint) if checkpoint else {}
    head = state_dict.get("head.weight")
    num_classes = head.shape[0] if head is not None else 1000
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                  img_size=input_size)
    except ValueError as err:  # e.g. an input size that is not a multiple of the patch size
        raise UserError(f"cannot build {name} at --input-size {input_size}: {err}") from None
    if not checkpoint:
        print(f"warning: no checkpoint for {name}: random init (the maps show the tool's "
              f"output, not a trained model's)", file=sys.stderr)
    else:
        try:
            state_dict = model.interpolate_pos_embed(state_dict)
        except ValueError as err:
            raise UserError(f"{checkpoint} does not fit {name}: {err}") from None
        check_fit(model, state_dict, checkpoint, name)
        model.load_state_dict(state_dict, strict=True)
    return model.float().to(device).eval()


def eval_transform(input_size: int, crop_ratio: float) -> transforms.Compose:
    """Resize the shorter side (bicubic) and center-crop, as the evaluation pipeline does."""
    return transforms.Compose([
        transforms.Resize(int(input_size / crop_ratio),
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size)])


def normalize(crop: Image.Image) -> torch.Tensor:
    """(3, H, W) ImageNet-normalised tensor of a cropped RGB image."""
    return transforms.functional.normalize(transforms.functional.to_tensor(crop),
                                           IMAGENET_MEAN, IMAGENET_STD)


def load_images(paths: Sequence[str]) -> List[Tuple[str, Image.Image]]:
    """(name, RGB image) per path; with no paths, the photo bundled with scikit-learn."""
    if not paths:
        from sklearn.datasets import load_sample_image
        return [(DEFAULT_IMAGE, Image.fromarray(load_sample_image(DEFAULT_IMAGE)))]
    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                images.append((Path(path).name, img.convert("RGB")))
        except FileNotFoundError:
            raise UserError(f"image not found: {path}") from None
        except IsADirectoryError:
            raise UserError(f"image path is a directory: {path}") from None
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"cannot read image {path}: {err}") from None
    return images


def unique_stems(names: Sequence[str]) -> List[str]:
    """Output file stems, suffixed where two images share a file name."""
    stems = [Path(name).stem for name in names]
    return [f"{stem}_{i}" if stems.count(stem) > 1 else stem for i, stem in enumerate(stems)]


# --------------------------------------------------------------------------- figures

def wrap_name(name: str, width: int = 26) -> str:
    """Long timm names broken at underscores so a title fits over its panel."""
    lines, line = [], ""
    for part in name.split("_"):
        candidate = f"{line}_{part}" if line else part
        if line and len(candidate) > width:
            lines.append(line + "_")
            line = part
        else:
            line = candidate
    return "\n".join(lines + [line])


def plot_norm_maps(crop: Image.Image, maps: Sequence[np.ndarray], labels: Sequence[str],
                   layers: Sequence[int]) -> plt.Figure:
    """``Input | model 1 | model 2 | ...``: each map on its own colour scale with a colorbar,
    since norms differ in scale between models."""
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(3.2 * (1 + len(maps)), 3.6),
                             squeeze=False)
    axes = axes[0]
    axes[0].imshow(crop)
    axes[0].set_title("Input", fontsize=9)
    for ax, norm_map, label, layer in zip(axes[1:], maps, labels, layers):
        im = ax.imshow(norm_map, cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        ax.set_title(f"{label}\nlayer {layer}", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def plot_norm_distributions(norms: Sequence[np.ndarray], labels: Sequence[str],
                            layers: Sequence[int]) -> plt.Figure:
    """One panel per layer: the density of patch-token norms per model, log scale, so that
    a small population of high-norm outliers stands out as a separate mode."""
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.0), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for model_norms, label in zip(norms, labels):
            ax.hist(model_norms[layer].ravel(), bins=50, density=True, histtype="step",
                    label=label.replace("\n", ""))
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("patch token norm", fontsize=8)
    axes[0][0].set_ylabel("density", fontsize=8)
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    return fig


def plot_register_maps(similarities: Sequence[np.ndarray], labels: Sequence[str]
                       ) -> plt.Figure:
    """One row per model, one panel per register: cosine similarity to every patch token."""
    cols = max(len(sim) for sim in similarities)
    fig, axes = plt.subplots(len(similarities), cols, figsize=(1.6 * cols + 1.5,
                                                               1.8 * len(similarities)),
                             squeeze=False)
    for row, (sim, label) in enumerate(zip(similarities, labels)):
        axes[row][0].set_title(label.replace("\n", ""), fontsize=7, loc="left")
        for col, ax in enumerate(axes[row]):
            ax.set_axis_off()
            if col < len(sim):
                ax.imshow(sim[col], cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest")
                ax.text(0.02, 0.02, f"R{col}", transform=ax.transAxes, fontsize=6)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- CLI

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Feature-norm maps, norm distributions and artifact scores of Vision "
                    "Mamba models (Mamba® Figure 1).")
    parser.add_argument("--model", action="append", required=True, metavar="NAME",
                        help="timm model name (repeat for several models)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="PATH",
                        help="checkpoint per --model, in the same order; 'none' or no "
                             "--checkpoint at all means random init (a demo of the output)")
    parser.add_argument("--label", action="append", default=[],
                        help="panel title per --model (default: the model name)")
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help=f"image file (repeatable); default: scikit-learn's {DEFAULT_IMAGE}")
    parser.add_argument("--input-size", type=int, default=448,
                        help="input resolution; 448 gives the paper's 28x28 maps")
    parser.add_argument("--eval-crop-ratio", type=float, default=1.0,
                        help="resize the shorter side to input-size / ratio, then center-crop")
    parser.add_argument("--layer", type=int, default=-1,
                        help="block whose output stream is mapped (0-indexed; -1: the last)")
    parser.add_argument("--k", type=float, default=3.0,
                        help="a token is an artifact when its norm exceeds k x the median")
    parser.add_argument("--register-maps", action="store_true",
                        help="also plot each register's cosine similarity to the patches")
    parser.add_argument("--out", default="outputs/feature_norms", help="output directory")
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed for random-init models")
    return parser


def check_args(args: argparse.Namespace) -> List[Optional[str]]:
    """Validate arguments that need no model; returns the checkpoint (or None) per model."""
    if args.checkpoint and len(args.checkpoint) != len(args.model):
        raise UserError(f"give one --checkpoint per --model ({len(args.model)} models, "
                         f"{len(args.checkpoint)} checkpoints) or none at all")
    if args.label and len(args.label) != len(args.model):
        raise UserError(f"give one --label per --model ({len(args.model)} models, "
                         f"{len(args.label)} labels) or none at all")
    if min(args.input_size, args.eval_crop_ratio, args.k, args.dpi) <= 0:
        raise UserError("--input-size, --eval-crop-ratio, --k and --dpi must be positive")
    checkpoints = args.checkpoint or [None] * len(args.model)
    return [None if c is None or c.lower() == "none" else c for c in checkpoints]


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def resolve_layer(layer: int, depth: int, name: str) -> int:
    if not -depth <= layer < depth:
        raise UserError(f"--layer {layer} is out of range for {name} ({depth} blocks: "
                         f"0..{depth - 1} or -{depth}..-1)")
    return layer % depth


def format_table(rows: Sequence[Dict[str, object]], k: float) -> str:
    header = (f"{'image':<16} {'model':<40} {'layer':>5} {'median':>9} {'max':>9} "
              f"{'max/med':>8} {f'>{k:g}x med':>9}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['image'][:16]:<16} {row['model'][:40]:<40} {row['layer']:>5} "
                     f"{row['median']:>9.3f} {row['max']:>9.3f} {row['max_over_median']:>8.2f} "
                     f"{row['share_above_k_median']:>9.2%}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> Dict[str, object]:
    """Build the models, write the figures and ``feature_norms.json``; returns the JSON."""
    checkpoints = check_args(args)
    labels = args.label or [wrap_name(name) for name in args.model]
    device = parse_device(args.device)
    images = load_images(args.image)
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --out {out_dir}: {err.strerror}") from None

    models = []
    for name, checkpoint in zip(args.model, checkpoints):
        torch.manual_seed(args.seed)
        models.append(build_model(name, checkpoint, args.input_size, device))
    map_layers = [resolve_layer(args.layer, m.depth, n) for m, n in zip(models, args.model)]
    dist_layers = distribution_layers(min(m.depth for m in models))
    transform = eval_transform(args.input_size, args.eval_crop_ratio)

    report = {"input_size": args.input_size, "k": args.k, "layer": args.layer,
              "distribution_layers": dist_layers, "images": []}
    table = []
    for (image_name, image), stem in zip(images, unique_stems([n for n, _ in images])):
        crop = transform(image)
        batch = normalize(crop)[None].to(device)
        norms = [layer_norms(model, batch)[:, 0].cpu().numpy() for model in models]
        figures = {"norm_maps": f"{stem}_feature_norms.png",
                   "norm_distributions": f"{stem}_norm_distributions.png"}
        fig = plot_norm_maps(crop, [n[layer] for n, layer in zip(norms, map_layers)], labels,
                             map_layers)
        fig.savefig(out_dir / figures["norm_maps"], dpi=args.dpi)
        fig = plot_norm_distributions(norms, labels, dist_layers)
        fig.savefig(out_dir / figures["norm_distributions"], dpi=args.dpi)
        if args.register_maps:
            sims = [register_similarity(model, batch)[0].cpu().numpy() for model in models]
            figures["register_maps"] = f"{stem}_register_maps.png"
            fig = plot_register_maps(sims, labels)
            fig.savefig(out_dir / figures["register_maps"], dpi=args.dpi)
        plt.close("all")

        entry = {"image": image_name, "figures": figures, "models": []}
        for name, checkpoint, model_norms, map_layer in zip(args.model, checkpoints, norms,
                                                             map_layers):
            per_layer = [{"layer": i, **artifact_score(layer_map, args.k)}
                         for i, layer_map in enumerate(model_norms)]
            entry["models"].append({"model": name, "checkpoint": checkpoint,
                                    "grid": list(model_norms.shape[1:]),
                                    "map_layer": map_layer, "layers": per_layer})
            table += [{"image": image_name, "model": name, **row} for row in per_layer
                      if row["layer"] in {*dist_layers, map_layer}]
        report["images"].append(entry)

    print(format_table(table, args.k))
    with open(out_dir / "feature_norms.json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {len(images)} image(s) of figures and feature_norms.json to {out_dir}")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"visualize.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
