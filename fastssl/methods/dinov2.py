"""DINOv2 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision").

The DINO method extended: a ViT student (drop-path, a learnable mask token put in place of the
masked global-crop patch embeddings) and its EMA teacher (unmasked). Loss = dino_loss_weight *
DINO class-token loss (every student crop against the 2 teacher global crops) + ibot_loss_weight *
iBOT patch loss (the student's masked patch tokens against the teacher's, through the patch head:
the DINO head itself or a separate one) + koleo_loss_weight * KoLeo on each global crop's student
class tokens. Teacher targets by centering or Sinkhorn-Knopp; teacher temperature warm-up through
schedules(); block masks drawn by the loader (fastssl.data.masking) for the global crops only;
layer-wise LR decay of the backbone as fastssl.methods.finetune numbers its layers.

DINOv3's Gram anchoring (Siméoni et al. 2025) as an option: with gram_teacher (the backbone of an
earlier checkpoint, as `fastssl export` writes it), a frozen copy of that backbone sees the unmasked
global crops and gram_loss_weight * fastssl.losses.gram_loss (DINOv3's Gram-anchoring setting: rows
L2-normalised, one Gram matrix per crop, negative similarities kept) pulls the Gram matrix of the
student's patch tokens towards the Gram teacher's. The Gram teacher sees the global crops at the
student's size (DINOv3 feeds it crops of twice the size and resizes its features).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from fastssl.config import MAX_EPOCHS, setting
from fastssl.losses.gram import gram_loss
from fastssl.method import StepContext, TrainConfig
from fastssl.methods import register
from fastssl.methods._common import backbone_from_config, check_views
from fastssl.methods.dino import CENTERINGS, DINO, N_GLOBAL, DINOConfig
from fastssl.methods.finetune import backbone_layers, layer_id
from fastssl.models import DINOHead
from fastssl.models.backbones import is_vit_name


@dataclass
class DINOv2Config(DINOConfig):
    name: ClassVar[str] = "dinov2"
    defaults: ClassVar[dict] = dict(DINOConfig.defaults, backbone="vit_small_patch14", drop_path_rate=0.1)
    teacher_centering: str = setting("sinkhorn_knopp", "how teacher outputs are centred", choices=CENTERINGS)
    teacher_temp: float = setting(0.07, "teacher temperature after warm-up", low=0, low_open=True, high=100)
    warmup_teacher_temp_epochs: int = setting(30, "epochs of the teacher temperature warm-up", low=0,
                                              high=MAX_EPOCHS)
    dino_loss_weight: float = setting(1.0, "weight of the DINO class-token loss", low=0, high=1e6)
    ibot_loss_weight: float = setting(1.0, "weight of the iBOT masked-patch loss", low=0, high=1e6)
    koleo_loss_weight: float = setting(0.1, "weight of the KoLeo regulariser", low=0, high=1e6)
    separate_patch_head: bool = setting(False, "a patch head of its own (else the DINO head)")
    mask_ratio_min: float = setting(0.1, "smallest masked fraction of a masked global crop", low=0, high=1)
    mask_ratio_max: float = setting(0.5, "largest masked fraction of a masked global crop", low=0, high=1)
    mask_probability: float = setting(0.5, "fraction of global crops masked", low=0, high=1)
    layer_decay: float = setting(0.9, "layer-wise LR decay of the backbone (1: off)", low=0, low_open=True,
                                 high=1)
    gram_teacher: str = setting("", "DINOv3 Gram anchoring: the frozen Gram teacher's backbone, a file "
                                "written by `fastssl export RUN --out FILE` from an earlier checkpoint "
                                "(empty: off)")
    gram_loss_weight: float = setting(2.0, "weight of the Gram anchoring loss (DINOv3's after its warm-up)",
                                      low=0, high=1e6)


class DINOv2Network(nn.Module):
    """ViT backbone + DINO head (+ patch head) + mask token: crops -> class-token logits, and the
    patch logits of the masked tokens of the global crops."""

    def __init__(self, backbone: nn.Module, feature_dim: int, head: nn.Module, patch_head: nn.Module | None):
        super().__init__()
        self.backbone, self.head, self.patch_head = backbone, head, patch_head
        self.mask_token = nn.Parameter(torch.zeros(1, feature_dim))

    def tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's normalised tokens [B, prefix + L, D]; masks bool [B, L] puts the mask
        token in place of those patch embeddings (timm's forward_features with that one step)."""
        vit = self.backbone
        x = vit.patch_embed(x)  # [B, h, w, D]: the ViTs are built with dynamic_img_size
        if masks is not None:
            x = torch.where(masks.view(*x.shape[:3], 1), self.mask_token.to(x.dtype), x)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        return vit.norm(vit.blocks(x))

    def forward(self, crops: list[torch.Tensor], masks: torch.Tensor | None = None,
                mask_indices: torch.Tensor | None = None):
        """(class-token logits [n_crops * B, K] crop-major, global class tokens [2B, D], masked
        patch logits [n, K] or None when mask_indices is None, global patch tokens [2B, L, D])."""
        global_tokens = self.tokens(torch.cat(crops[:N_GLOBAL]), masks)
        cls = [global_tokens[:, 0]]
        if len(crops) > N_GLOBAL:
            cls.append(self.tokens(torch.cat(crops[N_GLOBAL:]))[:, 0])
        logits = self.head(torch.cat(cls))
        patch_tokens = global_tokens[:, self.backbone.num_prefix_tokens:]
        if mask_indices is None:
            return logits, cls[0], None, patch_tokens
        patch_logits = (self.patch_head or self.head)(patch_tokens.flatten(0, 1)[mask_indices])
        return logits, cls[0], patch_logits, patch_tokens


