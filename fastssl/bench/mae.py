"""MAE token path: random masking + decoder unshuffle + masked pixel loss, forward and backward.

One timed call is what an MAE step does around its encoder and decoder (He et al. 2021,
facebookresearch/mae `random_masking`, `forward_decoder`, `forward_loss`), with the
networks left out: x [N, L, D] -> add the (fixed) positional embedding and keep 25% ->
rebuild [N, L, D] with the mask token ->
loss against a target [N, L, D] (the decoder output is taken as the prediction, P = D) ->
gradients to x and to the mask token.

Providers: eager (the official code path: the ops with backend="torch", i.e. their `*_ref` in
fastssl/ops/mae.py - x + pos_embed,
noise from torch.rand, two argsorts, gathers through a `repeat`-built N x L x D int64 index, cat of mask
tokens, the loss as separate passes in fp32), compile (torch.compile of it), fastssl
(random_masking / unshuffle_tokens / mae_loss: one sort, row-indexed gather/scatter kernels
with the pos-embed add fused into the gather, fused mask-token fill, one-pass loss forward and backward).

Bytes moved, the least any implementation of this chain must touch (K = L / 4 kept tokens,
b bytes per element; index and mask traffic of N x L elements and the pos-embed rows, shared by
all samples and served from cache, left out):
masking fwd 2K, unshuffle fwd K + L, loss fwd 2L, loss bwd 3L, unshuffle bwd L + K,
masking bwd K + L rows of D: (5K + 8L) * N * D * b.
"""

from __future__ import annotations

import torch

from fastssl.bench.harness import Case, compiled, parse_args, run
from fastssl.ops import mae_loss, random_masking, unshuffle_tokens

MASK_RATIO = 0.75


def _step(backend: str):
    def step(x: torch.Tensor, pos_embed: torch.Tensor, mask_token: torch.Tensor, target: torch.Tensor):
        x_kept, mask, ids_restore = random_masking(x, MASK_RATIO, pos_embed=pos_embed, backend=backend)
        pred = unshuffle_tokens(x_kept, mask_token, ids_restore, backend=backend)
        loss = mae_loss(pred, target, mask, norm_pix_loss=True, backend=backend)
        return torch.autograd.grad(loss, (x, mask_token))

    return step


official_step, fastssl_step = _step("torch"), _step("auto")


def make_case(N: int, L: int, D: int, dtype: torch.dtype, device: str) -> Case:
    def make_inputs():
        x = torch.randn(N, L, D, device=device, dtype=dtype, requires_grad=True)
        pos_embed = torch.randn(1, L, D, device=device, dtype=dtype)  # MAE's is a fixed sin-cos buffer
        mask_token = (0.02 * torch.randn(D, device=device, dtype=dtype)).requires_grad_()
        target = torch.randn(N, L, D, device=device, dtype=dtype)
        return x, pos_embed, mask_token, target

    K = int(L * (1 - MASK_RATIO))
    element = torch.finfo(dtype).bits // 8
    return Case(
        name=f"mask+unshuffle+loss N{N} L{L} D{D}",
        params={"N": N, "L": L, "D": D, "dtype": str(dtype).replace("torch.", "")},
        make_inputs=make_inputs,
        providers={"eager": official_step, "compile": compiled(official_step), "fastssl": fastssl_step},
        bytes_moved=(5 * K + 8 * L) * N * D * element,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.quick or not cuda:
        shapes = [(4, 16, 32)] if args.quick else [(16, 196, 256)]
    else:
        shapes = [(256, 196, 1024), (1024, 196, 768), (256, 784, 1024)]
    dtype = torch.bfloat16 if cuda else torch.float32
    run("mae", [make_case(N, L, D, dtype, device) for N, L, D in shapes], args)


if __name__ == "__main__":
    main()
