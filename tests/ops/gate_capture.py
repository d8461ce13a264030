"""The compile gate's capture: the public ops run on shape-only CUDA tensors (FakeTensorMode) with
torch.cuda answering for a target card and each custom op's fake implementation swapped for its real
one followed by its registered backward, so the real launchers pick their configurations; kernel
launches (JITFunction.run, Autotuner.run) are recorded instead of run, and an autotuned launch
expands to each configuration its pruning keeps on the card."""

from __future__ import annotations

import contextlib
import importlib.util
import pkgutil
import types
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Card:
    name: str
    sms: int  # the launchers size their grids by it
    smem_optin: int  # cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes


# Public figures of the card each target stands for.
CARDS = {
    80: Card("A100", 108, 166_912),
    89: Card("L40S", 142, 101_376),
    90: Card("H100 SXM", 132, 232_448),
    100: Card("B200", 148, 232_448),
}


class Ptr:
    """A tensor argument as the compiler sees it: dtype and a 16-byte aligned address."""

    def __init__(self, dtype):
        self.dtype = dtype

    def data_ptr(self):
        return 1 << 20


@dataclass
class Launch:
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    how: str  # "fixed" or "autotune i/n"
    scenarios: list = field(default_factory=list)


def _compile_arg(x):
    import torch

    return Ptr(x.dtype) if isinstance(x, torch.Tensor) else x


@contextlib.contextmanager
def fake_cuda(card: Card):
    """FakeTensorMode with torch.cuda answering for `card`, custom ops running their real
    launchers and kernel launches recorded (not run)."""
    import torch
    from torch._library.custom_ops import CustomOpDef
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime import autotuner, jit


    props = types.SimpleNamespace(
        multi_processor_count=card.sms, shared_memory_per_block_optin=card.smem_optin, name=card.name
    )
    recorded = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        recorded.append(
            (self, tuple(map(_compile_arg, args)), {k: _compile_arg(v) for k, v in kwargs.items()})
        )

    def tuner_run(self, *args, **kwargs):
        kwargs = {k: _compile_arg(v) for k, v in kwargs.items() if k not in ("grid", "warmup")}
        recorded.append((self, tuple(map(_compile_arg, args)), kwargs))

    ops = {
        op
        for info in pkgutil.iter_modules(importlib.util.find_spec("fastssl.ops").submodule_search_locations)
        for op in vars(importlib.import_module(f"fastssl.ops.{info.name}")).values()
        if isinstance(op, CustomOpDef)
    }
    saved_fakes = {op: op._abstract_fn for op in ops}
    saved = (
        torch.cuda.get_device_properties,
        torch.cuda.current_device,
        jit.JITFunction.run,
        autotuner.Autotuner.run,
    )
    torch.cuda.get_device_properties = lambda device=None: props
    torch.cuda.current_device = lambda: 0
    jit.JITFunction.run, autotuner.Autotuner.run = jit_run, tuner_run
    for op in ops:
        op._abstract_fn = _real_with_backward(op)
    try:
        # non-fake inputs: the call-site scenarios move modules built on the meta device
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield recorded
    finally:
        (
            torch.cuda.get_device_properties,
            torch.cuda.current_device,
            jit.JITFunction.run,
            autotuner.Autotuner.run,
        ) = saved
        for op, fake in saved_fakes.items():
            op._abstract_fn = fake


class _Ctx:
    """What a custom op's setup_context and backward see of autograd's ctx."""

    def __init__(self, inputs):
        import torch

        self.needs_input_grad = tuple(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


def _real_with_backward(op):
    """The op's real implementation (the launchers), followed by its registered backward with
    gradients of the outputs' shapes: the autograd engine cannot run on fake CUDA tensors
    without a device, so the gate runs each op's backward itself."""
    import inspect

    import torch

    signature = inspect.signature(op._init_fn)

    def run(*args, **kwargs):
        out = op._init_fn(*args, **kwargs)
        inputs = tuple(signature.bind(*args, **kwargs).arguments.values())
        if op._backward_fn is not None and any(_Ctx(inputs).needs_input_grad):
            ctx = _Ctx(inputs)
            op._setup_context_fn(ctx, inputs, out)
            outs = out if isinstance(out, tuple) else (out,)
            op._backward_fn(ctx, *(torch.empty_like(o) for o in outs))
        return out

    return run


def expand(recorded, card: Card) -> list[Launch]:
    """Recorded launches -> one Launch per configuration the launcher may run on `card`
    (an autotuned launch: each config its early_config_prune keeps)."""
    import torch
    from triton.runtime.jit import JITFunction

    launches = []
    for obj, args, kwargs in recorded:
        if isinstance(obj, JITFunction):
            launches.append(Launch(obj, args, kwargs, "fixed"))
            continue
        fn = obj.fn
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        kept = obj.configs
        if obj.early_config_prune:
            props = types.SimpleNamespace(
                multi_processor_count=card.sms, shared_memory_per_block_optin=card.smem_optin
            )
            saved = torch.cuda.get_device_properties, torch.cuda.current_device
            torch.cuda.get_device_properties = lambda device=None, props=props: props
            torch.cuda.current_device = lambda: 0
            try:
                kept = obj.early_config_prune(obj.configs, dict(zip(obj.arg_names, args)), **kwargs)
            finally:
                torch.cuda.get_device_properties, torch.cuda.current_device = saved
        for i, cfg in enumerate(kept):
            launches.append(Launch(fn, args, {**kwargs, **cfg.all_kwargs()}, f"autotune {i + 1}/{len(kept)}"))
    return launches
