"""The training loop: schedules, autocast, DDP, checkpoints, logging, evaluation hooks.

One `Trainer.fit()` call is one run. The method (fastssl/methods) owns its networks and
loss; the loader (fastssl/data.build_loader, this rank's shard) yields batches; the
optional `evaluator` scores the method's encoder (kNN on a labelled split); it is called on
every rank, and a distributed one shares the work (see fastssl.cli.build_evaluator)."""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastssl.data.loader import Loader
from fastssl.distributed import get_rank, get_world_size, is_distributed
from fastssl.engine import sharded_checkpoint
from fastssl.engine.checkpoint import (
    load_checkpoint,
    remove_stale_temp,
    rng_state,
    save_atomic,
    set_rng_state,
)
from fastssl.engine.config import config_to_dict, save_config
from fastssl.engine.optim import build_optimizer
from fastssl.engine.parallel import gradient_sync, split_micro_batches, unsharded_copy, wrap_for_training
from fastssl.engine.schedules import build_schedules
from fastssl.methods.base import Method, StepContext

Evaluator = Callable[[nn.Module], dict[str, float]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped before that step's update."""


# The files that make a folder a run: a new run never writes over them unless asked (overwrite).
RUN_FILES = ("last.pt", "last.dcp", "metrics.jsonl", "summary.json", "config.yaml")
# Signals that stop a run cleanly: Ctrl-C, a scheduler's termination, SLURM's preemption warning.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK in the
    environment): NCCL with one GPU per process, gloo on CPU. Returns (rank, world, device).
    timeout_s: how long a collective may wait for the slowest rank before the group fails
    (cfg.dist_timeout_s; None: torch's default). A group that is already initialised (tests)
    is used as is."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not is_distributed() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return get_rank(), get_world_size(), torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def default_run_dir(method: str, root: str | Path = "runs") -> Path:
    """runs/<method>-<UTC date-time>, with a suffix if that folder exists: unique per run."""
    base = Path(root) / f"{method}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _rank0_value(value: Any, world: int) -> Any:
    """rank 0's `value` on every rank (a one-off broadcast, never per step)."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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

    cfg.out "" picks a fresh runs/<method>-<UTC time> (written back into cfg.out and logged).
    resume: None (fresh run), "auto" (continue from OUT/last.pt when it exists) or a path. A
    worker that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) resumes "auto" on its own.
    A fresh run into a folder that holds a run (RUN_FILES) is refused unless overwrite=True,
    which deletes those files first. Resuming with other epochs than the checkpoint's is
    refused unless extend=True (the schedules are then re-spread over the new length).
    SIGINT, SIGTERM and SIGUSR1 during training stop every rank after the same step, write a
    checkpoint and return the summary with "interrupted" set (no final evaluation, no
    summary.json); a second SIGINT raises KeyboardInterrupt at once.
    monitor: a cheap evaluator (kNN on a fixed subsample) run every cfg.eval_every epochs and
    at the last step; its result goes into that step's metrics.jsonl record as `knn_top1_subset`
    and into the progress line. At the end, rank 0 draws curves.png from metrics.jsonl.
    time_budget_s: wall-clock budget of fit() (training and evaluations). After timing the
    first steps, and again every 50 steps on the latest speed, the run's length is set to the
    steps that fit (at most cfg.epochs): the schedules are re-spread over it, so the run still
    ends with a full cosine decay. A resumed run keeps the length recorded in its checkpoint."""

    CALIBRATION_STEPS = 12  # timed steps (after 2 warm-up steps) before a time budget is applied

    def __init__(self, method: Method, loader: Iterable, *, evaluator: Evaluator | None = None,
                 resume: str | None = None, progress: bool = True, tensorboard: bool = False,
                 log: Callable[[str], None] | None = None, time_budget_s: float | None = None,
                 monitor: Evaluator | None = None, overwrite: bool = False, extend: bool = False):
        self.cfg = cfg = method.cfg
        self.method, self.loader, self.evaluator, self.monitor = method, loader, evaluator, monitor
        self.rank, self.world, self.device = init_distributed(cfg.dist_timeout_s)
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size: expected a multiple of the world size {self.world}, "
                             f"got {cfg.batch_size}")
        if cfg.batch_size % (self.world * cfg.accum_steps):
            raise ValueError(f"batch_size: expected a multiple of world size x accum_steps = "
                             f"{self.world} x {cfg.accum_steps}, got {cfg.batch_size}")
        if not cfg.out:
            cfg.out = str(_rank0_value(default_run_dir(method.name) if self.is_main else None, self.world))
            self.log(f"out: {cfg.out} (a new run folder; --out DIR names one)")
        self.out = Path(cfg.out)
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        if restarts and resume is None:
            self.log(f"torchrun restart {restarts}: resuming from {self.out}'s checkpoint when present")
            resume, overwrite = "auto", False
        self.extend = extend
        # Ranks agree on a stop (signal) and on a non-finite loss through this CPU group; see _stop_agreed.
        timeout = datetime.timedelta(seconds=cfg.dist_timeout_s)
        self._flag_group = dist.new_group(backend="gloo", timeout=timeout) if self.world > 1 else None
        self._stop_work: tuple[Any, torch.Tensor] | None = None
        self._signal: int | None = None
        self._saved_step: int | None = None  # the step of the checkpoint on disk, when this run knows one
        # parallel=fsdp: every rank writes its shards (fastssl.engine.sharded_checkpoint)
        self.ckpt_path = self.out / (sharded_checkpoint.LATEST if cfg.parallel == "fsdp" else "last.pt")
        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch < 1:
            raise ValueError("loader: expected at least one batch per epoch, got 0 "
                             "(dataset smaller than the batch?)")
        if cfg.eval_every < 0:
            raise ValueError(f"eval_every: expected epochs >= 0 (0 = no kNN while training), "
                             f"got {cfg.eval_every}")
        self.eval_interval = max(1, round(cfg.eval_every * self.steps_per_epoch)) if cfg.eval_every else 0
        self.monitor_s: list[float] = []  # seconds of each monitor call (the time budget counts them)
        if cfg.deterministic:
            # cuBLAS reads this when its handle is created: set it before the first CUDA matmul.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
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
        self._check_run_folder(resume, overwrite)
        self._overwrite = overwrite and resume is None
        if resume is not None:
            self._resume(resume)

    def _set_total_steps(self, total: int) -> None:
        self.total_steps = total
        self.stop_step = min(self.max_steps, total)
        self.schedules = build_schedules(self.cfg, self.steps_per_epoch, total) | self.method.schedules(
            total, self.steps_per_epoch)

    def _apply_time_budget(self, step_times: list[float], eval_s: float, deadline: float) -> None:
        step_s = sorted(step_times)[len(step_times) // 2]
        if self.monitor_s and self.eval_interval:
            step_s += sum(self.monitor_s) / len(self.monitor_s) / self.eval_interval
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
    def _check_run_folder(self, resume: str | None, overwrite: bool) -> None:
        """A fresh run must not write over another run's files (rank 0 looks; all ranks raise)."""
        problem = None
        if self.is_main and resume is None and not overwrite:
            existing = [name for name in RUN_FILES if (self.out / name).exists()]
            if existing:
                problem = (f"out: {self.out} already holds a run ({', '.join(existing)}); continue it with "
                           f"--resume auto, or replace it with --overwrite (deletes those files)")
        problem = _rank0_value(problem, self.world)
        if problem:
            raise ValueError(problem)

    def _resume(self, resume: str) -> None:
        if resume == "auto":
            if not self.ckpt_path.exists():
                self.log(f"resume auto: no {self.ckpt_path}, starting fresh")
                return
            path = self.ckpt_path
        else:
            path = Path(resume)
        sharded = sharded_checkpoint.is_sharded_checkpoint(path)
        state = (sharded_checkpoint.read_meta(path) if sharded
                 else load_checkpoint(path, method=self.method.name))
        if state["batch_size"] != self.cfg.batch_size or state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"resume: checkpoint {str(path)!r} was written with "
                             f"batch_size={state['batch_size']}, steps_per_epoch={state['steps_per_epoch']}; "
                             f"this run has {self.cfg.batch_size}, {self.steps_per_epoch}")
        epochs = state["config"].get("epochs")
        if epochs != self.cfg.epochs and not self.extend:
            raise ValueError(
                f"resume: checkpoint {str(path)!r} belongs to a run of epochs={epochs}, this command asks "
                f"for epochs={self.cfg.epochs}; resume with epochs={epochs}, or add --extend to re-spread "
                f"the LR and other schedules over {self.cfg.epochs} epochs from step {state['step']} (the "
                f"LR jumps to where the longer cosine is at that step)")
        try:
            if sharded:  # written by any number of ranks, resharded to this run's
                sharded_checkpoint.load_sharded(path, self.model, self.optimizer)
            else:
                self.method.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(f"resume: checkpoint {str(path)!r} ({state['method']}, backbone "
                             f"{state['config'].get('backbone')}) does not fit this run's model "
                             f"(backbone {self.cfg.backbone}): {first}") from e
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.extra = state["step"], state["extra"]
        self._saved_step = self.step
        if epochs != self.cfg.epochs:
            self.extra.pop("total_steps", None)  # extended: the new length replaces a time budget's
            self.log(f"resume: extending from epochs={epochs} to {self.cfg.epochs}: schedules re-spread over "
                     f"{self.total_steps} steps; at step {self.step} the LR is "
                     f"{float(self.schedules['lr'][min(self.step, self.total_steps - 1)]):.3g}")
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
        elif self.is_main:
            save_atomic({"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict()} | meta,
                        self.ckpt_path)
        self._saved_step = self.step

    # ----------------------------------------------------------------- evaluation
    def _evaluate(self, evaluator: Evaluator | None = None) -> dict[str, float]:
        evaluator = evaluator or self.evaluator
        if evaluator is None:
            return {}
        # Every rank calls the evaluator: a distributed one (the CLI's) extracts each rank's shard,
        # so no rank waits in a collective, past its timeout, while rank 0 does all the work. Under
        # parallel=fsdp each rank evaluates a full copy gathered from the shards: a sharded forward
        # would make every batch a collective, and the ranks' shares may differ by a batch.
        method = unsharded_copy(self.method, self.device)
        was_training = method.training
        method.eval()
        with torch.no_grad(), torch.autocast(**self.autocast):
            result = evaluator(method.encoder())
        method.train(was_training)
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

    def _prepare_run_folder(self) -> None:
        """Rank 0: clear what an overwrite replaces and what a killed save left, drop metrics rows
        at or past the step this run starts from (they are trained again), write config.yaml."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self._overwrite:
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
        for tmp in remove_stale_temp(self.ckpt_path):
            self.log(f"removed {tmp.name}, left by a save that was killed")
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():
            kept = []
            for line in metrics.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run killed mid-write
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < self.step:
                    kept.append(line + "\n")
            tmp = metrics.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, metrics)
        save_config(self.cfg, self.out / "config.yaml")

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked loader worker: the main process decides
            return
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: stopped without a checkpoint")
        if self._signal is None:
            self._signal = signum
            self.log(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                     f"(Ctrl-C again to quit at once)")

    def _stop_agreed(self) -> int:
        """The signal (a number, 0 for none) every rank stops on at this step boundary.

        One process: the local flag. Several: each step all-reduces (MAX) its local flag
        asynchronously on the CPU gloo group and reads the reduction issued one step earlier,
        which completed long ago. No rank waits on the GPU or on another rank's step for it,
        and since every rank reads the same reduction at the same step, all stop after the
        same step (one step after the first signal)."""
        local = self._signal or 0
        if self._flag_group is None:
            return local
        agreed = 0
        if self._stop_work is not None:
            work, flag = self._stop_work
            work.wait()
            agreed = int(flag.item())
        flag = torch.tensor([local], dtype=torch.int64)
        self._stop_work = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._flag_group, async_op=True),
                           flag)
        return agreed

    def _finish_stop_agreement(self) -> None:
        if self._stop_work is not None:
            self._stop_work[0].wait()
            self._stop_work = None

    def fit(self) -> dict[str, Any]:
        """See _fit; with cfg.deterministic, deterministic kernels (and no cuDNN autotuning) for the
        run only: the process's settings are restored afterwards."""
        if not self.cfg.deterministic:
            return self._fit()
        before = (torch.are_deterministic_algorithms_enabled(),
                  torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        try:
            return self._fit()
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
            torch.backends.cudnn.benchmark = before[2]

    def _fit(self) -> dict[str, Any]:
        """Train until cfg.epochs * len(loader) steps (or cfg.max_steps), evaluate, write
        summary.json; returns the summary. Raises NonFiniteLossError on a NaN/inf loss (on
        every rank, after they agree). A stop signal ends the run early with a checkpoint
        and the summary's "interrupted" set to the signal's name."""
        cfg, spe = self.cfg, self.steps_per_epoch
        if self.is_main:
            self._prepare_run_folder()
        self.log(f"{self.method.name}: {cfg.backbone}, {self.world} process(es) on {self.device}, "
                 f"{'bf16 autocast' if self.autocast['enabled'] else 'fp32'}, fused={cfg.fused}, "
                 f"{spe} steps/epoch, steps {self.step}..{self.stop_step} of {self.total_steps}")
        t_fit = time.perf_counter()
        eval_s = 0.0
        if "knn_random_init" not in self.extra and self.evaluator is not None:
            self.log("random init: kNN of the untrained encoder (the baseline to beat)")
            self.extra["knn_random_init"] = self._evaluate()
            eval_s = time.perf_counter() - t_fit
            self.log(f"random init: {self.extra['knn_random_init']} ({eval_s:.0f} s)")
        if self.monitor is not None and self.eval_interval and "knn_subset_random_init" not in self.extra:
            # The subsample's smaller memory bank reads lower than the full split: its own
            # random-init value is the baseline its curve is compared with.
            self.extra["knn_subset_random_init"] = self._evaluate(self.monitor)["knn_top1"]
        budget_open = self.time_budget_s is not None and "total_steps" not in self.extra
        step_times: list[float] = []

        self.method.train()
        pending: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []
        t_start = time.perf_counter()
        self._pid = os.getpid()
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            stopped = self._loop(pending, budget_open, step_times, eval_s, t_fit)
        finally:
            for s, previous in handlers.items():
                signal.signal(s, previous)
            self._finish_stop_agreement()
        return self._finish(stopped, t_start)

    def _loop(self, pending: list, budget_open: bool, step_times: list[float], eval_s: float,
              t_fit: float) -> int:
        """The training steps; returns the signal number that stopped them (0: ran to stop_step)."""
        cfg, spe = self.cfg, self.steps_per_epoch
        train_time, images, last_loss = 0.0, 0, float("nan")
        self._loop_stats = (train_time, images, last_loss)
        knn_text = ""
        while self.step < self.stop_step:
            epoch, skip = divmod(self.step, spe)
            if isinstance(self.loader, Loader):
                # Mid-epoch resume: the loader starts at the first unconsumed batch and reads nothing before.
                self.loader.set_epoch(epoch, start=skip)
                batches = iter(self.loader)
            else:
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
                monitored = self.monitor is not None and self.eval_interval and (
                    self.step % self.eval_interval == 0 or self.step == self.stop_step)
                if monitored:
                    t_monitor = time.perf_counter()
                    record["knn_top1_subset"] = self._evaluate(self.monitor)["knn_top1"]
                    self.monitor_s.append(time.perf_counter() - t_monitor)
                    knn_text = f"{record['knn_top1_subset']:.1%}"
                if budget_open:
                    # First after CALIBRATION_STEPS, then every 50 steps on the latest speed: a
                    # shared machine's speed changes during the run.
                    step_times.append(step_time)
                    n = len(step_times) - 2 - self.CALIBRATION_STEPS
                    if n >= 0 and n % 50 == 0:
                        self._apply_time_budget(step_times[-50:] if n else step_times[2:], eval_s,
                                                t_fit + self.time_budget_s)
                stop = self._stop_agreed()
                will_save = (skip == spe or self.step == self.stop_step or stop
                             or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0))
                if will_save or monitored or self.step % max(cfg.log_every, 1) == 0:
                    last_loss = self._flush(pending)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.3g}",
                                        img_s=f"{images / train_time:.0f}", data=f"{wait_acc / time_acc:.0%}",
                                        **({"knn": knn_text} if knn_text else {}))
                if bar is not None:
                    bar.update(1)
                if will_save:
                    self.save()
                self._loop_stats = (train_time, images, last_loss)
                if stop:
                    if bar is not None:
                        bar.close()
                    return stop
                t_prev = time.perf_counter()
            if bar is not None:
                bar.close()
        return 0

    def _finish(self, stopped: int, t_start: float) -> dict[str, Any]:
        """Evaluate (unless stopped by a signal) and write summary.json; returns the summary."""
        cfg, spe = self.cfg, self.steps_per_epoch
        train_time, images, last_loss = self._loop_stats
        wall = time.perf_counter() - t_start
        result = {} if stopped else self._evaluate()
        summary = {
            "method": self.method.name, "backbone": cfg.backbone,
            "epochs": round(self.step / spe, 3), "epochs_planned": round(self.total_steps / spe, 3),
            "epochs_configured": cfg.epochs,
            "steps": self.step, "total_steps": self.total_steps, "batch_size": cfg.batch_size,
            "images_per_second": images / train_time if train_time else None,
            "final_loss": last_loss, "train_seconds": wall, "device": self._device_name(),
            "world_size": self.world, "fused": cfg.fused,
        }
        # Bad samples skipped (fastssl.data.Loader), summed over ranks.
        skipped = getattr(self.loader, "skipped_samples", 0)
        if self.world > 1:
            box = torch.tensor(skipped, dtype=torch.int64, device=self.device)
            dist.all_reduce(box)
            skipped = int(box)
        summary["skipped_samples"] = skipped
        for k, v in result.items():
            summary[k] = v
        for k, v in self.extra.get("knn_random_init", {}).items():
            summary[f"{k}_random_init"] = v
        if "knn_subset_random_init" in self.extra:
            summary["knn_top1_subset_random_init"] = self.extra["knn_subset_random_init"]
        if self.monitor_s:
            summary["monitor_seconds"] = sum(self.monitor_s)  # the eval_every checks, within train_seconds
        if stopped:
            summary["interrupted"] = signal.Signals(stopped).name
            self.log(f"stopped by {summary['interrupted']} after {self.step} steps: "
                     f"checkpoint {self.ckpt_path}")
        elif self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self._write_curves(summary)
        if self.tb is not None:
            self.tb.close()
        return summary

    def _write_curves(self, summary: dict[str, Any]) -> None:
        """curves.png (loss, LR, kNN over the steps) from metrics.jsonl; a note when matplotlib,
        an optional extra, is not installed."""
        try:
            from fastssl.viz.curves import plot_curves
        except ImportError as e:
            self.log(f"curves.png: not drawn ({e.name} is not installed: pip install 'fastssl[viz]')")
            return
        metrics = self.out / "metrics.jsonl"
        if metrics.is_file():
            plot_curves(metrics, self.out / "curves.png", summary)

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
        result of a step whose loss was NaN/inf. Under DDP the ranks agree on the first
        non-finite step (one all-reduce per flush, at steps every rank flushes at) so that
        every rank raises the same error instead of one raising while the others wait."""
        flat = torch.stack([v.float().reshape(()) for _, values in pending for v in values.values()]).tolist()
        numbers = iter(flat)
        for record, values in pending:
            record |= {k: next(numbers) for k in values}
        bad = next(((r["step"], r["loss"]) for r, _ in pending if not math.isfinite(r["loss"])), None)
        if self._flag_group is not None:
            # key = 4 * step + kind (nan, inf, -inf): the MIN is the first bad step, the same on every rank
            kinds = {"nan": 0, "inf": 1, "-inf": 2}
            key = torch.tensor([4 * bad[0] + kinds[str(bad[1])] if bad else 2**62], dtype=torch.int64)
            dist.all_reduce(key, op=dist.ReduceOp.MIN, group=self._flag_group)
            k = int(key.item())
            bad = None if k == 2**62 else (k // 4, float(list(kinds)[k % 4]))
        for record, _ in pending:
            if bad is not None and record["step"] >= bad[0]:
                break
            self._log_step(record)
        last = pending[-1][0]["loss"]
        pending.clear()
        if bad is not None:
            kept = (f"the last good checkpoint {self.ckpt_path} (step {self._saved_step}) is left intact"
                    if self._saved_step is not None else "no checkpoint had been written yet")
            where = " on at least one rank" if self.world > 1 else ""
            raise NonFiniteLossError(
                f"loss is {bad[1]} at step {bad[0]} (epoch {bad[0] // self.steps_per_epoch}){where}; "
                f"stopped; {kept}. Try a lower base_lr or a longer warmup_epochs.")
        return last

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return f"{torch.cuda.get_device_name(self.device)} x{self.world}"
        return f"cpu ({torch.get_num_threads()} threads) x{self.world}"
