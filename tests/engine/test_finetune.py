"""`fastssl finetune`: a pre-trained run's backbone with a new head at another resolution.

Mechanics at a tiny size: the ViT's resampled position embedding computes what timm's own
on-the-fly interpolation computes, layer-wise decay groups follow BEiT's formula, a resumed
run ends bit-exactly where an uninterrupted one does, the head follows the data's classes
(transfer), and bad input is one line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from ssl_tiny import MultiViewLoader, tiny_method

from fastssl.cli import main
from fastssl.engine import Trainer, build_optimizer, resolve_config
from fastssl.engine.export import backbone_state_dict
from fastssl.finetune import build_network, finetune, finetune_config
from fastssl.methods import METHODS
from fastssl.methods.finetune import Finetune
from fastssl.runs import load_trained_method

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
FAST = dict(batch_size=8, epochs=2, loader="torchvision", warmup_epochs=0.5, num_threads=1, log_every=1)


def _folder(root, classes, train=8, val=4):
    rng = np.random.default_rng(len(classes))
    for split, n in (("train", train), ("val", val)):
        for c, color in enumerate(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.array(color)[None, None] + rng.normal(0, 40, (20, 20, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return str(root)


def _saved(method):
    trainer = Trainer(method, MultiViewLoader([16]), progress=False, log=lambda m: None)
    trainer.out.mkdir(parents=True, exist_ok=True)
    trainer.save()
    return trainer.out


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """A mocov2 resnet8 run at 16 px, its weights moved off any fresh initialisation."""
    root = tmp_path_factory.mktemp("pre")
    cls = METHODS["mocov2"]
    cfg = resolve_config(cls.config_class, None, dict(backbone="resnet8", image_size=16, eval_knn=False,
                                                      batch_size=8, queue_size=16, moco_dim=8,
                                                      out=str(root / "run")))
    torch.manual_seed(0)
    method = cls(cfg)
    with torch.no_grad():
        for p in method.encoder().parameters():
            p.add_(0.05 * torch.randn_like(p))
    return _saved(method)


@pytest.fixture(scope="module")
def data3(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("d3"), COLORS[:3])


def test_vit_position_embedding_resampled_as_timm_interpolates(tmp_path):
    method = tiny_method("dino", str(tmp_path / "run"))
    with torch.no_grad():
        method.teacher.backbone.pos_embed.normal_()  # a grid that is not smooth
    state = backbone_state_dict(method)
    backbone, _, vit = build_network(method.cfg, 24, state=state)
    assert vit and backbone.pos_embed.shape == (1, 1 + 6 * 6, 192)
    assert torch.equal(backbone.pos_embed[:, :1], state["pos_embed"][:, :1])  # the class token's row kept
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():  # the 16-px model interpolates its 4x4 grid on the fly (timm's dynamic_img_size)
        expected = method.eval().encoder()(x)
        torch.testing.assert_close(backbone.eval()(x), expected, rtol=1e-5, atol=1e-5)


def test_vit_with_registers_fine_tunes_from_its_run(tmp_path):
    """vit_reg_tokens=4: the fine-tuning network has the run's registers, and its position table
    (patches only) is resampled to the new grid."""
    method = tiny_method("dino", str(tmp_path / "run"), vit_reg_tokens=4)
    state = backbone_state_dict(method)
    backbone, _, _ = build_network(method.cfg, 24, state=state)
    assert backbone.pos_embed.shape == (1, 6 * 6, 192)
    assert torch.equal(backbone.reg_token, state["reg_token"])
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), method.eval().encoder()(x), rtol=1e-5, atol=1e-5)


def _groups_by_name(method):
    return {name: g["lr_scale"] for g in method.parameter_groups() for name in g["names"]}


def test_layer_decay_groups_follow_the_formula_vit(tmp_path):
    pre = tiny_method("dino", str(tmp_path / "run")).cfg
    cfg = finetune_config(pre, "r", "d", 16, 4, dict(layer_decay=0.5, out=str(tmp_path / "ft")))
    backbone, dim, vit = build_network(pre, 16, state=None)
    scales = _groups_by_name(Finetune(cfg, backbone, dim, vit=vit))
    # BEiT: depth 2 -> embeddings 0, blocks 1..2, the rest 3; scale = decay ** (3 - layer)
    assert scales["0.pos_embed"] == scales["0.patch_embed.proj.weight"] == 0.5 ** 3
    assert scales["0.blocks.0.attn.qkv.weight"] == 0.5 ** 2
    assert scales["0.blocks.1.mlp.fc2.bias"] == 0.5
    assert scales["0.norm.weight"] == scales["1.weight"] == 1.0


def test_layer_decay_per_stage_and_the_optimizer_lrs(tmp_path, resnet_run):
    cfg_pre = load_trained_method(resnet_run)[0].cfg
    cfg = finetune_config(cfg_pre, "r", "d", 20, 3, dict(layer_decay=0.8, batch_size=8, epochs=1,
                                                         warmup_epochs=0.0, out=str(tmp_path / "ft")))
    backbone, dim, vit = build_network(cfg_pre, 20, state=None)
    method = Finetune(cfg, backbone, dim, vit=vit)
    scales = _groups_by_name(method)
    # resnet8: stem 0, stages 1..3, head 4
    assert scales["0.stem.0.weight"] == pytest.approx(0.8 ** 4)
    assert scales["0.stages.0.0.conv1.weight"] == pytest.approx(0.8 ** 3)
    assert scales["0.stages.2.0.conv1.weight"] == pytest.approx(0.8)
    assert scales["1.weight"] == 1.0
    optimizer = build_optimizer(cfg, method.parameter_groups())
    assert type(optimizer).__name__ == "AdamW"
    lr = cfg.optim.base_lr * 8 / 256
    for group in optimizer.param_groups:  # what the Trainer sets each step
        group["lr"] = lr * group["lr_scale"]
    by_name = {n: g["lr"] for g in optimizer.param_groups for n in g["names"]}
    assert by_name["0.stem.0.weight"] == pytest.approx(lr * 0.8 ** 4)
    no_decay = [g for g in optimizer.param_groups if "0.stem.1.weight" in g["names"]][0]
    assert no_decay["weight_decay"] == 0.0 and not no_decay["apply_wd"]


def _weights(out):
    return torch.load(out / "last.pt", weights_only=False)["model"]


def test_resume_is_bit_exact_with_mixup_and_ema(tmp_path, resnet_run, data3):
    keys = FAST | dict(mixup_alpha=0.8, cutmix_alpha=1.0, ema_decay=0.9, checkpoint_every=1)
    whole = finetune(resnet_run, data3, 20, keys | dict(out=str(tmp_path / "a")), progress=False)
    finetune(resnet_run, data3, 20, keys | dict(out=str(tmp_path / "b"), max_steps=4), progress=False)
    resumed = finetune(resnet_run, data3, 20, keys | dict(out=str(tmp_path / "b")), resume="auto",
                       progress=False)
    assert resumed["steps"] == whole["steps"] == 6
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["top1"] == whole["top1"]


def test_transfer_head_follows_the_classes_and_summary(tmp_path, resnet_run, data3, capsys):
    data5 = _folder(tmp_path / "d5", COLORS)
    out = tmp_path / "ft5"
    argv = ["finetune", str(resnet_run), "--data", data5, "--size", "24", "--out", str(out), "epochs=1",
            *[f"{k}={v}" for k, v in FAST.items() if k != "epochs"]]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-5" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_classes"] == 5 and summary["size"] == 24 and summary["pretrain_size"] == 16
    assert {"top1", "top5", "confused_pairs"} <= summary.keys()
    assert _weights(out)["net.1.weight"].shape[0] == 5


@pytest.mark.parametrize("argv, words", [
    (["finetune", "{tmp}/nothing", "--size", "20"], "expected an existing file or run directory"),
    (["finetune", "{run}", "--size", "0"], "--size"),
    (["finetune", "{run}", "--size", "20", "backbone=resnet18"], "set by the pre-trained run"),
    (["finetune", "{run}", "--size", "20", "layer_decay=2"], "layer_decay"),
])
def test_bad_input_is_one_line(tmp_path, resnet_run, data3, capsys, argv, words):
    argv = [a.format(tmp=tmp_path, run=resnet_run) for a in argv] + ["--data", data3]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_vit_size_not_a_patch_multiple_is_refused(tmp_path, data3, capsys):
    run = _saved(tiny_method("dino", str(tmp_path / "run")))
    assert main(["finetune", str(run), "--data", data3, "--size", "18"]) == 2
    err = capsys.readouterr().err.strip()
    assert "multiple of 4" in err and len(err.splitlines()) == 1


def test_eval_reports_finetuning_beside_knn_and_linear(resnet_run, data3, capsys):
    argv = ["eval", "--checkpoint", str(resnet_run), "--data", data3, "--finetune", "--size", "20",
            "epochs=1",
            *[f"{k}={v}" for k, v in FAST.items() if k != "epochs"]]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "kNN top-1" in printed and "linear probe top-1" in printed and "finetune mocov2" in printed
    assert json.loads((resnet_run / "finetune" / "summary.json").read_text())["steps"] == 3
