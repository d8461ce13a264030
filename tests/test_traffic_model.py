"""The traffic model: each kernel's traffic formula against the addresses the kernel really loads
and stores (Triton interpreter, small shapes), the dispatch counter against hand-counted ops, and
`fastssl bench --model --json`."""

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastssl import ops
from fastssl.bench import traffic
from fastssl.bench.counter import DispatchCounter, interpreted_traffic
from fastssl.cli import main


def check_formulas(run) -> set[str]:
    """Run `run()` under the interpreter; every launch's measured (read, written) bytes equal its
    kernel's formula (whose third value, FLOPs, the bench test checks). Returns the kernel names seen."""
    formulas = traffic.kernel_traffic()
    with interpreted_traffic() as launches:
        run()
    assert launches
    for launch in launches:
        want = formulas[launch.name](launch.args)[:2]
        assert (launch.bytes_read, launch.bytes_written) == want, (launch.name, launch.args)
    return {launch.name for launch in launches}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", [1, 2], ids=["one-tile", "two-tiles"])
def test_dino_kernels_traffic(dtype, tiles):
    """Two tiles: a full 4 KB row tile (1,024 fp32 or 2,048 bf16 columns) and a partial one, the
    per-tile partial statistics and their merge."""
    K = 300 if tiles == 1 else 4096 // dtype.itemsize + 20
    student = torch.randn(4 * 5, K, dtype=dtype, requires_grad=True)
    teacher, center = torch.randn(2 * 5, K, dtype=dtype), torch.randn(K)

    def run():
        loss, _ = ops.dino_loss_with_teacher_sum(student, teacher, center, n_crops=4, n_global_crops=2,
                                                 backend="triton")
        loss.backward()
        ops.soft_cross_entropy(student[:5], (teacher[:5] > 0).to(dtype), backend="triton").backward()

    names = check_formulas(run)
    assert names == {"_dino_loss_fwd_kernel", "_dino_loss_merge_kernel", "_dino_loss_bwd_kernel"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ibot_patch_loss_traffic(dtype):
    """The gathering and weighted paths: only the masked rows of strided [B, L, K] tokens are read."""
    tokens = torch.randn(3, 1 + 6, 300, dtype=dtype, requires_grad=True)
    teacher, center = torch.randn(3, 6, 300, dtype=dtype), torch.randn(1, 1, 300)
    masks = torch.zeros(3, 6, dtype=torch.bool)
    masks[0, 1:4] = masks[2, 5] = True

    def run():
        student = tokens[:, 1:]
        loss, _ = ops.ibot_patch_loss_with_teacher_sum(student, teacher, center, masks=masks,
                                                       backend="triton")
        loss.backward()
        ops.ibot_patch_cross_entropy(student[:, 0], teacher[:, 0].exp(), masks=masks[:, :3],
                                     masks_weight=torch.ones(3), backend="triton").backward()
        ops.ibot_patch_loss(student, teacher.flatten(0, 1)[masks.flatten()], center, masks=masks,
                            backend="triton").backward()

    names = check_formulas(run)
    assert names == {"_dino_loss_fwd_kernel", "_dino_loss_merge_kernel", "_dino_loss_bwd_kernel"}


def test_mae_kernels_traffic():
    """Every kernel configuration the MAE step launches, on strided inputs. Sample n keeps positions
    2n and 2n + 1, so every position is kept by some sample (as in any real batch)."""
    N, L, D, p = 4, 8, 12, 2
    conv_out = torch.randn(N, D, L, requires_grad=True)
    noise = torch.stack([torch.roll(torch.arange(L, dtype=torch.float32), 2 * n) for n in range(N)])
    pos, cls = torch.randn(1, 1 + L, D), torch.randn(1, 1, D, requires_grad=True)
    token = torch.randn(D, requires_grad=True)
    imgs = torch.randn(N, 3, 4, 4)  # L = 4 patches of p * p * 3 = 12 values
    _, mask, _ = ops.random_masking(conv_out.transpose(1, 2), 0.75, noise=noise, backend="torch")
    assert ((1 - mask).sum(0) > 0).all()  # every position kept by some sample

    def run():
        x = conv_out.transpose(1, 2)  # the patch embedding's layout
        kept, mask, ids = ops.random_masking(x, 0.75, noise=noise, pos_embed=pos[:, 1:],
                                             cls_token=cls + pos[:, :1], backend="triton")
        out = ops.unshuffle_tokens(kept, token, ids, pos_embed=pos, with_cls_token=True, backend="triton")
        plain = ops.unshuffle_tokens(kept[:, 1:], token, ids, backend="triton")
        loss = ops.mae_loss(out, out.detach()[:, 1:] * 2, mask, with_cls_token=True, backend="triton")
        loss = loss + ops.mae_loss(plain[:, :4], imgs, mask[:, :4], patch_size=p, backend="triton")
        loss.backward()

    assert check_formulas(run) == {"_compact_kernel", "_expand_kernel", "_mae_loss_kernel"}


@pytest.mark.parametrize("queue", [True, False])
@pytest.mark.parametrize("D,normalize", [(16, True), (256, True), (256, False)])
def test_info_nce_kernels_traffic(queue, D, normalize):
    """D=256 is above fp32's one-chunk width: the logits accumulate over D chunks and each
    128-column slice of the output is its own program (the path of the D=256 model row)."""
    q = torch.randn(40, D, requires_grad=True)
    k = torch.randn(40, D, requires_grad=not queue)
    qu = torch.randn(100, D) if queue else None
    names = check_formulas(lambda: ops.info_nce(q, k, qu, normalize=normalize, backend="triton").backward())
    assert "_info_nce_fwd_kernel" in names and ("_info_nce_bwd_kernel" in names) != queue


@pytest.mark.parametrize("N,D", [(40, 130), (136, 20)], ids=["one-split-two-chunks", "two-splits"])
def test_clip_kernels_traffic(N, D):
    """The one grid: the forward's column statistics, both combines, the two key gradients with the
    keys' own softmax (OUTER_LSE); texts in strided rows. 130-wide rows are two fp32 D chunks: the
    first keeps its p for the second (KEEP_P). One split of the streamed rows: the key gradients
    finish in their kernel (DIRECT); and the local form (N of M = 2N gathered rows, labels offset
    by N: the combine reads N key rows). Two splits: a combine; and a text-only gradient."""
    x = torch.randn(N, D, requires_grad=True)  # ragged image tiles under the interpreter
    y = torch.randn(2 * N, D)[::2].requires_grad_()
    t = torch.tensor(3.0, requires_grad=True)

    def run():
        ops.clip_loss(x, y, t, backend="triton").backward()
        if N > 128:
            ops.clip_loss(x.detach(), y, t.detach(), backend="triton").backward()
        else:
            ops.clip_loss(x, y, t, all_image_features=torch.randn(2 * N, D, requires_grad=True),
                          all_text_features=torch.randn(2 * N, D, requires_grad=True), label_offset=N,
                          backend="triton").backward()

    names = check_formulas(run)
    assert names == {"_info_nce_fwd_kernel", "_info_nce_combine_kernel", "_info_nce_bwd_kernel"} | (
        {"_info_nce_bwd_combine_kernel"} if N > 128 else set())


def test_kept_p_bands_traffic(kept_bands):
    """KEEP_P in bands (CLIP's local form, N = 5 of M = 130 rows, fp32 D = 140, the workspace capped
    at one forward split): every band's launch reads and writes its views (x's column band and its
    splits' partials, the key band and its gradient rows, the workspace) as its formula counts them."""
    bands = kept_bands(5 * (128 * 4 + 2 * 4))
    x, y = torch.randn(5, 140, requires_grad=True), torch.randn(5, 140, requires_grad=True)
    every = [torch.randn(130, 140, requires_grad=True) for _ in range(2)]
    check_formulas(lambda: ops.clip_loss(x, y, 3.0, all_image_features=every[0], all_text_features=every[1],
                                         label_offset=125, backend="triton").backward())
    assert (bands["_info_nce_fwd_kernel"], bands["_info_nce_bwd_kernel"]) == (4, 4), bands


def test_clip_local_workspace_is_flat_in_world_size():
    """The KEEP_P workspace a CLIP local-loss step allocates (the p and rescales of every launch, on
    meta tensors with an H100's grid), N = 1,024 rows per rank, D = 1,024 bf16: within the cap at 8,
    64 and 256 ranks, and the same at 64 as at 256, where unbanded it would be N x world·N (128 and
    512 MiB)."""
    from fastssl.ops._info_nce_tiles import _KEEP_P_BYTES
    from fastssl.ops._traffic import whole

    def workspace(world: int) -> int:
        make, _, fused = traffic._clip_case(1024, world * 1024, 1024)
        _, launches = traffic.count_fused(make, fused)
        return max(whole(launch.args, ("p_ptr", "alpha_ptr"), ())[0] for launch in launches)

    sizes = {world: workspace(world) for world in (8, 64, 256)}
    assert sizes[8] == 1024 * 8192 * 2 + 1024 * (8192 // 64) * 4  # the forward's, whole: under the cap
    assert sizes[64] == sizes[256] <= _KEEP_P_BYTES, sizes


def test_mae_model_step_traffic():
    """The MAE model's own training step (patch embedding's D-major output, class token and
    position embeddings fused into the masking and unshuffle kernels, the loss reading pixels
    from the images): every launch matches its formula. Sample n keeps position n."""
    from fastssl.models.mae import MaskedAutoencoderViT

    torch.manual_seed(0)
    model = MaskedAutoencoderViT(image_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=1,
                                 decoder_dim=8, decoder_depth=1, decoder_heads=1, backend="triton")
    noise = torch.stack([torch.roll(torch.arange(4, dtype=torch.float32), n) for n in range(4)])
    imgs = torch.randn(4, 3, 8, 8)
    assert check_formulas(lambda: model(imgs, 0.75, noise=noise)[0].backward()) == {
        "_compact_kernel", "_expand_kernel", "_mae_loss_kernel"}


@pytest.mark.parametrize("with_bias", [True, False])
def test_siglip_kernels_traffic(with_bias):
    x = torch.randn(40, 20, requires_grad=True)
    y = torch.randn(90, 20)[::2].requires_grad_()  # strided rows: the formula counts the rows read
    t = torch.tensor(3.0, requires_grad=True)
    b = torch.tensor(-1.0, requires_grad=True) if with_bias else None

    def run():
        ops.siglip_loss(x, y, t, b, backend="triton").backward()  # 2 image splits: fp32 partials
        ops.siglip_loss(x[:20], y, t, b, label_offset=None, backend="triton").backward()  # 1: the gradient
        with torch.no_grad():
            ops.siglip_loss(x, y, t, b, label_offset=None, backend="triton")

    assert check_formulas(run) == {"_siglip_loss_fwd_kernel", "_siglip_loss_bwd_kernel"}


def test_counter_bytes_flops_and_peak():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with DispatchCounter() as counter:
        c = a @ b  # reads 8*16 + 16*4 floats, writes 8*4; 2*8*16*4 FLOPs
        d = c.expand(3, 8, 4).sum(0)  # a stride-0 input is read once
        del c
        e = d.t()  # a view: nothing
    assert [r.name for r in counter.records] == ["mm", "sum"]
    assert counter.records[0].bytes_read == 4 * (8 * 16 + 16 * 4)
    assert counter.records[0].bytes_written == 4 * 32
    assert counter.records[0].flops == 2 * 8 * 16 * 4
    assert counter.records[1].bytes_read == 4 * 32
    assert counter.peak_bytes == 2 * 4 * 32 and counter.live_bytes == 4 * 32 and e.shape == (4, 8)
    with DispatchCounter() as counter:
        a.new_zeros(3)  # a gives only dtype and device
        torch.empty(8, 16).copy_(a)  # reads a, writes the destination
    assert [(r.name, r.bytes_read, r.bytes_written) for r in counter.records] == [
        ("new_zeros", 0, 12), ("copy_", 4 * 128, 4 * 128)]


def test_bench_model_prints_the_table_and_writes_records(tmp_path, capsys):
    out = tmp_path / "model.jsonl"
    assert main(["bench", "--model", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["op"] for r in records] == [c[0] for c in traffic.CASES]
    keys = {"op", "shape", "eager_bytes", "fused_bytes", "eager_kernels", "fused_kernels", "eager_flops",
            "fused_flops", "eager_peak_bytes", "fused_peak_bytes", "predicted_speedup", "device", "date",
            "torch", "git_sha"}
    assert all(keys <= set(r) for r in records)
    for r in records:
        assert 0 < r["fused_bytes"] < r["eager_bytes"]
        # CLIP's local form is two InfoNCE calls whose small host-side ops (gradient scales) outnumber
        # eager's launches; the model leaves launch latency out, so that row is judged by its time alone
        assert r["fused_kernels"] < r["eager_kernels"] or r["op"] == "clip local"
        assert r["predicted_speedup"] > 1 and f"| {r['op']} |" in printed
    moco = records[0]  # two matmul-equivalents of 2 N K D on both sides
    assert moco["eager_flops"] == moco["fused_flops"] == 2 * 2 * 4096 * 65536 * 128
    assert printed.count("holds:") + printed.count("FAILS:") == 4 and "FAILS:" not in printed
    assert "predicted µs eager / fused" in printed and "measured" not in printed
    assert "Kernel launches per training step" in printed and "| dino | ViT-S/16" in printed
    assert main(["bench", "--json", str(out)]) == 2  # --json needs --model
    # The published rows (benchmarks/results, RESULTS.md's table) are what the model gives now.
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    published = [json.loads(line) for line in (results / "traffic_model.jsonl").read_text().splitlines()]
    names = [f.name for f in fields(traffic.Record)]
    assert [{k: r[k] for k in names} for r in records] == [{k: r[k] for k in names} for r in published]


def _reference_flops(step, *inputs) -> int:
    with FlopCounterMode(display=False) as counter:
        step(*inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("kept", [True, False], ids=["kept-p", "over-budget"])
@pytest.mark.parametrize("queue", [True, False], ids=["queue", "in-batch"])
@pytest.mark.parametrize("D,normalize", [(64, True), (128, True), (128, False), (256, True), (1024, True)])
def test_info_nce_flop_formulas_against_the_flop_counter(queue, D, normalize, kept, monkeypatch):
    """torch.utils.flop_counter counts the official formula's matmuls: the logits and the query
    gradient (2 matmul-equivalents) with a queue, and the key gradient too in-batch (3). The kernels
    do that work in the forward and, in-batch, again in the key-gradient backward, plus the
    gradient accumulation; above one 128-column chunk of D the logits are computed once and their
    p kept for every chunk, or, with the scratch over its budget, recomputed by each chunk."""
    from fastssl.ops import _info_nce_tiles

    if not kept:
        monkeypatch.setattr(_info_nce_tiles, "_KEEP_P_BYTES", 0)
    N, K = 512, 4096

    def make():
        q = torch.empty(N, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
        if queue:
            return q, torch.empty(N, D, device="meta", dtype=torch.bfloat16), torch.empty(
                K, D, device="meta", dtype=torch.bfloat16)
        return q, torch.empty(K, D, device="meta", dtype=torch.bfloat16, requires_grad=True), None

    reference = _reference_flops(
        lambda q, k, qu: ops.info_nce(q, k, qu, normalize=normalize, backend="torch").backward(), *make())
    fused, _ = traffic.count_fused(
        make, lambda q, k, qu: ops.info_nce(q, k, qu, normalize=normalize, backend="triton").backward())
    # 2 N K D per matmul (the positive logit is a row-wise dot, not a matmul)
    assert reference == (2 if queue else 3) * 2 * N * K * D
    chunks = 1 if kept else -(-D // 128)
    passes = chunks + 1 if queue else 2 * (chunks + 1)
    assert fused.flops * (2 if queue else 3) == reference * passes


@pytest.mark.parametrize("D", [64, 256])
def test_siglip_flop_formulas_against_the_flop_counter(D):
    """The official sigmoid loss is one N x M logits matmul, and its backward two more (image and
    text gradients). The kernels recompute the logits once per 128-column slice of D and do each
    gradient dot once."""
    N, M = 256, 1024

    def make():
        shapes = ((N, D), (M, D), (), ())  # image, text, scale, bias
        return tuple(torch.empty(shape, device="meta", requires_grad=True) for shape in shapes)

    def step(backend):
        return lambda x, y, t, b: ops.siglip_loss(x, y, t, b, backend=backend).backward()

    reference = _reference_flops(step("torch"), *make())
    assert reference == 3 * 2 * N * M * D
    fused, _ = traffic.count_fused(make, step("triton"))
    slices = -(-D // 128)
    # forward: the logits per slice and the image gradient; backward: the logits per slice and the
    # text gradient
    assert fused.flops * 3 == reference * 2 * (slices + 1)


def test_elementwise_ops_count_no_matmul_flops_on_either_side():
    """DINO, multi-label and MAE are elementwise and reductions: the counter finds no matmul in the
    official formulas, and the kernels' formulas claim none."""
    elementwise = {"dino_loss", "mae mask+unshuffle+loss", "multilabel softmax"}
    for op, _, build in [case for case in traffic.CASES if case[0] in elementwise]:
        (make_eager, eager), (make_fused, fused) = traffic._split(build())
        assert _reference_flops(eager, *make_eager()) == 0, op
        assert traffic.count_fused(make_fused, fused)[0].flops == 0, op


def test_published_ibot_paper_case_holds_what_each_path_must_by_hand():
    """DINOv2's iBOT loss at its paper shape (n masked tokens x K prototypes, bf16 logits): the
    official formula holds float32 [n, K] tensors (the student's and teacher's float32 copies, the
    teacher's probabilities, the log-softmax, their product), at least three at once; the fused
    path allocates the student's gradient [n, K] in bf16 and statistics of n and K values only."""
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    (r,) = [json.loads(line) for line in (results / "traffic_model.jsonl").read_text().splitlines()
            if json.loads(line)["op"] == "ibot_patch_loss"]
    n, K = traffic.IBOT_PAPER["n"], traffic.IBOT_PAPER["K"]
    assert r["shape"].startswith(f"n={n} ") and f"K={K} " in r["shape"]
    assert r["eager_peak_bytes"] >= 3 * 4 * n * K
    assert 0 <= r["fused_peak_bytes"] - 2 * n * K < 2**20
