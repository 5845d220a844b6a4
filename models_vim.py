"""Vision Mamba (Vim): the baseline Mamba® is compared against, under Vim's released names.

"Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model"
(Zhu et al., ICML 2024), the ``bimambav2 ... midclstok div2`` variants. Vim and Mamba® share
the patch embedding, the bidirectional mixer, the blocks, norm_f and the initialisation
(``VisionMambaBackbone``); they differ only in the token layout and the read-out:

* Vim: ONE class token inserted at index N // 2 of the N = H*W patch tokens, then ONE position
  embedding of N + 1 slots added to the whole sequence (class slot included), then dropout;
  the class token's output of norm_f goes to ``head`` (Linear(D, classes)).
* Mamba®: registers evenly interleaved, patch-only position embedding, register recycling.

Parameter names and shapes equal Vim's released checkpoints, so their ``{"model": state_dict}``
files load with strict=True and Vim's training commands run unchanged.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from vision_mamba import VisionMambaBackbone, create_backbone, pretrained_cfg, resize_pos_embed

__all__ = ["Vim"]


class Vim(VisionMambaBackbone):
    """Vim with a middle class token; the layout follows the input's grid (the build-time
    ``img_size`` unless ``dynamic_img_size``)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 192, depth: int = 24,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 drop_block_rate: Optional[float] = None, scan_backend: Optional[str] = None,
                 dynamic_img_size: bool = False):
        super().__init__(img_size, patch_size, in_chans, num_classes, embed_dim, depth,
                         drop_rate, drop_path_rate, drop_block_rate, scan_backend,
                         dynamic_img_size)
        num_patches = self.patch_embed.num_patches
        self.cls_position = num_patches // 2
        self.head_hidden_size = embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        head_modules = [self.head] if isinstance(self.head, nn.Linear) else []
        self._init_weights(head_modules, [self.pos_embed, self.cls_token])

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Insert the class token at N // 2, then add pos_embed to all N + 1 tokens."""
        grid = self.patch_embed.grid(x)
        patches = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(patches.dtype)
        mid = patches.shape[1] // 2
        tokens = torch.cat([patches[:, :mid], cls, patches[:, mid:]], dim=1)
        return self.pos_drop(tokens + self.pos_embed_for(grid))

    def split_tokens(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, N + 1, D) sequence -> patches in raster order (B, N, D), class token (B, 1, D)."""
        mid = (tokens.shape[1] - 1) // 2
        patches = torch.cat([tokens[:, :mid], tokens[:, mid + 1:]], dim=1)
        return patches, tokens[:, mid:mid + 1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The class token of forward_features' sequence -> head."""
        cls = x[:, (x.shape[1] - 1) // 2]
        return cls if pre_logits else self.head(cls)

    def fit_pos_embed(self, pos_embed: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """The class slot sits mid-sequence, not first (where DeiT-style resizing, and Vim's own
        ``--finetune`` code, assume it): take it out at the source's N // 2, resize the patch
        grid bicubically, and put it back unchanged at the new N // 2.
        """
        side = math.isqrt(pos_embed.shape[1] - 1)
        if side * side != pos_embed.shape[1] - 1:
            raise ValueError(f"pos_embed has {pos_embed.shape[1]} positions, not a square "
                             f"grid plus a class slot")
        if (side, side) == tuple(grid):
            return pos_embed
        src_mid = side * side // 2
        cls = pos_embed[:, src_mid:src_mid + 1]
        patches = torch.cat([pos_embed[:, :src_mid], pos_embed[:, src_mid + 1:]], dim=1)
        patches = resize_pos_embed(patches, grid)
        mid = grid[0] * grid[1] // 2
        return torch.cat([patches[:, :mid], cls, patches[:, mid:]], dim=1)


# --------------------------------------------------------------------------- registry

_TINY = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
_SMALL = "vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
_BASE = "vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2"

_SIZES = {
    _TINY: dict(embed_dim=192, depth=24),
    _SMALL: dict(embed_dim=384, depth=24),
    _BASE: dict(embed_dim=768, depth=24),
}
_ALIASES = {"vim_tiny_patch16_224": _TINY, "vim_small_patch16_224": _SMALL,
            "vim_base_patch16_224": _BASE}

_PAPER = dict(paper_ids="arXiv:2401.09417",
              paper_name="Vision Mamba: Efficient Visual Representation Learning with "
                         "Bidirectional State Space Model (ICML 2024)",
              origin_url="https://github.com/hustvl/Vim")
default_cfgs = generate_default_cfgs({name: pretrained_cfg(**_PAPER)
                                      for name in [*_SIZES, *_ALIASES]})


def _create_vim(variant: str, pretrained: bool = False, **kwargs) -> Vim:
    sizes = _SIZES[_ALIASES.get(variant, variant)]
    return create_backbone(Vim, variant, pretrained, **{**sizes, **kwargs})


@register_model
def vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(
        pretrained: bool = False, **kwargs) -> Vim:
    return _create_vim(_TINY, pretrained, **kwargs)


@register_model
def vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2(
        pretrained: bool = False, **kwargs) -> Vim:
    return _create_vim(_SMALL, pretrained, **kwargs)


@register_model
def vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2(
        pretrained: bool = False, **kwargs) -> Vim:
    return _create_vim(_BASE, pretrained, **kwargs)


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> Vim:
    return _create_vim("vim_tiny_patch16_224", pretrained, **kwargs)


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> Vim:
    return _create_vim("vim_small_patch16_224", pretrained, **kwargs)


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> Vim:
    return _create_vim("vim_base_patch16_224", pretrained, **kwargs)
