"""`fastssl export RUN --out backbone.pt`: a trained run's backbone alone, as one plain state
dict that the backbone's own library loads with strict=True.

The backbone is the network the method evaluates (`Method.encoder()`: DINO's teacher backbone,
MoCo's query encoder without projector, MAE's encoder without decoder, the weak method's trunk
without classifier). ViTs load into `timm.create_model(...)` (the printed call; MAE's encoder
included), torchvision ResNets into
`torchvision.models.resnetXX()` with `fc = Identity` (and the small stem when the run used one).
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
from fastssl.engine.sharded_checkpoint import LATEST, is_sharded_checkpoint, load_sharded, read_meta
from fastssl.models import MAEEncoder
from fastssl.models.backbones import RESNETS, SMALL_IMAGE_MAX, VIT_SIZES, is_vit_name, parse_vit_name

# the ViT encoder inside an MAE model: everything but the decoder and the mask token
MAE_ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
# timm architectures of each ViT size (patch size, depth and image size are passed explicitly)
TIMM_NAMES = {size: f"vit_{size}_patch16_224" for size in ("tiny", "small", "base", "large")} | {
    "huge": "vit_huge_patch14_224"}


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
    from fastssl.methods import METHODS

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


def backbone_state_dict(method: nn.Module) -> dict[str, torch.Tensor]:
    """The evaluated backbone's parameters and buffers under the backbone library's own names."""
    encoder = method.encoder()
    if isinstance(encoder, MAEEncoder):
        state = {k: v for k, v in encoder.mae.state_dict().items() if k.startswith(MAE_ENCODER_KEYS)}
    else:
        state = encoder.state_dict()
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def loader_code(cfg, reg_tokens: int = 0) -> str:
    """Python that builds the module the exported state dict loads into (strict=True); a ViT with
    `reg_tokens` registers has no position embedding for its class and register tokens."""
    if is_vit_name(cfg.model.backbone):
        size, patch = parse_vit_name(cfg.model.backbone)
        patch = patch or 16
        depth = cfg.model.vit_depth or VIT_SIZES[size][1]
        registers = f", reg_tokens={reg_tokens}, no_embed_class=True" if reg_tokens else ""
        return (f"timm.create_model('{TIMM_NAMES[size]}', pretrained=False, num_classes=0, "
                f"img_size={cfg.data.image_size}, patch_size={patch}, depth={depth}{registers})")
    if cfg.model.backbone in RESNETS:
        code = f"m = torchvision.models.{cfg.model.backbone}(); m.fc = torch.nn.Identity()"
        if cfg.data.image_size <= SMALL_IMAGE_MAX:
            code += ("; m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); "
                     "m.maxpool = torch.nn.Identity()")
        return code
    return f"fastssl.models.build_backbone({cfg.model.backbone!r}, {cfg.data.image_size})[0]"


def export_backbone(run: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the backbone of RUN (a run directory or checkpoint) to `out` (torch.save of a plain
    {name: tensor} dict, written to a temp file and renamed). Returns a summary: method,
    backbone, step, tensors, parameters and `load` (the code that builds the module to load into)."""
    method, meta = load_trained_method(run)
    state = backbone_state_dict(method)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    reg_tokens = state["reg_token"].shape[1] if "reg_token" in state else 0
    return {"method": meta["method"], "backbone": method.cfg.model.backbone, "step": meta["step"],
            "tensors": len(state), "parameters": sum(v.numel() for v in state.values()),
            "load": loader_code(method.cfg, reg_tokens=reg_tokens)}
