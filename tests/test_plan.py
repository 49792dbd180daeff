"""ttrl.plan: hand-checked bytes of the tiny shape, sharding and LoRA, the CLI, the suggestions,
and the sizes taken from the sampler's and the update's own functions."""

import json

import pytest
import torch

from ttrl import batches
from ttrl.cli import main
from ttrl.config import load_config
from ttrl.plan import CUDA_RESERVE, GB, fit_error, plan, shape_of
from ttrl.rollout import Sampling, _batch_rows, batch_rows

# configs/tiny.yaml's shape: SmolLM2's vocabulary (tied), 2 layers, hidden 64, MLP 128, 4 heads, 2 KV heads.
EMBED = 49152 * 64
LAYER = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k + v, o, gate + up + down, two norms
PARAMS = EMBED + 2 * LAYER + 64  # + the final norm
BIG = ["rollout.max_new_tokens=3072", "algorithm.micro_batch_size=16", "algorithm.gradient_checkpointing=false",
       "eval.before=false"]
"""Long answers, no evaluation: the update does not fit 1.4 GB."""


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("configs/tiny.yaml", ["rollout.max_new_tokens=64"])
    return cfg, shape_of(cfg)


def test_weights_adamw_and_kv_cache_bytes_by_hand(tiny):
    cfg, shape = tiny
    assert shape.params == PARAMS == 3_219_776
    p = plan(cfg, device="cpu", prompt_tokens=24, shape=shape)
    rollout = p.phases["rollout"]
    assert rollout["weights"] == PARAMS * 4  # float32
    assert "gradients" not in rollout and p.phases["update"]["gradients"] == PARAMS * 4  # freed after the update
    assert rollout["AdamW state"] == 2 * PARAMS * 4  # exp_avg and exp_avg_sq
    # 4 prompts x N=8 decode at once; each row holds 24 + 64 tokens of
    # 2 layers x 2 KV heads x head_dim 16 x (K and V) x 4 bytes = 512 bytes a token.
    assert p.sizes["rollout"]["rows"] == 32
    assert rollout["KV cache"] == 32 * (24 + 64) * 512


def test_fsdp_divides_gradients_and_adamw_by_k(tiny):
    cfg, shape = tiny
    one = plan(cfg, 1, 80, prompt_tokens=24, shape=shape).phases["update"]
    four = plan(cfg, 4, 80, fsdp=True, prompt_tokens=24, shape=shape).phases["update"]
    assert four["gradients"] == one["gradients"] // 4
    assert four["AdamW state"] == one["AdamW state"] // 4
    assert four["weights"] == one["weights"] // 4
    ddp = plan(cfg, 4, 80, fsdp=False, prompt_tokens=24, shape=shape).phases["update"]
    assert ddp["AdamW state"] == one["AdamW state"]  # DDP copies everything


def test_lora_shrinks_gradients_and_optimizer_state(tiny):
    cfg, shape = tiny
    lora = load_config("configs/tiny.yaml", ["rollout.max_new_tokens=64", "model.lora_rank=8"])
    p = plan(lora, device="cpu", prompt_tokens=24, shape=shape).phases["update"]
    adapter = 8 * 2 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))  # r x (in + out) of q, k, v, o in 2 layers
    assert p["gradients"] == adapter * 4 and p["AdamW state"] == 2 * adapter * 4  # peft keeps adapters in float32
    assert p["weights"] == PARAMS * 4  # the frozen base is still there


def test_plan_json_from_the_command_line(capsys):
    code = main(["plan", "--config", "configs/tiny.yaml", "--json", "--gpu-memory", "24", "rollout.n_votes=16"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["fits"] is True and out["gpu_memory_gb"] == 24
    assert out["sizes"]["rollout"]["rows"] == 4 * 16  # all 4 prompts x N=16 at once
    assert set(out["phases"]) >= {"rollout", "update", "optimizer step"}
    assert out["peak_gb"] == max(ph["peak_gb"] for ph in out["phases"].values())


def test_table_says_whether_it_fits(capsys):
    assert main(["plan", "--config", "configs/tiny.yaml", "--gpu-memory", "1.4", "rollout.max_new_tokens=3072",
                 "eval.before=false"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "fits with" in out


def test_every_suggestion_makes_a_plan_that_does_not_fit_fit(tiny):
    _, shape = tiny
    cfg = load_config("configs/tiny.yaml", BIG)
    base = plan(cfg, 1, 1.4, prompt_tokens=24, shape=shape)
    assert not base.fits and base.suggestions
    kinds = {s["change"].split("=")[0] for s in base.suggestions}
    assert "algorithm.micro_batch_tokens" in kinds
    for s in base.suggestions:
        fixed = load_config("configs/tiny.yaml", [*BIG, *s["overrides"]])
        assert plan(fixed, s["gpus"], 1.4, prompt_tokens=24, shape=shape).fits, s


def test_fit_error_says_by_how_much_and_what_to_change(tiny):
    cfg = load_config("configs/tiny.yaml", BIG)
    message = fit_error(cfg, 1, 1.4, False, prompt_tokens=24)
    assert message and "GB more than a 1 GB GPU" in message and "algorithm.micro_batch_tokens=" in message
    assert fit_error(cfg, 1, 80, False, prompt_tokens=24) is None


def test_rollout_rows_are_the_samplers_own(tiny):
    """The plan's decode rows come from rollout.batch_rows: on CPU the sampler's chunking, on a
    GPU the budget left after what stays resident; change a setting and both move together."""
    from ttrl.models import load_model

    cfg, shape = tiny
    model, _ = load_model(cfg.model)
    prompts = [[1] * 24] * 4
    for rows in (8, 16):
        cfg.rollout.max_batch_rows = rows
        p = plan(cfg, device="cpu", prompt_tokens=24, shape=shape)
        assert p.sizes["rollout"]["rows"] == _batch_rows(model, prompts, Sampling.of(cfg.rollout, n=8)) == rows
    cfg.rollout.max_batch_rows = 512
    cfg.rollout.n_votes, cfg.train.prompts_per_step = 4, 64
    gpu = plan(cfg, 1, 1.2, prompt_tokens=24, shape=shape)
    resident = sum(v for k, v in gpu.phases["rollout"].items() if k not in ("KV cache", "prefill / decode step"))
    free = int(1.2 * GB) - CUDA_RESERVE - resident
    assert gpu.sizes["rollout"]["rows"] == batch_rows(cfg.rollout, 4, shape.config, torch.float32, 24, free) < 256


def test_micro_batches_are_the_updates_own(tiny):
    cfg, shape = tiny
    cfg.algorithm.micro_batch_tokens = 2 * (24 + 64)
    p = plan(cfg, device="cpu", prompt_tokens=24, shape=shape)
    packed = batches.pack(batches.samples_of([0], [[64] * 4]), [[64] * 4], [24], 16, 2 * (24 + 64))
    assert p.sizes["update"]["micro_batch_rows"] == max(sum(len(x.samples) for x in mb) for mb in packed) == 2
    cfg.algorithm.micro_batch_tokens = 0
    assert plan(cfg, device="cpu", prompt_tokens=24, shape=shape).sizes["update"]["micro_batch_rows"] == 4 * 4
