"""engine.signals: real signals sent to this process, and the agreement of two gloo ranks."""

import os
import signal
import threading

import pytest
from dist_utils import run_gloo

from fastssl.engine.signals import STOP_SIGNALS, RankAgreement, StopSignals


def test_a_stop_signal_sets_the_flag_and_the_handlers_come_back():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    logged = []
    with StopSignals(logged.append) as signals:
        assert signals.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)  # a later one changes nothing: the first decides
        assert signals.received == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
    assert logged == ["SIGTERM: finishing this step, then saving a checkpoint (Ctrl-C again to quit at once)"]


def test_a_second_ctrl_c_raises_at_once():
    with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
        with StopSignals(lambda m: None) as signals:
            os.kill(os.getpid(), signal.SIGINT)
            assert signals.received == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_no_handler_is_installed():
    seen = []

    def enter():
        with StopSignals(lambda m: None):
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert seen == [signal.SIG_DFL]


def test_one_process_agrees_with_itself():
    agreement = RankAgreement(world=1, timeout_s=10)
    assert agreement.group is None
    assert agreement.stop(0) == 0 and agreement.stop(signal.SIGTERM) == signal.SIGTERM
    assert agreement.first_nonfinite(None) is None
    assert agreement.first_nonfinite((3, float("inf"))) == (3, float("inf"))


def _agree(rank, world):
    agreement = RankAgreement(world, timeout_s=60)
    # rank 1 receives SIGUSR1 during step 3; every rank asks at every step boundary
    stops = [agreement.stop(int(signal.SIGUSR1) if rank == 1 and step >= 3 else 0) for step in range(6)]
    agreement.close()
    # rank 0 saw inf at step 7, rank 1 nan at step 5: both agree on step 5's nan
    bad = agreement.first_nonfinite((7, float("inf")) if rank == 0 else (5, float("nan")))
    none = agreement.first_nonfinite(None)
    only_rank_1 = agreement.first_nonfinite((2, float("-inf")) if rank == 1 else None)
    return {"stops": stops, "bad": (bad[0], str(bad[1])), "none": none, "only_rank_1": only_rank_1}


def test_two_ranks_stop_after_the_same_step_and_agree_on_the_first_bad_loss():
    ranks = run_gloo(_agree, 2)
    for result in ranks:
        # the flag raised at step 3 is read back one step later, on both ranks alike
        assert result["stops"] == [0, 0, 0, 0, int(signal.SIGUSR1), int(signal.SIGUSR1)]
        assert result["bad"] == (5, "nan") and result["none"] is None
        assert result["only_rank_1"] == (2, float("-inf"))
