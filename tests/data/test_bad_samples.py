"""Bad samples on every backend and reader: broken frames never reach a decoder, and a folder
with a garbage PNG and truncated ones trains on DALI (CPU) and torchvision without a crash,
the bad files named and counted; reader workers end with their parent."""

import io
import json
import os
import select
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import forked
import numpy as np
import pytest
from PIL import Image

from fastssl.data import dali as dali_backend
from fastssl.data.sources import decode_error, frame_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _encoded(fmt, size=(12, 10)):
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP", "TIFF", "PPM"])
def test_frame_error_passes_whole_files_and_flags_cut_ones(fmt, tmp_path):
    data = _encoded(fmt)
    assert frame_error(data) is None and decode_error(data) is None
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    assert frame_error(str(path)) is None
    cut = data[: len(data) // 2]
    if fmt in ("PNG", "JPEG", "BMP", "WEBP"):  # formats whose frame tells their end or length
        assert frame_error(cut) is not None and decode_error(cut) is not None


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"GIF89a" + b"\x00" * 30, "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 62, "IHDR"),  # a 70-byte PNG of zeros after its signature
])
def test_frame_error_names_garbage(data, match):
    assert match in frame_error(data)
    assert decode_error(data) is not None  # PIL agrees the file is bad


def _garble_idat(path):
    """Flip the deflate data of the PNG's first IDAT chunk and fix its CRC: a whole frame that
    does not decode (the decoder finds it, not frame_error)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT")
    n = struct.unpack(">I", data[at - 4: at])[0]
    for k in range(at + 6, at + 4 + n):  # past the 2-byte zlib header
        data[k] ^= 0x5A
    data[at + 4 + n: at + 8 + n] = struct.pack(">I", zlib.crc32(bytes(data[at: at + 4 + n])))
    path.write_bytes(bytes(data))


def _png_folder(root, n=200):
    """n 16x16 PNGs in two classes; a/050 a 70-byte PNG (whole header, then zeros), b/010,
    b/060, b/090 truncated, and a/030 whole but with garbled image data."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(n // 2):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{k:03d}.png")
    head = (root / "a" / "000.png").read_bytes()[:33]
    (root / "a" / "050.png").write_bytes(head + b"\x00" * 37)
    for k in (10, 60, 90):
        path = root / "b" / f"{k:03d}.png"
        path.write_bytes(path.read_bytes()[:-200])
    _garble_idat(root / "a" / "030.png")
    return ["a/030.png", "a/050.png", "b/010.png", "b/060.png", "b/090.png"]


_TRAIN_ON_FOLDER = textwrap.dedent("""
    import json, logging, sys
    from fastssl.data import ImageFolderSource, build_loader, recipes
    records = []
    logging.getLogger("fastssl.data").addHandler(type("H", (logging.Handler,), {
        "emit": lambda self, r: records.append(r.getMessage())})())
    out = {}
    for run, backend in enumerate(sys.argv[2].split(",")):
        for batch in (32, 64):
            loader = build_loader(ImageFolderSource(sys.argv[1]), recipes.mocov2(size=8), batch_size=batch,
                                  loader=backend, device="cpu", num_threads=2, max_skipped_fraction=0.05)
            seen = sum(len(b["index"]) for b in loader)
            out[f"{run}:{backend}/{batch}"] = [seen, len(loader) * batch, loader.skipped_samples, records[:]]
            records.clear()
    print(json.dumps(out))
""")


def test_corrupt_and_truncated_pngs_never_crash_any_backend(tmp_path):
    bad = _png_folder(tmp_path / "f")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    # In a child process, as DALI crashed it (SIGSEGV) on such files; three times, as it crashed
    # intermittently; torchvision's workers once.
    runs = ["torchvision"] + ["dali"] * 3 * dali_backend.HAS_DALI
    run = forked.run_code(_TRAIN_ON_FOLDER, [tmp_path / "f", ",".join(runs)], env=env, timeout=300)
    assert run.returncode == 0, f"rc {run.returncode}\n{run.stderr[-2000:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(result) == 2 * len(runs)
    for key, (seen, planned, skipped, messages) in result.items():
        assert seen == planned, key  # every slot filled: batch sizes and step counts kept
        named = {name for name in bad for m in messages if name in m}
        # shuffled epochs drop the last partial batch: every bad file the epoch planned is named
        assert skipped == len(messages) == len(named) and 1 <= skipped <= len(bad), (key, messages)
        assert all("truncated" in m or "a/030.png" in m for m in messages), messages


def _alive(pid):
    """Whether `pid` runs (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


_HOLD_WORKERS = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from fastssl.data import ArraySource, build_loader, recipes
    source = ArraySource(np.zeros((64, 8, 8, 3), np.uint8))
    loaders = [build_loader(source, recipes.mae(8), batch_size=8, loader=b, device="cpu", num_threads=2)
               for b in sys.argv[1].split(",")]
    iters = [iter(loader) for loader in loaders]
    for it in iters:
        next(it)
    kids = [int(p) for p in os.listdir("/proc") if p.isdigit()
            and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == str(os.getpid())]
    print(" ".join(map(str, kids)), flush=True)
    time.sleep(600)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reader_workers_die_with_a_killed_parent():
    backends = ["torchvision"] + (["dali"] if dali_backend.HAS_DALI else [])
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_WORKERS, ",".join(backends)], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        kids = [int(p) for p in proc.stdout.readline().split()] if ready else []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(kids) >= 2 * len(backends)  # two workers per loader
    deadline = time.monotonic() + 5.0
    while any(map(_alive, kids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [k for k in kids if _alive(k)]
    for k in survivors:  # leave nothing behind, then fail
        os.kill(k, signal.SIGKILL)
    assert not survivors, f"worker processes {survivors} outlived their killed parent"
