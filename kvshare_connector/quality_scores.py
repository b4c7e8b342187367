"""The quality gate's latest scores on disk: one JSON document per model under ``<home>/quality``.

The connector's scheduler half writes them after every batch of shadow checks it scores
(:meth:`kvshare.connector.quality_gate.QualityGate.snapshot`); ``kvshare inspect stats``
reads them, on an embedded home or in a daemon. This module imports neither vLLM nor
torch, so readers stay light.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def scores_path(home: Path, model_id: str) -> Path:
    """Where the latest scores of ``model_id`` are kept (one file per model: engines of
    other models never write it)."""
    return home / "quality" / f"{model_id}.json"


def write_scores(path: Path, document: dict[str, Any]) -> None:
    """Write a snapshot atomically (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document, indent=1))
    os.replace(temporary, path)


def read_scores(home: Path) -> list[dict[str, Any]]:
    """Every model's latest scores under ``home`` (see :func:`write_scores`), newest first;
    none when no check was ever scored there."""
    documents = [json.loads(path.read_text())
                 for path in sorted((home / "quality").glob("*.json"))]
    return sorted(documents, key=lambda d: d["updated_at"], reverse=True)
