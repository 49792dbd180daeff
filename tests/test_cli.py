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


def test_overwrite_moves_aside_what_ttrl_wrote_and_nothing_else(tmp_path):
    from ttrl.launch import restore_replaced, set_aside

    run = _fake_run(tmp_path / "run")
    for d in ("checkpoints/step-00000002", "model", "tensorboard", ".tmp-model-123", "report"):
        (run / d).mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "state.json").write_text("{}")
    (run / "report" / "reward.png").write_bytes(b"png")
    (run / "report.md").write_text("# TTRL report · run\n")
    (run / "metrics.csv").write_text("step\n1\n")
    (run / "notes.txt").write_text("mine")
    (run / "data").mkdir()
    before = sorted(p.name for p in run.iterdir())
    aside = set_aside(run)
    assert sorted(p.name for p in run.iterdir()) == sorted(["data", "notes.txt", aside.name])
    restore_replaced(run, aside)
    assert sorted(p.name for p in run.iterdir()) == before
    # the user's own files under a report's names stay
    (run / "report.md").write_text("my notes on the run\n")
    (run / "report" / "draft.txt").write_text("mine")
    (run / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    aside = set_aside(run)
    assert sorted(p.name for p in run.iterdir()) == sorted(["data", "metrics.csv", "notes.txt", "report",
                                                          "report.md", aside.name])


@pytest.mark.parametrize("bad", ["lora", "own model"])
def test_overwrite_keeps_the_old_run_until_the_new_one_has_started(tmp_path, capsys, bad):
    """A model that fails to load (here: LoRA on a module the model lacks), or the model of the very
    run being replaced, leaves the old run as it was."""
    run = _fake_run(tmp_path / "run")
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text('{"model_type": "llama"}')
    (run / "summary.json").write_text('{"evals": {}}')
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    args = ["model.lora_rank=4", "model.lora_target_modules=[nonexistent_proj]"] if bad == "lora" else \
        [f"model.name={run / 'model'}", "model.architecture={}"]
    err = _error(capsys, "train", "--config", TINY, "--output-dir", run, "--overwrite", *args)
    assert ("nonexistent_proj" in err) if bad == "lora" else ("part of the run" in err), err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in run.iterdir()) == sorted([*before, "model"])


def test_a_run_directory_in_use_is_refused(tmp_path, capsys, no_model):
    """One process per run directory, whatever it does (train, --resume, --overwrite): the second
    gets one error line and touches nothing; the lock ends with its process, even a killed one."""
    from ttrl.launch import run_lock

    run = _fake_run(tmp_path / "run")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for where, flags in ((run, ["--resume"]), (run, ["--overwrite"]), (fresh, [])):
        with run_lock(where):
            err = _error(capsys, "train", "--config", TINY, "--output-dir", where, *flags, *QUICK)
        assert "in use by another ttrl process" in err
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl"] and not any(fresh.iterdir())
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from ttrl.launch import run_lock; held = run_lock(Path(sys.argv[1])); held.__enter__(); "
                               "print('held', flush=True); time.sleep(60)", str(fresh)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(Exception, match="in use"):
            run_lock(fresh).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with run_lock(fresh):  # SIGKILL left no stale lock
        pass


