"""nn.Module losses (with their state) built on fastssl.ops."""

from fastssl.losses.clip import ClipLoss
from fastssl.losses.dino import DINOLoss, dino_update_center_, sinkhorn_knopp_teacher, teacher_temp_schedule
from fastssl.losses.grad_cache import grad_cache_encode
from fastssl.losses.gram import GramLoss, gram_loss
from fastssl.losses.ibot import iBOTPatchLoss
from fastssl.losses.info_nce import InfoNCELoss
from fastssl.losses.koleo import KoLeoLoss, koleo_loss
from fastssl.losses.mae import MAELoss
from fastssl.losses.multilabel import multilabel_sigmoid_loss, multilabel_softmax_loss
from fastssl.losses.nt_xent import NTXentLoss
from fastssl.losses.rotation import rotation_loss
from fastssl.losses.siglip import SigLipLoss

__all__ = ["ClipLoss", "DINOLoss", "GramLoss", "InfoNCELoss", "KoLeoLoss", "MAELoss", "NTXentLoss",
           "SigLipLoss", "dino_update_center_", "grad_cache_encode", "gram_loss", "iBOTPatchLoss",
           "koleo_loss", "multilabel_sigmoid_loss", "multilabel_softmax_loss", "rotation_loss",
           "sinkhorn_knopp_teacher", "teacher_temp_schedule"]
