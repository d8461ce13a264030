"""Tiny configurations, batches and an engine-like step for the method tests."""

from __future__ import annotations

import copy

import pytest
import torch

import fastssl.ops
from fastssl.engine import resolve_config
from fastssl.method import Method, StepContext
from fastssl.methods import METHODS

TINY = {
    "mocov2": dict(backbone="resnet18", image_size=8, moco_dim=16, mlp_hidden_dim=32, queue_size=64),
    "mocov3": dict(backbone="resnet18", image_size=8, moco_dim=16, mlp_hidden_dim=32),
    "rotnet": dict(backbone="resnet18", image_size=8),
    "simclr": dict(backbone="resnet18", image_size=8, proj_dim=16, proj_hidden_dim=32),
    "dino": dict(backbone="vit_tiny_patch4", image_size=16, local_crop_size=8, n_local_crops=2, vit_depth=1,
                 out_dim=32, head_hidden_dim=32, bottleneck_dim=16, epochs=2, drop_path_rate=0.0),
    "mae": dict(backbone="vit_tiny_patch4", image_size=16, vit_depth=1, decoder_dim=32, decoder_depth=1,
                decoder_heads=4),
    "clip": dict(backbone="vit_tiny_patch4", image_size=16, vit_depth=1, embed_dim=16, context_length=8,
                 text_width=16, text_layers=1, text_heads=2),
    "dinov2": dict(backbone="vit_tiny_patch4", image_size=16, local_crop_size=8, n_local_crops=2, vit_depth=1,
                   out_dim=32, head_hidden_dim=32, bottleneck_dim=16, epochs=2, drop_path_rate=0.0,
                   mask_probability=1.0, freeze_last_layer_epochs=0, warmup_teacher_temp_epochs=0),
    "instdisc": dict(backbone="resnet8", image_size=8, feature_dim=16, nce_negatives=32, temperature=0.5,
                     loss="softmax"),
}
TINY["siglip"] = TINY["clip"]
TINY["ibot"] = TINY["dinov2"]
TINY["weak"] = dict(backbone="resnet18", image_size=8, num_classes=12)
TINY["context"] = dict(backbone="resnet8", image_size=36, gap=4, jitter=2, head_hidden_dim=16)
TINY["colorization"] = dict(backbone="resnet8", image_size=16)
# the image-text methods' captions, by dataset index (make_batch's indices)
CAPTIONS = [f"a photo of thing {k % 4}" for k in range(16)]
INSTDISC_IMAGES = 40  # the memory bank's rows
# the fused ops each method calls (all must exist for the fused-vs-reference comparison)
OPS = {
    "mocov2": ("info_nce",), "mocov3": ("info_nce",), "rotnet": (), "simclr": ("info_nce",),
    "dino": ("dino_loss",), "mae": ("random_masking", "unshuffle_tokens", "mae_loss", "patchify"),
    "clip": ("info_nce",), "siglip": ("siglip_loss",),
    "dinov2": ("dino_loss", "ibot_patch_loss"), "ibot": ("dino_loss", "ibot_patch_loss"),
    "instdisc": ("info_nce",), "weak": ("soft_cross_entropy",), "context": (), "colorization": (),
}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads mostly spin (about 20x the CPU
    time for these tiny models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def require_ops(name: str) -> None:
    missing = [op for op in OPS[name] if not hasattr(fastssl.ops, op)]
    if missing:
        pytest.skip(f"fastssl.ops does not export {missing} yet (the op module has not landed)")


def build(name: str, seed: int = 0, **overrides) -> Method:
    cls = METHODS[name]
    torch.manual_seed(seed)
    cfg = resolve_config(cls.config_class, overrides={**TINY[name], **overrides})
    method = cls(cfg, captions=CAPTIONS) if name in ("clip", "siglip") else cls(cfg)
    if name == "instdisc":  # its memory bank has a row per training image
        from fastssl.data import ArraySource

        method.bind_data(ArraySource(torch.zeros(INSTDISC_IMAGES, 8, 8, 3, dtype=torch.uint8)))
    return method


def make_batch(method: Method, batch_size: int = 8, seed: int = 0) -> dict:
    """Views of random images in the recipe's count, sizes and order: view k of sample i is
    image i (flipped on odd k, resized to the view's size) plus a little noise, so the views of
    one sample share content as augmentations do."""
    g = torch.Generator().manual_seed(seed)
    cfg = method.cfg
    x = torch.randn(batch_size, 3, cfg.data.image_size, cfg.data.image_size, generator=g)
    if method.name == "rotnet":  # one image in its 4 quarter turns: view k = rot90 k times
        return {"views": [torch.rot90(x, k, dims=(2, 3)) for k in range(4)],
                "label": torch.zeros(batch_size, dtype=torch.long), "index": torch.arange(batch_size)}
    size = cfg.data.image_size
    if method.name in ("dino", "dinov2", "ibot", "simclr"):
        sizes = [size] * 2 + [cfg.method.local_crop_size] * cfg.method.n_local_crops
    else:
        sizes = {"mocov2": [size] * 2, "mocov3": [size] * 2, "mae": [size],
                 "clip": [size], "siglip": [size], "instdisc": [size], "weak": [size], "context": [size],
                 "colorization": [size]}[method.name]
    views = []
    for k, size in enumerate(sizes):
        v = x.flip(-1) if k % 2 else x
        v = torch.nn.functional.interpolate(v, size=size, mode="area") if size != cfg.data.image_size else v
        views.append(v + 0.1 * torch.randn(v.shape, generator=g))
    label = torch.zeros(batch_size, dtype=torch.long)
    if method.name == "weak":  # its targets: three classes, not one
        label = torch.arange(batch_size) % 3
    batch = {"views": views, "label": label, "index": torch.arange(batch_size)}
    if method.name == "instdisc":  # bank rows of distinct images
        batch["index"] = torch.randperm(INSTDISC_IMAGES, generator=g)[:batch_size]
    if method.name in ("dinov2", "ibot"):  # the loader's block masks of the global crops
        batch |= method.masking().for_batch(batch_size, epoch=0, shard=0, batch=seed)
    return batch


def context(step: int = 0, epoch: int = 0, total_steps: int = 100, **schedules) -> StepContext:
    return StepContext(step=step, epoch=epoch, steps_per_epoch=10, total_steps=total_steps, lr=0.0,
                       weight_decay=0.0, schedules=schedules)


def optimizer(method: Method, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def train_step(method: Method, opt: torch.optim.Optimizer, batch: dict, ctx: StepContext) -> torch.Tensor:
    """What the engine does per step (fastssl/method.py)."""
    opt.zero_grad(set_to_none=True)
    out = method(batch, ctx)
    out["loss"].backward()
    method.before_optimizer_step(ctx)
    opt.step()
    method.after_optimizer_step(ctx)
    return out["loss"].detach()


def loss_and_grads(method: Method, batch: dict, backend: str, monkeypatch, ctx=None, seed: int = 0):
    """Loss and parameter gradients with every fused op forced to `backend`."""
    method = copy.deepcopy(method)
    with monkeypatch.context() as mp:
        mp.setattr(type(method), "backend", property(lambda self: backend))
        for module in method.modules():  # its criterion, MAE's model: modules with a backend of their own
            if module is not method and hasattr(module, "backend"):
                mp.setattr(module, "backend", backend)
        torch.manual_seed(seed)
        loss = method(batch, ctx or context())["loss"]
        loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    return loss.detach(), grads
