import math

import pytest
import torch

from ttrl.schedule import lr_factor, make_scheduler


def test_cosine_with_warmup_as_verl_computes_it():
    # 100 steps, 3 of warm-up (int(0.03 * 100)): 0, 1/3, 2/3, then the half cosine from 1 to 0.
    assert [lr_factor(s, 100, 3, "cosine") for s in range(3)] == [0.0, 1 / 3, 2 / 3]
    assert lr_factor(3, 100, 3, "cosine") == 1.0
    assert lr_factor(3 + 97 // 2, 100, 3, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 48 / 97)))
    assert lr_factor(100, 100, 3, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_is_flat_after_warmup():
    assert [lr_factor(s, 10, 2, "constant") for s in range(5)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert lr_factor(0, 10, 0, "constant") == 1.0  # no warm-up: the first step trains at lr


def test_scheduler_steps_the_optimizer_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = make_scheduler(opt, "cosine", warmup_ratio=0.25, total_steps=8)  # 2 warm-up steps
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.0, 1.0, 2.0]
    assert lrs[3] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi / 6)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