class GramTeacher(nn.Module):
    """DINOv3's Gram teacher: a frozen backbone; forward gives its normalised patch tokens [B, L, D]
    (a module call, so FSDP gathers its sharded parameters as it does the teacher's)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.backbone
        return vit.forward_features(x)[:, vit.num_prefix_tokens:]


def load_gram_teacher(cfg: TrainConfig) -> GramTeacher:
    """The Gram teacher: the run's backbone (no stochastic depth) with the weights of the file
    cfg.method.gram_teacher (a {name: tensor} state dict, as `fastssl export` writes)."""
    path = Path(cfg.method.gram_teacher)
    if not path.is_file():
        hint = f"; for a run folder, write its backbone first: fastssl export {path} --out FILE"
        raise ValueError("gram_teacher: expected a backbone file written by `fastssl export RUN --out "
                         f"FILE`, got {str(path)!r}{hint if path.is_dir() else ''}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load's errors on a foreign or damaged file vary
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ValueError(f"gram_teacher {str(path)!r}: not a backbone file written by `fastssl export` "
                         f"({first})") from e
    backbone, _ = backbone_from_config(cfg, drop_path_rate=0.0)
    try:
        backbone.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:  # wrong keys or shapes; not a dict of tensors
        first = str(e).strip().splitlines()[0][:200]
        model = cfg.model
        raise ValueError(f"gram_teacher {str(path)!r}: its weights do not fit this run's {model.backbone} "
                         f"(vit_depth={model.vit_depth}, vit_reg_tokens={model.vit_reg_tokens}): "
                         f"{first}") from e
    return GramTeacher(backbone)


@register
class DINOv2(DINO, config=DINOv2Config):
    # Fashion-MNIST at 28 px in under 10 minutes on a 2-core CPU: a 2-block ViT-Tiny with 7 px patches
    # (a 4 x 4 grid), 2 global crops of 28 px and 2 local crops of 14 px, 512 prototypes, 2 epochs of
    # batch 128 (a step costs ~0.8 CPU-seconds on one thread; the 4-block, 4-local-crop, 1,024-prototype
    # network took 1.9)
    presets = {"fashion-mnist": dict(
        backbone="vit_tiny_patch7", vit_depth=2, image_size=28, local_crop_size=14, n_local_crops=2,
        batch_size=128, epochs=2, warmup_epochs=0.2, base_lr=0.001, out_dim=512, head_hidden_dim=256,
        bottleneck_dim=128, drop_path_rate=0.0, teacher_momentum=0.99, warmup_teacher_temp=0.04,
        teacher_temp=0.04, warmup_teacher_temp_epochs=0, layer_decay=1.0,
    )}

    def __init__(self, cfg: TrainConfig):
        if not is_vit_name(cfg.model.backbone):
            raise ValueError(f"backbone: dinov2 needs a ViT (vit_<size>_patch<P>), got "
                             f"{cfg.model.backbone!r}")
        m = cfg.method
        if m.mask_ratio_min > m.mask_ratio_max:
            raise ValueError(f"mask_ratio_min must be <= mask_ratio_max, got {m.mask_ratio_min} > "
                             f"{m.mask_ratio_max}")
        super().__init__(cfg)
        from fastssl.losses import KoLeoLoss, iBOTPatchLoss

        self.ibot = iBOTPatchLoss(m.out_dim, m.student_temp, m.center_momentum, backend=self.backend)
        self.koleo = KoLeoLoss()
        self.num_layers = backbone_layers(self.student.backbone, vit=True)
        # a submodule: checkpoints carry it, FSDP shards it as it shards the teacher
        self.gram_teacher = load_gram_teacher(cfg) if m.gram_teacher else None

    @staticmethod
    def _network(cfg: TrainConfig, drop_path_rate: float) -> DINOv2Network:
        backbone, feature_dim = backbone_from_config(cfg, drop_path_rate=drop_path_rate)
        m = cfg.method

        def head():
            return DINOHead(feature_dim, m.out_dim, m.head_hidden_dim, m.bottleneck_dim,
                            use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer)

        return DINOv2Network(backbone, feature_dim, head(), head() if m.separate_patch_head else None)

    def masking(self):
        from fastssl.data import BlockMasks

        m = self.cfg.method
        patch = self.student.backbone.patch_embed.patch_size[0]
        return BlockMasks(self.cfg.data.image_size // patch,
                          mask_ratio_tuple=(m.mask_ratio_min, m.mask_ratio_max),
                          mask_probability=m.mask_probability, n_views=N_GLOBAL, seed=self.cfg.run.seed)

    def compile_modules(self) -> list[nn.Module]:
        # training runs the blocks through DINOv2Network.tokens, not the backbones' forward
        return [self.student.backbone.blocks, self.teacher.backbone.blocks]

    def shard_units(self) -> list[nn.Module]:
        heads = [n.patch_head for n in (self.student, self.teacher) if n.patch_head is not None]
        gram = [self.gram_teacher] if self.gram_teacher is not None else []
        return heads + super().shard_units() + gram

    def parameter_groups(self) -> list[dict]:
        """One group per (layer, decay or not): the backbone's block i at layer_decay ** (depth + 1 - i)
        of the LR, heads and mask token at 1; no weight decay on biases, norms and tokens."""
        groups: dict[tuple[float, bool], dict] = {}
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            scale = 1.0
            if name.startswith("backbone."):
                layer = layer_id(name.removeprefix("backbone."), self.num_layers, vit=True)
                scale = self.cfg.method.layer_decay ** (self.num_layers - layer)
            no_decay = p.ndim <= 1 or name.endswith((".bias", "_token", "pos_embed"))
            group = groups.setdefault((scale, no_decay), {"params": [], "lr_scale": scale}
                                      | ({"weight_decay": 0.0, "apply_wd": False} if no_decay else {}))
            group["params"].append(p)
        return list(groups.values())

    def _masks(self, batch: dict, rows: int, micro: int):
        """masks [2B, L], mask_indices, masks_weight of this micro-batch: the loader's, or, under
        gradient accumulation, this micro-batch's rows of each global crop's masks (a host sync)."""
        from fastssl.ops.ibot_patch_loss import masks_weight_from_masks

        masks = batch.get("masks")
        if masks is None:
            raise ValueError("dinov2 needs batch['masks'] (build_loader(masking=method.masking()))")
        if masks.shape[0] == N_GLOBAL * rows:
            return masks, batch["mask_indices"], batch["masks_weight"]
        masks = masks.view(N_GLOBAL, -1, masks.shape[-1])[:, micro * rows:(micro + 1) * rows].flatten(0, 1)
        indices = masks.flatten().nonzero().flatten()
        return masks, indices, masks_weight_from_masks(masks, indices)

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        m = self.cfg.method
        crops = check_views(batch, N_GLOBAL + m.n_local_crops, self.name)
        masks, indices, weights = self._masks(batch, crops[0].shape[0], ctx.micro_step)
        temp = ctx.schedules.get("teacher_temp")
        temp = float(self.criterion.teacher_temp_at(ctx.epoch) if temp is None else temp)
        with torch.no_grad():
            teacher_cls, _, teacher_patch, _ = self.teacher(crops[:N_GLOBAL], mask_indices=indices)
        student_cls, student_global, student_patch, student_tokens = self.student(crops, masks, indices)
        update = ctx.accum_steps == 1
        dino = self.criterion(student_cls, teacher_cls, teacher_temp=temp, update_center=update)
        ibot = self.ibot.masked_loss(student_patch, teacher_patch, masks, teacher_temp=temp,
                                     mask_indices=indices, masks_weight=weights,
                                     centering=m.teacher_centering, update_center=update)
        loss = m.dino_loss_weight * dino + m.ibot_loss_weight * ibot
        parts = {"dino_loss": dino.detach(), "ibot_loss": ibot.detach()}
        if m.koleo_loss_weight:
            koleo = sum(self.koleo(x) for x in student_global.chunk(N_GLOBAL))
            loss = loss + m.koleo_loss_weight * koleo
            parts["koleo_loss"] = koleo.detach()
        if self.gram_teacher is not None:
            gram = self.gram_anchoring_loss(student_tokens, crops[:N_GLOBAL])
            loss = loss + m.gram_loss_weight * gram
            parts["gram_loss"] = gram.detach()
        return {"loss": loss, **parts}

    def gram_anchoring_loss(self, student_tokens: torch.Tensor,
                            global_crops: list[torch.Tensor]) -> torch.Tensor:
        """DINOv3's Gram anchoring: the student's global patch tokens [2B, L, D] (masked crops, as
        DINOv3's) against the frozen Gram teacher's on the unmasked global crops."""
        target = self.gram_teacher(torch.cat(global_crops))
        return gram_loss(student_tokens, target, apply_norm=True, img_level=True, remove_neg=False)

    @torch.no_grad()
    def before_optimizer_step(self, ctx: StepContext) -> None:
        super().before_optimizer_step(ctx)
        patch_head = self.student.patch_head
        if patch_head is not None and ctx.epoch < self.cfg.method.freeze_last_layer_epochs:
            for p in patch_head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        super().after_optimizer_step(ctx)
        self.ibot.commit_center_update()
        self.ibot.apply_center_update()
