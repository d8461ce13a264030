"""Backbones: shapes, the small-image stem, ViT sizes/patches, no downloads, clear errors."""

import pytest
import torch
from torch import nn

from fastssl.models import build_backbone
from fastssl.models.backbones import VIT_SIZES, parse_vit_name


def test_resnet_small_stem_keeps_resolution():
    model, dim = build_backbone("resnet18", 32)
    assert dim == 512
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity) and isinstance(model.fc, nn.Identity)
    seen = []
    model.layer4.register_forward_hook(lambda m, i, o: seen.append(o.shape) and None)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 512)
    # CIFAR stem: 32 -> 32 (stem) -> 32, 16, 8, 4 over the four stages
    assert seen[0][-2:] == (4, 4)


def test_resnet_imagenet_stem_above_64px_and_width_of_resnet50():
    model, dim = build_backbone("resnet50", 224)
    assert dim == 2048
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    small, _ = build_backbone("resnet50", 224, small_stem=True)
    assert small.conv1.kernel_size == (3, 3)


@pytest.mark.parametrize("name,dim,heads,patch", [("vit_tiny_patch4", 192, 3, 4), ("vit_small", 384, 6, 16),
                                                  ("vit_base_patch8", 768, 12, 8)])
def test_vit_sizes_and_patches(name, dim, heads, patch):
    model, feature_dim = build_backbone(name, 32, depth=1)
    assert feature_dim == dim
    assert model.patch_embed.proj.kernel_size == (patch, patch)
    assert model.blocks[0].attn.num_heads == heads and len(model.blocks) == 1
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_vit_default_depth_is_12_and_takes_smaller_crops():
    model, _ = build_backbone("vit_tiny_patch4", 32)
    assert len(model.blocks) == 12
    small, _ = build_backbone("vit_tiny_patch4", 32, depth=1)
    # local crops of multi-crop training: 16x16 through a model built for 32x32
    assert small(torch.randn(3, 3, 16, 16)).shape == (3, 192)


def test_parse_vit_name():
    assert parse_vit_name("vit_small_patch16") == ("small", 16)
    assert parse_vit_name("vit_tiny") == ("tiny", None)
    assert parse_vit_name("vit_huge_patch14") == ("huge", 14)  # the memory plan's ViT-L / ViT-H
    assert parse_vit_name("vit_giant_patch14") == ("giant", 14)  # DINOv2's ViT-g/14
    with pytest.raises(ValueError, match="vit_gigantic"):
        parse_vit_name("vit_gigantic")


def test_bad_backbone_arguments():
    with pytest.raises(ValueError, match="backbone must be one of .*'resnet9'"):
        build_backbone("resnet9", 32)
    with pytest.raises(TypeError, match="backbone name must be a str, got int"):
        build_backbone(18, 32)
    with pytest.raises(ValueError, match="image_size must be a positive int, got 0"):
        build_backbone("resnet18", 0)
    with pytest.raises(ValueError, match="multiple of patch_size=16, got 40"):
        build_backbone("vit_tiny", 40)


def test_cifar_resnets():
    model, dim = build_backbone("resnet20", 32)
    assert dim == 64
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 19  # 6n + 1 convolutions (+ the classifier in the paper) with n = 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    wide, dim = build_backbone("resnet8", 28, width=2)
    assert dim == 128 and wide(torch.randn(2, 3, 28, 28)).shape == (2, 128)


def test_cifar_resnet_pool_grid_is_the_last_stage_averaged_over_overlapping_bins():
    torch.manual_seed(0)
    model, dim = build_backbone("resnet8_pool2", 28)
    assert dim == 4 * 64
    x = torch.randn(3, 3, 28, 28)
    model.eval()
    out = model(x)
    h = model.stages(model.stem(x))  # [3, 64, 7, 7]
    # adaptive pooling of 7 into 2 bins: rows/cols [0, 4) and [3, 7) (floor(i*7/2) .. ceil((i+1)*7/2))
    bins = [(0, 4), (3, 7)]
    ref = torch.stack([h[:, :, r0:r1, c0:c1].mean(dim=(2, 3)) for r0, r1 in bins for c0, c1 in bins], dim=2)
    torch.testing.assert_close(out, ref.flatten(1))  # channel-major: channel c's 4 cells are adjacent
    gap, gap_dim = build_backbone("resnet8", 28)
    gap.load_state_dict(model.state_dict())
    gap.eval()
    assert gap_dim == 64
    torch.testing.assert_close(gap(x), h.mean(dim=(2, 3)))
    wide, dim = build_backbone("resnet14_pool3", 32, width=2)
    assert dim == 128 * 9 and wide(torch.randn(2, 3, 32, 32)).shape == (2, 128 * 9)


