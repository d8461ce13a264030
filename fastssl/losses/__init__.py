"""nn.Module losses (with their state) built on fastssl.ops."""
from fastssl.losses.dino import DINOLoss, sinkhorn_knopp_teacher  # noqa: F401
from fastssl.losses.info_nce import InfoNCELoss  # noqa: F401
from fastssl.losses.multilabel import multilabel_sigmoid_loss, multilabel_softmax_loss  # noqa: F401
