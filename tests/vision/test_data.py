"""vision.data: Fashion-MNIST discovery, digits, batched augmentation, limits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from vision.data import (
    SYSTEM_FASHION_MNIST, ImageBatch, build_loaders, limit, load_dataset, load_digits, load_fashion_mnist,
    prepare_fashion_mnist,
)


def _write_idx_gz(path: Path, array: torch.Tensor, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


def _fake_system_dir(tmp_path: Path, n_train=20, n_test=10) -> Path:
    sysdir = tmp_path / "system"
    sysdir.mkdir()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx_gz(sysdir / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g), 2051)
        _write_idx_gz(sysdir / f"{split}-labels-idx1-ubyte.gz", torch.arange(n) % 10, 2049)
    return sysdir


def test_fashion_mnist_is_decompressed_from_the_system_copy(tmp_path):
    sysdir = _fake_system_dir(tmp_path)
    root = tmp_path / "data"
    assert prepare_fashion_mnist(root, sysdir)
    assert (root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    data = load_fashion_mnist(root, download=False, system_dir=sysdir)
    assert data.train_x.shape == (20, 1, 28, 28) and data.train_x.dtype == torch.uint8
    assert data.test_y.tolist() == list(range(10)) and data.num_classes == 10
    assert (data.in_chans, data.img_size) == (1, 28)


def test_missing_fashion_mnist_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist(tmp_path / "nowhere", download=False, system_dir=tmp_path / "no_system")
    msg = str(err.value)
    assert str((tmp_path / "nowhere" / "FashionMNIST" / "raw").resolve()) in msg
    assert str(tmp_path / "no_system") in msg and "apt-get install dataset-fashion-mnist" in msg and "make data" in msg


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match=r"data.name='mnist3d'.*fashion_mnist"):
        load_dataset("mnist3d")


def test_digits_split_and_range():
    data = load_digits()
    assert data.train_x.shape[1:] == (1, 8, 8) and data.train_x.dtype == torch.uint8
    assert len(data.train_y) + len(data.test_y) == 1797 and len(data.test_y) == 359
    assert int(data.train_x.max()) == 255 and set(data.train_y.tolist()) == set(range(10))


def test_batched_augmentation_is_seeded_and_shape_preserving():
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(6)
    aug = ImageBatch((0.5,), (0.25,), augment="crop_flip", crop_padding=2)
    a, ya = aug((x, y), torch.Generator().manual_seed(1))
    b, _ = aug((x, y), torch.Generator().manual_seed(1))
    c, _ = aug((x, y), torch.Generator().manual_seed(2))
    assert a.shape == (6, 1, 8, 8) and a.dtype == torch.float32 and torch.equal(ya, y)
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain, _ = ImageBatch((0.5,), (0.25,))((x, y), torch.Generator())
    torch.testing.assert_close(plain, (x.float() / 255 - 0.5) / 0.25)
    # a crop from a zero-padded image is a shifted copy: every output pixel is an input pixel or padding
    crop, _ = ImageBatch((0.0,), (1.0,), augment="crop", crop_padding=2)((x, y), torch.Generator().manual_seed(0))
    values = set((x.float() / 255).flatten().tolist()) | {0.0}
    assert set(crop.flatten().tolist()) <= values


def test_bad_augmentation_is_refused():
    with pytest.raises(ValueError, match=r"data.augment='rotate'"):
        ImageBatch((0.5,), (0.5,), augment="rotate")


def test_limits_and_loaders():
    data = load_digits()
    x, y = limit(data.train_x, data.train_y, 100)
    assert len(y) == 100 and torch.equal(limit(data.train_x, data.train_y, 100)[1], y)
    train, test = build_loaders(data, batch_size=32, eval_batch_size=64, limit_train=100, limit_eval=50)
    assert len(train) == 3 and train.num_examples == 100 and test.num_examples == 50
    xb, yb = next(iter(test))
    assert xb.shape == (50, 1, 8, 8) and xb.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.skipif(not Path(SYSTEM_FASHION_MNIST).is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist(tmp_path):
    data = load_fashion_mnist(tmp_path, download=False)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
