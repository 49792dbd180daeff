import json
from pathlib import Path

import pytest

from ttrl.config import ArithmeticConfig, DataConfig
from ttrl.data import (DataError, Problem, arithmetic_problems, drop_too_long, load_file, load_problems,
                       render_prompt, split_holdout)


@pytest.mark.parametrize("name, rows", [("aime2024", 30), ("amc", 83), ("math500", 500)])
def test_bundled_benchmarks(name, rows):
    problems = load_problems(name, DataConfig())
    assert len(problems) == rows
    assert all(p.prompt and p.answer is not None for p in problems)
    assert len({p.id for p in problems}) == rows


def test_arithmetic_is_seeded_distinct_and_correct():
    a = arithmetic_problems(ArithmeticConfig(n=50, seed=3))
    assert a == arithmetic_problems(ArithmeticConfig(n=50, seed=3))
    assert a != arithmetic_problems(ArithmeticConfig(n=50, seed=4))
    assert len({p.id for p in a}) == 50
    for p in a:
        x, y = p.prompt.removeprefix("What is ").removesuffix("?").split(" + ")
        assert int(p.answer) == int(x) + int(y)
    with pytest.raises(DataError, match="distinct"):
        arithmetic_problems(ArithmeticConfig(n=101))


def test_holdout_split_is_disjoint_and_seeded():
    problems = arithmetic_problems(ArithmeticConfig(n=40))
    adapt, held = split_holdout(problems, 0.25, seed=1)
    assert len(held) == 10 and len(adapt) == 30
    assert not {p.id for p in adapt} & {p.id for p in held}
    assert split_holdout(problems, 0.25, seed=1) == (adapt, held)


def test_template():
    p = arithmetic_problems(ArithmeticConfig(n=1))[0]
    assert render_prompt(p, "{problem} Answer with just the number.") == p.prompt + " Answer with just the number."


def _write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_jsonl_and_json_with_custom_fields(tmp_path):
    rows = [{"q": "1+1?", "gold": 2, "uid": "a"}, {"q": "2+2?", "uid": "b"}]
    jl = _write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    js = _write(tmp_path, "p.json", json.dumps({"data": rows}))
    for path in (jl, js):
        ps = load_file(path, prompt_field="q", answer_field="gold", id_field="uid")
        assert [p.id for p in ps] == ["a", "b"] and ps[0].answer == "2" and ps[1].answer is None


