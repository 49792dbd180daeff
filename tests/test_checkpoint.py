import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ttrl import checkpoint as ckpt
from ttrl.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint

ROOT = Path(__file__).parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
# Non-trivial training (ROUGE-L rewards give non-zero gradients on a random model), small and quick.
RUN = ["reward.kind=similarity", "train.steps=4", "train.save_every=1", "train.prompts_per_step=2",
       "rollout.n_votes=4", "reward.n_train_samples=2", "rollout.max_new_tokens=4", "data.arithmetic.n=4",
       "eval.n_samples=1", "eval.greedy=false"]


def _train(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ttrl", "train", "--config", str(TINY), "--output-dir", str(out), "--quiet",
           "--no-report", *RUN, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


PPO = ["algorithm.advantage=ppo", "algorithm.critic_lr=1e-3"]


@pytest.mark.parametrize("algorithm", [pytest.param([], id="grpo"), pytest.param(PPO, id="ppo", marks=pytest.mark.slow),
                                       pytest.param(["model.lora_rank=4"], id="lora", marks=pytest.mark.slow),
                                       pytest.param(["rollout.vote_round=2"], id="sequential", marks=pytest.mark.slow)])
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path, algorithm):
    """SIGTERM (clean stop), then SIGKILL at an arbitrary moment, a torn metrics line, two resumes:
    same weights and the same metrics rows as a run that was never interrupted (with PPO, the
    critic's weights and optimizer too: its values and losses are in the rows)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference = _train(ref, *algorithm)  # in parallel: the two runs share nothing but the CPU
    proc = _train(run, *algorithm)
    _wait_for(run / "checkpoints" / "step-00000001" / "state.json", proc)
    proc.send_signal(signal.SIGTERM)  # finishes step 2, saves it, exits with a resume hint
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    # Step 2, or step 1 when the signal landed just as checkpoint 1 was written (the run then stops on it).
    stopped = re.search(r"stopped by SIGTERM after step ([12]) of 4", err)
    assert stopped and "--resume" in err and "Traceback" not in err, err[-2000:]
    assert [p.name for p in list_checkpoints(run)] == [f"step-0000000{i}" for i in range(1, int(stopped[1]) + 1)]

    proc = _train(run, "--resume", *algorithm)
    _wait_for(run / "checkpoints" / "step-00000003" / "state.json", proc)
    proc.kill()
    proc.wait()
    assert not (run / "summary.json").exists(), "the kill came too late to test anything"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train/rew')  # a row torn by the kill

    proc = _train(run, "--resume", *algorithm)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    _, ref_err = reference.communicate(timeout=180)
    assert reference.returncode == 0, ref_err[-2000:]

    from safetensors.torch import load_file

    weights = "adapter_model.safetensors" if (ref / "model" / "adapter_model.safetensors").exists() else "model.safetensors"
    a, b = load_file(ref / "model" / weights), load_file(run / "model" / weights)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows = _rows(ref)
    assert [r["step"] for r in rows if "train/reward" in r] == [1, 2, 3, 4]
    assert any(r.get("optim/grad_norm") for r in rows), "the test needs non-zero gradients to mean anything"
    assert _rows(run) == rows
    assert json.loads((run / "summary.json").read_text()) == json.loads((ref / "summary.json").read_text())
    if algorithm == PPO:
        assert any(r.get("critic/grad_norm") for r in rows), "the critic must learn for the test to mean anything"
        a, b = (load_file(d / "checkpoints" / "step-00000004" / "critic.safetensors") for d in (ref, run))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_model_and_cli_refuses_silent_overwrite(tmp_path, capsys):
    from ttrl.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "config.json").write_text('{"model": {}, "rollout": {}, "reward": {}}')  # ttrl's, not a model's
    assert main(["train", "--config", str(TINY), "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert main(["train", "--config", str(TINY), "--resume", "--overwrite", "--output-dir", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err


# --- the checkpoint component on its own: small model, no training -------------------------------

def _parts(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return opt, sched


def _step(model, opt, sched):
    loss = sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _small_model():
    from ttrl.config import ModelConfig
    from ttrl.models import load_model

    arch = {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
            "num_key_value_heads": 1}
    return load_model(ModelConfig(architecture=arch), seed=0)[0]


@pytest.fixture()
def small():
    return _small_model()


def test_round_trip_restores_weights_optimizer_and_every_rng(tmp_path, small):
    opt, sched = _parts(small)
    _step(small, opt, sched)
    save_checkpoint(tmp_path, 1, small, opt, sched, state={"evals": {"adapt": [{"step": 0, "x": 0.5}]}})
    saved = _snapshot(small)
    draws = (random.random(), np.random.rand(), torch.rand(1))
    _step(small, opt, sched)  # move everything on
    state = load_checkpoint(tmp_path, small, opt, sched)
    assert state["step"] == 1 and state["evals"] == {"adapt": [{"step": 0, "x": 0.5}]}
    assert all(torch.equal(p, saved[n]) for n, p in small.named_parameters())
    assert (random.random(), np.random.rand(), torch.rand(1)) == draws
    # The restored optimizer continues exactly as the original would have.
    opt2, sched2 = _parts(small)
    _step(small, opt, sched)
    after = _snapshot(small)
    load_checkpoint(tmp_path, small, opt2, sched2)
    _step(small, opt2, sched2)
    assert all(torch.equal(p, after[n]) for n, p in small.named_parameters())


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, small, monkeypatch):
    opt, sched = _parts(small)
    save_checkpoint(tmp_path, 1, small, opt, sched, state={})
    good = _snapshot(small)
    _step(small, opt, sched)

    def crash(*args, **kwargs):  # weights.safetensors is written, trainer.pt is not
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, small, opt, sched, state={})
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000001"]  # no half-written .tmp-step left
    assert load_checkpoint(tmp_path, small, opt, sched)["step"] == 1
    assert all(torch.equal(p, good[n]) for n, p in small.named_parameters())
    # The next successful save clears the debris and keeps only the latest `keep`.
    for step in (2, 3, 4):
        save_checkpoint(tmp_path, step, small, opt, sched, state={}, keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000003", "step-00000004"]


def test_a_full_disk_while_saving_the_weights_is_an_enospc_error_and_leaves_nothing(tmp_path, small, monkeypatch):
    import errno

    opt, sched = _parts(small)

    def full(*args, **kwargs):  # what safetensors raises: its own type, the OS's words
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           f"message: \"{os.strerror(errno.ENOSPC)}\" }})")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(OSError) as e:
        save_checkpoint(tmp_path, 1, small, opt, sched, state={})
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path / "checkpoints") == []


def test_a_full_disk_while_saving_the_trainer_state_is_an_enospc_error_and_leaves_nothing(tmp_path, small,
                                                                                          monkeypatch):
    """torch.save onto a full disk (here trainer.pt leads to /dev/full) is the OS's ENOSPC, which the
    command line turns into one error line, like a full disk under the safetensors writes."""
    import errno

    import safetensors.torch

    opt, sched = _parts(small)
    save_file = safetensors.torch.save_file

    def then_full(tensors, path, *args, **kwargs):
        save_file(tensors, path, *args, **kwargs)
        (Path(path).parent / ckpt.TRAINER).symlink_to("/dev/full")

    monkeypatch.setattr("safetensors.torch.save_file", then_full)
    with pytest.raises(OSError) as e:
        save_checkpoint(tmp_path, 1, small, opt, sched, state={})
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path / "checkpoints") == []


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, small, capsys):
    opt, sched = _parts(small)
    save_checkpoint(tmp_path, 1, small, opt, sched, state={})
    good = _snapshot(small)
    _step(small, opt, sched)
    latest = save_checkpoint(tmp_path, 2, small, opt, sched, state={})
    data = (latest / ckpt.TRAINER).read_bytes()
    (latest / ckpt.TRAINER).write_bytes(data[: len(data) // 2])
    assert load_checkpoint(tmp_path, small, opt, sched)["step"] == 1
    assert "step-00000002 is damaged" in capsys.readouterr().err
    assert all(torch.equal(p, good[n]) for n, p in small.named_parameters())


def test_after_falling_back_the_damaged_later_checkpoint_does_not_crowd_out_new_ones(tmp_path, small, capsys):
    """Resumed from step 1 because step 3 is damaged, then saving step 2 with keep=1: step 2 is kept
    (the damaged step 3 used to outrank it and get it retired the moment it was written)."""
    opt, sched = _parts(small)
    save_checkpoint(tmp_path, 1, small, opt, sched, state={})
    damaged = save_checkpoint(tmp_path, 3, small, opt, sched, state={})
    (damaged / ckpt.TRAINER).write_bytes(b"torn")
    assert load_checkpoint(tmp_path, small, opt, sched)["step"] == 1
    save_checkpoint(tmp_path, 2, small, opt, sched, state={}, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002"]
    assert load_checkpoint(tmp_path, small, opt, sched)["step"] == 2


def test_lora_checkpoint_holds_only_the_adapter(tmp_path, small):
    from ttrl.config import ModelConfig
    from ttrl.models import add_lora

    model = add_lora(small, ModelConfig(lora_rank=2, lora_target_modules=["q_proj"]))
    opt, sched = _parts(model)
    _step(model, opt, sched)
    path = save_checkpoint(tmp_path, 1, model, opt, sched, state={})
    from safetensors.torch import load_file

    names = list(load_file(path / ckpt.WEIGHTS))
    assert names and all("lora_" in n for n in names)
    with pytest.raises(CheckpointError, match="different model"):
        plain = _small_model()
        load_checkpoint(tmp_path, plain, *_parts(plain))


def _flip(path: Path, n: int = 4096) -> None:
    """Flip every bit of `n` bytes in the middle of a file (its tensor data, past any header)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_the_weights_fall_back_to_the_previous_checkpoint(tmp_path, small, capsys):
    """4 KB of damaged weights still parse as a valid safetensors file: only the checksum tells."""
    opt, sched = _parts(small)
    save_checkpoint(tmp_path, 1, small, opt, sched, state={})
    good = _snapshot(small)
    _step(small, opt, sched)
    latest = save_checkpoint(tmp_path, 2, small, opt, sched, state={})
    assert (latest / ckpt.WEIGHTS).stat().st_size > 3 * 4096
    _flip(latest / ckpt.WEIGHTS)
    assert load_checkpoint(tmp_path, small, opt, sched)["step"] == 1
    err = capsys.readouterr().err
    assert "step-00000002 is damaged" in err and "weights.safetensors does not match its checksum" in err
    assert all(torch.equal(p, good[n]) for n, p in small.named_parameters())


