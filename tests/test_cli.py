import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import forked
import numpy as np
import pytest
import torch
import yaml
from dist_utils import _free_port
from PIL import Image

import fastssl.data
from fastssl.cli import main
from fastssl.data import recipes
from fastssl.engine.config import flat_config


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_unknown_method(capsys):
    err = _error(capsys, ["train", "--method", "byol"])
    assert "--method: expected one of" in err and "mocov2" in err and "'byol'" in err


def test_missing_data_path(capsys, tmp_path):
    err = _error(capsys, ["train", "--method", "rotnet", "--data", str(tmp_path / "nowhere")])
    assert "--data: expected 'fashion-mnist', 'colour-shapes' or an existing image folder" in err
    assert "nowhere" in err


def test_colorization_defaults_to_the_colour_set_and_refuses_grayscale(capsys):
    assert main(["train", "--method", "colorization", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["source"] == "colour-shapes" and cfg["data"]["image_size"] == 32   # its preset
    err = _error(capsys, ["train", "--method", "colorization", "--data", "fashion-mnist", "max_steps=1"])
    assert "colorization needs colour images" in err and "grayscale" in err


def test_bad_override_key(capsys):
    err = _error(capsys, ["train", "--method", "mocov2", "tempreture=0.1"])
    assert "unknown key 'tempreture'" in err and "temperature" in err
    err = _error(capsys, ["train", "--method", "mocov2", "queue_size=many"])
    assert "queue_size" in err and "'many'" in err
    err = _error(capsys, ["train", "--method", "mocov2", "noequals"])
    assert "expected key=value" in err


def test_bench_unknown_name_and_bad_checkpoint(capsys, tmp_path):
    assert "bench: expected names among" in _error(capsys, ["bench", "no_such_bench"])
    err = _error(capsys, ["eval", "--checkpoint", str(tmp_path / "x.pt")])
    assert "checkpoint: expected an existing file" in err


def _image_folder(root, n_per_class=8):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("dark", "bright")):
            (root / split / name).mkdir(parents=True)
            for i in range(n_per_class):
                pixels = rng.integers(0, 100, (16, 16, 3)) + 150 * c
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")


@pytest.mark.slow
def test_train_then_eval_end_to_end(capsys, tmp_path):
    _image_folder(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", "--method", "rotnet", "--data", str(tmp_path / "data"), "--backbone", "resnet8",
            "--epochs", "2", "--batch-size", "8", "--out", str(out), "image_size=16", "num_threads=1",
            "loader=torchvision", "log_every=1"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "backbone", "epochs", "steps", "images_per_second", "knn_top1",
                "knn_top1_random_init", "device"):
        assert key in summary, key
    assert summary["method"] == "rotnet" and summary["steps"] == 4 and summary["epochs"] == 2
    assert 0.0 <= summary["knn_top1"] <= 1.0
    assert "image_size: 16" in (out / "config.yaml").read_text()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert "kNN top-1" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out / "last.pt")]) == 0
    printed = capsys.readouterr().out
    assert "kNN top-1" in printed and "linear probe top-1" in printed


def test_weak_method_trains_on_its_resampling_sampler(monkeypatch, tmp_path):
    import fastssl.data
    from fastssl.data import ResamplingSampler

    _image_folder(tmp_path / "data")
    seen = {}
    real_build_loader = fastssl.data.build_loader

    def recording_build_loader(source, recipe, **kwargs):
        seen.setdefault("samplers", []).append(kwargs.get("sampler"))
        return real_build_loader(source, recipe, **kwargs)

    monkeypatch.setattr(fastssl.data, "build_loader", recording_build_loader)
    argv = ["train", "--method", "weak", "--data", str(tmp_path / "data"), "--backbone", "resnet8",
            "--loss", "sigmoid", "--sampling", "sqrt", "--epochs", "1", "--batch-size", "8",
            "--out", str(tmp_path / "run"), "image_size=16", "num_threads=1", "num_classes=2",
            "loader=torchvision", "eval_knn=false"]
    assert main(argv) == 0
    pretrain_sampler = seen["samplers"][0]
    assert isinstance(pretrain_sampler, ResamplingSampler) and pretrain_sampler.mode == "sqrt"
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "loss: sigmoid" in config and "sampling: sqrt" in config


