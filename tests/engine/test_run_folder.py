"""engine.run_folder: fresh folders, runs never written over by accident, one summary.json."""

import json

import pytest
from engine_tiny import tiny_config

from fastssl.engine.run_folder import RUN_FILES, RunFolder, default_run_dir, new_run_dir


def _folder(path):
    logged = []
    return RunFolder(path, is_main=True, world=1, log=logged.append)


def test_default_run_dirs_are_unique_per_run(tmp_path):
    first = default_run_dir("dino", root=tmp_path)
    assert first.parent == tmp_path and first.name.startswith("dino-")
    first.mkdir()
    second = default_run_dir("dino", root=tmp_path)
    assert second != first and second.name.startswith(first.name)


def test_new_run_dir_lives_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = new_run_dir("mae", is_main=True, world=1)
    assert path.parts[0] == "runs" and path.name.startswith("mae-") and not path.exists()


def test_a_fresh_run_is_refused_where_a_run_lives(tmp_path):
    folder = _folder(tmp_path)
    folder.check(resume=None, overwrite=False)  # an empty folder is fine
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "last.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"already holds a run \(last.pt, metrics.jsonl\); continue it with "
                                         r"--resume auto, or replace it with --overwrite"):
        folder.check(resume=None, overwrite=False)
    folder.check(resume="auto", overwrite=False)
    folder.check(resume=None, overwrite=True)


def test_prepare_writes_the_config_and_an_overwrite_deletes_the_run_files(tmp_path):
    run = tmp_path / "run"
    _folder(run).prepare(tiny_config(run, base_lr=0.25), overwrite=False)
    assert "base_lr: 0.25" in (run / "config.yaml").read_text()
    for name in RUN_FILES[:-1]:
        (run / name).write_text("old")
    (run / "notes.txt").write_text("mine")
    _folder(run).prepare(tiny_config(run, base_lr=0.5), overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "notes.txt"]
    assert "base_lr: 0.5" in (run / "config.yaml").read_text()


def test_summary_is_written_by_rank_0_only(tmp_path):
    _folder(tmp_path).write_summary({"steps": 3, "knn_top1": 0.5})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 3, "knn_top1": 0.5}
    other = tmp_path / "other"
    other.mkdir()
    RunFolder(other, is_main=False, world=2, log=print).write_summary({"steps": 3})
    assert not (other / "summary.json").exists()


def test_the_trainer_is_summary_jsons_one_writer_and_hands_it_on(tmp_path):
    from engine_tiny import TinyLoader, TinyMethod

    from fastssl.engine import Trainer

    seen = []

    def on_summary(run_dir, summary):
        seen.append((run_dir, json.loads((run_dir / "summary.json").read_text()), summary))

    cfg = tiny_config(tmp_path, epochs=1)
    summary = Trainer(TinyMethod(cfg), TinyLoader(), progress=False, log=lambda m: None,
                      on_summary=on_summary).fit()
    [(run_dir, written, handed)] = seen
    assert run_dir == tmp_path and written == handed == summary
    assert summary["total_seconds"] >= summary["train_seconds"] > 0
