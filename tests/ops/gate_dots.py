"""The compile gate's tensor-core check, one verdict per tl.dot: each tl.dot in a kernel and in the
@triton.jit helpers it calls is found in the compiled TTGIR by its source location (an inlined
helper's ops carry a call-site location whose callee is the helper's line) and judged by the op it
became: ttng.warp_group_dot (wgmma, sm_90), ttng.tc_gen5_mma (sm_100) or tt.dot with an MMA result
layout (mma.sync) use tensor cores; a tt.dot with a blocked layout is lowered to FMAs."""

from __future__ import annotations

import inspect
import re

LOC_DEF = re.compile(r"^#(loc\d*) = loc\((.*)\)\s*$", re.M)
LOC_REF = re.compile(r"#(loc\d*)\b")
FILE_LINE = re.compile(r'"([^"]+)":(\d+):\d+')
DOT_OP = re.compile(r"\b(tt\.dot|ttng\.warp_group_dot|ttng\.tc_gen5_mma) ")
MMA_RESULT = re.compile(r"-> tensor<[^>]*#mma")


def dot_sites(kernel) -> dict:
    """{(file, line): label} of every tl.dot in `kernel` (a JITFunction) and the @triton.jit helpers
    it calls, transitively; a label is 'function+offset' (the line within the function, so a
    verdict stays true when code above the function moves)."""
    from triton.runtime.jit import KernelInterface

    sites, todo, seen = {}, [kernel], set()
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        py = fn.fn
        lines, start = inspect.getsourcelines(py)
        path = inspect.getsourcefile(py)
        for i, text in enumerate(lines):
            if "tl.dot(" in text.split("#")[0]:
                sites[(path, start + i)] = f"{py.__name__}+{i}"
        todo += [obj for name in re.findall(r"\b(\w+)\s*\(", "".join(lines))
                 if isinstance(obj := py.__globals__.get(name), KernelInterface)]
    return sites


def _lines(text: str, defs: dict, depth: int = 0) -> set:
    """Every (file, line) a location text refers to, through #loc aliases and call sites."""
    out = {(f, int(n)) for f, n in FILE_LINE.findall(text)}
    if depth < 32:
        for ref in LOC_REF.findall(text):
            out |= _lines(defs.get(ref, ""), defs, depth + 1)
    return out


def dot_verdicts(kernel, ttgir: str, ptx_tensor_cores: bool) -> dict:
    """{label: 'tc' | 'fma' | 'not compiled'} per tl.dot site of `kernel` (a constexpr branch may
    leave a site out of this configuration)."""
    defs = dict(LOC_DEF.findall(ttgir))
    found: dict = {}
    for line in ttgir.splitlines():
        op = DOT_OP.search(line)
        if not op or " loc(" not in line:
            continue
        uses_tc = op.group(1) != "tt.dot" or bool(MMA_RESULT.search(line))
        for where in _lines(line[line.rindex(" loc(") :], defs):
            found[where] = found.get(where, True) and uses_tc
    verdicts = {}
    for where, label in dot_sites(kernel).items():
        if where not in found:
            verdicts[label] = "not compiled"
        else:
            verdicts[label] = "tc" if found[where] and ptx_tensor_cores else "fma"
    return verdicts
