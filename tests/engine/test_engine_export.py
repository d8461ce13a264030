"""`fastssl export`: the backbone of a trained run (plain last.pt or sharded last.dcp) loads
with strict=True into the module its library builds (timm for ViTs, torchvision for ResNets)
and computes the same features as the run's own encoder."""


import pytest
import timm
import torch
import torchvision
from ssl_tiny import MultiViewLoader, tiny_method

from fastssl.cli import main
from fastssl.engine import Trainer, resolve_config
from fastssl.methods import METHODS


def _saved_run(method, out):
    trainer = Trainer(method, MultiViewLoader([16]), progress=False, log=lambda m: None)
    trainer.out.mkdir(parents=True, exist_ok=True)
    trainer.save()
    return trainer


def _features_equal(timm_or_tv_model, method, size):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = method.eval().encoder()(x)
        torch.testing.assert_close(timm_or_tv_model.eval()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])  # last.pt / last.dcp
def test_dino_teacher_backbone_loads_into_timm(tmp_path, parallel, capsys):
    method = tiny_method("dino", str(tmp_path / "run"), parallel=parallel)
    with torch.no_grad():  # a teacher unlike the student and unlike any fresh initialisation
        for p in method.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    _saved_run(method, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "backbone.pt")]) == 0
    printed = capsys.readouterr().out
    assert "timm.create_model('vit_tiny_patch16_224'" in printed
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16,
                              patch_size=4, depth=2)
    model.load_state_dict(state, strict=True)
    _features_equal(model, method, 16)
    assert torch.equal(state["blocks.0.attn.qkv.weight"], method.teacher.backbone.blocks[0].attn.qkv.weight)


def test_mae_encoder_loads_into_timm_without_its_decoder(tmp_path):
    method = tiny_method("mae", str(tmp_path / "run"))
    method.model.norm.weight.data.normal_()  # not the identity a fresh model starts with
    _saved_run(method, tmp_path / "run")
    assert main(["export", str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "b.pt")]) == 0
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    assert not any("decoder" in k or k == "mask_token" for k in state)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16,
                              patch_size=4, depth=2)
    model.load_state_dict(state, strict=True)
    _features_equal(model, method, 16)


def test_resnet_backbone_loads_into_torchvision(tmp_path):
    cls = METHODS["mocov2"]
    cfg = resolve_config(cls.config_class, None, dict(backbone="resnet18", image_size=16, eval_knn=False,
                                                      batch_size=8, queue_size=16, moco_dim=8,
                                                      out=str(tmp_path / "r")))
    torch.manual_seed(0)
    method = cls(cfg)
    _saved_run(method, tmp_path / "r")
    assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path / "r.pt")]) == 0
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the small stem of images <= 64 px
    model.maxpool = torch.nn.Identity()
    model.load_state_dict(torch.load(tmp_path / "r.pt", weights_only=True), strict=True)
    _features_equal(model, method, 16)


def test_export_of_a_directory_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "b.pt")]) == 2
    assert "checkpoint: expected a run directory holding last.dcp or last.pt" in capsys.readouterr().err




def test_vit_with_four_registers_trains_and_exports(tmp_path, capsys):
    """model.vit_reg_tokens=4: DINO trains steps with registers in student and teacher, and the
    exported teacher loads strictly into the timm model the export prints (registers, no position
    for the prefix tokens) with the same features."""
    method = tiny_method("dino", str(tmp_path / "run"), vit_reg_tokens=4, max_steps=2)
    assert method.teacher.backbone.reg_token.shape == (1, 4, 192)
    before = method.student.backbone.reg_token.detach().clone()
    summary = Trainer(method, MultiViewLoader([16, 16, 8, 8]), progress=False, log=lambda m: None).fit()
    assert summary["steps"] == 2
    assert not torch.equal(method.student.backbone.reg_token, before)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "backbone.pt")]) == 0
    assert "reg_tokens=4, no_embed_class=True" in capsys.readouterr().out
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16,
                              patch_size=4, depth=2, reg_tokens=4, no_embed_class=True)
    model.load_state_dict(torch.load(tmp_path / "backbone.pt", weights_only=True), strict=True)
    _features_equal(model, method, 16)
    with pytest.raises(ValueError, match="vit_reg_tokens: MAE's ViT has no register tokens"):
        tiny_method("mae", str(tmp_path / "mae"), vit_reg_tokens=4)
