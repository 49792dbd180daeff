"""The paper configs (configs/paper/*.yaml): they validate as shipped, and one step of each runs
on a tiny random model with the paper's optimizer settings (one prompt per optimizer step)."""

import fnmatch
import json
import tomllib
from pathlib import Path

import pytest
import torch

from ttrl.config import CONFIGS_DIR, ConfigError, bundled_configs, find_config, load_config
from ttrl.trainer import train

ROOT = Path(__file__).parent.parent
PAPER = ROOT / "configs" / "paper"
TINY_ARCH = "{num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4, num_key_value_heads: 2}"


@pytest.mark.parametrize("name", ["aime2024", "amc", "math500"])
def test_paper_config_matches_the_official_script(name):
    cfg = load_config(PAPER / f"{name}.yaml")
    assert (cfg.rollout.n_votes, cfg.reward.n_train_samples, cfg.train.prompts_per_step) == (64, 32, 8)
    assert (cfg.algorithm.lr, cfg.algorithm.lr_schedule, cfg.algorithm.warmup_ratio) == (5e-7, "cosine", 0.03)
    assert (cfg.algorithm.kl_coef, cfg.algorithm.mini_batch_prompts) == (0.001, 1)
    assert (cfg.eval.n_samples, cfg.eval.temperature, cfg.eval.top_p) == (16, 0.6, 0.95)
    assert cfg.rollout.max_new_tokens == 3072 and cfg.data.train == name


def test_a_paper_config_runs_a_step_of_a_tiny_model(tmp_path):
    """As shipped (bf16, lr 5e-7): the step moves the weights. Trained in bf16 itself, AdamW's
    ~5e-7 steps round away on nearly every weight; the trained weights stay float32 and bf16 is
    what the forwards compute in."""
    from safetensors.torch import load_file

    from ttrl.models import load_model, trained_weights

    cfg = load_config(PAPER / "aime2024.yaml", [
        "model.name=smollm2-135m", f"model.architecture={TINY_ARCH}",
        "rollout.n_votes=4", "reward.n_train_samples=2", "rollout.max_new_tokens=4", "train.steps=1",
        "train.prompts_per_step=2", "eval.before=false", "eval.every=0", "eval.n_samples=1", "eval.greedy=false",
        "eval.max_new_tokens=4", "data.limit=2"])
    assert cfg.model.dtype == "bfloat16"
    train(cfg, tmp_path, quiet=True)
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "train/reward" in line]
    assert row["optim/steps"] == 2  # one optimizer step per prompt, as ppo_mini_batch_size=1
    assert row["optim/lr"] == 5e-7  # a 1-step run has int(0.03 * 1) = 0 warm-up steps: the cosine's start
    before, _ = load_model(trained_weights(cfg.model), seed=cfg.train.seed)
    after = load_file(tmp_path / "model" / "model.safetensors")
    layers = [k for k in after if ".layers." in k and k.endswith("proj.weight")]
    assert layers and all(after[k].dtype == torch.float32 for k in layers)
    moved = sum(int((after[k] != before.state_dict()[k]).sum()) for k in layers)
    assert moved > 0.9 * sum(after[k].numel() for k in layers), moved


@pytest.mark.parametrize("spelling", ["paper/amc", "paper/amc.yaml", "configs/paper/amc.yaml"])
def test_a_paper_config_is_found_by_name_from_any_directory(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as after `pip install ttrl`: no configs/ folder here
    assert find_config(spelling).resolve() == (PAPER / "amc.yaml").resolve()
    with pytest.raises(ConfigError, match="paper/aime2024"):  # the error lists what is bundled
        find_config("paper/no-such")


def test_every_bundled_config_ships_in_the_wheel():
    """package-data must cover each config, or `--config paper/amc` works only from a clone."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ttrl"]
    files = [p.relative_to(CONFIGS_DIR.parent).as_posix() for p in CONFIGS_DIR.rglob("*.yaml")]
    assert {"configs/paper/amc.yaml", "configs/demo.yaml"} <= set(files)
    assert [f for f in files if not any(fnmatch.fnmatchcase(f, g) for g in globs)] == []
    assert "paper/math500" in bundled_configs() and not any("accelerate" in n for n in bundled_configs())
