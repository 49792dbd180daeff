import torch

from ttrl.config import ModelConfig
from ttrl.models import EMBEDDED, embedded_model_dir, encode_prompts, load_model
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
