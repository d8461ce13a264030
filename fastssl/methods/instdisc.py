"""Instance discrimination (Wu, Xiong, Yu, Lin 2018, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination"): each training image is its own class; its feature
f_i = normalize(W backbone(x_i)) [D = 128] is contrasted with a memory bank of every image's
last feature (fastssl.bank.MemoryBank, N x D, rows by the batch's dataset "index").

loss = "nce": the paper's NCE form (m = 4096 rows sampled uniformly per example, Z estimated
  once from the first batch and kept in the state dict). A Z estimated while the bank holds its
  random initial rows (near-orthogonal to every feature) is far too small once the rows are real
  features, which early in training are similar to each other: the negatives' P(i | v) outgrow
  m P_n and the loss climbs while the bank fills (on the Fashion-MNIST preset, still climbing at
  three times its first value after 90 steps). partition_momentum < 1 moves Z toward each global
  batch's estimate instead, the moving average (0.99) K. He recommends for the one-time estimate's
  failure when the memory is not random noise: the loss then levels off within ~50 steps.
loss = "softmax": the non-parametric softmax over the whole bank through the fused InfoNCE, the
  bank as the queue: the positive v_i . f_i against every row, so v_i enters the denominator twice
  (once as the key, once as a queue row), a term log(1 + P(i | f_i)) above the paper's eq. 2.
Proximal regularisation (sec. 3.4): + lambda ||f_i - v_i||^2 with v_i the bank's row before
this step. After the optimizer step the bank moves each row toward its feature with momentum
(bank.update, by index, all ranks' features gathered: the bank is replicated, see fastssl.bank).
bank_init = "features" fills every row with the untrained network's feature of its image (the
eval view at the training size, BN in eval mode so a row does not depend on its batch) in one
no-grad pass before the first step; "random" keeps the official uniform rows. With random rows an
image's positive is noise until its first visit and half noise after it (momentum 0.5): a run of
a few epochs spends most of its steps pulling features toward random directions (the
Fashion-MNIST preset, 3 epochs, ends below random init). Over the paper's 200 epochs the first
visits do not matter.
Paper's recipe: tau 0.07, SGD lr 0.03 (batch 256), momentum 0.9, weight decay 5e-4, 200 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fastssl.bank import MemoryBank
from fastssl.config import MethodConfig, setting
from fastssl.distributed import all_reduce_sum_, get_rank, get_world_size, is_distributed
from fastssl.losses import InfoNCELoss
from fastssl.losses.instdisc import nce_loss, nce_partition
from fastssl.method import Method, StepContext, TrainConfig
from fastssl.methods import register
from fastssl.methods._common import SGD, backbone_from_config, check_views, step_generator

LOSSES = ("nce", "softmax")
BANK_INITS = ("random", "features")
FILL_BATCH = 512  # images per batch of the bank's fill (BatchNorm in eval mode: any size gives the same rows)


@dataclass
class InstDiscConfig(MethodConfig):
    name: ClassVar[str] = "instdisc"
    defaults: ClassVar[dict] = dict(SGD, backbone="resnet18", image_size=224, epochs=200, batch_size=256,
                                    base_lr=0.03, lr_batch_divisor=256, weight_decay=5e-4)
    feature_dim: int = setting(128, "D: the embedding and bank row width", low=1, high=65536)
    temperature: float = setting(0.07, "tau of exp(v . f / tau)", low=0, low_open=True, high=100)
    loss: str = setting("nce", "nce: m sampled negatives, Z fixed; softmax: the whole bank (fused InfoNCE)",
                        choices=LOSSES)
    nce_negatives: int = setting(4096, "m: bank rows sampled per example (loss=nce)", low=1, high=1 << 20)
    partition_momentum: float = setting(1.0, "Z <- mu Z + (1 - mu) Z_batch each step (loss=nce); 1: the "
                                        "paper's Z, estimated on the first batch, then fixed", low=0, high=1)
    bank_momentum: float = setting(0.5, "bank row <- m row + (1 - m) feature, then normalised", low=0, high=1)
    bank_init: str = setting("random", "random: the official uniform rows; features: each image's feature "
                             "from the untrained network, one no-grad pass before the first step",
                             choices=BANK_INITS)
    proximal: float = setting(0.0, "lambda of the proximal term lambda ||f_i - v_i||^2 (paper: 30)", low=0,
                              high=1e6)


@register
class InstDisc(Method, config=InstDiscConfig):
    # Fashion-MNIST at 28 px on a 2-core CPU: the CIFAR ResNet-8, crops of at least a third of the image;
    # three epochs are too few to outgrow random initial rows, so the bank starts from real features.
    presets = {"fashion-mnist": dict(backbone="resnet8", image_size=28, batch_size=128, epochs=3,
                                     nce_negatives=1024, partition_momentum=0.99, bank_init="features",
                                     channels_last=True, views={"scale": (0.3, 1.0)})}

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.backbone, width = backbone_from_config(cfg)
        self.head = nn.Linear(width, cfg.method.feature_dim)
        self.criterion = InfoNCELoss(cfg.method.temperature, backend=self.backend)
        self.bank: MemoryBank | None = None
        # Z of the NCE form: 0 until the first batch estimates it; saved, so a resumed run keeps it.
        self.register_buffer("partition", torch.zeros(()))
        self._partition_known = False
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._source = None

    def bind_data(self, source) -> None:
        self._source = source
        self._make_bank(len(source))

    def _make_bank(self, size: int) -> None:
        m, device = self.cfg.method, next(self.parameters()).device
        self.bank = MemoryBank(size, m.feature_dim, momentum=m.bank_momentum, dtype=torch.float32,
                               device=device, seed=self.cfg.run.seed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A trained method loaded for evaluation or export has seen no data: its bank comes with the weights.
        memory = state_dict.get(prefix + "bank.memory")
        if self.bank is None and isinstance(memory, torch.Tensor) and memory.ndim == 2:
            self._make_bank(memory.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encoder(self) -> nn.Module:
        return self.backbone

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.bank is None:
            raise ValueError("instdisc needs its memory bank: call bind_data(source) with the training "
                             "source before training (one bank row per image)")
        m = self.cfg.method
        (view,) = check_views(batch, 1, self.name)[:1]
        if m.bank_init == "features" and self.training and ctx.step == 0 and ctx.micro_step == 0:
            self.fill_bank(self._fill_loader(view.device))  # a resumed run's bank comes from its checkpoint
        index = batch["index"].to(view.device)
        f = F.normalize(self.head(self.backbone(view)).float(), dim=1)
        own = self.bank.memory.index_select(0, index).float()
        if m.loss == "softmax":
            loss = self.criterion(f, own, self.bank.memory.float())
        else:
            g = step_generator(self.cfg, ctx, view.device)
            _, negatives = self.bank.sample((f.shape[0], m.nce_negatives), generator=g)
            scores = torch.cat([(own * f).sum(1, keepdim=True),
                                torch.einsum("bkd,bd->bk", negatives.float(), f)], 1)
            first = not self._partition_known and not self.partition  # one host read per run, not per step
            self._partition_known = True
            if first:
                self.partition.copy_(self._batch_partition(scores))
            elif m.partition_momentum < 1 and self.training:
                self.partition.lerp_(self._batch_partition(scores), 1 - m.partition_momentum)
            loss = nce_loss(scores, m.temperature, self.partition, self.bank.size)
        out = {"loss": loss}
        if m.proximal:
            prox = (f - own).pow(2).sum(1).mean()
            out |= {"loss": loss + m.proximal * prox, "proximal": prox.detach()}
        if self.training:
            self._pending.append((f.detach(), index))
        return out

    def _fill_loader(self, device: torch.device):
        """This rank's share of the training images through the eval recipe at the training size."""
        from fastssl.data import build_loader, recipes, resolve_loader

        if self._source is None:
            raise ValueError("bank_init='features' needs the training images: call bind_data(source) first")
        cfg = self.cfg
        kind, data_device = resolve_loader(cfg.data.loader, cfg.data.data_device, train_device=device)
        recipe = recipes.eval(size=cfg.data.image_size, resize=cfg.data.image_size)
        return build_loader(self._source, recipe, batch_size=FILL_BATCH, loader=kind, device=data_device,
                            num_threads=cfg.data.num_threads, shard_id=get_rank(),
                            num_shards=get_world_size(), seed=cfg.run.seed, shuffle=False, drop_last=False)

    @torch.no_grad()
    def fill_bank(self, batches) -> None:
        """Row i <- normalize(head(backbone(x_i))) for every image of `batches` (dicts {"views": [x],
        "index": i}), backbone and head in eval mode; in a distributed run each rank passes its share
        and the rows are summed across ranks. A row no rank saw (a skipped bad sample) keeps its value."""
        memory = self.bank.memory
        device = next(self.parameters()).device
        rows = torch.zeros(memory.shape, dtype=torch.float32, device=memory.device)
        seen = torch.zeros(memory.shape[0], 1, dtype=torch.float32, device=memory.device)
        fmt = torch.channels_last if self.cfg.model.channels_last else torch.contiguous_format
        modes = [(module, module.training) for module in (self.backbone, self.head)]
        try:
            for module, _ in modes:
                module.eval()
            for b in batches:
                x = b["views"][0].to(device, non_blocking=True).contiguous(memory_format=fmt)
                index = b["index"].to(memory.device)
                f = F.normalize(self.head(self.backbone(x)).float(), dim=1)
                rows.index_copy_(0, index, f.to(rows.device))
                seen.index_fill_(0, index, 1.0)
        finally:
            for module, mode in modes:
                module.train(mode)
        if is_distributed():
            all_reduce_sum_(rows)
            all_reduce_sum_(seen)
        memory.copy_(torch.where(seen > 0, rows, memory.float()).to(memory.dtype))

    @torch.no_grad()
    def _batch_partition(self, scores: torch.Tensor) -> torch.Tensor:
        """Z estimated on the global batch: the ranks' estimates averaged, so every replica holds one Z."""
        estimate = nce_partition(scores, self.cfg.method.temperature, self.bank.size)
        return all_reduce_sum_(estimate) / get_world_size()

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        for features, index in self._pending:
            self.bank.update(features, index, gather=is_distributed())
        self._pending.clear()

