"""Runs that survive mistakes and failures: signals, foreign checkpoints, folders holding a run,
a changed length, stale temp files, NaN on one rank."""

import builtins
import json
import random
import signal

import numpy as np
import pytest
import torch
from dist_utils import run_gloo
from engine_tiny import TinyLoader, TinyMethod, tiny_config

from fastssl.engine import NonFiniteLossError, Trainer, load_checkpoint
from fastssl.engine.checkpoint import rng_state, save_atomic, set_rng_state


def _trainer(out, *, resume=None, overwrite=False, extend=False, method_kw=None, **cfg_kw):
    cfg = tiny_config(out, **cfg_kw)
    method = TinyMethod(cfg, **(method_kw or {}))
    return Trainer(method, TinyLoader(), resume=resume, overwrite=overwrite, extend=extend, progress=False,
                   log=lambda m: None)


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_sigint_checkpoints_and_resume_repeats_the_uninterrupted_run(tmp_path):
    full = _trainer(tmp_path / "full", epochs=3).fit()
    # Ctrl-C during step 5 (mid-epoch 1): the step finishes, a checkpoint of step 6 is written.
    summary = _trainer(tmp_path / "cut", epochs=3, method_kw={"signals": {5: [signal.SIGINT]}}).fit()
    assert summary["interrupted"] == "SIGINT" and summary["steps"] == 6 and summary["epochs"] == 1.5
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 6
    assert not (tmp_path / "cut" / "summary.json").exists()      # the run is not finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handlers restored
    resumed = _trainer(tmp_path / "cut", resume="auto", epochs=3).fit()
    assert "interrupted" not in resumed and resumed["steps"] == full["steps"] == 12
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(12))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]


def test_second_sigint_exits_at_once_without_a_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, epochs=3, method_kw={"signals": {5: [signal.SIGINT, signal.SIGINT]}})
    with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4     # the epoch-end checkpoint only
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_and_sigusr1_stop_like_sigint(tmp_path):
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        out = tmp_path / signum.name
        summary = _trainer(out, epochs=2, method_kw={"signals": {1: [signum]}}).fit()
        assert summary["interrupted"] == signum.name and load_checkpoint(out / "last.pt")["step"] == 2
        assert signal.getsignal(signum) is signal.SIG_DFL


def test_a_folder_holding_a_run_is_never_overwritten_by_accident(tmp_path):
    _trainer(tmp_path, epochs=1).fit()
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"already holds a run \(last.pt, metrics.jsonl, summary.json, "
                                         r"config.yaml\).*--resume auto.*--overwrite"):
        _trainer(tmp_path, epochs=1, seed=1)
    assert _snapshot(tmp_path) == before
    _trainer(tmp_path, epochs=1, max_steps=2, overwrite=True, seed=1).fit()
    assert [r["step"] for r in _rows(tmp_path)] == [0, 1]     # the old rows are gone, not appended to


def test_default_out_is_a_fresh_folder_per_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outs = []
    for _ in range(2):
        cfg = tiny_config("", epochs=1, max_steps=1)
        Trainer(TinyMethod(cfg), TinyLoader(), progress=False, log=lambda m: None).fit()
        outs.append(cfg.run.out)
    assert outs[0] != outs[1] and all(o.startswith("runs/tiny-") for o in outs)
    assert all((tmp_path / o / "last.pt").is_file() for o in outs)


def test_stale_temp_checkpoints_are_removed(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    for pid in (11, 12):   # what two killed saves leave behind
        (tmp_path / f".last.pt.tmp.{pid}").write_bytes(b"partial")
    _trainer(tmp_path, resume="auto", epochs=1).fit()
    # curves.png too where the viz extra (matplotlib) is installed
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "curves.png") == [
        "config.yaml", "last.pt", "metrics.jsonl", "summary.json"]
    (tmp_path / ".last.pt.tmp.13").write_bytes(b"partial")
    save_atomic(load_checkpoint(tmp_path / "last.pt"), tmp_path / "last.pt")   # a save sweeps them too
    assert not list(tmp_path.glob(".last.pt.tmp.*"))


def test_resuming_with_another_length_needs_extend(tmp_path):
    _trainer(tmp_path / "one", epochs=1).fit()
    before = _snapshot(tmp_path / "one")
    with pytest.raises(ValueError, match=r"epochs=1, this command asks for epochs=2.*--extend"):
        _trainer(tmp_path / "one", resume="auto", epochs=2)
    assert _snapshot(tmp_path / "one") == before
    summary = _trainer(tmp_path / "one", resume="auto", epochs=2, extend=True).fit()
    assert summary["steps"] == 8 and summary["epochs"] == 2.0
    # The extended run's LR from step 4 on is the 2-epoch schedule's, the same as a 2-epoch run's.
    two = _trainer(tmp_path / "two", epochs=2)
    extended_lr = [r["lr"] for r in _rows(tmp_path / "one")][4:]
    assert extended_lr == pytest.approx([float(v) for v in two.schedules["lr"][4:8]], rel=1e-12)


