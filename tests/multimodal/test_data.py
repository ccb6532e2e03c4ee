"""Multimodal data: OpenMoji pairs from the wheel's font, Fashion-MNIST captions, image-disjoint splits."""

from __future__ import annotations

import hashlib
import unicodedata

import open_clip
import pytest
import torch

from multimodal import data as D

TOKENIZER = open_clip.SimpleTokenizer(context_length=32)


def _digests(images: torch.Tensor) -> set[bytes]:
    return {hashlib.sha1(img.tobytes()).digest() for img in images.numpy()}


@pytest.fixture(scope="module")
def data():
    return D.build_data(TOKENIZER, image_size=32, fashion_mnist_train=2000, limit_eval=200, seed=0)


def test_openmoji_pairs_are_rendered_emoji_with_unicode_names():
    images, captions = D.render_openmoji(image_size=32)
    assert images.shape[1:] == (32, 32, 3) and images.dtype.name == "uint8"
    assert len(captions) == len(images) > 1000  # about 1.46k single-code-point emoji with names
    assert len(set(captions)) == len(captions)
    assert "dog" in captions and "red apple" in captions
    assert all(c.upper() == unicodedata.name(unicodedata.lookup(c)) for c in captions[:50])
    assert (images.reshape(len(images), -1).min(1) < 200).all()  # no blank glyph
    assert len(_digests(torch.from_numpy(images))) == len(images)


def test_openmoji_cache_round_trip(tmp_path):
    cache = tmp_path / "openmoji.npz"
    first = D.openmoji_pairs(TOKENIZER, 16, cache=str(cache))
    assert cache.is_file()
    second = D.openmoji_pairs(TOKENIZER, 16, cache=str(cache))
    assert torch.equal(first.images, second.images) and first.captions == second.captions
    with pytest.raises(ValueError, match="image_size"):
        D.openmoji_pairs(TOKENIZER, 32, cache=str(cache))


def test_fashion_mnist_captions_are_templated():
    pairs = D.fashion_mnist_pairs(TOKENIZER, "test", image_size=32, limit=50)
    assert pairs.images.shape == (50, 32, 32, 3)
    for n in range(5):
        label = int(pairs.labels[n])
        for row in pairs.caption_idx[n]:
            assert D.FASHION_MNIST_CLASSES[label] in pairs.captions[row]
    assert pairs.captions[0] == "a photo of a t-shirt."


def test_splits_never_share_an_image(data):
    train, val = _digests(data.train.images), _digests(data.val.images)
    assert len(val) == len(data.val) > 100 and not train & val
    assert len(data.zeroshot) == 200 and data.zeroshot.labels is not None
    assert not train & _digests(data.mix.images)
    assert set(data.mix.source.tolist()) == {0, 1}  # held-out pairs of both training sources


def test_tokens_are_open_clip_ids_padded_with_zero(data):
    tokens = data.val.tokens[data.val.caption_idx[:, 0]]
    assert tokens.shape[1] == 32
    assert (tokens[:, 0] == 49406).all()  # start of text
    eot = tokens.argmax(-1)
    assert (tokens[torch.arange(len(tokens)), eot] == 49407).all()
    after = torch.arange(32)[None] > eot[:, None]
    assert (tokens[after] == 0).all()


def test_loaders_batch_images_and_captions(data):
    train = D.pair_loader(data.train, 64, train=True)
    batch = next(iter(train.batches(epoch=0, seed=0)))
    assert batch["image"].shape == (64, 3, 32, 32) and batch["text"].shape == (64, 32)
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    again = next(iter(train.batches(epoch=0, seed=0)))
    assert torch.equal(batch["text"], again["text"])  # order and caption draws fixed by (seed, epoch)
    zs = next(iter(D.labelled_loader(data.zeroshot, 32)))
    assert zs["label"].shape == (32,) and zs["image"].shape == (32, 3, 32, 32)


def test_routing_loader_draws_every_template_reproducibly(data):
    """The held-out routing set routes captions as training does: Fashion-MNIST images get each of
    their templates (not only the first), the same ones on every pass and at every batch size; retrieval
    batches keep the first caption."""
    fm = data.mix.subset(torch.nonzero(data.mix.source == 1)[:, 0])
    first = fm.tokens[fm.caption_idx[:, 0]]
    mix = D.pair_loader(fm, 64, routing_only=True)
    text = torch.cat([b["text"] for b in mix.batches(epoch=0, seed=0)])
    again = torch.cat([b["text"] for b in mix.batches(epoch=0, seed=0)])
    assert torch.equal(text, again)
    # drawn per image, not per batch: the same captions at another evaluation batch size (issue 24)
    assert torch.equal(torch.cat([b["text"] for b in D.pair_loader(fm, 50, routing_only=True).batches()]), text)
    used = {fm.captions[fm.tokens.tolist().index(row)] for row in text.tolist()}
    assert any("grayscale" in c for c in used) and any("type of clothing" in c for c in used)
    assert not torch.equal(text, first)
    val = torch.cat([b["text"] for b in D.pair_loader(fm, 64).batches(epoch=0, seed=0)])
    assert torch.equal(val, first)


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match="data source"):
        D.build_data(TOKENIZER, sources=["coco"])
