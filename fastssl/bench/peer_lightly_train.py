"""lightly-train's method on fastssl's backbone, for `fastssl.bench.time_to_accuracy --peer lightly-train`.

Run by the interpreter of the environment where lightly-train is installed with its timm extra
(`pip install 'lightly-train[timm]==0.18.0'`: fastssl's backbones module imports timm; never fastssl's own),
with this checkout on PYTHONPATH, as `python -m fastssl.bench.peer_lightly_train '<request JSON>'`;
the request names out, data (an image folder), method (lightly-train's), forward_modules (the class
names of the modules its training step runs), backbone, image_size, epochs, batch_size and
train_args (extra keyword arguments of lightly_train.train; fastssl.bench.peer_methods builds them).
The network is fastssl.models.build_backbone's module, passed through lightly-train's custom-model
wrapper (get_model, forward_features, forward_pool, feature_dim); writes OUT/backbone.pt (its state
dict after training: lightly-train's export of that module) and OUT/peer_result.json.
Timed as fastssl's run is: the forward of the method's modules (embedding models, projection heads,
loss), each optimizer.step (Lightning runs forward and backward inside it) and the update alone
(from the first layer's gradient, the end of backward, to the step's end). That layer is found in
the optimizer at its first step: DINO trains a copy of the module it is given (the given one is
its teacher, which gets no gradient), SimCLR the module itself.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from fastssl.bench.time_to_accuracy import StepTimers


class PooledBackbone(torch.nn.Module):
    """lightly-train's custom-model interface over a backbone that already returns pooled [B, F]."""

    def __init__(self, model: torch.nn.Module, dim: int):
        super().__init__()
        self._model, self._dim = model, dim

    def get_model(self) -> torch.nn.Module:
        return self._model

    def forward_features(self, x: torch.Tensor) -> dict:
        return {"features": self._model(x)[:, :, None, None]}

    def forward_pool(self, x: dict) -> dict:
        return {"pooled_features": x["features"]}

    def feature_dim(self) -> int:
        return self._dim


def watch_trained_first_layer(timers: StepTimers, first: torch.nn.Parameter) -> None:
    """At the first optimizer step, before its closure runs backward: time the end of backward at the
    first trained parameter shaped as the backbone's first (`first` itself, or the trained copy of it)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def found(optimizer, args, kwargs):
        handle.remove()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.shape == first.shape]
        timers.watch_backward_end(params[0])

    handle = register_optimizer_step_pre_hook(found)


def main(request: dict) -> int:
    try:
        import lightly_train

        from fastssl.models.backbones import build_backbone  # needs timm: lightly-train's [timm] extra
    except ImportError as exc:
        print(
            f"peer lightly-train: this interpreter ({sys.executable}) cannot import lightly_train with its "
            f"timm extra ({exc}); pass --peer-python of the environment where `pip install "
            f"'lightly-train[timm]==0.18.0'` installed it",
            file=sys.stderr,
        )
        return 2
    out = Path(request["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    backbone, dim = build_backbone(request["backbone"], request["image_size"])
    timed = set(request["forward_modules"])
    timers = StepTimers(lambda module: type(module).__name__ in timed)
    watch_trained_first_layer(timers, next(backbone.parameters()))
    lightly_train.train(
        out=str(out / "lightly_train"),
        data=request["data"],
        model=PooledBackbone(backbone, dim),
        method=request["method"],
        epochs=request["epochs"],
        batch_size=request["batch_size"],
        overwrite=True,
        **request["train_args"],
    )
    result = timers.result()
    exported = out / "lightly_train" / "exported_models" / "exported_last.pt"
    state = torch.load(exported, weights_only=True) if exported.is_file() else backbone.state_dict()
    torch.save(state, out / "backbone.pt")
    train_s = result["step_ends_s"][-1] - result["first_step_start_s"] if result["step_ends_s"] else 0.0
    (out / "peer_result.json").write_text(
        json.dumps(
            {
                "version": lightly_train.__version__,
                "step_ends_s": result["step_ends_s"],
                "step_s": result["optimizer_s"],
                "forward_s": result["forward_s"],
                "update_s": result["update_s"],
                "train_s": train_s,
                "finished_s": time.perf_counter() - timers.t0,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
