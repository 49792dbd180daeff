"""Every bad input ends in a one-line `error: ...` naming the problem (exit code 2), never a
traceback; config and data errors come before any model is loaded. Plus fuzzing of the parsers."""

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttrl.cli import main
from ttrl.config import Config, ConfigError, config_from_dict, load_config
from ttrl.data import DataError, Problem, load_file

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
QUICK = ["train.steps=2", "train.prompts_per_step=2", "rollout.n_votes=2", "reward.n_train_samples=2",
         "rollout.max_new_tokens=2", "eval.before=false", "eval.n_samples=1", "eval.greedy=false",
         "data.arithmetic.n=4", "data.holdout=0"]


@pytest.fixture()
def no_model(monkeypatch):
    """Fails the test if a model load is attempted."""
    import ttrl.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(ttrl.trainer, "load_model", refuse)


def _cli_error(capsys, *argv) -> str:
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("overrides, expected", [
    (["rollout.n_vote=3"], "unknown config key 'rollout.n_vote'"),
    (["rollout.n_votes=many"], "'rollout.n_votes' must be of type int"),
    (["rollout.n_votes=8", "reward.n_train_samples=9"], "'reward.n_train_samples' = 9"),
    (["rollout.temperature=0"], "'rollout.temperature' = 0.0: must be > 0"),
    (["rollout.n_votes=1", "reward.n_train_samples=1"], "'rollout.n_votes' = 1: must be >= 2"),
    (["algorithm.lr=.nan"], "'algorithm.lr' must be a finite number"),
    (["train.save_every=-1"], "'train.save_every' = -1"),
    (["train.keep_checkpoints=0"], "'train.keep_checkpoints' = 0"),
    (["algorithm.max_bad_steps=0"], "'algorithm.max_bad_steps' = 0"),
    (["data.too_long=truncate"], "'data.too_long' = 'truncate': must be one of skip, fail"),
    (["model.architecture"], "must look like key.sub=value"),
    (["train.seed=-1"], "command-line override train.seed=-1: config key 'train.seed' = -1: must be in [0, "),
    (["train.seed=8589934592"], "'train.seed' = 8589934592"),
    (["train.stop_window=-3"], "'train.stop_window' = -3: must be >= 1"),
    (["data.holdout=0.99"], "data.holdout = 0.99 leaves no prompts to adapt on"),
    (["rollout.n_votes=1e3"], "command-line override rollout.n_votes=1e3: config key 'rollout.n_votes' must be"),
])
def test_bad_config_fails_before_any_model_load(tmp_path, capsys, no_model, overrides, expected):
    err = _cli_error(capsys, "--config", TINY, "--output-dir", str(tmp_path / "run"), *overrides)
    assert expected in err
    assert not (tmp_path / "run").exists()


def test_bad_config_file(tmp_path, capsys, no_model):
    assert "not found" in _cli_error(capsys, "--config", str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1\n")
    assert "bad.yaml:3: not valid YAML" in _cli_error(capsys, "--config", str(bad))
    bad.write_bytes(b"train:\n  steps: 3 # caf\xe9\n")
    assert "not UTF-8" in _cli_error(capsys, "--config", str(bad))


@pytest.mark.parametrize("content, expected", [
    ('{"problem": "a"}\n{"problem": "b"\n', "p.jsonl:2: not valid JSON"),
    ('{"problem": "a"}\n{"question": "b"}\n', "p.jsonl:2: missing or empty prompt field 'problem'"),
    ('{"problem": 7}\n', "p.jsonl:1: prompt field 'problem' holds a int"),
    ('\n\n', "no prompts found"),
    ('{"id": 1, "problem": "a"}\n{"id": 1, "problem": "b"}\n', "p.jsonl:2: duplicate id '1'"),
    (b'{"problem": "caf\xe9"}\n', "p.jsonl:1: bytes that are not UTF-8"),
    ('{"problem": "\\ud800"}\n', "p.jsonl:1: field 'problem' holds an unpaired surrogate"),
    ('{"problem": 1' + "0" * 5000 + '}\n', "p.jsonl:1: not valid JSON"),
])
def test_bad_data_file_fails_before_any_model_load(tmp_path, capsys, no_model, content, expected):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = _cli_error(capsys, "--config", TINY, "--output-dir", str(tmp_path / "run"), f"data.train={path}")
    assert expected in err


def test_missing_model_and_missing_extras_say_how_to_fix(tmp_path, capsys, monkeypatch):
    err = _cli_error(capsys, "--config", TINY, "--output-dir", str(tmp_path / "a"), "model.name=/no/such/model")
    assert "/no/such/model" in err and "config.json" in err
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    err = _cli_error(capsys, "--config", TINY, "--output-dir", str(tmp_path / "b"), "model.lora_rank=2", *QUICK)
    assert "pip install 'ttrl[lora]'" in err
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"pip install 'ttrl\[parquet\]'"):
        load_file(tmp_path / "p.parquet")
    monkeypatch.setitem(sys.modules, "vllm", None)
    err = _cli_error(capsys, "--config", TINY, "--output-dir", str(tmp_path / "c"), "rollout.backend=vllm", *QUICK)
    assert "pip install 'ttrl[vllm]'" in err and "rollout.backend=torch" in err


