"""Faults met through the real command line: a NaN stop, two runs on one folder, a resume
that changes the run, a folder of the other checkpoint format or without its checkpoint, a
full disk, a damaged sharded checkpoint, a lost peer, shards without labels. Each gives one
line and exit status 2 (1 for the NaN stop), with nothing on disk lost."""

import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from dist_utils import _free_port
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from test_cli import REPO, _children, _cli, _image_folder, _refused, _snapshot, _steps_and_losses, _tiny_args

from fastssl.engine.checkpoint import load_checkpoint


def _finite(state) -> list[str]:
    """Names of the non-finite floating tensors anywhere in a checkpoint's state."""
    bad = []

    def walk(x, name):
        if torch.is_tensor(x):
            if x.is_floating_point() and not torch.isfinite(x).all():
                bad.append(name)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{name}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{name}/{i}")

    walk({"model": state["model"], "optimizer": state["optimizer"]}, "")
    return bad


@pytest.mark.slow
def test_nan_stop_keeps_a_finite_checkpoint_that_resumes(tmp_path):
    """base_lr=1e6: the weights blow up after step 3, the loss at step 4. The step-4 save is
    refused, so the checkpoint left is step 2's, finite, and a sane LR resumes from it."""
    _image_folder(tmp_path / "data")        # 2 steps per epoch
    run, data = tmp_path / "run", tmp_path / "data"
    common = ["--epochs", "4", "--out", run, "warmup_epochs=0"]
    result = _cli(*_tiny_args(data, *common, "base_lr=1e6"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line = next(x for x in result.stderr.splitlines() if "fastssl train: stopped" in x)
    assert "NaN or inf after step 4" in line and f"{run / 'last.pt'} (step 2) is left intact" in line, line
    state = load_checkpoint(run / "last.pt")
    assert state["step"] == 2 and _finite(state) == []
    resumed = _cli(*_tiny_args(data, *common, "base_lr=0.01", "--resume", "auto",
                               "--allow-change", "base_lr"))
    assert resumed.returncode == 0, resumed.stderr
    steps = _steps_and_losses(run)
    assert [s for s, _ in steps] == list(range(8)) and all(math.isfinite(v) for _, v in steps[2:])


@pytest.mark.slow
def test_two_ranks_stop_on_nan_with_one_line_each_and_a_finite_checkpoint(tmp_path):
    """torchrun, 2 ranks on gloo, base_lr=1e6: both ranks stop on the NaN with the same line naming
    the last checkpoint, which holds only finite tensors (resuming one with a sane LR: the test
    above; a torchrun restart rejoining: test_cli's killed-worker test)."""
    _image_folder(tmp_path / "data")        # 2 steps per epoch
    run, data = tmp_path / "run", tmp_path / "data"
    common = ["--epochs", "4", "--out", run, "warmup_epochs=0"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--master-port", str(_free_port()),
                "--nproc-per-node", "2"]
    result = subprocess.run([*torchrun, "-m", "fastssl.cli", *_tiny_args(data, *common, "base_lr=1e6")],
                            env=env, text=True, capture_output=True, timeout=400)
    err = result.stderr
    assert result.returncode != 0, err[-3000:]
    stops = re.findall(r"fastssl train: stopped: .*", err)
    assert len(stops) == 2 and len(set(stops)) == 1, err[-3000:]       # each rank, one line, the same
    saved = re.search(rf"checkpoint {re.escape(str(run / 'last.pt'))} \(step (\d+)\) is left", stops[0])
    assert saved, stops[0]
    state = load_checkpoint(run / "last.pt")
    assert state["step"] == int(saved.group(1)) and _finite(state) == []


@pytest.mark.slow
def test_a_second_run_on_a_folder_is_refused_and_a_dead_runs_lock_taken_over(tmp_path):
    _image_folder(tmp_path / "data", n_per_class=32)     # 8 steps per epoch
    run, data = tmp_path / "run", tmp_path / "data"
    args = _tiny_args(data, "--epochs", "100", "--out", run, "--resume", "auto")
    first = _cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None and not (run / "metrics.jsonl").exists():
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1]
        holder = (run / ".lock").read_text().split()
        assert holder[0] == str(first.pid)
        before = (run / "config.yaml").read_bytes()
        line = _refused(_cli(*args), str(run), f"process {first.pid}", "in use by another run")
        assert (run / "config.yaml").read_bytes() == before, line
    finally:
        first.kill()
        first.communicate()
    # The killed run's lock is stale: the next run takes it over and finishes.
    result = _cli(*_tiny_args(data, "--epochs", "100", "--out", run, "--resume", "auto", "max_steps=1"))
    assert result.returncode == 0, result.stderr
    assert f"taking over the lock of process {first.pid}" in result.stderr
    assert not (run / ".lock").exists()


@pytest.mark.slow
def test_resume_refuses_what_changes_the_run_unless_allowed(tmp_path):
    _image_folder(tmp_path / "data")
    run, data = tmp_path / "run", tmp_path / "data"
    assert _cli(*_tiny_args(data, "--epochs", "1", "--out", run)).returncode == 0
    before = _snapshot(run)
    resume = ["--epochs", "1", "--out", run, "--resume", "auto"]
    # sgd -> adamw: named as the change it is, not as a model that does not fit.
    _refused(_cli(*_tiny_args(data, *resume, "optimizer=adamw")), "optimizer=sgd", "optimizer=adamw",
             "--allow-change optimizer")
    _refused(_cli(*_tiny_args(data, *resume, "image_size=20")), "image_size=16", "image_size=20")
    # The same folder name with other content is other data.
    png = sorted((data / "train" / "dark").iterdir())[0]
    img = Image.open(png)
    img.load()
    changed = PngInfo()
    changed.add_text("edited", "yes")  # still a whole PNG, of another size: other data
    img.save(png, pnginfo=changed)
    _refused(_cli(*_tiny_args(data, *resume)), "other data", "16 samples", "--allow-change data")
    assert _snapshot(run) == before          # config.yaml and the rest untouched by a refusal
    result = _cli(*_tiny_args(data, "--epochs", "2", "--out", run, "--resume", "auto", "--extend",
                              "optimizer=adamw", "--allow-change", "optimizer", "--allow-change", "data"))
    assert result.returncode == 0, result.stderr
    assert "optimizer sgd -> adamw: its state starts afresh" in result.stderr
    assert [s for s, _ in _steps_and_losses(run)] == [0, 1, 2, 3]


def _to_sharded(run: Path) -> None:
    """Turn a finished plain run into the folder a parallel=fsdp run leaves: last.dcp, no last.pt."""
    from fastssl.engine import build_optimizer
    from fastssl.engine.sharded_checkpoint import save_sharded
    from fastssl.runs import load_trained_method

    method, state = load_trained_method(run)
    optimizer = build_optimizer(method.cfg, method.parameter_groups())
    optimizer.load_state_dict(state["optimizer"])
    save_sharded(run, state["step"], method, optimizer,
                 {k: v for k, v in state.items() if k not in ("model", "optimizer")} | {"world_size": 1})
    (run / "last.pt").unlink()


@pytest.mark.slow
def test_a_run_is_never_started_over_by_resume_auto(tmp_path):
    """A sharded run resumed without parallel=fsdp, and a run whose checkpoint is gone: refused,
    every file kept (they used to be replaced by a fresh run)."""
    _image_folder(tmp_path / "data")
    data = tmp_path / "data"
    for name in ("sharded", "lost"):
        assert _cli(*_tiny_args(data, "--epochs", "1", "--out", tmp_path / name)).returncode == 0
    _to_sharded(tmp_path / "sharded")
    (tmp_path / "lost" / "last.pt").unlink()
    for name, needed in (("sharded", ["last.dcp", "parallel=fsdp"]),
                         ("lost", ["no checkpoint", "--overwrite"])):
        run = tmp_path / name
        before = _snapshot(run)
        _refused(_cli(*_tiny_args(data, "--epochs", "1", "--out", run, "--resume", "auto")), str(run),
                 *needed)
        assert _snapshot(run) == before


@pytest.mark.slow
def test_a_damaged_sharded_checkpoint_is_named_by_eval_resume_and_export(tmp_path):
    _image_folder(tmp_path / "data")
    data, run = tmp_path / "data", tmp_path / "run"
    assert _cli(*_tiny_args(data, "--epochs", "1", "--out", run)).returncode == 0
    _to_sharded(run)
    shard = next((run / "last.dcp").resolve().glob("*.distcp"))
    commands = (["eval", "--checkpoint", run], ["export", run, "--out", tmp_path / "b.pt"],
                _tiny_args(data, "--epochs", "1", "--out", tmp_path / "new", "--resume", run / "last.dcp"))
    good = shard.read_bytes()
    for damage, what in ((lambda: shard.write_bytes(good[: len(good) // 2]), "is truncated"),
                         (shard.unlink, "is missing")):
        damage()
        for command in commands:
            _refused(_cli(*command), "last.dcp", shard.name, what)
    assert not (tmp_path / "b.pt").exists()


@pytest.mark.slow
def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, small_disk):
    """A ~650 KB checkpoint fits once in 1 MiB; the next save, beside it, does not."""
    _image_folder(tmp_path / "data")
    data, run = tmp_path / "data", small_disk / "run"
    assert _cli(*_tiny_args(data, "--epochs", "1", "--out", run)).returncode == 0
    resume = ["--epochs", "2", "--out", run, "--resume", "auto", "--extend"]
    line = _refused(_cli(*_tiny_args(data, *resume)),
                    f"no space left on device while writing {run / 'last.pt'}; the previous checkpoint "
                    f"{run / 'last.pt'} (step 2) is intact")
    assert load_checkpoint(run / "last.pt")["step"] == 2, line
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []      # no temp file, no lock
    before = _snapshot(run)
    # Now no room at all: the resume's first write fails; every file keeps its bytes, no temp file.
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    _refused(_cli(*_tiny_args(data, *resume)), "no space left on device while writing", str(run))
    assert _snapshot(run) == before
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


def _rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK=")).split(b"=", 1)[1])


@pytest.mark.slow
def test_a_lost_peer_is_named_with_the_last_checkpoint(tmp_path):
    """torchrun, 2 ranks on gloo; rank 1 is SIGKILLed after the first checkpoint: rank 0 says
    which rank it lost and where the last checkpoint is, and exits 2, well within dist_timeout_s."""
    _image_folder(tmp_path / "data", n_per_class=32)
    run = tmp_path / "run"
    args = _tiny_args(tmp_path / "data", "--epochs", "100", "--out", run, "checkpoint_every=2",
                      "dist_timeout_s=60")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.Popen([*torchrun, "-m", "fastssl.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, killed_at = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and killed_at is None:
        workers = _children(proc.pid)
        if (run / "last.pt").exists() and len(workers) == 2:
            os.kill(next(w for w in workers if _rank_of(w) == 1), signal.SIGKILL)
            killed_at = time.time()
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    assert killed_at is not None, err[-3000:]
    assert time.time() - killed_at < 60
    lost = f"lost contact with rank 1 (peer process ended); last checkpoint: {run / 'last.pt'}"
    assert lost in err, err[-3000:]
    # the survivor's own exit status (2) is not asserted: torchrun, seeing the killed rank, may
    # SIGTERM the survivor right after its line, and which comes first is the scheduler's choice


def test_weak_on_shards_without_class_labels_says_to_build_a_vocabulary(tmp_path):
    """img2dataset's layout: an image and a caption per sample, no .cls, no manifest."""
    from PIL import Image

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for i in range(8):
            png = tmp_path / f"{i}.png"
            Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(png)
            tar.add(png, arcname=f"{i:05d}.png")
            caption = tmp_path / f"{i}.txt"
            caption.write_text(f"a photo #tag{i % 2}")
            tar.add(caption, arcname=f"{i:05d}.txt")
    result = _cli("train", "--method", "weak", "--data", shards, "--backbone", "resnet8", "--batch-size", "4",
                  "image_size=16", "num_threads=1", "loader=torchvision", "eval_knn=false", "--epochs", "1",
                  "--out", tmp_path / "run")
    _refused(result, "these shards have no class labels", "fastssl vocab", "vocabulary=")
    assert not (tmp_path / "run").exists()


def test_every_error_class_the_cli_meets_is_one_line():
    """fastssl.cli_errors.report on the exceptions torch and the OS raise for these faults."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    from fastssl.cli_errors import report

    cases = [
        (MemoryError(), 2, "out of host memory"),
        (OverflowError("cannot convert float infinity to integer"), 2, "a number too large to use"),
        (OSError(errno.ENOSPC, "No space left on device", "/runs/a/last.pt"), 2,
         "no space left on device while writing /runs/a/last.pt"),
        (OSError(errno.EACCES, "Permission denied", "/runs/a"), 2, "Permission denied: /runs/a; check"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 2, "out of GPU memory"),
        (RuntimeError("[pair.cc:534] Connection closed by peer [127.0.0.1]:4711"), 2, "lost contact"),
        (CheckpointException("load failed", {0: (ValueError("size mismatch"), None)}), 2,
         "a sharded checkpoint could not be read or written (size mismatch)"),
        (KeyError("x"), 1, "unexpected KeyError"),
    ]
    for error, status, text in cases:
        got, line = report(error)
        assert (got, "\n" in line) == (status, False) and text in line, (error, line)
