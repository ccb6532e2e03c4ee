"""A checkpoint's own tokenizer through ``data.tokenizer=<dir>`` (nlp.data.build_tokenizer, checked by
nlp.training.check_tokenizer), and the Hugging Face directory a ``model=hf`` run writes at its end
(nlp.train.save_hf_dir). Tiny tokenizers and checkpoints are built offline; nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch

from core.checks import ConfigError
from nlp.data import build_datasets
from nlp.generate import generate_text, load_model
from nlp.hf import HFTokenizer
from tests.nlp.test_hf import _checked, _cli, save_tiny, save_tiny_tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = "".join(f"the dog runs {i} times and a cat sleeps on the mat\n" for i in range(120))


def test_tokenizer_directory_feeds_the_data(tmp_path):
    save_tiny_tokenizer(tmp_path / "tok")
    (tmp_path / "book.txt").write_text(CORPUS)
    tok, train, val = build_datasets(path=str(tmp_path / "book.txt"), tokenizer=str(tmp_path / "tok"), seq_len=8)
    assert isinstance(tok, HFTokenizer) and tok.name == "hf:tok"
    x, _ = train.tensors()
    assert int(x.max()) < tok.vocab_size and int(x.max()) > 258  # merged tokens, not bytes
    assert tok.decode(tok.encode("the dog runs")) == "the dog runs"


def test_tokenizer_refusals_are_one_line_naming_the_key(tmp_path):
    save_tiny("mixtral", tmp_path / "ckpt")
    ckpt = f"model.path={tmp_path / 'ckpt'}"
    with pytest.raises(ConfigError, match=r"^data.tokenizer=.* is not allowed: use byte, bpe or a local Hugging Face "
                                          r"tokenizer directory .*there is no directory at") as exc:
        _checked(ckpt, f"data.tokenizer={tmp_path / 'nowhere'}")
    assert "\n" not in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^data.tokenizer=.* holds none of the tokenizer files tokenizer.json"):
        _checked(ckpt, f"data.tokenizer={tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match=r"^data.tokenizer=.* is not allowed"):  # the suite LM checks it too
        _checked("model=tiny", f"data.tokenizer={tmp_path / 'empty'}")
    # a tokenizer whose ids outgrow the checkpoint's embedding (128 rows)
    save_tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    small = transformers.MixtralConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48, num_local_experts=4,
                                       num_experts_per_tok=2)
    transformers.AutoModelForCausalLM.from_config(small).save_pretrained(str(tmp_path / "v128"))
    n = HFTokenizer(tmp_path / "tok").vocab_size
    with pytest.raises(ConfigError, match=rf"^data.tokenizer=.* its vocabulary has {n} tokens, more than the "
                                          r"embedding of .* holds \(vocab_size=128\)") as exc:
        _checked(f"model.path={tmp_path / 'v128'}", f"data.tokenizer={tmp_path / 'tok'}")
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match=r"^model.save_hf='yes' is not allowed: use true or false"):
        _checked(ckpt, "model.save_hf=yes")


def test_hf_run_with_its_tokenizer_trains_generates_and_writes_back(tmp_path):
    save_tiny("mixtral", tmp_path / "ckpt")
    save_tiny_tokenizer(tmp_path / "tok")
    (tmp_path / "book.txt").write_text(CORPUS)
    res = _cli(tmp_path, "model=hf", f"model.path={tmp_path / 'ckpt'}", f"data.tokenizer={tmp_path / 'tok'}",
               "data=text_file", f"data.path={tmp_path / 'book.txt'}", "debug=default", "trainer.max_steps=2",
               "data.seq_len=16", "data.batch_size=4")
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    n = HFTokenizer(tmp_path / "tok").vocab_size
    assert metrics["tokenizer"] == "hf:tok" and metrics["vocab_size"] == n and metrics["steps"] == 2

    # nlp.generate rebuilds the model and the tokenizer from the run directory, and decodes with it
    model, tokenizer = load_model(run)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size == n
    text = generate_text(model, tokenizer, prompt="the dog", max_new_tokens=6, temperature=0)
    ids = model.generate(torch.tensor([tokenizer.encode("the dog")]), 6, temperature=0)
    assert text == tokenizer.decode(ids[0]) and text.startswith("the dog") and len(text) > len("the dog")

    # the end of the run wrote a Hugging Face directory, tokenizer included, with the trained model's logits
    back = transformers.AutoModelForCausalLM.from_pretrained(str(run / "hf"), local_files_only=True).eval()
    x = torch.tensor([tokenizer.encode("a cat sleeps on the mat")])
    with torch.no_grad():
        diff = (back(input_ids=x).logits - model(x)).abs().max().item()
        moved = (model(x) - transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path / "ckpt"), local_files_only=True)(input_ids=x).logits).abs().max().item()
    print(f"<run>/hf after 2 steps: max abs logit diff {diff:.3e} (training moved them by {moved:.3e})")
    assert diff < 1e-5 and moved > 1e-4
    assert transformers.AutoTokenizer.from_pretrained(str(run / "hf"), local_files_only=True).encode(
        "the dog", add_special_tokens=False) == tokenizer.encode("the dog")
