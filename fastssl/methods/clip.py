"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") and SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"):
an image tower and a text tower trained on image-caption pairs.

Image tower: the run's backbone (ResNet or timm ViT) and a linear projection to embed_dim.
Text tower: fastssl.models.text.TextTransformer (causal, pooled at the end-of-text token) over
open_clip's BPE tokens. Both embeddings are L2-normalised; the logits are t · x_i·y_j (+ b), with a
learned t = exp(logit_scale) — CLIP starts at 1/0.07, SigLIP at 10 with b = −10 — clamped to
t ≤ 100 after every optimizer step as open_clip does. The losses are fastssl.losses' drop-ins:
ClipLoss (local loss, features gathered with gradient: open_clip's recommended setting) and
SigLipLoss (dist_impl: the other ranks' texts by neighbour exchange or all-gather).

Captions: each sample's caption (fastssl.data.captions: shards' .txt / .json, a captions file
beside an image folder or named by `captions`, or synthetic ones from class names) is tokenized
once at bind_data and looked up by batch["index"]; samples without one are never drawn and are
counted as skipped.

Gradient accumulation is GradCache (fastssl.losses.grad_cache): with accum_steps = A the engine
hands the method its whole batch, both towers encode it as A micro-batches that keep no activations,
the loss is taken over the full batch's features (every row keeps the whole batch's negatives) and
the backward replays one micro-batch at a time.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fastssl.config import MethodConfig, setting
from fastssl.data.captions import source_captions, tokenize
from fastssl.distributed import get_rank, get_world_size
from fastssl.losses import ClipLoss, SigLipLoss, grad_cache_encode
from fastssl.losses.siglip import DIST_IMPLS
from fastssl.method import Method, StepContext, TrainConfig
from fastssl.methods import register
from fastssl.methods._common import backbone_from_config, check_views
from fastssl.models.text import TextTransformer

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learned scale to t <= 100
# CLIP ViT-B/32: batch 32,768, AdamW (beta2 0.98) lr 5e-4, weight decay 0.2, 32 epochs, warm-up
# 2,000 of ~12,200 steps per epoch.
_CLIP_PAPER = dict(backbone="vit_base_patch32", image_size=224, epochs=32, batch_size=32768,
                   optimizer="adamw", base_lr=5e-4, lr_batch_divisor=32768, betas=(0.9, 0.98),
                   weight_decay=0.2, warmup_epochs=0.16)
# SigLIP from scratch: batch 32,768, AdamW (beta2 0.95) lr 1e-3, weight decay 1e-4.
_SIGLIP_PAPER = _CLIP_PAPER | dict(backbone="vit_base_patch16", base_lr=1e-3, betas=(0.9, 0.95),
                                   weight_decay=1e-4)
# Fashion-MNIST with synthetic captions (fastssl.data.captions, 20% naming another class): the
# weak method's CIFAR ResNet-8 at 28 px and a 2-layer text transformer, on the 2-core CPU.
_FASHION_MNIST = dict(backbone="resnet8", image_size=28, batch_size=256, epochs=1, optimizer="adamw",
                      base_lr=2e-3, lr_batch_divisor=256, betas=(0.9, 0.98), weight_decay=0.1,
                      warmup_epochs=0.1,
                      channels_last=True, embed_dim=64, context_length=16, text_width=64, text_layers=2,
                      text_heads=4, captions="synthetic", caption_noise=0.2, crop_scale=(0.5, 1.0),
                      views={"flip_p": 0.5})


@dataclass
class ClipConfig(MethodConfig):
    name: ClassVar[str] = "clip"
    defaults: ClassVar[dict] = _CLIP_PAPER
    embed_dim: int = setting(512, "dimension of the joint image-text embedding", low=1, high=65536)
    context_length: int = setting(77, "text tokens per caption, start and end tokens included (longer "
                                       "captions are cut)", low=3, high=4096)
    text_width: int = setting(512, "text transformer width", low=1, high=65536)
    text_layers: int = setting(12, "text transformer blocks", low=1, high=256)
    text_heads: int = setting(8, "text attention heads (divides text_width)", low=1, high=1024)
    init_logit_scale: float = setting(math.log(1 / 0.07), "initial log of the logit scale t (CLIP: "
                                                          "log 1/0.07)", low=0, high=MAX_LOGIT_SCALE)
    init_logit_bias: float | None = setting(None, "initial logit bias b (none: no bias)", low=-1e3, high=1e3)
    captions: str = setting("", "'' the data's own (shards' .txt / .json caption, captions.csv / .jsonl "
                                "beside an image folder), a captions file, or 'synthetic' (class-name "
                                "templates)")
    caption_noise: float = setting(0.0, "captions=synthetic: fraction naming a random other class", low=0,
                                   high=1)
    crop_scale: tuple[float, float] = setting((0.9, 1.0), "random resized crop's area range", low=0,
                                              low_open=True, high=1)
    zero_shot_templates: str = setting("", "zero-shot prompts: a file of templates, one per line with {} for "
                                           "the class name (empty: fastssl.eval.zero_shot's)")
    retrieval_images: int = setting(1000, "test images (with their captions) scored by retrieval recall",
                                    low=1, high=1 << 24)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text_width % self.text_heads:
            raise ValueError(f"text_heads must divide text_width ({self.text_width}), got {self.text_heads}")
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"crop_scale must be (min, max) with min <= max, got {self.crop_scale}")


