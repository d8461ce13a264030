"""nn.Module losses (with their state) built on fastssl.ops."""

from fastssl.losses.dino import DINOLoss, sinkhorn_knopp_teacher
from fastssl.losses.info_nce import InfoNCELoss
from fastssl.losses.mae import MAELoss
from fastssl.losses.multilabel import multilabel_sigmoid_loss, multilabel_softmax_loss

__all__ = ["DINOLoss", "InfoNCELoss", "MAELoss", "multilabel_sigmoid_loss", "multilabel_softmax_loss",
           "sinkhorn_knopp_teacher"]
