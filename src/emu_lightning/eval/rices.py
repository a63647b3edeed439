"""RICES: Retrieval-based In-Context Example Selection (Yang et al. 2022; Flamingo; OpenFlamingo).

For each query image, the few-shot demonstrations are the ``k`` support (train) items whose image features
are most cosine-similar to the query's. Features are L2-normalised, so cosine similarity is an inner product;
the ``k`` hits are returned least similar first, so that the most similar demonstration sits last in the
prompt, next to the query.

Two layers:

- :meth:`RICES.from_features` + :meth:`RICES.find`: exact top-k over a feature matrix. Candidates come from
  faiss (``IndexFlatIP``, exact) or from a chunked torch matmul + top-k. Wherever float32 rounding could
  order two candidates either way (scores within ``D * 2^-23``), they are re-ranked in float64, ties broken
  by the lower index, so both backends return the same indices: the backend never changes a prompt.
- :class:`RICES` over a dataset: encodes each *unique* image once (a VQA set asks several questions about
  one image; OpenFlamingo encoded the image again for every question), caches the features on disk and
  maps retrieved images back to dataset items (:meth:`RICES.find_for_images`).

Dataset protocol: ``dataset[i]`` is a mapping with an image id (``id_key``, default ``"image_id"``; any
hashable: int, str) and an image (``image_key``, default ``"image"``; a ``(3, H, W)`` float tensor in
``[0, 1]``, the input the encoder expects). Items that share an id must share the image. A dataset may
also expose ``image_ids`` (one id per item): then the ids are read without loading any item, and a cache
hit loads no image at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from emu_lightning.components.base import VisionBackbone
from emu_lightning.progress import progress_bar

FAISS_MIN_SUPPORT = 2_000
"""Default backend switch: faiss from this many support images. On a 2-core AVX-512 EPYC (torch 2.14 with MKL,
faiss-cpu 1.15, 768-d features, ``benchmarks/rices.py``) faiss was as fast as the torch backend or faster at
every size measured, 500 to 100k images (1.25-1.3x at 100k); below 2k both take milliseconds, and torch
spares the index's copy of the features."""
CHUNK_BYTES = 512 << 20
"""Largest float32 similarity block (queries x support) the torch backend holds at once, up to 1,024 queries
(256 MB blocks were ~5% slower at 100k x 768 on 2 cores)."""
_CACHE_KEY = re.compile(r"[\w.+=@-]+")

Encoder = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------- encoders
@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and no grad; restores every submodule's own flag (a parent may keep frozen children in eval)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


class VisionBackboneFeatures(nn.Module):
    """One feature per image from a :class:`VisionBackbone`: its CLS token, or the mean of its patch tokens.

    Runs the backbone in eval mode without gradients. Emu's backbone gives the last block's tokens before
    CLIP's final norm and projection (then its own LayerNorm), so these are not CLIP's image embeddings.

    Args:
        backbone: returns tokens ``(B, N, D)`` with ``num_prefix_tokens`` prefix tokens first.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        prefix = int(getattr(backbone, "num_prefix_tokens", 0))
        # timm ViTs with register tokens but no class token have prefix tokens and no CLS to read.
        has_cls = getattr(getattr(backbone, "model", None), "cls_token", True) is not None
        self.use_cls = prefix > 0 and has_cls
        self.num_prefix_tokens = prefix

    def forward(self, images: Tensor) -> Tensor:
        with _eval_mode(self.backbone):
            tokens = self.backbone(images)
        if tokens.ndim != 3:
            raise ValueError(f"expected backbone tokens (B, N, D), got shape {tuple(tokens.shape)}")
        return tokens[:, 0] if self.use_cls else tokens[:, self.num_prefix_tokens :].mean(dim=1)


def features_from_vision_backbone(backbone: nn.Module) -> VisionBackboneFeatures:
    """The default RICES encoder: the model's own vision backbone (``model.vision``), pooled to ``(B, D)``."""
    return VisionBackboneFeatures(backbone)


