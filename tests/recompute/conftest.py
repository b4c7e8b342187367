"""Models for the recompute tests: real SmolLM2 (fp32, loaded once) and tiny random ones.

SmolLM2 is computed in float32 so exactness tests can use tight tolerances; its
weights are bf16, so nothing is lost by the upcast.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvshare.recompute.hf_adapter import HFDecoderAdapter


@dataclass(frozen=True)
class Loaded:
    model: torch.nn.Module
    adapter: HFDecoderAdapter


def _loaded(model: torch.nn.Module) -> Loaded:
    model.eval()
    return Loaded(model=model, adapter=HFDecoderAdapter(model))


@pytest.fixture(scope="session")
def smollm2() -> Loaded:
    from transformers import AutoModelForCausalLM

    from kvshare.model_assets import resolve_model_dir

    path = resolve_model_dir("smollm2-135m-instruct")
    return _loaded(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from kvshare.model_assets import load_tokenizer

    return load_tokenizer()


TINY_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def _tiny(arch: str, **overrides) -> Loaded:
    """A random 4-layer GQA model in fp32, seeded so failures reproduce.

    ``qwen2`` has biases on q/k/v (as Qwen2 and Qwen2.5 do); ``llama`` has none. Biases
    are drawn at random: transformers initialises them to zero, which would hide them.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    model_cls, config_cls = {
        "llama": (LlamaForCausalLM, LlamaConfig),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config),
    }[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TINY_CONFIG, **overrides}))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.5)
    return _loaded(model)


@pytest.fixture(scope="session")
def make_tiny():
    """``make_tiny(arch, **config_overrides) -> Loaded`` for configs a test needs."""
    return _tiny


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny(request) -> Loaded:
    """Each tiny architecture in turn, default config."""
    return _tiny(request.param)


COMEDY_PROMPT_START = "Write me a short script for a short scene from a comedy movie"


@pytest.fixture(scope="session")
def comedy_prompt() -> str:
    """A real ShareGPT first turn (~370 tokens) with names, ages and clauses to edit."""
    from kvshare.data.sharegpt import first_user_turns

    return next(p for p in first_user_turns() if p.startswith(COMEDY_PROMPT_START))


@pytest.fixture(scope="session")
def chat_ids(smollm2_tokenizer):
    """``chat_ids(text) -> int64 [T]``: a user turn in SmolLM2's chat template, ready to answer."""

    def encode(text: str) -> torch.Tensor:
        messages = [{"role": "user", "content": text}]
        encoded = smollm2_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        return torch.tensor(encoded["input_ids"], dtype=torch.int64)

    return encode


@pytest.fixture(scope="session")
def comedy_prefill(smollm2, chat_ids, comedy_prompt):
    """(token ids, full-prefill PromptKV, last-token logits) of the comedy prompt."""
    from recompute_reference import full_prefill

    ids = chat_ids(comedy_prompt)
    kv, logits = full_prefill(smollm2.model, ids)
    return ids, kv, logits
