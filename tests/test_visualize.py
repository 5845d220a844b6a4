"""The feature-norm tool: its numbers against the residual stream, its scores, figures and CLI."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import visualize as vis

REPO = pathlib.Path(__file__).resolve().parents[1]


def small(name, img_size=64, **kwargs):
    cfg = dict(pretrained=False, num_classes=5, embed_dim=32, depth=3, img_size=img_size)
    if name.startswith("mambar"):
        cfg.update(num_registers=2, neck_reduction=2)
    cfg.update(kwargs)
    return timm.create_model(name, **cfg).eval()


def stream_by_hooks(model, images):
    """The residual stream leaving each block, read from the blocks' own outputs."""
    outputs = []
    hooks = [layer.register_forward_hook(lambda mod, inp, out: outputs.append(out))
             for layer in model.layers]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return [residual + hidden.float() for hidden, residual in outputs]


def patch_slots(name, num_patches, num_registers):
    if name.startswith("vim"):
        return [i for i in range(num_patches + 1) if i != num_patches // 2]
    step = num_patches // (num_registers + 1)
    registers = {step + k * (step + 1) for k in range(num_registers)}
    return [i for i in range(num_patches + num_registers) if i not in registers]


@pytest.mark.parametrize("name", ["vim_tiny_patch16_224", "mambar_tiny_patch16_224"])
def test_norm_map_equals_the_residual_stream(name):
    torch.manual_seed(0)
    model = small(name)
    images = torch.randn(2, 3, 64, 64)
    stream = stream_by_hooks(model, images)
    slots = patch_slots(name, 16, getattr(model, "num_registers", 1))
    all_layers = vis.layer_norms(model, images)
    assert all_layers.shape == (3, 2, 4, 4)
    for layer in (0, 1, -1):
        want = stream[layer][:, slots].norm(dim=-1).reshape(2, 4, 4)
        got = vis.patch_norm_map(model, images, layer)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(all_layers[layer], want)


def test_register_similarity_is_cosine_to_every_patch():
    model = small("mambar_tiny_patch16_224")
    images = torch.randn(1, 3, 64, 64)
    sim = vis.register_similarity(model, images)
    assert sim.shape == (1, 2, 4, 4)
    with torch.no_grad():
        out = model.forward_tokens(images)
    reg, patch = out["register_tokens"][0, 1], out["patch_tokens"][0, 5]
    want = torch.dot(reg, patch) / (reg.norm() * patch.norm())
    torch.testing.assert_close(sim[0, 1].flatten()[5], want)


def test_artifact_score_flat_and_planted_outliers():
    flat = vis.artifact_score(np.full((14, 14), 7.0), k=3)
    assert flat["share_above_k_median"] == 0 and flat["max_over_median"] == 1
    norms = np.ones((10, 10))
    norms.flat[[3, 40, 77]] = 10.0
    norms.flat[50] = 2.9  # below 3x the median: not an artifact
    score = vis.artifact_score(torch.tensor(norms), k=3)
    assert score["median"] == 1.0
    assert score["share_above_k_median"] == pytest.approx(0.03)
    assert score["max_over_median"] == pytest.approx(10.0)
    assert vis.artifact_score(norms, k=2)["share_above_k_median"] == pytest.approx(0.04)


def test_distribution_layers_clip_to_depth():
    assert vis.distribution_layers(24) == [7, 15, 19, 23]
    assert vis.distribution_layers(48) == [7, 15, 19, 23]
    assert vis.distribution_layers(16) == [7, 15]
    assert vis.distribution_layers(3) == [2]


def test_figures_have_one_panel_per_input_and_model():
    crop = Image.new("RGB", (64, 64))
    maps = [np.random.rand(4, 4) for _ in range(3)]
    fig = vis.plot_norm_maps(crop, maps, ["a", "b", "c"], [2, 2, 2])
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4
    assert [ax.get_title().split("\n")[0] for ax in panels] == ["Input", "a", "b", "c"]
    fig = vis.plot_norm_distributions([np.random.rand(3, 4, 4)] * 2, ["a", "b"], [0, 2])
    assert len(fig.axes) == 2 and fig.axes[0].get_yscale() == "log"
    fig = vis.plot_register_maps([np.random.rand(1, 4, 4), np.random.rand(2, 4, 4)], ["a", "b"])
    assert sum(bool(ax.images) for ax in fig.axes) == 3


def test_cli_writes_figures_and_json(tmp_path, capsys):
    # A Vim checkpoint made at 224 px with 10 classes, read at 64 px: pos_embed interpolated,
    # the class count taken from the head.
    torch.manual_seed(1)
    trained = timm.create_model("vim_tiny_patch16_224", num_classes=10)
    ckpt = tmp_path / "vim.pth"
    torch.save({"model": trained.state_dict()}, ckpt)
    image = tmp_path / "tiny.png"
    Image.fromarray((np.random.rand(40, 56, 3) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "out"
    assert vis.main(["--model", "vim_tiny_patch16_224", "--checkpoint", str(ckpt),
                     "--model", "mambar_tiny_patch16_224", "--checkpoint", "none",
                     "--image", str(image), "--input-size", "64", "--layer", "20",
                     "--out", str(out), "--register-maps", "--dpi", "40"]) == 0
    assert "max/med" in capsys.readouterr().out

    for png in ("tiny_feature_norms.png", "tiny_norm_distributions.png",
                "tiny_register_maps.png"):
        with Image.open(out / png) as img:
            assert img.width > img.height
    report = json.loads((out / "feature_norms.json").read_text())
    assert report["input_size"] == 64 and report["distribution_layers"] == [7, 15, 19, 23]
    vim_entry, mambar_entry = report["images"][0]["models"]
    assert vim_entry["checkpoint"] == str(ckpt) and mambar_entry["checkpoint"] is None
    assert vim_entry["grid"] == [4, 4] and vim_entry["map_layer"] == 20
    assert [row["layer"] for row in vim_entry["layers"]] == list(range(24))

    # The reported numbers equal the residual stream of the checkpoint's model at 64 px.
    model = timm.create_model("vim_tiny_patch16_224", num_classes=10, img_size=64).eval()
    model.load_state_dict(model.interpolate_pos_embed(trained.state_dict()), strict=True)
    with Image.open(image) as img:
        crop = vis.eval_transform(64, 1.0)(img.convert("RGB"))
    stream = stream_by_hooks(model, vis.normalize(crop)[None])
    for layer in (20, 23):
        norms = stream[layer][0, patch_slots("vim", 16, 1)].norm(dim=-1).numpy()
        row = vim_entry["layers"][layer]
        assert row["median"] == pytest.approx(float(np.median(norms)), rel=1e-5)
        assert row["max"] == pytest.approx(float(norms.max()), rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--model", "vim_tiny_patch16_224", "--checkpoint", "a.pth", "--checkpoint", "b.pth"],
     "one --checkpoint per --model"),
    (["--model", "vim_tiny_patch16_224", "--checkpoint", "missing.pth"],
     "checkpoint not found"),
    (["--model", "vim_tiny_patch16_224", "--image", "missing.jpg"], "image not found"),
    (["--model", "vim_tiny_patch16_224", "--input-size", "40"], "--input-size 40"),
    (["--model", "vim_tiny_patch16_224", "--input-size", "32", "--layer", "24"],
     "--layer 24 is out of range"),
])
def test_cli_user_errors_are_one_line(argv, message, tmp_path, capsys):
    assert vis.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Only the random-init warning may come before the one error line.
    assert all(line.startswith("warning:") for line in err[:-1])
    assert err[-1].startswith("visualize.py: error:") and message in err[-1]


def test_cli_checkpoint_of_another_model_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "mambar.pth"
    torch.save({"model": small("mambar_tiny_patch16_224").state_dict()}, ckpt)
    assert vis.main(["--model", "vim_tiny_patch16_224", "--checkpoint", str(ckpt),
                     "--input-size", "64", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit vim_tiny_patch16_224" in err[0]


def test_bad_model_name_exits_nonzero_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "visualize.py"), "--model", "vit_nope",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'vit_nope'" in lines[0]
    assert "Traceback" not in proc.stderr
