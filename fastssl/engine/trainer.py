"""The training loop: schedules, autocast, DDP, checkpoints, logging, evaluation hooks.

One `Trainer.fit()` call is one run. The method (fastssl/methods) owns its networks and
loss; the loader (fastssl/data.build_loader, this rank's shard) yields batches; the
optional `evaluator` scores the method's encoder (kNN on a labelled split)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastssl.distributed import get_rank, get_world_size, is_distributed
from fastssl.engine import sharded_checkpoint
from fastssl.engine.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from fastssl.engine.config import config_to_dict, save_config
from fastssl.engine.optim import build_optimizer
from fastssl.engine.parallel import gradient_sync, split_micro_batches, unsharded_copy, wrap_for_training
from fastssl.engine.schedules import build_schedules
from fastssl.methods.base import Method, StepContext

Evaluator = Callable[[nn.Module], dict[str, float]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped before that step's update."""


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK in the
    environment): NCCL with one GPU per process, gloo on CPU. Returns (rank, world, device).
    A group that is already initialised (tests) is used as is."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not is_distributed() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    return get_rank(), get_world_size(), torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = dict(batch)
    out["views"] = [v.to(device, non_blocking=True).contiguous(memory_format=fmt) for v in batch["views"]]
    for key in ("label", "index"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    return out


class Trainer:
    """Runs `method` on `loader` for cfg.epochs (or cfg.max_steps) and writes into cfg.out:
    config.yaml (resolved config), metrics.jsonl (one JSON object per step), last.pt
    (atomic checkpoint every cfg.checkpoint_every steps and at each epoch end) and
    summary.json. cfg.batch_size is the global batch; the loader yields this rank's share.

    resume: None (fresh run), "auto" (continue from OUT/last.pt when it exists) or a path.
    time_budget_s: wall-clock budget of fit() (training and evaluations). After timing the
    first steps, and again every 50 steps on the latest speed, the run's length is set to the
    steps that fit (at most cfg.epochs): the schedules are re-spread over it, so the run still
    ends with a full cosine decay. A resumed run keeps the length recorded in its checkpoint."""

    CALIBRATION_STEPS = 12  # timed steps (after 2 warm-up steps) before a time budget is applied

    def __init__(self, method: Method, loader: Iterable, *, evaluator: Evaluator | None = None,
                 resume: str | None = None, progress: bool = True, tensorboard: bool = False,
                 log: Callable[[str], None] | None = None, time_budget_s: float | None = None):
        self.cfg = cfg = method.cfg
        self.method, self.loader, self.evaluator = method, loader, evaluator
        self.rank, self.world, self.device = init_distributed()
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size: expected a multiple of the world size {self.world}, "
                             f"got {cfg.batch_size}")
        if cfg.batch_size % (self.world * cfg.accum_steps):
            raise ValueError(f"batch_size: expected a multiple of world size x accum_steps = "
                             f"{self.world} x {cfg.accum_steps}, got {cfg.batch_size}")
        self.out = Path(cfg.out)
        # parallel=fsdp: every rank writes its shards (fastssl.engine.sharded_checkpoint)
        self.ckpt_path = self.out / (sharded_checkpoint.LATEST if cfg.parallel == "fsdp" else "last.pt")
        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch < 1:
            raise ValueError("loader: expected at least one batch per epoch, got 0 "
                             "(dataset smaller than the batch?)")
        self.planned_steps = cfg.epochs * self.steps_per_epoch
        self.max_steps = self.planned_steps if cfg.max_steps is None else cfg.max_steps
        self._set_total_steps(self.planned_steps)
        self.time_budget_s = time_budget_s

        method.to(self.device)
        if cfg.sync_bn:
            if self.world > 1 and self.device.type == "cuda":
                method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
            else:
                self.log("sync_bn: not converting BatchNorm (needs > 1 CUDA process)")
        if cfg.channels_last:
            method.to(memory_format=torch.channels_last)
        if cfg.compile:
            for module in method.compile_modules():
                module.compile()
        self.model: nn.Module = wrap_for_training(method, cfg, self.device, self.world, log=self.log)
        self.optimizer = build_optimizer(cfg, method.parameter_groups())
        # bf16 needs no loss scaling; the scaler is kept (disabled) so checkpoints have one format.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16,
                             enabled=self.device.type == "cuda")
        self.step = 0
        self.extra: dict[str, Any] = {}  # results carried across resumes (random-init kNN)
        self.tb = None
        if tensorboard and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("tensorboard: requested, but the package is not installed") from e
            self.tb = SummaryWriter(str(self.out / "tb"))
        if resume is not None:
            self._resume(resume)

    def _set_total_steps(self, total: int) -> None:
        self.total_steps = total
        self.stop_step = min(self.max_steps, total)
        self.schedules = build_schedules(self.cfg, self.steps_per_epoch, total) | self.method.schedules(
            total, self.steps_per_epoch)

    def _apply_time_budget(self, step_times: list[float], eval_s: float, deadline: float) -> None:
        step_s = sorted(step_times)[len(step_times) // 2]
        remaining = deadline - time.perf_counter() - eval_s
        # 5% reserve: epoch starts (pipeline set-up), checkpoints and the final save are not in step_s.
        fit = min(max(self.step + int(0.95 * remaining / step_s), self.step + 1), self.planned_steps)
        if self.world > 1:  # every rank must stop at the same step
            box = [fit]
            dist.broadcast_object_list(box, src=0)
            fit = box[0]
        if abs(fit - self.total_steps) > 0.01 * self.total_steps:
            self.log(f"time budget: {step_s:.2f} s/step, evaluation {eval_s:.0f} s: training {fit} of "
                     f"{self.planned_steps} steps ({fit / self.steps_per_epoch:.2f} epochs)")
            self._set_total_steps(fit)
        self.extra["total_steps"] = self.total_steps

    # ----------------------------------------------------------------- checkpoints
    def _resume(self, resume: str) -> None:
        if resume == "auto":
            if not self.ckpt_path.exists():
                self.log(f"resume auto: no {self.ckpt_path}, starting fresh")
                return
            path = self.ckpt_path
        else:
            path = Path(resume)
        sharded = sharded_checkpoint.is_sharded_checkpoint(path)
        state = sharded_checkpoint.read_meta(path) if sharded else load_checkpoint(path)
        if state["batch_size"] != self.cfg.batch_size or state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"resume: checkpoint {str(path)!r} was written with "
                             f"batch_size={state['batch_size']}, steps_per_epoch={state['steps_per_epoch']}; "
                             f"this run has {self.cfg.batch_size}, {self.steps_per_epoch}")
        if sharded:  # written by any number of ranks, resharded to this run's
            sharded_checkpoint.load_sharded(path, self.model, self.optimizer)
        else:
            self.method.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.extra = state["step"], state["extra"]
        if "total_steps" in self.extra:  # a time-budgeted run keeps the length it chose
            self._set_total_steps(self.extra["total_steps"])
        self._rng_to_restore = state["rng"][self.rank] if self.rank < len(state["rng"]) else None
        self.log(f"resumed from {path} at step {self.step} (epoch {self.step // self.steps_per_epoch})")

    def save(self) -> None:
        """Atomic checkpoint of everything the next step depends on (rank 0 writes; RNG of all ranks)."""
        rng = [rng_state()]
        if self.world > 1:
            rng = [None] * self.world
            dist.all_gather_object(rng, rng_state())
        meta = {
            "scaler": self.scaler.state_dict(), "step": self.step,
            "epoch": self.step // self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
            "batch_size": self.cfg.batch_size, "rng": rng, "extra": self.extra,
            "config": config_to_dict(self.cfg), "method": self.method.name,
        }
        if self.cfg.parallel == "fsdp":
            sharded_checkpoint.save_sharded(self.out, self.step, self.model, self.optimizer,
                                            meta | {"world_size": self.world})
            return
        if not self.is_main:
            return
        save_atomic({"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict()} | meta,
                    self.ckpt_path)

    # ----------------------------------------------------------------- evaluation
    def _evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        result: dict[str, float] = {}
        method = unsharded_copy(self.method, self.device)  # a collective under parallel=fsdp
        if self.is_main:
            was_training = method.training
            method.eval()
            with torch.no_grad(), torch.autocast(**self.autocast):
                result = self.evaluator(method.encoder())
            method.train(was_training)
        if self.world > 1:
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        return result

    # ----------------------------------------------------------------- loop
    def _log_step(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def fit(self) -> dict[str, Any]:
        """Train until cfg.epochs * len(loader) steps (or cfg.max_steps), evaluate, write
        summary.json; returns the summary. Raises NonFiniteLossError on a NaN/inf loss."""
        cfg, spe = self.cfg, self.steps_per_epoch
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        self.log(f"{self.method.name}: {cfg.backbone}, {self.world} process(es) on {self.device}, "
                 f"{'bf16 autocast' if self.autocast['enabled'] else 'fp32'}, fused={cfg.fused}, "
                 f"{spe} steps/epoch, steps {self.step}..{self.stop_step} of {self.total_steps}")
        t_fit = time.perf_counter()
        eval_s = 0.0
        if "knn_random_init" not in self.extra and self.evaluator is not None:
            self.extra["knn_random_init"] = self._evaluate()
            eval_s = time.perf_counter() - t_fit
            self.log(f"random init: {self.extra['knn_random_init']} ({eval_s:.0f} s)")
        budget_open = self.time_budget_s is not None and "total_steps" not in self.extra
        step_times: list[float] = []

        self.method.train()
        train_time, images, last_loss = 0.0, 0, float("nan")
        pending: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []
        t_start = time.perf_counter()
        while self.step < self.stop_step:
            epoch, skip = divmod(self.step, spe)
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(epoch)
            batches = iter(self.loader)
            # Mid-epoch resume: the loader is deterministic per (seed, epoch), so skip what was consumed.
            for _ in range(skip):
                next(batches)
            if getattr(self, "_rng_to_restore", None) is not None:
                set_rng_state(self._rng_to_restore)
                self._rng_to_restore = None
            bar = None
            if self.progress:
                from tqdm import tqdm
                bar = tqdm(total=min(spe, self.stop_step - epoch * spe), initial=skip, desc=f"epoch {epoch}",
                           mininterval=2.0, file=sys.stderr, dynamic_ncols=True)
            t_prev = time.perf_counter()
            wait_acc = time_acc = 0.0
            while skip < spe and self.step < self.stop_step:
                batch = next(batches, None)
                if batch is None:
                    raise RuntimeError(f"loader: yielded fewer batches ({skip}) than len(loader)={spe}")
                batch = _to_device(batch, self.device, cfg.channels_last)
                t_data = time.perf_counter()
                record, values = self._train_step(batch, epoch)
                t_now = time.perf_counter()
                n_img = batch["views"][0].shape[0] * self.world
                step_time, wait = t_now - t_prev, t_data - t_prev
                train_time, images = train_time + step_time, images + n_img
                wait_acc, time_acc = wait_acc + wait, time_acc + step_time
                record |= {"img_per_s": n_img / step_time, "data_wait": wait / step_time}
                pending.append((record, values))
                self.step += 1
                skip += 1
                if budget_open:
                    # First after CALIBRATION_STEPS, then every 50 steps on the latest speed: a
                    # shared machine's speed changes during the run.
                    step_times.append(step_time)
                    n = len(step_times) - 2 - self.CALIBRATION_STEPS
                    if n >= 0 and n % 50 == 0:
                        self._apply_time_budget(step_times[-50:] if n else step_times[2:], eval_s,
                                                t_fit + self.time_budget_s)
                will_save = (skip == spe or self.step == self.stop_step
                             or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0))
                if will_save or self.step % max(cfg.log_every, 1) == 0:
                    last_loss = self._flush(pending)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.3g}",
                                        img_s=f"{images / train_time:.0f}", data=f"{wait_acc / time_acc:.0%}")
                if bar is not None:
                    bar.update(1)
                if will_save:
                    self.save()
                t_prev = time.perf_counter()
            if bar is not None:
                bar.close()

        wall = time.perf_counter() - t_start
        result = self._evaluate()
        summary = {
            "method": self.method.name, "backbone": cfg.backbone,
            "epochs": round(self.total_steps / spe, 3), "epochs_configured": cfg.epochs,
            "steps": self.step, "total_steps": self.total_steps, "batch_size": cfg.batch_size,
            "images_per_second": images / train_time if train_time else None,
            "final_loss": last_loss, "train_seconds": wall, "device": self._device_name(),
            "world_size": self.world, "fused": cfg.fused,
        }
        for k, v in result.items():
            summary[k] = v
        for k, v in self.extra.get("knn_random_init", {}).items():
            summary[f"{k}_random_init"] = v
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.tb is not None:
            self.tb.close()
        return summary

    def _train_step(self, batch: dict, epoch: int) -> dict[str, Any]:
        s = self.step
        lr, wd = float(self.schedules["lr"][s]), float(self.schedules["weight_decay"][s])
        ctx = StepContext(step=s, epoch=epoch, steps_per_epoch=self.steps_per_epoch,
                          total_steps=self.total_steps, lr=lr, weight_decay=wd,
                          schedules={k: float(v[s]) for k, v in self.schedules.items()
                                     if k not in ("lr", "weight_decay")})
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            if group.get("apply_wd", True):
                group["weight_decay"] = wd
        self.optimizer.zero_grad(set_to_none=True)
        # Gradient accumulation: the rank's batch runs as accum_steps micro-batches whose mean
        # losses are averaged; gradients are synchronised across ranks on the last one only.
        n = self.cfg.accum_steps
        out: dict[str, Any] = {}
        for i, micro in enumerate(split_micro_batches(batch, n)):
            ctx.micro_step, ctx.accum_steps = i, n
            with gradient_sync(self.model, enabled=i == n - 1):
                with torch.autocast(**self.autocast):
                    micro_out = self.model(micro, ctx)
                (micro_out["loss"] / n).backward()
            for k, v in micro_out.items():
                if (torch.is_tensor(v) and v.numel() == 1) or isinstance(v, (int, float)):
                    out[k] = out.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) / n
        self.method.before_optimizer_step(ctx)
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.method.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        self.method.after_optimizer_step(ctx)
        record = {"step": s, "epoch": epoch, "lr": lr, "weight_decay": wd} | ctx.schedules
        # Scalars stay on the device until _flush reads a window of steps at once: no host sync per step.
        values = {k: v.detach() for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        record |= {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}
        return record, values

    def _flush(self, pending: list[tuple[dict[str, Any], dict[str, torch.Tensor]]]) -> float:
        """Read the pending steps' losses and metrics in one transfer, stop on a non-finite
        loss, append the records to metrics.jsonl; returns the latest loss. Called every
        cfg.log_every steps and before every checkpoint, so a checkpoint never holds the
        result of a step whose loss was NaN/inf."""
        flat = torch.stack([v.float().reshape(()) for _, values in pending for v in values.values()]).tolist()
        numbers = iter(flat)
        for record, values in pending:
            record |= {k: next(numbers) for k in values}
            if not math.isfinite(record["loss"]):
                kept = (f"the last good checkpoint {self.ckpt_path} is left intact"
                        if self.ckpt_path.exists() else "no checkpoint had been written yet")
                raise NonFiniteLossError(
                    f"loss is {record['loss']} at step {record['step']} (epoch {record['epoch']}); stopped; "
                    f"{kept}. Try a lower base_lr or a longer warmup_epochs.")
            self._log_step(record)
        pending.clear()
        return record["loss"]

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return f"{torch.cuda.get_device_name(self.device)} x{self.world}"
        return f"cpu ({torch.get_num_threads()} threads) x{self.world}"
