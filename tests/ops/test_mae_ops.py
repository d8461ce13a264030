"""MAE ops against references written here from the official code's behaviour
(facebookresearch/mae: random_masking, forward_decoder, forward_loss, patchify), in float64,
on both backends ("triton" runs the kernels under TRITON_INTERPRET=1 on CPU). The masking's
randomness: test_mae_masking_randomness.py."""


import pytest
import torch
from grad_compare import compare, mae_pipeline

from fastssl.ops import mae
from fastssl.ops.mae import mae_loss, patchify, random_masking, unpatchify, unshuffle_tokens

BACKENDS = ("torch", "triton")


# --- references: per-row Python, the official functions' behaviour stated directly -------------

def official_masking(x, mask_ratio, noise):
    """Sort tokens by noise (ascending); keep the first int(L (1 - r)) in that order; mask marks
    the others (1) in the original order; ids_restore[l] = the rank of token l."""
    N, L, _ = x.shape
    len_keep = int(L * (1 - mask_ratio))
    kept, mask, ids_restore = [], torch.ones(N, L, dtype=x.dtype), torch.empty(N, L, dtype=torch.int64)
    for n in range(N):
        order = sorted(range(L), key=lambda l: noise[n, l].item())
        kept.append(x[n, order[:len_keep]])
        mask[n, order[:len_keep]] = 0
        ids_restore[n, order] = torch.arange(L)
    return torch.stack(kept), mask, ids_restore


def official_unshuffle(x_kept, mask_token, ids_restore):
    """Append L - len_keep mask tokens to each row's kept tokens, then reorder by ids_restore."""
    N, K, D = x_kept.shape
    L = ids_restore.shape[1]
    tokens = mask_token.reshape(1, D).expand(L - K, D)
    return torch.stack([torch.cat([x_kept[n], tokens])[ids_restore[n]] for n in range(N)])


def official_loss(pred, target, mask, norm_pix_loss):
    """The formula, run in the inputs' own dtype (no upcast)."""
    if norm_pix_loss:
        mu = target.mean(-1, keepdim=True)
        var = ((target - mu) ** 2).sum(-1, keepdim=True) / (target.shape[-1] - 1)
        target = (target - mu) / torch.sqrt(var + 1e-6)
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


# --- random_masking + unshuffle_tokens: identity and gradients, fp64 -----------------------------

