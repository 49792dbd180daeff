"""rollout.backend=vllm on vLLM's CPU build (`make install-vllm`), the code path GPUs run too: a
short TTRL run end to end, kill -9 and --resume, the weights reaching the engine after an update,
rewards comparable with the torch backend. On the embedded SmolLM2-135M: vLLM's CPU attention
refuses the tiny test shape's 16-dimensional heads. Engines take ~20 s to start, so the runs and
the in-process engine are shared by the module's tests."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (`make install-vllm` installs its CPU build)")

from ttrl.config import ConfigError, load_config  # noqa: E402
from ttrl.data import load_sets, run_sets  # noqa: E402
from ttrl.distributed import Dist  # noqa: E402
from ttrl.grading import is_equivalent  # noqa: E402
from ttrl.groups import vote  # noqa: E402
from ttrl.data import encode_problems  # noqa: E402
from ttrl.models import load_model  # noqa: E402
from ttrl.rollout import Sampling, TorchSampler  # noqa: E402
from ttrl.scoring import score  # noqa: E402
from ttrl.vllm_rollout import VLLMSampler, check  # noqa: E402

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
VLLM = ["rollout.backend=vllm"]
# Small and quick; ROUGE-L rewards give non-zero gradients, a high learning rate visible changes.
# No KL term (no reference model to load) and no evaluation before training: quicker runs.
RUN = [*VLLM, "reward.kind=similarity", "algorithm.lr=1e-4", "algorithm.kl_coef=0", "train.steps=3",
       "train.save_every=1", "train.prompts_per_step=2", "rollout.n_votes=4", "reward.n_train_samples=2",
       "data.arithmetic.n=4", "eval.n_samples=1", "eval.greedy=false", "eval.before=false"]
TIMEOUT = 1200  # seconds a run may take on a busy 2-core machine


def _train(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ttrl", "train", "--config", str(DEMO), "--output-dir", str(out), "--quiet",
           "--no-report", *RUN, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-3000:]


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(uninterrupted run, the same run killed with SIGKILL after its first checkpoint and resumed)."""
    root = tmp_path_factory.mktemp("vllm-runs")
    ref, run = root / "ref", root / "run"
    reference, proc = _train(ref), _train(run)  # in parallel: they share nothing but the CPU
    checkpoint, deadline = run / "checkpoints" / "step-00000001" / "state.json", time.time() + TIMEOUT
    while not checkpoint.exists():
        assert proc.poll() is None, f"run ended before its first checkpoint: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not (run / "summary.json").exists(), "the kill came too late to test anything"
    _finish(_train(run, "--resume"))
    _finish(reference)
    return ref, run


@pytest.fixture(scope="module")
def engine():
    """The demo's model and an engine on it, in this process, with the demo's prompts."""
    torch.set_num_threads(2)
    cfg = load_config(DEMO, VLLM)
    model, tok = load_model(cfg.model, seed=0)
    problems, extra = load_sets(cfg)
    adapt = run_sets(cfg, problems, extra, tok, model)["adapt"]
    threads = torch.get_num_threads()
    sampler = VLLMSampler(cfg, model, tok, Dist())
    return SimpleNamespace(cfg=cfg, model=model, tok=tok, sampler=sampler, threads=threads, problems=adapt,
                           prompt_ids=encode_problems(tok, adapt, cfg), kept=[])


def test_a_short_run_end_to_end(runs):
    ref, _ = runs
    rows = _rows(ref)
    steps = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert any(r["optim/grad_norm"] for r in steps), "the test needs non-zero gradients to mean anything"
    assert all(r["train/entropy"] is None for r in steps)  # vLLM gives none: NaN, written as null
    assert all(r["train/response_length"] > 0 for r in steps)
    evals = json.loads((ref / "summary.json").read_text())["evals"]
    assert {"adapt", "heldout"} <= set(evals)
    assert (ref / "model" / "model.safetensors").is_file()


def test_kill_9_and_resume_give_the_uninterrupted_run(runs):
    """The resumed run's engine starts from the base weights and takes the checkpoint's: every later
    step samples as the run whose engine was synced after each update."""
    from safetensors.torch import load_file

    ref, run = runs
    assert _rows(run) == _rows(ref)
    a, b = load_file(ref / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _vllm_logprobs(sampler, prompt_ids, seed):
    """vLLM's own log-probs of its samples (untruncated sampling: equal to ttrl's tempered ones)."""
    params = sampler._vllm.SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=seed, logprobs=0)
    out = sampler.llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0].outputs
    return [list(o.token_ids) for o in out], [torch.tensor([d[t].logprob for d, t in zip(o.logprobs, o.token_ids)])
                                               for o in out]


def _score(model, prompt_ids, completions, pad_id):
    with torch.no_grad():
        lp, _ = score(model, [prompt_ids], completions, 1.0, pad_id, group_size=len(completions))
    return [lp[i, :len(c)] for i, c in enumerate(completions)]


