import math

import numpy as np
import pytest
import torch

from fastssl.config import MethodConfig
from fastssl.engine import LARS, build_optimizer, build_schedules, cosine_schedule, resolve_config


def test_cosine_schedule_hand_values():
    s = cosine_schedule(1.0, 0.0, 6, warmup_steps=2)
    # warm-up 0, 0.5; cosine over t = 0..3 of T = 4: (1 + cos(pi t / 4)) / 2
    expected = [0.0, 0.5, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]
    np.testing.assert_allclose(s, expected, atol=1e-12)
    # DINO form: t / T with T = 3 never reaches the end value: 1 - 0.004 * (1 + cos(pi t / 3)) / 2
    np.testing.assert_allclose(cosine_schedule(0.996, 1.0, 3), [0.996, 0.997, 0.999], atol=1e-12)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(1.0, 0.0, 3, warmup_steps=4)


def test_build_schedules_scales_lr_and_cosines_wd():
    cfg = resolve_config(MethodConfig, overrides=dict(
        epochs=2, batch_size=512, base_lr=0.03, lr_batch_divisor=256, warmup_epochs=1, weight_decay=0.04,
        weight_decay_end=0.4, min_lr=1e-6))
    s = build_schedules(cfg, steps_per_epoch=5)
    assert s["lr"].shape == s["weight_decay"].shape == (10,)
    assert s["lr"][0] == 0.0 and s["lr"][5] == pytest.approx(0.06)      # 0.03 * 512 / 256 after warm-up
    assert s["lr"][-1] > 1e-6 and s["lr"][-1] < s["lr"][6]
    assert s["weight_decay"][0] == pytest.approx(0.04) and s["weight_decay"][-1] < 0.4
    assert np.all(np.diff(s["weight_decay"]) > 0)
    flat = resolve_config(MethodConfig, overrides=dict(epochs=1, weight_decay=0.1))
    assert np.all(build_schedules(flat, 4)["weight_decay"] == 0.1)


def test_lars_step_matches_formula():
    torch.manual_seed(0)
    w, b = torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    gw, gb = torch.randn(3, 4), torch.randn(4)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    d = gw + 0.1 * w0
    d = d * (0.001 * w0.norm() / d.norm())
    torch.testing.assert_close(w.detach(), w0 - 0.5 * d)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)   # 1-d: no wd, no trust ratio
    w.grad, b.grad = gw.clone(), gb.clone()
    w1 = w.detach().clone()
    opt.step()
    d2 = gw + 0.1 * w1
    d2 = d2 * (0.001 * w1.norm() / d2.norm())
    torch.testing.assert_close(w.detach(), w1 - 0.5 * (0.9 * d + d2))


def test_build_optimizer_choices():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    for name, cls in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("lars", LARS)):
        cfg = resolve_config(MethodConfig, overrides={"optimizer": name})
        assert isinstance(build_optimizer(cfg, [{"params": [p]}]), cls)
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adamw, lars; got 'adam'"):
        resolve_config(MethodConfig, overrides={"optimizer": "adam"})
