"""The published tables, generated from the rows the benchmarks wrote (`benchmarks/results/*.jsonl`).

    python -m fastssl.bench.report [--results DIR] [--check] [DOC ...]

Each generated table in a document sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->`;
this rewrites what lies between from NAME's data file, with a caption naming the machine, date
and versions the rows carry, and leaves everything outside the markers (the prose) alone.
`--check` rewrites nothing and exits 1 when a document differs from what its data gives.
Defaults: `benchmarks/results` and the documents in `DOCS`, relative to the current directory.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

DOCS = ("benchmarks/RESULTS.md", "docs/scale.md")
MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.DOTALL)
PROVENANCE = ("device", "date", "torch", "triton", "dali", "python")


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def caption(rows: list[dict]) -> str:
    """Where and with what the rows were measured: each distinct (device, date, versions) once."""
    seen: list[str] = []
    for r in rows:
        parts = [r["device"], r["date"]] + [f"{k} {r[k]}" for k in PROVENANCE[2:] if r.get(k)]
        text = " · ".join(parts)
        if text not in seen:
            seen.append(text)
    return "; ".join(seen)


def _cell(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


@dataclass
class Table:
    """A markdown table of a data file's rows: (header, cell of a row) per column."""

    file: str
    columns: list[tuple[str, Callable[[dict], str]]]
    keep: Callable[[dict], bool] = lambda r: True

    def render(self, rows: list[dict]) -> str:
        rows = [r for r in rows if self.keep(r)]
        head = "| " + " | ".join(h for h, _ in self.columns) + " |"
        lines = [caption(rows), "", head, "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell(r) for _, cell in self.columns) + " |" for r in rows]
        return "\n".join(lines)


def col(key: str, fmt: str = "{}") -> Callable[[dict], str]:
    return lambda r: _cell(r.get(key), fmt)


def pct(key: str) -> Callable[[dict], str]:
    return col(key, "{:.2f}%")


def _pct100(key: str) -> Callable[[dict], str]:
    """A fraction in [0, 1] as a percentage."""
    return lambda r: _cell(None if r.get(key) is None else 100 * r[key], "{:.2f}%")


def preset_method(r: dict) -> str:
    """The method, and its data when not Fashion-MNIST (rows without "data" ran on Fashion-MNIST)."""
    data = r.get("data", "fashion-mnist")
    return r["method"] if data == "fashion-mnist" else f"{r['method']} ({data})"


def margin(r: dict) -> str:
    return f"{r['knn_top1'] - r['knn_top1_random_init']:+.2f}"


def _traffic(rows: list[dict]) -> str:
    from fastssl.bench import traffic

    names = [f.name for f in fields(traffic.Record)]
    records = [traffic.Record(**{k: r[k] for k in names}) for r in rows]
    text = [caption(rows), "", f"Predicted at the {traffic.LIMITS_SOURCE}.", "", traffic.table(records), ""]
    return "\n".join(text + [f"- {line}" for line in traffic.goals(records)])


def _memory(rows: list[dict]) -> str:
    from fastssl.bench import memory

    return "\n".join([caption(rows), "", memory.HEADER] + [memory.format_row(r) for r in rows])


def _memory_ibot(rows: list[dict]) -> str:
    from fastssl.bench import memory

    rows = [r for r in rows if r["method"] == "dinov2"]
    return "\n".join([caption(rows), ""] + memory.ibot_table(rows))


def _memory_bank(rows: list[dict]) -> str:
    from fastssl.bench import memory

    return "\n".join([caption(rows), "", "Predicted (MemoryBank.bytes and the NCE step's sampled rows), "
                      f"on each of {rows[0]['world']} GPUs.", "", memory.BANK_HEADER]
                     + [memory.format_bank_row(r) for r in rows])


def _memory_verdict(rows: list[dict]) -> str:
    """On 8 GPUs: the configurations over an 80 GB card, those only FSDP makes fit, and each
    method's largest configuration that fits with DDP."""
    from fastssl.bench import memory

    def mode(r: dict) -> str:
        return memory.ac_mode(r["checkpointing"])

    def name(r: dict) -> str:
        return (f"{r['method']} {r['backbone'].removeprefix('vit_')} {r['parallel']}"
                f"{'' if mode(r) == 'none' else f' + {mode(r)} activation checkpointing'}")

    def gib(r: dict | None) -> str:
        return "–" if r is None else f"{r['peak'] / memory.GIB:.2f}"

    def fsdp_of(r: dict) -> dict | None:
        return next((o for o in eight if o["parallel"] == "fsdp" and (o["method"], o["backbone"], mode(o))
                     == (r["method"], r["backbone"], mode(r))), None)

    eight = [r for r in rows if r["world"] == 8]
    over = [r for r in eight if r["peak"] >= memory.CARD_BYTES]
    card = memory.CARD_BYTES
    only_fsdp = [r for r in over if r["parallel"] == "ddp" and (fsdp_of(r) or r)["peak"] < card]
    lines = [caption(eight), "", f"On 8 GPUs at the papers' batches, over an 80 GB card "
             f"({card / memory.GIB:.1f} GiB; peak GiB per GPU):"]
    lines += [f"- {name(r)}: {gib(r)}" for r in over] or ["- none"]
    lines += ["", f"Fit with FSDP but not with DDP: {', '.join(name(r) for r in only_fsdp) or 'none'}."]
    largest = []
    for method in dict.fromkeys(r["method"] for r in eight):
        fits = [r for r in eight if r["method"] == method and r["parallel"] == "ddp" and r["peak"] < card]
        if fits:
            r = max(fits, key=lambda r: r["peak"])
            setting = name(r).replace(" ddp", "")
            largest.append(f"- {setting}: {gib(r)} / {gib(fsdp_of(r))}")
    if largest:
        lines += ["", "Largest configuration per method that fits with DDP (peak GiB per GPU, DDP / FSDP):",
                  *largest]
    return "\n".join(lines)


def _compile_gate(rows: list[dict]) -> str:
    out = []
    for triton in dict.fromkeys(r["triton"] for r in rows):
        part = [r for r in rows if r["triton"] == triton]
        first = part[0]
        targets = ", ".join(dict.fromkeys(r["target"] for r in part))
        out.append(f"triton {triton} (ptxas {first['ptxas']}): {first['launches']:,} launches -> "
                   f"{first['distinct_compiles']} distinct compiles for {targets}; max registers "
                   f"{max(r['max_registers'] for r in part)}, max spill in a kept configuration "
                   f"{max(r['max_spill_bytes'] for r in part)} B")
        out.append("")
        out.append(COMPILE_GATE.render(part))
        out.append("")
    return "\n".join(out).rstrip("\n")


COMPILE_GATE = Table("compile_gate.jsonl", [
    ("kernel", col("kernel")), ("target", col("target")), ("compiles", col("compiles")),
    ("kept (fit)", col("kept")),
    ("max regs", col("max_registers")), ("max spill B", col("max_spill_bytes")),
    ("max smem B", col("max_smem_bytes")), ("card limit B", col("card_limit_bytes")),
    ("tensor cores", col("tensor_cores"))])

def _read_out() -> Callable[[dict], str]:
    """Top-1 of a row's class read-out: CLIP's zero-shot prompts, the weak method's own classifier."""
    return lambda r: pct("classifier_top1" if r["method"] == "weak" else "zero_shot_top1")(r)


def _recall(direction: str) -> Callable[[dict], str]:
    return lambda r: "/".join(_cell(r.get(f"{direction}_r{k}"), "{:.1f}") for k in (1, 5, 10))


PHASES = ("data", "forward", "backward", "optimizer", "evaluation", "other")


def _split(r: dict) -> str:
    return " / ".join(f"{r['seconds'][k]:.0f}" for k in PHASES)


def _race_run(r: dict) -> str:
    """What ran: fastssl's demo or its --method with the overrides; the peer's crop sides."""
    if r["tool"] == "fastssl":
        if "--method" not in r["command"].split():
            return f"the demo (`fastssl train`: {r['method']})"
        return " ".join([f"--method {r['method']}", *r["overrides"]])
    views = r["train_args"]["transform_args"]
    crops = f"{views['image_size'][0]}-px"
    if views.get("local_view"):
        crops += f" and {views['local_view']['num_views']} × {views['local_view']['view_size'][0]}-px"
    return f"its {r['method']}, fastssl's {crops} crops"


TIME_TO_ACCURACY_COLUMNS = [
    ("tool", lambda r: f"{r['tool']} {r.get('version', '')}".strip()), ("run", _race_run),
    ("backbone", col("backbone")), ("epochs (steps)", lambda r: f"{r['epochs']:g} ({r['steps']})"),
    ("train s", col("train_s", "{:.0f}")), ("img/s", col("images_per_second", "{:.0f}")),
    ("× peer img/s", col("images_per_second_ratio_fastssl", "{:.2f}")),
    ("kNN k=20 T=0.07", lambda r: f"{100 * r['knn_top1']:.2f}%"),
    ("kNN k=200 T=0.1", lambda r: f"{100 * r['knn_top1_k200']:.2f}%"),
    ("s: data / fwd / bwd / optim / eval / other", _split), ("command s", col("command_wall_s", "{:.0f}")),
    ("load avg", col("load_avg", "{:.1f}"))]

DEMO_SEARCH_COLUMNS = [
    ("candidate", col("candidate")), ("change", col("change")),
    ("epochs (steps)", lambda r: f"{r['epochs']} ({r['steps']})"), ("kNN top-1", pct("knn_top1")),
    ("random init", pct("knn_top1_random_init")), ("margin", margin), ("linear probe", pct("linear_top1")),
    ("img/s (shared machine)", col("images_per_second")), ("command wall s", col("command_wall_s")),
    ("machine", col("machine_load"))]

# NAME -> (data file, renderer of its rows)
TABLES: dict[str, tuple[str, Callable[[list[dict]], str]]] = {
    "traffic_model": ("traffic_model.jsonl", _traffic),
    "memory_plan": ("memory_plan.jsonl", _memory),
    "memory_verdict": ("memory_plan.jsonl", _memory_verdict),
    "memory_ibot": ("memory_plan.jsonl", _memory_ibot),
    "memory_bank": ("memory_bank.jsonl", _memory_bank),
    "compile_gate": ("compile_gate.jsonl", _compile_gate),
    "presets": ("presets.jsonl", Table("presets.jsonl", [
        ("method", preset_method), ("backbone", col("backbone")), ("steps", col("steps")),
        ("kNN top-1", pct("knn_top1")), ("random init", pct("knn_top1_random_init")), ("margin", margin),
        ("img/s", col("images_per_second", "{:.0f}")),
        ("command wall s", col("command_wall_s", "{:.0f}")),
        ("load avg", col("load_avg", "{:.1f}")), ("date", col("date")), ("git", col("git_sha"))]).render),
    "checkpoint": ("checkpoint.jsonl", Table("checkpoint.jsonl", [
        ("checkpoints", col("mode")), ("backbone", col("backbone")), ("every", col("checkpoint_every")),
        ("steps", col("steps")), ("s / step (CPU, ratios only)", col("step_s", "{:.3f}")),
        ("× none", col("ratio_to_none", "{:.2f}"))]).render),
    "under_load": ("under_load.jsonl", Table("under_load.jsonl", [
        ("setting", col("setting")), ("ms/step (CPU, ratios only)", col("ms_per_step", "{:.0f}")),
        ("× idle default", col("ratio_to_idle_default", "{:.2f}"))]).render),
    "data": ("data.jsonl", Table("data.jsonl", [
        ("case", col("case")), ("batch", col("batch")), ("views", col("views")), ("threads", col("threads")),
        ("provider", col("provider")), ("ms (CPU, ratios only)", col("ms", "{:g}")),
        ("× eager", col("speedup_vs_eager", "{:g}"))]).render),
    "shards": ("shards.jsonl", Table("shards.jsonl", [
        ("load avg", col("load_avg")), ("backend", col("backend")), ("threads", col("threads")),
        ("shards / folder", col("shards_over_folder", "{:.2f}")),
        ("folder / 1 thread", col("folder_over_1_thread", "{:.2f}")),
        ("shards / 1 thread", col("shards_over_1_thread", "{:.2f}"))]).render),
    "weak_study": ("weak_study.jsonl", Table("weak_study.jsonl", [
        ("images × epochs", lambda r: f"{r['train_images']:,} × {r['epochs']}"), ("seeds", col("seeds")),
        ("loss", col("loss")), ("sampling", col("sampling")),
        ("kNN top-1 (%)", lambda r: f"{r['knn_top1']:.2f}" + (
            f" ± {r['knn_top1_std']:.2f}" if r["knn_top1_std"] is not None else "")),
        ("final train loss", col("final_train_loss", "{:.4f}")), ("steps", col("steps")),
        ("train s", col("train_s"))]).render),
    "demo_search_round1": ("demo_search.jsonl", Table("demo_search.jsonl", DEMO_SEARCH_COLUMNS,
                                                      keep=lambda r: r["round"] == 1).render),
    "demo_search_round2": ("demo_search.jsonl", Table("demo_search.jsonl", DEMO_SEARCH_COLUMNS,
                                                      keep=lambda r: r["round"] == 2).render),
    "clip_demo": ("clip_demo.jsonl", Table("clip_demo.jsonl", [
        ("method", col("method")), ("epochs (steps)", lambda r: f"{r['epochs']} ({r['steps']})"),
        ("class read-out top-1 (chance 10%)", _read_out()),
        ("kNN top-1", pct("knn_top1")), ("linear probe", pct("linear_top1")),
        ("image→text R@1/5/10 (%)", _recall("image_to_text")),
        ("text→image R@1/5/10 (%)", _recall("text_to_image")),
        ("train s", col("train_seconds", "{:.1f}"))]).render),
    "time_to_accuracy": ("time_to_accuracy.jsonl", Table("time_to_accuracy.jsonl",
                                                         TIME_TO_ACCURACY_COLUMNS).render),
    "race_search": ("race_search.jsonl", Table("race_search.jsonl", [
        ("trial", col("trial")), ("method", col("method")), ("preset of git", col("git_sha")),
        ("overrides", lambda r: " ".join(r["overrides"])),
        ("epochs (steps)", lambda r: f"{r['epochs']:g} ({r['steps']})"),
        ("kNN k=20 T=0.07", lambda r: f"{100 * r['knn_top1']:.2f}%"),
        ("kNN k=200 T=0.1", lambda r: f"{100 * r['knn_top1_k200']:.2f}%"),
        ("img/s (shared machine)", col("images_per_second", "{:.0f}")),
        ("load avg", col("load_avg", "{:.1f}"))]).render),
    "finetune_presets": ("finetune_study.jsonl", Table("finetune_study.jsonl", [
        ("method", col("method")), ("backbone", col("backbone")),
        ("pre-training steps", col("pretrain_steps")),
        ("px: pre-train → fine-tune", lambda r: f"{r['pretrain_size']} → {r['size']}"), ("init", col("init")),
        ("linear probe", _pct100("linear_top1")), ("fine-tuned top-1", _pct100("finetune_top1")),
        ("fine-tuned top-5", _pct100("finetune_top5")), ("fine-tuning steps", col("finetune_steps"))],
        keep=lambda r: r["part"] == "presets").render),
    "finetune_vocab": ("finetune_study.jsonl", Table("finetune_study.jsonl", [
        ("vocabulary", col("vocab")), ("targets", col("targets")), ("labels", col("labels")),
        ("images kept", col("images")), ("kNN", _pct100("knn_top1")),
        ("linear probe", _pct100("linear_top1")),
        ("fine-tuned top-1", _pct100("finetune_top1"))], keep=lambda r: r["part"] == "vocab").render),
    "readouts": ("readouts.jsonl", Table("readouts.jsonl", [
        ("read-out of the last stage", col("readout")), ("dim", col("dim")), ("kNN trained", pct("knn_top1")),
        ("kNN random init", pct("knn_top1_random_init")), ("margin", margin)]).render),
}


def render(text: str, results: Path) -> str:
    """`text` with every generated table rewritten from its data file under `results`."""

    def table(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise ValueError(f"table:{name}: expected one of {sorted(TABLES)}")
        file, renderer = TABLES[name]
        return m.group(1) + renderer(read_rows(results / file)) + "\n" + m.group(4)

    return MARKER.sub(table, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("docs", nargs="*", type=Path, help=f"documents (default: {', '.join(DOCS)})")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--check", action="store_true",
                        help="rewrite nothing; exit 1 if a document is not what its data gives")
    args = parser.parse_args(argv)
    stale = []
    for doc in args.docs or [Path(d) for d in DOCS]:
        text = doc.read_text()
        new = render(text, args.results)
        if new != text:
            stale.append(str(doc))
            if not args.check:
                doc.write_text(new)
    if stale:
        print(("stale: " if args.check else "rewritten: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
