import re
from pathlib import Path

import torch

from ttrl.config import ModelConfig
from ttrl.data import encode_prompts
from ttrl.models import EMBEDDED, embedded_model_dir, load_model
from ttrl.rollout import Sampling, generate


def test_embedded_smollm2_loads_and_answers():
    path = embedded_model_dir()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    model, tok = load_model(ModelConfig(name=EMBEDDED))
    assert sum(p.numel() for p in model.parameters()) > 100e6
    assert next(model.parameters()).dtype == torch.float32
    ids = encode_prompts(tok, ["What is 2 + 2? Answer with just the number."])
    assert "<|im_start|>assistant" in tok.decode(ids[0])  # chat template applied
    r = generate(model, tok, ids, Sampling(n=1, temperature=0.0, max_new_tokens=8))
    assert "4" in r.texts[0]


def test_architecture_overrides_build_a_random_model():
    model, _ = load_model(ModelConfig(architecture={"num_hidden_layers": 1, "hidden_size": 32,
                                                    "intermediate_size": 64, "num_attention_heads": 2,
                                                    "num_key_value_heads": 1}), seed=1)
    again, _ = load_model(ModelConfig(architecture={"num_hidden_layers": 1, "hidden_size": 32,
                                                    "intermediate_size": 64, "num_attention_heads": 2,
                                                    "num_key_value_heads": 1}), seed=1)
    assert model.config.num_hidden_layers == 1
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)  # seeded


def test_lora_trains_only_the_adapter():
    model, _ = load_model(ModelConfig(architecture={"num_hidden_layers": 1, "hidden_size": 32,
                                                    "intermediate_size": 64, "num_attention_heads": 2,
                                                    "num_key_value_heads": 1}, lora_rank=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


# --- model directories: derived settings follow an override; malformed ones fail with one ModelError ---

import json
import shutil

import pytest

from ttrl.models import ModelError, cache_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
QWEN_15B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu", "hidden_size": 1536, "intermediate_size": 8960, "max_position_embeddings": 32768,
            "max_window_layers": 21, "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": False,
            "vocab_size": 151936}
"""Qwen2.5-1.5B's config.json (as published, less a few generation fields)."""
SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 49152}