def test_prompt_too_long_for_the_context(tmp_path, capsys, tiny):
    from ttrl.data import load_problems
    from ttrl.data import fit_context

    model, tok = tiny
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "problem": "What is 1 + 1?"}, {"id": "long", "problem": "one two three " * 100},
        {"id": "b", "problem": "What is 2 + 2?"}]) + "\n")
    budget = model.config.max_position_embeddings - 100  # prompts of more than 100 tokens do not fit
    cfg = load_config(TINY, [f"data.train={path}", f"rollout.max_new_tokens={budget}"])
    problems = load_problems(cfg.data.train, cfg.data)
    kept = fit_context(problems, tok, model, cfg, budget, "rollout.max_new_tokens")
    assert [p.id for p in kept] == ["a", "b"]
    assert "skipped 1 of 3 prompts longer than 100 tokens" in capsys.readouterr().err
    cfg.data.too_long = "fail"
    with pytest.raises(DataError, match=r"p\.jsonl:2 \(id 'long'\): the prompt is \d+ tokens.*data\.too_long=skip"):
        fit_context(problems, tok, model, cfg, budget, "rollout.max_new_tokens")


def test_non_finite_loss_skips_updates_then_stops_with_a_checkpoint(tmp_path, capsys, monkeypatch):
    """A NaN loss never reaches the weights; max_bad_steps of them in a row stop the run, with a
    checkpoint holding the last good (here: the initial) weights."""
    import torch
    from safetensors.torch import load_file

    import ttrl.update
    from ttrl.models import load_model

    real = ttrl.update.policy_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(ttrl.update, "policy_loss", nan_loss)
    out = tmp_path / "run"
    code = main(["train", "--config", TINY, "--output-dir", str(out), "--quiet", *QUICK, "train.steps=4",
                 "algorithm.max_bad_steps=2"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert "step 1: NaN/inf loss, gradient or logits; update skipped" in err
    assert "stopped after step 2: 2 steps in a row had a NaN/inf loss" in err and "--resume" in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss/policy"], r["optim/skipped_updates"]) for r in rows] == [(1, None, 1), (2, None, 1)]
    saved = load_file(out / "checkpoints" / "step-00000002" / "weights.safetensors")
    initial, _ = load_model(load_config(TINY).model, seed=0)
    for name, p in initial.named_parameters():
        assert torch.equal(saved[name], p.detach()), name


def test_exploding_weights_are_undone_and_stop_the_run_with_good_weights(tmp_path, capsys):
    """lr=1e30 gives finite gradients but weights whose logits overflow: each such optimizer step is
    undone and counted like a NaN loss; the run stops with a checkpoint that still samples."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    code = main(["train", "--config", TINY, "--output-dir", str(out), "--quiet", *QUICK, "train.steps=6",
                 "algorithm.lr=1e30", "algorithm.max_bad_steps=2", "rollout.n_votes=4", "reward.kind=similarity"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert "2 steps in a row had a NaN/inf loss, gradient or logits" in err
    from ttrl.config import ModelConfig
    from ttrl.data import encode_prompts
    from ttrl.models import load_model
    from ttrl.rollout import Sampling, generate

    saved = load_file(next((out / "checkpoints").glob("step-*")) / "weights.safetensors")
    assert all(bool(t.isfinite().all()) for t in saved.values())
    model, tok = load_model(ModelConfig(architecture=load_config(TINY).model.architecture))
    model.load_state_dict(saved, strict=False)  # lm_head is tied to the embeddings
    r = generate(model, tok, encode_prompts(tok, ["What is 1 + 1?"]), Sampling(n=2, max_new_tokens=3), seeds=[0])
    assert all(bool(lp.isfinite().all()) for lp in r.logprobs)  # the saved weights still sample


def test_a_critic_that_blows_up_is_undone_named_and_a_lower_rate_resumes(tmp_path, capsys):
    """PPO with critic_lr=1e30: one critic step gives finite but absurd values (~1e30), which used to
    stay in the checkpoint the NaN stop called good. Each such step is now undone (policy and critic),
    the stop names algorithm.critic_lr, and --resume with a sane rate trains on instead of stopping again."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    ppo = ["algorithm.advantage=ppo", "reward.kind=neg_entropy", "algorithm.max_bad_steps=2", "train.steps=4"]
    code = main(["train", "--config", TINY, "--output-dir", str(out), "--quiet", *QUICK, *ppo,
                 "algorithm.critic_lr=1e30"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert "algorithm.critic_lr" in err and "2 steps in a row" in err
    critic = load_file(out / "checkpoints" / "step-00000002" / "critic.safetensors")
    assert max(float(t.abs().max()) for t in critic.values()) < 1e3  # the starting critic, not the blown-up one
    assert float(critic["head.weight"].abs().max()) == 0.0  # the head starts at zero and every step was undone
    code = main(["train", "--config", TINY, "--output-dir", str(out), "--quiet", "--resume", *QUICK, *ppo,
                 "algorithm.critic_lr=1e-3"])
    assert code == 0, capsys.readouterr().err[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/value" in r][-2:] == [3, 4]
    assert all(r["optim/skipped_updates"] == 0 for r in rows if r["step"] > 2 and "loss/value" in r)


def test_a_resumed_run_trains_at_the_rate_its_config_gives(tmp_path, capsys):
    """The checkpoint's optimizer and schedule held the old algorithm.lr: a resume with another rate
    (after a blow-up, say) went on at the old one while the warning said it had changed."""
    out = tmp_path / "run"
    constant = "algorithm.lr_schedule=constant"  # the base rate is the rate
    assert main(["train", "--config", TINY, "--output-dir", str(out), "--quiet", *QUICK, "algorithm.lr=1e-3",
                 "train.steps=1", constant]) == 0
    assert main(["train", "--config", TINY, "--output-dir", str(out), "--quiet", "--resume", *QUICK,
                 "algorithm.lr=2e-6", constant]) == 0
    rates = [r["optim/lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "optim/lr" in r]
    assert rates == [1e-3, 2e-6]


# --- fuzzing: the parsers raise DataError / ConfigError with a message, never anything else -----

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
records = st.dictionaries(st.sampled_from(["problem", "answer", "id"]) | st.text(max_size=4), json_values,
                          max_size=4)
lines = st.one_of(records.map(json.dumps), records.map(lambda r: json.dumps(r, ensure_ascii=False)),
                  json_values.map(json.dumps), st.text(max_size=20),
                  st.sampled_from(['{"problem": "\\ud83d"}', '{"problem": "a\u2028b"}', "\ufeff{}", "[" * 3000]))
files = st.one_of(st.lists(lines, max_size=5).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
                  st.binary(max_size=40))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=files, suffix=st.sampled_from([".jsonl", ".json"]))
def test_fuzz_data_files(tmp_path, content, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(content)
    try:
        problems = load_file(path)
    except DataError as e:
        assert str(e).startswith(str(path)) or str(e).startswith(f"data file {path}"), str(e)
        return
    assert problems and all(isinstance(p, Problem) and p.prompt.strip() for p in problems)
    assert len({p.id for p in problems}) == len(problems)


KEYS = ["model.name", "model.lora_rank", "model.architecture", "model.lora_target_modules", "data.train", "data.eval",
        "data.holdout", "data.template", "data.too_long", "data.arithmetic.n", "data.arithmetic.ops", "rollout.n_votes",
        "rollout.temperature", "rollout.top_p", "reward.n_train_samples", "reward.kind", "algorithm.lr",
        "algorithm.max_bad_steps", "eval.n_samples", "train.steps", "train.save_every", "train.keep_checkpoints",
        "rollout.vote_round", "rollout.vote_confidence", "reward.label_temperature", "reward.penalty",
        "model", "rollout", "bogus", "train.bogus", "data.arithmetic"]
scalars = (st.none() | st.booleans() | st.integers(-10**400, 10**400) | st.floats() | st.text(max_size=6)
           | st.lists(st.integers() | st.text(max_size=3), max_size=2)
           | st.dictionaries(st.integers() | st.text(max_size=3), st.integers(), max_size=2))


def _nest(pairs):
    raw: dict = {}
    for key, value in pairs:
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[last] = value
    return raw


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from(KEYS), scalars), max_size=5))
def test_fuzz_config_dicts(pairs):
    try:
        cfg = config_from_dict(_nest(pairs))
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(cfg, Config)


@settings(max_examples=150, deadline=None)
@given(overrides=st.lists(st.text(max_size=25) | st.tuples(st.sampled_from(KEYS), st.text(max_size=8)).map("=".join),
                          max_size=3))
def test_fuzz_override_strings(overrides):
    try:
        load_config(None, overrides)
    except ConfigError as e:
        assert str(e)
