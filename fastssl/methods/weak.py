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
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fastssl.config import MethodConfig, setting
from fastssl.data.labels import LabelTable, load_vocabulary, multi_hot, read_labels, read_parent_map
from fastssl.data.sampler import MODES, ResamplingSampler, StreamResampler
from fastssl.data.vocab import load_tag_ids
from fastssl.method import Method, StepContext, TrainConfig
from fastssl.methods import register
from fastssl.methods._common import SGD, backbone_from_config, check_views

LOSSES = ("softmax", "sigmoid")


@dataclass
class WeakConfig(MethodConfig):
    name: ClassVar[str] = "weak"
    defaults: ClassVar[dict] = dict(SGD, backbone="resnet50", image_size=224, epochs=100, batch_size=256,
                                    base_lr=0.1, weight_decay=1e-4)
    loss: str = setting("softmax", "softmax (1/k targets) or sigmoid (per-label BCE)", choices=LOSSES)
    sampling: str = setting("sqrt", "how images are resampled by their labels' frequencies", choices=MODES)
    labels_file: str = setting("", "CSV / JSON lines of labels (fastssl.data.labels); empty: the source's "
                                   "class labels")
    vocabulary: str = setting("", "label strings, one per line; sets num_classes")
    hierarchy: str = setting("", "parent map CSV child,parent, or 'wordnet' (parents from WordNet): labels "
                                 "expand to their ancestors")
    label_noise: float = setting(0.0, "fraction of label slots replaced (robustness studies)", low=0, high=1)
    num_classes: int = setting(10, "label space without a vocabulary (10: Fashion-MNIST's classes)", low=1,
                               high=1 << 24)
    rare_threshold: float | None = setting(None, "inverse_sqrt: labels on fewer images are rare (SWAG)",
                                           low=0, high=1e18)
    rare_factor: float = setting(100.0, "inverse_sqrt: weight factor of rare labels", low=0, low_open=True,
                                 high=1e9)
    crop_scale: tuple[float, float] = setting((0.08, 1.0), "random resized crop's area range", low=0,
                                              low_open=True, high=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"crop_scale must be (min, max) with min <= max, got {self.crop_scale}")


