"""engine.checkpointer: plain and sharded checkpoints behind one interface, on the same disk
format the Trainer has always written (a file written by save_atomic / save_sharded directly
still reads)."""

import pytest
import torch
from torch import nn

from fastssl.cli_errors import report
from fastssl.engine.checkpoint import NoSpaceError, save_atomic
from fastssl.engine.checkpointer import Checkpointer, make_checkpointer, read_checkpoint
from fastssl.engine.sharded_checkpoint import save_sharded


def _meta(step=3, method="tiny"):
    return {"scaler": {}, "step": step, "epoch": 0, "steps_per_epoch": 4, "batch_size": 8, "rng": [],
            "extra": {"note": "kept"}, "config": {"epochs": 2}, "method": method}


def _trained(seed):
    torch.manual_seed(seed)
    model = nn.Linear(5, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 5)).square().mean().backward()
    optimizer.step()
    return model, optimizer


def _assert_same(a, b):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_save_then_read_restores_model_and_optimizer(tmp_path, parallel):
    checkpointer = make_checkpointer(parallel, tmp_path, is_main=True, world=1)
    assert checkpointer.sharded == (parallel == "fsdp")
    assert checkpointer.latest() is None
    model, optimizer = _trained(0)
    checkpointer.save(step=3, method=model, model=model, optimizer=optimizer, meta=_meta())
    path = checkpointer.latest()
    assert path == tmp_path / ("last.dcp" if parallel == "fsdp" else "last.pt") == checkpointer.path
    checkpoint = read_checkpoint(path, method="tiny")
    assert checkpoint.sharded == (parallel == "fsdp")
    assert checkpoint.state["step"] == 3 and checkpoint.state["extra"] == {"note": "kept"}
    other, other_optimizer = _trained(1)
    checkpoint.load_into(other, other, other_optimizer)
    _assert_same(model, other)
    for name, state in optimizer.state_dict()["state"].items():
        for k, v in state.items():
            assert torch.equal(other_optimizer.state_dict()["state"][name][k], v), (name, k)


def test_checkpoints_written_by_the_format_functions_directly_still_read(tmp_path):
    model, optimizer = _trained(0)
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict()} | _meta(step=5),
                tmp_path / "last.pt")
    assert read_checkpoint(tmp_path / "last.pt").state["step"] == 5
    save_sharded(tmp_path / "sharded", 7, model, optimizer, _meta(step=7))
    checkpoint = read_checkpoint(tmp_path / "sharded" / "last.dcp")
    assert checkpoint.sharded and checkpoint.state["step"] == 7


def test_another_methods_checkpoint_is_refused_in_either_format(tmp_path):
    model, optimizer = _trained(0)
    for parallel in ("ddp", "fsdp"):
        checkpointer = make_checkpointer(parallel, tmp_path / parallel, is_main=True, world=1)
        (tmp_path / parallel).mkdir()
        checkpointer.save(step=1, method=model, model=model, optimizer=optimizer, meta=_meta(method="dino"))
        with pytest.raises(ValueError, match=r"a dino checkpoint, but this run's method is mae"):
            read_checkpoint(checkpointer.path, method="mae")


def test_a_folder_of_the_other_format_is_named_not_started_over(tmp_path):
    model, optimizer = _trained(0)
    Checkpointer(tmp_path, sharded=True, is_main=True, world=1).save(
        step=2, method=model, model=model, optimizer=optimizer, meta=_meta())
    with pytest.raises(ValueError, match=r"holds last.dcp, written with parallel=fsdp or hsdp, and no "
                                         r"last.pt \(parallel=ddp\); resume it with parallel=fsdp or hsdp"):
        make_checkpointer("ddp", tmp_path, is_main=True, world=1).latest()
    assert make_checkpointer("hsdp", tmp_path, is_main=True, world=1).latest() == tmp_path / "last.dcp"


def test_only_rank_0_writes_a_plain_checkpoint_and_stale_temps_are_swept(tmp_path):
    model, optimizer = _trained(0)
    Checkpointer(tmp_path, sharded=False, is_main=False, world=2).save(
        step=1, method=model, model=model, optimizer=optimizer, meta=_meta())
    assert not (tmp_path / "last.pt").exists()
    (tmp_path / ".last.pt.tmp.99").write_bytes(b"partial")
    assert Checkpointer(tmp_path, sharded=False, is_main=False, world=2).remove_stale() == []
    removed = Checkpointer(tmp_path, sharded=False, is_main=True, world=1).remove_stale()
    assert [p.name for p in removed] == [".last.pt.tmp.99"] and not list(tmp_path.iterdir())


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_during_a_sharded_save_is_named_and_the_previous_one_kept(small_disk, async_save):
    """A ~640 KB sharded checkpoint fits once in 1 MiB; the next save beside it does not. The CLI's
    line for it is the plain checkpoint's, and last.dcp still names the first, complete and loadable."""
    torch.manual_seed(0)
    model = nn.Linear(400, 400)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = Checkpointer(small_disk, sharded=True, is_main=True, world=1, async_save=async_save)
    checkpointer.save(step=1, method=model, model=model, optimizer=optimizer, meta=_meta(step=1))
    checkpointer.wait()
    saved = model.weight.detach().clone()
    model.weight.data += 1
    with pytest.raises(NoSpaceError) as info:
        checkpointer.save(step=2, method=model, model=model, optimizer=optimizer, meta=_meta(step=2))
        checkpointer.wait()
    line = f"error: no space left on device while writing {small_disk / 'last.dcp'}; free space there"
    assert report(info.value) == (2, f"{line}, or write elsewhere (--out)")
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.dcp", "step-00000001"]  # no unfinished one
    checkpoint = read_checkpoint(small_disk / "last.dcp")      # every shard file whole
    assert checkpoint.state["step"] == 1
    checkpoint.load_into(model, model, None)
    assert torch.equal(model.weight, saved)
