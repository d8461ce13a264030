"""KeyQueue.push vs the official MoCo enqueue, inside a loop of small matmuls.

The official pattern (moco/builder.py `_dequeue_and_enqueue`, also solo-learn, lightly,
VISSL, mmselfsup) is

    ptr = int(self.queue_ptr)              # device-to-host sync
    self.queue[:, ptr:ptr + batch] = keys.T
    self.queue_ptr[0] = (ptr + batch) % K

The sync makes the host wait for every kernel queued before it, so the launches of the
next step can no longer overlap the GPU's work. Each timed call runs `steps` steps of
`matmuls` small matmuls (a stand-in for the key encoder) followed by L2-normalize + enqueue
of the resulting keys. `matmuls=0` rows time the enqueue alone.

Providers: eager (official pattern, keys normalized by F.normalize first), compile
(torch.compile of encoder + normalize; the int() enqueue stays eager), fastssl (KeyQueue(normalize=True)
.push: one kernel normalizes, writes and advances the device-side pointer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl import KeyQueue
from fastssl.bench.harness import Case, compiled, parse_args, run


def make_providers(
    size: int, dim: int, batch: int, matmuls: int, steps: int, dtype: torch.dtype, device: str
) -> dict:
    # The official layout: queue [dim, K] and ptr [1] long, both buffers on the device.
    official_queue = F.normalize(torch.randn(dim, size, device=device), dim=0).to(dtype)
    official_ptr = torch.zeros(1, dtype=torch.long, device=device)
    fused = KeyQueue(size, dim, dtype=dtype, device=device, normalize=True)

    def encoder(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        for _ in range(matmuls):
            x = torch.tanh(x @ w)
        return x

    def keys_of(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.normalize(encoder(x, w), dim=1)

    def official_enqueue(keys: torch.Tensor) -> None:
        ptr = int(official_ptr)
        official_queue[:, ptr : ptr + batch] = keys.T
        official_ptr[0] = (ptr + batch) % size

    # torch.compile cannot trace through int(ptr) (a graph break that would also specialize
    # on every pointer value), so it compiles the encoder + normalize and the enqueue stays eager.
    compiled_keys_of = compiled(keys_of)

    def loop(step):
        def timed(x: torch.Tensor, w: torch.Tensor) -> None:
            for _ in range(steps):
                step(x, w)

        return timed

    return {
        "eager": loop(lambda x, w: official_enqueue(keys_of(x, w))),
        "compile": loop(lambda x, w: official_enqueue(compiled_keys_of(x, w))),
        "fastssl": loop(lambda x, w: fused.push(encoder(x, w))),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        # K, dim, batch, matmuls, steps, queue dtype
        settings = [(1024, 32, 64, 0, 4, torch.float32), (1024, 32, 64, 2, 4, torch.float32)]
    else:
        settings = [
            (65536, 128, 256, 0, 20, torch.float32),
            (65536, 128, 256, 4, 20, torch.float32),
            (65536, 128, 1024, 4, 20, torch.float32),
            (65536, 256, 256, 4, 20, torch.bfloat16),
            (131072, 128, 4096, 0, 20, torch.float32),
        ]
    cases = []
    for size, dim, batch, matmuls, steps, dtype in settings:
        def make_inputs(batch=batch, dim=dim):
            x = torch.randn(batch, dim, device=device)
            w = torch.randn(dim, dim, device=device) / dim**0.5
            return x, w

        # Enqueue traffic: read fp32 keys, write queue rows (only meaningful for matmuls=0).
        moved = steps * batch * dim * (4 + torch.finfo(dtype).bits // 8) if matmuls == 0 else None
        cases.append(
            Case(
                name=f"K{size}-D{dim}-B{batch}-mm{matmuls}",
                params={"K": size, "dim": dim, "batch": batch, "matmuls": matmuls, "steps": steps,
                        "dtype": str(dtype).replace("torch.", "")},
                make_inputs=make_inputs,
                providers=make_providers(size, dim, batch, matmuls, steps, dtype, device),
                bytes_moved=moved,
            )
        )
    run("queue_push", cases, args)


if __name__ == "__main__":
    main()