def test_cifar_resnet_pool_errors():
    with pytest.raises(ValueError, match="pool must be a positive int, got 0"):
        build_backbone("resnet8_pool0", 28)
    with pytest.raises(ValueError, match="resnet8_poolx"):
        build_backbone("resnet8_poolx", 28)
    model, _ = build_backbone("resnet8_pool4", 8)  # 8 px -> a 2x2 last map, too small for a 4x4 grid
    with pytest.raises(ValueError, match=r"pool=4 needs a last-stage map of at least 4x4, got \(2, 2\)"):
        model(torch.randn(1, 3, 8, 8))


def test_vit_with_four_registers_trains_a_step_and_its_state_loads_into_timm():
    """Registers (Darcet et al. 2024): 4 learned tokens after the class token, no position
    embedding (the patches' only); the class token still is the output; the state dict loads
    strictly into the timm model the export prints."""
    import timm

    from fastssl.viz.figures import cls_attention

    model, dim = build_backbone("vit_tiny_patch8", 32, depth=2, reg_tokens=4)
    assert model.num_prefix_tokens == 5 and model.reg_token.shape == (1, 4, dim)
    assert model.pos_embed.shape == (1, 16, dim)  # 4 x 4 patches, no prefix rows
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 1 + 4 + 16, dim)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.reg_token.detach().clone()
    images = torch.randn(4, 3, 32, 32)
    for crop in (images, images[..., :16, :16]):  # a local crop: positions interpolated, registers as is
        loss = model(crop).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        assert torch.isfinite(model.reg_token.grad).all() and model.reg_token.grad.abs().sum() > 0
        optimizer.step()
    assert not torch.equal(model.reg_token, before)
    assert cls_attention(model, images).shape == (4, 3, 4, 4)  # patches only, registers left out
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                                   patch_size=8, depth=2, reg_tokens=4, no_embed_class=True)
    timm_model.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(timm_model.eval()(images), model.eval()(images))
    with pytest.raises(ValueError, match="reg_tokens must be"):
        build_backbone("vit_tiny", 32, reg_tokens=-1)



def test_vit_giant_is_dinov2s_swiglu_giant():
    """DINOv2's vit_giant2 with ffn_layer=swiglufused: embed 1536, 40 blocks of 24 heads, the fused
    SwiGLU of hidden width (int(4 D * 2 / 3) + 7) // 8 * 8 per half (one linear to both halves,
    silu(first) * second, back to D), layer scale on both branches."""
    with torch.device("meta"):
        model, dim = build_backbone("vit_giant_patch14", 224, depth=1)
    block, hidden = model.blocks[0], (int(4 * 1536 * 2 / 3) + 7) // 8 * 8
    assert dim == 1536 and VIT_SIZES["giant"] == (1536, 40, 24) and block.attn.num_heads == 24
    assert hidden == 4096 and block.mlp.fc1.weight.shape == (2 * hidden, 1536)
    assert block.mlp.fc2.weight.shape == (1536, hidden)
    assert block.ls1.gamma.shape == block.ls2.gamma.shape == (1536,)
    mlp = block.mlp.to_empty(device="cpu")
    for p in mlp.parameters():
        nn.init.normal_(p, std=0.02)
    h = torch.randn(3, 1536)
    first, second = mlp.fc1(h).chunk(2, dim=-1)
    torch.testing.assert_close(mlp(h), mlp.fc2(nn.functional.silu(first) * second))


def test_vit_giant_state_is_timms_dinov2_giant():
    """`fastssl export`'s loader for a giant (timm's vit_giant_patch14_dinov2) has its keys and shapes."""
    import timm

    from fastssl.engine.export import TIMM_NAMES

    with torch.device("meta"):
        ours, _ = build_backbone("vit_giant_patch14", 28, depth=1)
        theirs = timm.create_model(TIMM_NAMES["giant"], pretrained=False, num_classes=0, img_size=28,
                                   patch_size=14, depth=1)
    def shapes(m):
        return {k: v.shape for k, v in m.state_dict().items()}

    assert shapes(ours) == shapes(theirs)
