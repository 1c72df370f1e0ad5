"""The embedded default multimodal corpus: built from installed packages and generated data, each with its licence."""

from __future__ import annotations

from codex_jax.data.default_corpus.build import (
    CORPUS_VERSION,
    DIR_NAME,
    SOURCES,
    build_default_corpus,
    build_source,
    default_dir,
    read_info,
)

__all__ = ["CORPUS_VERSION", "DIR_NAME", "SOURCES", "build_default_corpus", "build_source", "default_dir", "read_info"]
