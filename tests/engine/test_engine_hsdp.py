"""parallel=hsdp (FSDP2 over a 2 x 2 replicate x shard mesh of 4 gloo processes) through the Trainer.

- DINO (student, EMA teacher and heads all sharded on the 2-D mesh) and MAE equal one process
  on the full batch: the same losses and parameters after two steps, within float reduction order;
- the DCP checkpoint the 2 x 2 mesh wrote resumes on a 4 x 1 and on a 1 x 4 mesh with the
  parameters and SGD momentum exactly as saved, and those runs' asynchronous saves (the
  writer thread's collectives on a group of their own) are published when they end.
One spawn of four processes serves the tests (a module fixture): tiny models, two steps."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_gloo
from ssl_tiny import SIZES, MultiViewLoader, full_state, record_losses, tiny_method
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

from fastssl.engine import Trainer
from fastssl.engine.parallel import hsdp_shape

EQUAL = {"optimizer": "sgd", "momentum": 0.9}  # see test_engine_fsdp: SGD keeps the comparison linear
METHODS = ("dino", "mae")


def _run(rank, world, name, out, overrides, max_steps=2, resume=None):
    method = tiny_method(name, out, max_steps=max_steps, **EQUAL, **overrides)
    losses = record_losses(method)
    loader = MultiViewLoader(SIZES[name], shard_id=rank, num_shards=world)
    trainer = Trainer(method, loader, resume=resume, progress=False, log=lambda m: None)
    loaded = {"state": full_state(method), "optimizer": _full_optimizer_state(trainer)}
    trainer.fit()
    meshes = {tuple(p.device_mesh.shape) for p in method.parameters() if isinstance(p, DTensor)}
    sharded = sum(isinstance(p, DTensor) for p in method.parameters())
    return {"losses": losses, "state": full_state(method), "optimizer": _full_optimizer_state(trainer),
            "loaded": loaded, "meshes": meshes, "sharded": sharded,
            "params": sum(1 for _ in method.parameters())}


def _full_optimizer_state(trainer):
    state = get_optimizer_state_dict(trainer.model, trainer.optimizer,
                                     options=StateDictOptions(full_state_dict=True))["state"]
    return {name: {k: v.detach().clone() for k, v in s.items()} for name, s in state.items()}


def _four_ranks(rank, world, out):
    runs = {name: _run(rank, world, name, f"{out}/{name}", {"parallel": "hsdp", "replicate_size": 2})
            for name in METHODS}
    if rank == 0:
        shutil.copytree(f"{out}/dino", f"{out}/dino_1x4", symlinks=True)
    dist.barrier()
    for replicas, run_dir in ((4, "dino"), (1, "dino_1x4")):  # with asynchronous saves
        runs[f"resume_{replicas}"] = _run(rank, world, "dino", f"{out}/{run_dir}",
                                          {"parallel": "hsdp", "replicate_size": replicas,
                                           "async_checkpoint": True}, max_steps=3, resume="auto")
        runs[f"resume_{replicas}"]["published"] = sorted(p.name for p in Path(out, run_dir).glob("*step-*"))
    return runs


@pytest.fixture(scope="module")
def hsdp_runs(tmp_path_factory):
    return run_gloo(_four_ranks, 4, str(tmp_path_factory.mktemp("hsdp")))


@pytest.mark.slow  # four processes importing torch and timm on two cores
@pytest.mark.parametrize("name", METHODS)
def test_hsdp_2x2_equals_one_process(tmp_path, hsdp_runs, name):
    one = _run(0, 1, name, str(tmp_path / "one"), {})
    hsdp = [r[name] for r in hsdp_runs]
    assert hsdp[0]["meshes"] == {(2, 2)}  # every parameter (EMA teacher included) on the 2-D mesh
    assert hsdp[0]["sharded"] == hsdp[0]["params"] > 0
    for step in range(2):
        mean = sum(h["losses"][step] for h in hsdp) / 4
        assert abs(mean - one["losses"][step]) < 1e-5 * max(1.0, abs(one["losses"][step])), step
    start = full_state(tiny_method(name, str(tmp_path / "x"), **EQUAL))
    assert any(not torch.allclose(start[k], v) for k, v in one["state"].items() if v.is_floating_point())
    for key, value in one["state"].items():
        for h in hsdp:
            torch.testing.assert_close(h["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [4, 1])
def test_hsdp_checkpoint_resumes_on_another_mesh_shape(hsdp_runs, replicas):
    saved = hsdp_runs[0]["dino"]
    for rank in range(4):
        resumed = hsdp_runs[rank][f"resume_{replicas}"]
        assert resumed["meshes"] == {(replicas, 4 // replicas)}
        assert resumed["loaded"]["state"].keys() == saved["state"].keys()
        for key, value in saved["state"].items():
            assert torch.equal(resumed["loaded"]["state"][key], value), key
        assert resumed["loaded"]["optimizer"].keys() == saved["optimizer"].keys()
        for name, state in saved["optimizer"].items():
            assert state.keys() == {"momentum_buffer"}
            assert torch.equal(resumed["loaded"]["optimizer"][name]["momentum_buffer"],
                               state["momentum_buffer"]), name
        assert len(resumed["losses"]) == 1  # step 3 of 3: it went on from step 2
        assert resumed["published"] == ["step-00000003"]  # its asynchronous save, published at the end


def test_hsdp_mesh_shape_from_config_or_torchrun():
    assert hsdp_shape(8, 2, env={}) == (2, 4)
    assert hsdp_shape(16, None, env={"LOCAL_WORLD_SIZE": "8"}) == (2, 8)  # one replica per node
    assert hsdp_shape(4, None, env={}) == (1, 4)
    with pytest.raises(ValueError, match="replicate_size must divide the world size 6, got 4"):
        hsdp_shape(6, 4, env={})
