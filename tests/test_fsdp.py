"""FSDP2 (train.parallel=fsdp): 2 processes under torchrun on CPU (gloo) reach what 1 process
reaches; sharded checkpoints resume exactly, and fall back past damage."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_checkpoint import _wait_for
from test_distributed import ENV, LENGTH_VOTES, RUN, _assert_same_run, _rows, _ttrl
from ttrl.checkpoint import CheckpointError, list_checkpoints, save_checkpoint
from ttrl.config import ConfigError, ModelConfig, load_config
from ttrl.distributed import Dist
from ttrl.fsdp import decoder_layers, load_sharded, save_sharded

ROOT = Path(__file__).parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
FSDP = ["train.parallel=fsdp"]


def test_two_fsdp_processes_train_and_resume_like_one(tmp_path):
    """torchrun with 2 processes, each holding half the model (FSDP2), stopped after step 2 (a
    sharded checkpoint) and resumed to step 3, ends where 1 process running 3 steps ends: weights,
    every metric, evaluation, rollouts; model/ is one whole Hugging Face model."""
    one, two = tmp_path / "one", tmp_path / "two"
    _ttrl(one, *RUN, "train.steps=3")
    _ttrl(two, *RUN, *FSDP, "train.steps=2", procs=2)
    shards = two / "checkpoints" / "step-00000002" / "shards"
    assert sorted(os.listdir(shards)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    proc = _ttrl(two, *RUN, *FSDP, "train.steps=3", "--resume", procs=2)
    assert "resuming from" in proc.stderr and "step-00000002" in proc.stderr
    _assert_same_run(one, two)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", [
    pytest.param(["algorithm.advantage=ppo", "algorithm.critic_lr=1e-3", "algorithm.gamma=0.9", "algorithm.lam=0.8"],
                 id="ppo"),
    pytest.param(["model.lora_rank=4", "algorithm.lr=0.01"], id="lora")])
def test_ppo_and_lora_under_fsdp_train_like_one_process(tmp_path, algorithm):
    """PPO with its critic sharded too (values gathered, its gradient clipped beside the policy's),
    and LoRA (frozen and trained parameters in the same FSDP units): 2 FSDP processes, stopped and
    resumed, end where 1 process ends."""
    ppo = "algorithm.advantage=ppo" in algorithm
    run = [a for a in RUN if not (ppo and a.startswith("algorithm.advantage"))] + algorithm
    one, two = tmp_path / "one", tmp_path / "two"
    _ttrl(one, *run, "train.steps=3")
    _ttrl(two, *run, *FSDP, "train.steps=2", procs=2)
    _ttrl(two, *run, *FSDP, "train.steps=3", "--resume", procs=2)
    _assert_same_run(one, two)
    if ppo:
        assert any(r.get("critic/grad_norm") for r in _rows(two))


@pytest.mark.slow
def test_contrast_and_sequential_voting_under_fsdp_train_like_one_process(tmp_path):
    """reward.contrast (labels elected against the whole step's votes) and sequential voting (votes
    drawn in rounds, each round's sampling gathering the sharded parameters on every rank)."""
    script = tmp_path / "length_votes.py"
    script.write_text(LENGTH_VOTES)
    args = ["reward.kind=majority", "reward.contrast=true", "rollout.vote_round=2", "data.arithmetic.n=8",
            "data.holdout=0", "train.steps=2", "eval.before=false", "eval.n_samples=1", "eval.greedy=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    _ttrl(one, *args, script=script)
    _ttrl(two, *args, *FSDP, procs=2, script=script)
    _assert_same_run(one, two)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path):
    """DCP reshards on load: stopped with 2 processes, resumed with 1, the same end."""
    one, two = tmp_path / "one", tmp_path / "two"
    _ttrl(one, *RUN, "train.steps=3")
    _ttrl(two, *RUN, *FSDP, "train.steps=2", procs=2)
    _ttrl(two, *RUN, *FSDP, "train.steps=3", "--resume")
    _assert_same_run(one, two)


def _launch(out: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ttrl",
           "train", "--config", str(TINY), "--output-dir", str(out), "--quiet", "--no-report", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _kill_tree(pid: int) -> None:
    """SIGKILL to a process and all its descendants at once (torchrun starts its workers in
    sessions of their own, so a process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_stopped_and_killed_fsdp_run_resumes_exactly_past_a_damaged_shard(tmp_path):
    """SIGTERM to torchrun (forwarded to both workers: they stop after the same step, with a sharded
    checkpoint), --resume, then SIGKILL to the launcher and both workers at an arbitrary moment
    after the next checkpoint, whose rank-1 shard is then damaged on disk: --resume warns, falls
    back to the checkpoint before, and ends with the metrics and weights of an uninterrupted run,
    bit for bit."""
    from safetensors.torch import load_file

    args = [*RUN, *FSDP, "train.steps=4", "train.save_every=1"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference = _launch(ref, *args)
    proc = _launch(run, *args)
    _wait_for(run / "checkpoints" / "step-00000001" / "state.json", proc, timeout=400)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    # Step 2, or step 1 when the signal landed just as checkpoint 1 was written (the run then stops on it).
    stopped = re.search(r"stopped by SIGTERM after step ([12]) of 4", err)
    assert stopped, err[-3000:]
    assert [p.name for p in list_checkpoints(run)] == [f"step-0000000{i}" for i in range(1, int(stopped[1]) + 1)]

    proc = _launch(run, *args, "--resume")
    _wait_for(run / "checkpoints" / "step-00000003" / "state.json", proc, timeout=400)
    _kill_tree(proc.pid)
    proc.wait()
    time.sleep(1)  # the workers' deaths are reaped by nobody we wait on
    assert not (run / "summary.json").exists(), "the kill came too late to test anything"
    newest = list_checkpoints(run)[-1]
    shard = newest / "shards" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    resumed = _launch(run, *args, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"checkpoint {newest} is damaged" in err and "shards/__1_0.distcp" in err
    assert f"resuming from {newest.parent / f'step-{int(newest.name[5:]) - 1:08d}'}" in err
    _, ref_err = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_err[-3000:]
    assert _rows(run) == _rows(ref) and any(r.get("optim/grad_norm") for r in _rows(ref))
    a, b = load_file(ref / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


PIECES = '''
import torch, torch.distributed as td
from ttrl.config import ModelConfig
from ttrl.fsdp import full_params, local_bytes, shard_model
from ttrl.update import LastGoodWeights, zero_loss
from ttrl.models import load_model
from ttrl.rollout import Sampling, generate
from ttrl.scoring import score

td.init_process_group("gloo")
rank = td.get_rank()
arch = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2}
whole, tok = load_model(ModelConfig(architecture=arch), seed=0)
model = shard_model(load_model(ModelConfig(architecture=arch), seed=0)[0], torch.device("cpu"), 2)
# Ranks decode different numbers of steps: one all-gather before, none during.
prompts, seeds, n_new = ([[1, 2, 3, 4], [5, 6]], [11, 12], 8) if rank == 0 else ([[7, 8, 9]], [13], 3)
s = Sampling(n=3, max_new_tokens=n_new)
with full_params(model) as gathered:
    got = generate(gathered, tok, prompts, s, seeds=seeds)
assert got.completion_ids == generate(whole, tok, prompts, s, seeds=seeds).completion_ids
# Rank 0 trains on one prompt, rank 1 has nothing: its zero loss joins the reduce-scatter.
pad = tok.pad_token_id
if rank == 0:  # log-probs from one-position chunks of logits, recomputed in the backward
    logp, mask = score(model, [prompts[0]], got.completion_ids[:3], 1.0, pad, group_size=3, chunk_mb=0.2)
    loss = (logp * mask).sum()
else:
    loss = zero_loss(model, pad, 1.0)
loss.backward()
grad = model.model.layers[0].self_attn.q_proj.weight.grad.full_tensor()
if rank == 0:
    logp, mask = score(whole, [prompts[0]], got.completion_ids[:3], 1.0, pad, group_size=3)
    (logp * mask).sum().backward()
    torch.testing.assert_close(grad, whole.model.layers[0].self_attn.q_proj.weight.grad / 2)  # averaged
# Memory: each rank holds half the parameters and half of AdamW's two moments.
for m in (model, whole):
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    m.bytes = local_bytes(m, opt)
assert abs(model.bytes["params"] / whole.bytes["params"] - 0.5) < 0.01, (model.bytes, whole.bytes)
assert abs(model.bytes["optimizer"] / whole.bytes["optimizer"] - 0.5) < 0.01, (model.bytes, whole.bytes)
assert whole.bytes["optimizer"] == 2 * whole.bytes["params"]
# LastGoodWeights copies and restores this rank's shards.
good = LastGoodWeights(model)
before = model.model.layers[0].mlp.up_proj.weight.full_tensor().clone()
with torch.no_grad():
    for p in model.parameters():
        p.mul_(3.0)
good.restore()
assert torch.equal(model.model.layers[0].mlp.up_proj.weight.full_tensor(), before)
print(f"rank {rank} bytes {model.bytes} of {whole.bytes}")
td.barrier()  # rank 0 finishes its checks before the group goes away
td.destroy_process_group()
'''


def test_fsdp_pieces_rollout_backward_memory_and_last_good_weights(tmp_path):
    """On 2 CPU processes with ttrl's shard_model: sampling under `full_params` gives the whole
    model's samples although the ranks decode different lengths; a rank's `zero_loss` completes the
    gradient reduction; each rank holds half the parameter and optimizer-state bytes of one
    unsharded process; LastGoodWeights restores the shards."""
    script = tmp_path / "pieces.py"
    script.write_text(PIECES)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 bytes" in proc.stdout


# --- in one process ---------------------------------------------------------------------------------

def _small():
    from ttrl.models import load_model

    arch = {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
            "num_key_value_heads": 1}
    model = load_model(ModelConfig(architecture=arch), seed=0)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _step(model, opt, sched):
    opt.zero_grad()
    sum((p ** 2).sum() for p in model.parameters()).backward()
    opt.step()
    sched.step()


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_sharded_checkpoint_restores_exactly_and_skips_damage(tmp_path, capsys):
    """One process writes the sharded format too (so a run resumes on any number of processes): a
    round trip restores weights, optimizer, scheduler and RNG; a damaged shard, or a missing
    .metadata, sends resume to the checkpoint before, with a warning naming the file."""
    model, opt, sched = _small()
    dist = Dist()
    _step(model, opt, sched)
    save_sharded(tmp_path, 1, model, opt, sched, {"evals": {}, "metric_rows": 1}, dist)
    at_1, draw_1 = _weights(model), torch.rand(3)
    _step(model, opt, sched)
    save_sharded(tmp_path, 2, model, opt, sched, {"evals": {}, "metric_rows": 2}, dist)
    _step(model, opt, sched)
    after_3 = _weights(model)

    fresh, fresh_opt, fresh_sched = _small()
    state = load_sharded(tmp_path, fresh, fresh_opt, fresh_sched, dist)
    assert state["step"] == 2 and state["metric_rows"] == 2
    _step(fresh, fresh_opt, fresh_sched)  # the optimizer continues exactly
    assert all(torch.equal(p, after_3[n]) for n, p in fresh.named_parameters())

    newest = tmp_path / "checkpoints" / "step-00000002"
    shard = newest / "shards" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-8] + b"damaged!")
    state = load_sharded(tmp_path, fresh, fresh_opt, fresh_sched, dist)
    assert state["step"] == 1 and "step-00000002 is damaged" in capsys.readouterr().err
    assert all(torch.equal(p, at_1[n]) for n, p in fresh.named_parameters())
    assert torch.equal(torch.rand(3), draw_1)  # the RNG as it was at step 1

    (newest / "shards" / ".metadata").unlink()
    shard.unlink()
    assert load_sharded(tmp_path, fresh, fresh_opt, fresh_sched, dist)["step"] == 1
    assert "shards/.metadata" in capsys.readouterr().err


def test_a_lora_adapter_round_trips_through_a_sharded_checkpoint(tmp_path, tiny):
    """Only the trained (adapter) weights are saved; the frozen base is rebuilt, not checked."""
    from conftest import TINY_ARCH
    from ttrl.models import load_model

    def lora():
        model = load_model(ModelConfig(architecture=TINY_ARCH, lora_rank=2), seed=0)[0]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    model, opt, sched = lora()
    _step(model, opt, sched)
    save_sharded(tmp_path, 1, model, opt, sched, {}, Dist())
    saved = torch.distributed.checkpoint.FileSystemReader(
        tmp_path / "checkpoints" / "step-00000001" / "shards").read_metadata().state_dict_metadata
    assert any("lora_A" in k for k in saved) and not any("mlp.up_proj" in k for k in saved)
    fresh, fresh_opt, fresh_sched = lora()
    assert load_sharded(tmp_path, fresh, fresh_opt, fresh_sched, Dist())["step"] == 1
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), model.parameters()))


def test_a_checkpoint_of_the_other_format_is_refused_with_the_setting_to_use(tmp_path):
    from ttrl.checkpoint import load_checkpoint

    model, opt, sched = _small()
    save_checkpoint(tmp_path / "ddp", 1, model, opt, sched, state={})
    with pytest.raises(CheckpointError, match="train.parallel=ddp"):
        load_sharded(tmp_path / "ddp", model, opt, sched, Dist())
    save_sharded(tmp_path / "fsdp", 1, model, opt, sched, {}, Dist())
    with pytest.raises(CheckpointError, match="train.parallel=fsdp"):
        load_checkpoint(tmp_path / "fsdp", model, opt, sched)


def test_fsdp_units_are_the_decoder_layers_of_the_policy_the_adapter_and_the_critic(tiny):
    from ttrl.critic import load_critic
    from ttrl.models import load_model
    from conftest import TINY_ARCH

    model, _ = tiny
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 2
    lora, _ = load_model(ModelConfig(architecture=TINY_ARCH, lora_rank=2), seed=0)
    assert len(decoder_layers(lora)) == 2
    assert len(decoder_layers(load_critic(ModelConfig(architecture=TINY_ARCH), seed=0))) == 2


def test_parallel_setting_is_checked_and_accelerates_own_engines_are_refused():
    with pytest.raises(ConfigError, match="train.parallel.*ddp, fsdp"):
        load_config(TINY, ["train.parallel=zero3"])
    for kind in ("DistributedType.FSDP", "DistributedType.DEEPSPEED"):
        launch = SimpleNamespace(process_index=0, num_processes=2, device=torch.device("cpu"), distributed_type=kind)
        with pytest.raises(ConfigError, match="train.parallel=fsdp"):
            Dist(launch, "fsdp")
