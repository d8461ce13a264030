"""Whether a checkpoint may be continued by this command: a resumed run must be the same run.

What changes a run's meaning is compared between the checkpoint's config and the new one:
the method's keys, the model, the optimizer and its schedule keys (base_lr, epochs, warm-up,
...), the seed, the image size and views, and the data (its fingerprint: the sample count and
a hash of the files' names and sizes, so a moved folder is the same data and a replaced one is
not). Where and how fast the run executes (FREE_KEYS) may change freely. A changed key is
refused unless the command allows it: `--extend` (more epochs), `--allow-change KEY`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from typing import Any

from fastssl.config import TrainConfig

# Keys that steer where and how fast a run executes, not what it learns. The global batch is
# checked on its own (with the steps per epoch); the data source by its fingerprint ("data").
FREE_KEYS = frozenset({
    "out", "max_steps", "log_every", "checkpoint_every", "deterministic", "source", "batch_size",
    "rank_batch_size", "loader", "data_device", "num_threads", "max_skipped_fraction", "fused", "compile",
    "channels_last", "parallel", "accum_steps", "activation_checkpointing", "dist_timeout_s", "eval_knn",
    "eval_every", "eval_size", "async_checkpoint", "replicate_size",
})
DATA = "data"  # the data fingerprint's name in messages and in --allow-change


def data_fingerprint(source: Any) -> str | None:
    """"<count> samples, <hash>" of a data source: the hash of its shard files' names and sizes
    (shards; remote shards by name), of its image files' names (class folder and file) and sizes
    (image folders, file lists), or of its pixels and labels (arrays); None for another kind."""
    if source is None:
        return None
    digest = hashlib.sha1()
    files = getattr(source, "shards", None) or getattr(source, "paths", None)
    if files is not None:
        for path in files:
            # a remote shard (URL, pipe:) is named only: its size would cost a request per shard
            size = os.path.getsize(path) if os.path.isfile(path) else ""
            digest.update(f"{os.path.join(*path.split(os.sep)[-2:])}\0{size}\n".encode())
    elif hasattr(source, "images") and hasattr(source, "labels"):
        digest.update(source.images.tobytes())
        digest.update(source.labels.tobytes())
    else:
        return None
    return f"{len(source)} samples, {digest.hexdigest()[:16]}"


def check_allowed(keys: Iterable[str], cfg: TrainConfig) -> set[str]:
    """The flat names of `--allow-change` keys (component.key or key, or "data"); ValueError for
    a name that is no config key."""
    from fastssl.engine.config import config_to_dict, flat_config

    known = set(flat_config(config_to_dict(cfg))) | {DATA}
    allowed = set()
    for key in keys:
        name = key.split(".", 1)[1] if "." in key else key
        if name not in known:
            raise ValueError(f"--allow-change: expected a config key (see fastssl train --help) or {DATA!r}, "
                             f"got {key!r}")
        allowed.add(name)
    return allowed


def check_resume(path: str, state: dict[str, Any], cfg: TrainConfig, *, data: str | None, extend: bool,
                 allowed: set[str], log: Callable[[str], None]) -> bool:
    """check_same_run between a checkpoint's `state` and the run's `cfg` (its data fingerprint
    `data`); returns whether the checkpoint's optimizer state fits (the same optimizer), and
    logs that it starts afresh otherwise."""
    from fastssl.engine.config import config_to_dict, flat_config

    saved = flat_config(state["config"])
    check_same_run(path, saved, flat_config(config_to_dict(cfg)), saved_data=state.get("data_fingerprint"),
                   new_data=data, extend=extend, allowed=allowed)
    before = saved.get("optimizer", cfg.optim.optimizer)
    if before != cfg.optim.optimizer:
        log(f"resume: optimizer {before} -> {cfg.optim.optimizer}: its state starts afresh (the weights "
            f"are the checkpoint's)")
    return before == cfg.optim.optimizer


def check_same_run(path: str, saved: dict[str, Any], new: dict[str, Any], *, saved_data: str | None,
                   new_data: str | None, extend: bool, allowed: set[str]) -> None:
    """ValueError naming the first key whose value changes the run's meaning between the
    checkpoint at `path` (its flat config `saved`, data fingerprint `saved_data`) and this
    command (`new`, `new_data`), unless `allowed` holds it; epochs may grow with `extend`."""
    for key, before in saved.items():
        after = new.get(key, before)
        if key in FREE_KEYS or key in allowed or after == before:
            continue
        if key == "epochs":
            if extend and after > before:
                continue
            if extend:
                raise ValueError(f"--extend: lengthens a run; checkpoint {path!r} belongs to a run of "
                                 f"epochs={before}, this command asks for epochs={after}")
            raise ValueError(
                f"resume: checkpoint {path!r} belongs to a run of epochs={before}, this command asks for "
                f"epochs={after}; resume with epochs={before}, or add --extend to re-spread the LR and other "
                f"schedules over {after} epochs (the LR jumps to where the longer cosine is at that step)")
        raise ValueError(f"resume: checkpoint {path!r} was trained with {key}={before}, this command has "
                         f"{key}={after}; resume with {key}={before}, or add --allow-change {key} to "
                         f"continue with the new value")
    if saved_data and new_data and saved_data != new_data and DATA not in allowed:
        raise ValueError(f"resume: checkpoint {path!r} was trained on other data ({saved_data}); this "
                         f"command's --data is {new_data}; resume on the same data, or add --allow-change "
                         f"{DATA} to continue on the new data")