def test_after_an_update_the_engine_samples_from_the_new_weights(engine, runs):
    """sync() puts the trained weights into the running engine: it samples what a fresh engine built
    from the saved weights samples, with log-probs equal to the trained model's, not the base's."""
    ref, _ = runs
    trained, _ = load_model(type(engine.cfg.model)(name=str(ref / "model")), seed=0)
    s, ids, pad = engine.sampler, engine.prompt_ids[:4], engine.tok.pad_token_id
    sampling, seeds = Sampling.of(engine.cfg.rollout, n=4), [1000 + i for i in range(4)]
    try:
        s.sync(trained)
        synced = s.generate(trained, ids, sampling, seeds)
        tokens, logprobs = _vllm_logprobs(s, ids[0], 7)
        fresh = VLLMSampler(load_config(DEMO, [*VLLM, f"model.name={ref / 'model'}"]), trained, engine.tok, Dist())
        assert fresh.generate(trained, ids, sampling, seeds).completion_ids == synced.completion_ids
        engine.kept.append(fresh)  # freeing an engine tears down vLLM's process-wide state the others use
    finally:
        s.sync(engine.model)  # the other tests sample the base model
    now, before = _score(trained, ids[0], tokens, pad), _score(engine.model, ids[0], tokens, pad)
    assert max((a - b).abs().max().item() for a, b in zip(logprobs, now)) < 1e-3
    assert max((a - b).abs().max().item() for a, b in zip(logprobs, before)) > 1e-2, "the update changed too little"
    # the rollout's log-probs are the trained model's own, recomputed by `score`
    group = synced.completion_ids[:4]
    for lp, again in zip(synced.logprobs[:4], _score(trained, ids[0], [c or [pad] for c in group], pad)):
        assert torch.allclose(lp, again[:len(lp)], atol=1e-5)


def test_a_random_model_of_a_supported_shape_starts_the_engine_from_its_own_weights(engine):
    """model.architecture (random weights): the engine must sample the policy, not the named model."""
    arch = "{num_hidden_layers: 2, hidden_size: 128, intermediate_size: 256, num_attention_heads: 2, num_key_value_heads: 1}"
    cfg = load_config(DEMO, [*VLLM, f"model.architecture={arch}"])
    model, tok = load_model(cfg.model, seed=3)
    sampler = VLLMSampler(cfg, model, tok, Dist())  # head_dim 64
    ids = encode_problems(tok, load_sets(cfg)[0][:1], cfg)[0]
    tokens, logprobs = _vllm_logprobs(sampler, ids, 11)
    ours = _score(model, ids, tokens, tok.pad_token_id)
    assert max((a - b).abs().max().item() for a, b in zip(logprobs, ours)) < 1e-3
    engine.kept.append(sampler)  # freeing an engine tears down vLLM's process-wide state the others use


def test_the_engine_leaves_torch_its_threads(engine):
    """An in-process vLLM engine on CPU makes `torch.set_num_threads` a no-op; training would then run
    on whatever count vLLM left."""
    assert torch.get_num_threads() == engine.threads == 2
    torch.set_num_threads(1)
    try:
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(engine.threads)


def test_same_seed_gives_comparable_rewards_under_torch_and_vllm(engine):
    """The demo's prompts and sampler, each backend on the same seeds: per prompt, the share of samples
    that are right and the majority reward (agreement with the vote) differ by no more than chance."""
    sampling = Sampling.of(engine.cfg.rollout, n=8)
    seeds = list(range(len(engine.prompt_ids)))
    stats = {}
    for name, sampler in (("torch", TorchSampler(engine.tok)), ("vllm", engine.sampler)):
        rollout = sampler.generate(engine.model, engine.prompt_ids, sampling, seeds)
        groups = vote(rollout)
        right = [np.mean([is_equivalent(a, p.answer) for a in g.answers]) for g, p in zip(groups, engine.problems)]
        stats[name] = {"right": np.array(right), "majority": np.array([g.vote.majority_ratio for g in groups])}
    for key in ("right", "majority"):
        d = stats["vllm"][key] - stats["torch"][key]
        se = d.std(ddof=1) / np.sqrt(len(d))
        assert abs(d.mean()) <= 4 * se + 0.02, (key, stats["torch"][key].mean(), stats["vllm"][key].mean(), se)
    # the demo model answers ~12% of its 8-token samples, ~7% right; a broken engine (wrong weights,
    # temperature, stop handling) answers next to never
    assert stats["vllm"]["majority"].mean() > 0.06 and stats["vllm"]["right"].mean() > 0.03, stats["vllm"]


def test_what_the_cpu_build_cannot_do_is_one_error_line_before_the_model_loads(tmp_path):
    cfg = load_config(DEMO, VLLM)
    with pytest.raises(ConfigError, match="one process, this launch has 2"):
        check(cfg, SimpleNamespace(world=2, sharded=False, device=torch.device("cpu")))
    # configs/tiny.yaml's heads have 16 dimensions
    out = subprocess.run([sys.executable, "-m", "ttrl", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                          "--output-dir", str(tmp_path / "run"), "--quiet", *VLLM], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: rollout.backend=vllm on CPU: the model's attention heads have 16 dimensions")
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_rollout_benchmark_smoke_run_has_the_vllm_arm():
    """benchmarks/rollout.py on a tiny job: ttrl, vLLM and model.generate in one run, one JSON line."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rollout.py"), "--prompts", "1", "--samples", "2",
                          "--new-tokens", "4", "--dtypes", "float32", "--ignore-eos"], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ttrl_tokens_per_s"] > 0 and result["vllm_tokens_per_s"] > 0
    arms = result["by_dtype"]["float32"]
    assert {arm["tokens"] for arm in arms.values()} == {1 * 2 * 4}  # every arm did the same work
    assert arms["vllm"]["engine"]["tokens"] == 8 and arms["ttrl"]["tokens_per_cpu_s"] > 0
