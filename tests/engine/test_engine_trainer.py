import json
import os

import pytest
import torch
from dist_utils import run_gloo
from engine_tiny import TinyLoader, TinyMethod, tiny_config

from fastssl.engine import NonFiniteLossError, Trainer, load_checkpoint, save_atomic


def _losses(out) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _train(out, resume=None, crash_at_step=None, **kw):
    cfg = tiny_config(out, **kw)
    method = TinyMethod(cfg, crash_at_step=crash_at_step)
    summary = Trainer(method, TinyLoader(), resume=resume, progress=False, log=lambda m: None).fit()
    return method, summary


def test_loss_decreases_and_run_files(tmp_path):
    evaluated = []
    cfg = tiny_config(tmp_path, epochs=6)
    method = TinyMethod(cfg, dropout=0.0)
    evaluator = lambda enc: evaluated.append(enc) or {"knn_top1": 0.5 + 0.1 * len(evaluated)}
    summary = Trainer(method, TinyLoader(), evaluator=evaluator, progress=False, log=lambda m: None).fit()
    losses = _losses(tmp_path)
    assert len(losses) == 24 and sum(list(losses.values())[-4:]) < 0.7 * sum(list(losses.values())[:4])
    assert evaluated == [method.net, method.net]            # random init, then the trained encoder
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summary and summary["steps"] == 24
    assert summary["knn_top1_random_init"] == pytest.approx(0.6) and summary["knn_top1"] == pytest.approx(0.7)
    assert summary["images_per_second"] > 0 and summary["method"] == "tiny"
    assert "base_lr: 0.5" in (tmp_path / "config.yaml").read_text()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    expected_keys = {"loss", "lr", "weight_decay", "img_per_s", "data_wait", "ema_momentum", "feature_mean"}
    assert expected_keys <= set(record)
    assert record["lr"] == 0.0 and 0 <= record["data_wait"] <= 1   # warm-up starts at 0


def test_resume_gives_the_same_losses(tmp_path):
    full, _ = _train(tmp_path / "full", epochs=3, checkpoint_every=2)
    # Killed in step 5 (mid-epoch 1; last checkpoint at step 4), then resumed with --resume auto.
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", epochs=3, checkpoint_every=2, crash_at_step=5)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 4
    resumed, _ = _train(tmp_path / "cut", resume="auto", epochs=3, checkpoint_every=2)
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(a) == list(range(12))
    rows = [json.loads(line)["step"] for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert rows == list(range(12))   # the rows of step 4, logged before the kill, were dropped on resume
    for step in range(4, 12):
        assert b[step] == a[step], step
    for (name, p), q in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_resume_auto_without_checkpoint_starts_fresh_and_bad_path_errors(tmp_path):
    _, summary = _train(tmp_path / "a", resume="auto", epochs=1)
    assert summary["steps"] == 4
    with pytest.raises(ValueError, match="checkpoint: expected an existing file"):
        _train(tmp_path / "b", resume=str(tmp_path / "nope.pt"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, epochs=3, checkpoint_every=2)
    method = TinyMethod(cfg, nan_at_step=5)
    trainer = Trainer(method, TinyLoader(), progress=False, log=lambda m: None)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5 .*last good checkpoint .*last.pt"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert max(_losses(tmp_path)) == 4          # the NaN step was not logged as a trained step


def test_save_atomic_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomic({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.pt"]   # no temp file left behind


def _ddp_run(rank, world, out):
    torch.manual_seed(0)
    cfg = tiny_config(out, epochs=1, batch_size=8)
    method = TinyMethod(cfg, dropout=0.0)
    loader = TinyLoader(shard_id=rank, num_shards=world)
    Trainer(method, loader, progress=False, log=lambda m: None).fit()
    return {k: v.clone() for k, v in method.state_dict().items()}


def test_two_process_gloo_equals_one_process_full_batch(tmp_path):
    states = run_gloo(_ddp_run, 2, str(tmp_path / "ddp"))
    cfg = tiny_config(tmp_path / "one", epochs=1, batch_size=8)
    method = TinyMethod(cfg, dropout=0.0)
    Trainer(method, TinyLoader(), progress=False, log=lambda m: None).fit()
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2
    for name, p in method.state_dict().items():
        if name == "ema":  # a per-rank buffer (broadcast_buffers=False): each rank tracks its own shard
            continue
        for r in range(2):
            torch.testing.assert_close(states[r][name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_time_budget_shortens_the_run_and_respreads_schedules(tmp_path):
    cfg = tiny_config(tmp_path, epochs=6)   # 24 steps planned
    method = TinyMethod(cfg)
    summary = Trainer(method, TinyLoader(), progress=False, log=lambda m: None, time_budget_s=0.0).fit()
    # Budget spent: the run stops right after the 2 + 12 timed calibration steps.
    assert summary["steps"] == 15 and summary["epochs"] == 3.75 and summary["epochs_configured"] == 6
    with open(tmp_path / "metrics.jsonl") as f:
        lr = [json.loads(line)["lr"] for line in f]
    assert len(lr) == 15 and lr[-1] < 0.05 * max(lr)   # the cosine was re-spread to end at step 15
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 15 and state["extra"]["total_steps"] == 15
