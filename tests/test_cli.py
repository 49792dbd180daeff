"""The command line: run directories are never lost or left half-made, every input is checked
before a model loads or a file is written, `ttrl eval` evaluates what a run reported, and the
small commands (`config`, `--version`) and the Python API work."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ttrl.cli import before_after_table, main
from ttrl.config import config_keys, load_config

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
QUICK = ["train.steps=1", "train.prompts_per_step=2", "rollout.n_votes=2", "reward.n_train_samples=2",
         "rollout.max_new_tokens=2", "eval.n_samples=2", "eval.max_new_tokens=2", "data.arithmetic.n=8"]


@pytest.fixture()
def no_model(monkeypatch):
    """Fails the test if a model load is attempted."""
    import ttrl.models
    import ttrl.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(ttrl.trainer, "load_model", refuse)
    monkeypatch.setattr(ttrl.models, "load_model", refuse)


def _error(capsys, *argv, code=2) -> str:
    got = main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    assert got == code, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _fake_run(path: Path) -> Path:
    """A directory as `ttrl train` leaves it (what matters here: its files, not their content)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(load_config(TINY).to_dict()))
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    return path


# --- the run directory -----------------------------------------------------------------------------

def test_overwrite_never_touches_a_directory_that_is_not_a_run(tmp_path, capsys, no_model):
    mine = tmp_path / "d"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("x")
    err = _error(capsys, "train", "--config", TINY, "--output-dir", mine, "--overwrite", *QUICK)
    assert "holds no ttrl run" in err
    # a bad input is reported, and the directory is left as it was, whatever the order
    _error(capsys, "train", "--config", TINY, "--output-dir", mine, "--overwrite", "model.name=/nonexistent")
    assert (mine / "notes.txt").read_text() == "x" and (mine / "sub").is_dir()
    # a model directory's config.json does not make it a run
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    assert "holds no ttrl run" in _error(capsys, "train", "--config", TINY, "--output-dir", model_dir, "--overwrite")
    assert (model_dir / "config.json").is_file()


def test_overwrite_never_takes_another_tools_checkpoints_or_metrics_for_a_run(tmp_path, capsys, no_model):
    """A project with its own checkpoints/ and metrics.jsonl (and .git) is not a ttrl run: --overwrite
    refuses it, and every file stays."""
    project = tmp_path / "project"
    for d in ("checkpoints/epoch_3", "src", ".git"):
        (project / d).mkdir(parents=True)
    (project / "checkpoints" / "epoch_3" / "model.pt").write_text("weights")
    (project / "metrics.jsonl").write_text('{"epoch": 3, "loss": 0.1}\n')
    assert "holds no ttrl run" in _error(capsys, "train", "--config", TINY, "--output-dir", project, "--overwrite")
    assert sorted(p.name for p in project.iterdir()) == [".git", "checkpoints", "metrics.jsonl", "src"]


