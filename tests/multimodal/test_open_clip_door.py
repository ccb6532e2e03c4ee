"""open_clip's own doors: ``open_clip.create_model("<name>-MoE")`` builds CLIP-MoE and LIMoE from the
registered model JSON (``multimodal.factory``); the training loss is ``ClipLoss`` with the process
group's rank and world size (global negatives under torchrun); zero-shot classifiers come from
``open_clip.build_zero_shot_classifier``."""

from __future__ import annotations

import json
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F

import multimodal  # noqa: F401  (registers the model JSON)
from core.moe import MoE
from core.routers.topk import TopKRouter
from multimodal import factory, models as M, training
from multimodal.data import FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES
from tests.conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP_MOE, LIMOE = "mm-clip-micro-p4-16-MoE", "mm-limoe-micro-p4-16-MoE"  # 16x16 images, 2 blocks of width 32
CAPTIONS = ["dog", "red apple", "a photo of a sneaker", "llama"]


def _inputs(name: str):
    cfg = open_clip.get_model_config(name)
    size = cfg["vision_cfg"]["image_size"]
    g = torch.Generator().manual_seed(0)
    return torch.randn(len(CAPTIONS), 3, size, size, generator=g), open_clip.get_tokenizer(name)(CAPTIONS)


def _moe(model: torch.nn.Module, prefix: str = "") -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, MoE) and n.startswith(prefix)]


def test_moe_configs_are_registered_with_their_moe_settings():
    names = factory.moe_model_names()
    assert {"mm-clip-tiny-p4-32-MoE", CLIP_MOE, "mm-limoe-tiny-p4-32-MoE", LIMOE} <= set(names)
    assert all(n.endswith("-MoE") for n in names)
    for name in names:  # every JSON of the folder is an open_clip architecture
        on_disk = json.loads((factory.MODEL_CONFIG_DIR / f"{name}.json").read_text())
        assert open_clip.get_model_config(name)["moe_cfg"] == on_disk["moe_cfg"]
        assert {"router", "num_experts"} <= set(on_disk["moe_cfg"])


def test_create_model_builds_clip_moe_from_its_json():
    model = open_clip.create_model(CLIP_MOE)
    assert isinstance(model, open_clip.CLIP)
    # every_other in each 2-block tower: block 1 of the image tower and block 1 of the text tower
    assert _moe(model, "visual.") == ["visual.transformer.resblocks.1.mlp"]
    assert _moe(model, "transformer.") == ["transformer.resblocks.1.mlp"]
    for name in _moe(model):
        layer = model.get_submodule(name)
        assert layer.num_experts == 4
        router = layer.router  # conf/router/mixtral.yaml with the JSON's router_kwargs
        assert type(router) is TopKRouter and router.top_k == 2 and router.renormalize
        assert router.loss_weights["switch"] == 0.01 and router.capacity_factor is None
    assert hasattr(model, "text_padding_mask")  # padding kept out of text routing, as create_clip_moe does
    image, text = _inputs(CLIP_MOE)
    img, txt, scale = model(image, text)
    assert img.shape == txt.shape == (len(CAPTIONS), 32) and torch.isfinite(img).all() and scale.ndim == 0


def test_the_json_model_equals_the_suites_own_construction():
    torch.manual_seed(0)
    from_json = open_clip.create_model(CLIP_MOE).state_dict()
    torch.manual_seed(0)
    own = M.create_clip_moe("mm-clip-micro-p4-16", num_experts=4, router="mixtral",
                            router_kwargs={"top_k": 2, "switch_loss_weight": 0.01}).state_dict()
    assert from_json.keys() == own.keys() and all(torch.equal(from_json[k], own[k]) for k in own)


def test_create_model_builds_limoe_from_its_json():
    model = open_clip.create_model(LIMOE)
    assert isinstance(model, M.LIMoE)
    assert _moe(model) == ["transformer.resblocks.1.mlp"]
    router = model.transformer.resblocks[1].mlp.router
    assert type(router) is TopKRouter and router.top_k == 1 and router.batch_priority
    assert model.local_entropy_weight == (0.0, 0.1) and model.context_length == 16
    image, text = _inputs(LIMOE)
    img, txt, _ = model(image, text)
    assert img.shape == txt.shape == (len(CAPTIONS), 32)


@pytest.mark.parametrize("name", [CLIP_MOE, LIMOE])
def test_create_model_and_transforms_sizes_the_images_for_the_model(name):
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    assert _moe(model)
    from PIL import Image

    image = preprocess(Image.new("RGB", (40, 30)))
    assert image.shape == (3, 16, 16)
    assert model.state_dict().keys() == open_clip.create_model(name).state_dict().keys()


def test_pretrained_checkpoint_loads_into_the_moe_model(tmp_path):
    torch.manual_seed(1)
    trained = open_clip.create_model(CLIP_MOE)
    path = tmp_path / "clip_moe.pt"
    torch.save(trained.state_dict(), path)
    torch.manual_seed(2)
    loaded = open_clip.create_model(CLIP_MOE, pretrained=str(path))  # open_clip loads strictly
    w = "visual.transformer.resblocks.1.mlp.experts.w1_EDF"
    assert torch.equal(loaded.state_dict()[w], trained.state_dict()[w])


def test_dense_configs_stay_open_clips_and_moe_cfg_can_be_given():
    dense = open_clip.create_model("mm-clip-micro-p4-16")
    assert type(dense) is open_clip.CLIP and not _moe(dense)
    model = open_clip.create_model("mm-clip-micro-p4-16", moe_cfg={"router": "expert_choice", "text_layers": "none"})
    assert _moe(model) == ["visual.transformer.resblocks.1.mlp"]
    assert type(model.get_submodule(_moe(model)[0]).router).__name__ == "ExpertChoiceRouter"