@pytest.mark.parametrize("L", [4, 49, 196, 197])
@pytest.mark.parametrize("D", [8, 100, 768])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_and_unshuffle_match_official(L, D, ratio, device):
    N = 2
    gen = torch.Generator().manual_seed(L * 1000 + D + int(ratio * 100))
    x = torch.randn(N, L, D, dtype=torch.float64, generator=gen)
    noise = torch.randperm(N * L, generator=gen).reshape(N, L).double()  # distinct: no ties
    token = torch.randn(D, dtype=torch.float64, generator=gen)
    if int(L * (1 - ratio)) == 0:
        for backend in BACKENDS:
            with pytest.raises(ValueError, match="keeps"):
                random_masking(x, ratio, noise=noise, backend=backend)
        return
    x_kept_ref, mask_ref, ids_ref = official_masking(x, ratio, noise)
    xr, tr = x.clone().requires_grad_(), token.clone().requires_grad_()
    out_ref = official_unshuffle(official_masking(xr, ratio, noise)[0], tr, ids_ref)
    grad_out = torch.randn(N, L, D, dtype=torch.float64, generator=gen)
    gx_ref, gt_ref = torch.autograd.grad(out_ref, (xr, tr), grad_out)
    for backend in BACKENDS:
        xb, tb = x.to(device).requires_grad_(), token.to(device).requires_grad_()
        x_kept, mask, ids_restore = random_masking(xb, ratio, noise=noise.to(device), backend=backend)
        assert mask.dtype == x.dtype and ids_restore.dtype == torch.int64
        assert torch.equal(x_kept.cpu(), x_kept_ref) and torch.equal(mask.cpu(), mask_ref)
        assert torch.equal(ids_restore.cpu(), ids_ref)
        out = unshuffle_tokens(x_kept, tb, ids_restore, backend=backend)
        assert torch.equal(out.cpu(), out_ref)
        gx, gt = torch.autograd.grad(out, (xb, tb), grad_out.to(device))
        assert torch.equal(gx.cpu(), gx_ref)  # pure copies: exact, zeros at removed tokens
        torch.testing.assert_close(gt.cpu(), gt_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_copies_are_exact_and_token_grad_accumulates_in_fp32(dtype, device):
    N, L, D = 3, 197, 100
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, L, D, generator=gen).to(device, dtype).requires_grad_()
    token = torch.randn(1, 1, D, generator=gen).to(device).requires_grad_()  # an fp32 parameter (autocast)
    seeded = torch.Generator(device).manual_seed(1)
    x_kept, mask, ids = random_masking(x, 0.75, generator=seeded, backend="triton")
    out = unshuffle_tokens(x_kept, token, ids, backend="triton")
    assert out.dtype == dtype and mask.dtype == dtype
    # sorting tokens by their rank ids_restore[n, l] replays the op's shuffle order
    ids, mask = ids.cpu(), mask.cpu()
    kept_ref = official_masking(x.detach().cpu(), 0.75, ids.double())[0]
    assert torch.equal(out.cpu(), official_unshuffle(kept_ref, token.detach().cpu().to(dtype), ids))
    grad_out = torch.randn(N, L, D, generator=gen).to(dtype)
    gx, gt = (g.cpu() for g in torch.autograd.grad(out, (x, token), grad_out.to(device)))
    assert gt.dtype == torch.float32 and gt.shape == token.shape
    truth = (grad_out.double() * mask.double()[..., None]).sum((0, 1))
    err = (gt.double().reshape(D) - truth).abs().max().item()
    # the kernel sums in fp32 and rounds once to `dtype` (a sum in bf16 would be far off)
    rounding = 2**-8 if dtype == torch.bfloat16 else 2**-11 if dtype == torch.float16 else 2**-20
    assert err <= 2 * rounding * truth.abs().max().item() + 1e-4, err
    assert torch.equal(gx, grad_out * (1 - mask)[..., None])


def test_noncontiguous_inputs_and_expanded_grads(device):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(5, 2, 33, dtype=torch.float64, generator=gen).to(device)
    x = base.transpose(0, 2).requires_grad_()  # [33, 2, 5], strided view
    noise = torch.rand(33, 2, dtype=torch.float64, generator=gen).to(device)
    token = torch.randn(5, dtype=torch.float64, generator=gen).to(device).requires_grad_()
    grads = []
    for backend in BACKENDS:
        x_kept, _, ids = random_masking(x, 0.5, noise=noise, backend=backend)
        out = unshuffle_tokens(x_kept, token, ids, backend=backend)
        grads.append(torch.autograd.grad(out.sum(), (x, token)))  # .sum() gives a stride-0 grad
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert torch.equal(grads[1][1].cpu(), torch.full((5,), 33.0, dtype=torch.float64))  # 33 rows x 1 removed


def test_encoder_gather_reads_the_patch_embedding_layout_and_writes_the_class_token(device):
    """The official encoder: x + pos, masking, cat([cls + pos0, x_kept]); x a transposed view
    (timm's PatchEmbed: conv output .flatten(2).transpose(1, 2)); its gradient keeps that layout."""
    N, L, D = 3, 17, 24
    gen = torch.Generator().manual_seed(21)
    conv_out = torch.randn(N, D, L, dtype=torch.float64, generator=gen)
    pos = torch.randn(L, D, dtype=torch.float64, generator=gen)
    cls = torch.randn(1, 1, D, dtype=torch.float64, generator=gen)
    noise = torch.rand(N, L, dtype=torch.float64, generator=gen)
    weight = torch.randn(N, 1 + 8, D, dtype=torch.float64, generator=gen)
    xr, cr = conv_out.transpose(1, 2).clone().requires_grad_(), cls.clone().requires_grad_()
    kept, mask, ids = official_masking(xr + pos, 0.5, noise)
    want = torch.cat([cr.expand(N, 1, D), kept], dim=1)
    want_gx, want_gc = torch.autograd.grad((want * weight).sum(), (xr, cr))
    for backend in BACKENDS:
        x = conv_out.clone().to(device).requires_grad_()
        c = cls.clone().to(device).requires_grad_()
        xt = x.transpose(1, 2)
        assert not xt.is_contiguous()
        got, got_mask, got_ids = random_masking(xt, 0.5, noise=noise.to(device), pos_embed=pos.to(device),
                                                cls_token=c, backend=backend)
        assert torch.equal(got.cpu(), want) and torch.equal(got_mask.cpu(), mask)
        assert torch.equal(got_ids.cpu(), ids)
        gx, gc = torch.autograd.grad((got * weight.to(device)).sum(), (x, c))
        assert torch.equal(gx.cpu(), want_gx.transpose(1, 2))
        assert backend == "torch" or gx.is_contiguous()  # [N, D, L] memory, as the convolution wrote x
        torch.testing.assert_close(gc.cpu(), want_gc, rtol=0, atol=1e-12)