@pytest.mark.parametrize("content, pattern", [
    ('{"problem": "a"}\n{"problem": "b"\n', r"p\.jsonl:2: not valid JSON"),
    ('{"problem": "a"}\n{"question": "b"}\n', r"p\.jsonl:2: missing or empty prompt field 'problem'"),
    ('{"problem": "   "}\n', r"p\.jsonl:1: missing or empty prompt field"),
    ('', r"no prompts found"),
    ('{"id": 1, "problem": "a"}\n{"id": 1, "problem": "b"}\n', r"p\.jsonl:2: duplicate id '1'"),
    ('[1, 2]\n', r"p\.jsonl:1: expected a JSON object"),
    ('{"problem": "a", "answer": 1}\n{"problem": "b", "answer": [2]}\n', r"p\.jsonl:2: gold answer field 'answer' holds \[2\]"),
    ('{"problem": "a", "answer": true}\n', r"p\.jsonl:1: gold answer field 'answer' holds true"),
    ('{"problem": "a", "answer": NaN}\n', r"p\.jsonl:1: gold answer field 'answer' holds NaN"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, pattern):
    with pytest.raises(DataError, match=pattern):
        load_file(_write(tmp_path, "p.jsonl", content))


def test_a_blank_gold_answer_is_no_gold_not_a_wrong_one(tmp_path):
    """Unlabelled rows exported from a table often carry "answer": "": they are unlabelled (not graded
    against "" and always wrong); a number is a gold answer as text."""
    problems = load_file(_write(tmp_path, "p.ndjson", '{"problem": "a", "answer": ""}\n{"problem": "b", "answer": "  "}\n'
                                                      '{"problem": "c", "answer": 12}\n'))
    assert [p.answer for p in problems] == [None, None, "12"]
    with pytest.raises(DataError, match=r"p2\.ndjson:2: "):  # .ndjson errors name the line too
        load_file(_write(tmp_path, "p2.ndjson", '{"problem": "a"}\n{"problem": ""}\n'))


def test_non_utf8_names_line(tmp_path):
    path = _write(tmp_path, "p.jsonl", b'{"problem": "ok"}\n{"problem": "caf\xe9"}\n', mode="wb")
    with pytest.raises(DataError, match=r"p\.jsonl:2: bytes that are not UTF-8"):
        load_file(path)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_file(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unknown data format"):
        load_file(_write(tmp_path, "p.csv", "a,b\n"))


def test_jsonl_lines_split_on_newline_only_and_bom_is_dropped(tmp_path):
    rows = [{"id": "a", "problem": "x\u2028y\x85z"}, {"id": "b", "problem": "2+2?"}]
    text = "\ufeff" + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n"
    path = _write(tmp_path, "p.jsonl", text.encode("utf-8"), mode="wb")
    assert [p.prompt for p in load_file(path)] == ["x\u2028y\x85z", "2+2?"]


def test_problems_remember_where_they_came_from(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"problem": "a"}\n\n{"problem": "b"}\n')
    assert [p.source for p in load_file(path)] == [f"{path}:1", f"{path}:3"]


def test_drop_too_long_skips_or_fails():
    problems = [Problem(id=str(i), prompt="q", source=f"f.jsonl:{i + 1}") for i in range(4)]
    kept, skipped = drop_too_long(problems, [5, 11, 10, 12], budget=10, policy="skip", why="test")
    assert [p.id for p in kept] == ["0", "2"] and [p.id for p in skipped] == ["1", "3"]
    with pytest.raises(DataError, match=r"f\.jsonl:2 \(id '1'\): the prompt is 11 tokens, but only 10 fit \(test\); "
                                        r"2 prompt\(s\) are too long"):
        drop_too_long(problems, [5, 11, 10, 12], budget=10, policy="fail", why="test")
    with pytest.raises(DataError, match="every prompt is longer"):
        drop_too_long(problems, [11] * 4, budget=10, policy="skip", why="test")


def test_a_record_without_an_id_that_collides_names_both_records(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"problem": "a"}\n{"id": 0, "problem": "b"}\n')
    with pytest.raises(DataError) as e:
        load_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: duplicate id '0'") and f"{path}:1 has no 'id' field" in msg
    path.write_text('{"id": "1", "problem": "a"}\n{"problem": "b"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: duplicate id '1': this record has no 'id' field.*p\.jsonl:1"):
        load_file(path)
    path.write_text('{"problem": "a"}\n{"id": null, "problem": "b"}\n')
    assert [p.id for p in load_file(path)] == ["0", "1"]  # null is no id


def test_evaluation_sets_must_have_distinct_names(tmp_path):
    from ttrl.config import load_config
    from ttrl.data import load_sets

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jsonl").write_text('{"problem": "q"}\n')
    cfg = load_config(None, [f"data.eval=[{tmp_path / 'a' / 'x.jsonl'}, {tmp_path / 'b' / 'x.jsonl'}]"])
    with pytest.raises(DataError, match="two evaluation sets would be named 'x'"):
        load_sets(cfg)


def test_the_held_out_split_does_not_move_with_the_length_budget(tiny):
    """The split is drawn over all of data.train: a larger answer budget that leaves a long prompt out
    never moves another prompt between adapt and heldout (which could put trained prompts in heldout)."""
    from ttrl.config import load_config
    from ttrl.data import run_sets
    from ttrl.data import encode_problems

    model, tok = tiny
    problems = [Problem(str(i), f"What is {i} + 1?", str(i + 1)) for i in range(12)]
    problems.insert(3, Problem("long", "one two three " * 20, "0"))
    cfg = load_config(None, ["data.holdout=0.5", "data.too_long=skip", "train.seed=1", "rollout.max_new_tokens=8",
                             "eval.max_new_tokens=8"])
    longest = max(len(x) for x in encode_problems(tok, problems, cfg))
    saved = model.config.max_position_embeddings
    try:
        model.config.max_position_embeddings = longest + 8
        fits = run_sets(cfg, problems, {}, tok, model)  # every prompt fits 8 new tokens
        cfg.eval.max_new_tokens = cfg.rollout.max_new_tokens = 8 + (longest - min(
            len(x) for x in encode_problems(tok, problems, cfg))) - 1  # now only "long" is too long
        cut = run_sets(cfg, problems, {}, tok, model)
    finally:
        model.config.max_position_embeddings = saved
    assert "long" in {p.id for s in fits.values() for p in s} and "long" not in {p.id for s in cut.values() for p in s}
    for name in ("adapt", "heldout"):
        assert [p.id for p in cut[name]] == [p.id for p in fits[name] if p.id != "long"], name


def test_options_under_another_field_name_are_pointed_out(tmp_path, capsys):
    from ttrl.data import load_file

    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps({"problem": f"Pick {i}", "options": ["1", "2", "3", "4"], "answer": "B"}) + "\n"
                            for i in range(3)))
    problems = load_file(path)
    assert all(p.choices is None for p in problems)  # read as asked: open questions
    err = capsys.readouterr().err
    assert "warning:" in err and "field 'options'" in err and "data.choices_field=options" in err
    assert all(p.choices == ("1", "2", "3", "4") for p in load_file(path, choices_field="options"))
    assert "warning" not in capsys.readouterr().err
    load_file(path, choices_field="")  # "" = never read options: asked for, no warning
    assert "warning" not in capsys.readouterr().err


def test_prompts_that_encode_to_nothing_stop_the_run_before_it_writes(tmp_path, capsys):
    """A model directory with a config.json and no tokenizer files: transformers builds a tokenizer
    without a vocabulary, every prompt encodes to no tokens; one error line, no run directory."""
    from transformers import Qwen2Config

    from ttrl.cli import main

    Qwen2Config(vocab_size=49152).save_pretrained(tmp_path / "bare")
    out = tmp_path / "run"
    tiny = str(Path(__file__).parent.parent / "configs" / "tiny.yaml")
    code = main(["train", "--config", tiny, "--output-dir", str(out), f"model.name={tmp_path / 'bare'}",
                 "train.steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "encodes to no tokens" in err, err
    assert not out.exists()
