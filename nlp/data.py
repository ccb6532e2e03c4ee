"""Offline text corpora and tokenizers for the language models.

The default corpus is WordNet's glosses as shipped inside timm (``timm/data/_info/
imagenet_synset_to_definition.txt``: 21,844 definitions, 1.7 MB of English), optionally prefixed
with their lemmas (``imagenet_synset_to_lemma.txt``). Any UTF-8 text file can be used instead. Text
is tokenised byte-level (256 bytes + BOS/EOS/PAD), with open_clip's BPE (``SimpleTokenizer``, the
CLIP vocabulary of 49,408 tokens, shipped in the open_clip wheel) or with a Hugging Face checkpoint's
own tokenizer read from a local directory (``nlp.hf.HFTokenizer``), split contiguously into train and
validation parts and cut into fixed-length blocks of ``seq_len + 1`` tokens (inputs and shifted
targets).

A text file of any size streams: it is read in chunks of whole lines (``CHUNK_BYTES``), each chunk
tokenised and appended to a token file in the cache (``$MOE_SUITE_CACHE``, default
``~/.cache/moe-suite``; keyed by the file's path, size and modification time and the tokenizer),
which is then memory-mapped. Neither the text nor its tokens are ever held whole in memory: a batch
gathers its blocks from the map (``TokenBlocks.views``). Every tokenizer here treats lines
independently or keeps bytes exactly, so the chunked tokens equal those of the whole text.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "BPETokenizer", "ByteTokenizer", "TokenBlocks", "build_datasets", "build_tokenizer",
    "load_text", "stream_tokens", "token_file", "wordnet_glosses",
]

CHUNK_BYTES = 1 << 20  # text read and tokenised at a time (whole lines)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus BOS (256), EOS (257) and PAD (258)."""

    name = "byte"

    def __init__(self):
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 256, 257, 258
        self.vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        out = bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return out

    def encode_corpus(self, text: str) -> list[int]:
        # bytes keep the text exactly, newlines included
        return self.encode(text)


class BPETokenizer:
    """open_clip's CLIP BPE (``open_clip.tokenizer.SimpleTokenizer``; lower-cases and normalises
    whitespace). Lines become documents separated by the end-of-text token."""

    name = "bpe"

    def __init__(self):
        from open_clip.tokenizer import SimpleTokenizer  # imported lazily: only this option needs it

        self._tok = SimpleTokenizer()
        self.vocab_size = len(self._tok.encoder)
        self.bos_token_id, self.eos_token_id = self._tok.sot_token_id, self._tok.eot_token_id
        self.pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids) -> str:
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        parts, cur = [], []
        for i in ids:
            if i == self.eos_token_id:
                parts.append(self._tok.decode(cur).strip())
                cur = []
            elif i != self.bos_token_id:
                cur.append(i)
        parts.append(self._tok.decode(cur).strip())
        return "\n".join(parts)

    def encode_corpus(self, text: str) -> list[int]:
        ids: list[int] = []
        for line in text.splitlines():
            if line.strip():
                ids.extend(self.encode(line))
                ids.append(self.eos_token_id)
        return ids