@register
class WeakSupervised(Method, config=WeakConfig):
    """Backbone + Linear(feature_dim, num_classes) trained on multi-hot targets.

    labels: a LabelTable in dataset order (else cfg.method.labels_file is read; else the source's
    class labels: from build_sampler(source) when noise / a hierarchy must be applied to
    them, otherwise batch["label"] directly).
    backbone: (module, feature_dim) to use instead of cfg.model.backbone (small study nets)."""

    # Fashion-MNIST at its own 28 px, each image tagged with its class: the CIFAR ResNet-8, 2 epochs.
    presets = {"fashion-mnist": dict(backbone="resnet8", image_size=28, batch_size=128, epochs=2,
                                     channels_last=True, num_classes=10, crop_scale=(0.25, 1.0))}

    def __init__(self, cfg: TrainConfig, labels: LabelTable | None = None,
                 backbone: tuple[nn.Module, int] | None = None):
        super().__init__(cfg)
        if labels is None and cfg.method.labels_file:
            labels = read_labels(cfg.method.labels_file, vocabulary=cfg.method.vocabulary or None,
                                 num_classes=None if cfg.method.vocabulary else cfg.method.num_classes)
        if labels is not None and not isinstance(labels, LabelTable):
            raise TypeError(f"labels must be a fastssl.data LabelTable, got {type(labels).__name__}")
        self.labels: LabelTable | None = None
        self.register_buffer("label_rows", None, persistent=False)
        # Without a labels file, noise / hierarchy apply to the source's class labels, which
        # bind_data(source) supplies; until then forward() refuses to train on clean labels.
        self._needs_source_labels = labels is None and bool(cfg.method.hierarchy or cfg.method.label_noise)
        self._tagged: tuple | None = None  # (tagged sample indices, shard_of, excluded) of tagged shards
        if labels is not None:
            self._set_table(labels)
        self.backbone, feature_dim = backbone if backbone is not None else backbone_from_config(cfg)
        self.classifier = nn.Linear(feature_dim, cfg.method.num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def _set_table(self, labels: LabelTable) -> None:
        cfg = self.cfg
        # Noise corrupts the annotations as observed; the hierarchy then expands whatever was observed.
        if cfg.method.label_noise:
            labels = labels.with_noise(cfg.method.label_noise, seed=cfg.run.seed)
        if cfg.method.hierarchy:
            labels = labels.expand_hierarchy(read_parent_map(cfg.method.hierarchy, labels.names))
        if hasattr(self, "classifier") and labels.num_classes != self.classifier.out_features:
            raise ValueError(f"labels have {labels.num_classes} classes, the classifier "
                             f"{self.classifier.out_features} (num_classes)")
        cfg.method.num_classes = labels.num_classes  # the resolved config states the real label space
        self.labels = labels
        # [N, K_max] label ids (-1 padded) as a buffer so it follows the module's device;
        # not persistent: it is data, rebuilt from the same files and seed on resume.
        rows = labels.padded()
        self.label_rows = rows.to(self.classifier.weight.device) if hasattr(self, "classifier") else rows
        self._needs_source_labels = False

    def recipe(self):
        from fastssl.data import recipes

        # Supervised ImageNet-style augmentation: random resized crop + flip, nothing else.
        view = recipes.ViewSpec(size=self.cfg.data.image_size, scale=tuple(self.cfg.method.crop_scale))
        return recipes.Recipe("weak", [view])

    def encoder(self) -> nn.Module:
        return self.backbone

    def bind_data(self, source) -> None:
        """Fit the label table and the classifier to the pretraining source (call before
        build_sampler and before the optimizer is built).

        source: its `labels` (or the class labels [N] themselves) when label_noise / hierarchy
        act on them, its `paths` to put a path-keyed labels file in the source's order.
        Shards (fastssl.data.ShardSource) with tags: their tags through the vocabulary
        (cfg.method.vocabulary, else the manifest's) become the table, and the classifier is
        resized to that vocabulary when they differ."""
        m = self.cfg.method
        if not m.labels_file and hasattr(source, "tags") and hasattr(source, "shard_of"):
            vocab = load_vocabulary(m.vocabulary) if m.vocabulary else source.tag_vocabulary()
            if vocab:
                self._bind_tags(source, vocab)
                return
        labels = getattr(source, "labels", source)
        unlabelled = np.asarray(labels) < 0 if hasattr(source, "shard_of") else np.zeros(0, bool)
        if self.labels is None and unlabelled.any():  # shards without .cls (img2dataset's output)
            raise ValueError(f"these shards have no class labels ({int(unlabelled.sum())} of {len(labels)} "
                             f"samples without a .cls): run `fastssl vocab {source.spec} --top K --out "
                             f"vocab.json` and pass vocabulary=vocab.json (their hashtags become the "
                             f"labels), or labels_file=")
        if self._needs_source_labels and labels is not None:
            ids = labels.tolist() if hasattr(labels, "tolist") else list(labels)
            self._set_table(LabelTable.from_single_labels(ids, m.num_classes))
        paths = getattr(source, "paths", None)
        if self.labels is not None and paths is not None and self.labels.keys is not None \
                and list(self.labels.keys) != list(paths):
            self.labels = self.labels.reorder(paths)
            self.label_rows = self.labels.padded().to(self.classifier.weight.device)

    def _bind_tags(self, source, vocab: list[str]) -> None:
        """The label table from the shards' tags (.json "tags", or the caption's hashtags; a
        WordNet vocabulary maps each merged hashtag to its synset); samples with no known tag
        are never drawn and are counted as skipped. Label noise, then the hierarchy, apply as
        to a label table."""
        vocabulary = self.cfg.method.vocabulary
        rows = source.tags(load_tag_ids(vocabulary) if vocabulary else vocab)
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
        if self.cfg.method.label_noise:
            table = table.with_noise(self.cfg.method.label_noise, seed=self.cfg.run.seed)
        if self.cfg.method.hierarchy:
            table = table.expand_hierarchy(read_parent_map(self.cfg.method.hierarchy, table.names))
        self.cfg.method.num_classes, self.labels = table.num_classes, table
        padded = torch.full((len(rows), max(len(r) for r in table.labels)), -1, dtype=torch.int64)
        padded[index] = table.padded()
        self.label_rows = padded.to(self.classifier.weight.device)  # untagged rows stay -1: never drawn
        self._needs_source_labels = False
        excluded = [(source.name(i), "no tag of the vocabulary") for i, row in enumerate(rows) if not row]
        self._tagged = (index, source.shard_of, excluded)

    def build_sampler(self, source=None, *, rank: int = 0, world_size: int = 1, seed: int | None = None,
                      num_samples: int | None = None) -> ResamplingSampler | StreamResampler:
        """The cfg.method.sampling sampler for this rank over the label table bind_data fitted
        (else the source's class labels); pass it to build_loader(sampler=...)."""
        m = self.cfg.method
        seed = self.cfg.run.seed if seed is None else seed
        if self._tagged is not None:
            index, shard_of, excluded = self._tagged
            return StreamResampler(self.labels.labels, index, shard_of, m.sampling, seed=seed, rank=rank,
                                   world_size=world_size, rare_threshold=m.rare_threshold,
                                   rare_factor=m.rare_factor, excluded=excluded)
        labels = getattr(source, "labels", source)
        if self.labels is not None:
            if labels is not None and len(labels) != len(self.labels):
                raise ValueError(f"build_sampler: the label table has {len(self.labels)} items but the "
                                 f"source has {len(labels)}")
            rows = self.labels.labels
        elif labels is not None:
            ids = labels.tolist() if hasattr(labels, "tolist") else list(labels)
            rows = [[int(c)] for c in ids]
        else:
            raise ValueError("build_sampler: the method has no label table; pass the source (or its labels)")
        return ResamplingSampler(rows, m.sampling, num_samples=num_samples, seed=seed, rank=rank,
                                 world_size=world_size, rare_threshold=m.rare_threshold,
                                 rare_factor=m.rare_factor)

    def targets(self, batch: dict) -> torch.Tensor:
        """Multi-hot float32 targets [B, C] for the batch's items."""
        if self._needs_source_labels:
            raise ValueError("weak: label_noise / hierarchy without a labels_file act on the source's "
                             "labels: call bind_data(source) before training")
        if self.label_rows is not None:
            index = batch.get("index")
            if not isinstance(index, torch.Tensor):
                raise ValueError("weak: batch['index'] (dataset indices) is needed to read the label table")
            # Range checks only where they cost no device sync; CUDA indexing asserts on its own.
            if not index.is_cuda and index.numel() and (int(index.min()) < 0
                                                          or int(index.max()) >= self.label_rows.shape[0]):
                raise ValueError(f"weak: batch['index'] must lie in [0, {self.label_rows.shape[0]}) "
                                 f"(the label table's items), got {int(index.min())}..{int(index.max())}")
            return multi_hot(self.label_rows[index.to(self.label_rows.device)], self.cfg.method.num_classes)
        label = batch.get("label")
        if not isinstance(label, torch.Tensor):
            raise ValueError("weak: without a label table, batch['label'] holds the targets")
        if not label.is_cuda and label.numel() and (int(label.min()) < 0
                                                     or int(label.max()) >= self.cfg.method.num_classes):
            raise ValueError(f"weak: batch['label'] must lie in [0, "
                             f"num_classes={self.cfg.method.num_classes}), "
                             f"got {int(label.min())}..{int(label.max())}")
        return nn.functional.one_hot(label.long(), self.cfg.method.num_classes).float()

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        from fastssl.losses.multilabel import multilabel_sigmoid_loss, multilabel_softmax_loss

        x = check_views(batch, 1, self.name)[0]
        logits = self.classifier(self.backbone(x))
        target = self.targets(batch).to(logits.device)
        # The label table guarantees 0/1 rows with >= 1 label: no per-step validation sync.
        if self.cfg.method.loss == "softmax":
            loss = multilabel_softmax_loss(logits, target, backend=self.backend, validate=False)
        else:
            loss = multilabel_sigmoid_loss(logits, target, validate=False)
        # precision@1: the top-scoring class is one of the image's (noisy) labels
        hit = target.gather(1, logits.detach().argmax(dim=1, keepdim=True)).mean()
        return {"loss": loss, "precision_at_1": hit}
