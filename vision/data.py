"""Image datasets kept in memory as uint8 tensors and batched with tensor ops.

Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) is the default: torchvision's ``FashionMNIST`` over a data
directory, filled from Debian's ``dataset-fashion-mnist`` files (``/usr/share/datasets/fashion-mnist``)
when present, else downloaded when ``download`` is on. CIFAR-10/100 and ImageFolder trees go through
torchvision when the user has them; scikit-learn's 8×8 digits (inside its wheel) serve the tests.

Augmentation (random crop with zero padding, horizontal flip) runs on whole uint8 batches: per-image
PIL transforms cost more than the model on a 2-core CPU.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.checks import ConfigError

from core.engine import TensorLoader

log = logging.getLogger(__name__)

DATASETS = ("fashion_mnist", "digits", "cifar10", "cifar100", "imagefolder")
AUGMENTATIONS = ("none", "flip", "crop", "crop_flip")
SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclass
class ImageData:
    """Train and test images (uint8, N×C×H×W) with int64 labels, plus what a model needs to know."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def in_chans(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def img_size(self) -> int:
        return int(self.train_x.shape[-1])


# ----------------------------------------------------------------------------------------- datasets


def prepare_fashion_mnist(root: str | Path, system_dir: str | Path = SYSTEM_FASHION_MNIST) -> bool:
    """Make ``<root>/FashionMNIST/raw/`` hold the un-gzipped IDX files torchvision reads, by
    decompressing the system copy (Debian ``dataset-fashion-mnist``). Returns whether they are there."""
    raw = Path(root) / "FashionMNIST" / "raw"
    if all((raw / f).is_file() for f in _FASHION_FILES):
        return True
    system_dir = Path(system_dir)
    if not all((system_dir / f"{f}.gz").is_file() for f in _FASHION_FILES):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for f in _FASHION_FILES:
        tmp = raw / f"{f}.tmp{os.getpid()}"
        with gzip.open(system_dir / f"{f}.gz", "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, raw / f)  # atomic: a concurrent run never sees half a file
    log.info("decompressed Fashion-MNIST from %s into %s", system_dir, raw)
    return True


def load_fashion_mnist(root: str | Path, download: bool = True, system_dir: str | Path = SYSTEM_FASHION_MNIST) -> ImageData:
    from torchvision.datasets import FashionMNIST

    if not prepare_fashion_mnist(root, system_dir) and download:
        try:
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        except Exception as err:  # offline: fall through to the message below, keeping the cause
            log.warning("downloading Fashion-MNIST failed: %s", err)
    raw = Path(root) / "FashionMNIST" / "raw"
    if not all((raw / f).is_file() for f in _FASHION_FILES):
        raise FileNotFoundError(
            f"Fashion-MNIST not found: looked for {', '.join(_FASHION_FILES)} in {raw.resolve()} and for their .gz "
            f"files in {system_dir}" + (", and the download failed" if download else " (download is off)") +
            ". Get them with `sudo apt-get install dataset-fashion-mnist` (or `make data`), or copy the four "
            f"IDX files into {raw}, or point data.root at a directory that has FashionMNIST/raw/.")
    train = FashionMNIST(str(root), train=True, download=False)
    test = FashionMNIST(str(root), train=False, download=False)
    return ImageData(train.data[:, None].contiguous(), train.targets.long(), test.data[:, None].contiguous(),
                     test.targets.long(), 10, (0.2860,), (0.3530,), FASHION_CLASSES)


def load_digits() -> ImageData:
    """scikit-learn's 1,797 8×8 digits (values 0..16 scaled to 0..255); a fixed 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images * (255.0 / 16.0)).round().to(torch.uint8)[:, None]
    y = torch.from_numpy(d.target).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    xf = x.float() / 255
    return ImageData(x[train], y[train], x[test], y[test], 10, (float(xf.mean()),), (float(xf.std()),),
                     tuple(str(i) for i in range(10)))


def load_cifar(root: str | Path, num_classes: int, download: bool = False) -> ImageData:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if num_classes == 10 else CIFAR100
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"{cls.__name__} not found in {Path(root).resolve()} ({err}). Put the extracted python version "
            f"there ({cls.base_folder}/) or set data.download=true when online.") from err

    def to_tensor(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets).long()

    (trx, tr_y), (tex, tey) = to_tensor(train), to_tensor(test)
    if num_classes == 10:
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    else:
        mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    return ImageData(trx, tr_y, tex, tey, num_classes, mean, std, tuple(train.classes))


def load_imagefolder(root: str | Path, img_size: int, train_dir: str = "train", test_dir: str = "val") -> ImageData:
    """An ImageFolder tree (``<root>/<train_dir>/<class>/*.jpg``, same for ``test_dir``) resized
    (shorter side) and centre-cropped to ``img_size``, held in memory as uint8."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = Path(root)
    for sub in (train_dir, test_dir):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"ImageFolder split not found: {(root / sub).resolve()} (expected "
                                    f"{root}/{sub}/<class>/<images>; set data.root, data.train_dir, data.test_dir).")
    tf = transforms.Compose([transforms.Resize(img_size), transforms.CenterCrop(img_size), transforms.PILToTensor()])

    def load(sub):
        from PIL import UnidentifiedImageError

        ds = ImageFolder(str(root / sub), transform=tf)
        items = []
        for i, (path, _) in enumerate(ds.samples):
            try:
                items.append(ds[i])
            except (UnidentifiedImageError, OSError) as err:
                raise ConfigError("data.root", str(root), f"{path} is not an image that PIL can read "
                                  f"({type(err).__name__}); remove or convert it") from None
        xs, ys = zip(*items)
        return torch.stack(xs), torch.tensor(ys).long(), ds.classes

    trx, tr_y, classes = load(train_dir)
    tex, tey, test_classes = load(test_dir)
    if test_classes != classes:
        raise ValueError(f"{test_dir} classes {test_classes[:5]}... differ from {train_dir} classes {classes[:5]}...")
    xf = trx.float() / 255
    mean = tuple(xf.mean((0, 2, 3)).tolist())
    std = tuple(xf.std((0, 2, 3)).tolist())
    return ImageData(trx, tr_y, tex, tey, len(classes), mean, std, tuple(classes))


def load_dataset(name: str, root: str | Path = "data", download: bool = True, img_size: int | None = None,
                 system_dir: str | Path = SYSTEM_FASHION_MNIST, train_dir: str = "train", test_dir: str = "val") -> ImageData:
    """One of ``DATASETS`` as in-memory uint8 tensors."""
    if name == "fashion_mnist":
        return load_fashion_mnist(root, download, system_dir)
    if name == "digits":
        return load_digits()
    if name in ("cifar10", "cifar100"):
        return load_cifar(root, 10 if name == "cifar10" else 100, download)
    if name == "imagefolder":
        if not img_size:
            raise ValueError("data.img_size is required for data.name=imagefolder (e.g. 64).")
        return load_imagefolder(root, img_size, train_dir, test_dir)
    raise ValueError(f"data.name={name!r} is not allowed: use one of {list(DATASETS)}.")


def limit(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of ``n`` examples (the same for every seed, so runs stay comparable)."""
    if n is None or n >= len(y):
        return x, y
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return x[keep], y[keep]


# ------------------------------------------------------------------------------------- augmentation


class ImageBatch:
    """Batch transform: optional random crop (zero padding) and horizontal flip on the uint8 batch,
    then float normalisation. Called by ``TensorLoader`` with a per-batch seeded generator."""

    def __init__(self, mean, std, augment: str = "none", crop_padding: int = 2):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"data.augment={augment!r} is not allowed: use one of {list(AUGMENTATIONS)}.")
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"data.crop_padding={crop_padding!r} is not allowed: an integer >= 0.")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment, self.pad = augment, crop_padding

    def __call__(self, batch, generator: torch.Generator):
        x, y = batch
        B, C, H, W = x.shape
        if "crop" in self.augment and self.pad:
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (B,), generator=generator)
            dx = torch.randint(0, 2 * p + 1, (B,), generator=generator)
            rows = (dy[:, None] + torch.arange(H))[:, None, :, None]          # B×1×H×1
            cols = (dx[:, None] + torch.arange(W))[:, None, None, :]          # B×1×1×W
            x = padded[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]
        if "flip" in self.augment:
            flip = torch.rand(B, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return (x.float().div_(255) - self.mean) / self.std, y


def build_loaders(data: ImageData, batch_size: int, eval_batch_size: int | None = None, augment: str = "none",
                  crop_padding: int = 2, limit_train: int | None = None, limit_eval: int | None = None
                  ) -> tuple[TensorLoader, TensorLoader]:
    """Shuffled training batches (last incomplete batch dropped) and ordered test batches."""
    trx, tr_y = limit(data.train_x, data.train_y, limit_train)
    tex, tey = limit(data.test_x, data.test_y, limit_eval)
    train = TensorLoader((trx, tr_y), batch_size, shuffle=True, drop_last=len(tr_y) >= batch_size,
                         transform=ImageBatch(data.mean, data.std, augment, crop_padding))
    test = TensorLoader((tex, tey), eval_batch_size or batch_size, transform=ImageBatch(data.mean, data.std))
    return train, test
