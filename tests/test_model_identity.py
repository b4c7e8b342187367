"""Model ids are fingerprints of a directory's config, weights and tokenizer files."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from kvshare.model_assets import resolve_model_dir
from kvshare.model_identity import DIGEST_CACHE_NAME, model_fingerprint


def digest_part(model_id: str) -> str:
    return model_id.rsplit("@", 1)[1]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A small HF-style directory: SmolLM2's config and tokenizer files, 3 MB of weights."""
    real = resolve_model_dir("smollm2-135m-instruct")
    directory = tmp_path / "models" / "tiny-model"
    directory.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        shutil.copy2(real / name, directory / name)
    (directory / "model.safetensors").write_bytes(os.urandom(3 << 20))
    return directory


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place (same file, same size)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_same_files_same_id_and_readable_name(model_dir, home):
    first = model_fingerprint(model_dir, home)
    assert re.fullmatch(r"tiny-model@[0-9a-f]{16}", first)
    assert model_fingerprint(str(model_dir), home) == first  # from the digest cache
    assert model_fingerprint(model_dir, home / "elsewhere") == first  # hashed afresh


def test_real_smollm2_directory(home):
    model_id = model_fingerprint(resolve_model_dir("smollm2-135m-instruct"), home)
    assert re.fullmatch(r"smollm2-135m-instruct@[0-9a-f]{16}", model_id)


def test_changed_weight_byte_at_the_same_path_changes_the_id(model_dir, home):
    before = model_fingerprint(model_dir, home)
    flip_byte(model_dir / "model.safetensors", 1 << 20)
    assert model_fingerprint(model_dir, home) != before


def test_changed_byte_with_mtime_forced_back_changes_the_id(model_dir, home):
    weights = model_dir / "model.safetensors"
    before = model_fingerprint(model_dir, home)
    old = weights.stat()
    flip_byte(weights, 12345)
    os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert weights.stat().st_mtime_ns == old.st_mtime_ns
    assert model_fingerprint(model_dir, home) != before  # ctime moved


def test_weights_renamed_over_the_old_file_change_the_id(model_dir, home):
    before = model_fingerprint(model_dir, home)
    new = model_dir / "new.tmp"
    new.write_bytes(os.urandom(3 << 20))
    os.replace(new, model_dir / "model.safetensors")
    assert model_fingerprint(model_dir, home) != before


def test_tokenizer_counts_generation_config_does_not(model_dir, home):
    before = model_fingerprint(model_dir, home)
    (model_dir / "generation_config.json").write_text("{}")
    assert model_fingerprint(model_dir, home) == before
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({**tokenizer["added_tokens"][-1], "id": 99999})
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert model_fingerprint(model_dir, home) != before


def test_byte_identical_copy_elsewhere_has_the_same_digest(model_dir, home, tmp_path):
    copy = tmp_path / "other" / "tiny-model-copy"
    shutil.copytree(model_dir, copy)
    original, copied = model_fingerprint(model_dir, home), model_fingerprint(copy, home)
    assert copied.startswith("tiny-model-copy@")
    assert digest_part(copied) == digest_part(original)


def test_extra_weight_shard_changes_the_id(model_dir, home):
    before = model_fingerprint(model_dir, home)
    (model_dir / "extra.bin").write_bytes(b"\0" * 64)
    assert model_fingerprint(model_dir, home) != before


def test_digest_cache_is_trusted_while_the_signature_holds(model_dir, home):
    """The cache's limit, shown by editing it: an unchanged signature is not rehashed."""
    before = model_fingerprint(model_dir, home)
    cache_path = home / DIGEST_CACHE_NAME
    cache = json.loads(cache_path.read_text())
    key = str((model_dir / "model.safetensors").resolve())
    cache["files"][key]["digest"] = "0" * 32
    cache_path.write_text(json.dumps(cache))
    assert model_fingerprint(model_dir, home) != before
    cache_path.unlink()  # the documented way to force a rehash
    assert model_fingerprint(model_dir, home) == before


def test_cache_drops_deleted_files_and_survives_garbage(model_dir, home, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    model_fingerprint(copy, home)
    shutil.rmtree(copy)
    expected = model_fingerprint(model_dir, home)
    files = json.loads((home / DIGEST_CACHE_NAME).read_text())["files"]
    assert files and all(Path(key).is_relative_to(model_dir.resolve()) for key in files)
    (home / DIGEST_CACHE_NAME).write_text("not json")
    assert model_fingerprint(model_dir, home) == expected


def test_directory_without_config_is_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + ".*config.json"):
        model_fingerprint(tmp_path)
