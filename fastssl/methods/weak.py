"""Weakly supervised pretraining on noisy, long-tailed (multi-)label data: a backbone and a
linear classifier over the label space (Mahajan et al. 2018, "Exploring the Limits of
Weakly Supervised Pretraining"; Singh et al. 2022, SWAG).

Loss `softmax`: cross-entropy against a target of 1/k on each of an image's k labels
(the paper's finding: it beats per-label sigmoids); `sigmoid`: per-label BCE, the
baseline. Sampling (`natural | uniform | sqrt | inverse_sqrt`) is fastssl.data's
ResamplingSampler, built by `build_sampler`. Targets come from the method's label table
(a labels file, or the source's class labels) indexed by batch["index"]; label noise and
then the optional parent map are applied to that table once, at construction.
Optimisation as in Goyal et al. 2017 / Mahajan et al.: SGD, momentum 0.9, lr 0.1 per 256
images, weight decay 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastssl.data.labels import LabelTable, load_vocabulary, multi_hot, read_labels, read_parent_map
from fastssl.data.sampler import MODES, ResamplingSampler, StreamResampler
from fastssl.methods import register
from fastssl.methods._common import backbone_from_config, check_views
from fastssl.methods.base import Method, StepContext, TrainConfig

LOSSES = ("softmax", "sigmoid")


@dataclass
class WeakConfig(TrainConfig):
    method: str = "weak"
    backbone: str = "resnet50"
    image_size: int = 224
    epochs: int = 100
    batch_size: int = 256
    base_lr: float = 0.1
    weight_decay: float = 1e-4
    optimizer: str = "sgd"
    momentum: float = 0.9
    loss: str = "softmax"              # softmax | sigmoid
    sampling: str = "sqrt"             # natural | uniform | sqrt | inverse_sqrt
    labels_file: str = ""              # CSV / JSON lines (fastssl.data.labels); "": the source's class labels
    vocabulary: str = ""               # label strings, one per line; sets num_classes
    hierarchy: str = ""                # parent map CSV child,parent...: labels expand to their ancestors
    label_noise: float = 0.0           # fraction of label slots replaced (robustness studies)
    num_classes: int = 10              # label space without a vocabulary (10: Fashion-MNIST's classes)
    rare_threshold: float | None = None  # inverse_sqrt: labels on fewer images are rare (SWAG)
    rare_factor: float = 100.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    vit_depth: int | None = None


@register
class WeakSupervised(Method):
    """Backbone + Linear(feature_dim, num_classes) trained on multi-hot targets.

    labels: a LabelTable in dataset order (else cfg.labels_file is read; else the source's
    class labels: from build_sampler(source) when noise / a hierarchy must be applied to
    them, otherwise batch["label"] directly).
    backbone: (module, feature_dim) to use instead of cfg.backbone (small study nets)."""

    name = "weak"
    config_class = WeakConfig
    # Fashion-MNIST at its own 28 px, each image tagged with its class: the CIFAR ResNet-8, 2 epochs.
    presets = {"fashion-mnist": dict(backbone="resnet8", image_size=28, batch_size=128, epochs=2,
                                     channels_last=True, num_classes=10, crop_scale=(0.25, 1.0))}

    def __init__(self, cfg: WeakConfig, labels: LabelTable | None = None,
                 backbone: tuple[nn.Module, int] | None = None):
        super().__init__(cfg)
        if cfg.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
        if cfg.sampling not in MODES:
            raise ValueError(f"sampling must be one of {MODES}, got {cfg.sampling!r}")
        if not 0.0 <= cfg.label_noise <= 1.0:
            raise ValueError(f"label_noise must be a fraction in [0, 1], got {cfg.label_noise!r}")
        if labels is None and cfg.labels_file:
            labels = read_labels(cfg.labels_file, vocabulary=cfg.vocabulary or None,
                                 num_classes=None if cfg.vocabulary else cfg.num_classes)
        if labels is not None and not isinstance(labels, LabelTable):
            raise TypeError(f"labels must be a fastssl.data LabelTable, got {type(labels).__name__}")
        if cfg.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {cfg.num_classes}")
        self.labels: LabelTable | None = None
        self.register_buffer("label_rows", None, persistent=False)
        # Without a labels file, noise / hierarchy apply to the source's class labels, which
        # build_sampler(source) supplies; until then forward() refuses to train on clean labels.
        self._needs_source_labels = labels is None and bool(cfg.hierarchy or cfg.label_noise)
        if labels is not None:
            self._set_table(labels)
        self.backbone, feature_dim = backbone if backbone is not None else backbone_from_config(cfg)
        self.classifier = nn.Linear(feature_dim, cfg.num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def _set_table(self, labels: LabelTable) -> None:
        cfg = self.cfg
        # Noise corrupts the annotations as observed; the hierarchy then expands whatever was observed.
        if cfg.label_noise:
            labels = labels.with_noise(cfg.label_noise, seed=cfg.seed)
        if cfg.hierarchy:
            labels = labels.expand_hierarchy(read_parent_map(cfg.hierarchy, labels.names))
        if hasattr(self, "classifier") and labels.num_classes != self.classifier.out_features:
            raise ValueError(f"labels have {labels.num_classes} classes, the classifier "
                             f"{self.classifier.out_features} (num_classes)")
        cfg.num_classes = labels.num_classes  # the resolved config states the real label space
        self.labels = labels
        # [N, K_max] label ids (-1 padded) as a buffer so it follows the module's device;
        # not persistent: it is data, rebuilt from the same files and seed on resume.
        rows = labels.padded()
        self.label_rows = rows.to(self.classifier.weight.device) if hasattr(self, "classifier") else rows
        self._needs_source_labels = False

    def recipe(self):
        from fastssl.data import recipes

        # Supervised ImageNet-style augmentation: random resized crop + flip, nothing else.
        view = recipes.ViewSpec(size=self.cfg.image_size, scale=tuple(self.cfg.crop_scale))
        return recipes.Recipe("weak", [view])

    def encoder(self) -> nn.Module:
        return self.backbone

    def build_sampler(self, source=None, *, rank: int = 0, world_size: int = 1, seed: int | None = None,
                      num_samples: int | None = None) -> ResamplingSampler:
        """The cfg.sampling sampler for this rank; pass it to build_loader(sampler=...).

        source: the pretraining source (its `labels`, and `paths` to put a path-keyed labels
        file in the source's order) or its class labels [N]. Without a label table the
        sampler and the targets use those class labels. Shards (fastssl.data.ShardSource)
        with tags: see _shard_sampler."""
        if not self.cfg.labels_file and hasattr(source, "tags") and hasattr(source, "shard_of"):
            vocab = load_vocabulary(self.cfg.vocabulary) if self.cfg.vocabulary else source.tag_vocabulary()
            if vocab:
                return self._shard_sampler(source, vocab, rank, world_size, seed)
        labels = getattr(source, "labels", source)
        if self._needs_source_labels and labels is not None:
            ids = labels.tolist() if hasattr(labels, "tolist") else list(labels)
            self._set_table(LabelTable.from_single_labels(ids, self.cfg.num_classes))
        if self.labels is not None:
            paths = getattr(source, "paths", None)
            if paths is not None and self.labels.keys is not None and list(self.labels.keys) != list(paths):
                self.labels = self.labels.reorder(paths)
                self.label_rows = self.labels.padded().to(self.classifier.weight.device)
            if labels is not None and len(labels) != len(self.labels):
                raise ValueError(f"build_sampler: the label table has {len(self.labels)} items but the "
                                 f"source has {len(labels)}")
            rows = self.labels.labels
        elif labels is not None:
            ids = labels.tolist() if hasattr(labels, "tolist") else list(labels)
            rows = [[int(c)] for c in ids]
        else:
            raise ValueError("build_sampler: the method has no label table; pass the source (or its labels)")
        return ResamplingSampler(
            rows, self.cfg.sampling, num_samples=num_samples, seed=self.cfg.seed if seed is None else seed,
            rank=rank, world_size=world_size, rare_threshold=self.cfg.rare_threshold,
            rare_factor=self.cfg.rare_factor,
        )

    def _shard_sampler(self, source, vocab: list[str], rank: int, world_size: int,
                       seed: int | None) -> StreamResampler:
        """Targets from the shards' tags (.json "tags", or the caption's hashtags) through `vocab`
        (cfg.vocabulary, else the manifest's); samples with no known tag are never drawn and
        are counted as skipped. The classifier is resized to the vocabulary when they differ."""
        rows = source.tags(vocab)
        index = [i for i, row in enumerate(rows) if row]
        if not index:
            raise ValueError(f"weak: no sample of {source.spec!r} carries a tag of the "
                             f"{len(vocab)}-tag vocabulary")
        table = LabelTable([rows[i] for i in index], len(vocab), vocab)
        if table.num_classes != self.classifier.out_features:
            self.classifier = nn.Linear(self.classifier.in_features, table.num_classes).to(
                self.classifier.weight.device)
            nn.init.normal_(self.classifier.weight, std=0.01)
            nn.init.zeros_(self.classifier.bias)
        if self.cfg.label_noise:
            table = table.with_noise(self.cfg.label_noise, seed=self.cfg.seed)
        self.cfg.num_classes, self.labels = table.num_classes, table
        padded = torch.full((len(rows), max(len(r) for r in table.labels)), -1, dtype=torch.int64)
        padded[index] = table.padded()
        self.label_rows = padded.to(self.classifier.weight.device)  # untagged rows stay -1: never drawn
        self._needs_source_labels = False
        excluded = [(source.name(i), "no tag of the vocabulary") for i, row in enumerate(rows) if not row]
        return StreamResampler(table.labels, index, source.shard_of, self.cfg.sampling,
                               seed=self.cfg.seed if seed is None else seed, rank=rank, world_size=world_size,
                               rare_threshold=self.cfg.rare_threshold, rare_factor=self.cfg.rare_factor,
                               excluded=excluded)

    def targets(self, batch: dict) -> torch.Tensor:
        """Multi-hot float32 targets [B, C] for the batch's items."""
        if self._needs_source_labels:
            raise ValueError("weak: label_noise / hierarchy without a labels_file act on the source's "
                             "labels: call build_sampler(source) before training")
        if self.label_rows is not None:
            index = batch.get("index")
            if not isinstance(index, torch.Tensor):
                raise ValueError("weak: batch['index'] (dataset indices) is needed to read the label table")
            # Range checks only where they cost no device sync; CUDA indexing asserts on its own.
            if not index.is_cuda and index.numel() and (int(index.min()) < 0
                                                          or int(index.max()) >= self.label_rows.shape[0]):
                raise ValueError(f"weak: batch['index'] must lie in [0, {self.label_rows.shape[0]}) "
                                 f"(the label table's items), got {int(index.min())}..{int(index.max())}")
            return multi_hot(self.label_rows[index.to(self.label_rows.device)], self.cfg.num_classes)
        label = batch.get("label")
        if not isinstance(label, torch.Tensor):
            raise ValueError("weak: without a label table, batch['label'] holds the targets")
        if not label.is_cuda and label.numel() and (int(label.min()) < 0
                                                     or int(label.max()) >= self.cfg.num_classes):
            raise ValueError(f"weak: batch['label'] must lie in [0, num_classes={self.cfg.num_classes}), "
                             f"got {int(label.min())}..{int(label.max())}")
        return nn.functional.one_hot(label.long(), self.cfg.num_classes).float()

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        from fastssl.losses.multilabel import multilabel_sigmoid_loss, multilabel_softmax_loss

        x = check_views(batch, 1, self.name)[0]
        logits = self.classifier(self.backbone(x))
        target = self.targets(batch).to(logits.device)
        # The label table guarantees 0/1 rows with >= 1 label: no per-step validation sync.
        if self.cfg.loss == "softmax":
            loss = multilabel_softmax_loss(logits, target, backend=self.backend, validate=False)
        else:
            loss = multilabel_sigmoid_loss(logits, target, validate=False)
        # precision@1: the top-scoring class is one of the image's (noisy) labels
        hit = target.gather(1, logits.detach().argmax(dim=1, keepdim=True)).mean()
        return {"loss": loss, "precision_at_1": hit}
