import re
from pathlib import Path

import pytest

from ttrl.config import SEED_LIMIT, Config, ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).parent.parent / "configs"


def test_defaults_follow_official_scripts():
    cfg = Config()
    assert cfg.rollout.n_votes == 64 and cfg.reward.n_train_samples == 32
    assert cfg.rollout.temperature == 1.0
    assert cfg.eval.n_samples == 16 and cfg.eval.temperature == 0.6 and cfg.eval.top_p == 0.95


@pytest.mark.parametrize("name", ["tiny.yaml", "demo.yaml", "demo_mc.yaml", "demo_plain.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.reward.n_train_samples <= cfg.rollout.n_votes


def test_demo_plain_is_the_demo_with_the_papers_plain_vote_and_nothing_else():
    """The two files are kept in step: they differ in the settings the defaults added, nothing more."""
    from ttrl.config import flatten

    demo, plain = (flatten(load_config(CONFIGS / f"{n}.yaml").to_dict()) for n in ("demo", "demo_plain"))
    assert {k: (demo[k], plain[k]) for k in demo if demo[k] != plain[k]} == {
        "reward.contrast": (True, False), "algorithm.lr_schedule": ("cosine", "constant"),
        "algorithm.warmup_ratio": (0.03, 0.0), "algorithm.kl_coef": (0.001, 0.0), "train.guard": ("rollback", "warn")}


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "tiny.yaml", ["rollout.n_votes=12", "algorithm.lr=3e-5", "eval.greedy=false",
                                              "data.eval=[math500, amc]"])
    assert cfg.rollout.n_votes == 12 and cfg.algorithm.lr == 3e-5 and cfg.eval.greedy is False
    assert cfg.data.eval == ["math500", "amc"]


@pytest.mark.parametrize("raw, key", [
    ({"rollout": {"n_vote": 3}}, "rollout.n_vote"),
    ({"rollouts": {}}, "rollouts"),
    ({"rollout": {"n_votes": "many"}}, "rollout.n_votes"),
    ({"rollout": {"n_votes": 8}, "reward": {"n_train_samples": 9}}, "reward.n_train_samples"),
    ({"rollout": {"temperature": 0}}, "rollout.temperature"),
    ({"rollout": {"n_votes": 1}, "reward": {"n_train_samples": 1}}, "rollout.n_votes"),
    ({"algorithm": {"advantage": "ppo2"}}, "algorithm.advantage"),
    ({"train": {"steps": 1.5}}, "train.steps"),
    ({"model": "gpt"}, "model"),
    ({"rollout": {"vote_round": -1}}, "rollout.vote_round"),
    ({"rollout": {"vote_confidence": 0.5}}, "rollout.vote_confidence"),  # a tie already "leads" at 0.5
    ({"reward": {"label_temperature": 0}}, "reward.label_temperature"),
    ({"reward": {"penalty": -1}}, "reward.penalty"),
    ({"reward": {"penalty_min_ratio": 1.5}}, "reward.penalty_min_ratio"),
    ({"train": {"stop_on": "collapsed"}}, "train.stop_on"),
    ({"train": {"guard": "off"}}, "train.guard"),
])
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(raw)


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("rollout:\n  n_votes: 8\n  temperature: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+"):
        load_config(p)


def test_unknown_key_in_file_names_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*train\.stepz"):
        load_config(p)


def test_checkpoint_and_fault_settings_have_safe_defaults():
    cfg = Config()
    assert cfg.train.keep_checkpoints == 2 and cfg.algorithm.max_bad_steps == 3 and cfg.data.too_long == "skip"


@pytest.mark.parametrize("raw, key", [
    ({"train": {"save_every": -2}}, "train.save_every"),
    ({"train": {"keep_checkpoints": 0}}, "train.keep_checkpoints"),
    ({"algorithm": {"max_bad_steps": 0}}, "algorithm.max_bad_steps"),
    ({"algorithm": {"lr": float("inf")}}, "algorithm.lr"),
    ({"rollout": {"temperature": "nan"}}, "rollout.temperature"),
    ({"data": {"too_long": "cut"}}, "data.too_long"),
    ({"data": {"eval": [1]}}, "data.eval"),
    ({"rollout": {"stop": [""]}}, "rollout.stop"),
    ({"eval": {"stop": [""]}}, "eval.stop"),
    ({"data": {"stop": ["x"]}}, "moved: set rollout.stop and eval.stop"),
    ({"model": {1: 2, "x": 3}}, "model.1"),
    ({"train": {"seed": -1}}, "train.seed"),
    ({"train": {"seed": 2**33}}, "train.seed"),
    ({"train": {"stop_window": -3}}, "train.stop_window"),
    ({"train": {"stop_min_delta": -0.1}}, "train.stop_min_delta"),
    ({"train": {"entropy_floor": 0}}, "train.entropy_floor"),
])
def test_more_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(raw)


@pytest.mark.parametrize("raw, key, why", [
    ({"model": {"lora_rank": 8, "lora_alpha": 0}}, "model.lora_alpha", "0 trains nothing"),
    ({"model": {"lora_rank": 8, "lora_alpha": -16}}, "model.lora_alpha", "must be > 0"),
    ({"rollout": {"vote_confidence": 0.95}}, "rollout.vote_confidence", "set rollout.vote_round too"),
    ({"rollout": {"n_votes": 8, "vote_round": 16}}, "rollout.vote_round", "and rollout.n_votes (8)"),
])
def test_settings_that_would_silently_do_nothing_are_refused(raw, key, why):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*" + re.escape(why)):
        config_from_dict(raw)
    config_from_dict({"rollout": {"n_votes": 8, "vote_round": 8, "vote_confidence": 0.95}})  # the bounds hold


def test_largest_seed_fits_every_stream_derived_from_it():
    import torch

    from ttrl.step import prompt_seed
    from ttrl.trainer import seed_everything

    seed = SEED_LIMIT - 1
    load_config(None, [f"train.seed={seed}"])
    seed_everything(seed)
    torch.Generator().manual_seed(prompt_seed(seed, 10**6, 10**6) + 1)  # step and prompt index far beyond use


def test_m_defaults_to_half_of_n_unless_set():
    assert Config().reward.n_train_samples == 32  # the paper's N = 64, M = 32
    assert load_config(None, ["rollout.n_votes=16"]).reward.n_train_samples == 8
    assert load_config(CONFIGS / "tiny.yaml", ["rollout.n_votes=6"]).reward.n_train_samples == 4  # set in the file
    assert load_config(None, ["rollout.n_votes=10", "reward.n_train_samples=0"]).reward.n_train_samples == 5


def test_text_settings_keep_the_override_as_typed():
    cfg = load_config(None, ["data.template=Question: {problem}", "model.name=123", "data.train=true",
                             "data.answer_field='gold'"])
    assert cfg.data.template == "Question: {problem}" and cfg.model.name == "123" and cfg.data.train == "true"
    assert cfg.data.answer_field == "gold"  # quotes typed for YAML still work
    assert load_config(None, ["rollout.stop=[</a>, </b>]"]).rollout.stop == ["</a>", "</b>"]  # other types: YAML


def test_a_hash_in_an_override_is_kept_or_refused_never_dropped():
    """YAML reads ` #...` as a comment: a text setting keeps it (GSM8K's `####` marker), any other
    setting is refused with how to quote it, and broken YAML is refused instead of taken as one string."""
    cfg = load_config(None, ["data.template=Solve {problem} and end with #### N", "train.wandb_project=proj #2"])
    assert cfg.data.template == "Solve {problem} and end with #### N" and cfg.train.wandb_project == "proj #2"
    assert load_config(None, ['rollout.stop=[END, "###"]']).rollout.stop == ["END", "###"]
    for bad in ("rollout.stop=[END, ###]", "rollout.n_votes=4 # four", "rollout.stop=[END"):
        with pytest.raises(ConfigError, match="rollout.stop=\\'\\[\"END\", \"###\"\\]\\'"):
            load_config(None, [bad])


def test_errors_name_the_override_or_the_file_line_where_the_value_was_set(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny.yaml", ["rollout.n_votes=1e3"])
    assert str(e.value).startswith("command-line override rollout.n_votes=1e3: ") and "tiny.yaml" not in str(e.value)
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 3\n  stop_window: -3\n")
    with pytest.raises(ConfigError, match=r"^.*c\.yaml:3: config key 'train\.stop_window' = -3"):
        load_config(p)
    with pytest.raises(ConfigError, match="^command-line override train.stop_window=0: "):
        load_config(p, ["train.stop_window=0"])


def test_a_key_given_twice_in_a_file_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rollout:\n  n_votes: 8\n  temperature: 1.0\n  n_votes: 16\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:4: key 'rollout\.n_votes' is given twice \(first at line 2\)"):
        load_config(p)
    p.write_text("train: {steps: 2}\ntrain: {epochs: 2}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: key 'train' is given twice"):
        load_config(p)
def test_architecture_keys_are_setting_names():
    with pytest.raises(ConfigError, match="'model.architecture' has 1"):
        config_from_dict({"model": {"architecture": {1: 2}}})


@pytest.mark.parametrize("override, ok", [("algorithm.gradient_checkpointing=auto", True),
                                          ("algorithm.gradient_checkpointing=false", True),
                                          ("algorithm.gradient_checkpointing=1", False),
                                          ("algorithm.gradient_checkpointing=sometimes", False),
                                          ("algorithm.logprob_chunk_mb=-1", False),
                                          ("rollout.memory_fraction=0", False),
                                          ("rollout.max_batch_rows=0", False)])
def test_memory_settings(override, ok):
    if ok:
        load_config(None, [override])
    else:
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_config(None, [override])


def test_a_template_placeholder_ttrl_does_not_fill_is_an_error():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.template={problem} {foo}"])
    assert "data.template" in str(e.value) and "{foo}" in str(e.value) and "{problem} and {choices}" in str(e.value)
    for fine in ("{problem} Put it in \\boxed{answer}.", "{problem}\n{choices}", "Solve x^{n}: {problem}",
                 "{problem} \\frac{a}{b}"):
        assert load_config(None, [f"data.template={fine}"]).data.template == fine
