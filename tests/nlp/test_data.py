"""Corpora and tokenizers: WordNet glosses from timm, text files, byte and BPE tokenizers, blocks."""

from __future__ import annotations

import pytest
import torch

from nlp.data import BPETokenizer, ByteTokenizer, TokenBlocks, build_datasets, build_tokenizer, load_text


def test_wordnet_glosses_ship_with_timm():
    text = load_text(None)
    lines = text.splitlines()
    assert len(lines) > 20000 and len(text) > 1_500_000
    assert any(line.startswith("dog, domestic dog") for line in lines)
    bare = load_text(None, with_lemmas=False)
    assert "dog, domestic dog" not in bare and len(bare.splitlines()) == len(lines)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café — ok\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 259 and max(ids) < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids + [tok.eos_token_id]) == text


def test_bpe_tokenizer_from_open_clip():
    tok = build_tokenizer("bpe")
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 49408
    ids = tok.encode_corpus("A dog barks.\n\nThe cat sleeps.\n")
    assert ids.count(tok.eos_token_id) == 2
    assert tok.decode(ids).split("\n")[:2] == ["a dog barks .", "the cat sleeps ."]
    with pytest.raises(ValueError, match="tokenizer"):
        build_tokenizer("sentencepiece")


def test_text_file_split_is_contiguous_and_blocks_are_shifted(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i} of the book\n" for i in range(200)), encoding="utf-8")
    tok, train, val = build_datasets(str(path), seq_len=16, val_fraction=0.25)
    all_ids = torch.tensor(tok.encode(path.read_text()))
    n_val = round(all_ids.numel() * 0.25)
    assert torch.equal(train.tokens.long(), all_ids[:-n_val]) and torch.equal(val.tokens.long(), all_ids[-n_val:])
    x, y = train[3]
    assert x.shape == (16,) and torch.equal(x[1:], y[:-1])
    assert torch.equal(torch.cat([x, y[-1:]]), all_ids[48:65])
    xs, ys = train.tensors()
    assert xs.shape == (len(train), 16) and torch.equal(xs[3], x) and torch.equal(ys[3], y)


def test_limits_cap_blocks(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefgh" * 500, encoding="utf-8")
    _, train, val = build_datasets(str(path), seq_len=8, limit_train=5, limit_eval=2)
    assert len(train) == 5 and len(val) == 2
    assert len(TokenBlocks(torch.arange(100), 9)) == 11


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="data.path='.*missing.txt' is not a readable file"):
        load_text(str(tmp_path / "missing.txt"))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text(str(binary))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_text(str(empty))
    short = tmp_path / "short.txt"
    short.write_text("tiny text", encoding="utf-8")
    with pytest.raises(ValueError, match="too short for seq_len=64"):
        build_datasets(str(short), seq_len=64)
    with pytest.raises(ValueError, match="val_fraction"):
        build_datasets(str(short), seq_len=2, val_fraction=1.0)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_a_text_file_streams_in_chunks_to_the_tokens_of_the_whole_text(tmp_path, monkeypatch, tokenizer):
    """Chunks of whole lines (here ~40 bytes, lines of every length, a line longer than a chunk,
    multi-byte characters across chunk boundaries, no final newline) give exactly the whole text's
    tokens; the token file is memory-mapped and reused."""
    from nlp.data import load_tokens, stream_tokens, token_file

    monkeypatch.setenv("MOE_SUITE_CACHE", str(tmp_path / "cache"))
    text = "".join(f"ligne {i} — naïve café {'x' * (i % 7)}\n" for i in range(60)) + "é" * 120 + "\nend"
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    tok = build_tokenizer(tokenizer)
    whole = tok.encode_corpus(text)
    chunks = list(stream_tokens(path, tok, chunk_bytes=40))
    assert len(chunks) > 10 and [t for c in chunks for t in c] == whole
    ids = load_tokens(path, tok, chunk_bytes=40)
    file = token_file(path, tok)
    assert ids.tolist() == whole and ids.untyped_storage().nbytes() == file.stat().st_size  # a view of the file
    assert file.parent == tmp_path / "cache" / "tokens" and file.stat().st_size == len(whole) * ids.element_size()
    mtime = file.stat().st_mtime_ns
    assert token_file(path, tok) == file and file.stat().st_mtime_ns == mtime  # reused, not rewritten
    path.write_text(text + "\nmore\n", encoding="utf-8")  # the text changed: a new token file
    assert token_file(path, tok) != file


def test_training_batches_gather_blocks_from_the_token_map(tmp_path, monkeypatch):
    """The loader's columns index the memory-mapped tokens per batch; they equal the stacked blocks."""
    from core.engine import TensorLoader

    monkeypatch.setenv("MOE_SUITE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i} of the book\n" for i in range(300)), encoding="utf-8")
    _, train, _ = build_datasets(str(path), seq_len=16)
    assert train.tokens.dtype == torch.uint16  # stored compactly, read as int64
    xs, ys = train.tensors()
    vx, vy = train.views()
    assert vx.shape == xs.shape and torch.equal(vx[torch.tensor([5, 0, 7])], xs[[5, 0, 7]])
    assert torch.equal(vy[2:4], ys[2:4]) and vx[3].shape == (16,) and vx[3].dtype == torch.long
    with pytest.raises(IndexError):
        vx[torch.tensor([len(train)])]
    batches = list(TensorLoader(train.views(), 8, shuffle=True).batches(epoch=1, seed=2))
    same = list(TensorLoader((xs, ys), 8, shuffle=True).batches(epoch=1, seed=2))
    assert all(torch.equal(a, b) for ba, bb in zip(batches, same) for a, b in zip(ba, bb))
