"""Augmented views per second: DALI vs torchvision on the same CPU threads.

Cases: MoCo v2 two views and DINO multi-crop (2 x 224 + 10 x 96) from a folder of real
JPEGs (Fashion-MNIST upscaled to 256 x 256 and JPEG-encoded into a temporary ImageFolder,
or smooth synthetic images where the Debian package is missing), and the CPU demo's
setting: MoCo v2 and DINO recipes at 32 x 32 on in-memory Fashion-MNIST.

One timed call pulls the next batch from a running loader (epochs loop), so times are
per batch at steady state. Providers, all with `--threads` workers/threads:
  eager        the official repos' loader: torchvision ImageFolder / PIL images with
               torchvision.transforms (v1, PIL ops) built from the recipe, in a DataLoader
               (as MoCo's main_moco.py and DINO's DataAugmentationDINO do);
  torchvision  fastssl.data.build_loader(loader="torchvision"): transforms.v2 on uint8
               tensors, batched normalization;
  fastssl      fastssl.data.build_loader(loader="dali"): device "gpu" when CUDA is present,
               else DALI's CPU-only mode (absent from the table when DALI is not installed).
Images/s and views/s per provider are printed after the timing table.

`--shards`: the same JPEGs as an image folder and as WebDataset shards (fastssl.data
write_shards, 128 images per shard), MoCo v2 views, each backend with 1, 2 and 4 threads:
sustained images/s over `--iters` batches after 3 warm-up batches. On a GPU machine it prints
images/s; on a CPU only ratios (shards / folder at the same threads, and / 1 thread).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from fastssl.bench.harness import Case, environment, run
from fastssl.data import ArraySource, ImageFolderSource, Recipe, ShardSource, ViewSpec, build_loader, recipes
from fastssl.data.dali import HAS_DALI
from fastssl.data.shard_writer import write_shards
from fastssl.data.sources import fashion_mnist


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for data.md and data.jsonl")
    parser.add_argument("--quick", action="store_true", help="tiny images and few iterations (smoke run)")
    parser.add_argument("--iters", type=int, default=None, help="timed batches per provider (default 10)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                        help="DALI threads = DataLoader workers")
    parser.add_argument("--shards", action="store_true", help="shards vs folders at 1, 2, 4 threads")
    return parser.parse_args(argv)


class _PilBlur:
    """PIL Gaussian blur with sigma uniform in [lo, hi] (MoCo v2 / DINO repos)."""

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(*self.sigma)))


def official_view(v: ViewSpec, recipe: Recipe) -> transforms.Compose:
    """The recipe's view as the official repos write it: v1 transforms on PIL images."""
    if v.crop == "center":
        ops = [transforms.Resize(v.resize_to), transforms.CenterCrop(v.size)]
    else:
        ops = [transforms.RandomResizedCrop(v.size, scale=v.scale, ratio=v.ratio),
               transforms.RandomHorizontalFlip(v.flip_p)]
        if v.jitter_p > 0:
            ops.append(transforms.RandomApply([transforms.ColorJitter(*v.jitter)], p=v.jitter_p))
        if v.grayscale_p > 0:
            ops.append(transforms.RandomGrayscale(v.grayscale_p))
        if v.blur_p > 0:
            ops.append(transforms.RandomApply([_PilBlur(v.blur_sigma)], p=v.blur_p))
        if v.solarize_p > 0:
            ops.append(transforms.RandomSolarize(128, p=v.solarize_p))
    return transforms.Compose([*ops, transforms.ToTensor(), transforms.Normalize(recipe.mean, recipe.std)])


class _MultiView:
    def __init__(self, recipe: Recipe):
        self.views = [official_view(v, recipe) for v in recipe.views]

    def __call__(self, img):
        return [t(img) for t in self.views]


class _PilArrays(Dataset):
    """In-memory uint8 images as RGB PIL images (as torchvision.datasets.FashionMNIST + convert)."""

    def __init__(self, source: ArraySource, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.source.image(i))), int(self.source.labels[i])


def _forever(make_loader):
    loader = make_loader()  # built on first use, then kept (with its workers) across epochs
    while True:
        yield from loader


def _puller(make_loader):
    """A provider: each call takes the next batch of a loader that keeps running."""
    state = {}

    def pull():
        if "it" not in state:
            state["it"] = _forever(make_loader)
        batch = next(state["it"])
        views = batch["views"] if isinstance(batch, dict) else batch[0]
        if torch.cuda.is_available():
            views = [v.cuda(non_blocking=True) for v in views]
            torch.cuda.synchronize()
        return views

    return pull


def _images(n: int, side: int) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        src = fashion_mnist("train")
        small, labels, origin = src.images[:n], src.labels[:n], "Fashion-MNIST"
    except FileNotFoundError:
        # Smooth synthetic images (JPEG-friendly like photos, unlike noise) where the data is missing.
        yy, xx = np.mgrid[0:28, 0:28] / 27.0
        rng = np.random.default_rng(0)
        freq = rng.uniform(1, 6, (n, 2))
        phase = freq[:, :1, None] * 3 * xx + freq[:, 1:, None] * 3 * yy
        small = (127.5 * (1 + np.sin(phase))).astype(np.uint8)
        labels, origin = rng.integers(0, 10, n), "synthetic"
    if side == 28:
        return small, labels, origin
    big = np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.BICUBIC)) for im in small])
    return big, labels, origin