@dataclass
class SigLipConfig(ClipConfig):
    name: ClassVar[str] = "siglip"
    defaults: ClassVar[dict] = _SIGLIP_PAPER
    init_logit_scale: float = setting(math.log(10), "initial log of the logit scale t (SigLIP: log 10)",
                                      low=0, high=MAX_LOGIT_SCALE)
    init_logit_bias: float | None = setting(-10.0, "initial logit bias b (SigLIP: -10; none: no bias)",
                                            low=-1e3, high=1e3)
    dist_impl: str = setting("bidir", "how each rank meets the other ranks' texts: bidir / shift (neighbour "
                                      "exchange) or gather / reduce (all-gather)", choices=DIST_IMPLS)


@register
class Clip(Method, config=ClipConfig):
    """Image and text towers with a learned logit scale, trained with ClipLoss.

    captions: one caption (or None) per dataset item, instead of bind_data's (tests, the Python API)."""

    presets = {"fashion-mnist": _FASHION_MNIST}
    accumulates_itself = True

    def __init__(self, cfg: TrainConfig, captions: list[str | None] | None = None):
        super().__init__(cfg)
        m = cfg.method
        self.visual, feature_dim = backbone_from_config(cfg)
        self.visual_projection = nn.Linear(feature_dim, m.embed_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=feature_dim**-0.5)
        self.text = TextTransformer(embed_dim=m.embed_dim, context_length=m.context_length,
                                    width=m.text_width, layers=m.text_layers, heads=m.text_heads)
        # [1], not open_clip's 0-d: FSDP2 shards every parameter along its first dimension
        self.logit_scale = nn.Parameter(torch.full((1,), float(m.init_logit_scale)))
        bias = m.init_logit_bias
        self.logit_bias = None if bias is None else nn.Parameter(torch.full((1,), float(bias)))
        self.criterion = self.build_criterion()
        self.register_buffer("tokens", None, persistent=False)  # data: rebuilt from the captions on resume
        self.captions: list[str | None] | None = None
        self._shard_of = None
        self._excluded: list[tuple[str, str]] = []
        if captions is not None:
            self.set_captions(captions)

    def build_criterion(self) -> nn.Module:
        return ClipLoss(local_loss=True, gather_with_grad=True, rank=get_rank(), world_size=get_world_size(),
                        backend=self.backend)

    # ------------------------------------------------------------------ data
    def recipe(self):
        from fastssl.data import recipes

        # CLIP's augmentation: a random resized crop alone.
        view = recipes.ViewSpec(size=self.cfg.data.image_size, scale=tuple(self.cfg.method.crop_scale),
                                flip_p=0.0)
        return recipes.Recipe(self.name, [view])

    def set_captions(self, captions: list[str | None]) -> None:
        """The caption (or None) of every dataset item, tokenized into the `tokens` buffer."""
        captions = list(captions)
        if not any(c is not None for c in captions):
            raise ValueError(f"{self.name}: none of the {len(captions)} samples has a caption")
        tokens = tokenize([c or "" for c in captions], self.cfg.method.context_length).to(torch.int32)
        self.tokens = tokens.to(self.logit_scale.device)
        self.captions = captions

    def bind_data(self, source) -> None:
        """Each sample's caption (cfg.method.captions; see fastssl.data.captions); samples without one
        are left out of training (build_sampler) and counted as skipped."""
        m = self.cfg.method
        captions = source_captions(source, m.captions, data=self.cfg.data.source, noise=m.caption_noise,
                                   seed=self.cfg.run.seed)
        self.set_captions(captions)
        self._excluded = [(source.name(i), "no caption") for i, c in enumerate(captions) if c is None]
        self._shard_of = getattr(source, "shard_of", None)

    def build_sampler(self, source=None, *, rank: int = 0, world_size: int = 1):
        """None when every sample has a caption; else a sampler over the captioned ones."""
        from fastssl.data.sampler import StreamResampler, SubsetSampler

        if not self._excluded:
            return None
        index = [i for i, c in enumerate(self.captions) if c is not None]
        seed = self.cfg.run.seed
        if self._shard_of is not None:  # shards stream in their planned order
            return StreamResampler([[0]] * len(index), index, self._shard_of, "natural", seed=seed, rank=rank,
                                   world_size=world_size, excluded=self._excluded)
        return SubsetSampler(index, seed=seed, rank=rank, world_size=world_size, excluded=self._excluded)

    def batch_tokens(self, batch: dict) -> torch.Tensor:
        """int64 [B, context_length] tokens of the batch's captions (by batch["index"])."""
        if self.tokens is None and self.logit_scale.is_meta:  # the FLOP count's copy: values change no FLOP
            rows = len(batch["index"])
            return torch.zeros(rows, self.cfg.method.context_length, dtype=torch.long, device="meta")
        if self.tokens is None:
            raise ValueError(f"{self.name}: no captions: call bind_data(source) or pass captions=")
        index = batch.get("index")
        if not isinstance(index, torch.Tensor):
            raise ValueError(f"{self.name}: batch['index'] (dataset indices) is needed to read the captions")
        n = len(self.tokens)
        if not index.is_cuda and index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(f"{self.name}: batch['index'] must lie in [0, {n}) (the captioned items), "
                             f"got {int(index.min())}..{int(index.max())}")
        return self.tokens[index.to(self.tokens.device)].long()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [len(texts), context_length] on the model's device (zero-shot prompts)."""
        return tokenize(texts, self.cfg.method.context_length).to(self.logit_scale.device)

    # ------------------------------------------------------------------ towers
    def encoder(self) -> nn.Module:
        return self.visual

    def compile_modules(self) -> list[nn.Module]:
        return [self.visual, self.text]

    def shard_units(self) -> list[nn.Module]:
        return [*self.text.blocks, self.text]

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, embed_dim]."""
        return F.normalize(self.visual_projection(self.visual(x)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings [B, embed_dim]."""
        return F.normalize(self.text(tokens), dim=-1)

    def _encode(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(x), self.encode_text(tokens)

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        x = check_views(batch, 1, self.name)[0]
        tokens = self.batch_tokens(batch)
        image, text = grad_cache_encode(self._encode, x, tokens, micro_batches=self.cfg.dist.accum_steps,
                                        module=self)
        loss = self.criterion(image, text, self.logit_scale.exp(), self.logit_bias)
        out = {"loss": loss, "logit_scale": self.logit_scale.detach().exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.detach()
        return out

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # ------------------------------------------------------------------ evaluation and export
    def evaluator(self, base, splits, device: torch.device, *, resize: int | None = None):
        """Zero-shot classification of the test split from its class names and image<->text
        retrieval on its captioned images (fastssl.eval.zero_shot), beside `base` (kNN / linear)."""
        from fastssl.data.captions import class_names_of
        from fastssl.eval.zero_shot import build_image_text_evaluator, read_templates

        test = splits.test if splits is not None else None
        if test is None:
            return base
        m = self.cfg.method
        captions = None
        try:  # a test split without captions is scored by zero-shot alone
            captions = source_captions(test, m.captions, data=self.cfg.data.source, noise=m.caption_noise,
                                       seed=self.cfg.run.seed + 1)
        except ValueError as e:
            print(f"retrieval: not scored ({e})", file=sys.stderr, flush=True)
        templates = read_templates(m.zero_shot_templates) if m.zero_shot_templates else None
        return build_image_text_evaluator(self.cfg, test, device, class_names=class_names_of(test),
                                          captions=captions, templates=templates, base=base, resize=resize,
                                          max_retrieval=m.retrieval_images)

    def text_tower_state(self) -> dict[str, torch.Tensor]:
        """What `fastssl export` writes beside the image backbone: the text tower ("text." + its
        TextTransformer keys), the image projection and the logit scale (and bias)."""
        state = {f"text.{k}": v for k, v in self.text.state_dict().items()}
        state["visual_projection.weight"] = self.visual_projection.weight
        state["logit_scale"] = self.logit_scale
        if self.logit_bias is not None:
            state["logit_bias"] = self.logit_bias
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    def text_tower_code(self) -> str:
        """Python that builds the module the "text." entries of text_tower_state load into."""
        m = self.cfg.method
        return (f"fastssl.models.text.TextTransformer(embed_dim={m.embed_dim}, "
                f"context_length={m.context_length}, width={m.text_width}, layers={m.text_layers}, "
                f"heads={m.text_heads})")


@register
class SigLip(Clip, config=SigLipConfig):
    """CLIP's towers with a learned logit bias, trained with SigLipLoss (pairwise sigmoid)."""

    presets = {"fashion-mnist": _FASHION_MNIST | dict(init_logit_scale=math.log(10), init_logit_bias=-10.0)}

    def build_criterion(self) -> nn.Module:
        return SigLipLoss(rank=get_rank(), world_size=get_world_size(), dist_impl=self.cfg.method.dist_impl,
                          backend=self.backend)
