"""Shards read over the network: `http://` and `https://` URLs through fsspec's HTTP
filesystem (aiohttp underneath), and `pipe:COMMAND` specs whose command writes a shard to
its standard output (as webdataset's `pipe:` URLs: `pipe:curl -s URL`, `pipe:aws s3 cp URL -`).

Every request is bounded: a connect timeout and a read timeout (no bytes for that long:
the request fails), then at most `retries` more attempts with exponential backoff. A
missing shard (404) or another client error is not retried. A shard whose request failed
every attempt is answered at once with the same error for `DEAD_S` seconds, so a dead
server costs each process one round of retries per shard, not one per sample. A shard
read whole is streamed and refused past `max_shard_bytes`, so an endless answer cannot
fill the memory.

A sample is read over HTTP by one Range request for the bytes the index names, a batch's
requests sent together; a server that ignores Range is refused when the source is opened. A `pipe:`
command can only give a whole shard, so its reader keeps the last `PIPE_SHARDS` shards
of its process in memory.

Only the user's own `--data` spec is ever run as a command: shard names read from a
remote manifest must be plain file names, resolved under the manifest's URL, so nothing
read from the network or a disk can start a process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass

from fastssl.validation import check_int, check_number

SCHEMES = ("http://", "https://", "pipe:")
PIPE_SHARDS = 2
DEAD_S = 60.0
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.tar")


def is_url(spec: str) -> bool:
    """Whether a `--data` spec names shards over the network (http, https) or a command (pipe:)."""
    return str(spec).startswith(SCHEMES)


class RemoteReadError(OSError):
    """A shard or sample that could not be fetched after every allowed attempt (an OSError,
    so the loaders' bad-sample path skips and counts it)."""


@dataclass(frozen=True)
class RemoteOptions:
    """How shards are fetched over the network."""

    retries: int = 3
    """Attempts after the first for a failed request (5xx, timeout, reset connection, failed command)."""
    backoff_s: float = 1.0
    """Wait before the first retry; doubled before each next one."""
    connect_timeout_s: float = 10.0
    """Seconds to open a connection."""
    read_timeout_s: float = 60.0
    """Seconds without a byte from the server (or from a pipe: command) before the attempt fails."""
    max_shard_bytes: int = 8 << 30
    """A shard (fetched whole when indexed, or from a pipe: command) larger than this is left out."""

    def __post_init__(self):
        check_int("retries", self.retries, low=0, high=100)
        check_number("backoff_s", self.backoff_s, low=0.0, high=3600.0)
        check_number("connect_timeout_s", self.connect_timeout_s, low=0.0, high=3600.0, low_open=True)
        check_number("read_timeout_s", self.read_timeout_s, low=0.0, high=3600.0, low_open=True)
        check_int("max_shard_bytes", self.max_shard_bytes, low=1)


class ShardTooLargeError(ValueError):
    """A shard past max_shard_bytes (an endless or mistaken answer must not fill the memory)."""


def _permanent(exc: BaseException) -> bool:
    """Whether retrying cannot help: a missing or too large shard, a client error other than 408/429."""
    if isinstance(exc, FileNotFoundError | ShardTooLargeError):
        return True
    status = getattr(exc, "status", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


class RemoteReader:
    """Fetches shards and samples by URL with timeouts, bounded retries and backoff.

    Picklable (loader and DALI worker processes): the HTTP client and the pipe cache are
    made anew in each process."""

    def __init__(self, options: RemoteOptions | None = None):
        self.options = options if options is not None else RemoteOptions()
        if not isinstance(self.options, RemoteOptions):
            raise TypeError(f"remote must be a RemoteOptions, got {type(options).__name__}")
        self._reset()

    def _reset(self) -> None:
        self._pid, self._fs = os.getpid(), None
        self._dead: dict[str, tuple[float, str]] = {}
        self._pipe_cache: OrderedDict[str, bytes] = OrderedDict()

    def __getstate__(self):
        return {"options": self.options}

    def __setstate__(self, state):
        self.options = state["options"]
        self._reset()

    def _http(self):
        if self._pid != os.getpid():  # a forked worker: the parent's event loop is not here
            self._reset()
        if self._fs is None:
            import aiohttp
            from fsspec.implementations.http import HTTPFileSystem

            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.options.connect_timeout_s,
                                            sock_read=self.options.read_timeout_s)
            self._fs = HTTPFileSystem(client_kwargs={"timeout": timeout}, skip_instance_cache=True)
        return self._fs

    def _pipe(self, command: str) -> bytes:
        """The standard output of the user's command; fails when it is silent for read_timeout_s
        or exits non-zero. The command's process group is killed on every way out."""
        timeout = self.options.read_timeout_s
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=err, start_new_session=True)

            def chunk() -> bytes:
                if not select.select([proc.stdout], [], [], timeout)[0]:
                    raise TimeoutError(f"no output for {timeout} s")
                return os.read(proc.stdout.fileno(), 1 << 20)

            try:
                data = self._read_all(chunk)
                code = proc.wait(timeout=timeout)
            except BaseException:
                # The group outlives the shell when the shell forked; its leader is not reaped yet here.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            finally:
                proc.stdout.close()
            if code != 0:
                err.seek(0)
                tail = err.read()[-300:].decode(errors="replace").strip()
                raise OSError(f"command exited with status {code}" + (f": {tail}" if tail else ""))
        return data

    def _read_all(self, chunk) -> bytes:
        """chunk() called until it returns b"", the pieces joined, at most max_shard_bytes."""
        pieces, total = [], 0
        while piece := chunk():
            total += len(piece)
            if total > self.options.max_shard_bytes:
                raise ShardTooLargeError(f"larger than max_shard_bytes={self.options.max_shard_bytes}")
            pieces.append(piece)
        return b"".join(pieces)

    def _get(self, url: str, start: int | None, end: int | None) -> bytes:
        if url.startswith("pipe:"):
            data = self._pipe(url[len("pipe:"):])
            return data if start is None else data[start:end]
        if start is not None:
            return self._http().cat_file(url, start=start, end=end)
        # Streamed, so the size bound holds; built as fsspec's open() builds it, less its HEAD request.
        from fsspec.asyn import sync
        from fsspec.implementations.http import HTTPStreamFile

        fs = self._http()
        with HTTPStreamFile(fs, url, session=sync(fs.loop, fs.set_session), loop=fs.loop) as f:
            return self._read_all(lambda: f.read(1 << 20))

    def _dead_why(self, url: str) -> str:
        """Why `url` failed every attempt within the last DEAD_S seconds ("" if it did not)."""
        until, why = self._dead.get(url, (0.0, ""))
        return why if time.monotonic() < until else ""

    def _give_up(self, url: str, exc: BaseException, attempt: int) -> RemoteReadError:
        """The error for `url` after `attempt` attempts, remembered for DEAD_S seconds."""
        why = (f"{url}: {type(exc).__name__}: {str(exc) or 'timed out'} "
               f"(attempt {attempt} of {self.options.retries + 1})")
        self._dead[url] = (time.monotonic() + DEAD_S, why)
        return RemoteReadError(why)

    def fetch(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes [start, end) of `url` (all of it when start is None), with the retries and
        timeouts of the options; a RemoteReadError naming the URL, the attempts and the last error."""
        dead = self._dead_why(url)
        if dead:
            raise RemoteReadError(dead)
        attempts = self.options.retries + 1
        for attempt in range(attempts):
            try:
                return self._get(url, start, end)
            except Exception as exc:  # aiohttp, asyncio and subprocess raise many types; all are one failure
                if attempt + 1 == attempts or _permanent(exc):
                    raise self._give_up(url, exc, attempt + 1) from exc
                time.sleep(self.options.backoff_s * 2**attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def read(self, url: str, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of the shard at `url`: one Range request, or a slice of the
        pipe command's output (kept for the next reads of that shard)."""
        if not url.startswith("pipe:"):
            data = self.fetch(url, offset, offset + size)
            if len(data) != size:
                raise RemoteReadError(f"{url}: {len(data)} bytes for a range of {size} at {offset}: the "
                                      "server ignores HTTP Range requests; serve the shards from one that "
                                      "honours them (nginx, S3, GCS) or copy them to a local folder")
            return data
        if self._pid != os.getpid():
            self._reset()
        shard = self._pipe_cache.get(url)
        if shard is None:
            shard = self.fetch(url)
            self._pipe_cache[url] = shard
            while len(self._pipe_cache) > PIPE_SHARDS:
                self._pipe_cache.popitem(last=False)
        else:
            self._pipe_cache.move_to_end(url)
        return shard[offset: offset + size]

    def read_many(self, ranges: list[tuple[str, int, int]]) -> list[bytes | RemoteReadError]:
        """read() of each (url, offset, size), in order, a failure in its slot: HTTP ranges are
        requested concurrently (one batch's latency instead of one per sample), then each failed
        one goes through read()'s retries alone."""
        out: list = [None] * len(ranges)
        live = [k for k, (url, _, _) in enumerate(ranges)
                if not url.startswith("pipe:") and not self._dead_why(url)]
        if len(live) > 1:
            got = self._http().cat_ranges([ranges[k][0] for k in live], [ranges[k][1] for k in live],
                                          [ranges[k][1] + ranges[k][2] for k in live], on_error="return")
            for k, data in zip(live, got):
                if isinstance(data, bytes) and len(data) == ranges[k][2]:
                    out[k] = data
                elif isinstance(data, Exception) and _permanent(data):  # the next ones fail at once
                    self._give_up(ranges[k][0], data, 1)
        for k, (url, offset, size) in enumerate(ranges):
            if out[k] is None:
                try:
                    out[k] = self.read(url, offset, size)
                except RemoteReadError as exc:
                    out[k] = exc
        return out

    def manifest(self, base: str) -> dict:
        """The manifest.json under the folder URL `base` (ending in "/"), its shard names checked
        to be plain file names (never a command, a path or another URL)."""
        manifest = json.loads(self.fetch(base + "manifest.json"))
        names = manifest.get("shards") if isinstance(manifest, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) and _SHARD_NAME.fullmatch(n)
                                                  for n in names):
            raise ValueError(f"{base}manifest.json: expected \"shards\": a list of plain .tar file names "
                             f"(letters, digits, '_', '-', '.'), got {str(names)[:200]}")
        counts = manifest.get("samples_per_shard")
        if counts is not None and not (isinstance(counts, list) and len(counts) == len(names)
                                       and all(type(c) is int and c >= 0 for c in counts)):
            raise ValueError(f"{base}manifest.json: expected \"samples_per_shard\": one count >= 0 per shard "
                             f"({len(names)}), got {str(counts)[:200]}")
        return manifest


__all__ = ["DEAD_S", "PIPE_SHARDS", "RemoteOptions", "RemoteReadError", "RemoteReader", "is_url"]
