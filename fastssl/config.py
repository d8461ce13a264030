"""The training configuration: one dataclass per component, composed by `TrainConfig`.

    cfg.run     RunConfig       run folder, seed, length caps, logging and checkpoint cadence
    cfg.data    DataConfig      data source, crop sizes, views, batch, loader and its threads
    cfg.model   ModelConfig     backbone and how it runs (fused ops, compile, channels-last)
    cfg.optim   OptimConfig     optimizer, LR / weight-decay schedules, epochs, clipping
    cfg.dist    DistConfig      DDP, FSDP or HSDP, gradient accumulation, activation checkpointing
    cfg.eval    EvalConfig      kNN evaluation while and after training
    cfg.method  a MethodConfig  the method's own fields (temperature, queue_size, ...)

Every field is declared once, with its meaning and its allowed range (`setting`); each
component checks its fields in `__post_init__` and `TrainConfig.__post_init__` checks what
spans components. Field names are unique across components, so `base_lr=0.1` and
`optim.base_lr=0.1` name the same field. Merging layers (defaults < the method's defaults <
preset < YAML < command line) is `fastssl.engine.config.resolve_config`.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fastssl.validation import check_bool, check_choice, check_int, check_number, parse_bool

# Bounds that keep a value from exhausting memory or overflowing a timer: far above any real run.
MAX_EPOCHS = 1_000_000
MAX_STEPS = 10**12
MAX_SIDE = 4096          # pixels of a crop or evaluation image
MAX_BATCH = 1 << 24
MAX_THREADS = 256
MAX_SECONDS = 30 * 86_400.0


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None,
            low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False, choices: tuple | None = None) -> Any:
    """A config field with its meaning (`help`) and allowed values: numbers in [low, high]
    (`*_open` excludes the bound) or one of `choices`. The same record feeds the check in
    `__post_init__`, `fastssl train --help` and `--print-config`."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def redefault(cls: type, name: str, default: Any) -> Any:
    """Field `name` of config class `cls` with another default, for a subclass (a method built on
    another's fields with its own paper's values): same meaning and allowed values."""
    return field(default=default, metadata=cls.__dataclass_fields__[name].metadata)