def test_loss_flag_is_rejected_by_methods_without_it(capsys):
    err = _error(capsys, ["train", "--method", "mocov2", "--loss", "sigmoid"])
    assert "unknown key 'loss'" in err


@pytest.mark.parametrize("method, backbone, size",
                         [("mocov2", "resnet8", 28), ("mae", "vit_tiny_patch4", 28), ("clip", "resnet8", 28)])
def test_fashion_mnist_runs_start_from_the_methods_preset(tmp_path, method, backbone, size):
    """--data fashion-mnist takes the method's small-image preset (not its ImageNet defaults);
    flags and key=value overrides still win over it."""
    import yaml

    out = tmp_path / "run"
    argv = ["train", "--method", method, "--data", "fashion-mnist", "--batch-size", "64", "--out", str(out),
            "max_steps=0", "eval_knn=false", "num_threads=1", "loader=torchvision", "seed=3"]
    assert main(argv) == 0
    config = flat_config(yaml.safe_load((out / "config.yaml").read_text()))
    assert (config["backbone"], config["image_size"]) == (backbone, size)
    assert (config["batch_size"], config["seed"]) == (64, 3)


# ---------------------------------------------------------------- runs and mistakes through the CLI
REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """`fastssl ARGS` in a process of its own, forked from the tests' fork server (forked.py); a
    fresh interpreter (subprocess.Popen) when `popen` options are given."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if popen:
        cmd = [sys.executable, "-m", "fastssl.cli", *map(str, args)]
        return subprocess.Popen(cmd, cwd=cwd, env=env, text=True, **popen)
    return forked.run_module("fastssl.cli", args, env=env, cwd=cwd, timeout=300)


def _tiny_args(data, *extra):
    return ["train", "--method", "rotnet", "--data", str(data), "--backbone", "resnet8", "--batch-size", "8",
            "image_size=16", "num_threads=1", "loader=torchvision", "eval_knn=false", "log_every=1",
            *map(str, extra)]


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _refused(result, *names) -> str:
    """A user mistake: exit status 2, no traceback, one line naming each of `names`."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    for name in names:
        assert name in line, (name, line)
    return line


def _steps_and_losses(run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, open(run / "metrics.jsonl"))]


