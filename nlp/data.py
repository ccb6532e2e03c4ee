"""Offline text corpora and tokenizers for the language models.

The default corpus is WordNet's glosses as shipped inside timm (``timm/data/_info/
imagenet_synset_to_definition.txt``: 21,844 definitions, 1.7 MB of English), optionally prefixed
with their lemmas (``imagenet_synset_to_lemma.txt``). Any UTF-8 text file can be used instead. Text
is tokenised byte-level (256 bytes + BOS/EOS/PAD), with open_clip's BPE (``SimpleTokenizer``, the
CLIP vocabulary of 49,408 tokens, shipped in the open_clip wheel) or with a Hugging Face checkpoint's
own tokenizer read from a local directory (``nlp.hf.HFTokenizer``), split contiguously into train and
validation parts and cut into fixed-length blocks of ``seq_len + 1`` tokens (inputs and shifted
targets).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = [
    "BPETokenizer", "ByteTokenizer", "TokenBlocks", "build_datasets", "build_tokenizer",
    "load_text", "wordnet_glosses",
]


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


class TokenBlocks(Dataset):
    """Consecutive non-overlapping blocks of ``seq_len + 1`` tokens; item i is
    ``(input_ids[seq_len], targets[seq_len])`` (targets shifted by one)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, limit: int | None = None):
        self.tokens, self.seq_len = tokens, seq_len
        n = max(0, (tokens.numel() - 1) // seq_len)
        self.num_blocks = n if limit is None else min(n, int(limit))

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int):
        if not 0 <= i < self.num_blocks:
            raise IndexError(i)
        block = self.tokens[i * self.seq_len: (i + 1) * self.seq_len + 1]
        return block[:-1], block[1:]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All blocks stacked: ``(inputs, targets)``, each (num_blocks, seq_len)."""
        n, S = self.num_blocks, self.seq_len
        starts = torch.arange(n)[:, None] * S + torch.arange(S + 1)[None, :]
        blocks = self.tokens[starts] if n else self.tokens.new_zeros(0, S + 1)
        return blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()


def build_datasets(path: str | None = None, tokenizer: str = "byte", seq_len: int = 128, val_fraction: float = 0.1,
                   with_lemmas: bool = True, limit_train: int | None = None, limit_eval: int | None = None):
    """Tokenise the corpus, split it contiguously (the last ``val_fraction`` is validation) and cut
    blocks. Returns ``(tokenizer, train_set, val_set)``; ``limit_*`` cap the number of blocks."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} is not allowed: it must lie in (0, 1).")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is not allowed: it must be an integer >= 1.")
    tok = build_tokenizer(tokenizer)
    ids = torch.tensor(tok.encode_corpus(load_text(path, with_lemmas)), dtype=torch.long)
    n_val = int(round(ids.numel() * val_fraction))
    train_ids, val_ids = ids[: ids.numel() - n_val], ids[ids.numel() - n_val:]
    train, val = TokenBlocks(train_ids, seq_len, limit_train), TokenBlocks(val_ids, seq_len, limit_eval)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"the corpus ({ids.numel()} tokens, val_fraction={val_fraction}) is too short for "
                         f"seq_len={seq_len}: each split needs at least seq_len + 1 tokens.")
    return tok, train, val
