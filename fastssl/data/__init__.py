"""Data: view recipes, sources and the loader (DALI pipelines or torchvision fallback)."""

from fastssl.data import recipes
from fastssl.data.loader import Loader, build_loader, resolve_loader, shard_indices
from fastssl.data.masking import BlockMasks, MaskingGenerator
from fastssl.data.recipes import Recipe, ViewSpec
from fastssl.data.remote import RemoteOptions
from fastssl.data.sampler import ResamplingSampler as ResamplingSampler  # labels API: fastssl.data.labels
from fastssl.data.shard_writer import write_shards
from fastssl.data.shards import ShardSource
from fastssl.data.sources import ArraySource, FileListSource, ImageFolderSource, fashion_mnist
from fastssl.data.spec import DataSplits, check_data_spec, data_splits

__all__ = ["ArraySource", "BlockMasks", "DataSplits", "FileListSource", "ImageFolderSource", "Loader",
           "MaskingGenerator", "Recipe", "RemoteOptions", "ShardSource", "ViewSpec", "build_loader",
           "check_data_spec", "data_splits", "fashion_mnist", "recipes", "resolve_loader", "shard_indices",
           "write_shards"]