def test_a_later_run_sweeps_what_killed_processes_left(tmp_path):
    """Unfinished exports and checkpoint directories of a dead process are deleted (they would keep
    a full disk full); a run that --overwrite moved aside comes back if the new run never started."""
    from ttrl.launch import sweep

    run = _fake_run(tmp_path / "run")
    for d in (".tmp-model-999", "checkpoints/.old-step-00000002-999", "checkpoints/.tmp-step-00000004-999",
              "checkpoints/step-00000003"):
        (run / d).mkdir(parents=True)
    aside = tmp_path / "aside"
    run.rename(aside)
    run.mkdir()
    aside.rename(run / ".replaced-999")
    (run / "environment.json").write_text('{"ttrl": "0"}')  # the new run's, killed while loading its model
    sweep(run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000003"]


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
    """...and puts the base model's figures from the run's own evaluation before training beside them."""
    run = tmp_path / "majority+reward.contrast=true"  # named as benchmark arms are: "=" in a directory name
    assert main(["train", "--config", TINY, "--output-dir", str(run), "--quiet", "--no-report", *QUICK,
                 "data.holdout=0.25", "data.eval=[arithmetic]"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "adapt: 6 prompts, 6 graded" in out and "heldout: 2 prompts" in out
    evals = json.loads((run / "summary.json").read_text())["evals"]
    for name, rows in evals.items():
        block = out.split(f"\n{name}: ")[1]
        assert f"greedy  {rows[-1]['greedy']:.4f}   base {rows[0]['greedy']:.4f}" in block, name
        assert f"avg@2  {rows[-1]['avg@2']:.4f}   base {rows[0]['avg@2']:.4f}" in block, name
    sets = json.loads((tmp_path / "e.json").read_text())["sets"]
    final = {name: rows[-1] for name, rows in evals.items()}
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


def test_console_table_puts_greedy_beside_the_base_and_says_when_the_model_got_worse():
    ids = ["a", "b", "c", "d"]
    base = {"step": 0, "n_prompts": 4, "n_labelled": 4, "avg@4": 0.5, "maj@4": 0.5, "greedy": 1.0,
            "scores": {"id": ids, "avg@4": [0.5] * 4, "greedy": [1, 1, 1, 1]}}
    fell = {**base, "step": 3, "greedy": 0.25, "scores": {"id": ids, "avg@4": [0.5] * 4, "greedy": [0, 0, 0, 1]}}
    table = before_after_table({"adapt": [base, fell]}, 4).splitlines()
    line = table[1].split()
    assert "base greedy" in table[0] and "TTRL greedy" in table[0]
    assert line[3:9] == ["1.000", "0.500", "0.500", "0.250", "0.500", "0.500"]
    # greedy changes -1 -1 -1 0: mean -0.75, se sqrt(0.75 / 3 / 4) = 0.25, so -0.75 < -2 se
    assert table[2].startswith("the trained model is WORSE than the base model") and "greedy -0.750 ± 0.500" in table[2]
    steady = {**base, "step": 3, "greedy": 0.75, "scores": {"id": ids, "avg@4": [0.5] * 4, "greedy": [1, 1, 0, 1]}}
    assert len(before_after_table({"adapt": [base, steady]}, 4).splitlines()) == 2  # within noise: nothing said


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


@pytest.mark.parametrize("lora", [False, True])
def test_a_checkpoint_and_a_run_stopped_before_model_evaluate(tmp_path, capsys, lora):
    """`model.name=RUN/checkpoints/step-N` loads that checkpoint's weights into the model its run
    built; `ttrl eval RUN` of a run without model/ evaluates its latest checkpoint; neither error
    tells the user to download a model."""
    import shutil

    run = tmp_path / "run"
    extra = ["model.lora_rank=4", "algorithm.lr=0.05"] if lora else ["algorithm.lr=0.01"]
    assert main(["train", "--config", TINY, "--output-dir", str(run), "--quiet", "--no-report", *QUICK,
                 "train.steps=2", "train.save_every=1", "eval.before=false", *extra]) == 0
    final = json.loads((run / "summary.json").read_text())["evals"]["adapt"][-1]
    step = run / "checkpoints" / "step-00000002"
    capsys.readouterr()
    assert main(["eval", str(run), f"model.name={step}", "--json", str(tmp_path / "c.json")]) == 0
    shutil.rmtree(run / "model")
    assert main(["eval", str(run), "--json", str(tmp_path / "r.json")]) == 0
    assert f"evaluating its latest checkpoint, {step}" in capsys.readouterr().err
    for out in ("c.json", "r.json"):
        adapt = json.loads((tmp_path / out).read_text())["sets"]["adapt"]
        for key in ("avg@2", "maj@2", "majority_ratio", "mean_length"):
            assert adapt[key] == final[key], (out, key)
    for name in (run, run / "model", run / "checkpoints"):
        err = _error(capsys, "eval", "--config", TINY, f"model.name={name}")
        assert "download" not in err and "checkpoint" in err, err


def test_python_api_errors_name_its_arguments_and_quiet_hides_library_bars(tmp_path, capfd):
    import ttrl
    from ttrl.config import ConfigError

    cfg = load_config(TINY, QUICK)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))  # a run is there already
    with pytest.raises(ConfigError) as e:
        ttrl.train(cfg, run, quiet=True)
    assert "resume=True" in str(e.value) and "overwrite=True" in str(e.value) and "--" not in str(e.value)
    capfd.readouterr()
    pretrained = load_config(None, ["data.arithmetic.n=2", "eval.n_samples=1", "eval.max_new_tokens=1",
                                    "eval.greedy=false"])  # loads weights: transformers' "Loading weights" bar
    assert set(ttrl.evaluate_sets(pretrained, quiet=True)) == {"adapt"}
    assert capfd.readouterr().err == ""


def test_eval_says_what_it_will_run_first_and_warns_when_answers_are_cut_off(capsys):
    """Every answer cut off at one token: the figures say so and a warning names the fix, as
    `ttrl train` does; and before any progress line, what is about to run."""
    assert main(["eval", "--config", TINY, "eval.max_new_tokens=1", "eval.n_samples=2", "data.arithmetic.n=8"]) == 0
    captured = capsys.readouterr()
    assert "about to evaluate 8 prompts (adapt 6, heldout 2) x 2 samples (+ 1 greedy) of up to 1 new tokens, " \
           "on cpu" in captured.err
    assert captured.err.index("about to evaluate") < captured.err.index("eval adapt")
    assert re.search(r"no_answer\s+1\.0000", captured.out) and re.search(r"truncated\s+1\.0000", captured.out)
    assert "warning: adapt: 100% of the evaluation samples had no answer" in captured.err
    assert "cut off by eval.max_new_tokens: raise it" in captured.err


def test_export_writes_a_checkpoint_or_a_run_as_a_hugging_face_model(tmp_path, capsys):
    """`ttrl export` of an intermediate checkpoint and of a whole run: directories from_pretrained
    loads, holding exactly the weights `ttrl eval` evaluates for the same source."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ttrl.config import ModelConfig
    from ttrl.launch import load_for_eval

    run = tmp_path / "run"
    assert main(["train", "--config", TINY, "--output-dir", str(run), "--quiet", "--no-report", *QUICK,
                 "train.steps=2", "train.save_every=1"]) == 0
    step1 = run / "checkpoints" / "step-00000001"
    assert main(["export", str(step1), "--output", str(tmp_path / "step1")]) == 0
    assert main(["export", str(run), "--output", str(tmp_path / "final")]) == 0
    exported = {name: load_file(tmp_path / name / "model.safetensors") for name in ("step1", "final")}
    expected, _ = load_for_eval(ModelConfig(name=str(step1)), 0, "cpu")
    for key, value in expected.state_dict().items():
        if key in exported["step1"]:
            assert torch.equal(exported["step1"][key], value), key
    assert any(not torch.equal(exported["step1"][k], exported["final"][k]) for k in exported["final"])  # step 2 moved
    AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # loads as any HF model
    assert main(["export", str(run), "--output", str(tmp_path / "final")]) == 2  # not over a model
    assert "not an empty directory" in capsys.readouterr().err
