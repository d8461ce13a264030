"""A tiny DINO run as torchrun starts it (not a test module): the Trainer joins the process
group from torchrun's environment, each rank loads its shard of the global batch of 8, and
rank R saves its losses and gathered parameters to OUT/rankR.pt. Used by test_multinode."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ssl_tiny import SIZES, MultiViewLoader, full_state, record_losses, tiny_method  # noqa: E402

from fastssl.engine import Trainer  # noqa: E402

out = sys.argv[1]
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
method = tiny_method("dino", f"{out}/run", max_steps=2, optimizer="sgd", momentum=0.9)
losses = record_losses(method)
trainer = Trainer(method, MultiViewLoader(SIZES["dino"], shard_id=rank, num_shards=world), progress=False,
                  log=lambda m: None)
trainer.fit()
torch.save({"losses": losses, "state": full_state(method), "world": world,
            "local_world": int(os.environ.get("LOCAL_WORLD_SIZE", 1))}, f"{out}/rank{rank}.pt")
if dist.is_initialized():
    dist.destroy_process_group()
