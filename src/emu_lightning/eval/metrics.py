"""Evaluation metrics: CIDEr, the official VQA accuracy and Frechet distances (FID).

Each metric follows its reference implementation (pycocoevalcap, the VQA evaluation code, pytorch-fid /
torchmetrics); the tests compare against those on hand-made inputs. Nothing here reaches the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------------- CIDEr


@dataclass
class CiderResult:
    """A CIDEr-D evaluation.

    Args:
        score: corpus CIDEr-D x100 (the mean of ``per_image``).
        num_images: images scored; IDF comes from their references, so record it beside the score.
        per_image: CIDEr-D x100 of each image id.
        num_empty: predictions that were empty (they score 0 but count in the mean).
    """

    score: float
    num_images: int
    per_image: dict[Any, float] = field(default_factory=dict)
    num_empty: int = 0


def _one_line(text: str) -> str:
    # The PTB tokenizer runs with -preserveLines and its wrapper pairs output lines with inputs by position: a
    # line break inside a caption (\r, \u2028, ...) would silently shift every later caption onto another image.
    return " ".join(text.splitlines())


@contextlib.contextmanager
def _without_tokenizer_progress() -> Iterator[None]:
    """Drop the "PTBTokenizer tokenized N tokens at ..." line that the Java tokenizer prints to stderr on every
    call (it inherits our file descriptor 2); anything else it prints is passed through."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith("PTBTokenizer tokenized")]  # fmt: skip
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def cider_score(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> CiderResult:
    """CIDEr-D of predicted captions, as the COCO caption evaluation computes it (x100).

    pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP, run with ``java``) tokenises and lower-cases both sides
    and drops punctuation, then pycocoevalcap's ``Cider`` scores them. The document frequencies (IDF) come from the
    references being evaluated, so a score on a subset is not comparable with one on the full test set: report
    ``num_images`` with it.

    Args:
        predictions: one caption per image id; an empty string is allowed and scores 0.
        references: the reference captions of each image id; every id needs a prediction and vice versa.

    Returns:
        The corpus score, the number of images, per-image scores and the number of empty predictions.

    Raises:
        RuntimeError: ``java`` is not on PATH.
        ValueError: the ids of ``predictions`` and ``references`` differ, or an image has no references.
    """
    if shutil.which("java") is None:
        raise RuntimeError(
            "CIDEr scoring needs Java: pycocoevalcap's PTBTokenizer runs `java`, which is not on PATH. Install a "
            "JRE and put `java` on PATH (e.g. `apt install openjdk-17-jre-headless`, or `default-jre-headless`)"
        )
    unknown = [k for k in predictions if k not in references]
    if unknown:
        raise ValueError(f"prediction id {unknown[0]!r} has no references ({len(unknown)} such ids: {unknown[:5]})")
    missing = [k for k in references if k not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} image(s) with references have no prediction, e.g. {missing[:5]}")
    if not references:
        raise ValueError("no images to score")
    for k, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references of image {k!r} must be a non-empty list of strings, got {refs!r}")
    for k, p in predictions.items():
        if not isinstance(p, str):
            raise ValueError(f"prediction of image {k!r} must be a string, got {type(p).__name__}")

    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts_in = {k: [{"caption": _one_line(r)} for r in refs] for k, refs in references.items()}
    # Blank predictions skip the tokenizer (which would turn them into "" too): an all-blank input would leave it
    # with nothing to read.
    empty = {k for k, p in predictions.items() if not p.strip()}
    to_tokenize = {k: [{"caption": _one_line(p)}] for k, p in predictions.items() if k not in empty}
    with _without_tokenizer_progress():
        gts = tokenizer.tokenize(gts_in)
        res = tokenizer.tokenize(to_tokenize) if to_tokenize else {}
    res.update({k: [""] for k in empty})
    for k in references:
        if len(gts.get(k, ())) != len(references[k]) or len(res.get(k, ())) != 1:
            raise RuntimeError(f"PTBTokenizer returned the wrong number of lines for image {k!r}")
    ordered_res = {k: res[k] for k in gts}
    score, scores = Cider().compute_score(gts, ordered_res)
    return CiderResult(
        score=100.0 * float(score),
        num_images=len(gts),
        per_image={k: 100.0 * float(s) for k, s in zip(gts, scores)},
        num_empty=len(empty),
    )


def cider(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> float:
    """Corpus CIDEr-D x100; see :func:`cider_score` for the details, the checks and the per-image scores.

    Args:
        predictions: one caption per image id.
        references: the reference captions of each image id.

    Returns:
        The score; it depends on the evaluated set through IDF, so record the number of images with it.
    """
    return cider_score(predictions, references).score


# ------------------------------------------------------------------------------------------------------------ VQA

# The tables of the official VQA evaluation (vqaEval.py), kept entry for entry, including its quirks: the
# capitalised keys ("Im", "Ive") never match lower-cased text, and "somebody'd" maps to "somebodyd".
_CONTRACTIONS = {
    **{w: w[:-2] + "n't" for w in "aint arent cant couldnt didnt doesnt dont hadnt hasnt havent isnt".split()},
    **{w: w[:-2] + "n't" for w in "mightnt mustnt neednt oughtnt shant shouldnt wasnt werent wont wouldnt".split()},
    "couldve": "could've", "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustve": "must've", "notve": "not've", "oclock": "o'clock", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wouldve": "would've", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}
_NUMBERS.update({"six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"})
_ARTICLES = ("a", "an", "the")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# "(?!<=\d)" is the official pattern's (ineffective) attempt at a look-behind; kept so behaviour is identical.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # The condition looks at the original text for every mark, as the official code does.
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE (32) positionally as `count`: at most 32 periods are removed.
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """Normalise a predicted answer as the official VQA evaluation does.

    Newlines and tabs become spaces and the text is stripped; each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``
    is removed when the text has it next to a space or contains a digit,comma,digit pattern, and replaced by a
    space otherwise; a period not followed by a digit is removed; then the text is lower-cased and split on
    whitespace, number words zero..ten (and "none") become digits, articles a/an/the are dropped and contractions
    are fixed (``dont`` -> ``don't``).

    Args:
        text: the answer.

    Returns:
        The normalised answer (words joined by single spaces).
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction against the annotators' answers.

    The prediction is normalised with :func:`normalize_vqa_answer`. As in the official code, the reference answers
    only get the punctuation step, and only when they are not all identical (VQA annotations are already
    normalised, so "2" matches a predicted "two" but a reference "two" matches nothing). Then each answer is left
    out in turn and the prediction scores ``min(1, matches among the others / 3)``; the result is the mean over
    the answers. Answers count by position: duplicates are distinct annotators.

    Args:
        prediction: the model's answer (after any task post-processing such as :func:`postprocess_vqa_answer`).
        answers: the reference answers (10 in VQAv2, OK-VQA and VizWiz; any number >= 1 works the same way).

    Returns:
        The accuracy in ``[0, 1]``.

    Raises:
        ValueError: ``answers`` is empty or a single string.
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
    pred = normalize_vqa_answer(prediction)
    gts = [_process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    matches = [g == pred for g in gts]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(gts)


_LEADING = re.compile(r"^(?:it is|it's|a|an|the)(?:\s+|$)")


def postprocess_vqa_answer(text: str) -> str:
    """Emu's post-processing of a generated short answer.

    Keeps the first line, then the part before the first ``". "``, ``'"'`` and ``", "``; lower-cases; strips a
    trailing period; strips leading "it is", "it's", "a", "an", "the" (whole words, repeatedly: "it is a cat" ->
    "cat"); strips whitespace. Text that opens with a quote mark therefore becomes empty, as in Emu.

    Args:
        text: the generated continuation after the answer prompt.

    Returns:
        The short answer, to be scored with :func:`vqa_accuracy`.
    """
    lines = text.strip().split("\n")
    out = lines[0] if lines else ""
    for sep in (". ", '"', ", "):
        out = out.split(sep)[0]
    out = out.lower().strip()
    if out.endswith("."):
        out = out[:-1].rstrip()
    while (m := _LEADING.match(out)) is not None and m.end() > 0:
        out = out[m.end() :]
    return out.strip()


# ---------------------------------------------------------------------------------------------- Frechet distances


def _as_2d_float64(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError(f"{name} must be a (N, D) feature matrix with N >= 2, got shape {tuple(arr.shape)}")
    return arr


def feature_stats(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (normalised by N - 1) of a feature matrix, in float64.

    Args:
        features: ``(N, D)`` features, N >= 2.

    Returns:
        ``(mu, sigma)`` of shapes ``(D,)`` and ``(D, D)``.
    """
    arr = _as_2d_float64(features, "features")
    return arr.mean(axis=0), np.cov(arr, rowvar=False, ddof=1).reshape(arr.shape[1], arr.shape[1])


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance of two Gaussians, ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``, as pytorch-fid does it.

    The matrix square root is scipy's ``sqrtm``; when it is not finite (singular product) ``eps * I`` is added to
    both covariances; a complex result is accepted when its diagonal's imaginary part is below 1e-3 (its real part
    is used) and raises otherwise.

    Args:
        mu1: mean of the first set, ``(D,)``.
        sigma1: covariance of the first set, ``(D, D)``.
        mu2: mean of the second set.
        sigma2: covariance of the second set.
        eps: the diagonal offset used when the square root is not finite.

    Returns:
        The distance (float64).

    Raises:
        ValueError: shapes differ, or the square root has a significant imaginary part.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (float64).

    Args:
        a: ``(N, D)`` features, N >= 2.
        b: ``(M, D)`` features, M >= 2.

    Returns:
        The distance; 0 for a set against itself (up to rounding).
    """
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, meta: Mapping[str, Any] | None = None) -> Path:
    """Save feature statistics (and JSON-able metadata: extractor, image size, N, ...) to an ``.npz`` file.

    Args:
        path: the file to write; ``.npz`` is appended when missing.
        mu: mean, ``(D,)``.
        sigma: covariance, ``(D, D)``.
        meta: what the statistics were computed from; checked again by :func:`cached_feature_stats`.

    Returns:
        The path written.
    """
    path = Path(path)
    path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), meta=json.dumps(meta or {}))
    return path


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Load statistics written by :func:`save_stats`.

    Args:
        path: the ``.npz`` file.

    Returns:
        ``(mu, sigma, meta)``.
    """
    with np.load(Path(path), allow_pickle=False) as data:
        return data["mu"], data["sigma"], json.loads(str(data["meta"]))


def cached_feature_stats(
    cache_dir: str | Path,
    name: str,
    features: Callable[[], Tensor | np.ndarray],
    meta: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of a reference set, computed once and cached as ``cache_dir/name.npz``.

    Args:
        cache_dir: folder of the cache.
        name: key of the statistics, e.g. ``"coco-val2014-256px-shapes-colour-hist-v1"``.
        features: called only on a cache miss; returns the ``(N, D)`` features.
        meta: what the statistics depend on; a cached file with other metadata is an error, not silently reused.

    Returns:
        ``(mu, sigma)``.

    Raises:
        ValueError: ``name`` is not a plain file name, or the cache holds statistics with other metadata.
    """
    if not re.fullmatch(r"[A-Za-z0-9._\-]+", name):
        raise ValueError(f"stats name {name!r} must use only letters, digits, '.', '_' and '-'")
    path = Path(cache_dir) / f"{name}.npz"
    meta = dict(meta or {})
    if path.exists():
        mu, sigma, cached = load_stats(path)
        stored = {k: v for k, v in cached.items() if k != "num_samples"}
        if stored != json.loads(json.dumps(meta)):
            raise ValueError(f"{path} was computed with {stored}, not {meta}; delete it or use another name")
        return mu, sigma
    feats = features()
    mu, sigma = feature_stats(feats)
    save_stats(path, mu, sigma, {**meta, "num_samples": int(feats.shape[0])})
    return mu, sigma


# ------------------------------------------------------------------------------------------------------------ FID

OFFLINE_EXTRACTOR = "shapes-colour-hist-v1"


class ShapesColourHistogram(nn.Module):
    """Offline, parameter-free image features for FID on ShapesWorld-like images (``shapes-colour-hist-v1``).

    Images are resized to 32 px (bilinear, antialiased); features are the joint 4x4x4 colour histogram (64 bins,
    fractions of pixels) and the mean colour of each cell of a 4x4 grid (48 values): 112 float64 values. Scores
    made with it are not Inception FIDs and are labelled with this name.

    Args:
        size: side the images are resized to.
    """

    name = OFFLINE_EXTRACTOR

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.size = size
        self.num_features = 64 + 48

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(images.shape)}")
        x = images.double() / 255.0 if images.dtype == torch.uint8 else images.double()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        q = (x.clamp(0, 1) * 4).floor().clamp(max=3).long()
        bins = (q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]).flatten(1)
        hist = F.one_hot(bins, 64).double().mean(dim=1)
        return torch.cat([hist, F.adaptive_avg_pool2d(x, 4).flatten(1)], dim=1)


def make_fid(
    extractor: str | nn.Module = "default",
    inception_path: str | Path | None = None,
    antialias: bool = True,
    **kwargs: Any,
):
    """A torchmetrics ``FrechetInceptionDistance`` on float images in ``[0, 1]``, in float64, real stats kept.

    ``reset_real_features=False``, so ``reset()`` keeps the real statistics: compute them once, then score
    several generated sets. The extractor's name is stored as ``metric.extractor_name`` for :func:`fid_result`.

    Args:
        extractor: ``"default"`` (Inception when ``inception_path`` is given, else ``"shapes-colour-hist-v1"``),
            ``"shapes-colour-hist-v1"``, or any ``nn.Module`` mapping ``(B, 3, H, W)`` images to ``(B, D)``
            features (its ``num_features`` attribute, if any, gives D; its ``name`` attribute labels results).
        inception_path: a local Inception-v3 FID weights file (``pt_inception-2015-12-05-6726825d.pth``, as
            used by torch-fidelity / pytorch-fid); loading goes through torch-fidelity's extractor.
        antialias: Inception only: resize to 299 px with antialias (torchmetrics >= 1.8 default) or like the
            original TF code (``False``); the two give different numbers, so the choice is part of the label.
        **kwargs: passed to ``FrechetInceptionDistance`` (e.g. ``sync_on_compute``).

    Returns:
        The metric; ``update(images, real=...)``, then :func:`fid_result`.

    Raises:
        FileNotFoundError: ``inception_path`` does not exist.
        ModuleNotFoundError: ``inception_path`` is given but torch-fidelity is not installed.
        ValueError: unknown extractor name, or a module together with ``inception_path``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    common = dict(reset_real_features=False, normalize=True, **kwargs)
    if inception_path is not None:
        if extractor != "default":
            raise ValueError(f"inception_path is given, so extractor must be 'default', got {extractor!r}")
        path = Path(inception_path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception FID weights {path} not found (expected pt_inception-2015-12-05 .pth)")
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ModuleNotFoundError(
                f"loading the Inception FID weights {path} needs torch-fidelity's FeatureExtractorInceptionV3, which "
                "is not installed (`pip install torch-fidelity`); the weights themselves are read from the local file"
            )
        metric = FrechetInceptionDistance(
            feature=2048, feature_extractor_weights_path=str(path), antialias=antialias, **common
        )
        name = f"inception-v3-2015-12-05/{'antialias' if antialias else 'tf1-resize'}"
    else:
        if isinstance(extractor, str):
            if extractor not in ("default", OFFLINE_EXTRACTOR):
                raise ValueError(
                    f"unknown extractor {extractor!r} (expected 'default', {OFFLINE_EXTRACTOR!r} or a module)"
                )
            extractor = ShapesColourHistogram()
        metric = FrechetInceptionDistance(feature=extractor, **common)
        name = getattr(extractor, "name", type(extractor).__name__)
    metric.set_dtype(torch.float64)
    metric.extractor_name = name
    return metric


def fid_result(metric) -> dict[str, Any]:
    """Compute a metric from :func:`make_fid` and label the value with its extractor.

    Args:
        metric: the updated metric.

    Returns:
        ``{"metric": "FID[<extractor>]", "value", "num_real", "num_fake"}``.
    """
    return {
        "metric": f"FID[{getattr(metric, 'extractor_name', 'unknown')}]",
        "value": float(metric.compute()),
        "num_real": int(metric.real_features_num_samples),
        "num_fake": int(metric.fake_features_num_samples),
    }


def coco30k_prompts(
    captions_by_image: Mapping[Any, Sequence[str]], n: int = 30000, seed: int = 0
) -> list[tuple[Any, str]]:
    """Draw the text-to-image FID prompts: ``n`` images at random without replacement, one caption each.

    Image ids are sorted first, so the draw depends only on the data and the seed, not on the dict's order.

    Args:
        captions_by_image: captions of each image (COCO val2014 for MS-COCO 30k).
        n: images to draw.
        seed: seed of both the image and the caption choice.

    Returns:
        ``[(image_id, caption)]`` in drawn order.

    Raises:
        ValueError: ``n`` exceeds the number of images, or a drawn image has no captions.
    """
    ids = sorted(captions_by_image)
    if not 0 < n <= len(ids):
        raise ValueError(f"cannot draw n={n} images from {len(ids)} available")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(ids), size=n, replace=False)
    out = []
    for i in chosen.tolist():
        caps = captions_by_image[ids[i]]
        if isinstance(caps, str) or len(caps) == 0:
            raise ValueError(f"image {ids[i]!r} has no list of captions (got {caps!r})")
        out.append((ids[i], caps[int(rng.integers(len(caps)))]))
    return out
