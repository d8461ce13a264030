"""parallel=fsdp (FSDP2 over a 2-process gloo group) through the Trainer.

- equals one process on the full batch, for DINO (sharded student, EMA teacher and heads,
  center all-reduced; with 2 accumulated micro-batches), DINOv2 (the same, with the iBOT patch
  loss and its center over the loader's block masks, anchored to a sharded Gram teacher), MAE
  (sharded encoder and decoder), the weak method and CLIP (both towers sharded, features gathered
  across ranks, 2 GradCache micro-batches), with activation checkpointing: the same losses and
  parameters after two steps; so does DINOv2 under DDP with Sinkhorn-Knopp targets (its
  masked-token count all-reduced); MoCo v3 (whose projector's BatchNorm sees per-rank batches, so
  it cannot equal one process) trains sharded with its momentum encoder updated shard by shard;
- its sharded (DCP) checkpoint, written by 2 ranks, resumes on 1 process with the model and
  AdamW state exactly as the 2 ranks held them, and the run continues (DINOv2's too, iBOT center
  included);
- a save killed before it is published leaves the previous checkpoint as the one resumed.
One spawn of two processes serves all tests (a module fixture): it is the slow part."""

import json
import math
from pathlib import Path

import pytest
import torch
from dist_utils import run_gloo
from ssl_tiny import SIZES, MultiViewLoader, full_state, record_losses, tiny_method
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

import fastssl.engine.sharded_checkpoint as sharded_checkpoint
from fastssl.engine import Trainer
from fastssl.engine.export import backbone_state_dict
from fastssl.engine.parallel import check_parallel_config

# SGD: attention's key bias has an exactly-zero gradient (softmax is shift-invariant), so AdamW
# would turn each run's float rounding in it into full +-lr steps; SGD keeps the comparison
# linear in the gradients. AdamW on shards is what the checkpoint run uses.
EQUAL = {"optimizer": "sgd", "momentum": 0.9}
FSDP = {"parallel": "fsdp", "activation_checkpointing": True}
RUNS = {"dino": EQUAL | {"accum_steps": 2}, "mae": EQUAL, "weak": EQUAL, "mocov3": {}, "dino_adamw": {},
        "clip": EQUAL | {"accum_steps": 2},
        "dinov2": EQUAL | {"accum_steps": 2, "teacher_centering": "center"},
        "dinov2_ddp": EQUAL | {"parallel": "ddp", "teacher_centering": "sinkhorn_knopp"}}
# how a run is spread (not what it computes): one process runs without them
SPREAD = ("parallel", "accum_steps", "activation_checkpointing")


def _features(encoder):
    """An evaluator: the encoder's mean feature on fixed images (kNN would do the same reads)."""
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    return {"feature_mean": encoder(x).mean().item()}


def _run(rank, world, name, out, overrides, max_steps=2, resume=None):
    base = name.split("_")[0]
    method = tiny_method(base, out, max_steps=max_steps, **overrides)
    losses = record_losses(method)
    loader = MultiViewLoader(SIZES[base], shard_id=rank, num_shards=world, masks=base == "dinov2")
    trainer = Trainer(method, loader, resume=resume, progress=False, log=lambda m: None,
                      evaluator=_features if name == "dino" else None)
    loaded = {"state": full_state(method), "optimizer": _full_optimizer_state(trainer)}
    summary = trainer.fit()
    sharded = sum(isinstance(p, DTensor) for p in method.parameters())
    return {"losses": losses, "state": full_state(method), "optimizer": _full_optimizer_state(trainer),
            "evaluation": {k: v for k, v in summary.items() if k.startswith("feature_mean")},
            "loaded": loaded, "sharded": sharded, "params": sum(1 for _ in method.parameters())}


def _full_optimizer_state(trainer):
    state = get_optimizer_state_dict(trainer.model, trainer.optimizer,
                                     options=StateDictOptions(full_state_dict=True))["state"]
    return {name: {k: v.detach().clone() for k, v in s.items()} for name, s in state.items()}


def _config(name, root):
    """RUNS[name]; the FSDP DINOv2 run anchors to a Gram teacher, root/gram.pt (the fixture's)."""
    return RUNS[name] | ({"gram_teacher": f"{root}/gram.pt"} if name == "dinov2" else {})


def _two_ranks(rank, world, out):
    return {name: _run(rank, world, name, f"{out}/{name}", FSDP | _config(name, out)) for name in RUNS}


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    # the Gram teacher: an earlier backbone, as `fastssl export` writes it (the tiny ViT's init, moved)
    g = torch.Generator().manual_seed(5)
    earlier = backbone_state_dict(tiny_method("dinov2", str(out)))
    torch.save({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in earlier.items()}, out / "gram.pt")
    return out, run_gloo(_two_ranks, 2, str(out))


