"""iBOT (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer").

DINO's class-token self-distillation plus masked image modelling against an online tokenizer:
the student sees block-masked global crops and predicts, for each masked patch, the EMA teacher's
distribution for that patch of the unmasked crop. It is DINOv2's method (fastssl.methods.dinov2)
without what DINOv2 added: no KoLeo, no layer-wise LR decay, teacher outputs centered (not
Sinkhorn-Knopp). The defaults are the official repository's ViT-S/16 recipe: one head shared by
the class and patch tokens, 8,192 prototypes and no weight-normalised last layer, teacher
temperature 0.04 -> 0.07 over 30 epochs for both losses, 2 global + 10 local crops, half the global
crops masked at 10-50% of their patches (pred_ratio 0 / 0.3 +- 0.2), 800 epochs.

The loss is iBOT's: lambda1 * the class-token loss + lambda2 * the patch loss (dino_loss_weight and
ibot_loss_weight), the patch loss averaging each crop's masked tokens, then the crops. One
difference from the official code: the patch center moves with the masked tokens' teacher outputs
(DINOv2's rule: the teacher's head runs on the masked tokens only), iBOT's with every patch token's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fastssl.config import redefault
from fastssl.methods import register
from fastssl.methods.dinov2 import DINOv2, DINOv2Config


@dataclass
class IBOTConfig(DINOv2Config):
    name: ClassVar[str] = "ibot"
    defaults: ClassVar[dict] = dict(DINOv2Config.defaults, backbone="vit_small_patch16", epochs=800)
    out_dim: int = redefault(DINOv2Config, "out_dim", 8192)
    norm_last_layer: bool = redefault(DINOv2Config, "norm_last_layer", False)
    teacher_centering: str = redefault(DINOv2Config, "teacher_centering", "center")
    koleo_loss_weight: float = redefault(DINOv2Config, "koleo_loss_weight", 0.0)
    layer_decay: float = redefault(DINOv2Config, "layer_decay", 1.0)


@register
class IBOT(DINOv2, config=IBOTConfig):
    """DINOv2's network, masks and losses with iBOT's configuration (module docstring); its
    Fashion-MNIST preset is DINOv2's."""
