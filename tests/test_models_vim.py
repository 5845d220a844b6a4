"""Vim baseline: released checkpoint layout, middle class token, pos_embed, training sanity."""
import json
import pathlib

import pytest
import timm
import torch
import torch.nn.functional as F

import checkpoints
import models_vim as mv

# A copy of the spec's vim_state_dict_layout.json: Vim's released checkpoints' keys and shapes.
LAYOUT = pathlib.Path(__file__).resolve().parent / "data" / "vim_state_dict_layout.json"
RELEASED = {
    "vim_tiny_patch16_224": mv._TINY,
    "vim_small_patch16_224": mv._SMALL,
    "vim_base_patch16_224": mv._BASE,
}


def small_vim(img_size=32, **kwargs):
    cfg = dict(pretrained=False, num_classes=5, embed_dim=32, depth=2, img_size=img_size)
    cfg.update(kwargs)
    return timm.create_model("vim_tiny_patch16_224", **cfg)


@pytest.mark.parametrize("alias", list(RELEASED))
def test_layout_matches_released_checkpoints(alias):
    name = RELEASED[alias]
    layout = json.loads(LAYOUT.read_text())[name]
    for model_name in (name, alias):
        with torch.device("meta"):
            model = timm.create_model(model_name, pretrained=False, num_classes=1000,
                                      drop_rate=0.0, drop_path_rate=0.1, drop_block_rate=None,
                                      img_size=224)
        assert isinstance(model, mv.Vim)
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert sorted(shapes) == sorted(layout)
        assert shapes == layout


@pytest.mark.parametrize("img_size", [224, 448])
def test_class_token_in_the_middle_then_one_pos_embed(img_size):
    model = timm.create_model("vim_tiny_patch16_224", depth=2, num_classes=7,
                              img_size=img_size).eval()
    n = (img_size // 16) ** 2
    mid = n // 2
    assert model.cls_position == mid == {224: 98, 448: 392}[img_size]
    assert model.pos_embed.shape == (1, n + 1, 192)
    x = torch.randn(2, 3, img_size, img_size)
    conv = model.patch_embed.proj
    patches = F.conv2d(x, conv.weight, conv.bias, stride=16).flatten(2).transpose(1, 2)
    cls = model.cls_token.expand(2, -1, -1)
    want = torch.cat([patches[:, :mid], cls, patches[:, mid:]], 1) + model.pos_embed
    seq = model.embed_tokens(x)
    torch.testing.assert_close(seq, want)

    got_patches, got_cls = model.split_tokens(seq)
    keep = [i for i in range(n + 1) if i != mid]
    torch.testing.assert_close(got_patches, patches + model.pos_embed[:, keep])
    torch.testing.assert_close(got_cls, cls + model.pos_embed[:, mid:mid + 1])

    # The read-out is norm_f at the class position -> head, seen from outside via a hook.
    seen = {}
    hook = model.norm_f.register_forward_hook(lambda mod, inp, out: seen.update(out=out))
    logits = model(x)
    hook.remove()
    torch.testing.assert_close(logits, model.head(seen["out"][:, mid]))
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)
    feats = model.forward_tokens(x, return_residuals=True)
    torch.testing.assert_close(feats["register_tokens"][:, 0], seen["out"][:, mid])
    assert feats["patch_tokens"].shape == (2, n, 192)
    assert len(feats["residual_patch_tokens"]) == 2
    torch.testing.assert_close(model.norm_f(feats["residual_register_tokens"][-1]),
                               feats["register_tokens"])


def test_dropout_follows_pos_embed_over_the_whole_sequence():
    model = small_vim(img_size=64, drop_rate=0.5).train()
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(0)
    seq = model.embed_tokens(x)
    clean = model.eval().embed_tokens(x)
    kept = seq != 0
    torch.testing.assert_close(seq[kept], 2 * clean[kept])
    assert not kept[:, model.cls_position].all()  # the class slot is dropped out too


@pytest.mark.parametrize("src_size, dst_size", [(224, 448), (112, 224)])
def test_interpolate_pos_embed_keeps_the_class_slot(src_size, dst_size):
    src = timm.create_model("vim_tiny_patch16_224", depth=1, img_size=src_size)
    dst = timm.create_model("vim_tiny_patch16_224", depth=1, img_size=dst_size)
    s, d = src_size // 16, dst_size // 16
    source = src.state_dict()
    state = dst.interpolate_pos_embed(source)
    assert source["pos_embed"].shape == (1, s * s + 1, 192)  # the input is left alone
    new = state["pos_embed"]
    assert new.shape == (1, d * d + 1, 192)
    src_mid, dst_mid = s * s // 2, d * d // 2
    assert torch.equal(new[:, dst_mid], source["pos_embed"][:, src_mid])
    old_patches = torch.cat([source["pos_embed"][:, :src_mid],
                             source["pos_embed"][:, src_mid + 1:]], 1)
    grid = old_patches.reshape(1, s, s, 192).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(d, d), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, d * d, 192)
    torch.testing.assert_close(torch.cat([new[:, :dst_mid], new[:, dst_mid + 1:]], 1), want)
    dst.load_state_dict(state, strict=True)
    assert src.interpolate_pos_embed(source)["pos_embed"] is source["pos_embed"]
    with pytest.raises(ValueError, match="not a square grid plus a class slot"):
        dst.interpolate_pos_embed({"pos_embed": torch.zeros(1, s * s, 192)})