def range_text(f: dataclasses.Field) -> str:
    """The allowed values of a field as `--help` shows them ("" when any value of its type fits)."""
    m = f.metadata
    if m.get("choices"):
        return "one of " + "|".join(map(str, m["choices"]))
    def num(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    parts = []
    if m.get("low") is not None:
        parts.append(f"{'>' if m['low_open'] else '>='} {num(m['low'])}")
    if m.get("high") is not None:
        parts.append(f"{'<' if m['high_open'] else '<='} {num(m['high'])}")
    return " and ".join(parts)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_field(f: dataclasses.Field, annotation: Any, value: Any) -> Any:
    m = f.metadata
    args = typing.get_args(annotation)
    if type(None) in args:
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
    if m.get("choices"):
        return check_choice(f.name, value, m["choices"])
    bounds = {"low": m.get("low"), "high": m.get("high")}
    if annotation is bool:
        return check_bool(f.name, value)
    if annotation is int:
        return check_int(f.name, value, **bounds)
    if annotation is float:
        return check_number(f.name, value, low_open=m.get("low_open", False),
                            high_open=m.get("high_open", False), **bounds)
    if typing.get_origin(annotation) is tuple:
        if not isinstance(value, (tuple, list)) or len(value) != len(args):
            raise ValueError(f"{f.name} must be {len(args)} numbers, got {value!r}")
        return tuple(check_number(f.name, v, low_open=m["low_open"], high_open=m["high_open"], **bounds)
                     for v in value)
    if annotation is str and not isinstance(value, str):
        raise TypeError(f"{f.name} must be a string, got {type(value).__name__} {value!r}")
    if typing.get_origin(annotation) is dict and not isinstance(value, dict):
        raise TypeError(f"{f.name} must be a mapping, got {type(value).__name__} {value!r}")
    return value


@dataclass
class Component:
    """Base of every config component: `__post_init__` checks each field against its
    `setting` (type, range, choices) and raises a one-line error naming it."""

    def __post_init__(self) -> None:
        types = field_types(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_field(f, types[f.name], getattr(self, f.name)))


@dataclass
class RunConfig(Component):
    out: str = setting("", "run folder; empty: a new runs/<method>-<UTC time>")
    seed: int = setting(0, "seeds the model init, the data order and augmentations", low=0, high=2**63 - 1)
    deterministic: bool = setting(False, "deterministic kernels: same seed and machine give the same losses")
    max_steps: int | None = setting(None, "stop after this many steps (none: the whole run)", low=0,
                                    high=MAX_STEPS)
    log_every: int = setting(10, "steps between metrics.jsonl rows flushed (and NaN checks)", low=1,
                             high=MAX_STEPS)
    checkpoint_every: int = setting(0, "steps between checkpoints; 0: at epoch ends only", low=0,
                                    high=MAX_STEPS)
    async_checkpoint: bool = setting(False, "fsdp / hsdp: write sharded checkpoints in the background "
                                            "(a staged CPU copy) while training goes on")


LOADERS = ("auto", "dali", "torchvision")
DATA_DEVICES = ("auto", "gpu", "cpu")


@dataclass
class DataConfig(Component):
    source: str = setting("fashion-mnist", "fashion-mnist, an image folder or shards (set by --data)")
    image_size: int = setting(224, "training crop size in pixels", low=1, high=MAX_SIDE)
    views: dict[str, Any] = setting(
        help="ViewSpec fields replaced in every view of the method's recipe, e.g. "
             "views={scale: [0.25, 1], blur_p: 0}", factory=dict)
    batch_size: int | None = setting(256, "global batch over all processes (none: rank_batch_size x "
                                          "world size)", low=1, high=MAX_BATCH)
    rank_batch_size: int | None = setting(None, "batch of each process (none: batch_size / world size)",
                                          low=1, high=MAX_BATCH)
    loader: str = setting("auto", "image loader (auto: dali when installed)", choices=LOADERS)
    data_device: str = setting("auto", "where the loader decodes and augments (auto: gpu on CUDA)",
                               choices=DATA_DEVICES)
    num_threads: int = setting(2, "data loading threads / worker processes", low=1, high=MAX_THREADS)
    max_skipped_fraction: float = setting(0.001, "bad samples are skipped and counted; beyond this "
                                                 "fraction of an epoch: an error", low=0, high=1)
    samples_per_epoch: int | None = setting(None, "shards only: the resampled mode, shards drawn with "
                                                  "replacement per process and an epoch this many samples "
                                                  "over all processes (none: each sample once)",
                                            low=1, high=1 << 32)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.views:
            from fastssl.data.recipes import check_view_overrides

            check_view_overrides(self.views)
        if self.batch_size is None and self.rank_batch_size is None:
            raise ValueError("batch_size: expected a global batch (or rank_batch_size), got none for both")


COMPILE_MODES = ("auto", "true", "false")


def _bool_alias(name: str, value: Any, true: str, false: str) -> Any:
    """A mode field's value with a boolean (or true/false text) mapped to its `true` / `false` mode."""
    try:
        return true if parse_bool(name, value) else false
    except ValueError:  # a mode's own name (or a wrong value, which the choices check reports)
        return value


@dataclass
class ModelConfig(Component):
    backbone: str = setting("resnet18", "resnet8/18/20/50, resnet8_pool3, vit_tiny/small/base_patchN "
                                        "(timm names)")
    vit_depth: int | None = setting(None, "ViT blocks (none: the model's own)", low=1, high=256)
    vit_reg_tokens: int = setting(0, "ViT register tokens (Darcet et al. 2024; 0: none; not MAE's ViT)",
                                  low=0, high=64)
    drop_path_rate: float = setting(0.0, "ViT stochastic depth of the trained network", low=0, high=1,
                                    high_open=True)
    fused: bool = setting(True, "false: every fused op runs its *_ref (the kernel path, for speed-ups)")
    compile: str = setting("auto", "torch.compile each transformer block (other backbones: the networks); "
                                   "auto: on CUDA, off on the CPU", choices=COMPILE_MODES)
    channels_last: bool = setting(False, "NHWC memory format (faster convolutions)")
    sync_bn: bool = setting(False, "SyncBatchNorm across processes")

    def __post_init__(self) -> None:
        self.compile = _bool_alias("compile", self.compile, "true", "false")
        super().__post_init__()


OPTIMIZERS = ("sgd", "adamw", "lars")


@dataclass
class OptimConfig(Component):
    optimizer: str = setting("sgd", "optimizer", choices=OPTIMIZERS)
    epochs: int = setting(100, "length of the run; the LR and other schedules span it", low=1,
                          high=MAX_EPOCHS)
    base_lr: float = setting(0.03, "LR = base_lr x batch_size / lr_batch_divisor", low=0, low_open=True,
                             high=1e9)
    lr_batch_divisor: int = setting(256, "batch size at which the LR is base_lr", low=1, high=MAX_BATCH)
    min_lr: float = setting(0.0, "end of the cosine LR decay (<= the LR)", low=0, high=1e9)
    warmup_epochs: float = setting(0.0, "linear LR warm-up from 0 (<= epochs)", low=0, high=MAX_EPOCHS)
    weight_decay: float = setting(1e-4, "weight decay (start of its schedule when weight_decay_end is "
                                        "set)", low=0, high=1e3)
    weight_decay_end: float | None = setting(None, "cosine weight-decay schedule to this value (none: "
                                                   "constant)", low=0, high=1e3)
    momentum: float = setting(0.9, "SGD / LARS momentum", low=0, high=1, high_open=True)
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas", low=0, high=1, high_open=True)
    clip_grad: float | None = setting(None, "global gradient-norm clipping (none: off)", low=0,
                                      low_open=True, high=1e9)


PARALLEL_MODES = ("ddp", "fsdp", "hsdp")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


@dataclass
class DistConfig(Component):
    parallel: str = setting("ddp", "ddp, fsdp (FSDP2 sharding of ViT methods) or hsdp (FSDP2 "
                                   "sharding within groups, replicated across them)", choices=PARALLEL_MODES)
    replicate_size: int | None = setting(None, "hsdp: replicas of the model (the mesh is replicate_size x "
                                               "world/replicate_size); none: the number of nodes, "
                                               "WORLD_SIZE / LOCAL_WORLD_SIZE", low=1, high=MAX_BATCH)
    accum_steps: int = setting(1, "micro-batches per optimizer step (divides the per-rank batch); clip, "
                                  "siglip, simclr and mocov3: GradCache, the loss over the whole batch",
                               low=1, high=4096)
    activation_checkpointing: str = setting("none", "none; full: recompute each transformer block in the "
                                                    "backward; selective: keep its matmul, attention and "
                                                    "collective outputs, recompute the rest (true: full)",
                                            choices=ACTIVATION_CHECKPOINTING)
    dist_timeout_s: float = setting(1800.0, "seconds a collective waits for the slowest rank", low=0,
                                    low_open=True, high=MAX_SECONDS)

    def __post_init__(self) -> None:
        self.activation_checkpointing = _bool_alias("activation_checkpointing", self.activation_checkpointing,
                                                    "full", "none")
        super().__post_init__()


@dataclass
class EvalConfig(Component):
    eval_knn: bool = setting(True, "kNN top-1 of the random init and the trained backbone")
    eval_every: float = setting(1.0, "epochs between kNN checks on a fixed subsample; 0: none", low=0,
                                high=MAX_EPOCHS)
    eval_size: int | None = setting(None, "side of the kNN / linear-probe inputs (none: image_size; "
                                          "CNNs only)", low=1, high=MAX_SIDE)


@dataclass
class MethodConfig(Component):
    """Base of each method's own fields. `name` is the method's registry name; `defaults`
    holds the method's values for other components' fields (its paper's recipe), a layer
    between the components' defaults and a preset."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}


COMPONENTS: dict[str, type[Component]] = {
    "run": RunConfig, "data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
    "dist": DistConfig, "eval": EvalConfig,
}


@dataclass
class TrainConfig:
    """The whole configuration of a run: the components above and the method's own."""

    method: MethodConfig = field(default_factory=MethodConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        for name, cls in {**COMPONENTS, "method": MethodConfig}.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"TrainConfig.{name} must be a {cls.__name__}, "
                                f"got {type(getattr(self, name)).__name__}")
        o, d = self.optim, self.data
        for name in ("warmup_epochs", *(f.name for f in dataclasses.fields(self.method)
                                        if f.name.endswith("_epochs"))):
            value = getattr(self.optim if name == "warmup_epochs" else self.method, name)
            if value is not None and value > o.epochs:
                raise ValueError(f"{name} must be <= epochs ({o.epochs}), got {value!r}")
        if d.batch_size is not None and o.min_lr > self.lr:
            raise ValueError(f"min_lr must be <= the LR ({self.lr:g} = base_lr x batch_size / "
                             f"lr_batch_divisor), got {o.min_lr:g}")
        if self.eval.eval_size not in (None, d.image_size):
            from fastssl.models.backbones import is_vit_name

            if is_vit_name(self.model.backbone):
                raise ValueError(f"eval_size: a ViT's position embedding is built for image_size "
                                 f"({d.image_size}); expected none or {d.image_size}, "
                                 f"got {self.eval.eval_size}")

    @property
    def lr(self) -> float:
        """The peak learning rate: base_lr scaled by the global batch."""
        return self.optim.base_lr * self.data.batch_size / self.optim.lr_batch_divisor

    @property
    def eval_side(self) -> int:
        """Side of the evaluation inputs: eval_size, else image_size."""
        return self.eval.eval_size or self.data.image_size

    def for_world(self, world_size: int) -> TrainConfig:
        """This config with both batch fields set for `world_size` processes (the one not
        given derived from the other), or a ValueError when they do not fit together."""
        d, accum = self.data, self.dist.accum_steps
        world_size = check_int("world_size", world_size, low=1)
        if d.batch_size is None:
            batch, per_rank = d.rank_batch_size * world_size, d.rank_batch_size
        else:
            batch, per_rank = d.batch_size, d.batch_size // world_size
            if d.batch_size % world_size:
                raise ValueError(f"batch_size: expected a multiple of the world size {world_size}, "
                                 f"got {d.batch_size}")
            if d.rank_batch_size not in (None, per_rank):
                raise ValueError(f"rank_batch_size: batch_size {d.batch_size} over {world_size} "
                                 f"process(es) is {per_rank} per process, got {d.rank_batch_size}")
        if per_rank % accum:
            raise ValueError(f"batch_size: expected a multiple of world size x accum_steps = "
                             f"{world_size} x {accum}, got {batch}")
        data = dataclasses.replace(d, batch_size=batch, rank_batch_size=per_rank)
        return dataclasses.replace(self, data=data)


def components(method_class: type[MethodConfig]) -> dict[str, type]:
    """{component attribute: its class} of a TrainConfig whose method is `method_class`."""
    return {**COMPONENTS, "method": method_class}


def key_index(method_class: type[MethodConfig]) -> dict[str, tuple[str, dataclasses.Field]]:
    """{field name: (component attribute, field)} of every settable key; a ValueError when
    two components declare one name (flat keys would be ambiguous)."""
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for comp, cls in components(method_class).items():
        for f in dataclasses.fields(cls):
            if f.name in index:
                raise ValueError(f"config key {f.name!r} is declared by both {index[f.name][0]} and {comp}")
            index[f.name] = (comp, f)
    return index
