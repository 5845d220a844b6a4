"""What Mamba® and Vim share: the RMSNorm, the patch embedding, the bidirectional Mamba-1 mixer,
the block, and the backbone with timm's model contract.

The module reads top-down: norm and patch embedding, the mixer, the block, the backbone (the
stack of blocks, the initialisation, dense features, the timm interface), then the helpers
both models' registrations use. ``models_mambar.py`` (the paper's model) and ``models_vim.py``
(the baseline) subclass ``VisionMambaBackbone`` with their token layout and read-out.

The selective scan is pluggable (the ``selective_scan`` package), and each mixer direction's
fast path is a custom op (``selective_scan.mixer_op``); nothing here imports a CUDA extension.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, trunc_normal_
from timm.models import build_model_with_cfg
from torch.utils.checkpoint import checkpoint

from selective_scan import (describe_backends, get_scan, requested_backend, resolve_backend,
                            triton_available)
from selective_scan.mixer_op import bimamba, channel_matmul, conv_silu

__all__ = ["VisionMambaBackbone", "BiMambaMixer", "Block", "RMSNorm", "PatchEmbed",
           "create_backbone", "pretrained_cfg", "resize_pos_embed"]


class RMSNorm(nn.Module):
    """RMSNorm with a weight only (eps 1e-5), computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one fused kernel on GPU; the explicit casts keep fp32 math under autocast.
        out = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return out.to(x.dtype)

    def add_norm(self, hidden: torch.Tensor, residual: Optional[torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The pre-norm step of a residual stream: (the norm of the new residual in hidden's
        dtype, the new residual residual + hidden in fp32; hidden alone when residual is
        None). On CUDA one fused Triton kernel each way (``fused_norm.py``), where PyTorch
        makes four passes forward and five backward."""
        if fused_norm_applies(hidden):
            from fused_norm import add_rms_norm
            return add_rms_norm(hidden, residual, self.weight, self.eps, hidden.dtype)
        residual = hidden.float() if residual is None else residual + hidden.float()
        return self(residual).to(hidden.dtype), residual


def fused_norm_applies(x: torch.Tensor) -> bool:
    """Whether ``RMSNorm.add_norm`` runs the fused Triton kernels on x: CUDA tensors, where
    Triton is installed."""
    return x.is_cuda and triton_available()


class PatchEmbed(nn.Module):
    """Non-overlapping patches via a strided conv. The grid is fixed by the build-time img_size
    unless ``dynamic_img_size``, where any multiple of the patch size is accepted."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 dynamic_img_size: bool = False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input size {img_size} is not a multiple of the patch size "
                             f"{patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.dynamic_img_size = dynamic_img_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid(self, x: torch.Tensor) -> Tuple[int, int]:
        """The patch grid of an image batch; an input the model cannot take is a clear error."""
        height, width = x.shape[-2:]
        if not self.dynamic_img_size:
            if (height, width) != (self.img_size, self.img_size):
                raise ValueError(f"input is {height}x{width} but the model was built for "
                                 f"{self.img_size}x{self.img_size}; build it with img_size="
                                 f"{width} (and --finetune to resize pos_embed) or with "
                                 f"dynamic_img_size=True")
        elif height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input is {height}x{width}, not a multiple of the patch size "
                             f"{self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid(x)
        return self.proj(x).flatten(2).transpose(1, 2)


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba-1 mixer ("bimamba v2", outputs averaged).

    One in_proj/out_proj; per direction its own conv1d, x_proj, dt_proj, A_log, D (backward
    names end in ``_b``). The backward direction is the same computation on the reversed
    sequence; it is run as a reverse-time scan over the same ``xz`` rather than on flipped
    copies, except for mamba-ssm's kernels, which only scan forwards.

    ``_scan_direction`` shows a direction's math as the reference path (plain autograd); every
    other backend runs both directions as one custom op (``mixer_op.bimamba``), which keeps
    its inputs and the small x_proj outputs for the backward and is a single node to
    ``torch.compile``, on parameters prepared by ``MixerWeights``.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 scan_backend: Optional[str] = None):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.scan_backend = requested_backend(scan_backend)
        e, n, r = self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * e, bias=False)
        self.conv1d = nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e)
        self.conv1d_b = nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1)
        self.x_proj_b = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj_b = nn.Linear(r, e)
        a_log = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1)
        self.A_log = nn.Parameter(a_log.clone())
        self.A_b_log = nn.Parameter(a_log.clone())
        self.D = nn.Parameter(torch.ones(e))
        self.D_b = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, d_model, bias=False)

        # Only the forward dt_proj gets Mamba's dt init; the backward one keeps nn.Linear's
        # default weight and (after the model-wide bias reset) a zero bias, as the official code.
        nn.init.uniform_(self.dt_proj.weight, -r ** -0.5, r ** -0.5)
        dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D)."""
        backend = resolve_backend(self.scan_backend, hidden.device)
        if backend == "reference":
            xz = self.in_proj(hidden)                        # (B, L, 2E)
            x, z = xz.transpose(1, 2).chunk(2, dim=1)        # (B, E, L) views
            out_f = self._scan_direction(x, z, backend, reverse=False)
            out_b = self._scan_direction(x, z, backend, reverse=True)
            return self.out_proj(((out_f + out_b) / 2).transpose(1, 2))
        # The GEMM weights in the compute dtype (under autocast), both dt_proj weights
        # stacked and A of both directions, each set by one multi-tensor kernel each way,
        # where autocast and autograd would launch one per tensor.
        dtype = _compute_dtype(hidden)
        weights = (self.in_proj.weight, self.out_proj.weight, self.x_proj.weight,
                   self.x_proj_b.weight)
        to_cast = weights if any(w.dtype != dtype for w in weights) else ()
        *cast, dt_w, a, a_b = MixerWeights.apply(
            dtype, len(to_cast), *to_cast, self.dt_proj.weight, self.dt_proj_b.weight,
            self.A_log, self.A_b_log)
        in_w, out_w, x_w, x_w_b = cast or weights
        out, _ = bimamba(
            F.linear(hidden, in_w), dt_w,
            self.conv1d.weight, self.conv1d.bias, x_w, self.dt_proj.bias, a, self.D,
            self.conv1d_b.weight, self.conv1d_b.bias, x_w_b, self.dt_proj_b.bias, a_b,
            self.D_b, backend)
        return F.linear(out, out_w)

    def _direction(self, reverse: bool) -> Tuple[torch.Tensor, ...]:
        """One direction's parameters: conv weight and bias, x_proj and dt_proj weights,
        dt_proj bias, A_log, D."""
        if reverse:
            return (self.conv1d_b.weight, self.conv1d_b.bias, self.x_proj_b.weight,
                    self.dt_proj_b.weight, self.dt_proj_b.bias, self.A_b_log, self.D_b)
        return (self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.dt_proj.bias, self.A_log, self.D)

    def _scan_direction(self, x: torch.Tensor, z: torch.Tensor, backend: str,
                        reverse: bool) -> torch.Tensor:
        """One direction's math under plain autograd: the oracle, which keeps u and delta."""
        conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, a_log, d = \
            self._direction(reverse)
        u = conv_silu(x, conv_weight, conv_bias, reverse)                     # (B, E, L)
        x_dbl = channel_matmul(x_proj_weight, u)                              # (B, R + 2N, L)
        dt, b_ssm, c_ssm = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = channel_matmul(dt_proj_weight, dt)              # (B, E, L); bias: in the scan
        return get_scan(backend)(u, delta, -torch.exp(a_log.float()), b_ssm, c_ssm, d.float(),
                                 z, dt_proj_bias.float(), delta_softplus=True, reverse=reverse)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the mixer's GEMMs run in: autocast's where it is on for x's device, else x's."""
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(
            x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class MixerWeights(torch.autograd.Function):
    """The mixer's parameters as its op takes them, each group by one ``torch._foreach_*``
    kernel: ``n_cast`` weights cast to ``dtype``; the two dt_proj weights that follow
    stacked into one (2, E, R) in ``dtype``; A = -exp(A_log) in fp32 for the last two. The
    backward brings the gradients back to their parameters' dtypes by one more kernel and
    forms dA_log = dA * A by another."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, n_cast: int, *tensors: torch.Tensor):
        weights, dt_weights, a_logs = tensors[:n_cast], tensors[n_cast:-2], tensors[-2:]
        ctx.dtypes = [t.dtype for t in tensors]
        cast = [torch.empty_like(w, dtype=dtype) for w in weights]
        stacked = dt_weights[0].new_empty((2, *dt_weights[0].shape), dtype=dtype)
        torch._foreach_copy_([*cast, *stacked], [*weights, *dt_weights])
        a = torch._foreach_exp([a.float() for a in a_logs])
        torch._foreach_neg_(a)
        ctx.save_for_backward(*a)
        return (*cast, stacked, *a)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        dcast, dstacked, da = grads[:-3], grads[-3], grads[-2:]
        sources = [*dcast, *dstacked]
        dweights = [torch.empty_like(g, dtype=t) for g, t in zip(sources, ctx.dtypes)]
        torch._foreach_copy_(dweights, sources)
        da_logs = torch._foreach_mul(list(da), list(ctx.saved_tensors))
        return (None, None, *dweights, *(g.to(t) for g, t in zip(da_logs, ctx.dtypes[-2:])))