@pytest.mark.slow
def test_cli_never_overwrites_a_run_and_refuses_a_new_length(tmp_path):
    """~4 CLI processes (30-80 s on a busy 2-core machine)."""
    _image_folder(tmp_path / "data")
    run, data = tmp_path / "run", tmp_path / "data"
    assert _cli(*_tiny_args(data, "--epochs", "1", "--out", run)).returncode == 0
    before = _snapshot(run)
    # A new run into the folder: refused, nothing touched.
    _refused(_cli(*_tiny_args(data, "--epochs", "1", "--out", run)), str(run), "--resume auto", "--overwrite")
    assert _snapshot(run) == before
    # Resuming the finished 1-epoch run as a 2-epoch one: refused unless --extend.
    _refused(_cli(*_tiny_args(data, "--epochs", "2", "--out", run, "--resume", "auto")),
             "epochs=1", "epochs=2", "--extend")
    assert _snapshot(run) == before
    result = _cli(*_tiny_args(data, "--epochs", "2", "--out", run, "--resume", "auto", "--extend"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2.0 and summary["steps"] == 4
    assert [s for s, _ in _steps_and_losses(run)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_cli_default_out_is_new_and_printed(tmp_path, monkeypatch, capsys):
    _image_folder(tmp_path / "data")
    args = _tiny_args(tmp_path / "data", "--epochs", "1", "max_steps=1")
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    outs = [re.search(r"out: (runs/rotnet-[0-9-]+)", result.stderr).group(1)]
    monkeypatch.chdir(tmp_path)      # the second run in this process: same folder, same second maybe
    assert main(args) == 0
    outs.append(re.search(r"out: (runs/rotnet-[0-9-]+)", capsys.readouterr().err).group(1))
    assert outs[0] != outs[1] and all((tmp_path / o / "last.pt").is_file() for o in outs)


@pytest.mark.slow
def test_cli_sigterm_saves_exits_0_and_the_printed_command_resumes_identically(tmp_path):
    """SIGTERM mid-run: a checkpoint, exit 0, the resume command printed; running that command
    continues with the losses of an uninterrupted run and each step logged once."""
    _image_folder(tmp_path / "data", n_per_class=32)     # 8 steps per epoch
    common = ["--epochs", "100", "max_steps=16"]     # 800 planned steps: the same schedules in both runs
    full = tmp_path / "full"
    assert _cli(*_tiny_args(tmp_path / "data", *common, "--out", full)).returncode == 0
    cut = tmp_path / "cut"
    proc = _cli(*_tiny_args(tmp_path / "data", *common, "--out", cut), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (cut / "metrics.jsonl").exists() and len((cut / "metrics.jsonl").read_text().splitlines()) >= 3:
            os.killpg(proc.pid, signal.SIGTERM)   # as a cluster does: every process, loader workers too
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "stopped by SIGTERM" in out and not (cut / "summary.json").exists()
    stopped_at = torch.load(cut / "last.pt", weights_only=True)["step"]
    assert 3 <= stopped_at < 16
    command = shlex.split(re.search(r"continue with: (.*)", out).group(1))
    assert command[0] == "fastssl" and command[-2:] == ["--resume", "auto"]
    resumed = _cli(*command[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert _steps_and_losses(cut) == _steps_and_losses(full)
    assert [s for s, _ in _steps_and_losses(cut)] == list(range(16))


class _CreatesAFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_cli_eval_of_a_crafted_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "created_by_unpickling"
    torch.save({"method": "rotnet", "model": _CreatesAFile(marker)}, tmp_path / "downloaded.pt")
    _refused(_cli("eval", "--checkpoint", tmp_path / "downloaded.pt"), "downloaded.pt",
             "not a fastssl checkpoint")
    with pytest.raises(ValueError, match="not a fastssl checkpoint"):   # --debug: the developer's view
        main(["eval", "--checkpoint", str(tmp_path / "downloaded.pt"), "--debug"])
    assert not marker.exists()


def _mistake(capsys, argv, *names) -> str:
    """In-process variant of _refused for the long list of mistakes (same entry point, main())."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("fastssl train: error: "), line
    for name in names:
        assert name in line, (name, line)
    return line


@pytest.mark.parametrize("item, names", [
    ("base_lr=-1", ["base_lr", "> 0", "-1"]), ("momentum=7", ["momentum", ">= 0 and < 1"]),
    ("warmup_epochs=500", ["warmup_epochs", "<= epochs"]), ("log_every=0", ["log_every", ">= 1"]),
    ("checkpoint_every=-1", ["checkpoint_every", ">= 0"]), ("max_steps=-5", ["max_steps", ">= 0"]),
    ("epochs=0", ["epochs must be an integer >= 1"]), ("temperature=-1", ["temperature", "> 0"]),
    ("queue_size=0", ["queue_size", ">= 1"]), ("dist_timeout_s=0", ["dist_timeout_s", "> 0"]),
])
def test_every_config_value_is_validated_at_resolve_time(capsys, item, names):
    _mistake(capsys, ["train", "--method", "mocov2", item, "--print-config"], *names)


def test_flags_and_key_values(capsys, tmp_path):
    # A flag and a key=value for the same key: an error naming both.
    _mistake(capsys, ["train", "--method", "rotnet", "--batch-size", "32", "batch_size=abc"],
             "--batch-size 32", "batch_size=abc")
    _mistake(capsys, ["train", "--overwrite", "--resume", "auto"], "--overwrite", "--resume auto")
    _mistake(capsys, ["train", "--extend"], "--extend", "--resume")
    # key=value anywhere after the subcommand; precedence defaults < preset < YAML < flags and key=value.
    (tmp_path / "c.yaml").write_text("epochs: 3\nbatch_size: 64\nseed: 4\n")
    assert main(["train", "seed=5", "--method", "rotnet", "log_every=2", "--data", "fashion-mnist",
                 "--config", str(tmp_path / "c.yaml"), "--epochs", "7", "num_threads=1",
                 "--print-config"]) == 0
    cfg = flat_config(yaml.safe_load(capsys.readouterr().out))
    assert (cfg["epochs"], cfg["batch_size"], cfg["seed"], cfg["log_every"]) == (7, 64, 5, 2)
    assert (cfg["backbone"], cfg["num_threads"]) == ("resnet8", 1)       # preset, then key=value
    assert not (tmp_path / "runs").exists()


def test_yaml_mistakes_name_the_file_line_and_column(capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: 3\nbatch_size: [64\nseed: 1\n")
    _mistake(capsys, ["train", "--method", "rotnet", "--config", tmp_path / "bad.yaml"], "bad.yaml", "line ",
             "column ")
    (tmp_path / "latin1.yaml").write_bytes("seed: 1\n# caf\xe9\n".encode("latin-1"))
    _mistake(capsys, ["train", "--method", "rotnet", "--config", tmp_path / "latin1.yaml"], "latin1.yaml",
             "not UTF-8", "line 2")


def test_train_help_lists_the_methods_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "dino", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "teacher_temp=0.04" in out and "teacher temperature after warm-up" in out
    assert "base_lr=0.0005" in out and "weak" in out        # the method list names every method


def test_checkpoint_mistakes_name_the_file_and_what_it_is(capsys, tmp_path):
    _image_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert main(_tiny_args(tmp_path / "data", "--epochs", "1", "--out", run)) == 0
    capsys.readouterr()
    good = (run / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 3])
    (tmp_path / "notes.pt").write_text("hello\n")
    torch.save({"weights": torch.ones(3)}, tmp_path / "foreign.pt")
    before = _snapshot(run)
    for name, what in (("cut.pt", "truncated"), ("notes.pt", "neither a zip archive nor a pickle"),
                       ("foreign.pt", "not a fastssl checkpoint"),
                       ("missing.pt", "expected an existing file")):
        _mistake(capsys, _tiny_args(tmp_path / "data", "--epochs", "1", "--out", tmp_path / "new",
                                    "--resume", tmp_path / name), name, what)
    _mistake(capsys, ["train", "--method", "mocov3", "--data", tmp_path / "data", "--backbone", "resnet8",
                      "--batch-size", "8", "image_size=16", "num_threads=1", "loader=torchvision",
                      "eval_knn=false", "warmup_epochs=0", "--epochs", "1", "--out", run, "--resume", "auto"],
             "last.pt", "a rotnet checkpoint", "mocov3")
    assert _snapshot(run) == before


def test_one_class_data_is_refused_for_knn(capsys, tmp_path):
    for split in ("train", "val"):
        folder = tmp_path / "data" / split / "only"
        folder.mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((16, 16, 3), 9 * i, np.uint8)).save(folder / f"{i}.png")
    args = _tiny_args(tmp_path / "data", "--epochs", "1", "--out", tmp_path / "run")
    args.remove("eval_knn=false")
    _mistake(capsys, args, "1 class", "kNN", "eval_knn=false")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_job_completes(tmp_path):
    """2 workers under `torchrun --master-port P --max-restarts 1`; one is SIGKILLed after the first
    checkpoint; the restarted workers rejoin, resume from it on their own and the job completes,
    each step logged once. (~1-2 min on a busy 2-core machine: two start-ups of two workers.)"""
    _image_folder(tmp_path / "data", n_per_class=32)
    run = tmp_path / "run"
    args = _tiny_args(tmp_path / "data", "--epochs", "3", "--out", run, "checkpoint_every=4")
    # The static rendezvous (--master-port) keeps one store for every attempt, the failed one's peer
    # addresses included: the restarted workers must rejoin under their own attempt's keys.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--master-port", str(_free_port()),
                "--nproc-per-node", "2", "--max-restarts", "1"]
    proc = subprocess.Popen([*torchrun, "-m", "fastssl.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, killed = time.time() + 400, None
    while time.time() < deadline and proc.poll() is None and killed is None:
        if (run / "last.pt").exists():
            workers = _children(proc.pid)
            if len(workers) == 2:
                killed = max(workers)
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=400)
    assert killed is not None, "the job ended before a worker could be killed"
    assert proc.returncode == 0, err[-3000:]
    assert "torchrun restart 1: resuming" in err and re.search(r"resumed from .*last.pt at step [1-9]", err)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["world_size"] == 2
    assert [s for s, _ in _steps_and_losses(run)] == list(range(24))


def _three_class_folder(root, n_per_class=5):
    """15 images per split: an odd count, so 2 ranks' shards need the loader's padding trimmed."""
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n_per_class):
                pixels = rng.integers(0, 120, (16, 16, 3)) + 60 * c
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / f"c{c}" / f"{i}.png")


def _sharded_knn(rank, world, data):
    from torch import nn

    from fastssl.cli import _evaluator
    from fastssl.engine import resolve_config
    from fastssl.methods import METHODS

    cfg = resolve_config(METHODS["rotnet"].config_class, None, dict(
        image_size=16, num_threads=1, loader="torchvision", source=data))
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return _evaluator(cfg, data, torch.device("cpu"), linear=True)(encoder)


@pytest.mark.slow
def test_knn_evaluation_sharded_over_two_ranks_equals_one_process(tmp_path):
    """2 spawned gloo processes with loader workers: 2 min on the busy 2-core machine."""
    from dist_utils import run_gloo

    _three_class_folder(tmp_path / "data")
    one = _sharded_knn(0, 1, str(tmp_path / "data"))
    ranks = run_gloo(_sharded_knn, 2, str(tmp_path / "data"))
    # Each rank extracted half of each split; the train halves were gathered into the whole bank
    # and the test halves' correct counts summed: the same kNN accuracy as one process.
    assert ranks[0]["knn_top1"] == ranks[1]["knn_top1"] == one["knn_top1"]
    assert round(one["knn_top1"] * 15) == one["knn_top1"] * 15
    assert "linear_top1" in ranks[0] and "linear_top1" not in ranks[1]   # the probe runs on rank 0 only


def test_the_printed_resume_command_keeps_the_arguments_and_continues_the_folder():
    from fastssl.cli import _resume_command

    argv = ["train", "--method", "dino", "--out", "old", "--overwrite", "teacher_temp=0.07", "out=x",
            "--resume", "some/last.pt", "--data", "my data"]
    assert _resume_command(argv, "runs/dino-1") == ("fastssl train --method dino teacher_temp=0.07 --data "
                                                    "'my data' --out runs/dino-1 --resume auto")


def test_the_demo_is_simclrs_fashion_mnist_preset_with_deterministic_kernels(capsys):
    assert main(["train", "--print-config"]) == 0
    demo = yaml.safe_load(capsys.readouterr().out)
    assert demo["method"]["name"] == "simclr", demo["method"]
    assert main(["train", "--method", "simclr", "--data", "fashion-mnist", "--print-config"]) == 0
    preset = yaml.safe_load(capsys.readouterr().out)
    assert preset["run"]["deterministic"] is False and demo["run"]["deterministic"] is True
    assert preset["eval"]["eval_every"] > 0 and demo["eval"]["eval_every"] == 0  # no monitor in the demo
    preset["run"]["deterministic"], preset["eval"]["eval_every"] = True, 0
    assert demo == preset
    assert preset["data"]["views"] and set(preset["data"]["views"]) <= set(recipes.OVERRIDABLE)


def test_config_views_reach_the_loaders_recipe(monkeypatch, tmp_path):
    seen = []

    class Stop(BaseException):  # main turns an Exception into exit code 1; this passes through
        pass

    def stop(source, recipe, **kwargs):
        seen.append(recipe)
        raise Stop  # nothing past the loader is needed

    monkeypatch.setattr(fastssl.data, "build_loader", stop)
    with pytest.raises(Stop):
        main(["train", "--method", "mocov2", "--data", "fashion-mnist", "--out", str(tmp_path / "r"),
              "views={scale: [0.6, 0.9], solarize_p: 0.3}", "eval_knn=false"])
    assert [(v.scale, v.solarize_p) for v in seen[0].views] == [((0.6, 0.9), 0.3)] * 2