def _as_encoder(encoder: Encoder | nn.Module) -> Encoder:
    if isinstance(encoder, VisionBackbone):
        return features_from_vision_backbone(encoder)
    if not callable(encoder):
        raise TypeError(f"encoder must be callable (images -> features), got {type(encoder).__name__}")
    return encoder


def _plain_id(image_id: Any) -> Any:
    # Tensor / numpy scalars hash by identity or type; their Python value is the id.
    if hasattr(image_id, "item") and not isinstance(image_id, str):
        return image_id.item()
    return image_id


def fingerprint(image_ids: Sequence[Any]) -> str:
    """sha256 of the ordered unique image ids (type and value), naming a cache file's content."""
    text = json.dumps([[type(i).__name__, str(i)] for i in image_ids])
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------- RICES
class RICES:
    """Retrieval-based in-context example selection over a support dataset, features cached per unique image.

    Args:
        dataset: the support (train) items, following the protocol in the module docstring.
        encoder: images ``(B, 3, H, W)`` -> features ``(B, D)``; a :class:`VisionBackbone` (the model's own,
            ``model.vision``) is pooled by :func:`features_from_vision_backbone`. ``nn.Module`` encoders run
            in eval mode without gradients, on their parameters' device.
        cache_dir: folder of feature caches; ``None`` encodes every time.
        cache_key: names the encoder, its weights and the dataset, e.g. ``"emu-vision-vqav2-train"``; the
            file is ``{cache_key}-{first 16 hex digits of the image ids' fingerprint}.safetensors``. Required with
            ``cache_dir``. A different encoder must use a different key: the fingerprint sees ids, not pixels or
            weights.
        batch_size: images per encoder call.
        image_key: key of the image in a dataset item.
        id_key: key of the image id in a dataset item.
        distinct_images: the k demonstrations show k different images (each image's first item); ``False``
            ranks items as OpenFlamingo did, so one image's questions can fill several slots.
        use_faiss: ``None`` picks faiss from :data:`FAISS_MIN_SUPPORT` unique images on; results are the same.
    """

    def __init__(
        self,
        dataset: Sequence[Any],
        encoder: Encoder | nn.Module,
        cache_dir: str | Path | None = None,
        cache_key: str | None = None,
        batch_size: int = 64,
        image_key: str = "image",
        id_key: str = "image_id",
        distinct_images: bool = True,
        use_faiss: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if cache_dir is not None and not cache_key:
            raise ValueError("cache_dir is set but cache_key is empty; name the encoder and dataset in it")
        if cache_key is not None and not _CACHE_KEY.fullmatch(cache_key):
            raise ValueError(f"cache_key {cache_key!r} must be a file name: letters, digits and . _ - + = @")
        self.dataset, self.encoder = dataset, _as_encoder(encoder)
        self.batch_size, self.image_key, self.distinct_images = batch_size, image_key, distinct_images
        self.encoder_calls = 0
        """Images passed through the encoder by this object (support and query images)."""

        ids = getattr(dataset, "image_ids", None)
        if ids is None:
            ids = [dataset[i][id_key] for i in range(len(dataset))]
        elif len(ids) != len(dataset):
            raise ValueError(f"dataset.image_ids has {len(ids)} ids for {len(dataset)} items")
        if not len(ids):
            raise ValueError("the support dataset is empty")
        row_of: dict[Any, int] = {}
        item_image = [row_of.setdefault(_plain_id(i), len(row_of)) for i in ids]
        self.image_ids: list[Any] = list(row_of)
        """Unique image ids in order of first appearance; row ``r`` of :attr:`features` is ``image_ids[r]``."""
        self._row_of = row_of
        self._set_items(torch.tensor(item_image))

        self.cache_path = (
            None if cache_dir is None else Path(cache_dir) / f"{cache_key}-{self.fingerprint[:16]}.safetensors"
        )
        self.loaded_from_cache = False
        features = self._load_cache()
        if features is None:
            features = self._encode_support()
            self._save_cache(features)
        self._set_support(features, use_faiss)

    @classmethod
    def from_features(cls, support: Tensor, use_faiss: bool | None = None) -> RICES:
        """Search over ``support`` features ``(M, D)``: one item per row, no dataset or encoder."""
        self = cls.__new__(cls)
        self.dataset = self.encoder = self.cache_path = None
        self.loaded_from_cache, self.distinct_images, self.encoder_calls = False, True, 0
        if support.ndim != 2 or support.shape[0] < 1:
            raise ValueError(f"support features must be (M, D) with M >= 1, got shape {tuple(support.shape)}")
        self.image_ids = list(range(support.shape[0]))
        self._row_of = {i: i for i in self.image_ids}
        self._set_items(torch.arange(support.shape[0]))
        self._set_support(support, use_faiss)
        return self

    # ------------------------------------------------------------------ support set
    @property
    def fingerprint(self) -> str:
        return fingerprint(self.image_ids)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def _set_items(self, item_image: Tensor) -> None:
        self.item_image = item_image
        """``(num_items,)``: the feature row (unique image) of every dataset item."""
        order = torch.argsort(item_image, stable=True)
        counts = torch.bincount(item_image, minlength=len(self.image_ids))
        self._items_sorted = order
        self._item_offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.first_item = order[self._item_offsets[:-1]]
        """``(num_images,)``: the lowest item index showing each unique image."""

    def _set_support(self, support: Tensor, use_faiss: bool | None) -> None:
        if support.ndim != 2 or support.shape[0] != len(self.image_ids):
            raise ValueError(f"expected features ({len(self.image_ids)}, D), got shape {tuple(support.shape)}")
        if not torch.isfinite(support).all():
            raise ValueError("support features contain NaN or inf")
        self.features = F.normalize(support.detach().to("cpu", torch.float32), dim=1).contiguous()
        """``(num_images, D)`` L2-normalised float32 features, one row per unique image."""
        m, d = self.features.shape
        # A float32 dot of unit vectors is within d * 2^-24 of the exact value; twice that is safe.
        self._eps = d * 2.0**-23
        if use_faiss is None:
            use_faiss = m >= FAISS_MIN_SUPPORT and _faiss_available()
        self.backend = "faiss" if use_faiss else "torch"
        self._index = None
        if use_faiss:
            import faiss  # optional at import time; a declared dependency

            self._index = faiss.IndexFlatIP(d)
            self._index.add(self.features.numpy())

    def _encode(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}")
        module = self.encoder if isinstance(self.encoder, nn.Module) else None
        param = next(module.parameters(), None) if module is not None else None
        if param is not None:
            images = images.to(param.device)
        with _eval_mode(module) if module is not None else torch.no_grad():
            out = self.encoder(images)
        if out.ndim != 2 or out.shape[0] != images.shape[0]:
            raise ValueError(
                f"encoder must return features (B, D) for {images.shape[0]} images, got shape {tuple(out.shape)}"
                " (pool backbone tokens with features_from_vision_backbone)"
            )
        self.encoder_calls += images.shape[0]
        return out.detach().to("cpu", torch.float32)

    def _encode_support(self) -> Tensor:
        chunks = []
        with progress_bar(total=self.num_images, desc="RICES support features", unit="image") as bar:
            for start in range(0, self.num_images, self.batch_size):
                items = self.first_item[start : start + self.batch_size].tolist()
                chunks.append(self._encode(torch.stack([self.dataset[i][self.image_key] for i in items])))
                bar.update(len(items))
        return torch.cat(chunks)

    def _load_cache(self) -> Tensor | None:
        if self.cache_path is None or not self.cache_path.is_file():
            return None
        with safe_open(str(self.cache_path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint:
                return None
            features = f.get_tensor("features")
        self.loaded_from_cache = True
        return features

    def _save_cache(self, features: Tensor) -> None:
        if self.cache_path is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: another rank reading the same key never sees half a file.
        tmp = self.cache_path.with_suffix(f".{os.getpid()}.tmp")
        meta = {"fingerprint": self.fingerprint, "num_images": str(self.num_images)}
        save_file({"features": features.contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, self.cache_path)

    # ------------------------------------------------------------------ retrieval
    def find(self, queries: Tensor, k: int, exclude: Tensor | None = None) -> Tensor:
        """Rows of :attr:`features` most cosine-similar to each query, least similar first.

        Args:
            queries: ``(N, D)`` features (normalised here).
            k: hits per query, ``1 <= k <= M`` (``M - 1`` when a row is excluded).
            exclude: ``(N,)`` a row to leave out per query (its own image, for leave-one-out); ``-1``: none.

        Returns:
            ``(N, k)`` long indices; ranked by similarity, ties by the lower index, then reversed, so the most
            similar (and, among equals, the lowest) index is last.
        """
        m, d = self.features.shape
        if queries.ndim != 2 or queries.shape[1] != d:
            raise ValueError(f"queries must be (N, {d}) to match the support features, got {tuple(queries.shape)}")
        if not torch.isfinite(queries).all():
            raise ValueError("query features contain NaN or inf")
        n = queries.shape[0]
        if exclude is not None:
            exclude = torch.as_tensor(exclude, dtype=torch.long).reshape(-1)
            if exclude.shape[0] != n:
                raise ValueError(f"exclude has {exclude.shape[0]} entries for {n} queries")
            bad = exclude[(exclude < -1) | (exclude >= m)]
            if len(bad):
                raise ValueError(f"exclude indices must be in [-1, {m}), got {bad[:5].tolist()}")
            if not (exclude >= 0).any():
                exclude = None
        available = m - (exclude is not None)
        k = operator.index(k)
        if not 1 <= k <= available:
            what = f"{m} support items" + (" less one excluded" if exclude is not None else "")
            raise ValueError(f"k = {k} must be between 1 and the number of candidates, {available} ({what})")
        if n == 0:
            return torch.empty(0, k, dtype=torch.long)
        q = F.normalize(queries.detach().to("cpu", torch.float32), dim=1).contiguous()
        # Candidates past k let a near-tie at the k-th place be settled without a full row.
        width = min(m, k + max(k, 8) + (exclude is not None))
        out = (
            self._search_faiss(q, k, width, exclude)
            if self._index is not None
            else self._search_torch(q, k, width, exclude)
        )
        return out.flip(1)

    def _search_torch(self, q: Tensor, k: int, width: int, exclude: Tensor | None) -> Tensor:
        m = self.features.shape[0]
        step = max(1, min(1024, CHUNK_BYTES // (4 * m)))
        out = []
        for start in range(0, q.shape[0], step):
            qc = q[start : start + step]
            sims = qc @ self.features.T
            ex = None if exclude is None else exclude[start : start + step]
            if ex is not None:
                rows = (ex >= 0).nonzero().flatten()
                sims[rows, ex[rows]] = float("-inf")
            s32, idx = sims.topk(width, dim=1)
            out.append(self._refine(qc, s32, idx, k, ex, full=sims))
        return torch.cat(out)

    def _search_faiss(self, q: Tensor, k: int, width: int, exclude: Tensor | None) -> Tensor:
        s32, idx = self._index.search(q.numpy(), width)
        return self._refine(q, torch.from_numpy(s32), torch.from_numpy(idx), k, exclude, full=None)

    def _refine(self, q: Tensor, s32: Tensor, idx: Tensor, k: int, ex: Tensor | None, full: Tensor | None) -> Tensor:
        """The exact top-k ``(n, k)``, most similar first, from float32 candidates ``(n, width)`` sorted by score.

        Both float32 kernels are within ``eps / 2`` of the exact inner product. Where no two of the first
        k + 1 candidates are within ``eps``, the float32 order is the exact one. Other rows re-rank in float64
        every item that may still belong in the top k: those within ``eps`` of the k-th float32 score, read
        from the full row when such items may lie past the candidates.
        """
        m, eps = self.features.shape[0], self._eps
        if ex is not None:  # faiss may return the excluded row: push it to the end
            s32 = s32.masked_fill(idx == ex[:, None], float("-inf"))
            s32, order = s32.sort(dim=1, descending=True, stable=True)
            idx = idx.gather(1, order)
        top = idx[:, :k].clone()
        rows = (s32[:, : k + 1].diff(dim=1) >= -eps).any(dim=1).nonzero().flatten()
        if not len(rows):
            return top
        s, ids = s32[rows], idx[rows]
        threshold = s[:, k - 1 : k] - eps
        inside = s >= threshold  # a prefix of each row, as scores are sorted
        c = int(inside.sum(dim=1).max())
        exact = self._exact(q[rows], ids[:, :c]).masked_fill(~inside[:, :c], float("-inf"))
        top[rows] = _rank(exact, ids[:, :c])[1][:, :k]
        if idx.shape[1] < m:  # items within eps of the k-th may lie past the candidates: use the full row
            for n in (s[:, -1:] >= threshold)[:, 0].nonzero().flatten().tolist():
                r = int(rows[n])
                row = full[r] if full is not None else self.features @ q[r]
                if ex is not None and ex[r] >= 0:
                    row = row.clone()
                    row[ex[r]] = float("-inf")
                near = (row >= threshold[n]).nonzero().flatten()[None]
                top[r] = _rank(self._exact(q[r : r + 1], near), near)[1][0, :k]
        return top

    def _exact(self, q: Tensor, ids: Tensor) -> Tensor:
        """float64 inner products ``(n, c)`` of queries ``(n, D)`` with support rows ``ids`` ``(n, c)``."""
        return (self.features[ids].double() * q.double()[:, None, :]).sum(-1)

    def find_for_images(self, queries: Tensor, k: int, exclude_image_ids: Sequence[Any] | None = None) -> Tensor:
        """Dataset items to show as demonstrations for each query image, least similar first.

        Args:
            queries: images ``(B, 3, H, W)`` (encoded here, counted in :attr:`encoder_calls`) or their
                features ``(B, D)`` from the same encoder.
            k: demonstrations per query.
            exclude_image_ids: per query, an image id to leave out (the query's own image when queries come
                from the support set); ``None`` or an id the support set lacks excludes nothing.

        Returns:
            ``(B, k)`` long indices into the dataset (from :meth:`from_features`: rows of the support).
        """
        if queries.ndim == 4:
            if self.encoder is None:
                raise ValueError("this RICES was built from features and has no encoder; pass query features")
            queries = torch.cat([self._encode(c) for c in queries.split(self.batch_size)])
        elif queries.ndim != 2:
            raise ValueError(f"queries must be images (B, 3, H, W) or features (B, D), got {tuple(queries.shape)}")
        exclude = None
        if exclude_image_ids is not None:
            if len(exclude_image_ids) != queries.shape[0]:
                raise ValueError(f"exclude_image_ids has {len(exclude_image_ids)} ids for {queries.shape[0]} queries")
            exclude = torch.tensor(
                [-1 if i is None else self._row_of.get(_plain_id(i), -1) for i in exclude_image_ids], dtype=torch.long
            )
        if self.distinct_images:
            return self.first_item[self.find(queries, k, exclude)]
        # Every image has an item, so the k best images hold at least the k best items.
        rows = self.find(
            queries, min(k, self.num_images - (exclude is not None and bool((exclude >= 0).any()))), exclude
        )
        out = torch.empty(queries.shape[0], k, dtype=torch.long)
        for n, best_first in enumerate(rows.flip(1).tolist()):
            items = [i for r in best_first for i in self._items_of(r)]
            if len(items) < k:
                raise ValueError(f"k = {k} exceeds the {len(items)} support items left for query {n}")
            out[n] = torch.tensor(items[:k][::-1])
        return out

    def _items_of(self, row: int) -> list[int]:
        return self._items_sorted[self._item_offsets[row] : self._item_offsets[row + 1]].tolist()


def _rank(scores: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by score, descending, ties by the lower index."""
    by_index = idx.argsort(dim=1, stable=True)
    scores, idx = scores.gather(1, by_index), idx.gather(1, by_index)
    by_score = scores.argsort(dim=1, descending=True, stable=True)
    return scores.gather(1, by_score), idx.gather(1, by_score)


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True
