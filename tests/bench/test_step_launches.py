"""Kernel launches per training step at the paper configurations (fastssl.bench.step_launches):
each fused method launches exactly its op's kernels and fewer kernels in all than its reference
step; a method with no fused op launches the same either way."""

from fastssl.bench import step_launches

KERNELS = {
    # MoCo: the query gradient comes out of the forward (keys from the momentum encoder)
    "mocov2": {"_info_nce_fwd_kernel", "_info_nce_combine_kernel"},
    "mocov3": {"_info_nce_fwd_kernel", "_info_nce_combine_kernel"},
    # SimCLR: both views get gradients, the key side through the backward kernels
    "simclr": {"_info_nce_fwd_kernel", "_info_nce_combine_kernel", "_info_nce_bwd_kernel",
               "_info_nce_bwd_combine_kernel"},
    "dino": {"_dino_loss_fwd_kernel", "_dino_loss_merge_kernel", "_dino_loss_bwd_kernel"},
    # the class-token and the masked-patch losses, both on the DINO kernels
    "dinov2": {"_dino_loss_fwd_kernel", "_dino_loss_merge_kernel", "_dino_loss_bwd_kernel"},
    "mae": {"_compact_kernel", "_expand_kernel", "_mae_loss_kernel"},
}


def test_fused_steps_launch_their_kernels_and_fewer_in_all():
    rows = {r.method: r for r in map(step_launches.count, step_launches.PAPER)}
    for name, kernels in KERNELS.items():
        r = rows[name]
        assert set(r.kernels) == kernels, name
        assert r.fused < r.eager and r.fused_aten < r.eager, name
    # MoCo v3's symmetric loss: two InfoNCE calls of two launches each; MAE: masking, unshuffle and
    # loss, each forward and backward
    assert (rows["mocov2"].fused_triton, rows["mocov3"].fused_triton, rows["mae"].fused_triton) == (2, 4, 6)
    rotnet = rows["rotnet"]
    assert rotnet.kernels == () and rotnet.fused == rotnet.eager
    table = step_launches.table(list(rows.values()))
    assert all(f"| {name} |" in table for name in rows)
