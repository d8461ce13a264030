"""What `fastssl bench` runs, and the tools that describe the fused ops without a GPU.

Timed benchmarks (`fastssl bench NAME`, each also `python -m fastssl.bench.NAME`), every one
comparing the official formula (the ops' `*_ref`, through backend="torch"), torch.compile of it
and fastssl: `info_nce`, `contrastive` (CLIP and SigLIP), `dino` (DINO and multi-label losses),
`mae`, `queue` (KeyQueue push),
`train` (a training step of every method), `data` (DALI vs torchvision views), `checkpoint`
(step time with synchronous, asynchronous and no sharded checkpoints).

Models and plans, runnable on a CPU: `traffic` (bytes, kernels, FLOPs, peak memory and the
predicted time of each fused op; `fastssl bench --model`), `memory` (per-GPU bytes of DINO / MAE
ViT training steps, DDP vs FSDP; `fastssl bench --memory`), `step_launches` (kernel launches of
a training step per method, fused vs eager; also printed by `--model`), `counter` (the dispatch
counter they use). `harness` times and records; `report` writes RESULTS.md's tables from the rows in
`benchmarks/results/`; `kernel_cases` runs each kernel once (compute-sanitizer, ncu).

CPU studies: `presets` (every method's Fashion-MNIST preset), `demo_search` (MoCo v3's
Fashion-MNIST recipe search), `under_load` (MoCo v3's step on a busy CPU), `weak_study` (loss x sampling under
long-tailed noisy labels), `clip_demo` (CLIP on Fashion-MNIST with synthetic captions beside the
hashtag method), `time_to_accuracy` (a recipe trained for a wall-time budget, its kNN
over time and where the time went, optionally beside another tool run the same way).
"""

# `fastssl bench NAME` -> the module it runs, in the order `fastssl bench` runs them all
BENCHMARKS = {name: f"fastssl.bench.{name}"
              for name in ("info_nce", "contrastive", "dino", "mae", "queue", "train", "data",
                           "checkpoint")}