def _model_dir(path, config: dict | str | None, tokenizer: bool = True):
    """A model directory: `config` written as config.json, the embedded model's tokenizer files."""
    path.mkdir(parents=True, exist_ok=True)
    embedded_model_dir()
    if config is not None:
        (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    for f in TOKENIZER_FILES if tokenizer else ():
        shutil.copy(cache_dir() / EMBEDDED / f, path / f)
    return path


def test_layer_count_override_on_a_qwen2_config(tmp_path):
    # transformers 5 keeps a per-layer list (layer_types, 28 entries): it must follow num_hidden_layers.
    path = _model_dir(tmp_path / "qwen", QWEN_15B)
    model, _ = load_model(ModelConfig(name=str(path), architecture=SMALL), seed=0)
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 2
    assert model.config.layer_types == ["full_attention"] * 2
    assert model.model.layers[0].self_attn.head_dim == 16  # 64 / 4 heads: derived, not Qwen's 128
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # a real qwen2 model (biased q/k/v)


def test_qwen_shapes_are_the_real_ones(tmp_path):
    """On the meta device: the shape is built, no weight is allocated."""
    path = _model_dir(tmp_path / "qwen", QWEN_15B)
    model, _ = load_model(ModelConfig(name=str(path), architecture={"num_hidden_layers": 28}), device="meta")
    assert next(model.parameters()).device.type == "meta"
    # Qwen2.5-1.5B: embeddings 151936 x 1536 (tied) + 28 x (q 1536x1536+b, k,v 1536x256+b, o 1536x1536,
    # mlp 3 x 1536x8960, 2 norms) + final norm.
    layer = (1536 * 1536 + 1536) + 2 * (1536 * 256 + 256) + 1536 * 1536 + 3 * 1536 * 8960 + 2 * 1536
    assert sum(p.numel() for p in model.parameters()) == 151936 * 1536 + 28 * layer + 1536 == 1_543_714_304
    # The embedded Llama-type config grown to the same shape: head_dim follows hidden/heads (was kept at 64),
    # and rope_theta goes where transformers 5 keeps it.
    model, _ = load_model(ModelConfig(architecture={**{k: QWEN_15B[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size")}, "rope_theta": 1e6}), device="meta")
    assert model.config.head_dim == 128 and model.config.rope_parameters["rope_theta"] == 1e6


def test_random_weights_are_built_on_the_device_and_seeded():
    cfg = ModelConfig(architecture=SMALL)
    a, _ = load_model(cfg, seed=3, device="cpu")
    b, _ = load_model(cfg, seed=3, device=torch.device("cpu"))
    c, _ = load_model(cfg, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    meta, _ = load_model(cfg, seed=3, device="meta")  # built there: never materialised on the CPU
    assert {p.device.type for p in meta.parameters()} == {"meta"}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A small pretrained-style directory: weights, config and tokenizer."""
    model, tok = load_model(ModelConfig(architecture=SMALL), seed=0)
    path = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _broken(tmp_path, saved_model, what: str) -> str:
    path = tmp_path / "m"
    shutil.copytree(saved_model, path)
    weights = path / "model.safetensors"
    if what == "garbage config":
        (path / "config.json").write_bytes(b"\x00\xffnot json{")
    elif what == "empty config":
        (path / "config.json").write_text("")
    elif what == "unknown model_type":
        (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()),
                                                      "model_type": "not_a_model"}))
    elif what == "no tokenizer":
        for f in path.glob("tokenizer*"):
            f.unlink()
    elif what == "bad tokenizer":
        (path / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
    elif what == "missing weights":
        weights.unlink()
    elif what == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif what == "missing tensors":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        del tensors["model.layers.1.mlp.down_proj.weight"]
        save_file(tensors, weights, metadata={"format": "pt"})
    return str(path)


@pytest.mark.parametrize("what, expected", [
    ("garbage config", "is not valid JSON"),
    ("empty config", "is not valid JSON"),
    ("unknown model_type", "transformers cannot read"),
    ("no tokenizer", "no usable tokenizer"),
    ("bad tokenizer", "no usable tokenizer"),
    ("missing weights", "cannot load the weights"),
    ("truncated weights", "cannot load the weights"),
    ("missing tensors", "lack 1 tensors (model.layers.1.mlp.down_proj.weight)"),
])
def test_malformed_model_directory_is_one_model_error(tmp_path, saved_model, what, expected):
    name = _broken(tmp_path, saved_model, what)
    with pytest.raises(ModelError, match=re.escape(expected)) as e:
        load_model(ModelConfig(name=name))
    assert name in str(e.value)


def test_a_run_directory_as_model_name_points_to_its_model(tmp_path, saved_model):
    run = tmp_path / "run"
    shutil.copytree(saved_model, run / "model")
    (run / "config.json").write_text(json.dumps({"model": {"name": "smollm2-135m"}, "train": {"steps": 3}}))
    with pytest.raises(ModelError, match=re.escape(f"did you mean {run / 'model'}?")):
        load_model(ModelConfig(name=str(run)))


@pytest.mark.parametrize("cfg, expected", [
    (ModelConfig(architecture={**SMALL, "num_hidden_layers": -1}), "num_hidden_layers = -1: must be a whole number"),
    (ModelConfig(architecture={**SMALL, "hidden_size": 65}), "hidden_size 65 is not divisible by num_attention_heads"),
    (ModelConfig(architecture={**SMALL, "num_key_value_heads": 3}), "not a multiple of num_key_value_heads 3"),
    (ModelConfig(architecture={**SMALL, "hidden_sise": 64}), "model.architecture.hidden_sise: LlamaConfig has no"),
    (ModelConfig(architecture=SMALL, lora_rank=2, lora_target_modules=["q_proj", "qproj"]), "'qproj' match no module"),
])
def test_impossible_shapes_and_lora_targets_fail_before_any_weight(cfg, expected, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were built before the error")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    real = transformers.AutoModelForCausalLM.from_config
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        lambda config, **kw: real(config, **kw) if torch.get_default_device().type == "meta"
                        else refuse())
    with pytest.raises(ModelError, match=re.escape(expected)):
        load_model(cfg)


def test_every_extra_the_project_names_is_declared():
    """`pip install 'ttrl[x]'` in an error message or the README, or `extra == 'x'`, must name an
    extra pyproject.toml declares (`embedded` was named, not declared)."""
    import re
    import tomllib

    root = Path(__file__).parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = set(project["optional-dependencies"])
    text = "\n".join(p.read_text() for p in [root / "README.md", *root.glob("docs/*.md"), *root.glob("ttrl/*.py")])
    named = set(re.findall(r"extra == '(\w+)'", "\n".join(project["dependencies"])))
    for group in re.findall(r"(?:ttrl|\.)\[([\w,]+)\]", text):
        named |= set(group.split(","))
    assert "embedded" in declared and "embedded" in named
    assert named <= declared, named - declared


def test_a_system_prompt_without_a_chat_template_comes_first():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    plain = encode_prompts(tok, ["What is 1 + 1?"], chat_template=False, system_prompt="Be terse.")[0]
    assert tok.decode(plain) == "Be terse.\n\nWhat is 1 + 1?"
    chat = tok.decode(encode_prompts(tok, ["What is 1 + 1?"], system_prompt="Be terse.")[0])
    assert chat.startswith("<|im_start|>system\nBe terse.<|im_end|>")


def test_a_tokenizer_that_does_not_fit_the_model_is_refused_before_any_weight():
    """SmolLM2's 49,152-token tokenizer on a model of 1,000 would fail at the first embedding lookup."""
    import pytest

    from ttrl.models import ModelError

    shape = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
             "num_key_value_heads": 1}
    with pytest.raises(ModelError, match="does not fit the model's vocabulary of 1000"):
        load_model(ModelConfig(architecture={**shape, "vocab_size": 1000}))
    load_model(ModelConfig(architecture={**shape, "vocab_size": 50000}))  # rows to spare are fine


def test_a_damaged_lora_adapter_is_a_model_error(tmp_path):
    """A truncated adapter_model.safetensors (a full disk, a copy cut short) is one error naming the
    directory, not a safetensors traceback."""
    import pytest

    from ttrl.models import ModelError

    shape = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
             "num_key_value_heads": 1}
    model, tok = load_model(ModelConfig(architecture=shape, lora_rank=2))
    model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    load_model(ModelConfig(name=str(tmp_path / "adapter"), architecture=shape))  # intact: loads
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match="holds a LoRA adapter that cannot be loaded"):
        load_model(ModelConfig(name=str(tmp_path / "adapter"), architecture=shape))
