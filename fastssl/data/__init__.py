"""Data: view recipes, sources and the loader (DALI pipelines or torchvision fallback)."""

from fastssl.data import recipes
from fastssl.data.loader import Loader, build_loader, shard_indices
from fastssl.data.recipes import Recipe, ViewSpec
from fastssl.data.sampler import ResamplingSampler as ResamplingSampler  # labels API: fastssl.data.labels
from fastssl.data.sources import ArraySource, FileListSource, ImageFolderSource, fashion_mnist

__all__ = ["ArraySource", "FileListSource", "ImageFolderSource", "Loader", "Recipe", "ViewSpec",
           "build_loader", "fashion_mnist", "recipes", "shard_indices"]