class Block(nn.Module):
    """Pre-norm residual block with the add fused into the norm: r <- r + drop_path(h);
    h <- mixer(RMSNorm(r)). The residual stream r is kept in fp32."""

    def __init__(self, dim: int, drop_path: float = 0.0, scan_backend: Optional[str] = None):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mixer = BiMambaMixer(dim, scan_backend=scan_backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            hidden = self.drop_path(hidden)
        # The mixer runs in the dtype of its input (a bf16 model stays bf16); under autocast
        # this is the cast in_proj would make anyway.
        normed, residual = self.norm.add_norm(hidden, residual)
        return self.mixer(normed), residual


class VisionMambaBackbone(nn.Module):
    """What Mamba® and Vim share: patch embedding, the block stack, norm_f, the init, and the
    timm model interface (classifier reset, dense features, any input size, checkpointing).

    Subclasses decide the token layout (``embed_tokens``, ``split_tokens``), how pos_embed fits
    another patch grid (``fit_pos_embed``) and the read-out (``forward_head``).
    """

    head_hidden_size: int

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 192, depth: int = 24,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 drop_block_rate: Optional[float] = None, scan_backend: Optional[str] = None,
                 dynamic_img_size: bool = False):
        super().__init__()
        if drop_block_rate:
            raise ValueError("drop_block_rate is not supported by Mamba models")
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.img_size = img_size
        self.in_chans = in_chans
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim,
                                      dynamic_img_size)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        block_rates = [0.0] + dpr
        self.layers = nn.ModuleList(
            Block(embed_dim, drop_path=block_rates[i], scan_backend=scan_backend)
            for i in range(depth))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(embed_dim)
        self.feature_info = [dict(module=f"layers.{i}", num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        self._pos_embed_cache: Dict[Tuple[int, int], Tuple[tuple, torch.Tensor]] = {}
        self.scan_backend = requested_backend(scan_backend)
        _report_backend_once(self.scan_backend)

    def _init_weights(self, head_modules: Sequence[nn.Module],
                      embeddings: Sequence[nn.Parameter]) -> None:
        """The official initialisation; Linear biases are zeroed everywhere except the
        forward dt_proj.bias, and each out_proj is rescaled by 1/sqrt(depth)."""
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for module in head_modules:
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        for param in embeddings:
            trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None \
                    and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
        for layer in self.layers:
            out_proj = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(out_proj, a=math.sqrt(5))
            with torch.no_grad():
                out_proj /= math.sqrt(self.depth)

    # ----------------------------------------------------------------- token layout (subclasses)

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the input sequence of the first block (B, T, D)."""
        raise NotImplementedError

    def split_tokens(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) sequence -> patches in raster order (B, H*W, D), extra tokens (B, T-H*W, D)."""
        raise NotImplementedError

    def fit_pos_embed(self, pos_embed: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """A (square-grid) pos_embed of this model's kind resized to ``grid``."""
        raise NotImplementedError

    def pos_embed_for(self, grid: Tuple[int, int]) -> torch.Tensor:
        """pos_embed for a patch grid: the parameter at the build grid, else resized exactly as
        ``interpolate_pos_embed`` resizes a checkpoint, so that a ``dynamic_img_size`` model
        gives what a model built for that size gives. While pos_embed is not being trained the
        resized copy is kept, one per grid."""
        if tuple(grid) == self.patch_embed.grid_size:
            return self.pos_embed
        if torch.is_grad_enabled() and self.pos_embed.requires_grad:
            return self.fit_pos_embed(self.pos_embed, grid)
        # In-place updates (optimizer steps, load_state_dict) move _version.
        param = self.pos_embed
        stamp = (param.data_ptr(), param._version, param.dtype, param.device)
        cached = self._pos_embed_cache.get(tuple(grid))
        if cached is None or cached[0] != stamp:
            cached = (stamp, self.fit_pos_embed(param.detach(), grid))
            self._pos_embed_cache[tuple(grid)] = cached
        return cached[1]

    def interpolate_pos_embed(self, state_dict: Dict[str, torch.Tensor]
                              ) -> Dict[str, torch.Tensor]:
        """A copy of ``state_dict`` with pos_embed resized (bicubic) to this model's grid."""
        state_dict = dict(state_dict)
        if "pos_embed" in state_dict:
            state_dict["pos_embed"] = self.fit_pos_embed(state_dict["pos_embed"],
                                                         self.patch_embed.grid_size)
        return state_dict

    # ----------------------------------------------------------------- forward

    def _block(self, layer: Block, hidden: torch.Tensor, residual: Optional[torch.Tensor]
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # Non-reentrant: what the block's ops save goes through checkpoint's hooks and is
            # dropped, then redone in the backward; torch.compile traces it as one region.
            return checkpoint(layer, hidden, residual, use_reentrant=False)
        return layer(hidden, residual)

    def _final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden = self.drop_path(hidden)
        if isinstance(self.norm_f, RMSNorm):
            return self.norm_f.add_norm(hidden, residual)[0]
        return self.norm_f(residual + hidden.float()).to(hidden.dtype)   # pruned: Identity

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the sequence after norm_f (B, T, D), registers (Vim: the class token) in
        their sequence slots; ``split_tokens`` separates them from the patches."""
        hidden, residual = self.embed_tokens(x), None
        for layer in self.layers:
            hidden, residual = self._block(layer, hidden, residual)
        return self._final_norm(hidden, residual)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """forward_features' sequence -> logits, or with ``pre_logits`` the classifier's
        input (B, head_hidden_size)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor,
                              indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Dense features: the residual stream leaving the chosen blocks (what the next block
        normalises, fp32; through norm_f with ``norm``), patch tokens only, in raster order:
        (B, D, H, W) maps for ``"NCHW"``, (B, H*W, D) for ``"NLC"``; ``return_prefix_tokens``
        pairs each with the registers (Vim: class token), (B, n, D). ``indices``: an int takes
        the last n blocks, a list the blocks named (negative counts back), None all.

        Returns (forward_features' output, intermediates), or the intermediates alone; with
        ``stop_early`` or ``intermediates_only`` the blocks after the last one taken are
        skipped.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt {output_fmt!r} is not 'NCHW' or 'NLC'")
        take, last = take_indices(len(self.layers), indices)
        grid = self.patch_embed.grid(x)
        layers = self.layers[:last + 1] if stop_early or intermediates_only else self.layers
        hidden, residual = self.embed_tokens(x), None
        intermediates = []
        for i, layer in enumerate(layers):
            hidden, residual = self._block(layer, hidden, residual)
            if i in take:
                stream = residual + hidden.float()
                patches, prefix = self.split_tokens(self.norm_f(stream) if norm else stream)
                if output_fmt == "NCHW":
                    patches = patches.reshape(patches.shape[0], *grid, -1)
                    patches = patches.permute(0, 3, 1, 2).contiguous()
                intermediates.append((patches, prefix) if return_prefix_tokens else patches)
        if intermediates_only:
            return intermediates
        return self._final_norm(hidden, residual), intermediates

    def forward_tokens(self, x: torch.Tensor, return_residuals: bool = False
                       ) -> Dict[str, object]:
        """Tokens by name, for analysis: ``patch_tokens`` (B, H*W, D) in raster order and
        ``register_tokens`` (B, n, D; Vim's class token as n = 1) after norm_f; with
        ``return_residuals`` also ``residual_patch_tokens`` and ``residual_register_tokens``,
        the fp32 residual stream leaving each block."""
        if return_residuals:
            tokens, stream = self.forward_intermediates(x, return_prefix_tokens=True,
                                                        output_fmt="NLC")
        else:
            tokens, stream = self.forward_features(x), []
        patches, registers = self.split_tokens(tokens)
        out = {"patch_tokens": patches, "register_tokens": registers}
        if return_residuals:
            out["residual_patch_tokens"] = [p for p, _ in stream]
            out["residual_register_tokens"] = [r for _, r in stream]
        return out

    # ----------------------------------------------------------------- timm model interface

    def _new_head(self, num_classes: int) -> nn.Module:
        """A classifier initialised as the official code initialises its head, on the model's
        device, in its dtype and train/eval mode."""
        if num_classes <= 0:
            return nn.Identity().train(self.training)
        like = self.patch_embed.proj.weight
        head = nn.Linear(self.head_hidden_size, num_classes, device=like.device,
                         dtype=like.dtype)
        trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head.train(self.training)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes``; 0 leaves none, so forward returns the
        pre-logits features. Mamba®'s neck stays. There is no pooling to change (the head
        reads registers or the class token), hence only ``global_pool=None``."""
        if global_pool is not None:
            raise ValueError(f"global_pool={global_pool!r}: {type(self).__name__} has no "
                             f"pooling to change")
        self.num_classes = num_classes
        self.head = self._new_head(num_classes)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True
                                  ) -> List[int]:
        """Keep only what ``forward_intermediates(indices=...)`` needs (timm's features_only
        wrapper calls this); returns the absolute block indices."""
        take, last = take_indices(len(self.layers), indices)
        self.layers = self.layers[:last + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self._prune_head()
        return take

    def _prune_head(self) -> None:
        self.reset_classifier(0)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Redo each block's forward in the backward instead of keeping its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, object]:
        """Parameter groups by depth, for layer-wise learning-rate decay."""
        return {"stem": r"^cls_token|^pos_embed|^patch_embed",
                "blocks": [(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))]}


def take_indices(depth: int, indices: Optional[Union[int, Sequence[int]]]
                 ) -> Tuple[List[int], int]:
    """timm's block selection: None all, an int the last n, a list those blocks (negative
    counts back). Returns the absolute indices and the largest."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"cannot take the last {indices} of {depth} blocks")
        take = list(range(depth - indices, depth))
    else:
        bad = [i for i in indices if not -depth <= i < depth]
        if bad or not indices:
            raise ValueError(f"block indices {list(indices)} are not in 0..{depth - 1}")
        take = [i % depth for i in indices]
    return take, max(take)


def resize_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (1, h*w, D) square-grid patch position embedding to ``grid``."""
    num = pos_embed.shape[1]
    side = int(round(math.sqrt(num)))
    if side * side != num:
        raise ValueError(f"pos_embed has {num} positions, not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    grid_in = pos_embed.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    out = F.interpolate(grid_in, size=tuple(grid), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos_embed.dtype)



_REPORTED = set()


def _report_backend_once(name: str) -> None:
    if name not in _REPORTED:
        _REPORTED.add(name)
        print(f"[vision_mamba] {describe_backends(name)}")


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionMambaBackbone
                         ) -> Dict[str, torch.Tensor]:
    """timm pretrained hook: unwrap ``{"model": ...}`` and fit pos_embed to the model's grid."""
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    return model.interpolate_pos_embed(state_dict)



# --------------------------------------------------------------------------- registry

def pretrained_cfg(**kwargs) -> dict:
    """timm pretrained config shared by the Mamba® and Vim registrations."""
    return {"num_classes": 1000, "input_size": (3, 224, 224), "fixed_input_size": True,
            "pool_size": None, "crop_pct": 1.0, "interpolation": "bicubic",
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "patch_embed.proj", "classifier": "head", **kwargs}


def create_backbone(model_cls: type, variant: str, pretrained: bool = False, **kwargs
                    ) -> nn.Module:
    """``build_model_with_cfg`` plus what timm's factory expects of a model: ``device`` and
    ``dtype``, ``features_only=True`` through ``forward_intermediates`` (the last three blocks
    unless ``out_indices``, as timm's ViT), and no ``fixed_input_size`` in the config of a
    ``dynamic_img_size`` model."""
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    kwargs.setdefault("img_size", 224)
    if kwargs.get("dynamic_img_size"):
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        kwargs["pretrained_cfg_overlay"] = {**overlay, "fixed_input_size": False}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_model_with_cfg(model_cls, variant, pretrained,
                                     pretrained_filter_fn=checkpoint_filter_fn,
                                     feature_cfg=dict(out_indices=3, feature_cls="getter"),
                                     **kwargs)
    return model if dtype is None else model.to(dtype)
