"""Mamba®: checkpoint layout, token layout, the mixer's math, init, and training sanity."""
import json
import math
import pathlib

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F

import models_mambar as mm
import vision_mamba as vm
from helpers import reference_mixer

# A copy of the spec's official_state_dict_layout.json: the released checkpoints' keys and shapes.
LAYOUT = pathlib.Path(__file__).resolve().parent / "data" / "official_state_dict_layout.json"
PARAM_COUNTS = {
    "mambar_tiny_patch16_224": 9_264_232,
    "mambar_small_patch16_224": 27_801_064,
    "mambar_base_patch16_224": 99_301_096,
    "mambar_large_patch16_224": 341_222_376,
}


def small_model(img_size=32, **kwargs):
    cfg = dict(img_size=img_size, embed_dim=32, depth=2, num_registers=4, neck_reduction=2,
               num_classes=5)
    cfg.update(kwargs)
    return mm.MambaR(**cfg)


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_layout_matches_released_checkpoints(name):
    layout = json.loads(LAYOUT.read_text())[name]
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=1000, drop_rate=0.0,
                                  drop_path_rate=0.1, drop_block_rate=None, img_size=224)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(shapes) == sorted(layout)
    assert shapes == layout
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("img_size,expected", [
    (128, [4 + 5 * k for k in range(12)]),
    (224, [15 + 16 * k for k in range(12)]),
    (384, [44 + 45 * k for k in range(12)]),
])
def test_register_positions(img_size, expected):
    model = timm.create_model("mambar_tiny_patch16_224", img_size=img_size)
    assert model.token_layout((img_size // 16) ** 2).registers.tolist() == expected
    assert expected[-1] == 12 * ((img_size // 16) ** 2 // 13) + 11
    if img_size == 224:
        assert expected[0] == 15 and expected[-1] == 191
        assert 196 + 12 - 1 - expected[-1] == 16  # a tail of 16 patches


def test_tokens_laid_out_and_read_back_in_raster_order():
    model = small_model(img_size=64).eval()  # 16 patches, 4 registers, L = 3
    x = torch.randn(2, 3, 64, 64)
    seq = model.embed_tokens(x)
    patches = model.patch_embed(x) + model.pos_embed
    registers = (model.cls_token + model.pos_embed_cls).expand(2, -1, -1)
    step = 16 // 5
    expected, p = [], 0
    for k in range(4):
        expected += [patches[:, p:p + step], registers[:, k:k + 1]]
        p += step
    expected.append(patches[:, p:])
    torch.testing.assert_close(seq, torch.cat(expected, 1))
    got_patches, got_registers = model.split_tokens(seq)
    torch.testing.assert_close(got_patches, patches)
    torch.testing.assert_close(got_registers, registers)


def test_forward_tokens_and_residual_stream():
    model = small_model().eval()
    x = torch.randn(2, 3, 32, 32)
    out = model.forward_tokens(x, return_residuals=True)
    assert out["patch_tokens"].shape == (2, 4, 32)
    assert out["register_tokens"].shape == (2, 4, 32)
    assert len(out["residual_patch_tokens"]) == model.depth
    assert all(r.dtype == torch.float32 and r.shape == (2, 4, 32)
               for r in out["residual_patch_tokens"])
    # norm_f is applied to the last residual stream.
    torch.testing.assert_close(model.norm_f(out["residual_patch_tokens"][-1]),
                               out["patch_tokens"])
    torch.testing.assert_close(model.norm_f(out["residual_register_tokens"][-1]),
                               out["register_tokens"])
    plain = model.forward_tokens(x)
    torch.testing.assert_close(plain["register_tokens"], out["register_tokens"])


def test_wrong_input_size_is_a_clear_error():
    model = timm.create_model("mambar_tiny_patch16_224", num_classes=3, img_size=224).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 3)
        with pytest.raises(ValueError, match="built for 224x224.*dynamic_img_size=True"):
            model(torch.randn(1, 3, 128, 128))
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        timm.create_model("mambar_tiny_patch16_224", img_size=100)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_mixer_matches_two_flipped_oracle_scans(backend):
    torch.manual_seed(0)
    mixer = vm.BiMambaMixer(24, scan_backend=backend)
    with torch.no_grad():  # make the backward direction's parameters differ visibly
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hidden = torch.randn(2, 11, 24, requires_grad=True)
    got = mixer(hidden)
    want = reference_mixer(mixer, hidden)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    leaves = [hidden, *mixer.parameters()]
    g_got = torch.autograd.grad(got.sum(), leaves)
    g_want = torch.autograd.grad(want.sum(), leaves)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_mixer_weights_equal_casts_stack_and_exp_under_autograd(dtype):
    """``MixerWeights``' multi-tensor kernels give what per-tensor casts, a stack and
    -exp(A_log) give, forward and backward, to the bit; gradients in the parameters'
    dtypes."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 3), (3, 4), (5, 4), (5, 4), (4, 2), (4, 2), (4, 3), (4, 3)]
    leaves = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    n_cast = 4 if dtype != torch.float32 else 0       # the mixer casts only under autocast
    inputs = leaves if n_cast else leaves[4:]
    got = vm.MixerWeights.apply(dtype, n_cast, *inputs)
    want = [*(w.to(dtype) for w in leaves[:n_cast]),
            torch.stack(leaves[4:6]).to(dtype), *(-torch.exp(a) for a in leaves[6:])]
    assert [t.dtype for t in got] == [t.dtype for t in want]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    grads = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in want]
    for a, b in zip(torch.autograd.grad(got, inputs, grads),
                    torch.autograd.grad(want, inputs, grads)):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_block_keeps_only_what_its_backward_cannot_cheaply_redo():
    """What a block holds for the backward, per token: the fp32 residual and RMSNorm's
    normalised copy (2D on the CPU; the fused CUDA norm keeps just the input), the norm's
    output for in_proj (D), xz for the mixer's op (2E = 4D), both directions' x_proj output
    (dt, B, C: 2 (R + 2N)), the out_proj input (E = 2D) and RMSNorm's rstd. Not u, delta, the
    conv pre-activation or dt_proj's product of either direction, which the op redoes in its
    backward (those added about 16D floats per token)."""
    dim, length = 32, 16
    block = vm.Block(dim, scan_backend="torch")

    def kept_bytes(batch):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        hidden = torch.randn(batch, length, dim, requires_grad=True)
        residual = torch.randn(batch, length, dim, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block(hidden, residual)
        del out
        return sum(storages.values())

    per_token = (kept_bytes(4) - kept_bytes(2)) / (2 * length) / 4   # fp32 values
    x_proj_out = block.mixer.dt_rank + 2 * block.mixer.d_state
    expected = 2 * dim + dim + 4 * dim + 2 * x_proj_out + 2 * dim + 1
    assert expected - 1 <= per_token <= expected + 1, (per_token, expected)


def test_backend_argument_and_env_override(monkeypatch):
    monkeypatch.setenv("MAMBAR_SCAN_BACKEND", "reference")
    assert small_model().layers[0].mixer.scan_backend == "reference"
    assert small_model(scan_backend="torch").layers[0].mixer.scan_backend == "torch"
    monkeypatch.setenv("MAMBAR_SCAN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown scan backend"):
        small_model()


def test_official_initialisation():
    torch.manual_seed(0)
    model = timm.create_model("mambar_small_patch16_224", num_classes=10, drop_path_rate=0.3)
    mixer = model.layers[3].mixer
    e, r = mixer.d_inner, mixer.dt_rank
    log_n = torch.log(torch.arange(1, 17, dtype=torch.float32)).expand(e, 16)
    assert torch.equal(mixer.A_log, log_n) and torch.equal(mixer.A_b_log, log_n)
    assert torch.equal(mixer.D, torch.ones(e)) and torch.equal(mixer.D_b, torch.ones(e))
    assert torch.count_nonzero(mixer.dt_proj_b.bias) == 0
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert mixer.dt_proj.weight.abs().max() <= r ** -0.5
    # nn.Linear's default bound for the backward dt_proj weight, not Mamba's dt init.
    assert mixer.dt_proj_b.weight.abs().max() <= 1 / math.sqrt(r)
    bound = 1 / math.sqrt(e) / math.sqrt(model.depth)  # kaiming_uniform(a=sqrt 5) / sqrt(depth)
    assert mixer.out_proj.weight.abs().max() <= bound
    assert mixer.out_proj.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(model.head.bias) == 0
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.pos_embed_cls.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.count_nonzero(mixer.conv1d.bias) > 0  # conv keeps PyTorch's default init
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "pos_embed_cls"}
    rates = [0.0] + torch.linspace(0, 0.3, 24).tolist()
    for i, layer in enumerate(model.layers):
        got = getattr(layer.drop_path, "drop_prob", 0.0)
        assert got == pytest.approx(rates[i])
    assert model.drop_path.drop_prob == pytest.approx(0.3)


def test_interpolate_pos_embed_keeps_registers():
    src = small_model(img_size=32)
    dst = small_model(img_size=64)
    state = dst.interpolate_pos_embed(src.state_dict())
    assert state["pos_embed"].shape == dst.pos_embed.shape
    assert torch.equal(state["cls_token"], src.cls_token)
    grid = src.pos_embed.reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(state["pos_embed"], want.permute(0, 2, 3, 1).reshape(1, 16, 32))
    dst.load_state_dict(state)


def test_bf16_autocast_training_step_on_cpu():
    torch.manual_seed(0)
    model = small_model()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    bf16_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for p, g in zip(model.parameters(), bf16_grads):
        assert g.dtype == p.dtype and torch.isfinite(g).all()
        # bf16 keeps ~3 significant digits: close to the fp32 gradient, not equal to it.
        assert (g - p.grad).norm() <= 0.1 * p.grad.norm() + 1e-3


def test_small_model_overfits_one_batch():
    torch.manual_seed(0)
    model = small_model(embed_dim=48)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 20


def test_rmsnorm_formula_and_dtype():
    norm = vm.RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 5, 8)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), want)
    assert norm(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_pretrained_through_timm_offline_overlay(tmp_path):
    src = timm.create_model("mambar_small_patch16_224", num_classes=1000)
    path = tmp_path / "mambar_small_patch16_224.pth"
    torch.save({"model": src.state_dict()}, path)
    cfg = timm.models.get_pretrained_cfg("mambar_small_patch16_224")
    assert cfg.url.endswith("/mambar_small_patch16_224.pth")
    assert not timm.models.get_pretrained_cfg("mambar_tiny_patch16_224").url
    model = timm.create_model("mambar_small_patch16_224", pretrained=True, img_size=128,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.layers[5].mixer.A_b_log, src.layers[5].mixer.A_b_log)
    assert torch.equal(model.head.weight, src.head.weight)
    assert model.pos_embed.shape == (1, 64, 384)  # 14x14 resized to the 8x8 grid


# --------------------------------------------------------------------------- register head

def spec_slots(num_patches, num_registers):
    """Sequence slots by MAMBAR.md 'Tokens' (L = N // (n + 1)): patch p comes after
    min(p // L, n) registers; register k sits at L + k (L + 1)."""
    step = num_patches // (num_registers + 1)
    patches = [p + min(p // step, num_registers) for p in range(num_patches)]
    registers = [step + k * (step + 1) for k in range(num_registers)]
    return patches, registers


@pytest.mark.parametrize("reduction", [1, 2])
def test_register_head_follows_the_spec_formula(reduction):
    """MAMBAR.md 'Head': each register through the neck, concatenated in register order with
    each register's features contiguous, RMSNorm (r > 1 only), the classifier. Fixed weights,
    written out element by element, so a head flattening in another order fails."""
    dim, n, classes = 4, 3, 2
    out = dim // reduction
    model = small_model(img_size=64, embed_dim=dim, num_registers=n, neck_reduction=reduction,
                        num_classes=classes)
    seq = torch.arange(2 * (16 + n) * dim, dtype=torch.float32).reshape(2, 16 + n, dim).sin()
    neck_w = torch.arange(out * dim, dtype=torch.float32).reshape(out, dim) / 10 - 0.3
    norm_w = torch.linspace(0.5, 1.5, n * out)
    head_w = torch.arange(classes * n * out, dtype=torch.float32).reshape(classes, -1).cos()
    head_b = torch.tensor([0.25, -0.5])
    with torch.no_grad():
        if reduction > 1:
            model.neck.weight.copy_(neck_w)
            model.norm_neck.weight.copy_(norm_w)
        model.head.weight.copy_(head_w)
        model.head.bias.copy_(head_b)
    _, slots = spec_slots(16, n)
    got_logits = model.forward_head(seq)
    got_features = model.forward_head(seq, pre_logits=True)
    for b in range(2):
        features = []
        for k in range(n):
            register = seq[b, slots[k]]
            for j in range(out):
                features.append(sum(neck_w[j, i] * register[i] for i in range(dim))
                                if reduction > 1 else register[j])
        v = torch.stack(features)
        if reduction > 1:
            v = v / torch.sqrt((v ** 2).mean() + 1e-5) * norm_w
        logits = torch.stack([sum(head_w[c, i] * v[i] for i in range(n * out)) + head_b[c]
                              for c in range(classes)])
        torch.testing.assert_close(got_features[b], v)
        torch.testing.assert_close(got_logits[b], logits)


# --------------------------------------------------------------------------- timm's contract

# MAMBAR.md 'Sizes': D, depth, and the head input n * D / r.
SPEC_SIZES = {
    "mambar_tiny_patch16_224": (192, 24, 2304),
    "mambar_small_patch16_224": (384, 24, 2304),
    "mambar_base_patch16_224": (768, 24, 2304),
    "mambar_large_patch16_224": (1024, 48, 2048),
}


@pytest.mark.parametrize("name", list(SPEC_SIZES))
def test_timm_attributes_config_and_feature_info(name):
    dim, depth, head_input = SPEC_SIZES[name]
    with torch.device("meta"):
        model = timm.create_model(name)
        dynamic = timm.create_model(name, dynamic_img_size=True)
    assert model.num_features == dim and model.head_hidden_size == head_input
    assert model.get_classifier() is model.head and model.head.in_features == head_input
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["fixed_input_size"] is True
    assert not dynamic.pretrained_cfg["fixed_input_size"]
    # The spec's evaluation: bicubic, crop ratio 1.0, ImageNet mean and std.
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 1.0
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    params = dict(model.named_parameters())
    assert f"{cfg['first_conv']}.weight" in params and f"{cfg['classifier']}.weight" in params
    assert cfg["paper_ids"] == "arXiv:2405.14858" and cfg["license"]
    assert [f["module"] for f in model.feature_info] == [f"layers.{i}" for i in range(depth)]
    assert {(f["num_chs"], f["reduction"]) for f in model.feature_info} == {(dim, 16)}


def test_forward_composes_and_reset_classifier_keeps_a_loaded_neck(tmp_path):
    src = small_model()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": src.state_dict()}, path)
    model = small_model().eval()
    model.load_state_dict(torch.load(path, weights_only=True)["model"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 4 + 4, 32)             # N patches + n registers, D
        logits = model(x)
        torch.testing.assert_close(logits, model.forward_head(tokens))
        pre = model.forward_head(tokens, pre_logits=True)
        assert pre.shape == (2, 4 * 32 // 2)              # n * D / r
        torch.testing.assert_close(logits, pre @ src.head.weight.T + src.head.bias)

        model.reset_classifier(7)
        assert model.num_classes == 7 and model.get_classifier() is model.head
        assert model.head.weight.shape == (7, 64) and not model.head.training
        assert torch.count_nonzero(model.head.bias) == 0
        assert torch.equal(model.neck.weight, src.neck.weight)
        assert torch.equal(model.norm_neck.weight, src.norm_neck.weight)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), True), pre)
        assert model(x).shape == (2, 7)
        model.reset_classifier(0)
        assert not model.head.training
        torch.testing.assert_close(model(x), pre)
    with pytest.raises(ValueError, match="global_pool='avg'"):
        model.reset_classifier(3, "avg")


def test_layer_decay_groups_follow_depth():
    model = small_model(depth=3)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1.0, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: group["lr_scale"] for group in optimizer.param_groups
             for p in group["params"]}
    # Embeddings first, then block i (norm_f with the last, as in timm's ViT), then the head:
    # each step closer to the output scales the learning rate by 1 / 0.5.
    for name in ("patch_embed.proj.weight", "pos_embed", "cls_token", "pos_embed_cls"):
        assert scale[name] == 0.5 ** 4, name
    for i in range(3):
        assert scale[f"layers.{i}.mixer.in_proj.weight"] == 0.5 ** (3 - i)
    assert scale["norm_f.weight"] == 0.5
    for name in ("neck.weight", "norm_neck.weight", "head.weight"):
        assert scale[name] == 1.0, name


# --------------------------------------------------------------------------- dense features

def rms(x):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


def test_forward_intermediates_are_the_residual_stream_in_raster_order():
    model = small_model(img_size=64, depth=3).eval()      # 4x4 grid, 4 registers, L = 3
    x = torch.randn(2, 3, 64, 64)
    streams = []
    for layer in model.layers:   # r + h leaving each block, seen from outside
        layer.register_forward_hook(lambda mod, inp, out: streams.append(out[1] + out[0]))
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[0, -1])
    patch_slots, register_slots = spec_slots(16, 4)
    assert len(maps) == 2
    for got, stream in zip(maps, (streams[0], streams[2])):
        assert got.shape == (2, 32, 4, 4)
        for p, slot in enumerate(patch_slots):
            torch.testing.assert_close(got[:, :, p // 4, p % 4], stream[:, slot])
    with torch.no_grad():
        torch.testing.assert_close(final, model.forward_features(x))
        streams.clear()
        last_two = model.forward_intermediates(x, indices=2, norm=True, output_fmt="NLC",
                                               return_prefix_tokens=True,
                                               intermediates_only=True)
    assert len(last_two) == 2
    patches, registers = last_two[1]
    torch.testing.assert_close(patches, rms(streams[2][:, patch_slots]))
    torch.testing.assert_close(registers, rms(streams[2][:, register_slots]))
    streams.clear()
    with torch.no_grad():
        model.forward_intermediates(x, indices=[0], stop_early=True)
    assert len(streams) == 1                               # the later blocks did not run
    with pytest.raises(ValueError, match=r"block indices \[3\] are not in 0..2"):
        model.forward_intermediates(x, indices=[3])
    with pytest.raises(ValueError, match="output_fmt 'NHWC'"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_features_only_through_timm():
    kwargs = dict(embed_dim=32, depth=4, num_registers=4, neck_reduction=2, img_size=64)
    torch.manual_seed(0)
    full = timm.create_model("mambar_small_patch16_224", **kwargs).eval()
    torch.manual_seed(0)
    features = timm.create_model("mambar_small_patch16_224", features_only=True,
                                 out_indices=(1, 2), **kwargs).eval()
    assert features.feature_info.channels() == [32, 32]
    assert features.feature_info.reduction() == [16, 16]
    assert features.feature_info.module_name() == ["layers.1", "layers.2"]
    assert len(features.model.layers) == 3                 # nothing after the last one taken
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = features(x)
        want = full.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    assert [g.shape for g in got] == [(2, 32, 4, 4)] * 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    default = timm.create_model("mambar_small_patch16_224", features_only=True, **kwargs)
    assert default.feature_info.module_name() == ["layers.1", "layers.2", "layers.3"]


# --------------------------------------------------------------------------- any input size

@pytest.mark.parametrize("size", [32, 96])
def test_dynamic_img_size_equals_a_model_built_for_that_size(size):
    dynamic = small_model(img_size=64, dynamic_img_size=True).eval()
    built = small_model(img_size=size).eval()
    built.load_state_dict(built.interpolate_pos_embed(dynamic.state_dict()))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), built(x), rtol=0, atol=0)
        got = dynamic.forward_intermediates(x, intermediates_only=True)
        want = built.forward_intermediates(x, intermediates_only=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="72x72, not a multiple of the patch size 16"):
        dynamic(torch.randn(1, 3, 72, 72))


def test_dynamic_img_size_lays_registers_out_for_the_input_grid():
    model = timm.create_model("mambar_tiny_patch16_224", depth=1, dynamic_img_size=True)
    with torch.no_grad():
        seq = model.embed_tokens(torch.randn(1, 3, 128, 128))
    assert seq.shape == (1, 64 + 12, 192)
    # MAMBAR.md: at 128 px (8x8) the registers sit at 4, 9, ..., 59.
    torch.testing.assert_close(seq[:, [4 + 5 * k for k in range(12)]],
                               model.cls_token + model.pos_embed_cls)


def test_dynamic_img_size_takes_other_aspect_ratios_and_trains_pos_embed():
    model = small_model(img_size=64, dynamic_img_size=True)
    x = torch.randn(2, 3, 64, 96)                          # a 4x6 grid, 24 patches
    conv = model.patch_embed.proj
    grid = model.pos_embed.detach().reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    pos = F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False)
    patches = F.conv2d(x, conv.weight, conv.bias, stride=16) + pos
    patch_slots, _ = spec_slots(24, 4)
    seq = model.embed_tokens(x)
    torch.testing.assert_close(seq[:, patch_slots], patches.flatten(2).transpose(1, 2))
    maps = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert maps[0].shape == (2, 32, 4, 6)
    model(x).sum().backward()
    assert model.pos_embed.grad.abs().sum() > 0


def test_dynamic_pos_embed_cache_follows_in_place_updates():
    model = small_model(img_size=32, dynamic_img_size=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = model(x)
        model.pos_embed.mul_(3)                            # as an optimizer step would
        second = model(x)
    built = small_model(img_size=64).eval()
    built.load_state_dict(built.interpolate_pos_embed(model.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(second, built(x), rtol=0, atol=0)
    assert not torch.equal(first, second)


# --------------------------------------------------------------------------- checkpointing

def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    model = small_model(depth=3, drop_path_rate=0.3)   # train mode: random drop path
    x = torch.randn(4, 3, 32, 32)

    def step(checkpointing):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    plain_out, plain_grads = step(False)
    ckpt_out, ckpt_grads = step(True)
    torch.testing.assert_close(ckpt_out, plain_out)
    for (name, _), a, b in zip(model.named_parameters(), ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b, msg=name)


def test_grad_checkpointing_keeps_only_each_blocks_inputs():
    """Checkpointed, a block keeps only its inputs for the backward: the mixer output h and
    the fp32 residual r, 2D values per token (against about 9D plain, see
    test_block_keeps_only_what_its_backward_cannot_cheaply_redo)."""
    dim = 32

    def kept_bytes(depth):
        torch.manual_seed(0)
        model = small_model(embed_dim=dim, depth=depth)
        model.set_grad_checkpointing(True)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(torch.randn(2, 3, 32, 32))
        del out
        return sum(storages.values())

    per_block_token = (kept_bytes(4) - kept_bytes(2)) / 2 / (2 * (4 + 4)) / 4
    assert per_block_token == 2 * dim


def test_grad_checkpointing_with_frozen_embeddings_still_trains_the_blocks():
    model = small_model(depth=2)
    for param in (model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.pos_embed,
                  model.cls_token, model.pos_embed_cls):
        param.requires_grad_(False)
    model.set_grad_checkpointing(True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_main_grad_checkpointing_flag():
    import main
    parser = main.get_args_parser()
    for argv, expected in (([], False), (["--grad-checkpointing"], True)):
        args = parser.parse_args(["--model", "mambar_tiny_patch16_224", "--input-size", "32",
                                  *argv])
        args.nb_classes = 5
        assert main.build_model(args).grad_checkpointing is expected


def test_forward_on_the_meta_device():
    """timm builds models on the meta device to inspect them (its default-config tests do):
    the forward must run there, with no autocast context on a device that has none."""
    with torch.device("meta"):
        model = timm.create_model("mambar_tiny_patch16_224", num_classes=7)
        out = model(torch.empty(2, 3, 224, 224))
        features = model.forward_features(torch.empty(1, 3, 224, 224))
    assert out.shape == (2, 7) and out.is_meta
    assert features.shape == (1, 196 + 12, 192)


def compile_case(monkeypatch, backend):
    """A small Mamba® with the given scan backend on the CPU; Triton's kernels run here under
    its interpreter (seconds per call: hence the smallest model), on CPU tensors, which the
    model would refuse outside tests."""
    size, batch = dict(depth=2, embed_dim=32), 2
    if backend == "triton":
        from helpers import triton_interpreted
        if not triton_interpreted():
            pytest.skip("Triton is not running in its interpreter here")
        monkeypatch.setattr(vm, "resolve_backend", lambda name, device: "triton")
        size, batch = dict(depth=1, embed_dim=8), 1
    torch.manual_seed(0)
    model = small_model(drop_path_rate=0.1, scan_backend=backend, **size)
    return model, torch.randn(batch, 3, 32, 32), torch.tensor([1, 3][:batch])


def train_step(model, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


@pytest.mark.kernels
def test_the_gpu_path_matches_the_reference(monkeypatch):
    """Mamba® as a GPU runs it (the Triton conv, scans and add + RMSNorm, interpreted here)
    against the reference backend's plain autograd: logits and every parameter's gradient."""
    from helpers import DEVICE, triton_interpreted
    if DEVICE == "cpu" and not triton_interpreted():
        pytest.skip("Triton is not running in its interpreter here")
    torch.manual_seed(0)
    # Interpreted kernels take seconds per call: the smallest model that has every part.
    model = small_model(depth=1, embed_dim=8, scan_backend="reference").to(DEVICE)
    x, y = torch.randn(1, 3, 32, 32, device=DEVICE), torch.tensor([3], device=DEVICE)

    def logits_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        return logits.detach(), [p.grad for p in model.parameters()]

    want, want_grads = logits_and_grads()
    norms = []
    monkeypatch.setattr(vm, "fused_norm_applies", lambda t: norms.append(t) or True)
    monkeypatch.setattr(vm, "resolve_backend", lambda name, device: "triton")
    got, got_grads = logits_and_grads()
    assert len(norms) == 2          # the block and norm_f ran the fused kernels
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.kernels)])
def test_torch_compile_sees_no_graph_breaks(monkeypatch, backend):
    """The forward, and a training step (forward, loss, backward, traced with Dynamo's
    autograd-op tracing), each one graph: the mixer's work is a custom op, nothing in the model
    changes the thread count or installs saved-tensor hooks. (With Triton's interpreted
    kernels, seconds per call, the training step alone: it holds the forward.)"""
    model, x, y = compile_case(monkeypatch, backend)
    if backend != "triton":
        model.eval()
        forward = torch._dynamo.explain(model)(x)
        assert (forward.graph_count, forward.graph_break_count) == (1, 0), forward.break_reasons
        torch._dynamo.reset()
    model.train()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step = torch._dynamo.explain(train_step)(model, x, y)
    assert (step.graph_count, step.graph_break_count) == (1, 0), step.break_reasons
    assert any("bimamba" in str(node.target) for graph in step.graphs
               for node in graph.graph.nodes)


def assert_compiled_matches_eager(model, x, y):
    """Logits and every parameter's gradient of the Inductor-compiled model equal eager's
    (Inductor fuses and reorders the fp32 work around the op, hence the tolerance)."""
    model.eval()  # no drop path: the same function on both sides

    def logits_and_grads(fn):
        model.zero_grad(set_to_none=True)
        logits = fn(x)
        F.cross_entropy(logits, y).backward()
        return logits.detach(), [p.grad for p in model.parameters()]

    want, want_grads = logits_and_grads(model)
    torch._dynamo.reset()
    got, got_grads = logits_and_grads(torch.compile(model))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_model_matches_eager(monkeypatch):
    """On the CPU; any scan backend is the same opaque op to the compiler (the GPU ones are
    checked on a GPU below)."""
    assert_compiled_matches_eager(*compile_case(monkeypatch, "torch"))


def test_torch_compile_sees_no_graph_breaks_with_grad_checkpointing(monkeypatch):
    model, x, y = compile_case(monkeypatch, "torch")
    model.set_grad_checkpointing(True)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        step = torch._dynamo.explain(train_step)(model, x, y)
    assert (step.graph_count, step.graph_break_count) == (1, 0), step.break_reasons


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compiled_model_matches_eager_on_the_gpu(backend):
    """The GPU backends through Inductor: one graph, and the logits and gradients of eager."""
    from selective_scan import cuda_kernels_available
    if backend == "cuda" and not cuda_kernels_available():
        pytest.skip("mamba-ssm kernels not installed")
    torch.manual_seed(0)
    model = small_model(depth=2, scan_backend=backend).cuda()
    x, y = torch.randn(2, 3, 32, 32, device="cuda"), torch.tensor([1, 3], device="cuda")
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert_compiled_matches_eager(model, x, y)
