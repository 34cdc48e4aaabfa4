"""The embedded scene corpus: the generator (``generator``: what a scene is), one writer per real file format
(``writers/``) and the corpus on disk (``corpus``: write, verify, cache, manifest). The public names of both are
served from here."""

from vl.data.scenes.corpus import (
    PARTS,
    corpus_key,
    corpus_paths,
    default_cache_dir,
    ensure_corpus,
    verify_corpus,
    write_corpus,
)
from vl.data.scenes.generator import *  # noqa: F403
from vl.data.scenes.generator import __all__ as _generator_names

__all__ = [
    *_generator_names,
    "PARTS",
    "corpus_key",
    "corpus_paths",
    "write_corpus",
    "verify_corpus",
    "ensure_corpus",
    "default_cache_dir",
]
