"""The compile gate's figures: its per-compile table, the per-(kernel, target) summary published in
benchmarks/results/compile_gate.jsonl (rendered into benchmarks/RESULTS.md by
`python -m fastssl.bench.report`), and the check that the published rows are what the gate gives."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

from gate_capture import CARDS

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "compile_gate.jsonl"
REGENERATE = ("python tests/ops/compile_gate.py --targets 80,89,90,100 --results "
              "benchmarks/results/compile_gate.jsonl && python -m fastssl.bench.report")
# what a run determines (dates, SHAs and versions describe where it ran)
COMPARED = ("launches", "distinct_compiles", "compiles", "kept", "max_registers", "max_spill_bytes",
            "max_smem_bytes", "card_limit_bytes", "tensor_cores")
COLUMNS = ("kernel", "target", "compiles", "kept", "max_registers", "max_spill_bytes", "max_smem_bytes",
           "card_limit_bytes", "tensor_cores")
HEADERS = ("kernel", "target", "compiles", "kept (fit)", "max regs", "max spill B", "max smem B",
           "card limit B", "tensor cores")


def _dots_column(row: dict) -> str:
    """tl.dot sites on tensor cores / compiled in this configuration ('-' without tl.dot)."""
    if not row["dot"]:
        return "-"
    compiled = [v for v in row["dots"].values() if v != "not compiled"]
    return f"{compiled.count('tc')}/{len(compiled)}"


def format_table(rows: list[dict]) -> str:
    cols = ["kernel", "config", "launch", "target", "regs", "spills", "smem", "tc", "s"]
    table = [
        [
            r["kernel"],
            r["config"],
            r["launch"],
            r["target"],
            str(r["regs"]),
            str(r["spills"]),
            f"{r['smem']}{'' if r['fits'] else ' >LIMIT'}",
            _dots_column(r),
            f"{r['seconds']:.1f}",
        ]
        for r in rows
    ]
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(cols)]
    fmt = " | ".join(f"{{:{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*cols), "-+-".join("-" * w for w in widths)] + [fmt.format(*t) for t in table]
    )



def summary(rows: list[dict], stats: dict) -> list[dict]:
    """One row per kernel and target: the margins of the configurations kept on the card, with the
    run's launch and distinct-compile totals."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["target"]), []).append(r)
    out = []
    for (kernel, target), rs in groups.items():
        kept = [r for r in rs if r["fits"]]
        tc = "-" if not rs[0]["dot"] else (
            "all" if all("fma" not in r["dots"].values() for r in rs) else "NOT ALL")
        worst = {k: max([r[k] or 0 for r in kept] + [0]) for k in ("regs", "spills", "smem")}
        out.append(dict(
            launches=stats["launches"], distinct_compiles=stats["compiles"], kernel=kernel, target=target,
            compiles=len(rs), kept=len(kept), max_registers=worst["regs"], max_spill_bytes=worst["spills"],
            max_smem_bytes=worst["smem"], card_limit_bytes=CARDS[int(target[3:])].smem_optin,
            tensor_cores=tc,
        ))
    return out


def summary_markdown(summary_rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in summary_rows]
    return "\n".join(lines)


def environment(triton_version: str) -> dict:
    """fastssl.bench.harness.environment with the compiler's versions: the triton that compiled (it
    may come from another directory than torch's), its bundled ptxas, python."""
    from triton import knobs

    from fastssl.bench.harness import environment as bench_environment

    ptxas = getattr(knobs.nvidia.ptxas, "version", None)
    if ptxas is None:  # a Triton without the tool's version: ask the binary
        text = subprocess.run([knobs.nvidia.ptxas.path, "--version"], capture_output=True, text=True).stdout
        ptxas = text.rsplit("release ", 1)[-1].split(",")[0]
    return {**bench_environment(), "triton": triton_version, "ptxas": ptxas,
            "python": ".".join(platform.python_version_tuple()[:2])}


def write_results(path: Path, summary_rows: list[dict], env: dict) -> None:
    """Replace the rows of env's triton version in `path` (at the place of the first of them), keeping
    the other versions' rows."""
    from fastssl.bench.harness import write_rows

    old = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    at = next((i for i, r in enumerate(old) if r["triton"] == env["triton"]), len(old))
    others = [r for r in old if r["triton"] != env["triton"]]
    write_rows(path, others[:at], env={})
    write_rows(path, summary_rows, env, append=True)
    write_rows(path, others[at:], env={}, append=True)


def published_difference(summary_rows: list[dict], triton_version: str, path: Path = RESULTS) -> str:
    """'' when the rows published in `path` for this triton version are what the gate gives (the
    deterministic figures), else a one-line verdict naming the command that regenerates them."""
    published = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    key = lambda r: (r["kernel"], r["target"])  # noqa: E731
    want = {key(r): {k: r[k] for k in COMPARED} for r in published if r["triton"] == triton_version}
    have = {key(r): {k: r[k] for k in COMPARED} for r in summary_rows}
    if want == have:
        return ""
    if not want:
        why = f"no rows for triton {triton_version}"
    else:
        diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        first = " ".join(diff[0])
        if diff[0] not in have:
            first += " published but not compiled"
        elif diff[0] not in want:
            first += " compiled but not published"
        else:
            first += " in " + ", ".join(f for f in COMPARED if want[diff[0]][f] != have[diff[0]][f])
        why = f"{len(diff)} of the (kernel, target) rows for triton {triton_version} differ, e.g. {first}"
    return f"{path.name} is stale ({why}): regenerate it with `{REGENERATE}`"

