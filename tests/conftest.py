import pytest
import torch

from ttrl.config import ModelConfig

TINY_ARCH = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(scope="session")
def tiny():
    """A 2-layer model of SmolLM2's shape with random weights, and the real SmolLM2 tokenizer."""
    from ttrl.models import load_model

    torch.set_num_threads(2)
    return load_model(ModelConfig(architecture=TINY_ARCH), seed=0)
