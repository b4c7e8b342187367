"""Paper-style edits of a real ShareGPT prompt on real SmolLM2: DHD beats naive reuse.

The source prompt is prefilled once; each edited prompt reuses the source's K/V through a
token alignment (keys re-rotated to their new positions) and is then fixed by
(a) naive reuse: recompute only placeholders, boundary tokens and the last token, or
(b) DHD at rho = 0.15 with check layer 1. Both are compared with the edited prompt's own
full prefill. Run with ``-s`` to see the table quoted in docs/recompute.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from recompute_reference import full_prefill, kl_divergence, relative_error, reuse_by_alignment

from kvshare.recompute import PromptKV, SelectiveRecomputeEngine

EDITS = {
    "swap name": lambda p: p.replace("John Thompson", "Lin Daiyu").replace("John", "Lin"),
    "swap number": lambda p: p.replace("a 69 year old man", "a 58 year old man"),
    "insert clause": lambda p: p.replace(
        "some embarrassing stains.",
        "some embarrassing stains. He also keeps a collection of novelty mugs on his desk, "
        "each one uglier than the last.",
    ),
    "delete clause": lambda p: p.replace(
        " He can often be found using disabled toilets for hours on end,"
        " despite no obvious disability.",
        "",
    ),
}
SYSTEMS = {"naive": {"rho": 0.0, "check_layers": ()}, "dhd": {"rho": 0.15, "check_layers": (1,)}}


@dataclass(frozen=True)
class Quality:
    """Distance of one system's K/V and next-token prediction from full compute."""

    kv_error: float
    """Relative error of all K/V rows, all layers."""
    last_kv_error: float
    """Relative error of the last token's K/V, all layers (it attends over everything)."""
    kl: float
    """KL(full || system) of the next-token distribution, nats."""
    top1_agrees: bool
    recompute_fraction: float


def _quality(result, full_kv: PromptKV, full_logits: torch.Tensor) -> Quality:
    def both(kv: PromptKV, rows=slice(None)) -> torch.Tensor:
        return torch.cat([kv.keys[:, rows], kv.values[:, rows]])

    return Quality(
        kv_error=relative_error(both(result.kv), both(full_kv)),
        last_kv_error=relative_error(both(result.kv, -1), both(full_kv, -1)),
        kl=kl_divergence(full_logits, result.last_logits),
        top1_agrees=bool(result.last_logits.argmax() == full_logits.argmax()),
        recompute_fraction=result.recompute_fraction,
    )


@pytest.fixture(scope="module")
def qualities(smollm2, chat_ids, comedy_prompt, comedy_prefill) -> dict[str, dict[str, Quality]]:
    """``{edit: {system: Quality}}`` for every edit and system."""
    src_ids, src_kv, _ = comedy_prefill
    table = {}
    for edit, apply in EDITS.items():
        edited = apply(comedy_prompt)
        assert edited != comedy_prompt, f"edit {edit!r} no longer matches the prompt text"
        ids = chat_ids(edited)
        full_kv, full_logits = full_prefill(smollm2.model, ids)
        reused, recompute = reuse_by_alignment(src_ids, src_kv, ids, smollm2.adapter.rope_inv_freq)
        table[edit] = {}
        for system, settings in SYSTEMS.items():
            engine = SelectiveRecomputeEngine(smollm2.adapter, **settings)
            result = engine.prefill(
                ids, PromptKV(reused.keys.clone(), reused.values.clone()), recompute
            )
            table[edit][system] = _quality(result, full_kv, full_logits)
    _print_table(table)
    return table


def _print_table(table: dict[str, dict[str, Quality]]) -> None:
    print("\nedit           system  kv_err   last_kv_err  KL(nats)  top1  recompute")
    for edit, row in table.items():
        for system, q in row.items():
            print(
                f"{edit:14} {system:6}  {q.kv_error:.4f}   {q.last_kv_error:.4f}       "
                f"{q.kl:.5f}   {int(q.top1_agrees)}     {q.recompute_fraction:.3f}"
            )


@pytest.mark.parametrize("edit", list(EDITS))
def test_dhd_kv_is_closer_to_full_compute_than_naive(qualities, edit):
    naive, dhd = qualities[edit]["naive"], qualities[edit]["dhd"]
    assert dhd.kv_error < naive.kv_error
    assert dhd.last_kv_error < naive.last_kv_error


def test_dhd_next_token_distribution_is_closer_than_naive(qualities):
    mean_kl = {s: sum(row[s].kl for row in qualities.values()) / len(qualities) for s in SYSTEMS}
    assert mean_kl["dhd"] < mean_kl["naive"]


def test_dhd_predicts_the_same_next_token_as_full_compute(qualities):
    assert all(row["dhd"].top1_agrees for row in qualities.values())


def test_dhd_recomputes_about_rho_plus_the_check_layers(qualities):
    """One full layer + one full QKV (2 of 30 layers' rows) + 15% of the rest, roughly."""
    for row in qualities.values():
        assert 0.15 < row["dhd"].recompute_fraction < 0.30
        assert row["naive"].recompute_fraction < 0.07