@pytest.mark.slow  # ~70 s on a busy 2-core CPU (the fixture spawns two processes importing torch and timm)
@pytest.mark.parametrize("name", ["dino", "dinov2", "dinov2_ddp", "mae", "weak", "clip"])
def test_fsdp_two_processes_equal_one_process(tmp_path, fsdp_runs, name):
    out, ranks = fsdp_runs
    alone = {k: v for k, v in _config(name, out).items() if k not in SPREAD}
    one = _run(0, 1, name, str(tmp_path / "one"), alone)
    fsdp = [ranks[r][name] for r in range(2)]
    # under FSDP every parameter (teacher included) is a shard
    sharded = fsdp[0]["params"] if RUNS[name].get("parallel", "fsdp") == "fsdp" else 0
    assert fsdp[0]["sharded"] == sharded and fsdp[0]["params"] > 0
    per_step = len(fsdp[0]["losses"]) // 2  # DINO: 2 accumulated micro-batches per step
    for step in range(2):
        mean = sum(f["losses"][step * per_step + i] for f in fsdp for i in range(per_step)) / (2 * per_step)
        assert abs(mean - one["losses"][step]) < 1e-5 * max(1.0, abs(one["losses"][step])), step
    # DINO's run evaluates its sharded teacher (random init and end): as one process does
    for key, value in one["evaluation"].items():
        assert abs(fsdp[0]["evaluation"][key] - value) < 1e-5, key
        assert fsdp[1]["evaluation"][key] == fsdp[0]["evaluation"][key], key
    assert len(one["evaluation"]) == (2 if name == "dino" else 0)
    assert one["state"].keys() == fsdp[0]["state"].keys()
    for key, value in one["state"].items():
        for r in range(2):
            torch.testing.assert_close(fsdp[r]["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # the run moved the parameters (the comparison is not between two initial states)
    start = full_state(tiny_method(name.split("_")[0], str(tmp_path / "x")))
    assert any(not torch.allclose(v, one["state"][k]) for k, v in start.items() if v.is_floating_point())
    if name.startswith("dinov2"):  # the iBOT center moved (centering) or stayed at 0 (Sinkhorn-Knopp)
        assert (one["state"]["ibot.center"].abs().sum() > 0) == (name == "dinov2")


@pytest.mark.slow
def test_mocov3_vit_trains_sharded_with_a_shard_local_momentum_encoder(fsdp_runs):
    _, ranks = fsdp_runs
    run = ranks[0]["mocov3"]
    assert run["sharded"] == run["params"] > 0
    assert all(math.isfinite(v) for v in run["losses"]) and len(run["losses"]) == 2
    state = run["state"]
    # the momentum encoder (EMA of the base encoder) moved, and is not a copy of the base encoder
    start = full_state(tiny_method("mocov3", "unused"))
    key = "0.blocks.0.mlp.fc1.weight"
    assert not torch.equal(state[f"momentum_encoder.{key}"], start[f"momentum_encoder.{key}"])
    assert not torch.equal(state[f"momentum_encoder.{key}"], state[f"base_encoder.{key}"])


@pytest.mark.slow
def test_two_rank_sharded_checkpoint_resumes_on_one_process(fsdp_runs):
    out, ranks = fsdp_runs
    run_dir = out / "dino_adamw"
    assert (run_dir / "last.dcp").is_symlink() and (run_dir / "last.dcp" / ".metadata").is_file()
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-00000002"]
    assert len(list((run_dir / "last.dcp").glob("*.distcp"))) == 2  # each rank wrote its own shards
    saved = ranks[0]["dino_adamw"]
    resumed = _run(0, 1, "dino_adamw", str(run_dir), FSDP, max_steps=4, resume="auto")
    # loaded on one process exactly as the two ranks held it: parameters, teacher, center, AdamW moments
    assert resumed["loaded"]["state"].keys() == saved["state"].keys()
    for key, value in saved["state"].items():
        assert torch.equal(resumed["loaded"]["state"][key], value), key
    assert resumed["loaded"]["optimizer"].keys() == saved["optimizer"].keys()
    for name, state in saved["optimizer"].items():
        assert state.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k, v in state.items():
            assert torch.equal(resumed["loaded"]["optimizer"][name][k], v), (name, k)
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
    assert steps[-2:] == [2, 3] and len(resumed["losses"]) == 2
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-00000004"]


@pytest.mark.slow
def test_dinov2_two_rank_sharded_checkpoint_resumes_on_one_process(fsdp_runs):
    out, ranks = fsdp_runs
    saved = ranks[0]["dinov2"]
    resumed = _run(0, 1, "dinov2", str(out / "dinov2"), FSDP | _config("dinov2", out), max_steps=3,
                   resume="auto")
    assert resumed["loaded"]["state"].keys() == saved["state"].keys()
    for key, value in saved["state"].items():  # student, teacher, both centers
        assert torch.equal(resumed["loaded"]["state"][key], value), key
    assert len(resumed["losses"]) == 2 and all(map(math.isfinite, resumed["losses"]))  # 2 micro-batches


def test_a_save_killed_before_publishing_leaves_the_previous_checkpoint(monkeypatch, tmp_path):
    run_dir = tmp_path / "run"
    first = _run(0, 1, "dino_adamw", str(run_dir), FSDP, max_steps=1)

    def killed(tmp, final, out):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(sharded_checkpoint, "_publish", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(0, 1, "dino_adamw", str(run_dir), FSDP, max_steps=2, resume="auto")
    assert Path(run_dir / "last.dcp").resolve().name == "step-00000001"
    assert (run_dir / ".step-00000002.tmp").is_dir()  # the interrupted save's shards, never published
    monkeypatch.undo()
    again = _run(0, 1, "dino_adamw", str(run_dir), FSDP, max_steps=1, resume="auto")
    for key, value in first["state"].items():
        assert torch.equal(again["loaded"]["state"][key], value), key


def test_fsdp_refuses_resnets(tmp_path):
    from fastssl.engine import resolve_config
    from fastssl.methods import METHODS

    cls = METHODS["mocov3"]
    cfg = resolve_config(cls.config_class, None, dict(backbone="resnet8", image_size=8, parallel="fsdp",
                                                      mlp_hidden_dim=16, moco_dim=8, out=str(tmp_path)))
    with pytest.raises(ValueError, match=r"parallel=fsdp.*resnet8.*parallel=ddp"):
        check_parallel_config(cfg, cls(cfg))
    with pytest.raises(ValueError, match="parallel must be one of ddp, fsdp, hsdp; got 'zero3'"):
        resolve_config(cls.config_class, None, {"parallel": "zero3"})
