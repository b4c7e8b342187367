"""A real cache for the admin and inspect tests: a LanceDB index in a temp home, a CPU and
a disk tier holding chunks of SmolLM2-135M's KV layout (bf16, 30 layers, 3 KV heads of 64),
entries of real prompts in several tenants (imported by name: tests have no packages)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

from kvshare.catalog import LocalCatalog
from kvshare.config import KVShareConfig
from kvshare.model_assets import SMOLLM2_ALIAS, resolve_model_dir
from kvshare.model_identity import model_fingerprint
from kvshare.storage.chunk import KVChunk, KVLayout, split_prompt_kv
from kvshare.storage.disk_tier import DiskTier
from kvshare.storage.index import IndexEntry, new_entry_id
from kvshare.storage.memory_tier import MemoryTier
from kvshare.storage.tiered_store import TieredStore
from kvshare.tiers_setup import build_store

SMOLLM2_LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)
CHUNK_TOKENS = 16
"""Small chunks (368 KiB each) so a prompt of a few dozen tokens spans several."""

INVOICE = ("You are a careful accountant. Translate the following invoice into French and "
           "keep every total unchanged. Line 1: 3 units of part 107 at 12.50 euros each.")
INVOICE_EDITED = INVOICE.replace("Line 1: 3 units of part 107", "Line 1: 9 units of part 241")
TRIP = ("Plan a three day trip to Lisbon for two people who like museums, long walks by "
        "the river and cheap seafood restaurants; list one morning and one evening idea.")


@dataclasses.dataclass
class RealCache:
    config: KVShareConfig
    config_path: Path
    catalog: LocalCatalog
    store: TieredStore
    model_id: str

    def add(self, text: str, token_ids: list[int], tenant: str,
            seed: int = 0) -> tuple[IndexEntry, list[KVChunk]]:
        """Store a prompt's chunks (random bf16 KV of SmolLM2's layout) and commit its
        entry, as the connector does."""
        gen = torch.Generator().manual_seed(seed)
        kv = torch.randn(SMOLLM2_LAYOUT.shape(len(token_ids)), generator=gen).to(torch.bfloat16)
        chunks = [KVChunk(c.header, c.kv.contiguous()) for c in split_prompt_kv(
            self.model_id, kv, token_ids, CHUNK_TOKENS, scope=tenant)]
        assert all(self.store.put(chunks))
        entry = IndexEntry(new_entry_id(), self.model_id, tenant,
                           self.catalog.embedder.embed([text])[0], token_ids, text,
                           chunk_keys=[c.key.hex() for c in chunks])
        self.catalog.commit([entry], SMOLLM2_LAYOUT.bytes_per_token())
        return entry, chunks

    def disk(self) -> DiskTier:
        return next(t for t in self.store.tiers if isinstance(t, DiskTier))

    def chunk_file(self, chunk: KVChunk) -> Path:
        return self.config.disk_path / f"{chunk.key.hex()}.kvc"

    def close(self) -> None:
        """Flush the index (so another process, or ``kvshare inspect``, reads it)."""
        self.catalog.close()
        self.store.close()


def open_real_cache(tmp_path: Path, wordllama, **overrides) -> RealCache:
    """An empty cache in ``tmp_path/home``, its config written to ``tmp_path/kvshare.yaml``."""
    home = tmp_path / "home"
    values = {"home": str(home), "model": str(resolve_model_dir(SMOLLM2_ALIAS)),
              "chunk_tokens": CHUNK_TOKENS, "cpu_bytes": 64 << 20, "disk_bytes": 256 << 20,
              **overrides}
    config_path = tmp_path / "kvshare.yaml"
    config_path.write_text(yaml.safe_dump(values))
    config = KVShareConfig.load(config_path, environ={})
    store = build_store(config)
    assert [t.name for t in store.tiers] == ["cpu", "disk"]
    return RealCache(config, config_path, LocalCatalog(config, wordllama), store,
                     model_fingerprint(resolve_model_dir(config.model), home))


def add_sample_entries(cache: RealCache, tokenizer
                       ) -> dict[str, tuple[IndexEntry, list[KVChunk]]]:
    """acme's invoice and its edit (sharing their leading chunks), globex's invoice (its
    own keys) and a public trip."""
    ids = {text: tokenizer(text, add_special_tokens=False)["input_ids"]
           for text in (INVOICE, INVOICE_EDITED, TRIP)}
    return {
        "acme": cache.add(INVOICE, ids[INVOICE], "acme", seed=1),
        "acme_edit": cache.add(INVOICE_EDITED, ids[INVOICE_EDITED], "acme", seed=1),
        "globex": cache.add(INVOICE, ids[INVOICE], "globex", seed=2),
        "public": cache.add(TRIP, ids[TRIP], "", seed=3),
    }


def reopen_without_memory(cache: RealCache) -> RealCache:
    """The same home after a restart: its index and disk tier, and an empty CPU tier."""
    cache.close()
    catalog = LocalCatalog(cache.config, cache.catalog.embedder)
    disk = build_store(dataclasses.replace(cache.config, cpu_bytes=0)).tiers
    store = TieredStore([MemoryTier.cpu(cache.config.cpu_bytes), *disk])
    return dataclasses.replace(cache, catalog=catalog, store=store)