def _jpeg_folder(root: Path, n: int, side: int) -> str:
    images, labels, origin = _images(n, side)
    for k, (im, label) in enumerate(zip(images, labels)):
        (root / str(label)).mkdir(exist_ok=True)
        Image.fromarray(im).convert("RGB").save(root / str(label) / f"{k:05d}.jpg", quality=90)
    return origin


def make_case(name: str, recipe: Recipe, source, official_dataset, batch: int, threads: int) -> Case:
    device = "gpu" if torch.cuda.is_available() else "cpu"
    loader_args = dict(batch_size=batch, num_threads=threads, device=device)
    providers = {
        "eager": _puller(lambda: DataLoader(official_dataset, batch_size=batch, shuffle=True, drop_last=True,
                                            num_workers=threads, persistent_workers=True)),
        "torchvision": _puller(lambda: build_loader(source, recipe, loader="torchvision", **loader_args)),
    }
    if HAS_DALI:
        providers["fastssl"] = _puller(lambda: build_loader(source, recipe, loader="dali", **loader_args))
    return Case(name=name, params={"batch": batch, "views": recipe.num_views, "threads": threads},
                make_inputs=tuple, providers=providers)


def _sustained(loader, iters: int) -> float:
    """Images/s over `iters` batches after 3 warm-up batches, across epoch ends."""
    it = _forever(lambda: loader)
    for _ in range(3):
        next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(iters):
        n += next(it)["views"][0].shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def shards_vs_folders(args: argparse.Namespace) -> None:
    n_files, side, size, batch = (64, 48, 32, 16) if args.quick else (512, 256, 224, 32)
    gpu = torch.cuda.is_available()
    backends = (["dali"] if HAS_DALI else []) + ["torchvision"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "folder").mkdir()
        origin = _jpeg_folder(Path(tmp) / "folder", n_files, side)
        folder = ImageFolderSource(Path(tmp) / "folder")
        write_shards(folder, Path(tmp) / "shards", shard_size=128, class_names=folder.classes)
        sources = {"folder": folder, "shards": ShardSource(Path(tmp) / "shards")}
        rate = {}
        for backend in backends:
            for threads in (1, 2, 4):
                for kind, source in sources.items():
                    recipe = recipes.mocov2(size=size)
                    loader = build_loader(source, recipe, batch_size=batch, loader=backend,
                                          device="gpu" if gpu else "cpu", num_threads=threads)
                    rate[backend, threads, kind] = _sustained(loader, args.iters)
                    del loader
    env = environment()
    print(f"{env['device']} · torch {env['torch']} · DALI {'yes' if HAS_DALI else 'no'} · "
          f"git {env['git_sha']} · {env['date']}")
    print(f"MoCo v2 {size}px views, batch {batch}, {n_files} JPEGs of {side}px ({origin}), "
          f"{args.iters} batches")
    head = "| backend | threads | " + ("folder img/s | shards img/s | " if gpu else "")
    print(head + "shards / folder | folder / 1 thread | shards / 1 thread |")
    print("|---" * (head.count("|") + 2) + "|")
    for backend in backends:
        for threads in (1, 2, 4):
            f, s = rate[backend, threads, "folder"], rate[backend, threads, "shards"]
            f1, s1 = rate[backend, 1, "folder"], rate[backend, 1, "shards"]
            absolute = f"{f:.0f} | {s:.0f} | " if gpu else ""
            print(f"| {backend} | {threads} | {absolute}{s / f:.2f} | {f / f1:.2f} | {s / s1:.2f} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.shards:
        if args.iters is None:
            args.iters = 4 if args.quick else 20
        shards_vs_folders(args)
        return
    threads = args.threads
    if args.iters is None:
        # Data loading is CPU-bound even on a GPU machine: 10 steady-state batches suffice.
        args.iters = 3 if args.quick else 10
    n_files, side, big, small_view, batch, tiny_batch = (
        (32, 48, 48, 24, 16, 16) if args.quick else (512, 256, 224, 96, 32, 128)
    )
    with tempfile.TemporaryDirectory() as tmp:
        origin = _jpeg_folder(Path(tmp), n_files, side)
        folder = ImageFolderSource(tmp)
        fmnist_images, fmnist_labels, _ = _images(512 if args.quick else 8192, 28)
        arrays = ArraySource(fmnist_images, fmnist_labels)
        cases = []
        for name, recipe, source, bs in [
            (f"MoCo v2 {big}px, JPEG folder ({origin})", recipes.mocov2(size=big), folder, batch),
            (f"DINO 2x{big}+10x{small_view}, JPEG folder ({origin})",
             recipes.dino(global_size=big, local_crop_size=small_view, n_local_crops=10), folder, batch),
            ("MoCo v2 32px, in-memory Fashion-MNIST", recipes.mocov2(size=32), arrays, tiny_batch),
            ("DINO 2x32+6x16, in-memory Fashion-MNIST", recipes.dino(32, 16, 6), arrays, tiny_batch),
        ]:
            official = (datasets.ImageFolder(tmp, transform=_MultiView(recipe)) if source is folder
                        else _PilArrays(source, _MultiView(recipe)))
            cases.append(make_case(name, recipe, source, official, bs, threads))
        rows = run("data", cases, args)
    print("| case | provider | images/s | views/s |\n|---|---|---|---|")
    for r in rows:
        if "ms" in r:
            ips = r["batch"] / r["ms"] * 1e3
            print(f"| {r['case']} | {r['provider']} | {ips:.0f} | {ips * r['views']:.0f} |")


if __name__ == "__main__":
    main()
