"""Does the compile gate compile what the test suite runs? Every kernel launch the CPU suite makes
under the interpreter is recorded (tests/conftest.py) by its signature, shapes aside: the kernel,
its flag constexprs (tile sizes and constants left out: the launcher picks those by shape and
card), each tensor argument's dtype and each argument passed as None (an absent optional
tensor, a specialization of its own). At the end of the session the recorded signatures are
compared with those of the launches the gate compiles (its scenarios captured on fake CUDA
tensors for sm_90); a configuration the suite checks on the CPU but the gate never compiles
fails the session unless gate_gaps.txt lists it as a known gap (a list that may only shrink).

The gate's signatures are cached beside its compile verdicts under a hash of every source that
decides them (fastssl/, the gate's modules, Triton's version); the call-site test of the gate,
which captures the same scenarios, writes that cache, so a full run pays the capture once."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# Picked by the launcher from the shapes and the card, or a numeric constant: not a code path.
SHAPE_CONSTEXPRS = re.compile(r"BLOCK_\w*|EPS")


@functools.cache
def _params(fn) -> tuple:
    return tuple(
        (name, "constexpr" in str(p.annotation)) for name, p in inspect.signature(fn).parameters.items()
    )


def signature(kernel, args: tuple, kwargs: dict) -> str:
    """`kernel` (a JITFunction, InterpretedFunction or anything with the Python function as .fn)
    launched with these arguments, as 'module.name arg:dtype FLAG=value ...'."""
    fn = kernel.fn
    values = dict(zip((name for name, _ in _params(fn)), args)) | kwargs
    parts = [f"{fn.__module__}.{fn.__name__}"]
    for name, is_constexpr in _params(fn):
        if name not in values:
            continue
        v = values[name]
        if hasattr(v, "dtype"):
            parts.append(f"{name}:{str(v.dtype).removeprefix('torch.')}")
        elif v is None:
            parts.append(f"{name}=None")
        elif is_constexpr and not SHAPE_CONSTEXPRS.fullmatch(name):
            parts.append(f"{name}={int(v) if isinstance(v, bool) else v}")
    return " ".join(parts)


def _sources_hash() -> str:
    import triton

    h = hashlib.sha256(triton.__version__.encode())
    files = sorted((ROOT / "fastssl").rglob("*.py")) + [HERE / n for n in (
        "compile_gate.py", "gate_call_sites.py", "gate_capture.py", "gate_compile.py", "gate_coverage.py",
        "gate_dots.py", "gate_flag_grid.py", "gate_report.py")]
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    return h.hexdigest()[:16]


def _cache_path() -> Path:
    from triton import knobs

    return Path(knobs.cache.dir) / "fastssl_compile_gate" / f"signatures-{_sources_hash()}.json"


def save(signatures: set) -> None:
    """Store the gate's signatures for the current sources (called where the scenarios are captured)."""
    path = _cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(sorted(signatures)))
    tmp.replace(path)


CAPTURE = """
import compile_gate as g, gate_coverage
from gate_coverage import signature
card, sigs = g.CARDS[90], set()
for name, run in g.scenarios():
    with g.fake_cuda(card) as recorded:
        run()
    sigs |= {signature(x.fn, x.args, x.kwargs) for x in g.expand(recorded, card)}
gate_coverage.save(sigs)
"""


def gate_signatures() -> set:
    """The signatures of every launch the gate compiles, from the cache or captured now (in a
    process without the interpreter: about a minute)."""
    path = _cache_path()
    if not path.is_file():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
        out = subprocess.run([sys.executable, "-c", CAPTURE], env=env, capture_output=True, text=True,
                             timeout=900)
        if out.returncode != 0:
            raise RuntimeError(f"capturing the compile gate's launches failed:\n{out.stderr[-3000:]}")
    return set(json.loads(path.read_text()))


# A probe the interpreter path runs on the CPU only (is its dot exact in this dtype?), never on a card.
INTERPRETER_ONLY = re.compile(r"fastssl\.ops\.backend\.dot_probe ")
GAPS = HERE / "gate_gaps.txt"


def known_gaps() -> set:
    return {ln for ln in GAPS.read_text().splitlines() if ln and not ln.startswith("#")}


def captured() -> bool:
    """Whether the gate's signatures for these sources are cached (checking costs nothing more)."""
    return _cache_path().is_file()


def coverage_failures(recorded: set) -> list[str]:
    """One line per recorded signature the gate does not compile and gate_gaps.txt does not list,
    and per line of gate_gaps.txt that the gate compiles now (the list only shrinks)."""
    compiled, gaps = gate_signatures(), known_gaps()
    new = sorted(s for s in recorded - compiled - gaps if not INTERPRETER_ONLY.match(s))
    closed = sorted(gaps & compiled)
    return [f"not compiled by the gate: {s}" for s in new] + [
        f"compiled by the gate now, remove it from {GAPS.name}: {s}" for s in closed]
