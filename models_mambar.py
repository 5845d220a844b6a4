"""Mamba® (Mamba-R): Vision Mamba with registers evenly interleaved among the patch tokens.

"Vision Mamba ALSO Needs Registers" (Wang et al., CVPR 2025). Vision Mamba shows high-norm
artifacts in its patch tokens; Mamba® inserts n register tokens evenly into the patch
sequence and classifies from the registers' outputs (register recycling) instead of one class
token. Everything else is Vim's bidirectional Mamba block, in ``vision_mamba.py``.

The module reads top-down: the model (its token layout and register-recycling head), where
the registers sit, then the sizes and the registered timm constructors
``mambar_{tiny,small,base,large}_patch16_224``. Parameter names and shapes follow the released
checkpoints exactly, so ``model.load_state_dict(torch.load(path, weights_only=True)["model"])``
works with strict=True.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from vision_mamba import RMSNorm, VisionMambaBackbone, create_backbone, pretrained_cfg, \
    resize_pos_embed

__all__ = ["MambaR", "register_positions"]


class MambaR(VisionMambaBackbone):
    """Mamba®: n registers evenly interleaved among the patches; the head reads the registers.

    With N patches and L = N // (n + 1) the sequence is
    ``L patches, R0, L patches, R1, ..., L patches, R(n-1), the remaining patches``.
    The layout follows the input's grid (the build-time ``img_size`` unless
    ``dynamic_img_size``).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 192, depth: int = 24,
                 num_registers: int = 12, neck_reduction: int = 1, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, drop_block_rate: Optional[float] = None,
                 scan_backend: Optional[str] = None, dynamic_img_size: bool = False):
        super().__init__(img_size, patch_size, in_chans, num_classes, embed_dim, depth,
                         drop_rate, drop_path_rate, drop_block_rate, scan_backend,
                         dynamic_img_size)
        self.num_registers = num_registers
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
        self.pos_embed_cls = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
        self._layouts: Dict[Tuple[int, torch.device], TokenLayout] = {}

        self.neck_reduction = neck_reduction
        self.head_hidden_size = num_registers * embed_dim // neck_reduction
        # Without a reduction there is no neck (nothing in the released Tiny state dict).
        if neck_reduction > 1:
            self.neck = nn.Linear(embed_dim, embed_dim // neck_reduction, bias=False)
            self.norm_neck = RMSNorm(self.head_hidden_size)
        else:
            self.neck = self.norm_neck = nn.Identity()
        self.head = (nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0
                     else nn.Identity())

        head_modules = [m for m in (self.neck, self.head) if isinstance(m, nn.Linear)]
        self._init_weights(head_modules, [self.pos_embed, self.cls_token, self.pos_embed_cls])

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "pos_embed_cls"}

    def token_layout(self, num_patches: int, device: Optional[torch.device] = None
                     ) -> TokenLayout:
        """The even-insertion layout for ``num_patches`` patches, kept per size and device."""
        device = torch.device("cpu") if device is None else device
        layout = self._layouts.get((num_patches, device))
        if layout is None:
            positions = register_positions(num_patches, self.num_registers)
            taken = set(positions)
            patch_slots = [i for i in range(num_patches + self.num_registers) if i not in taken]
            order = [0] * (num_patches + self.num_registers)
            for patch, slot in enumerate(patch_slots):
                order[slot] = patch
            for k, slot in enumerate(positions):
                order[slot] = num_patches + k
            layout = TokenLayout(*(torch.tensor(v, device=device)
                                   for v in (order, positions, patch_slots)))
            self._layouts[(num_patches, device)] = layout
        return layout

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.patch_embed.grid(x)
        patches = self.pos_drop(self.patch_embed(x) + self.pos_embed_for(grid))
        registers = (self.cls_token + self.pos_embed_cls).expand(x.shape[0], -1, -1)
        order = self.token_layout(patches.shape[1], x.device).order
        return torch.cat([patches, registers.to(patches.dtype)], dim=1)[:, order]

    def split_tokens(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, N + n, D) sequence -> patches in raster order (B, N, D), registers (B, n, D)."""
        layout = self.token_layout(tokens.shape[1] - self.num_registers, tokens.device)
        return tokens[:, layout.patches], tokens[:, layout.registers]

    def fit_pos_embed(self, pos_embed: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        return resize_pos_embed(pos_embed, grid)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Register recycling: the registers of forward_features' sequence, (neck per
        register ->) flattened in register order (-> norm_neck) -> head."""
        registers = x[:, self.token_layout(x.shape[1] - self.num_registers, x.device).registers]
        features = self.norm_neck(self.neck(registers).flatten(1))
        return features if pre_logits else self.head(features)

    def _prune_head(self) -> None:
        self.neck = self.norm_neck = nn.Identity()
        self.head_hidden_size = self.num_registers * self.embed_dim
        self.reset_classifier(0)