def test_init_and_weight_decay_groups():
    torch.manual_seed(0)
    model = timm.create_model("vim_small_patch16_224", depth=2, num_classes=1000,
                              drop_rate=0.1, drop_path_rate=0.2, drop_block_rate=None,
                              img_size=224)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    for param in (model.pos_embed, model.cls_token, model.head.weight):
        assert 0.015 < param.std().item() < 0.025
    assert torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model.layers[0].mixer.dt_proj_b.bias) == 0
    assert torch.count_nonzero(model.layers[0].mixer.dt_proj.bias) > 0
    with pytest.raises(ValueError, match="drop_block_rate"):
        timm.create_model("vim_tiny_patch16_224", depth=1, drop_block_rate=0.1)


def test_released_format_loads_strict(tmp_path):
    src = small_vim(num_classes=10)
    path = tmp_path / "vim_t_midclstok.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = small_vim(num_classes=10)
    checkpoints.load_weights(dst, str(path), strict=True)
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    dst.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)


def test_trains_a_step_and_overfits_a_batch():
    torch.manual_seed(0)
    model = small_vim(embed_dim=48)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not no_grad, no_grad
    first = loss.item()
    for _ in range(60):
        opt.step()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    assert loss.item() < first / 20


def test_timm_contract_and_reset_classifier():
    with torch.device("meta"):
        model = timm.create_model("vim_small_patch16_224")
    assert model.num_features == model.head_hidden_size == 384
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["fixed_input_size"] is True
    assert cfg["paper_ids"] == "arXiv:2401.09417" and cfg["classifier"] == "head"
    assert [f["module"] for f in model.feature_info] == [f"layers.{i}" for i in range(24)]
    assert {(f["num_chs"], f["reduction"]) for f in model.feature_info} == {(384, 16)}

    model = small_vim(img_size=48).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 10, 32)
        pre = model.forward_head(tokens, pre_logits=True)
        torch.testing.assert_close(pre, tokens[:, 4])     # the class slot, 9 // 2
        torch.testing.assert_close(model(x), model.head(pre))
        model.reset_classifier(3)
        assert model.get_classifier().weight.shape == (3, 32)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pre)


@pytest.mark.parametrize("side", [4, 3])
def test_forward_intermediates_drop_the_class_token(side):
    model = small_vim(img_size=16 * side, depth=2).eval()
    n = side * side
    x = torch.randn(2, 3, 16 * side, 16 * side)
    streams = []
    for layer in model.layers:
        layer.register_forward_hook(lambda mod, inp, out: streams.append(out[1] + out[0]))
    with torch.no_grad():
        (maps, cls), = model.forward_intermediates(x, indices=[1], return_prefix_tokens=True,
                                                   intermediates_only=True)
    stream = streams[1]
    assert maps.shape == (2, 32, side, side) and cls.shape == (2, 1, 32)
    for p in range(n):
        slot = p if p < n // 2 else p + 1
        torch.testing.assert_close(maps[:, :, p // side, p % side], stream[:, slot])
    torch.testing.assert_close(cls[:, 0], stream[:, n // 2])


@pytest.mark.parametrize("size", [32, 96])
def test_dynamic_img_size_equals_a_model_built_for_that_size(size):
    dynamic = small_vim(img_size=64, dynamic_img_size=True).eval()
    built = small_vim(img_size=size).eval()
    built.load_state_dict(built.interpolate_pos_embed(dynamic.state_dict()))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), built(x), rtol=0, atol=0)
    assert not dynamic.pretrained_cfg["fixed_input_size"]


def test_features_only_and_grad_checkpointing():
    torch.manual_seed(0)
    features = small_vim(img_size=64, depth=3, features_only=True, out_indices=[0, 2]).eval()
    assert features.feature_info.channels() == [32, 32]
    assert features.feature_info.reduction() == [16, 16]
    maps = features(torch.randn(1, 3, 64, 64))
    assert [m.shape for m in maps] == [(1, 32, 4, 4)] * 2

    torch.manual_seed(0)
    model = small_vim(depth=2, drop_path_rate=0.3)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(1)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
