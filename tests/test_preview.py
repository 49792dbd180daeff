"""`ttrl data` shows what a run would feed the model (rendered through the chat template, as the
trainer encodes it), the gold answers and the split, from the tokenizer alone; runs and
evaluations say up front how much work is coming."""

import json
from pathlib import Path

import pytest

from ttrl.cli import main
from ttrl.config import load_config
from ttrl.data import load_sets
from ttrl.data import encode_problems
from ttrl.models import load_tokenizer
from ttrl.preview import announce, rendered

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture()
def no_weights(monkeypatch):
    """Fails the test if any weights are loaded."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)


def _jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_data_shows_rendered_prompts_gold_and_split_without_weights(capsys, no_weights):
    assert main(["data", "--config", TINY, "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "data.train arithmetic: 16 prompts (data.holdout 0.25" in out
    assert "adapt" in out and "12 prompts, 12 with a gold answer" in out
    assert "heldout" in out and "4 prompts, 4 with a gold answer" in out
    cfg = load_config(TINY)
    first = load_sets(cfg)[0]
    tok = load_tokenizer(cfg.model.name)
    assert rendered(tok, first[:1], cfg)[0][0] == tok.decode(encode_problems(tok, first[:1], cfg)[0])
    assert "<|im_start|>user\nWhat is" in out and "Answer with just the number.<|im_end|>" in out
    assert out.count("--- ") == 2 and "· gold '" in out  # one prompt per set, with its gold answer


def test_system_prompt_goes_through_the_chat_template(capsys, no_weights):
    assert main(["data", "--config", TINY, "--show", "1", "data.system_prompt=Answer tersely."]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>system\nAnswer tersely.<|im_end|>\n<|im_start|>user\nWhat is" in out
    assert "named SmolLM" not in out  # the template's default system prompt is replaced, not added to


def test_data_names_too_long_prompts_and_the_demo_holdout_on_a_users_file(tmp_path, capsys, no_weights):
    file = _jsonl(tmp_path / "my.jsonl", [{"id": f"q{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1)}
                                          for i in range(6)] + [{"id": "long", "problem": "word " * 300}])
    assert main(["data", "--config", "demo", f"data.train={file}", "rollout.max_new_tokens=7900"]) == 0
    captured = capsys.readouterr()
    assert "data.holdout=0" in captured.out and "splits" in captured.out
    assert "too long" in captured.out and "'long'" in captured.out
    assert main(["data", "--config", "demo", f"data.train={file}", "data.holdout=0"]) == 0
    out = capsys.readouterr().out
    assert "data.holdout=0 to keep it" not in out and "7 prompts, 7 with a gold answer" not in out
    assert "adapt" in out and "7 prompts, 6 with a gold answer" in out


def test_announce_says_the_work_and_suggests_the_demo_on_a_cpu():
    cfg = load_config(None, ["data.arithmetic.n=64"])  # the defaults: 64 votes, 3072 tokens
    sets = {"adapt": load_sets(cfg)[0]}
    text = announce(cfg, sets, "cpu", training=True, quiet=True)
    assert "64 prompts (adapt 64) x 16 samples (+ 1 greedy) of up to 3072 new tokens" in text
    assert "x 64 votes of up to 3072 new tokens" in text and "--config demo" in text
    demo = load_config("demo")
    assert "--config demo" not in announce(demo, {"adapt": load_sets(demo)[0][:32]}, "cpu", training=True,
                                           quiet=True)
    assert "--config demo" not in announce(cfg, sets, "cuda", training=True, quiet=True)