class TokenLayout(NamedTuple):
    """Where Mamba®'s tokens sit for one number of patches."""
    order: torch.Tensor      # sequence slot -> index into cat([patches, registers])
    registers: torch.Tensor  # sequence slots of the registers, in register order
    patches: torch.Tensor    # sequence slots of the patches, in raster order



def register_positions(num_patches: int, num_registers: int) -> List[int]:
    """Sequence positions of the registers under even insertion: L, 2L+1, 3L+2, ..."""
    step = num_patches // (num_registers + 1)
    return [step + k * (step + 1) for k in range(num_registers)]



# --------------------------------------------------------------------------- registry

# The authors' released weights (as linked from their repository, wangf3014/Mamba-Reg);
# Tiny has none. pretrained=True downloads them through timm; offline, pass
# pretrained_cfg_overlay=dict(file="/path/to/mambar_base_patch16_224.pth").
_RELEASES = "https://huggingface.co/Wangf3014/Mamba-Reg/resolve/main"
_PAPER = dict(paper_ids="arXiv:2405.14858",
              paper_name="Vision Mamba ALSO Needs Registers (CVPR 2025)",
              origin_url="https://github.com/wangf3014/Mamba-Reg",
              # Neither the repository nor the weights' page names a license.
              license="unspecified")
default_cfgs = generate_default_cfgs({
    "mambar_tiny_patch16_224": pretrained_cfg(**_PAPER),
    **{name: pretrained_cfg(url=f"{_RELEASES}/{name}.pth", **_PAPER)
       for name in ("mambar_small_patch16_224", "mambar_base_patch16_224",
                    "mambar_large_patch16_224")},
})

_SIZES = {
    "mambar_tiny_patch16_224": dict(embed_dim=192, depth=24, num_registers=12, neck_reduction=1),
    "mambar_small_patch16_224": dict(embed_dim=384, depth=24, num_registers=12,
                                     neck_reduction=2),
    "mambar_base_patch16_224": dict(embed_dim=768, depth=24, num_registers=12, neck_reduction=4),
    "mambar_large_patch16_224": dict(embed_dim=1024, depth=48, num_registers=16,
                                     neck_reduction=8),
}


def _create_mambar(variant: str, pretrained: bool = False, **kwargs) -> MambaR:
    return create_backbone(MambaR, variant, pretrained, **{**_SIZES[variant], **kwargs})


@register_model
def mambar_tiny_patch16_224(pretrained: bool = False, **kwargs) -> MambaR:
    return _create_mambar("mambar_tiny_patch16_224", pretrained, **kwargs)


@register_model
def mambar_small_patch16_224(pretrained: bool = False, **kwargs) -> MambaR:
    return _create_mambar("mambar_small_patch16_224", pretrained, **kwargs)


@register_model
def mambar_base_patch16_224(pretrained: bool = False, **kwargs) -> MambaR:
    return _create_mambar("mambar_base_patch16_224", pretrained, **kwargs)


@register_model
def mambar_large_patch16_224(pretrained: bool = False, **kwargs) -> MambaR:
    return _create_mambar("mambar_large_patch16_224", pretrained, **kwargs)
