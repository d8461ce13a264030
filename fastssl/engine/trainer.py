"""The training loop, composed of the run's components.

One `Trainer.fit()` call is one run. The method owns its networks and loss; the loader (this
rank's shard) yields batches; the optional `evaluator` (fastssl.eval.build_evaluator) scores the
method's encoder on every rank. The Trainer owns the loop, the schedules, autocast and the
optimizer step; the rest is one component each: engine.run (where the run executes),
engine.run_folder (its folder, summary.json), engine.checkpointer (either format),
engine.signals (stops, the ranks' agreements), engine.metrics_log and engine.budget."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastssl.engine.budget import TimeBudget
from fastssl.engine.checkpoint import NoSpaceError, rng_state, set_rng_state
from fastssl.engine.checkpointer import first_nonfinite, make_checkpointer, read_checkpoint
from fastssl.engine.config import config_to_dict, flat_config
from fastssl.engine.flops import StepFlops
from fastssl.engine.metrics_log import MetricsLog
from fastssl.engine.optim import build_optimizer
from fastssl.engine.parallel import (
    batch_to_device,
    compile_method,
    gradient_sync,
    split_micro_batches,
    wrap_for_training,
)
from fastssl.engine.resume_check import check_allowed, check_resume, data_fingerprint
from fastssl.engine.run import (
    RunContext,
    deterministic_algorithms,
    device_name,
    epoch_batches,
    evaluate,
    init_run,
    torchrun_restart,
)
from fastssl.engine.run_folder import RunFolder, new_run_dir
from fastssl.engine.schedules import build_schedules
from fastssl.engine.signals import RankAgreement, StopSignals
from fastssl.method import Method, StepContext

Evaluator = Callable[[nn.Module], dict[str, float]]
# Called on rank 0 with (run folder, summary) once summary.json is written (the CLI draws curves.png).
SummaryHook = Callable[[Path, dict[str, Any]], None]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped before that step's update."""


