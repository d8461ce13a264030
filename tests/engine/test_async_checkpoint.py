"""Asynchronous sharded checkpoints (async_checkpoint=true, dcp.async_save).

- the save returns once the state is staged: parameters changed right after it do not reach
  the checkpoint;
- the Trainer with asynchronous saves every step publishes the same checkpoint as with
  synchronous ones, keeps one step directory, and resumes from it;
- a process SIGKILLed while its asynchronous save is being written leaves the previous
  checkpoint published and readable, and the next run sweeps the unfinished one."""

import os
import textwrap
from pathlib import Path

import forked
import torch
from ssl_tiny import SIZES, MultiViewLoader, full_state, tiny_method
from torch import nn

from fastssl.engine import Trainer
from fastssl.engine.sharded_checkpoint import load_sharded, read_meta, save_sharded, save_sharded_async

REPO = Path(__file__).resolve().parents[2]


def _meta(step: int) -> dict:
    return {"method": "test", "step": step, "steps_per_epoch": 1, "batch_size": 1, "config": {}}


def _model(scale: float, width: int = 64, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def test_async_save_writes_the_state_staged_at_the_call(tmp_path):
    model = _model(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    pending = save_sharded_async(tmp_path, 5, model, optimizer, _meta(5))
    with torch.no_grad():  # training goes on at once
        for p in model.parameters():
            p.zero_()
    assert pending.wait() == tmp_path / "step-00000005"
    assert (tmp_path / "last.dcp").resolve().name == "step-00000005"
    restored = _model(3.0)
    load_sharded(tmp_path / "last.dcp", restored)
    for key, value in expected.items():
        assert torch.equal(restored.state_dict()[key], value), key
    assert read_meta(tmp_path / "last.dcp")["step"] == 5


def _train(out, max_steps, resume=None, **overrides):
    method = tiny_method("dino", str(out), max_steps=max_steps, parallel="fsdp", checkpoint_every=1,
                         **overrides)
    trainer = Trainer(method, MultiViewLoader(SIZES["dino"]), resume=resume, progress=False,
                      log=lambda m: None)
    trainer.fit()
    return full_state(method)


def test_trainer_async_checkpoints_equal_synchronous_ones_and_resume(tmp_path):
    sync = _train(tmp_path / "sync", 3)
    run = tmp_path / "async"
    final = _train(run, 3, async_checkpoint=True)
    for key, value in sync.items():
        assert torch.equal(final[key], value), key
    assert (run / "last.dcp").resolve().name == "step-00000003"
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000003"]
    assert not list(run.glob(".step-*.tmp"))
    for name in ("sync", "async"):  # both checkpoints hold the final state
        method = tiny_method("dino", str(tmp_path / "x"))
        load_sharded(tmp_path / name / "last.dcp", method)
        for key, value in sync.items():
            assert torch.equal(full_state(method)[key], value), (name, key)
    resumed = _train(run, 4, resume="auto", async_checkpoint=True)
    assert read_meta(run / "last.dcp")["step"] == 4
    assert any(not torch.equal(resumed[k], v) for k, v in final.items() if v.is_floating_point())


KILLED_MID_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    sys.path.insert(0, {tests!r})
    from test_async_checkpoint import _meta, _model
    from fastssl.engine.sharded_checkpoint import save_sharded, save_sharded_async
    out = sys.argv[1]
    model = _model(1.0, width=1024, layers=32)  # 128 MiB of shards: seconds of writing and fsync
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_sharded(out, 1, model, optimizer, _meta(1))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    save_sharded_async(out, 2, model, optimizer, _meta(2))
    time.sleep(0.05)  # the writer thread is under way
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_sigkill_during_an_async_save_leaves_the_previous_checkpoint(tmp_path):
    script = KILLED_MID_SAVE.format(tests=str(Path(__file__).parent))
    env = os.environ | {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                        "OMP_NUM_THREADS": "1"}
    proc = forked.run_code(script, [tmp_path], env=env, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / "last.dcp").resolve().name == "step-00000001"
    assert (tmp_path / ".step-00000002.tmp").is_dir()  # the killed save's partial shards, unpublished
    assert read_meta(tmp_path / "last.dcp")["step"] == 1
    restored = _model(0.5, width=1024, layers=32)
    load_sharded(tmp_path / "last.dcp", restored)
    for key, value in _model(1.0, width=1024, layers=32).state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    # the next save sweeps the unfinished one
    save_sharded(tmp_path, 3, restored, torch.optim.SGD(restored.parameters(), lr=0.1), _meta(3))
    assert not list(tmp_path.glob(".step-*.tmp"))
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003"]