def build_tokenizer(name: str):
    """``"byte"`` (default), ``"bpe"`` (open_clip's CLIP BPE) or the path of a local Hugging Face
    tokenizer directory (``nlp.hf.HFTokenizer``: ``AutoTokenizer``, local files only)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        return BPETokenizer()
    if isinstance(name, (str, Path)) and str(name):
        from nlp.hf import HFTokenizer  # imported lazily: transformers is only needed for this option

        return HFTokenizer(name)
    raise ValueError(f"tokenizer={name!r} is not allowed: use 'byte', 'bpe' or a Hugging Face tokenizer directory.")


def _timm_info_file(name: str) -> Path:
    path = Path(str(importlib.resources.files("timm.data") / "_info" / name))
    if not path.is_file():
        raise ValueError(f"the WordNet file {name} was not found in the installed timm ({path}); "
                         "install timm>=1.0 or give a text file with data.path=...")
    return path


def wordnet_glosses(with_lemmas: bool = True) -> str:
    """WordNet glosses from timm, one synset per line: ``"lemma, lemma: gloss"`` or just the gloss."""
    glosses = dict(line.split("\t", 1) for line in
                   _timm_info_file("imagenet_synset_to_definition.txt").read_text("utf-8").splitlines() if "\t" in line)
    if not with_lemmas:
        return "\n".join(glosses.values()) + "\n"
    lemmas = dict(line.split("\t", 1) for line in
                  _timm_info_file("imagenet_synset_to_lemma.txt").read_text("utf-8").splitlines() if "\t" in line)
    return "".join(f"{lemmas[k]}: {v}\n" if k in lemmas else f"{v}\n" for k, v in glosses.items())


def _text_file(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file() or not os.access(p, os.R_OK):
        raise ValueError(f"data.path={str(path)!r} is not a readable file (looked at {p.resolve()}).")
    return p


def load_text(path: str | None = None, with_lemmas: bool = True) -> str:
    """The corpus: the WordNet glosses when ``path`` is None, else the UTF-8 file at ``path``."""
    if path is None:
        return wordnet_glosses(with_lemmas)
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"data.path={str(path)!r} is not a readable file (looked at {p.resolve()}).")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"data.path={str(path)!r} is not UTF-8 text ({err}).") from err
    except OSError as err:
        raise ValueError(f"data.path={str(path)!r} could not be read ({err}).") from err
    if not text.strip():
        raise ValueError(f"data.path={str(path)!r} is empty.")
    return text


# ----------------------------------------------------------------------------------- streaming


def _decode(raw: bytes, path: Path, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"data.path={str(path)!r} is not UTF-8 text (byte {offset + err.start}: {err.reason}).") from None


def stream_tokens(path: str | os.PathLike, tok, chunk_bytes: int = CHUNK_BYTES) -> Iterator[list[int]]:
    """The tokens of the UTF-8 file at ``path``, one chunk of whole lines (about ``chunk_bytes``) at a
    time (a line longer than a chunk is read whole)."""
    path = Path(path)
    offset, rest = 0, b""
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            data = rest + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # no line end yet: keep reading
                rest = data
                continue
            piece, rest = data[:cut], data[cut:]
            yield tok.encode_corpus(_decode(piece, path, offset))
            offset += len(piece)
    if rest:
        yield tok.encode_corpus(_decode(rest, path, offset))


def cache_dir() -> Path:
    """Where tokenised files are kept: ``$MOE_SUITE_CACHE`` or ``~/.cache/moe-suite``."""
    return Path(os.environ.get("MOE_SUITE_CACHE") or Path.home() / ".cache" / "moe-suite").expanduser()


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def token_file(path: str | os.PathLike, tok, chunk_bytes: int = CHUNK_BYTES) -> Path:
    """The file of ``path``'s tokens (``stream_tokens``, written once into ``cache_dir()/tokens`` and
    reused while the text file and the tokenizer are unchanged; written to a temporary name and
    renamed, so an interrupted run never leaves a partial one)."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    ident = f"{path}|{st.st_size}|{st.st_mtime_ns}|{getattr(tok, 'name', type(tok).__name__)}|{tok.vocab_size}"
    dtype = _token_dtype(tok.vocab_size)
    out = cache_dir() / "tokens" / f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.{dtype.name}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for ids in stream_tokens(path, tok, chunk_bytes):
                np.asarray(ids, dtype=dtype).tofile(f)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def load_tokens(path: str | os.PathLike, tok, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """``path``'s tokens as a 1-D tensor over a memory map of ``token_file`` (copy-on-write: pages
    are read when a batch touches them)."""
    file = token_file(path, tok, chunk_bytes)
    if file.stat().st_size == 0:
        return torch.zeros(0, dtype=torch.long)
    dtype = np.dtype(file.suffix.lstrip("."))
    return torch.from_numpy(np.memmap(file, dtype=dtype, mode="c"))


# -------------------------------------------------------------------------------------- blocks


class _BlockColumn:
    """The inputs (``shift`` 0) or targets (``shift`` 1) of every block, gathered when indexed (the
    ``shape[0]`` and ``[indices]`` that ``core.engine.TensorLoader`` uses), as int64."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, num_blocks: int, shift: int):
        self.tokens, self.seq_len, self.shift = tokens, seq_len, shift
        self.shape = (num_blocks, seq_len)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        n = self.shape[0]
        rows = torch.arange(*idx.indices(n)) if isinstance(idx, slice) else torch.as_tensor(idx, dtype=torch.long)
        if rows.numel() and (int(rows.min()) < -n or int(rows.max()) >= n):
            raise IndexError(f"block index out of range for {n} blocks")
        rows = rows % max(n, 1)
        starts = rows.reshape(-1, 1) * self.seq_len + self.shift + torch.arange(self.seq_len)
        return self.tokens[starts].long().reshape(*rows.shape, self.seq_len)


class TokenBlocks(Dataset):
    """Consecutive non-overlapping blocks of ``seq_len + 1`` tokens; item i is
    ``(input_ids[seq_len], targets[seq_len])`` (targets shifted by one), int64 whatever the dtype
    ``tokens`` is stored in (a memory-mapped file's uint16)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, limit: int | None = None):
        self.tokens, self.seq_len = tokens, seq_len
        n = max(0, (tokens.numel() - 1) // seq_len)
        self.num_blocks = n if limit is None else min(n, int(limit))

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int):
        if not 0 <= i < self.num_blocks:
            raise IndexError(i)
        block = self.tokens[i * self.seq_len: (i + 1) * self.seq_len + 1].long()
        return block[:-1], block[1:]

    def views(self) -> tuple[_BlockColumn, _BlockColumn]:
        """``(inputs, targets)`` that gather their blocks when a batch indexes them, for
        ``TensorLoader``: nothing is copied up front, whatever the corpus's size."""
        n, S = self.num_blocks, self.seq_len
        return _BlockColumn(self.tokens, S, n, 0), _BlockColumn(self.tokens, S, n, 1)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All blocks stacked in memory: ``(inputs, targets)``, each (num_blocks, seq_len)."""
        if not self.num_blocks:
            empty = torch.zeros(0, self.seq_len, dtype=torch.long)
            return empty, empty.clone()
        return tuple(v[:] for v in self.views())


def build_datasets(path: str | None = None, tokenizer: str = "byte", seq_len: int = 128, val_fraction: float = 0.1,
                   with_lemmas: bool = True, limit_train: int | None = None, limit_eval: int | None = None):
    """Tokenise the corpus, split it contiguously (the last ``val_fraction`` is validation) and cut
    blocks. Returns ``(tokenizer, train_set, val_set)``; ``limit_*`` cap the number of blocks."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} is not allowed: it must lie in (0, 1).")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is not allowed: it must be an integer >= 1.")
    tok = build_tokenizer(tokenizer)
    if path is None:  # the WordNet glosses: 1.7 MB, in memory
        ids = torch.tensor(tok.encode_corpus(load_text(None, with_lemmas)), dtype=torch.long)
    else:
        ids = load_tokens(_text_file(path), tok)
        if ids.numel() == 0:
            raise ValueError(f"data.path={str(path)!r} is empty.")
    n_val = int(round(ids.numel() * val_fraction))
    train_ids, val_ids = ids[: ids.numel() - n_val], ids[ids.numel() - n_val:]
    train, val = TokenBlocks(train_ids, seq_len, limit_train), TokenBlocks(val_ids, seq_len, limit_eval)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"the corpus ({ids.numel()} tokens, val_fraction={val_fraction}) is too short for "
                         f"seq_len={seq_len}: each split needs at least seq_len + 1 tokens.")
    return tok, train, val
