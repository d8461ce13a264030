"""info_nce(exclude_self=True): SimCLR's NT-Xent through the InfoNCE kernels, against the
paper's formula (Chen et al. 2020, eq. 1) in float64. Interpreter shapes are tiny."""

import pytest
import torch
import torch.nn.functional as F

from fastssl.ops.info_nce import info_nce, info_nce_ref

F64 = torch.float64


def paper_nt_xent(query, key, T, offset, normalize=True):
    """ℓ_i = −log exp(s(i, t_i)/T) / Σ_{k ≠ own(i)} exp(s(i, k)/T), written as a loop over rows:
    own(i) = i + offset, t_i = the other view's column (i ± N/2) + offset."""
    if normalize:
        query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
    N = query.shape[0]
    losses = []
    for i in range(N):
        sims = key @ query[i] / T
        keep = torch.ones(key.shape[0], dtype=torch.bool)
        keep[i + offset] = False
        target = (i + N // 2) % N + offset
        losses.append(torch.logsumexp(sims[keep], 0) - sims[target])
    return torch.stack(losses)


def _inputs(N, M, offset, D, seed, shared):
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(M, D, generator=g, dtype=F64)
    # shared: the queries are the keys' own rows (one rank, or this rank's block of a gather)
    query = key[offset:offset + N].clone() if shared else torch.randn(N, D, generator=g, dtype=F64)
    return query, key, torch.rand(N, generator=g, dtype=F64)


@pytest.mark.parametrize("N,M,offset,T,normalize", [(6, 6, 0, 0.1, True), (4, 12, 4, 0.5, False),
                                                   (2, 129, 127, 0.2, True)])
def test_ref_matches_the_paper(N, M, offset, T, normalize):
    q, k, _ = _inputs(N, M, offset, 8, seed=N + M, shared=True)
    got = info_nce_ref(q, k, temperature=T, normalize=normalize, label_offset=offset, exclude_self=True,
                       reduction="none")
    torch.testing.assert_close(got, paper_nt_xent(q, k, T, offset, normalize), rtol=1e-12, atol=1e-12)


# (N, M, offset, D, T, normalize, shared): the keys of one rank (query is key), a 3-rank gather,
# a last split that holds only row 1's own column (M=129: splits [0,128) and [128,129)), query
# and key tiles of several blocks with two splits, unnormalized rows, D above one register tile.
CASES = [
    (6, 6, 0, 16, 0.1, True, True),
    (4, 12, 4, 16, 0.2, True, True),
    (2, 129, 127, 16, 0.2, True, True),
    (34, 160, 60, 24, 0.07, True, False),
    (8, 8, 0, 16, 0.5, False, True),
    (6, 6, 0, 40, 0.1, True, True),
]


# KEEP_P in bands (D=140: fp32 accumulator chunks), the workspace capped at one forward split (4
# queries x 128 fp32 columns, + their rescales): the 2 column splits and the 160 keys (bands of 128
# and 32) each run band by band, with the queries' own columns (126-129) across both bands.
BANDED = [(4, 160, 126, 140, 0.2, True, True)]
BANDED_CAP = 4 * (128 * 4 + 2 * 4)


@pytest.mark.parametrize("case", CASES + BANDED, ids=lambda c: "N{}-M{}-off{}-D{}-T{}-norm{}-shared{}".format(
    *c) + ("-banded" if c in BANDED else ""))
def test_kernel_fp32_matches_float64(case, device, kept_bands):
    N, M, offset, D, T, normalize, shared = case
    bands = kept_bands(BANDED_CAP) if case in BANDED else None
    q, k, w = _inputs(N, M, offset, D, seed=3 * N + M, shared=shared)
    kw = dict(temperature=T, normalize=normalize, label_offset=offset, exclude_self=True, reduction="none")

    def run(fn, dtype):
        qq = q.to(device, dtype).requires_grad_()
        kk = k.to(device, dtype).requires_grad_()
        loss = fn(qq, kk)
        gq, gk = torch.autograd.grad((loss * w.to(device, dtype)).sum(), [qq, kk])
        return loss.double().cpu(), gq.double().cpu(), gk.double().cpu()

    truth = run(lambda a, b: info_nce_ref(a, b, **kw), F64)
    torch.testing.assert_close(truth[0], paper_nt_xent(q, k, T, offset, normalize))
    got = run(lambda a, b: info_nce(a, b, **kw, backend="triton"), torch.float32)
    for name, g, t in zip(("loss", "dq", "dk"), got, truth):
        torch.testing.assert_close(g, t, rtol=2e-4, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert got[2][offset:offset + N].abs().sum() > 0  # the own rows still get gradient as keys of others
    if bands is not None:
        assert (bands["_info_nce_fwd_kernel"], bands["_info_nce_bwd_kernel"]) == (2, 2), bands


def test_same_tensor_as_query_and_key_sums_both_gradients(device):
    z64 = torch.randn(6, 16, dtype=F64, generator=torch.Generator().manual_seed(0))
    z = z64.float().to(device).requires_grad_()
    info_nce(z, z, temperature=0.1, exclude_self=True, backend="triton").backward()
    z64.requires_grad_()
    paper_nt_xent(z64, z64, 0.1, 0).mean().backward()
    torch.testing.assert_close(z.grad.double().cpu(), z64.grad, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(query=torch.randn(5, 8), key=torch.randn(5, 8)), "even N"),
    (dict(query=torch.randn(4, 8), key=torch.randn(4, 8), queue=torch.randn(7, 8)), "queue=None"),
    (dict(query=torch.randn(4, 8), key=torch.randn(4, 8), label_offset=1), "label_offset"),
])
def test_bad_input_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        info_nce(**kwargs, exclude_self=True)
    with pytest.raises(TypeError, match="exclude_self"):
        info_nce(torch.randn(4, 8), torch.randn(4, 8), exclude_self=1)
