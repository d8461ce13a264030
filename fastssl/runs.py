"""Finished runs read back: the method rebuilt from a run's checkpoint, and its backbone exported.

This module sits above the engine and the methods (it needs both: the checkpoint readers and the
method registry), beside the CLI that calls it; the engine itself never imports a method.
Both checkpoint formats are read: OUT/last.pt and the sharded OUT/last.dcp (any world size).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastssl.engine.checkpoint import load_checkpoint
from fastssl.engine.config import load_config
from fastssl.engine.export import backbone_state_dict, loader_code
from fastssl.engine.sharded_checkpoint import LATEST, is_sharded_checkpoint, load_sharded, read_meta
from fastssl.methods import METHODS


def _checkpoint_of(run: Path) -> Path:
    if not run.exists():
        raise ValueError(f"checkpoint: expected an existing file or run directory, got {str(run)!r}")
    if is_sharded_checkpoint(run) or run.is_file():
        return run
    for name in (LATEST, "last.pt"):
        if (run / name).exists():
            return run / name
    raise ValueError(f"checkpoint: expected a run directory holding {LATEST} or last.pt, a last.pt file or "
                     f"a sharded checkpoint directory, got {str(run)!r}")


def load_trained_method(run: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(the method rebuilt from the checkpoint's config with its trained state, on the CPU;
    the checkpoint's metadata: step, config, method name...)."""
    path = _checkpoint_of(Path(run))
    sharded = is_sharded_checkpoint(path)
    meta = read_meta(path) if sharded else load_checkpoint(path)
    name = meta["method"]
    if name not in METHODS:
        raise ValueError(f"checkpoint: written by method {name!r}, which is not one of {sorted(METHODS)}")
    cls = METHODS[name]
    method = cls(load_config(cls.config_class, meta["config"], f"checkpoint {str(path)!r}"))
    try:
        if sharded:
            load_sharded(path, method)
        else:
            method.load_state_dict(meta["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"checkpoint {str(path)!r}: its weights do not fit the {name} "
                         f"{method.cfg.model.backbone} model its config describes ({first})") from e
    return method.eval(), meta


def export_backbone(run: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the backbone of RUN (a run directory or checkpoint) to `out` (torch.save of a plain
    {name: tensor} dict, written to a temp file and renamed). Returns a summary: method,
    backbone, step, tensors, parameters and `load` (the code that builds the module to load into).
    An image-text method's text tower, image projection and logit scale go to OUT's stem + ".text"
    (`text_tower`, with `text_load` for the "text." entries)."""
    method, meta = load_trained_method(run)
    state = backbone_state_dict(method)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic(state, out)
    reg_tokens = state["reg_token"].shape[1] if "reg_token" in state else 0
    info = {"method": meta["method"], "backbone": method.cfg.model.backbone, "step": meta["step"],
            "tensors": len(state), "parameters": sum(v.numel() for v in state.values()),
            "load": loader_code(method.cfg, reg_tokens=reg_tokens)}
    if hasattr(method, "text_tower_state"):  # image-text methods: the other tower beside the backbone
        text_out = out.with_name(f"{out.stem}.text{out.suffix}")
        _save_atomic(method.text_tower_state(), text_out)
        info |= {"text_tower": str(text_out), "text_load": method.text_tower_code()}
    return info


def _save_atomic(state: dict[str, torch.Tensor], out: Path) -> None:
    """torch.save to a temporary name, flushed to disk, then renamed to `out`."""
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
