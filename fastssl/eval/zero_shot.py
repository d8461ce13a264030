"""Evaluations of an image-text model (CLIP, §3.1.4 and §3.1 of Radford et al. 2021):

- zero-shot classification: each class's text embedding is the normalised mean of the
  normalised embeddings of its prompts ("a photo of a {}." ... with the class name); an
  image's prediction is the class of highest cosine similarity. Top-1 and top-5.
- image->text and text->image retrieval recall@1/5/10 on captioned test images. Identical
  caption strings are one text (they cannot be told apart): an image's hit is its caption's
  text among the k best; a text's hit is any image it captions among the k best.

The model is any object with encode_image(x) and encode_text(tokens) (normalised [B, E]) and
tokenize(list of str) -> tokens (fastssl.methods.clip.Clip).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

# A handful of CLIP's 80 ImageNet prompt templates.
TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a bad photo of a {}.",
             "a black and white photo of a {}.", "a close-up photo of a {}.",
             "a low resolution photo of the {}.", "itap of a {}.", "a photo of the small {}.")
RECALL_AT = (1, 5, 10)
TEXT_BATCH = 256


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates, one a line (blank lines skipped), each holding "{}" once."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"zero_shot_templates: expected a text file of templates, got {str(path)!r} "
                         "(no such file)")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bad = [line for line in lines if line.count("{}") != 1]
    if not lines or bad:
        raise ValueError(f"zero_shot_templates: every line of {str(path)!r} must hold {{}} once (where "
                         f"the class name goes), got {bad[0] if bad else 'no templates'!r}")
    return lines


@torch.no_grad()
def embed_texts(model, texts: Sequence[str]) -> torch.Tensor:
    """Normalised text embeddings [len(texts), E] in batches, float32."""
    return torch.cat([model.encode_text(model.tokenize(list(texts[i:i + TEXT_BATCH]))).float()
                      for i in range(0, len(texts), TEXT_BATCH)])


@torch.no_grad()
def class_embeddings(model, class_names: Sequence[str], templates: Sequence[str] = TEMPLATES) -> torch.Tensor:
    """[C, E]: per class, the normalised mean of its prompts' normalised embeddings."""
    prompts = [t.format(name.lower().replace("_", " ")) for name in class_names for t in templates]
    mean = embed_texts(model, prompts).view(len(class_names), len(templates), -1).mean(1)
    return nn.functional.normalize(mean, dim=-1)


def zero_shot_scores(image: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
    """Top-1 / top-5 of normalised image embeddings [N, E] against class embeddings [C, E]."""
    top = (image @ classes.T).topk(min(5, classes.shape[0]), dim=1).indices
    hit = top == labels[:, None]
    return {"zero_shot_top1": hit[:, 0].float().mean().item(),
            "zero_shot_top5": hit.any(1).float().mean().item()}


def retrieval_recall(image: torch.Tensor, text: torch.Tensor, text_of_image: torch.Tensor,
                     ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Recall@k both ways: image [N, E], distinct texts [T, E] (normalised), text_of_image [N] the
    row of each image's caption. A hit ranks the right item before every wrong one it beats;
    ties with wrong items count against it."""
    sim = image @ text.T  # [N, T]
    right = sim.gather(1, text_of_image[:, None])
    image_rank = (sim > right).sum(1)  # wrong texts scored above the image's caption
    captions = torch.zeros_like(sim, dtype=torch.bool)
    captions[torch.arange(len(image)), text_of_image] = True
    best = sim.masked_fill(~captions, float("-inf")).max(0).values  # each text's best image of its own
    text_rank = ((sim > best) & ~captions).sum(0)
    out = {}
    for k in ks:
        out[f"image_to_text_r{k}"] = (image_rank < k).float().mean().item()
        out[f"text_to_image_r{k}"] = (text_rank < k).float().mean().item()
    return out


@torch.no_grad()
def embed_images(model, batches, device: torch.device, channels_last: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normalised image embeddings [N, E] float32, labels [N], dataset indices [N]) on the CPU
    over loader batches (a sample the loader skipped is absent: rows are matched by index)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feats, labels, index = [], [], []
    for batch in batches:
        x = batch["views"][0].to(device, non_blocking=True).contiguous(memory_format=fmt)
        feats.append(model.encode_image(x).float().cpu())
        labels.append(batch["label"].long().cpu())
        index.append(batch["index"].long().cpu())
    if not feats:
        raise ValueError("batches: expected at least one batch, got none")
    return torch.cat(feats), torch.cat(labels), torch.cat(index)


def build_image_text_evaluator(cfg, test_source, device: torch.device, *, class_names: Sequence[str],
                               captions: Sequence[str | None] | None, templates: Sequence[str] | None = None,
                               base=None, resize: int | None = None, max_retrieval: int = 1000):
    """Callable(model) -> {zero_shot_top1, zero_shot_top5 (with class names), image_to_text_r1/5/10,
    text_to_image_r1/5/10 and retrieval_images (with captions), and base(model.encoder())'s keys}.

    Test images go through the eval recipe (cfg.eval_side, `resize` as kNN's). Retrieval scores
    a fixed subsample (cfg.run.seed) of up to max_retrieval captioned test images. Every rank
    scores the whole split (the same numbers, no collective). `takes_method` is set: the engine
    passes the model, not its encoder."""
    from fastssl.data import build_loader, recipes, resolve_loader

    templates = tuple(templates or TEMPLATES)
    recipe = recipes.eval(size=cfg.eval_side, resize=resize)
    kind, data_device = resolve_loader(cfg.data.loader, cfg.data.data_device, train_device=device)
    labels = np.asarray(test_source.labels)
    score_classes = len(class_names) >= 2 and labels.min() >= 0 and labels.max() < len(class_names)
    captioned = [i for i, c in enumerate(captions or []) if c is not None]
    if len(captioned) > max_retrieval:
        rng = np.random.default_rng(cfg.run.seed)
        captioned = sorted(rng.choice(captioned, max_retrieval, replace=False).tolist())

    def evaluate(model: nn.Module) -> dict[str, float]:
        result = dict(base(model.encoder())) if base is not None else {}
        if not score_classes and not captioned:
            return result
        loader = build_loader(test_source, recipe, batch_size=512, seed=cfg.run.seed, drop_last=False,
                              shuffle=False, loader=kind, device=data_device,
                              num_threads=cfg.data.num_threads)
        image, label, index = embed_images(model, loader, device, cfg.model.channels_last)
        if score_classes:
            result |= zero_shot_scores(image, label, class_embeddings(model, class_names, templates).cpu())
        position = {int(i): k for k, i in enumerate(index.tolist())}
        kept = [i for i in captioned if i in position]
        if kept:
            texts = list(dict.fromkeys(captions[i] for i in kept))
            row = {t: k for k, t in enumerate(texts)}
            text_of_image = torch.tensor([row[captions[i]] for i in kept])
            rows = torch.tensor([position[i] for i in kept])
            result |= retrieval_recall(image[rows], embed_texts(model, texts).cpu(), text_of_image)
            result["retrieval_images"] = len(kept)
        return result

    evaluate.takes_method = True
    return evaluate


__all__ = ["RECALL_AT", "TEMPLATES", "build_image_text_evaluator", "class_embeddings", "embed_images",
           "embed_texts",
           "read_templates", "retrieval_recall", "zero_shot_scores"]
