"""Each fastssl method's nearest method in a peer tool, for `fastssl.bench.time_to_accuracy --peer`.

A PeerMethod names the peer's method, the modules of its training step timed as fastssl's
Method.forward is, and the peer's arguments that make the two runs comparable: fastssl's views
(crop sizes, crop scales, crop counts) and batch (passed by the caller), the peer's own defaults
for everything else (optimizer, schedule, head, temperatures, colour augmentations).

lightly-train 0.18.0 (`lightly_train.train(method=..., transform_args=...)`):
- simclr -> `simclr` (SimCLR; also MoCo v3, the nearest method it has: two views,
  an InfoNCE loss over a projection head). transform_args: image_size and random_resize
  (min_scale, max_scale) = fastssl's global views.
  Its SimCLR has no local crops: with fastssl's n_local_crops > 0 it runs the two global views.
- dino -> `dino` (DINO: teacher EMA over the 2 global views, student over all, centred teacher
  softmax). transform_args: image_size and random_resize (min_scale, max_scale) = fastssl's
  global crops; local_view = fastssl's local crops (num_views, view_size, random_resize
  min_scale/max_scale), or None with no local crops. Its defaults kept (not fastssl's preset):
  SGD lr 0.03 scaled by batch / 256, weight decay 1e-4, gradient norm clipped to 3, the head
  2048 -> 256 wide, and what it scales to the data set's size (for Fashion-MNIST's 60,000 images:
  4096 prototypes, teacher temperature 0.02 from the first step, teacher momentum 0.99 -> 1); the
  head's last layer frozen for the first 1250 steps (2.7 epochs at batch 128). Its export is the
  teacher's backbone, the network fastssl's DINO evaluates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PeerMethod:
    name: str  # the peer's method name
    forward_modules: tuple[str, ...]  # class names of the modules its training step runs
    defaults: Callable  # (cfg, views: list[ViewSpec]) -> the peer's arguments


def _crop(view) -> dict:
    return {"min_scale": view.scale[0], "max_scale": view.scale[1]}


def _simclr_args(cfg, views) -> dict:
    first = views[0]
    return {"transform_args": {"image_size": [first.size, first.size], "random_resize": _crop(first)}}


def _dino_args(cfg, views) -> dict:
    first, local = views[0], views[2:]
    local_view = None
    if local:
        local_view = {
            "num_views": len(local),
            "view_size": [local[0].size, local[0].size],
            "random_resize": _crop(local[0]),
        }
    return {
        "transform_args": {
            "image_size": [first.size, first.size],
            "random_resize": _crop(first),
            "local_view": local_view,
        }
    }


_SIMCLR = PeerMethod("simclr", ("EmbeddingModel", "SimCLRProjectionHead", "NTXentLoss"), _simclr_args)
PEER_METHODS = {
    "lightly-train": {
        "simclr": _SIMCLR,
        "mocov3": _SIMCLR,
        "dino": PeerMethod("dino", ("EmbeddingModel", "DINOProjectionHead", "DINOLoss"), _dino_args),
    }
}


def peer_method(peer: str, method: str) -> PeerMethod:
    """The peer's method for fastssl's `method`; a one-line error naming --method and --peer without one."""
    methods = PEER_METHODS.get(peer)
    if methods is None:
        raise ValueError(f"--peer {peer}: expected one of {sorted(PEER_METHODS)}")
    if method not in methods:
        raise ValueError(
            f"--method {method} --peer {peer}: {peer} has no method to compare with {method}; "
            f"expected --method in {sorted(methods)}"
        )
    return methods[method]
