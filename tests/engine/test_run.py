"""engine.run: the one place a run joins its process group and splits the global batch."""

import pytest
import torch
from dist_utils import run_gloo
from engine_tiny import tiny_config

from fastssl.engine.run import RunContext, deterministic_algorithms, global_batch_size, init_run, rank0_value


def test_one_process_trains_on_the_cpu_with_the_whole_batch(tmp_path):
    run = init_run(tiny_config(tmp_path, batch_size=12))
    expected_device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert run == RunContext(rank=0, world=1, device=expected_device, batch_size=12)
    assert run.batch_per_rank == 12 and run.is_main


def test_the_global_batch_is_read_from_the_config_in_one_place(tmp_path):
    assert global_batch_size(tiny_config(tmp_path, batch_size=24)) == 24


def test_accumulation_must_split_the_batch(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size: expected a multiple of world size x accum_steps = "
                                         r"1 x 3, got 8"):
        init_run(tiny_config(tmp_path, batch_size=8, accum_steps=3))


def _two_ranks(rank, world, out):
    results = {"run": init_run(tiny_config(out, batch_size=8)),
               "value": rank0_value({"from": rank}, world)}
    for kw in ({"batch_size": 7}, {"batch_size": 6, "accum_steps": 2}):
        try:
            init_run(tiny_config(out, **kw))
        except ValueError as e:
            results[str(kw)] = str(e)
    return results


def test_two_ranks_split_the_global_batch_and_refuse_an_uneven_one(tmp_path):
    ranks = run_gloo(_two_ranks, 2, str(tmp_path))
    for rank, result in enumerate(ranks):
        run = result["run"]
        assert (run.rank, run.world, run.batch_size, run.batch_per_rank) == (rank, 2, 8, 4)
        assert run.is_main == (rank == 0)
        assert result["value"] == {"from": 0}  # rank 0's value on both ranks
        assert result["{'batch_size': 7}"] == "batch_size: expected a multiple of the world size 2, got 7"
        assert "world size x accum_steps = 2 x 2, got 6" in result["{'batch_size': 6, 'accum_steps': 2}"]


def test_deterministic_algorithms_hold_inside_the_block_only_even_on_an_error():
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="inside"):
        with deterministic_algorithms(True):
            assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
            raise RuntimeError("inside")
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()


def test_a_restarted_worker_that_cannot_rejoin_says_so_in_one_line(monkeypatch):
    """A worker torchrun restarted into a store nobody serves any more (its agent gone): RejoinError,
    reported in one line (exit status 2) with the launch whose every attempt has a store of its own."""
    from dist_utils import _free_port

    from fastssl.cli_errors import report
    from fastssl.engine.run import RejoinError, init_distributed

    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port()), "TORCHELASTIC_RESTART_COUNT": "1",
                       "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RejoinError) as info:
        init_distributed(timeout_s=0.5)
    assert not torch.distributed.is_initialized()
    status, line = report(info.value)
    assert status == 2 and "\n" not in line and line.startswith("error: torchrun restart 1: could not rejoin")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --rdzv-backend c10d" in line
