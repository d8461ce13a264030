"""The fine-tuning study runs end to end at its tiny size and writes its rows as data; its
label spaces do what the vocabulary modes promise on the study's hashtags."""

import json

import pytest

from fastssl.bench import finetune_study as study
from fastssl.data import wordnet as wn_

ROWS = [["sandal", "love"], ["sandals"], ["handbag", "ootd"], ["purse"], ["sneaker", "fashion"], ["sneakers"]]


@pytest.fixture(scope="module")
def wordnet():
    return wn_.load_wordnet()


def test_raw_keeps_every_hashtag_apart():
    rows, names = study.label_space(ROWS, "raw", "flat", None)
    assert len(names) == 9 and rows[0] != rows[1]


def test_wordnet_merges_synonyms_and_matched_drops_off_target_tags(wordnet):
    rows, names = study.label_space(ROWS, "wordnet", "flat", wordnet)
    assert rows[2][0] in rows[3] and set(rows[0]) > set(rows[1])  # handbag = purse; sandal = sandals
    assert "ootd" not in names  # not in WordNet: dropped
    rows, names = study.label_space(ROWS, "matched", "flat", wordnet)
    assert len(names) == 3 and all(len(r) == 1 for r in rows)  # love, fashion: under no target
    assert rows[0] == rows[1] and rows[2] == rows[3] and rows[4] == rows[5]


def test_hierarchy_adds_the_same_parents_to_synonyms(wordnet):
    flat, _ = study.label_space(ROWS, "matched", "flat", wordnet)
    rows, names = study.label_space(ROWS, "matched", "hierarchy", wordnet)
    assert len(names) > 3 and all(len(r) > len(f) for r, f in zip(rows, flat))
    assert rows[0] == rows[1] and set(rows[0]) & set(rows[4])  # sandal and sneaker share footwear


def test_tiny_presets_run_writes_rows(tmp_path):
    rows = study.main(["--tiny", "--parts", "presets", "--methods", "mocov3", "--threads", "1",
                       "--results", str(tmp_path)])
    assert [(r["method"], r["init"]) for r in rows] == [("mocov3", "pretrained"), ("mocov3", "random")]
    lines = [json.loads(x) for x in (tmp_path / "finetune_study.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["size"] == 32 and lines[0]["pretrain_size"] == 24
    assert {"finetune_top1", "linear_top1", "git_sha"} <= lines[0].keys() and "linear_top1" not in lines[1]
