import torch

from fastssl import cli
from fastssl.engine import resolve_config
from fastssl.method import StepContext
from fastssl.methods import METHODS


def test_demo_recipe_builds_and_its_encoder_outputs_the_3x3_pooled_last_stage():
    method_class = METHODS[cli.DEMO_METHOD]
    cfg = resolve_config(method_class.config_class, None, {"out": "unused"}, preset=cli.demo_preset())
    torch.manual_seed(0)
    method = method_class(cfg)
    encoder = method.encoder().eval()
    x = torch.randn(4, 3, cfg.eval_side, cfg.eval_side)  # what kNN sees: whole 28-px images
    with torch.no_grad():
        feats = encoder(x)
        last = encoder.stages(encoder.stem(x))  # [4, 64, 7, 7] at 28 px
    assert last.shape == (4, 64, 7, 7)
    # what kNN sees: each channel averaged over a 3x3 grid of overlapping 3x3 cells (rows/cols
    # [0, 3), [2, 5), [4, 7): floor(i * 7 / 3) .. ceil((i + 1) * 7 / 3))
    assert feats.shape == (4, 64 * 9)
    grid = feats.view(4, 64, 3, 3)
    torch.testing.assert_close(grid[:, :, 0, 0], last[:, :, :3, :3].mean(dim=(2, 3)))
    torch.testing.assert_close(grid[:, :, 1, 2], last[:, :, 2:5, 4:7].mean(dim=(2, 3)))
    method.train()
    ctx = StepContext(step=0, epoch=0, steps_per_epoch=1, total_steps=1, lr=0.0, weight_decay=0.0)
    side = cfg.data.image_size  # 20-px training crops
    views = [torch.randn(4, 3, side, side) for _ in range(2)]
    loss = method({"views": views}, ctx)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
