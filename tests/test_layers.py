"""The import rules of the house, read from the source (every import, lazy ones included):
imports point down the layers, ops stay free of the rest of fastssl, nothing outside ops/
reaches into a private ops module, the package graph has no cycle, and no module is over 500
lines."""

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fastssl"

# what each part may never import (by first component under fastssl)
FORBIDDEN = {
    "ops": {"engine", "methods", "cli", "cli_parser", "cli_errors", "runs", "finetune", "bench", "viz",
            "losses", "models", "data", "eval", "distributed", "config", "method"},
    "losses": {"engine", "methods", "cli", "cli_parser", "cli_errors", "runs", "finetune", "bench", "viz"},
    "models": {"engine", "methods", "cli", "cli_parser", "cli_errors", "runs", "finetune", "bench"},
    "data": {"engine", "methods", "cli", "cli_parser", "cli_errors", "runs", "finetune", "bench"},
    "eval": {"engine", "methods", "cli", "cli_parser", "cli_errors", "runs", "finetune", "bench"},
    "methods": {"engine", "cli", "cli_parser", "cli_errors", "runs", "finetune", "bench"},
    "engine": {"methods", "cli", "cli_parser", "cli_errors", "runs", "finetune", "bench", "viz"},
    "config": {"engine", "methods", "cli", "runs", "finetune", "bench"},
    "method": {"engine", "methods", "cli", "runs", "finetune", "bench"},
    "validation": {"*"},
}


def _imports() -> list[tuple[str, str]]:
    """(importing module's dotted name, imported fastssl module) for every import in fastssl/."""
    edges = []
    for path in ROOT.rglob("*.py"):
        parts = ("fastssl",) + path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges += [(module, a.name) for a in node.names if a.name.startswith("fastssl")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    kept = base[:len(base) - node.level + 1]
                    target = ".".join(kept + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("fastssl"):
                    edges += [(module, f"{target}.{a.name}") for a in node.names] + [(module, target)]
    return edges


def _part(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else ""


EDGES = _imports()


def test_the_source_was_read():
    assert len(EDGES) > 200 and any(src.startswith("fastssl.engine") for src, _ in EDGES)


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_imports_point_down(part):
    bad = sorted({(src, dst) for src, dst in EDGES if _part(src) == part and _part(dst) != part
                  and (_part(dst) in FORBIDDEN[part] or ("*" in FORBIDDEN[part] and _part(dst)))})
    assert not bad, f"fastssl.{part} imports what lies above it: {bad}"


def test_no_private_ops_module_outside_ops():
    bad = sorted({(src, dst) for src, dst in EDGES if _part(src) != "ops" and dst.startswith("fastssl.ops.")
                  and any(p.startswith("_") for p in dst.split(".")[2:])})
    assert not bad, bad


def test_package_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for src, dst in EDGES:
        a, b = _part(src), _part(dst)
        if a and b and a != b and b in {_part(s) for s, _ in EDGES}:
            graph.setdefault(a, set()).add(b)

    def cycle_from(node, stack, done):
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        done.add(node)
        for nxt in sorted(graph.get(node, ())):
            found = cycle_from(nxt, stack + [node], done)
            if found:
                return found
        return None

    done: set[str] = set()
    for start in sorted(graph):
        found = cycle_from(start, [], done)
        assert not found, f"import cycle between fastssl packages: {' -> '.join(found)}"


MAX_LINES = 500


def test_no_module_over_500_lines():
    """Every Python file git holds (tracked, or new and not ignored) under fastssl/, tests/ and
    benchmarks/ has at most MAX_LINES lines."""
    repo = ROOT.parent
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout: which files are the project's is git's answer")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "fastssl", "tests",
         "benchmarks"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    paths = [repo / p for p in listed if p.endswith(".py") and (repo / p).is_file()]
    assert len(paths) > 100, listed[:10]
    long = {str(p.relative_to(repo)): n for p in paths if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them into cohesive modules): {long}"
