"""The figures of `fastssl viz RUN`: what a pretrained encoder learned, as pictures.

- features_pca.png: test features projected on their first two principal components, by class;
- neighbours.png: test images and their nearest training images in feature space (cosine, as kNN);
- mae_reconstructions.png (MAE): original / masked / reconstructed test images;
- colourised.png (colorization): original / lightness (the input) / colourised test images;
- attention.png (ViT encoders, e.g. DINO's): the last block's class-token attention, per head.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from fastssl.data import build_loader, recipes
from fastssl.eval import FixedIndices, extract_features, subsample_indices

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
PCA_TEST_IMAGES, BANK_TRAIN_IMAGES = 2_000, 10_000
N_QUERIES, N_NEIGHBOURS, N_SHOWN = 6, 8, 8


def class_names(source, data: str) -> list[str]:
    """Names for the source's labels: Fashion-MNIST's, an image folder's sub-folders, or the numbers."""
    if data == "fashion-mnist":
        return list(FASHION_MNIST_CLASSES)
    if getattr(source, "classes", None):
        return list(source.classes)
    return [str(c) for c in range(int(np.max(source.labels)) + 1)]


class RunImages:
    """Eval-recipe images of a source (the run's size; `resize` for sources stored at another size)
    through the run's data backend, by index, plus their display form in [0, 1]."""

    def __init__(self, cfg, resize: int | None, device: torch.device):
        self.cfg, self.device = cfg, device
        self.recipe = recipes.eval(size=cfg.eval_side, resize=resize)
        self.mean = torch.tensor(self.recipe.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(self.recipe.std).view(1, 3, 1, 1)

    def loader(self, source, indices: np.ndarray):
        return build_loader(source, self.recipe, batch_size=512, seed=self.cfg.run.seed, drop_last=False,
                            shuffle=False, sampler=FixedIndices(np.asarray(indices)),
                            loader=self.cfg.data.loader, device=self.cfg.data.data_device,
                            num_threads=self.cfg.data.num_threads)

    def load(self, source, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised images [n, 3, S, S] on the device, labels [n]) in the order of `indices`."""
        images, labels = [], []
        for batch in self.loader(source, indices):
            images.append(batch["views"][0].to(self.device))
            labels.append(batch["label"].cpu())
        return torch.cat(images), torch.cat(labels)

    def display(self, images: torch.Tensor) -> np.ndarray:
        """Normalised [n, 3, S, S] -> [n, S, S, 3] in [0, 1] for imshow."""
        x = images.detach().float().cpu() * self.std + self.mean
        return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _channels_last(images: torch.Tensor) -> np.ndarray:
    """[n, 3, S, S] in [0, 1] -> [n, S, S, 3] for imshow."""
    return images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _pca_2d(features: torch.Tensor) -> np.ndarray:
    """[N, D] -> [N, 2]: coordinates on the first two principal components (SVD of centred features)."""
    x = features.double() - features.double().mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return (x @ v[:2].T).numpy()


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_pca(features: torch.Tensor, labels: torch.Tensor, names: list[str], path: Path, title: str) -> Path:
    """Scatter of the features' first two principal components, coloured by class."""
    xy = _pca_2d(features)
    fig = Figure(figsize=(7.5, 5.6), dpi=90, layout="constrained")
    ax = fig.subplots()
    colors = _palette(len(names))
    for c in range(len(names)):
        keep = (labels == c).numpy()
        if keep.any():
            ax.scatter(xy[keep, 0], xy[keep, 1], s=6, color=colors[c], label=names[c], alpha=0.7,
                       linewidths=0)
    ax.set(xlabel="PC 1", ylabel="PC 2", xticks=[], yticks=[])
    fig.suptitle(title, fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2.5, frameon=False)
    fig.savefig(path)
    return path


def _frame(ax, color) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(color)
        spine.set_linewidth(2.5)


def plot_neighbours(queries: np.ndarray, query_labels: torch.Tensor, neighbours: np.ndarray,
                    neighbour_labels: torch.Tensor, names: list[str], path: Path, title: str) -> Path:
    """One row per query: the test image, then its nearest training images (green frame: same
    class, red: another class; each titled with its class)."""
    n, k = neighbours.shape[:2]
    fig = Figure(figsize=(1.15 * (k + 1), 1.3 * n + 0.4), dpi=90, layout="constrained")
    axes = fig.subplots(n, k + 1, squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(queries[i])
        _frame(axes[i, 0], "black")
        axes[i, 0].set_title(f"query: {names[int(query_labels[i])]}", fontsize=7)
        for j in range(k):
            same = int(neighbour_labels[i, j]) == int(query_labels[i])
            axes[i, j + 1].imshow(neighbours[i, j])
            _frame(axes[i, j + 1], "tab:green" if same else "tab:red")
            axes[i, j + 1].set_title(names[int(neighbour_labels[i, j])], fontsize=7,
                                     color="black" if same else "tab:red")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    return path


@torch.no_grad()
def mae_reconstructions(mae, images: torch.Tensor, mask_ratio: float, seed: int) -> tuple[torch.Tensor, ...]:
    """MAE (fastssl.models.MaskedAutoencoderViT) on normalised images [n, 3, S, S] with a seeded mask
    -> (masked, reconstruction + visible patches), both [n, 3, S, S] in the input's normalisation.
    A norm_pix_loss model predicts each patch standardised: the prediction is mapped back with the
    true patch's mean and variance, as the official MAE visualisation does."""
    from fastssl import ops

    p = mae.patch_size
    target = ops.patchify(images, p)
    noise = torch.rand(target.shape[:2], generator=torch.Generator().manual_seed(seed)).to(images.device)
    latent, mask, ids_restore = mae.encode(images, mask_ratio, noise=noise)
    pred = mae.decode(latent, ids_restore)[:, 1:]  # row 0 is the class token's
    if mae.criterion.norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mean
    m = mask.unsqueeze(-1)
    masked = ops.unpatchify(target * (1 - m), p)
    reconstruction = ops.unpatchify(pred * m + target * (1 - m), p)
    return masked, reconstruction


def plot_rows(rows: list[tuple[str, np.ndarray]], path: Path, title: str) -> Path:
    """One row per (name, images [n, S, S, 3]) over the same test images, e.g. MAE's original,
    masked input and reconstruction, or colorization's original, lightness and colourised."""
    n = rows[0][1].shape[0]
    fig = Figure(figsize=(1.1 * n + 1.2, 1.3 * len(rows)), dpi=90, layout="constrained")
    axes = fig.subplots(len(rows), n, squeeze=False)
    for row, (name, images) in enumerate(rows):
        for j in range(n):
            axes[row, j].imshow(images[j])
            axes[row, j].set_xticks([])
            axes[row, j].set_yticks([])
        axes[row, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    return path


@torch.no_grad()
def cls_attention(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A timm VisionTransformer's last block: the class token's attention over the patch tokens,
    per head, softmax(q_cls k^T / sqrt(d)) -> [n, heads, h, w] (h x w: the patch grid)."""
    captured = {}
    attn = vit.blocks[-1].attn
    handle = attn.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))
    try:
        vit(images)
    finally:
        handle.remove()
    x = captured["x"]
    n, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(n, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]
    patches = weights[:, :, vit.num_prefix_tokens:]
    h = images.shape[-2] // vit.patch_embed.patch_size[0]
    w = images.shape[-1] // vit.patch_embed.patch_size[1]
    return patches.reshape(n, attn.num_heads, h, w)


def plot_attention(images: np.ndarray, maps: torch.Tensor, path: Path, title: str) -> Path:
    """One row per image: the image, then each head's class-token attention (brighter: more)."""
    n, heads = maps.shape[:2]
    size = images.shape[1]
    up = F.interpolate(maps.float().cpu(), size=(size, size), mode="nearest").numpy()
    fig = Figure(figsize=(1.3 * (heads + 1) + 0.3, 1.3 * n + 0.5), dpi=90, layout="constrained")
    axes = fig.subplots(n, heads + 1, squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i])
        for h in range(heads):
            axes[i, h + 1].imshow(up[i, h], cmap="inferno")
            if i == 0:
                axes[i, h + 1].set_title(f"head {h}", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    return path


def render_run(method, cfg, train_source, test_source, device: torch.device, out: Path, names: list[str],
               resize: int | None = None, log=None) -> list[Path]:
    """Every figure that applies to the run's method and encoder, written into `out`; returns the
    paths. Test images and the training memory bank are fixed subsamples (cfg.run.seed)."""
    from fastssl.models.backbones import is_vit
    from fastssl.models.mae import MaskedAutoencoderViT

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    images = RunImages(cfg, resize, device)
    encoder = method.encoder()
    tag = f"{cfg.method.name} {cfg.model.backbone}"
    written = []

    test_idx = subsample_indices(len(test_source), PCA_TEST_IMAGES, cfg.run.seed)
    test_idx = np.arange(len(test_source)) if test_idx is None else test_idx
    train_idx = subsample_indices(len(train_source), BANK_TRAIN_IMAGES, cfg.run.seed)
    train_idx = np.arange(len(train_source)) if train_idx is None else train_idx
    test_f, test_y = extract_features(encoder, images.loader(test_source, test_idx), device,
                                      cfg.model.channels_last, progress="test features")
    train_f, train_y = extract_features(encoder, images.loader(train_source, train_idx), device,
                                        cfg.model.channels_last, progress="train features")
    written.append(plot_pca(test_f, test_y, names, out / "features_pca.png",
                            f"{tag}: test features, first two principal components ({len(test_y)} images)"))

    # Queries: the first test image of each of N_QUERIES classes in the subsample (or the first images).
    firsts = [int(np.flatnonzero(test_y.numpy() == c)[0]) for c in np.unique(test_y.numpy())][:N_QUERIES]
    rows = firsts if len(firsts) == N_QUERIES else list(range(min(N_QUERIES, len(test_y))))
    k = min(N_NEIGHBOURS, len(train_y))
    sim = F.normalize(test_f[rows], dim=1) @ F.normalize(train_f, dim=1).T
    nearest = sim.topk(k, dim=1).indices
    query_images, _ = images.load(test_source, test_idx[rows])
    neighbour_images, _ = images.load(train_source, train_idx[nearest.flatten().numpy()])
    shown = images.display(neighbour_images)
    written.append(plot_neighbours(images.display(query_images), test_y[rows],
                                   shown.reshape(len(rows), k, *shown.shape[1:]), train_y[nearest], names,
                                   out / "neighbours.png", f"{tag}: nearest training images (cosine)"))

    sample, _ = images.load(test_source, test_idx[:N_SHOWN])
    mae = getattr(method, "model", None)
    if isinstance(mae, MaskedAutoencoderViT):
        masked, recon = mae_reconstructions(mae, sample, cfg.method.mask_ratio, cfg.run.seed)
        rows = [(name, images.display(x)) for name, x in
                (("original", sample), ("masked", masked), ("reconstruction\n+ visible", recon))]
        written.append(plot_rows(rows, out / "mae_reconstructions.png",
                                 f"{tag}: {cfg.method.mask_ratio:.0%} of the patches masked"))
    if hasattr(method, "colourise"):
        lightness = method.encoder().lightness(sample).mul(0.5).add(0.5).expand(-1, 3, -1, -1)
        rows = [("original", images.display(sample)), ("lightness\n(input)", _channels_last(lightness)),
                ("colourised", _channels_last(method.colourise(sample)))]
        written.append(plot_rows(rows, out / "colourised.png",
                                 f"{tag}: annealed mean, T = {cfg.method.decode_temperature}"))
    if is_vit(encoder):
        maps = cls_attention(encoder, sample[:4])
        written.append(plot_attention(images.display(sample[:4]), maps, out / "attention.png",
                                      f"{tag}: last block, class-token attention"))
    for path in written:
        log(f"viz: wrote {path}")
    return written