def test_decoder_unshuffle_fuses_class_token_and_pos_embed_on_a_sliced_input(device):
    """The official decoder: cat(x[:, 1:], mask tokens), gather, cat(x[:, :1], .), + pos, on a
    sliced (non-contiguous) x; the stride-0 gradient of .sum() and a weighted one."""
    N, K, L, D = 4, 5, 13, 20
    gen = torch.Generator().manual_seed(22)
    wide = torch.randn(N, 1 + K, 2 * D, dtype=torch.float64, generator=gen)
    token = torch.randn(D, dtype=torch.float64, generator=gen)
    pos = torch.randn(1, 1 + L, D, dtype=torch.float64, generator=gen)
    ids = torch.stack([torch.randperm(L, generator=gen) for _ in range(N)])
    weight = torch.randn(N, 1 + L, D, dtype=torch.float64, generator=gen)
    xr, tr = wide[..., 3:3 + D].clone().requires_grad_(), token.clone().requires_grad_()
    want = torch.cat([xr[:, :1], official_unshuffle(xr[:, 1:], tr, ids)], dim=1) + pos
    want_g = torch.autograd.grad((want * weight).sum(), (xr, tr))
    for backend in BACKENDS:
        w = wide.clone().to(device).requires_grad_()
        t = token.clone().to(device).requires_grad_()
        x = w[..., 3:3 + D]
        assert not x.is_contiguous()
        out = unshuffle_tokens(x, t, ids.to(device), pos_embed=pos.to(device), with_cls_token=True,
                               backend=backend)
        torch.testing.assert_close(out.cpu(), want, rtol=0, atol=1e-15)
        gw, gt = torch.autograd.grad((out * weight.to(device)).sum(), (w, t))
        assert torch.equal(gw[..., 3:3 + D].cpu(), want_g[0]) and not gw[..., :3].any()
        torch.testing.assert_close(gt.cpu(), want_g[1], rtol=0, atol=1e-12)
        out = unshuffle_tokens(x, t, ids.to(device), pos_embed=pos.to(device), with_cls_token=True,
                               backend=backend)
        gw, gt = torch.autograd.grad(out.sum(), (w, t))
        assert torch.equal(gw[..., 3:3 + D].cpu(), torch.ones(N, 1 + K, D, dtype=torch.float64))
        assert torch.equal(gt.cpu(), torch.full((D,), float(N * (L - K)), dtype=torch.float64))


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_reads_the_images_and_skips_the_class_token_row(norm_pix_loss, device):
    """mae_loss(pred_with_cls, imgs, patch_size=p) == official forward_loss(pred[:, 1:], patchify(imgs));
    the gradient is the decoder output's (class-token row 0), no slice or patchified copy."""
    N, C, H, W, p = 3, 3, 8, 12, 4
    L, P = (H // p) * (W // p), p * p * C
    gen = torch.Generator().manual_seed(23)
    imgs = torch.randn(N, C, H, W, dtype=torch.float64, generator=gen)
    pred = torch.randn(N, 1 + L, P, dtype=torch.float64, generator=gen)
    mask = (torch.rand(N, L, generator=gen) < 0.7).double()
    pr = pred.clone().requires_grad_()
    target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(N, C, H // p, p, W // p, p)).reshape(N, L, P)
    want = official_loss(pr[:, 1:], target, mask, norm_pix_loss)
    (want_g,) = torch.autograd.grad(want, pr)
    for backend in BACKENDS:
        pd = pred.clone().to(device).requires_grad_()
        # the images as a channels-last view: any strides are read in place
        im = imgs.to(device).contiguous(memory_format=torch.channels_last)
        loss = mae_loss(pd, im, mask.to(device), norm_pix_loss=norm_pix_loss, patch_size=p,
                        with_cls_token=True, backend=backend)
        torch.testing.assert_close(loss.cpu(), want, rtol=1e-12, atol=0)
        (g,) = torch.autograd.grad(loss, pd)
        torch.testing.assert_close(g.cpu(), want_g, rtol=1e-10, atol=1e-15)
        assert not g[:, 0].any()
    with pytest.raises(ValueError, match="patch_size=4"):
        mae_loss(pred, imgs[..., :8], mask, patch_size=4, with_cls_token=True)
    with pytest.raises(ValueError, match="target must have pred's shape .* after its class-token row"):
        mae_loss(pred, target[:, :2], mask, with_cls_token=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_pos_embed_fused_into_the_gather(dtype, device):
    """random_masking(x, pos_embed=pos) == masking x + pos, the official encoder's order."""
    N, L, D = 3, 49, 100
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(N, L, D, generator=gen).to(dtype)
    pos = torch.randn(1, L, D, generator=gen).to(dtype)
    noise = torch.rand(N, L, dtype=torch.float64, generator=gen)
    grad_kept = torch.randn(N, 12, D, generator=gen).to(dtype)
    xr = x.clone().requires_grad_()
    kept_ref, mask_ref, ids_ref = official_masking(xr + pos, 0.75, noise)
    (gx_ref,) = torch.autograd.grad(kept_ref, xr, grad_kept)
    for backend in BACKENDS:
        for learned in (False, True):  # a pos_embed that requires grad takes the unfused path
            xb = x.to(device).requires_grad_()
            pb = pos.to(device).requires_grad_(learned)
            x_kept, mask, ids = random_masking(xb, 0.75, noise=noise.to(device), pos_embed=pb,
                                               backend=backend)
            if backend == "triton" and dtype == torch.bfloat16 and not x_kept.is_cuda:
                # the CPU interpreter truncates fp32 -> bf16 casts (GPUs round to nearest even)
                torch.testing.assert_close(x_kept.cpu(), kept_ref.detach(), rtol=2**-7, atol=0)
            else:
                assert torch.equal(x_kept.cpu(), kept_ref.detach())
            assert torch.equal(ids.cpu(), ids_ref) and torch.equal(mask.cpu(), mask_ref.to(dtype))
            grads = torch.autograd.grad(x_kept, (xb, pb) if learned else (xb,), grad_kept.to(device))
            assert torch.equal(grads[0].cpu(), gx_ref)
            if learned:  # d pos = sum over samples of d x
                torch.testing.assert_close(grads[1].cpu(), gx_ref.sum(0, keepdim=True))
    with pytest.raises(ValueError, match=r"pos_embed must be \[L, D\] or \[1, L, D\] = \(49, 100\)"):
        random_masking(x, 0.75, pos_embed=pos[0, :48])


# --- mae_loss --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 4, 8), (3, 49, 100), (2, 197, 768), (1, 3, 2)])
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_loss_fp64_matches_formula_and_autograd(shape, norm_pix_loss, device):
    gen = torch.Generator().manual_seed(sum(shape))
    pred = torch.randn(shape, dtype=torch.float64, generator=gen)
    target = 3 + 2 * torch.randn(shape, dtype=torch.float64, generator=gen)
    mask = (torch.rand(shape[:2], generator=gen) < 0.75).double()
    mask[0, 0] = 1
    pr = pred.clone().requires_grad_()
    ref = official_loss(pr, target, mask, norm_pix_loss)
    (g_ref,) = torch.autograd.grad(ref * 1.7, pr)
    for backend in BACKENDS:
        pb = pred.to(device).requires_grad_()
        loss = mae_loss(pb, target.to(device), mask.to(device), norm_pix_loss=norm_pix_loss, backend=backend)
        assert loss.dtype == torch.float64 and loss.shape == ()
        torch.testing.assert_close(loss.cpu(), ref.detach(), rtol=1e-12, atol=1e-12)
        (g,) = torch.autograd.grad(loss * 1.7, pb)
        torch.testing.assert_close(g.cpu(), g_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_loss_low_precision_within_twice_the_reference_error(dtype, norm_pix_loss, device):
    gen = torch.Generator().manual_seed(5)
    shape = (4, 49, 192)
    pred = torch.randn(shape, generator=gen).to(dtype)
    target = (0.5 + torch.rand(shape, generator=gen)).to(dtype)
    mask = (torch.rand(shape[:2], generator=gen) < 0.75).to(dtype)
    p64 = pred.double().requires_grad_()
    truth = official_loss(p64, target.double(), mask.double(), norm_pix_loss)
    (g_truth,) = torch.autograd.grad(truth, p64)
    pl = pred.clone().requires_grad_()
    low = official_loss(pl, target, mask, norm_pix_loss)  # the formula run in `dtype`
    (g_low,) = torch.autograd.grad(low, pl)
    pk = pred.to(device).requires_grad_()
    loss = mae_loss(pk, target.to(device), mask.to(device), norm_pix_loss=norm_pix_loss, backend="triton")
    (g,) = torch.autograd.grad(loss, pk)
    loss, g = loss.cpu(), g.cpu()
    assert loss.dtype == dtype and g.dtype == dtype
    err, ref_err = (loss.double() - truth).abs().item(), (low.double() - truth).abs().item()
    assert err <= 2 * ref_err + 1e-2 * truth.abs().item(), (err, ref_err)
    err, ref_err = (g.double() - g_truth).abs().max().item(), (g_low.double() - g_truth).abs().max().item()
    assert err <= 2 * ref_err + 1e-3 * g_truth.abs().max().item(), (err, ref_err)


def test_mae_loss_mixed_dtypes_like_autocast(device):
    """bf16 decoder output against an fp32 target: fp32 loss, bf16 gradient; both backends agree."""
    gen = torch.Generator().manual_seed(6)
    pred = torch.randn(2, 16, 48, generator=gen).to(device, torch.bfloat16)
    target = torch.randn(2, 16, 48, generator=gen).to(device)
    mask = torch.ones(2, 16, dtype=torch.bfloat16, device=device)
    results = []
    for backend in BACKENDS:
        p = pred.clone().requires_grad_()
        loss = mae_loss(p, target, mask, backend=backend)
        results.append((loss, torch.autograd.grad(loss, p)[0]))
    assert results[0][0].dtype == results[1][0].dtype == torch.float32
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    assert results[1][1].dtype == torch.bfloat16
    torch.testing.assert_close(results[1][1], results[0][1])


# --- NaN in, NaN out -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend, device):
    x = torch.randn(2, 8, 4, device=device)
    noise = torch.arange(16.0, device=device).reshape(2, 8)  # tokens 0-3 of each row are kept
    x[0, 0, 1] = float("nan")
    x_kept, _, ids = random_masking(x, 0.5, noise=noise, backend=backend)
    assert x_kept[0, 0, 1].isnan() and x_kept.isnan().sum() == 1
    token = torch.full((4,), float("nan"), device=device)
    out = unshuffle_tokens(x_kept.nan_to_num(), token, ids, backend=backend)
    assert out[:, 4:].isnan().all() and not out[:, :4].isnan().any()
    pred, target = torch.randn(2, 8, 6, device=device), torch.randn(2, 8, 6, device=device)
    mask = torch.zeros(2, 8, device=device)
    mask[:, 4:] = 1
    pred[0, 0, 0] = float("nan")  # a kept patch: weight 0, but NaN * 0 is NaN, as in the official loss
    assert mae_loss(pred, target, mask, backend=backend).isnan()


# --- custom ops and torch.compile ------------------------------------------------------------------

def test_opcheck_all_custom_ops(device):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 10, 12, generator=gen).to(device)
    ids = torch.stack([torch.randperm(10, generator=gen) for _ in range(2)]).to(device)
    x_kept = torch.randn(2, 4, 12, generator=gen).to(device)
    pred, target = torch.randn(2, 2, 10, 6, generator=gen).to(device).unbind(0)
    mask = (ids >= 4).float()
    token = torch.randn(12, generator=gen).to(device).requires_grad_()
    ops = torch.ops.fastssl
    imgs = torch.randn(2, 3, 4, 8, generator=gen).to(device)  # p = 2: 8 patches of 2 * 2 * 3 = 12 values
    pred_cls = torch.randn(2, 9, 12, generator=gen).to(device)
    mask8 = (torch.stack([torch.randperm(8, generator=gen) for _ in range(2)]) >= 4).float().to(device)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # the patch embedding's layout
    ids9 = torch.stack([torch.randperm(9, generator=gen) for _ in range(2)]).to(device)
    cases = [
        (ops.random_masking_fwd.default, (x.clone().requires_grad_(), ids, 4, None, None)),
        (ops.random_masking_fwd.default, (x.clone().requires_grad_(), ids, 4, x[0].clone(), None)),
        (ops.random_masking_fwd.default, (xt.clone().requires_grad_(), ids, 4, x[0].clone(), token)),
        (ops.random_masking_bwd.default, (x_kept.detach(), ids, True)),
        (ops.unshuffle_tokens_fwd.default, (x_kept.requires_grad_(), ids, token, None, False)),
        (ops.unshuffle_tokens_fwd.default, (x_kept, ids9, token, x[0, :10].clone(), True)),
        (ops.unshuffle_tokens_bwd.default, (x.detach(), ids, 4, False)),
        (ops.unshuffle_tokens_bwd.default, (x.detach(), ids9, 4, True)),
        (ops.mae_loss_fwd.default, (pred.clone().requires_grad_(), target, mask, True, 0, False)),
        (ops.mae_loss_fwd.default, (pred_cls.clone().requires_grad_(), imgs, mask8, True, 2, True)),
        (ops.mae_loss_bwd.default, (pred.new_tensor(1.0), pred, target, mask, mask.sum(), False, 0, False)),
        (ops.mae_loss_bwd.default, (pred.new_tensor(1.0), pred_cls, imgs, mask8, mask8.sum(), True, 2, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_traces_through_ops(device):
    def step(x, token, target):
        noise = torch.arange(x.shape[0] * x.shape[1], 0, -1.0, device=x.device).reshape(x.shape[:2])
        x_kept, mask, ids = random_masking(x, 0.75, noise=noise, backend="triton")
        out = unshuffle_tokens(x_kept * 2, token, ids, backend="triton")
        return mae_loss(out, target, mask, backend="triton")

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 16, 12, generator=gen).to(device).requires_grad_()
    token = torch.randn(12, generator=gen).to(device).requires_grad_()
    target = torch.randn(2, 16, 12, generator=gen).to(device)
    eager = step(x, token, target)
    g_eager = torch.autograd.grad(eager, (x, token))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, token, target)
    g_compiled = torch.autograd.grad(compiled, (x, token))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)


# --- patchify / unpatchify -------------------------------------------------------------------------

def test_patchify_official_layout_and_roundtrip():
    imgs = torch.randn(2, 3, 32, 48)
    p = 8
    ref = torch.einsum("nchpwq->nhwpqc", imgs.reshape(2, 3, 4, p, 6, p)).reshape(2, 24, p * p * 3)
    x = patchify(imgs, p)
    assert torch.equal(x, ref)
    # patch (h=1, w=2), pixel (row 3, col 5), channel 2 sits at [1 * 6 + 2, (3 * p + 5) * 3 + 2]
    assert x[1, 8, (3 * p + 5) * 3 + 2] == imgs[1, 2, 1 * p + 3, 2 * p + 5]
    assert torch.equal(unpatchify(x, p, grid=(4, 6)), imgs)
    square = torch.randn(1, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(square, 16), 16), square)


# --- bad input -------------------------------------------------------------------------------------

def test_random_masking_rejects_bad_input_without_touching_the_generator():
    x = torch.randn(2, 4, 3)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    with pytest.raises(ValueError, match=r"keeps int\(4 \* \(1 - 0.8\)\) = 0"):
        random_masking(x, 0.8, generator=gen)
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=rf"mask_ratio must be a number >= 0.0 and < 1.0, got {ratio}"):
            random_masking(x, ratio, generator=gen)
    assert torch.equal(gen.get_state(), state)
    with pytest.raises(TypeError, match="mask_ratio must be a number"):
        random_masking(x, "0.5")
    with pytest.raises(ValueError, match=r"noise must have shape \[N, L\] = \(2, 4\) like x, got \(2, 5\)"):
        random_masking(x, 0.5, noise=torch.rand(2, 5))
    with pytest.raises(ValueError, match="noise or generator, not both"):
        random_masking(x, 0.5, noise=torch.rand(2, 4), generator=gen)
    with pytest.raises(ValueError, match="x must be 3-D"):
        random_masking(torch.randn(2, 4), 0.5)
    with pytest.raises(TypeError, match="x must have dtype"):
        random_masking(torch.zeros(2, 4, 3, dtype=torch.int64), 0.5)


def test_unshuffle_tokens_rejects_bad_input():
    x_kept, token = torch.randn(2, 3, 8), torch.randn(8)
    bad_token = r"mask_token must be \[D\] or \[1, 1, D\] with D=8.*got "
    bad_ids = r"ids_restore must be \[N=2, L\] with L >= len_keep=3.*got shape "
    ids = torch.stack([torch.randperm(6) for _ in range(2)])
    with pytest.raises(ValueError, match=bad_token + r"\(7,\)"):
        unshuffle_tokens(x_kept, torch.randn(7), ids)
    with pytest.raises(ValueError, match=bad_token + r"\(2, 1, 8\)"):
        unshuffle_tokens(x_kept, torch.randn(2, 1, 8), ids)
    with pytest.raises(ValueError, match=bad_ids + r"\(3, 6\)"):
        unshuffle_tokens(x_kept, token, torch.zeros(3, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=bad_ids + r"\(2, 2\)"):
        unshuffle_tokens(x_kept, token, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="ids_restore must be 2-D"):
        unshuffle_tokens(x_kept, token, ids[0])
    with pytest.raises(TypeError, match="ids_restore must have dtype in \\(int64\\), got torch.int32"):
        unshuffle_tokens(x_kept, token, ids.int())


def test_mae_loss_and_patchify_reject_bad_input():
    pred, target, mask = torch.randn(2, 4, 6), torch.randn(2, 4, 6), torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"target must have pred's shape \(2, 4, 6\), got \(2, 4, 5\)"):
        mae_loss(pred, torch.randn(2, 4, 5), mask)
    with pytest.raises(ValueError, match=r"mask must have shape \[N, L\] = \(2, 4\) like pred, got \(2, 5\)"):
        mae_loss(pred, target, torch.ones(2, 5))
    with pytest.raises(ValueError, match="norm_pix_loss needs P >= 2"):
        mae_loss(pred[..., :1], target[..., :1], mask)
    with pytest.raises(ValueError, match="differentiates pred only"):
        mae_loss(pred, target.requires_grad_(), mask)
    with pytest.raises(ValueError, match="imgs height and width must be multiples of p=5"):
        patchify(torch.randn(1, 3, 16, 16), 5)
    with pytest.raises(ValueError, match="not a square grid"):
        unpatchify(torch.randn(1, 6, 12), 2)


# --- GPU: the same checks at training shapes (run by benchmarks/gpu_check.sh) ----------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_pipeline_in_the_model_layout_within_the_rule(dtype):
    """ViT-B/16 at 224 (L = 196, D = 768, decoder 512, P = 768): the patch embedding's D-major
    output, class token and position embedding fused into the masking, the decoder's unshuffle with
    its class token, the loss read from the images; loss and every gradient against float64."""
    def vit_b(**kw):
        return mae_pipeline(**kw, N=16, p=16, side=224, D=768, Dd=512)

    assert compare(vit_b, device="cuda", dtype=dtype, backend="auto") == []
    assert mae.HAS_TRITON
