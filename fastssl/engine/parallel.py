"""Data parallelism for the Trainer: DDP replicas or FSDP2 sharding, activation checkpointing,
and the gradient synchronisation switch that gradient accumulation needs.

`parallel="ddp"` (default) replicates the method on every rank (torch DDP). `parallel="fsdp"`
shards it with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block
is its own unit, then the method's `shard_units()` (DINO: the student's and the teacher's heads
and networks), then the root (the method). Every parameter is split on its first dimension over
the ranks, so an EMA teacher built like its student holds the same slice of each tensor as the
student does and is updated shard by shard, without communication (fastssl.models.ema_update_).
On GPUs the units all-gather bf16 parameters and reduce-scatter fp32 gradients
(`MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`); on the CPU (gloo tests)
everything stays float32. FSDP needs transformer blocks: ResNets train with DDP.

`parallel="hsdp"` is FSDP2 over a 2-D mesh (replicate x shard): parameters are sharded within
each group of `world / replicate_size` ranks (by default a node's LOCAL_WORLD_SIZE ranks) and
replicated across the groups; gradients are reduce-scattered within a group, then all-reduced
across groups. The shard-by-shard EMA update holds as under fsdp.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
from timm.models.vision_transformer import Block
from torch import nn

SHARDED_MODES = ("fsdp", "hsdp")


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """Every transformer block (timm's `Block`: ViT backbones, the MAE encoder and decoder) in `module`."""
    return [m for m in module.modules() if isinstance(m, Block)]


def check_parallel_config(cfg, method: nn.Module) -> None:
    """ValueError unless parallel and activation_checkpointing suit the method (their values
    are checked by the config)."""
    d = cfg.dist
    needs_blocks = [k for k, on in ((f"parallel={d.parallel}", d.parallel in SHARDED_MODES),
                                    (f"activation_checkpointing={d.activation_checkpointing}",
                                     d.activation_checkpointing != "none")) if on]
    if needs_blocks and not transformer_blocks(method):
        raise ValueError(f"{' and '.join(needs_blocks)}: backbone {cfg.model.backbone!r} has no transformer "
                         "blocks to shard or recompute; they are for the ViT methods (dino, mae, mocov3, "
                         "weak with a vit_* backbone). ResNets train with parallel=ddp and "
                         "activation_checkpointing=none.")


def _saved_ops() -> frozenset:
    """The ops whose outputs selective checkpointing keeps: matmuls, attention and collectives
    (the costly ones to recompute); everything else (norms, activations, adds, dropout) is
    recomputed in the backward."""
    aten, c10d = torch.ops.aten, torch.ops._c10d_functional
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    return frozenset([aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                      *(getattr(aten, n).default for n in names),
                      c10d.all_gather_into_tensor.default, c10d.reduce_scatter_tensor.default,
                      c10d.all_reduce.default])


def selective_context():
    """torch.utils.checkpoint's context pair for the selective policy (a `context_fn`)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    forward, recompute = create_selective_checkpoint_contexts(policy)
    return _without_autocast_cache(forward), _without_autocast_cache(recompute)


@contextlib.contextmanager
def _without_autocast_cache(context) -> Iterator[None]:
    """`context` with autocast's weight-cast cache off. The recompute must dispatch the ops the
    forward did, one for one; with the cache on, a block called twice in a step (DINO's global
    then local crops) casts its weights in the first call only, but in each recompute."""
    enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        with context:
            yield
    finally:
        torch.set_autocast_cache_enabled(enabled)


def apply_activation_checkpointing(module: nn.Module, mode: str = "full") -> int:
    """Recompute each transformer block's forward in the backward instead of keeping its
    activations (non-reentrant torch.utils.checkpoint through the composable API, which adds
    no wrapper module: parameter names, and so checkpoints, stay the same). mode "full"
    recomputes the whole block; "selective" keeps the outputs of its matmuls, attention and
    collectives and recomputes the rest. Returns the count."""
    from torch.distributed._composable import checkpoint

    kwargs = {"context_fn": selective_context} if mode == "selective" else {}
    blocks = transformer_blocks(module)
    for block in blocks:
        checkpoint(block, **kwargs)
    return len(blocks)


def compile_with_fallback(module: nn.Module, log: Callable[[str], None] = print) -> None:
    """torch.compile `module` in place (as nn.Module.compile does); when compiling fails (a
    dynamo or inductor error, raised at the first call of a shape, before anything ran), one
    line says so and the module runs eagerly from then on."""
    from torch._dynamo.exc import TorchDynamoException

    compiled = torch.compile(module._call_impl)

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except TorchDynamoException as e:
            module._compiled_call_impl = None
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            log(f"compile: {type(module).__name__} failed to compile ({type(e).__name__}: {reason}); "
                "running it eagerly")
            return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = call


def compile_method(method: nn.Module, mode: str, device: torch.device,
                   log: Callable[[str], None] = print) -> int:
    """Compile each transformer block of `method` (a ViT's blocks repeat: one graph serves
    them all), or `method.compile_modules()` when it has none, under compile=true, or
    compile=auto on CUDA. Returns the number of modules compiled."""
    if mode == "false" or (mode == "auto" and device.type != "cuda"):
        return 0
    modules = transformer_blocks(method) or method.compile_modules()
    for module in modules:
        compile_with_fallback(module, log)
    return len(modules)


def hsdp_shape(world: int, replicate_size: int | None, env=os.environ) -> tuple[int, int]:
    """(replicas, shard size) of the hsdp mesh: `replicate_size` replicas, or by default one per
    node (torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE; one replica without them). ValueError
    unless the replicas divide the world."""
    if replicate_size is None:
        replicate_size = max(1, world // int(env.get("LOCAL_WORLD_SIZE", world)))
    if world % replicate_size:
        raise ValueError(f"replicate_size must divide the world size {world}, got {replicate_size}; "
                         f"set replicate_size to a divisor of {world}")
    return replicate_size, world // replicate_size


def device_mesh(parallel: str, device: torch.device, world: int, replicate_size: int | None = None):
    """The mesh FSDP2 shards over: 1-D over all ranks (fsdp) or (replicate, shard) (hsdp)."""
    from torch.distributed.device_mesh import init_device_mesh

    if parallel == "hsdp":
        return init_device_mesh(device.type, hsdp_shape(world, replicate_size),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world,))


def shard_method(method: nn.Module, device: torch.device, mesh=None) -> nn.Module:
    """FSDP2 over `mesh` (default: 1-D over all ranks of the default process group; a 2-D
    mesh shards over its last dimension and replicates over its first): blocks, then
    `method.shard_units()` (children before parents), then the method itself as the root.
    Shards in place and returns `method` (now also an FSDPModule); parameters are made
    contiguous first."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from fastssl.distributed import get_world_size

    if mesh is None:
        mesh = device_mesh("fsdp", device, get_world_size())
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    # FSDP2 refuses non-contiguous parameters: a channels-last model's conv weights (the patch
    # embedding) go back to the default layout; the inputs keep theirs.
    with torch.no_grad():
        for p in method.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    units = transformer_blocks(method) + method.shard_units()
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(method, mesh=mesh, mp_policy=policy)
    return method


def wrap_for_training(method: nn.Module, cfg, device: torch.device, world: int,
                      log: Callable[[str], None] = print) -> nn.Module:
    """The module the training step calls: `method` with activation checkpointing when asked,
    then DDP (world > 1, parallel=ddp), FSDP2 in place (world > 1, parallel=fsdp / hsdp) or as is."""
    check_parallel_config(cfg, method)
    ac = cfg.dist.activation_checkpointing
    if ac != "none":
        count = apply_activation_checkpointing(method, ac)
        log(f"activation checkpointing ({ac}): {count} transformer blocks")
    if world == 1:
        return method
    if cfg.dist.parallel in SHARDED_MODES:
        mesh = device_mesh(cfg.dist.parallel, device, world, cfg.dist.replicate_size)
        shard_method(method, device, mesh)
        layout = (f"{world} ranks" if mesh.ndim == 1
                  else "a {} x {} (replicate x shard) mesh".format(*mesh.shape))
        log(f"{cfg.dist.parallel}: {len(transformer_blocks(method))} blocks + {len(method.shard_units())} "
            f"units + root sharded over {layout}"
            f"{', bf16 parameters / fp32 reduction' if device.type == 'cuda' else ''}")
        return method
    # Buffers (queue, BN statistics of the teacher) are per-rank state, not broadcast from rank 0.
    # Gradients as views of the all-reduce buckets: no second copy of every gradient.
    return nn.parallel.DistributedDataParallel(
        method, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
        gradient_as_bucket_view=True)


def unsharded_copy(method: nn.Module, device: torch.device) -> nn.Module:
    """`method` itself, or when it is FSDP-sharded a full copy on `device` holding the gathered
    state (a collective: every rank calls it and gets the copy). Evaluation runs on the copy:
    a sharded module's forward all-gathers, which one rank cannot do on its own."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(method, FSDPModule):
        return method
    state = get_model_state_dict(method, options=StateDictOptions(full_state_dict=True))
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
        copy = type(method)(method.cfg)
    copy.load_state_dict(state)
    return copy.to(device)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, the backward all-reduces (DDP) / reduce-scatters (FSDP) gradients only
    when `enabled`; otherwise they accumulate locally (every micro-batch but the last)."""
    from torch.distributed.fsdp import FSDPModule

    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def batch_to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    """A loader batch's views (in channels-last or contiguous layout), labels and indices on `device`."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = dict(batch)
    out["views"] = [v.to(device, non_blocking=True).contiguous(memory_format=fmt) for v in batch["views"]]
    for key in ("label", "index"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    return out


def split_micro_batches(batch: dict, n: int) -> list[dict]:
    """A loader batch (views list, optional label / index) cut into `n` equal micro-batches, in order."""
    rows = batch["views"][0].shape[0]
    if rows % n:
        raise ValueError(f"accum_steps: this rank's batch of {rows} is not a multiple of accum_steps={n}")
    if n == 1:
        return [batch]
    parts = [dict(batch) for _ in range(n)]
    for key, value in batch.items():
        if key == "views":
            chunks = list(zip(*(v.chunk(n) for v in value)))
            for part, views in zip(parts, chunks):
                part["views"] = list(views)
        elif torch.is_tensor(value) and value.ndim and value.shape[0] == rows:
            for part, chunk in zip(parts, value.chunk(n)):
                part[key] = chunk
    return parts
