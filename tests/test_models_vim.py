"""Vim baseline: released checkpoint layout, middle class token, pos_embed, training sanity."""
import json
import os
import pathlib

import pytest
import timm
import torch
import torch.nn.functional as F

import models_mambar as mm
import models_vim as mv

SPEC = pathlib.Path(__file__).resolve().parents[2] / "shared" / "spec"
if not SPEC.exists():
    SPEC = pathlib.Path(os.environ.get("MAMBAR_SPEC_DIR", "../shared/spec"))
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
    layout_file = SPEC / "vim_state_dict_layout.json"
    if not layout_file.exists():
        pytest.skip(f"spec not found at {layout_file}")
    name = RELEASED[alias]
    layout = json.loads(layout_file.read_text())[name]
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
    feats = model.forward_features(x, return_residuals=True)
    torch.testing.assert_close(feats["register_tokens"][:, 0], seen["out"][:, mid])
    torch.testing.assert_close(model.forward_head(feats["register_tokens"]), logits)
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
    mm.load_checkpoint(dst, str(path), strict=True)
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
