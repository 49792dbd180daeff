"""Model shapes for the benchmarks, with random weights: Qwen2.5-1.5B and -7B as published
(model type qwen2, their real vocabularies), and a tiny qwen2 for smoke runs.

Each is written as a model directory (config.json + the embedded SmolLM2 tokenizer) so nothing
is downloaded; ttrl builds the random model from it (`model.architecture` set). The vocabulary is
Qwen's (151,936 / 152,064 entries), so the LM head, the logits and the sampler's per-step tensors
are the real model's size; the SmolLM2 tokenizer only encodes the prompts (its 49,152 ids are valid
in the larger vocabulary) and sampled ids beyond it decode to nothing (random text either way).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": 1, "eos_token_id": 2,
         "pad_token_id": 2, "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 32768,
         "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False, "attention_dropout": 0.0}
"""Settings Qwen2.5's configs share; special token ids are the SmolLM2 tokenizer's."""

SHAPES = {
    "qwen1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, max_window_layers=21, tie_word_embeddings=True, vocab_size=151936),
    "qwen7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, max_window_layers=28, tie_word_embeddings=False, vocab_size=152064),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_window_layers=2, tie_word_embeddings=True, vocab_size=49152),
}
PARAMS = {"qwen1.5b": 1_543_714_304, "qwen7b": 7_615_616_512}
"""Parameter counts of the published models (Qwen2.5-1.5B: 1.54B, -7B: 7.61B)."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def model_dir(arch: str, root: str | Path) -> tuple[str, dict]:
    """(model.name, model.architecture) of `arch`: a config directory written under `root`."""
    from ttrl.models import embedded_model_dir

    shape = SHAPES[arch]
    path = Path(root) / f"qwen2-{arch}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**QWEN2, **shape}, indent=1))
    tokenizer = embedded_model_dir()  # on a GPU machine: .device/cache (TTRL_CACHE), no weights needed
    for f in TOKENIZER_FILES:
        if (tokenizer / f).is_file():
            shutil.copy(tokenizer / f, path / f)
    return str(path), {k: v for k, v in shape.items() if k != "max_window_layers"}