def test_checksums_cover_every_file_and_read_with_sha256sum(tmp_path, small):
    opt, sched = _parts(small)
    path = save_checkpoint(tmp_path, 1, small, opt, sched, state={})
    assert set(ckpt.read_checksums(path)) == {ckpt.WEIGHTS, ckpt.TRAINER, ckpt.STATE}
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--quiet", "-c", ckpt.CHECKSUMS], cwd=path, check=True)
    for damage in (ckpt.TRAINER, ckpt.STATE):  # any file: the optimizer state, the counters
        other = save_checkpoint(tmp_path / damage, 1, small, opt, sched, state={"bad_steps": 0})
        text = (other / damage).read_bytes()
        (other / damage).write_bytes(text.replace(b'"bad_steps": 0', b'"bad_steps": 7') if damage == ckpt.STATE
                                     else text[:-4096] + bytes(b ^ 1 for b in text[-4096:]))
        assert load_checkpoint(tmp_path / damage, small, opt, sched) is None
    gone = save_checkpoint(tmp_path / "gone", 1, small, opt, sched, state={})
    (gone / ckpt.CHECKSUMS).unlink()  # deleting the checksums does not turn the check off
    assert load_checkpoint(tmp_path / "gone", small, opt, sched) is None


def test_checkpoints_from_before_checksums_still_load(tmp_path, small):
    opt, sched = _parts(small)
    _step(small, opt, sched)
    path = save_checkpoint(tmp_path, 3, small, opt, sched, state={"evals": {}})
    saved = _snapshot(small)
    (path / ckpt.CHECKSUMS).unlink()  # as an older ttrl wrote it: no SHA256SUMS, no mention in state.json
    state = json.loads((path / ckpt.STATE).read_text())
    del state["checksums"]
    (path / ckpt.STATE).write_text(json.dumps(state))
    _step(small, opt, sched)
    assert load_checkpoint(tmp_path, small, opt, sched)["step"] == 3
    assert all(torch.equal(p, saved[n]) for n, p in small.named_parameters())