def test_summary_records_the_epochs_that_ran(tmp_path):
    summary = _trainer(tmp_path, epochs=2, max_steps=3).fit()
    assert (summary["epochs"], summary["epochs_planned"], summary["steps"]) == (0.75, 2.0, 3)


def test_checkpoints_load_with_weights_only_and_rng_survives(tmp_path):
    _trainer(tmp_path, epochs=1).fit()
    state = torch.load(tmp_path / "last.pt", weights_only=True)      # no pickled Python objects inside
    assert state["method"] == "tiny" and state["step"] == 4
    torch.manual_seed(5), np.random.seed(6), random.seed(7)
    save_atomic({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    # Checkpoints written before RNG states were tensors hold numpy's state as an array: still readable.
    state = load_checkpoint(tmp_path / "last.pt")
    torch.manual_seed(5), np.random.seed(6), random.seed(7)
    state["rng"] = [{"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                     "python": random.getstate()}]
    torch.save(state, tmp_path / "old.pt")
    set_rng_state(load_checkpoint(tmp_path / "old.pt")["rng"][0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


class _CreatesAFile:
    """Unpickling this runs open(path, "w"): what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def test_foreign_and_damaged_checkpoints_are_named_and_run_no_code(tmp_path):
    evil, marker = tmp_path / "evil.pt", tmp_path / "created_by_unpickling"
    torch.save({"model": {}, "payload": _CreatesAFile(marker)}, evil)
    with pytest.raises(ValueError, match=r"evil.pt'.*not a fastssl checkpoint"):
        load_checkpoint(evil)
    assert not marker.exists()
    _trainer(tmp_path / "run", epochs=1).fit()
    good = (tmp_path / "run" / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "other.pt")
    for name, match in (("cut.pt", "not a readable torch checkpoint .a damaged or truncated zip"),
                        ("text.pt", "not a readable torch checkpoint .neither a zip archive nor a pickle"),
                        ("other.pt", "not a fastssl checkpoint .no method, model, optimizer")):
        with pytest.raises(ValueError, match=rf"{name}'.*{match}"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(ValueError, match=r"a tiny checkpoint, but this run's method is rotnet"):
        load_checkpoint(tmp_path / "run" / "last.pt", method="rotnet")


def _distributed_failures(rank, world, out):
    """Rank 1 alone sees a NaN loss; later rank 1 alone receives SIGUSR1."""
    results = {}
    cfg = tiny_config(f"{out}/nan", epochs=3, log_every=2)
    trainer = Trainer(TinyMethod(cfg, nan_at_step=5 if rank == 1 else None), TinyLoader(shard_id=rank,
                      num_shards=world), progress=False, log=lambda m: None)
    try:
        trainer.fit()
    except NonFiniteLossError as e:
        results["nan"] = str(e)
    cfg = tiny_config(f"{out}/signal", epochs=3)
    method = TinyMethod(cfg, signals={6: [signal.SIGUSR1]} if rank == 1 else None)
    summary = Trainer(method, TinyLoader(shard_id=rank, num_shards=world), progress=False,
                      log=lambda m: None).fit()
    results["signal"] = (summary.get("interrupted"), summary["steps"])
    return results


def test_ranks_agree_on_nan_and_on_a_signal_one_rank_received(tmp_path):
    ranks = run_gloo(_distributed_failures, 2, str(tmp_path))
    # Both ranks stop with the same error, although only rank 1's loss was NaN.
    assert ranks[0]["nan"] == ranks[1]["nan"]
    assert "loss is nan at step 5 (epoch 1) on at least one rank" in ranks[0]["nan"]
    assert "last good checkpoint" in ranks[0]["nan"] and "(step 4)" in ranks[0]["nan"]
    assert load_checkpoint(tmp_path / "nan" / "last.pt")["step"] == 4
    assert max(r["step"] for r in _rows(tmp_path / "nan")) == 4       # the NaN step was not logged
    # The signal reached rank 1 in step 6; both ranks stop after step 7 (agreed one step later).
    assert ranks[0]["signal"] == ranks[1]["signal"] == ("SIGUSR1", 8)
    assert load_checkpoint(tmp_path / "signal" / "last.pt")["step"] == 8
