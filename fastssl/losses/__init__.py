"""nn.Module losses (with their state) built on fastssl.ops."""
from fastssl.losses.info_nce import InfoNCELoss  # noqa: F401
