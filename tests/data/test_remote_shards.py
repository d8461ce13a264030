"""Shards over the network: a real HTTP server on 127.0.0.1 (http.server in a thread, an
ephemeral port) serving shards written by fastssl's own writer, with failures injected
by the server (503 on first tries, 404s, stalls past the read timeout, Range ignored),
and pipe: commands. Every request loop here is bounded in count (retries) and time
(sub-second timeouts); the tests finish in seconds."""

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from test_shards import BACKENDS, _write

from fastssl.data import build_loader, data_splits, recipes
from fastssl.data import dali as dali_backend
from fastssl.data.order import resampled_indices
from fastssl.data.remote import RemoteOptions, RemoteReader, is_url
from fastssl.data.shards import ShardSource

FAST = RemoteOptions(retries=2, backoff_s=0.01, connect_timeout_s=1.0, read_timeout_s=0.3)
STALL_S = 1.5  # how long a stalling server sleeps: past FAST's read timeout, short enough for a test


class _Handler(BaseHTTPRequestHandler):
    """Serves files under the server's root at /shards/NAME with Range support, and the
    failures set on the server: missing (404), fail_first (503 for the first n requests),
    stall_first (sleep STALL_S for the first n), honour_range, range_delay."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        srv = self.server
        name = urlsplit(self.path).path.removeprefix("/shards/")
        with srv.lock:
            srv.requests[name] += 1
            n = srv.requests[name]
        if name in srv.missing:
            return self.send_error(404)
        if n <= srv.fail_first.get(name, 0):
            return self.send_error(503)
        if n <= srv.stall_first.get(name, 0):
            time.sleep(STALL_S)
        if "Range" in self.headers:
            time.sleep(srv.range_delay)
        path = srv.root / name
        if "/" in name or not path.is_file():
            return self.send_error(404)
        data = path.read_bytes()
        ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if ranged and srv.honour_range:
            lo, hi = int(ranged.group(1)), int(ranged.group(2))
            data = data[lo: hi + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {lo}-{hi}/{path.stat().st_size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on a stalled answer
            pass

    def log_message(self, *args):
        pass


def _serve(tmp_path, tls: ssl.SSLContext | None = None):
    src, out = _write(tmp_path)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    httpd.daemon_threads = True
    httpd.root, httpd.lock, httpd.requests = out, threading.Lock(), Counter()
    httpd.missing, httpd.fail_first, httpd.stall_first, httpd.honour_range = set(), {}, {}, True
    httpd.range_delay = 0.0
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{httpd.server_address[1]}/shards/", httpd, out, src
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server(tmp_path):
    """(base URL, server, local shard folder, source images): the writer's 24 samples in 5
    shards of 5 (the last 4), served from 127.0.0.1 on an ephemeral port."""
    yield from _serve(tmp_path)


def _all(source):
    return [(source.name(i).rsplit("/", 1)[-1], int(source.labels[i]), source.read_bytes(i).tobytes())
            for i in range(len(source))]


def _views(loader):
    return [(b["index"].tolist(), b["label"].tolist(), [v.clone() for v in b["views"]]) for b in loader]


def _same_epochs(a, b):
    assert [x[:2] for x in a] == [y[:2] for y in b]
    assert all((u == v).all() for x, y in zip(a, b) for u, v in zip(x[2], y[2]))


def test_http_brace_pattern_reads_what_the_local_shards_hold_in_the_same_order(server):
    base, httpd, out, src = server
    local = ShardSource(out / "shard-{000000..000004}.tar")
    remote = ShardSource(base + "shard-{000000..000004}.tar", remote=FAST)
    assert is_url(remote.spec) and len(remote) == len(local) == 24 and not remote.skipped
    assert _all(remote) == _all(local)
    assert (remote.shard_of == local.shard_of).all()
    assert remote.tags(local.tag_vocabulary()) == local.tags(local.tag_vocabulary())
    signed = ShardSource(base + "shard-{000001..000002}.tar?token=a%2Fb", remote=FAST)  # a signed URL's query
    assert [s[1:] for s in _all(signed)] == [s[1:] for s in _all(local)[5:15]]
    kw = dict(batch_size=4, loader="torchvision", device="cpu", num_threads=2, seed=7, shuffle_buffer=6)
    for epoch in (0, 1):
        a, b = build_loader(local, recipes.mocov2(8), **kw), build_loader(remote, recipes.mocov2(8), **kw)
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        _same_epochs(_views(b), _views(a))
    # Exact mid-epoch resume, as for local shards: batch 3 onwards of epoch 1, the same batches.
    full = build_loader(local, recipes.mocov2(8), **kw)
    full.set_epoch(1)
    resumed = build_loader(remote, recipes.mocov2(8), **kw)
    resumed.set_epoch(1, start=3)
    _same_epochs(_views(resumed), _views(full)[3:])


def test_folder_url_with_manifest_and_data_spec(server):
    base, httpd, out, src = server
    splits = data_splits(base)  # a folder URL: its manifest.json lists the shards
    local = data_splits(str(out))
    assert _all(splits.pretrain) == _all(local.pretrain) and _all(splits.test) == _all(local.test)
    assert splits.pretrain.classes == list("abcde")


def test_failed_first_tries_are_retried_and_a_missing_shard_counts_its_samples(server):
    base, httpd, out, src = server
    httpd.fail_first = {"shard-000001.tar": 2, "manifest.json": 1}  # two 503s: within FAST's 2 retries
    httpd.missing = {"shard-000003.tar"}
    with pytest.warns(UserWarning, match="5 sample"):
        source = ShardSource(base, remote=FAST)
    assert httpd.requests["shard-000001.tar"] == 3
    assert httpd.requests["shard-000003.tar"] == 1  # a 404 is not retried
    assert len(source) == 19 and len(source.skipped) == 5  # the manifest says shard 3 held 5
    assert "FileNotFoundError" in source.skipped[0][1]
    local = ShardSource(out)
    assert _all(source) == [s for s in _all(local) if not s[0].startswith("shard-000003.tar")]
    kw = dict(batch_size=4, loader="torchvision", device="cpu", num_threads=1)
    loader = build_loader(source, recipes.mae(8), max_skipped_fraction=0.25, **kw)
    assert loader.skipped_samples == 5
    with pytest.raises(ValueError, match=r"5 of 24 .*max_skipped_fraction.*shard-000003.tar"):
        build_loader(source, recipes.mae(8), max_skipped_fraction=0.1, **kw)


def test_a_stalling_server_is_retried_then_skipped_in_bounded_time(server):
    base, httpd, out, src = server
    httpd.stall_first = {"shard-000001.tar": 1, "shard-000002.tar": 99}  # one stall; one that always stalls
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="left out"):
        source = ShardSource(base + "shard-{000000..000004}.tar", remote=FAST)
    elapsed = time.monotonic() - t0
    assert httpd.requests["shard-000001.tar"] == 2 and httpd.requests["shard-000002.tar"] == 3
    # 3 read timeouts of 0.3 s and 2 short backoffs for the dead shard, one for the other
    assert elapsed < 4.0
    assert len(source) == 19 and "timed out" in source.skipped[0][1]
    assert "attempt 3 of 3" in source.skipped[0][1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_failing_during_the_epoch_is_skipped_counted_and_bounded(backend, server, caplog):
    """A shard indexed fine that the server stops giving: its samples are skipped and named
    by each reader process after one round of retries (then answered at once), and the epoch
    errors past max_skipped_fraction."""
    base, httpd, out, src = server
    source = ShardSource(base + "shard-{000000..000004}.tar", remote=FAST)
    httpd.missing = {"shard-000002.tar"}
    indexed = httpd.requests["shard-000002.tar"]
    kw = dict(batch_size=6, loader=backend, device="cpu", num_threads=1, shuffle=False)
    loader = build_loader(source, recipes.mae(8), max_skipped_fraction=0.25, **kw)
    t0 = time.monotonic()
    batches = _views(loader)
    assert time.monotonic() - t0 < 30
    assert [len(i) for i, _, _ in batches] == [6] * 4 and loader.skipped_samples == 5
    assert not set(range(10, 15)) & {i for idx, _, _ in batches for i in idx}
    # A 404 is not retried, and a process asks no more after it: the reader's one batch request
    # for the two samples of shard 2 in batch 1, and (DALI) one to name them in the main process.
    assert httpd.requests["shard-000002.tar"] - indexed <= 3
    strict = build_loader(source, recipes.mae(8), max_skipped_fraction=0.1, **kw)
    with pytest.raises(ValueError, match=r"max_skipped_fraction.*shard-000002.tar"):
        _views(strict)


def test_a_batch_is_requested_together(server):
    """A batch's samples are requested concurrently: 12 answers that each take 0.5 s arrive
    well before the 6 s that one request after another cannot beat (the server sleeps)."""
    base, httpd, out, src = server
    source = ShardSource(base, remote=RemoteOptions(retries=0, read_timeout_s=3.0))
    httpd.range_delay = 0.5
    t0 = time.monotonic()
    got = source.read_many(range(12))
    assert time.monotonic() - t0 < 4.0
    local = ShardSource(out)
    assert [g.tobytes() for g in got] == [local.read_bytes(i).tobytes() for i in range(12)]


def test_a_server_that_ignores_range_requests_is_refused_by_name(server):
    base, httpd, out, src = server
    httpd.honour_range = False
    with pytest.raises(ValueError, match="ignores HTTP Range requests"):
        ShardSource(base + "shard-000000.tar", remote=FAST)


def test_resampled_mode_draws_shards_with_replacement_seeded_per_rank(server):
    base, httpd, out, src = server
    remote = ShardSource(base + "shard-{000000..000004}.tar", remote=FAST)
    local = ShardSource(out)
    draw = dict(epoch=0, seed=3, shard_id=0, num_samples=100, buffer_size=0)
    idx, shards = resampled_indices(remote.shard_of, **draw)
    again, shards_again = resampled_indices(local.shard_of, **draw)
    assert (idx == again).all() and (shards == shards_again).all()  # same seed: same shard sequence
    assert len(idx) == 100 and len(shards) > 5 and len(set(shards.tolist())) <= 5  # with replacement
    # buffer 0: each drawn shard's samples in stored order, one shard after the other
    starts = [0, 5, 10, 15, 20, 24]
    assert idx.tolist() == [i for k in shards for i in range(starts[k], starts[k + 1])][:100]
    other_rank, _ = resampled_indices(local.shard_of, **(draw | {"shard_id": 1}))
    other_epoch, _ = resampled_indices(local.shard_of, **(draw | {"epoch": 1}))
    assert not (other_rank == idx).all() and not (other_epoch == idx).all()
    # Through the loader: an epoch is samples_per_epoch over the ranks, whatever the dataset's size.
    kw = dict(batch_size=5, loader="torchvision", device="cpu", num_threads=1, seed=3, shuffle_buffer=4,
              samples_per_epoch=60, num_shards=2)
    loaders = [build_loader(remote, recipes.mae(8), shard_id=r, **kw) for r in (0, 1)]
    assert [len(lo) for lo in loaders] == [6, 6]
    epoch = _views(loaders[0])
    same = _views(build_loader(local, recipes.mae(8), shard_id=0, **kw))
    _same_epochs(epoch, same)
    assert len({i for idx, _, _ in epoch for i in idx}) < 30  # 30 draws from 24 samples repeat some
    resumed = build_loader(remote, recipes.mae(8), shard_id=0, **kw)
    resumed.set_epoch(0, start=2)
    _same_epochs(_views(resumed), epoch[2:])  # drawn from (seed, epoch, rank): a resumed epoch repeats
    with pytest.raises(ValueError, match="samples_per_epoch"):
        build_loader(src, recipes.mae(8), batch_size=5, loader="torchvision", device="cpu",
                     samples_per_epoch=60)


def test_pipe_command_reads_the_shards(tmp_path):
    _, out = _write(tmp_path)
    source = ShardSource(f"pipe:cat {out}/shard-{{000000..000004}}.tar", remote=FAST)
    assert [s[1:] for s in _all(source)] == [s[1:] for s in _all(ShardSource(out))]
    with pytest.warns(UserWarning, match="exited with status 1"):
        part = ShardSource(f"pipe:cat {out}/shard-{{000000.tar,000001.tar {tmp_path}/no-such-file}}",
                           remote=FAST)
    assert len(part) == 5  # the second command fails after its shard: it is left out whole


def test_nothing_read_from_a_manifest_runs_a_command(server, tmp_path):
    base, httpd, out, src = server
    marker = tmp_path / "ran"
    evil = json.loads((out / "manifest.json").read_text()) | {"shards": [f"pipe:touch {marker}"]}
    (out / "manifest.json").write_text(json.dumps(evil))
    with pytest.raises(ValueError, match="plain .tar file names"):
        ShardSource(base, remote=FAST)
    (out / "manifest.json").write_text(json.dumps(evil | {"shards": ["shard-000000.tar"],
                                                          "samples_per_shard": "5"}))
    with pytest.raises(ValueError, match="samples_per_shard"):
        ShardSource(base, remote=FAST)
    # A local manifest's names are paths under its folder, never commands.
    evil["shards"] = [f"pipe:touch {marker}", "shard-000000.tar"]
    (out / "manifest.json").write_text(json.dumps(evil))
    with pytest.warns(UserWarning, match="left out"):
        ShardSource(out)
    assert not marker.exists()


def test_a_shard_past_max_shard_bytes_is_left_out_not_retried(server):
    """An endless or mistaken answer must not fill the memory: a bounded read, no retry."""
    base, httpd, out, src = server
    shard = (out / "shard-000000.tar").read_bytes()
    (out / "big.tar").write_bytes(shard + bytes(len(shard)))  # a valid tar: zero blocks past its end
    small = RemoteOptions(retries=2, backoff_s=0.01, read_timeout_s=0.3, max_shard_bytes=len(shard))
    with pytest.warns(UserWarning, match="larger than max_shard_bytes"):
        source = ShardSource(base + "{big,shard-000004}.tar", remote=small)
    assert len(source) == 4 and httpd.requests["big.tar"] == 1
    endless = RemoteReader(RemoteOptions(retries=2, max_shard_bytes=1 << 20))
    t0 = time.monotonic()
    with pytest.raises(OSError, match=r"ShardTooLargeError.*\(attempt 1 of 3\)"):
        endless.fetch("pipe:yes")
    assert time.monotonic() - t0 < 10


def test_a_scheme_that_is_not_read_says_how_to_read_it():
    from fastssl.data import check_data_spec

    with pytest.raises(ValueError, match=r"s3:// is not read directly.*pipe:aws s3 cp"):
        check_data_spec("s3://bucket/shard-{000000..000009}.tar")
    with pytest.raises(ValueError, match="a folder URL ending in /"):
        ShardSource("http://127.0.0.1:9/shards")  # nothing is requested: the spec is refused first


def test_remote_options_are_checked_by_name():
    with pytest.raises(ValueError, match="retries"):
        RemoteOptions(retries=-1)
    with pytest.raises(ValueError, match="read_timeout_s"):
        RemoteOptions(read_timeout_s=0)
    with pytest.raises(TypeError, match="remote must be a RemoteOptions"):
        RemoteReader({"retries": 1})


@pytest.mark.skipif(not dali_backend.HAS_DALI, reason="DALI not installed")
@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_dali_reads_http_shards_through_its_python_feeder(start, server, monkeypatch):
    """DALI's parallel fn.external_source runs the same reader in its worker processes (forked,
    or spawned as once CUDA is initialized: the reader crosses by pickling, its HTTP client
    made anew): the same batches and, with the same seed and bytes, the same views as the
    local shards."""
    base, httpd, out, src = server
    kw = dict(batch_size=4, loader="dali", device="cpu", num_threads=1, seed=2, shuffle_buffer=6)
    local = _views(build_loader(ShardSource(out), recipes.mocov2(8), **kw))
    monkeypatch.setattr(dali_backend, "start_method", lambda: start)
    remote = _views(build_loader(ShardSource(base, remote=FAST), recipes.mocov2(8), **kw))
    assert len(remote) == 6
    _same_epochs(remote, local)


def test_fastssl_train_reads_a_url_and_counts_a_missing_shard(server, tmp_path):
    """`--data URL` through the command line: the folder URL's manifest, a shard the server
    does not have counted in summary.json, and a clear error (exit 2) past max_skipped_fraction."""
    from fastssl.cli import main

    base, httpd, out, src = server
    httpd.missing = {"shard-000004.tar"}  # its 4 samples of 24
    run = str(tmp_path / "run")
    argv = ["train", "--method", "rotnet", "--data", base, "--batch-size", "4", "--out", run, "max_steps=2",
            "eval_knn=false", "num_threads=1", "loader=torchvision", "image_size=16",
            "backbone=resnet8", "max_skipped_fraction=0.2"]
    with pytest.warns(UserWarning, match="shard-000004.tar"):
        assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_samples"] == 4
    argv[argv.index("max_skipped_fraction=0.2")] = "max_skipped_fraction=0.1"
    argv[argv.index(run)] = str(tmp_path / "run2")
    with pytest.warns(UserWarning, match="shard-000004.tar"):
        assert main(argv) == 2
    # The resampled mode: one epoch of 16 samples drawn from the 20 readable ones, 4 steps of 4.
    argv[argv.index(str(tmp_path / "run2"))] = str(tmp_path / "run3")
    argv[argv.index("max_steps=2")] = "samples_per_epoch=16"
    argv[argv.index("max_skipped_fraction=0.1")] = "max_skipped_fraction=0.2"
    with pytest.warns(UserWarning, match="shard-000004.tar"):
        assert main(argv + ["--epochs", "1"]) == 0
    summary = json.loads((tmp_path / "run3" / "summary.json").read_text())
    assert summary["steps"] == 4


def test_a_silent_pipe_command_is_killed_with_its_children(tmp_path):
    """A stalled command is killed with every process it started (its process group)."""
    marker = tmp_path / "late"
    reader = RemoteReader(RemoteOptions(retries=1, backoff_s=0.01, read_timeout_s=0.2))
    t0 = time.monotonic()
    with pytest.raises(OSError, match=r"no output for 0.2 s \(attempt 2 of 2\)"):
        reader.fetch(f"pipe:sleep 1 && touch {marker}; true")
    assert time.monotonic() - t0 < 5
    time.sleep(1.2)
    assert not marker.exists()  # the shell that would have touched it was killed, not left behind


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_with_a_certificate_the_client_trusts(tmp_path):
    """https:// through the same client: a server on 127.0.0.1 with a self-signed certificate,
    trusted by a fresh process through SSL_CERT_FILE (read when the TLS library starts)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    served = _serve(tmp_path, tls)
    base, httpd, out, src = next(served)
    try:
        script = ("import sys; from fastssl.data.shards import ShardSource; "
                  "s = ShardSource(sys.argv[1]); print(len(s), bytes(s.read_bytes(23)).hex())")
        env = dict(os.environ, SSL_CERT_FILE=str(cert))
        run = subprocess.run([sys.executable, "-c", script, base], capture_output=True, text=True, env=env,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["24", ShardSource(out).read_bytes(23).tobytes().hex()]
        assert httpd.requests["shard-000004.tar"] == 2  # the scan and one Range request for sample 23
    finally:
        next(served, None)