# --- PPO: the critic is part of the checkpoint --------------------------------------------------------

def _small_critic():
    from ttrl.critic import ValueModel

    return ValueModel(_small_model().model, 16)


def test_critic_round_trip_and_checkpoints_without_a_critic(tmp_path, small, capsys):
    """The critic's weights and optimizer come back with the policy's; its file is checksummed (a
    damaged one falls back to the checkpoint before); a checkpoint without a critic (GRPO, or an
    older ttrl) still loads for a run without one and is refused by one that needs it."""
    opt, sched = _parts(small)
    critic = _small_critic()
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-2)
    _step(critic, critic_opt, torch.optim.lr_scheduler.LambdaLR(critic_opt, lambda s: 1.0))
    path = save_checkpoint(tmp_path, 1, small, opt, sched, state={}, critic=(critic, critic_opt))
    assert set(ckpt.read_checksums(path)) == {ckpt.WEIGHTS, ckpt.TRAINER, ckpt.STATE, ckpt.CRITIC}
    saved = _snapshot(critic)
    fresh = _small_critic()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert load_checkpoint(tmp_path, small, opt, sched, critic=(fresh, fresh_opt))["step"] == 1
    assert all(torch.equal(p, saved[n]) for n, p in fresh.named_parameters())
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], critic_opt.state_dict()["state"][0]["exp_avg"])
    assert load_checkpoint(tmp_path, small, opt, sched)["step"] == 1  # a run without a critic leaves it out

    path = save_checkpoint(tmp_path, 2, small, opt, sched, state={}, critic=(critic, critic_opt))
    _flip(path / ckpt.CRITIC)
    assert load_checkpoint(tmp_path, small, opt, sched, critic=(fresh, fresh_opt))["step"] == 1
    assert "critic.safetensors does not match its checksum" in capsys.readouterr().err

    grpo = tmp_path / "grpo"
    save_checkpoint(grpo, 1, small, opt, sched, state={})
    assert load_checkpoint(grpo, small, opt, sched)["step"] == 1
    with pytest.raises(CheckpointError, match="no critic.*algorithm.advantage"):
        load_checkpoint(grpo, small, opt, sched, critic=(fresh, fresh_opt))
