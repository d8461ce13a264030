"""Tiny ViT configurations of DINO, DINOv2, MAE, MoCo v3, the weak method and CLIP / SigLIP, a multi-crop
loader and state helpers for the FSDP, accumulation, sharded-checkpoint and export tests: a step runs in
a fraction of a second."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from fastssl.engine import resolve_config
from fastssl.methods import METHODS
from fastssl.methods.mae import MAE
from fastssl.ops.ibot_patch_loss import masks_weight_from_masks

# views of each sample: DINO(v2) 2 global + 2 local crops; MoCo v3 two views; one image otherwise
SIZES = {"dino": [16, 16, 8, 8], "dinov2": [16, 16, 8, 8], "mae": [16], "mocov3": [16, 16], "weak": [16],
         "clip": [16], "siglip": [16]}
# a caption for each of MultiViewLoader's 32 samples (CLIP / SigLIP), one of 4 texts per label
CAPTIONS = [f"a picture of thing {k % 4}" for k in range(32)]


def tiny_method(name: str, out: str, **overrides):
    """DINO, DINOv2, MAE, MoCo v3 or weak on a 2-block ViT-Tiny with 4 px patches at 16 px (8 px
    local crops). DINOv2 without KoLeo, which compares each rank's own rows (DINOv2's KoLeoLoss),
    so ranks holding halves of a batch cannot give one process's value."""
    common = dict(backbone="vit_tiny_patch4", image_size=16, vit_depth=2, batch_size=8, epochs=2,
                  lr_batch_divisor=8, warmup_epochs=0.0, out=out, eval_knn=False, log_every=1)
    if name in ("dino", "dinov2"):
        common |= dict(local_crop_size=8, n_local_crops=2, out_dim=64, head_hidden_dim=32, bottleneck_dim=16,
                       drop_path_rate=0.0, freeze_last_layer_epochs=0, base_lr=0.01, teacher_momentum=0.9)
        if name == "dinov2":
            common |= dict(koleo_loss_weight=0.0, warmup_teacher_temp_epochs=0)
    elif name == "mae":
        common |= dict(decoder_dim=32, decoder_depth=1, decoder_heads=2, base_lr=0.01)
    elif name == "mocov3":
        common |= dict(mlp_hidden_dim=32, moco_dim=16, optimizer="adamw", base_lr=0.01, sync_bn=False)
    elif name in ("clip", "siglip"):
        common |= dict(embed_dim=16, context_length=8, text_width=16, text_layers=1, text_heads=2,
                       base_lr=0.01)
    else:
        common |= dict(num_classes=4, base_lr=0.01)
    cls = MAEWithNoise if name == "mae" else METHODS[name]
    cfg = resolve_config(cls.config_class, None, common | overrides)
    torch.manual_seed(0)
    return cls(cfg, captions=CAPTIONS) if name in ("clip", "siglip") else cls(cfg)


class MAEWithNoise(MAE):
    """MAE whose masking noise comes with the batch (the official `noise` argument), so that
    ranks holding halves of a batch mask exactly as one process holding all of it does."""

    def forward(self, batch, ctx):
        loss, _, _ = self.model(batch["views"][0], self.cfg.method.mask_ratio, noise=batch["noise"])
        return {"loss": loss}


class MultiViewLoader:
    """`n` fixed samples, `batch_size` per global batch in a per-epoch shuffled order; each view
    of a sample is a fixed random image of its size; rank r of W gets rows [r*b/W, (r+1)*b/W) of
    each global batch. `noise` [B, 16] rides along for MAE's masking, `label` (4 classes) for weak;
    with `masks`, the block masks' batch keys for DINOv2's 2 global crops of 16 tokens, each crop's
    4 masked tokens fixed per sample (equal counts: the ranks' masked-token means average to the
    whole batch's, as the teacher center's update needs to equal one process's)."""

    def __init__(self, sizes: list[int], n: int = 32, batch_size: int = 8, shard_id: int = 0,
                 num_shards: int = 1, masks: bool = False):
        g = torch.Generator().manual_seed(1234)
        self.views = [torch.randn(n, 3, s, s, generator=g) for s in sizes]
        self.noise = torch.rand(n, 16, generator=g)
        self.label = torch.randint(0, 4, (n,), generator=g)
        self.masks = None
        if masks:
            order = torch.rand(n, 2, 16, generator=torch.Generator().manual_seed(99)).argsort(-1)
            self.masks = order < 4  # [n, 2 global crops, 16 tokens]
        self.batch_size, self.shard_id, self.num_shards, self.epoch = batch_size, shard_id, num_shards, 0

    def __len__(self) -> int:
        return len(self.noise) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        perm = torch.randperm(len(self.noise), generator=torch.Generator().manual_seed(self.epoch))
        per_rank = self.batch_size // self.num_shards
        for i in range(len(self)):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            idx = idx[self.shard_id * per_rank:(self.shard_id + 1) * per_rank]
            batch = {"views": [v[idx] for v in self.views], "noise": self.noise[idx],
                     "label": self.label[idx], "index": idx}
            if self.masks is not None:
                masks = self.masks[idx].transpose(0, 1).flatten(0, 1)  # crop-major, as the views
                indices = masks.flatten().nonzero().flatten()
                batch |= {"masks": masks, "mask_indices": indices, "n_masked_patches": len(indices),
                          "masks_weight": masks_weight_from_masks(masks, indices)}
            yield batch


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with sharded (DTensor) entries gathered: a collective on every rank."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.state_dict().items()}


def record_losses(method) -> list[float]:
    losses: list[float] = []
    method.register_forward_hook(lambda m, args, output: losses.append(output["loss"].item()))
    return losses