def test_overwrite_removes_what_the_run_wrote_and_nothing_else(tmp_path):
    from ttrl.launch import prepare_run_dir

    run = _fake_run(tmp_path / "run")
    for d in ("checkpoints/step-00000002", "model", "tensorboard", ".tmp-model-123"):
        (run / d).mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "state.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    (run / "data").mkdir()
    prepare_run_dir(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["data", "notes.txt"]


def test_overwrite_checks_every_input_before_replacing_a_run(tmp_path, capsys, no_model):
    run = _fake_run(tmp_path / "run")
    for bad, expected in [("data.train=missing.jsonl", "missing.jsonl not found"),
                          ("model.name=/nonexistent", "/nonexistent"),
                          ("data.holdout=0.99", "leaves no prompts to adapt on"),
                          (f"model.name={run}", "is a run directory")]:
        assert expected in _error(capsys, "train", "--config", TINY, "--output-dir", run, "--overwrite", bad)
        assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n', bad


def test_a_failed_check_writes_nothing(tmp_path, capsys, no_model):
    out = tmp_path / "new"
    _error(capsys, "train", "--config", TINY, "--output-dir", out, "data.train=missing.jsonl")
    assert not out.exists()


def test_a_model_that_fails_to_load_leaves_no_run_behind(tmp_path, capsys):
    broken = tmp_path / "broken"  # a config.json and nothing else: no tokenizer, no weights
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    out = tmp_path / "run"
    assert main(["train", "--config", TINY, "--output-dir", str(out), f"model.name={broken}"]) == 2
    assert "no usable tokenizer" in capsys.readouterr().err
    assert not out.exists()  # so the corrected command needs no --overwrite


def test_output_paths_that_cannot_be_written(tmp_path, capsys, no_model):
    afile = tmp_path / "f"
    afile.write_text("x")
    assert "is a file" in _error(capsys, "train", "--config", TINY, "--output-dir", afile)
    assert f"is below {afile}, which is a file" in _error(capsys, "train", "--config", TINY,
                                                           "--output-dir", afile / "run")
    if Path("/sys").is_dir():  # not writable, even for root
        assert "/sys/ttrl-run" in _error(capsys, "train", "--config", TINY, "--output-dir", "/sys/ttrl-run", *QUICK)


def test_a_full_disk_is_one_error_line_with_the_command_to_continue(tmp_path, capsys, no_model):
    run = _fake_run(tmp_path / "run")
    (run / "environment.json.tmp").symlink_to("/dev/full")  # environment.json is written through it: ENOSPC
    err = _error(capsys, "train", "--config", TINY, "--output-dir", run, "--resume", *QUICK, code=1)
    assert "no space left on the disk" in err and "--resume" in err


def test_ctrl_c_before_any_checkpoint_does_not_claim_one(tmp_path, capsys, monkeypatch):
    import ttrl.trainer

    def interrupted(*args, **kwargs):  # Ctrl-C during the base model's evaluation
        raise KeyboardInterrupt

    monkeypatch.setattr(ttrl.trainer, "run_evals", interrupted)
    assert main(["train", "--config", TINY, "--output-dir", str(tmp_path / "run"), *QUICK]) == 130
    err = capsys.readouterr().err
    assert "no checkpoint was saved yet" in err and "checkpoint is kept" not in err and "--resume" in err


# --- argument parsing, `ttrl config`, `--version` --------------------------------------------------

def test_overrides_after_options_are_read(tmp_path, capsys, no_model):
    err = _error(capsys, "train", "train.steps=1", "--config", TINY, "--output-dir", tmp_path / "x", "rollout.n_vote=2")
    assert "rollout.n_vote" in err
    with pytest.raises(SystemExit):
        main(["train", "--config", TINY, "--no-such-option"])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.fullmatch(r"ttrl \d+\.\d+\.\d+\S*", capsys.readouterr().out.strip())


def test_config_prints_the_resolved_config_that_loads_back(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # bundled configs are found by name from any directory
    assert main(["config", "rollout.n_votes=6", "--config", "configs/tiny.yaml",
                 "data.template=Question: {problem}"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(text)
    cfg = load_config("resolved.yaml")
    assert cfg == load_config(TINY, ["rollout.n_votes=6", "data.template=Question: {problem}"])
    assert cfg.rollout.n_votes == 6 and cfg.data.template == "Question: {problem}"
    assert load_config("demo") == load_config(ROOT / "configs" / "demo.yaml")


def test_config_keys_lists_every_key_with_its_doc(capsys):
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    keys = config_keys()
    assert len(keys) > 50 and all(k.doc for k in keys), [k.key for k in keys if not k.doc]
    for k in keys:
        assert f"{k.key} ({k.type}, default {k.default!r})\n    {k.doc}" in out
    assert next(k for k in keys if k.key == "rollout.n_votes").doc.startswith("N: samples per prompt")


# --- `ttrl eval` --------------------------------------------------------------------------------------

def test_eval_checks_data_and_json_path_before_loading_a_model(tmp_path, capsys, no_model):
    assert "missing.jsonl not found" in _error(capsys, "eval", "--config", TINY, "data.train=missing.jsonl")
    assert "leaves no prompts" in _error(capsys, "eval", "--config", TINY, "data.holdout=0.99")
    assert "is a directory" in _error(capsys, "eval", "--config", TINY, "--json", tmp_path)
    (tmp_path / "f").write_text("")
    assert "which is a file" in _error(capsys, "eval", "--config", TINY, "--json", tmp_path / "f" / "eval.json")
    assert "neither a run directory" in _error(capsys, "eval", "--config", TINY, "no-such-run")


def test_eval_of_a_lora_run_that_cannot_be_loaded_says_why(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    (run / "model").mkdir()
    (run / "model" / "adapter_config.json").write_text('{"base_model_name_or_path": "/no/such/base"}')
    err = _error(capsys, "eval", run)
    assert "/no/such/base" in err and "neither" in err


def test_a_lora_runs_model_evaluates_and_loads_with_its_adapter(tmp_path, capsys):
    """RUN_DIR/model of a LoRA run is an adapter: `ttrl eval RUN_DIR` rebuilds the base (here random
    weights from the run's seed) and merges it, reproducing the run's final evaluation; the
    directory says how to load it."""
    run = tmp_path / "run"
    assert main(["train", "--config", TINY, "--output-dir", str(run), "--quiet", "--no-report", *QUICK,
                 "model.lora_rank=4", "algorithm.lr=0.05", "eval.before=false", "reward.kind=similarity",
                 "rollout.n_votes=4", "rollout.max_new_tokens=4"]) == 0
    assert (run / "model" / "adapter_config.json").is_file() and "LoRA adapter" in (run / "model" / "README.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(run), "--json", str(tmp_path / "e.json")]) == 0
    sets = json.loads((tmp_path / "e.json").read_text())["sets"]
    final = json.loads((run / "summary.json").read_text())["evals"]["adapt"][-1]
    for key in ("avg@2", "maj@2", "greedy", "majority_ratio", "mean_length"):
        assert sets["adapt"][key] == final[key], key
    from ttrl.config import ModelConfig
    from ttrl.models import load_model
    from ttrl.launch import run_config

    cfg = run_config(run)
    trained, _ = load_model(cfg.model, seed=cfg.train.seed)  # base + adapter, merged
    base, _ = load_model(ModelConfig(architecture=cfg.model.architecture), seed=cfg.train.seed)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained.state_dict()[name], base.state_dict()[name])  # the adapter is in
    assert torch.equal(trained.state_dict()["model.norm.weight"], base.state_dict()["model.norm.weight"])


def test_eval_skips_prompts_too_long_for_the_context(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "problem": "What is 1 + 1?", "answer": "2"}, {"id": "long", "problem": "one two three " * 100},
        {"id": "b", "problem": "What is 2 + 2?"}]) + "\n")
    small_context = ("model.architecture={num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, "
                     "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}")
    common = ["eval", "--config", TINY, f"data.train={path}", "data.holdout=0", small_context, "eval.greedy=true"]
    assert main([*common, "--json", str(tmp_path / "e.json")]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 of 3 prompts longer than" in captured.err and "'long'" in captured.err
    assert "adapt: 2 prompts, 1 graded" in captured.out
    adapt = json.loads((tmp_path / "e.json").read_text())["sets"]["adapt"]
    assert [p["id"] for p in adapt["problems"]] == ["a", "b"]
    assert adapt["n_prompts"] == 2 and adapt["n_labelled"] == 1 and "avg@4" in adapt and "greedy" in adapt
    err = _error(capsys, *common, "data.too_long=fail")
    assert "p.jsonl:2 (id 'long')" in err


def test_eval_of_a_run_directory_reproduces_the_runs_final_evaluation(tmp_path, capsys):
    run = tmp_path / "majority+reward.contrast=true"  # named as benchmark arms are: "=" in a directory name
    assert main(["train", "--config", TINY, "--output-dir", str(run), "--quiet", "--no-report", *QUICK,
                 "data.holdout=0.25", "data.eval=[arithmetic]", "eval.before=false"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "adapt: 6 prompts, 6 graded" in out and "heldout: 2 prompts" in out
    sets = json.loads((tmp_path / "e.json").read_text())["sets"]
    final = {name: rows[-1] for name, rows in json.loads((run / "summary.json").read_text())["evals"].items()}
    assert set(sets) == set(final) == {"adapt", "heldout", "arithmetic"}
    for name, row in final.items():
        for key in ("n_prompts", "avg@2", "maj@2", "pass@2", "greedy", "majority_ratio", "mean_length"):
            assert sets[name][key] == row[key], (name, key)
        assert [p["id"] for p in sets[name]["problems"][:8]] == [e["id"] for e in row["examples"]]
        graded = [p for p in sets[name]["problems"] if p["gold"] is not None]
        assert [p["n_correct"] / p["n_samples"] for p in graded] == row["scores"]["avg@2"]  # problem by problem


def test_eval_ctrl_c_is_one_line_not_a_traceback(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ttrl", "eval", "--config", TINY, "eval.n_samples=64",
                             "eval.max_new_tokens=256", "data.arithmetic.n=100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    try:  # (a suite started as `cmd &` hands its children SIGINT ignored)
        time.sleep(8)  # imports and model load done: evaluating
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # never left running when the test fails
    # 130 = main() caught it; once in several runs the process has instead ended by the signal
    # itself (-2, which a shell also shows as 130) after printing the same single line.
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "interrupted" in err and "Traceback" not in err, err


# --- partly labelled data ----------------------------------------------------------------------------

def test_console_table_says_how_many_prompts_were_graded():
    row = {"step": 0, "n_prompts": 8, "n_labelled": 5, "avg@4": 0.25, "maj@4": 0.4}
    table = before_after_table({"adapt": [row, {**row, "step": 3, "avg@4": 0.5}]}, 4)
    header, line = table.splitlines()
    assert "graded" in header and line.split()[:3] == ["adapt", "8", "5"] and line.endswith("+0.250")
    assert "no prompt has a gold answer" in before_after_table({"adapt": [{"step": 0, "n_prompts": 8,
                                                                            "n_labelled": 0}]}, 4)


def test_console_table_has_no_base_columns_without_a_base_evaluation():
    mid = {"step": 10, "n_prompts": 8, "n_labelled": 8, "avg@4": 0.25, "maj@4": 0.4}
    line = before_after_table({"adapt": [mid, {**mid, "step": 30, "avg@4": 0.5}]}, 4).splitlines()[1]
    assert line.split()[3:5] == ["–", "–"] and line.endswith("–") and "0.250" not in line  # eval.before=false


def test_resume_without_config_continues_with_the_runs_own_settings(tmp_path, capsys):
    """`ttrl train --resume --output-dir RUN` (no --config) used to resume with the default config."""
    run = tmp_path / "r"
    assert main(["train", "--config", TINY, "--output-dir", str(run), "--quiet", "--no-report", *QUICK]) == 0
    first = json.loads((run / "config.json").read_text())
    assert main(["train", "--resume", "--output-dir", str(run), "--quiet", "--no-report", "train.steps=2"]) == 0
    again = json.loads((run / "config.json").read_text())
    assert again["train"]["steps"] == 2 and {**again, "train": first["train"]} == first
    assert len([r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "train/reward" in r]) == 2


def test_extending_a_cosine_run_on_resume_warns_that_the_rate_jumps(tmp_path, capsys):
    run, cosine = tmp_path / "r", ["algorithm.lr_schedule=cosine", "--quiet", "--no-report"]
    assert main(["train", "--config", TINY, "--output-dir", str(run), *cosine, *QUICK]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--output-dir", str(run), *cosine, "train.steps=2"]) == 0
    assert "learning rate jumps at the resumed step" in capsys.readouterr().err


def test_holdout_zero_on_the_command_line_holds_out_nothing(tmp_path, capsys):
    """tiny.yaml holds out a quarter; an explicit --holdout 0 must win (it used to read as "not given")."""
    run = tmp_path / "r"
    assert main(["train", "--config", TINY, "--holdout", "0", "--output-dir", str(run), "--quiet", "--no-report",
                 *QUICK]) == 0
    assert json.loads((run / "config.json").read_text())["data"]["holdout"] == 0
    assert "heldout" not in json.loads((run / "summary.json").read_text())["evals"]


def test_console_table_gives_the_change_with_twice_its_paired_standard_error():
    ids = ["a", "b", "c", "d"]
    base = {"step": 0, "n_prompts": 4, "n_labelled": 4, "avg@4": 0.25, "maj@4": 0.25, "scores": {"id": ids, "avg@4": [0, 0, 0, 1]}}
    after = {**base, "step": 3, "avg@4": 0.625, "scores": {"id": ids, "avg@4": [0.5, 0.5, 0.5, 1]}}  # changes .5 .5 .5 0
    line = before_after_table({"adapt": [base, after]}, 4).splitlines()[1]
    assert line.endswith("+0.375 ± 0.250")  # SE of (.5, .5, .5, 0): sqrt(0.1875 / 3 / 4) = 0.125


# --- the Python API, as the README shows it ---------------------------------------------------------

@pytest.mark.slow  # ~20 s idle, ~50 s on a busy machine: a whole tiny run, its report and a second evaluation
def test_readme_python_api_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    run = tmp_path / "runs" / "api"
    assert (run / "report.html").is_file() and (run / "environment.json").is_file()
    assert yaml.safe_load((run / "config.json").read_text())["train"]["steps"] == 2


def test_top_level_exports_are_lazy():
    code = ("import sys, ttrl; assert 'torch' not in sys.modules; "
            "from ttrl import Config, load_config, train, evaluate, evaluate_sets, write_report; "
            "import ttrl.launch, ttrl.evaluation; "
            "assert train is ttrl.launch.train and evaluate is ttrl.evaluation.evaluate")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