def test_bad_moe_settings_are_refused_by_name():
    with pytest.raises(ValueError, match=r"moe_cfg.num_expert=8 is not allowed.*num_experts"):
        open_clip.create_model("mm-clip-micro-p4-16", moe_cfg={"num_expert": 8})
    with pytest.raises(ValueError, match=r"moe_cfg.arch='vmoe' is not allowed"):
        open_clip.create_model("mm-clip-micro-p4-16", moe_cfg={"arch": "vmoe"})
    with pytest.raises(ValueError, match=r"router='mixtrall' is not allowed.*'mixtral'"):
        open_clip.create_model("mm-clip-micro-p4-16", moe_cfg={"router": "mixtrall"})
    with pytest.raises(ValueError, match=r"text_cfg.width=64 is not allowed: LIMoE shares one transformer"):
        factory.build_open_clip_model(embed_dim=32, vision_cfg={"width": 32, "head_width": 16, "layers": 2},
                                      text_cfg={"width": 64, "heads": 2, "layers": 2}, moe_cfg={"arch": "limoe"})
    with pytest.raises(ValueError, match="already hold MoE"):
        M.convert_clip_to_moe(open_clip.create_model(CLIP_MOE))


def test_a_run_refuses_a_moe_json_as_its_dense_architecture():
    cfg = compose("multimodal", "debug=default", "model=clip", f"model.model_name={CLIP_MOE}",
                  "data.image_size=16")
    with pytest.raises(ValueError, match=r"model.model_name='mm-clip-micro-p4-16-MoE' is not allowed: a \*-MoE"):
        training.validate_config(cfg)


def test_training_loss_is_clip_loss_of_the_process_group(monkeypatch):
    loss = training.contrastive_loss()
    assert (loss.rank, loss.world_size, loss.local_loss, loss.gather_with_grad) == (0, 1, False, True)
    monkeypatch.setattr(training, "get_rank", lambda: 1)
    monkeypatch.setattr(training, "get_world_size", lambda: 4)
    loss = training.contrastive_loss()
    assert (loss.rank, loss.world_size, loss.local_loss, loss.gather_with_grad) == (1, 4, False, True)


def test_batch_size_must_split_evenly_over_the_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = compose("multimodal", "debug=default", "data.batch_size=32")
    with pytest.raises(ValueError, match=r"data.batch_size=32 is not allowed: under torchrun .* WORLD_SIZE=3"):
        training.validate_config(cfg)


def _two_rank_loss(rank: int, init_file: str, feats: dict, out_dir: str) -> None:
    """Rank ``rank`` of 2 (gloo): the engine's step on its half of the batch (loss weighted by its share)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    half = feats["image"].shape[0] // 2
    img = feats["image"][rank * half:(rank + 1) * half].clone().requires_grad_()
    txt = feats["text"][rank * half:(rank + 1) * half].clone().requires_grad_()
    loss = training.contrastive_loss()(img, txt, feats["scale"])
    (loss * 0.5).backward()
    torch.save({"loss": loss.detach(), "img_grad": img.grad, "txt_grad": txt.grad}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_contrast_with_the_global_batch(tmp_path):
    """Under 2 gloo processes each rank's loss is the loss of the whole batch (every caption a negative),
    and the share-weighted gradients are those of the one-process loss on the whole batch."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    feats = {"image": F.normalize(torch.randn(8, 16, generator=g), dim=-1),
             "text": F.normalize(torch.randn(8, 16, generator=g), dim=-1), "scale": torch.tensor(10.0)}
    mp.spawn(_two_rank_loss, args=(str(tmp_path / "init"), feats, str(tmp_path)), nprocs=2, join=True)
    img, txt = feats["image"].clone().requires_grad_(), feats["text"].clone().requires_grad_()
    whole = training.contrastive_loss()(img, txt, feats["scale"])
    whole.backward()
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    local = training.contrastive_loss()(feats["image"][:4], feats["text"][:4], feats["scale"])
    for r, res in enumerate(ranks):
        assert res["loss"] == pytest.approx(float(whole.detach()), rel=1e-6)
        assert float(local) != pytest.approx(float(whole), rel=1e-3)  # per-rank negatives would differ
        assert torch.allclose(res["img_grad"], img.grad[4 * r:4 * (r + 1)], atol=1e-6)
        assert torch.allclose(res["txt_grad"], txt.grad[4 * r:4 * (r + 1)], atol=1e-6)


def test_zero_shot_accuracy_uses_open_clips_classifier():
    model = open_clip.create_model("mm-clip-micro-p4-16").eval()
    tokenizer = open_clip.get_tokenizer("mm-clip-micro-p4-16")
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(40, 3, 16, 16, generator=g), torch.arange(40) % 10
    evaluate = training.make_evaluate(tokenizer, FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES)
    acc = evaluate(model, [{"image": images[:20], "label": labels[:20]}, {"image": images[20:], "label": labels[20:]}])
    with torch.no_grad():  # the prompt ensemble by hand: mean of normalised prompt features, normalised
        C, T = len(FASHION_MNIST_CLASSES), len(FASHION_MNIST_TEMPLATES)
        prompts = tokenizer([t.format(c) for c in FASHION_MNIST_CLASSES for t in FASHION_MNIST_TEMPLATES])
        classifier_CE = F.normalize(model.encode_text(prompts, normalize=True).view(C, T, -1).mean(1), dim=-1)
        pred = (model.encode_image(images, normalize=True) @ classifier_CE.T).argmax(-1)
    assert acc == {"acc": pytest.approx(float((pred == labels).float().mean()))}
