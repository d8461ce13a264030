"""Published figures cannot go stale: every generated table in RESULTS.md and the docs is what its
data file gives, the memory plan's published rows are what the code counts now, the report's
renderer and marker handling behave, and the documents link only to files in the repository."""

import json
import re
from pathlib import Path

import forked
import pytest

from fastssl.bench import memory, report

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", report.DOCS)
def test_published_tables_are_what_their_data_gives(doc):
    text = (ROOT / doc).read_text()
    assert report.MARKER.search(text), f"{doc} has no generated table"
    assert report.render(text, RESULTS) == text, f"{doc} is stale: run python -m fastssl.bench.report"


def test_every_table_and_data_file_is_published():
    text = "".join((ROOT / d).read_text() for d in report.DOCS)
    published = {m.group("name") for m in report.MARKER.finditer(text)}
    assert published == set(report.TABLES)
    assert {file for file, _ in report.TABLES.values()} == {p.name for p in RESULTS.glob("*.jsonl")}
    for path in RESULTS.glob("*.jsonl"):  # every row says where, when and with what it was measured
        for row in report.read_rows(path):
            assert {"device", "date", "torch", "git_sha"} <= set(row), path.name


def test_render_rewrites_only_between_markers(tmp_path):
    (tmp_path / "under_load.jsonl").write_text(
        json.dumps({"device": "CPU (test)", "date": "2000-01-01", "torch": "9", "git_sha": None,
                    "setting": "idle", "ms_per_step": 100.0, "ratio_to_idle_default": 1.0}) + "\n"
        + json.dumps({"device": "CPU (test)", "date": "2000-01-01", "torch": "9", "git_sha": None,
                      "setting": "loaded", "ms_per_step": 250.0, "ratio_to_idle_default": 2.5}) + "\n")
    doc = "prose 1\n<!-- table:under_load -->\nold\n<!-- /table:under_load -->\nprose 2\n"
    want = ("prose 1\n<!-- table:under_load -->\nCPU (test) · 2000-01-01 · torch 9\n\n"
            "| setting | ms/step (CPU, ratios only) | × idle default |\n|---|---|---|\n"
            "| idle | 100 | 1.00 |\n| loaded | 250 | 2.50 |\n<!-- /table:under_load -->\nprose 2\n")
    assert report.render(doc, tmp_path) == want
    path = tmp_path / "doc.md"
    path.write_text(doc)
    assert report.main(["--check", "--results", str(tmp_path), str(path)]) == 1
    assert path.read_text() == doc  # --check rewrites nothing
    assert report.main(["--results", str(tmp_path), str(path)]) == 0
    assert path.read_text() == want
    with pytest.raises(ValueError, match="table:nosuch: expected one of"):
        report.render("<!-- table:nosuch -->\n<!-- /table:nosuch -->", tmp_path)


def test_memory_verdict_names_what_does_not_fit():
    gib = memory.GIB
    base = {"device": "d", "date": "t", "torch": "v", "world": 8, "checkpointing": False, "method": "mae",
            "backbone": "vit_huge_patch14"}
    rows = [base | {"parallel": "ddp", "peak": 80 * 10**9}, base | {"parallel": "fsdp", "peak": 70 * gib},
            base | {"parallel": "fsdp", "peak": 90 * gib, "world": 64}]
    text = report._memory_verdict(rows)
    assert "- mae huge_patch14 ddp: 74.51" in text and "fsdp:" not in text
    assert text.endswith("Fit with FSDP but not with DDP: mae huge_patch14 ddp.")  # and nothing fits DDP
    rows[0]["peak"] = 60 * gib
    text = report._memory_verdict(rows)
    assert "- none" in text and "Fit with FSDP but not with DDP: none." in text
    assert text.endswith("(peak GiB per GPU, DDP / FSDP):\n- mae huge_patch14: 60.00 / 70.00")


# The rows that decide which MAE runs need FSDP, and ViT-B's: counted again now, byte for byte.
PINNED = [("mae", "vit_huge_patch14", "ddp", False), ("mae", "vit_huge_patch14", "fsdp", False),
          ("mae", "vit_base_patch16", "ddp", False)]
SCRIPT = """
import json, sys
from fastssl.bench.memory import GLOBAL_BATCH, join_fake_group, measure
join_fake_group(8)
print(json.dumps([measure(m, b, p, c, 8, GLOBAL_BATCH[m] // 8) for m, b, p, c in json.loads(sys.argv[1])]))
"""


@pytest.mark.slow  # three fake ViT training steps in a subprocess: about a minute on a busy 2-core CPU
def test_published_memory_plan_rows_are_what_the_code_counts():
    published = {(r["method"], r["backbone"], r["parallel"], memory.ac_mode(r["checkpointing"]), r["world"]):
                 r for r in report.read_rows(RESULTS / "memory_plan.jsonl")}
    out = forked.run_code(SCRIPT, [json.dumps(PINNED)], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    keys = ("per_gpu_batch", "params", "grads", "optimizer", "teacher", "activations", "peak")
    for row in json.loads(out.stdout.strip().splitlines()[-1]):
        mode = memory.ac_mode(row["checkpointing"])
        want = published[row["method"], row["backbone"], row["parallel"], mode, 8]
        assert {k: row[k] for k in keys} == {k: want[k] for k in keys}, row


def test_documents_link_only_to_files_in_the_repository():
    for doc in DOCUMENTS:
        text = doc.read_text()
        assert "NOTES.md" not in text, doc.name
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            assert not target.startswith(("http:", "https:", "/")), (doc.name, target)
            assert (doc.parent / target).exists(), (doc.name, target)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) < 250