class Trainer:
    """Runs `method` on `loader` for cfg.optim.epochs (or cfg.run.max_steps) and writes into cfg.run.out:
    config.yaml (resolved config), metrics.jsonl (one JSON object per step), last.pt
    (atomic checkpoint every cfg.run.checkpoint_every steps and at each epoch end) and
    summary.json. `run` (fastssl.engine.run.init_run; made here when not given) holds the
    global batch, run.batch_size; the loader yields this rank's share, run.batch_per_rank.

    cfg.run.out "" picks a fresh runs/<method>-<UTC time> (written back into cfg.run.out and logged).
    resume: None (fresh run), "auto" (continue from OUT/last.pt when it exists) or a path. A
    worker that torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0) resumes "auto" on its own.
    A fresh run into a folder that holds a run (RUN_FILES) is refused unless overwrite=True,
    which deletes those files first. Resuming with other epochs than the checkpoint's is
    refused unless extend=True (the schedules re-spread); any other change of what the run
    means unless allow_change names the key (fastssl.engine.resume_check).
    SIGINT, SIGTERM and SIGUSR1 during training stop every rank after the same step, write a
    checkpoint and return the summary with "interrupted" set (no final evaluation, no
    summary.json); a second SIGINT raises KeyboardInterrupt at once.
    monitor: a cheap evaluator (kNN on a fixed subsample) run every cfg.eval.eval_every epochs and
    at the last step; its result goes into that step's metrics.jsonl record as `knn_top1_subset`
    and into the progress line. on_summary: called on rank 0 with (run folder, summary) after
    summary.json is written (the CLI draws curves.png with it).
    time_budget_s: wall-clock budget of fit() (training and evaluations). After timing the
    first steps, and again every 50 steps on the latest speed, the run's length is set to the
    steps that fit (at most cfg.optim.epochs): the schedules are re-spread over it, so the run still
    ends with a full cosine decay. A resumed run keeps the length recorded in its checkpoint."""

    def __init__(self, method: Method, loader: Iterable, *, evaluator: Evaluator | None = None,
                 resume: str | None = None, progress: bool = True, tensorboard: bool = False,
                 log: Callable[[str], None] | None = None, time_budget_s: float | None = None,
                 monitor: Evaluator | None = None, overwrite: bool = False, extend: bool = False,
                 run: RunContext | None = None, on_summary: SummaryHook | None = None,
                 allow_change: Iterable[str] = ()):
        self._t_created = time.perf_counter()  # summary.json's total_seconds count from here
        self.cfg = cfg = method.cfg
        self.method, self.loader, self.evaluator, self.monitor = method, loader, evaluator, monitor
        self.on_summary = on_summary
        self.run = run if run is not None else init_run(cfg)
        self.rank, self.world, self.device = self.run.rank, self.run.world, self.run.device
        self.is_main = self.run.is_main
        self.progress = progress and self.is_main
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if not cfg.run.out:
            cfg.run.out = str(new_run_dir(method.name, is_main=self.is_main, world=self.world))
            self.log(f"out: {cfg.run.out} (a new run folder; --out DIR names one)")
        self.out = Path(cfg.run.out)
        resume, overwrite = torchrun_restart(resume, overwrite, out=self.out, log=self.log)
        self.extend = extend
        self.allow_change = check_allowed(allow_change, cfg)
        # what the checkpoint records of the data, compared on resume (fastssl.engine.resume_check)
        self.data_fingerprint = data_fingerprint(getattr(loader, "source", None))
        self.folder = RunFolder(self.out, is_main=self.is_main, world=self.world, log=self.log)
        # parallel=fsdp / hsdp: every rank writes its shards (fastssl.engine.sharded_checkpoint)
        self.checkpointer = make_checkpointer(cfg.dist.parallel, self.out, is_main=self.is_main,
                                              world=self.world, async_save=cfg.run.async_checkpoint)
        # Ranks agree on a stop (signal) and on a non-finite loss through this CPU group.
        self.agreement = RankAgreement(self.world, cfg.dist.dist_timeout_s)
        self.signals = StopSignals(self.log)
        self._saved_step: int | None = None  # the step of the checkpoint on disk, when this run knows one
        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch < 1:
            raise ValueError("loader: expected at least one batch per epoch, got 0 "
                             "(dataset smaller than the batch?)")
        every = cfg.eval.eval_every
        self.eval_interval = max(1, round(every * self.steps_per_epoch)) if every else 0
        self.monitor_s: list[float] = []  # seconds of each monitor call (the time budget counts them)
        if cfg.run.deterministic:
            # cuBLAS reads this when its handle is created: set it before the first CUDA matmul.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.planned_steps = cfg.optim.epochs * self.steps_per_epoch
        self.max_steps = self.planned_steps if cfg.run.max_steps is None else cfg.run.max_steps
        self.total_steps = self.stop_step = 0
        self.schedules: dict[str, Any] = {}
        self._set_total_steps(self.planned_steps)
        self.time_budget_s = time_budget_s
        self.budget: TimeBudget | None = None  # set when fit() starts the clock, unless the length is known

        method.to(self.device)
        if cfg.model.sync_bn:
            if self.world > 1 and self.device.type == "cuda":
                method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
            else:
                self.log("sync_bn: not converting BatchNorm (needs > 1 CUDA process)")
        if cfg.model.channels_last:
            method.to(memory_format=torch.channels_last)
        compile_method(method, cfg.model.compile, self.device, log=self.log)
        self.flops = StepFlops.of(method, self.run.batch_per_rank // cfg.dist.accum_steps,
                                  cfg.dist.accum_steps, self.device, log=self.log)
        self.model: nn.Module = wrap_for_training(method, cfg, self.device, self.world, log=self.log)
        self.optimizer = build_optimizer(cfg, method.parameter_groups())
        # bf16 needs no loss scaling; the scaler is kept (disabled) so checkpoints have one format.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16,
                             enabled=self.device.type == "cuda")
        self.step = 0
        self.extra: dict[str, Any] = {}  # results carried across resumes (random-init kNN)
        self._bar = None  # the epoch's progress bar, closed however the loop ends
        self._rng_to_restore: dict[str, Any] | None = None  # a resumed rank's RNG, set before its first batch
        # (seconds training, images, latest loss) of this fit: the summary reads them
        self._loop_stats: tuple[float, int, float] = (0.0, 0, float("nan"))
        self.folder.check(resume=resume, overwrite=overwrite)
        self.folder.lock()  # released when fit() ends, or here when the set-up fails
        try:
            self.metrics = MetricsLog(self.out, write=self.is_main, tensorboard=tensorboard,
                                      agree=self.agreement.first_nonfinite if self.world > 1 else None)
            self._overwrite = overwrite and resume is None
            if resume is not None:
                self._resume(resume)
        except BaseException:
            self.folder.unlock()
            raise

    @property
    def ckpt_path(self) -> Path:
        """Where this run's checkpoint goes: OUT/last.pt, or OUT/last.dcp under parallel=fsdp."""
        return self.checkpointer.path

    def _set_total_steps(self, total: int) -> None:
        self.total_steps = total
        self.stop_step = min(self.max_steps, total)
        self.schedules = build_schedules(self.cfg, self.steps_per_epoch, total) | self.method.schedules(
            total, self.steps_per_epoch)

    # ----------------------------------------------------------------- checkpoints
    def _resume(self, resume: str) -> None:
        if resume == "auto":
            path = self.checkpointer.latest()
            if path is None:
                self.folder.check_no_run(self.ckpt_path.name)
                self.log(f"resume auto: no {self.ckpt_path}, starting fresh")
                return
        else:
            path = Path(resume)
        checkpoint = read_checkpoint(path, method=self.method.name)
        state = checkpoint.state
        if state["batch_size"] != self.run.batch_size or state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"resume: checkpoint {str(path)!r} was written with "
                             f"batch_size={state['batch_size']}, steps_per_epoch={state['steps_per_epoch']}; "
                             f"this run has {self.run.batch_size}, {self.steps_per_epoch}")
        saved, epochs_now = flat_config(state["config"]), self.cfg.optim.epochs
        epochs = saved.get("epochs")
        same_optimizer = check_resume(str(path), state, self.cfg, data=self.data_fingerprint,
                                      extend=self.extend, allowed=self.allow_change, log=self.log)
        try:
            checkpoint.load_into(self.method, self.model, self.optimizer if same_optimizer else None)
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0]
            raise ValueError(f"resume: checkpoint {str(path)!r} ({state['method']}, backbone "
                             f"{saved.get('backbone')}) does not fit this run's model "
                             f"(backbone {self.cfg.model.backbone}): {first}") from e
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.extra = state["step"], state["extra"]
        self._saved_step = self.step
        if epochs != self.cfg.optim.epochs:
            self.extra.pop("total_steps", None)  # extended: the new length replaces a time budget's
            self.log(f"resume: extending from epochs={epochs} to {epochs_now}: schedules re-spread over "
                     f"{self.total_steps} steps; at step {self.step} the LR is "
                     f"{float(self.schedules['lr'][min(self.step, self.total_steps - 1)]):.3g}")
        if "total_steps" in self.extra:  # a time-budgeted run keeps the length it chose
            self._set_total_steps(self.extra["total_steps"])
        self._rng_to_restore = state["rng"][self.rank] if self.rank < len(state["rng"]) else None
        self.log(f"resumed from {path} at step {self.step} (epoch {self.step // self.steps_per_epoch})")

    def _kept(self) -> str:
        """What a run stopped by a fault leaves behind, for its message."""
        return ("no checkpoint had been written yet" if self._saved_step is None else
                f"the last good checkpoint {self.ckpt_path} (step {self._saved_step}) is left intact")

    def save(self) -> None:
        """Checkpoint of everything the next step depends on (RNG of all ranks), published atomically;
        refused (NonFiniteLossError) when a tensor in it is NaN/inf on any rank."""
        bad = first_nonfinite(self.method, self.optimizer)
        if self.agreement.any(bad is not None):
            raise NonFiniteLossError(
                f"{bad or 'a tensor on another rank'} holds NaN or inf after step {self.step}; stopped "
                f"without saving it; {self._kept()}. Try a lower base_lr or a longer warmup_epochs.")
        rng = [rng_state()]
        if self.world > 1:
            rng = [None] * self.world
            dist.all_gather_object(rng, rng_state())
        meta = {
            "scaler": self.scaler.state_dict(), "step": self.step,
            "epoch": self.step // self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
            "batch_size": self.run.batch_size, "rng": rng, "extra": self.extra,
            "config": config_to_dict(self.cfg), "method": self.method.name,
            "data_fingerprint": self.data_fingerprint,
        }
        try:
            self.checkpointer.save(step=self.step, method=self.method, model=self.model,
                                   optimizer=self.optimizer, meta=meta)
        except NoSpaceError as e:
            e.kept = (f"the previous checkpoint {self.ckpt_path} (step {self._saved_step}) is intact"
                      if self._saved_step is not None else "no checkpoint had been written yet")
            raise
        self._saved_step = self.step

    # ----------------------------------------------------------------- evaluation
    def _evaluate(self, evaluator: Evaluator | None = None) -> dict[str, float]:
        evaluator = evaluator or self.evaluator
        return {} if evaluator is None else evaluate(self.method, evaluator, self.device, self.autocast)

    # ----------------------------------------------------------------- loop
    def _prepare_run_folder(self) -> None:
        """Clear what an overwrite replaces and what a killed save left, drop metrics rows at or
        past the step this run starts from (they are trained again), write config.yaml."""
        self.folder.prepare(self.cfg, overwrite=self._overwrite)
        for tmp in self.checkpointer.remove_stale():
            self.log(f"removed {tmp.name}, left by a save that was killed")
        self.metrics.keep_before(self.step)
    def fit(self) -> dict[str, Any]:
        """See _fit; with cfg.run.deterministic, deterministic kernels (and no cuDNN autotuning) for the
        run only: the process's settings are restored afterwards. A collective failing because a
        peer is gone raises PeerLostError naming it and the last checkpoint."""
        try:
            with deterministic_algorithms(self.cfg.run.deterministic):
                return self._fit()
        except Exception as e:
            self.agreement.raise_if_peer_lost(e, self.ckpt_path if self._saved_step is not None else None)
            raise
        finally:
            self.folder.unlock()

    def _fit(self) -> dict[str, Any]:
        """Train until cfg.optim.epochs * len(loader) steps (or cfg.run.max_steps), evaluate, write
        summary.json; returns the summary. Raises NonFiniteLossError on a NaN/inf loss (on
        every rank, after they agree). A stop signal ends the run early with a checkpoint
        and the summary's "interrupted" set to the signal's name."""
        cfg, spe = self.cfg, self.steps_per_epoch
        self._prepare_run_folder()
        self.log(f"{self.method.name}: {cfg.model.backbone}, {self.world} process(es) on {self.device}, "
                 f"{'bf16 autocast' if self.autocast['enabled'] else 'fp32'}, fused={cfg.model.fused}, "
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
        if self.time_budget_s is not None and "total_steps" not in self.extra:
            self.budget = TimeBudget(self.time_budget_s, start=t_fit, planned_steps=self.planned_steps,
                                     steps_per_epoch=spe, world=self.world, log=self.log)

        self.method.train()
        t_start = time.perf_counter()
        try:
            with self.signals:
                stopped = self._loop(eval_s)
        finally:
            self.checkpointer.wait()  # an asynchronous save in flight is published before the run ends
            if self._bar is not None:  # before an error's line, which is then the last one printed
                self._bar.close()
            self.agreement.close()
        return self._finish(stopped, t_start)

    def _loop(self, eval_s: float) -> int:
        """The training steps; returns the signal number that stopped them (0: ran to stop_step).
        eval_s: seconds the final evaluation is expected to take (the time budget keeps them)."""
        cfg, spe = self.cfg, self.steps_per_epoch
        train_time, images, last_loss = 0.0, 0, float("nan")
        self._loop_stats = (train_time, images, last_loss)
        knn_text = ""
        while self.step < self.stop_step:
            epoch, skip = divmod(self.step, spe)
            batches = epoch_batches(self.loader, epoch, skip)
            if self._rng_to_restore is not None:
                set_rng_state(self._rng_to_restore)
                self._rng_to_restore = None
            bar = None
            if self.progress:
                from tqdm import tqdm
                bar = tqdm(total=min(spe, self.stop_step - epoch * spe), initial=skip, desc=f"epoch {epoch}",
                           mininterval=2.0, file=sys.stderr, dynamic_ncols=True)
                self._bar = bar
            t_prev = time.perf_counter()
            wait_acc = time_acc = 0.0
            while skip < spe and self.step < self.stop_step:
                batch = next(batches, None)
                if batch is None:
                    raise RuntimeError(f"loader: yielded fewer batches ({skip}) than len(loader)={spe}")
                batch = batch_to_device(batch, self.device, cfg.model.channels_last)
                t_data = time.perf_counter()
                record, values = self._train_step(batch, epoch)
                t_now = time.perf_counter()
                n_img = batch["views"][0].shape[0] * self.world
                step_time, wait = t_now - t_prev, t_data - t_prev
                train_time, images = train_time + step_time, images + n_img
                wait_acc, time_acc = wait_acc + wait, time_acc + step_time
                record |= {"img_per_s": n_img / step_time, "data_wait": wait / step_time,
                           **self.flops.rates(step_time)}
                self.metrics.add(record, values)
                self.step += 1
                skip += 1
                monitored = self.monitor is not None and self.eval_interval and (
                    self.step % self.eval_interval == 0 or self.step == self.stop_step)
                if monitored:
                    t_monitor = time.perf_counter()
                    record["knn_top1_subset"] = self._evaluate(self.monitor)["knn_top1"]
                    self.monitor_s.append(time.perf_counter() - t_monitor)
                    knn_text = f"{record['knn_top1_subset']:.1%}"
                if self.budget is not None:
                    self._apply_time_budget(step_time, eval_s)
                stop = self.agreement.stop(self.signals.received or 0)
                will_save = (skip == spe or self.step == self.stop_step or stop
                             or (cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0))
                if will_save or monitored or self.step % max(cfg.run.log_every, 1) == 0:
                    last_loss = self._flush()
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.3g}",
                                        img_s=f"{images / train_time:.0f}", data=f"{wait_acc / time_acc:.0%}",
                                        **{k: f"{record[k]:.3g}" for k in ("tflops", "mfu") if k in record},
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
            "method": self.method.name, "backbone": cfg.model.backbone,
            "epochs": round(self.step / spe, 3), "epochs_planned": round(self.total_steps / spe, 3),
            "epochs_configured": cfg.optim.epochs,
            "steps": self.step, "total_steps": self.total_steps, "batch_size": self.run.batch_size,
            "images_per_second": images / train_time if train_time else None,
            "final_loss": last_loss, "train_seconds": wall, "device": device_name(self.device, self.world),
            "world_size": self.world, "fused": cfg.model.fused,
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
        else:
            # from the Trainer's creation: model set-up and every evaluation included
            summary["total_seconds"] = time.perf_counter() - self._t_created
            self.folder.write_summary(summary)
            if self.on_summary is not None and self.is_main:
                self.on_summary(self.out, summary)
        self.metrics.close()
        return summary

    def _train_step(self, batch: dict, epoch: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """One optimizer step on `batch`; returns (the step's plain record, its one-element
        tensors left on the device for the next flush)."""
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
        # Gradient accumulation: accum_steps micro-batches whose mean losses are averaged, gradients
        # synchronised on the last one only (a method that accumulates_itself gets the whole batch).
        n = 1 if self.method.accumulates_itself else self.cfg.dist.accum_steps
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
        if self.cfg.optim.clip_grad:
            nn.utils.clip_grad_norm_(self.method.parameters(), self.cfg.optim.clip_grad)
        self.optimizer.step()
        self.method.after_optimizer_step(ctx)
        record = {"step": s, "epoch": epoch, "lr": lr, "weight_decay": wd} | ctx.schedules
        # Scalars stay on the device until _flush reads a window of steps at once: no host sync per step.
        values = {k: v.detach() for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        record |= {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}
        return record, values

    def _flush(self) -> float:
        """Read the pending steps' losses and metrics in one transfer, append their rows to
        metrics.jsonl, stop on a non-finite loss; returns the latest loss. Called every
        cfg.run.log_every steps and before every checkpoint, so a checkpoint never holds the
        result of a step whose loss was NaN/inf. Under DDP the ranks agree on the first
        non-finite step (one all-reduce per flush, at steps every rank flushes at) so that
        every rank raises the same error instead of one raising while the others wait."""
        last, bad = self.metrics.flush()
        if bad is not None:
            where = " on at least one rank" if self.world > 1 else ""
            raise NonFiniteLossError(
                f"loss is {bad[1]} at step {bad[0]} (epoch {bad[0] // self.steps_per_epoch}){where}; "
                f"stopped; {self._kept()}. Try a lower base_lr or a longer warmup_epochs.")
        return last

    def _apply_time_budget(self, step_time: float, eval_s: float) -> None:
        """Feed a step's time to the budget; at a calibration point adopt the length that fits."""
        extra = 0.0
        if self.monitor_s and self.eval_interval:
            extra = sum(self.monitor_s) / len(self.monitor_s) / self.eval_interval
        total = self.budget.after_step(step_time, step=self.step, total_steps=self.total_steps, eval_s=eval_s,
                                       extra_s_per_step=extra)
        if total is None:
            return
        if total != self.total_steps:
            self._set_total_steps(total)
        self.extra["total_steps"] = self.total_steps
