"""A tiny method and loader for engine tests: small enough to train for a few steps in
well under a second, yet with everything the engine must carry across a resume (a
buffer updated outside the optimizer, a method schedule, dropout drawing from the global
RNG, a per-epoch shuffle)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from fastssl.config import MethodConfig, TrainConfig
from fastssl.engine import cosine_schedule, resolve_config
from fastssl.method import Method, StepContext


class TinyMethod(Method):
    name = "tiny"

    def __init__(self, cfg: TrainConfig, dropout: float = 0.2, nan_at_step: int | None = None,
                 crash_at_step: int | None = None, signals: dict[int, list[int]] | None = None):
        super().__init__(cfg)
        torch.manual_seed(cfg.run.seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(16, 4)
        self.register_buffer("ema", torch.zeros(16))
        self.nan_at_step, self.crash_at_step = nan_at_step, crash_at_step
        self.signals = signals or {}  # step -> signals this process sends itself during that step

    def encoder(self) -> nn.Module:
        return self.net

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        if ctx.step == self.crash_at_step:
            raise KeyboardInterrupt("killed")  # a run killed mid-way, after its last checkpoint
        for signum in self.signals.get(ctx.step, []):
            os.kill(os.getpid(), signum)
        a, b = batch["views"]
        fa, fb = self.net(a), self.net(b)
        loss = F.cross_entropy(self.head(fa), batch["label"]) + (fa - fb).pow(2).mean()
        if self.nan_at_step is not None and ctx.step >= self.nan_at_step:
            loss = loss * float("nan")
        self._last = fa.detach().mean(0)
        return {"loss": loss, "feature_mean": fa.detach().mean()}

    def schedules(self, total_steps: int, steps_per_epoch: int):
        return {"ema_momentum": cosine_schedule(0.5, 1.0, total_steps)}

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        m = ctx.schedules["ema_momentum"]
        self.ema.mul_(m).add_(self._last, alpha=1 - m)


class TinyLoader:
    """`n` fixed samples (labels learnable from the pixels), shuffled per (seed, epoch), two
    noisy views per sample. Rank r of W gets rows [r*b/W, (r+1)*b/W) of every global batch,
    so the ranks' shards concatenated equal the one-process batch."""

    def __init__(self, n: int = 32, batch_size: int = 8, seed: int = 0, shard_id: int = 0,
                 num_shards: int = 1):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 3, 4, 4, generator=g)
        self.y = self.x.flatten(1)[:, :4].argmax(1)
        self.batch_size, self.seed, self.shard_id, self.num_shards = batch_size, seed, shard_id, num_shards
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        perm = torch.randperm(len(self.x), generator=g)
        per_rank = self.batch_size // self.num_shards
        for i in range(len(self)):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            views = [self.x[idx] + 0.1 * torch.randn(self.x[idx].shape, generator=g) for _ in range(2)]
            rows = slice(self.shard_id * per_rank, (self.shard_id + 1) * per_rank)
            yield {"views": [v[rows] for v in views], "label": self.y[idx][rows], "index": idx[rows]}


def tiny_config(out, **kw) -> TrainConfig:
    defaults = dict(backbone="mlp", epochs=2, batch_size=8, base_lr=0.5, lr_batch_divisor=8,
                    warmup_epochs=0.5, weight_decay=1e-4, optimizer="sgd", out=str(out), log_every=1)
    return resolve_config(MethodConfig, overrides=defaults | kw)
