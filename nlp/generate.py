"""Sample text from a trained language model.

    python -m nlp.generate checkpoint=outputs/nlp/<run> prompt="dog: a member of" max_new_tokens=200 seed=0

``checkpoint`` is a run directory of ``nlp.train`` (it holds ``config.yaml`` and
``checkpoints/last.ckpt`` or the final weights ``model.pt``) or one of those files. Sampling uses temperature and top-k
(``temperature=0`` is greedy) and is deterministic under a fixed ``seed``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from core.engine import load_checkpoint
from nlp.data import build_tokenizer
from nlp.training import build_model

__all__ = ["generate_text", "load_model", "main"]

DEFAULTS = {"checkpoint": None, "prompt": "", "max_new_tokens": 200, "seed": 0, "temperature": 0.8,
            "top_k": 40, "device": "cpu"}


def _run_dir_and_file(checkpoint: str | Path) -> tuple[Path, Path]:
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        run_dir = path
        candidates = [path / "checkpoints" / "last.ckpt", path / "model.pt", path / "checkpoints" / "prev.ckpt"]
        ckpt = next((c for c in candidates if c.is_file()), candidates[0])
    elif path.is_file():
        ckpt = path
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    else:
        raise ValueError(f"checkpoint={str(checkpoint)!r} is neither a run directory nor a checkpoint file.")
    if not ckpt.is_file():
        raise ValueError(f"checkpoint={str(checkpoint)!r}: no checkpoints/last.ckpt, model.pt or "
                         f"checkpoints/prev.ckpt in {run_dir}.")
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"checkpoint={str(checkpoint)!r}: {run_dir / 'config.yaml'} is missing; it is written "
                         "by nlp.train next to the checkpoints.")
    return run_dir, ckpt


def load_model(checkpoint: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer) from a run directory or checkpoint file of ``nlp.train``."""
    run_dir, ckpt = _run_dir_and_file(checkpoint)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, tokenizer.vocab_size)
    if ckpt.suffix == ".pt":  # the engine's plain final state dict
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    else:
        state = load_checkpoint(ckpt)["model"]
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer


def generate_text(model, tokenizer, prompt: str = "", max_new_tokens: int = 200, seed: int = 0,
                  temperature: float = 0.8, top_k: int | None = 40) -> str:
    """The prompt followed by ``max_new_tokens`` sampled tokens, decoded."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.bos_token_id]
    ids_BT = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(int(seed))
    out = model.generate(ids_BT, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return tokenizer.decode(out[0].tolist())


def parse_args(argv: list[str]) -> dict:
    """``key=value`` arguments (Hydra-style); values are kept verbatim, so a prompt may hold ``:`` or ``=``."""
    args = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep or key not in DEFAULTS:
            raise ValueError(f"{arg!r} is not an option of nlp.generate: use key=value with keys {sorted(DEFAULTS)}.")
        args[key] = value
    try:
        args["max_new_tokens"], args["seed"] = int(args["max_new_tokens"]), int(args["seed"])
        args["temperature"] = float(args["temperature"])
        args["top_k"] = None if str(args["top_k"]).lower() in ("none", "null", "0") else int(args["top_k"])
    except ValueError as err:
        raise ValueError(f"nlp.generate: {err}; max_new_tokens, seed and top_k are integers, temperature a number.") from err
    if not args["checkpoint"]:
        raise ValueError("checkpoint=... is required: a run directory of nlp.train or a checkpoint file.")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    model, tokenizer = load_model(args["checkpoint"], args["device"])
    text = generate_text(model, tokenizer, args["prompt"], args["max_new_tokens"], args["seed"],
                         args["temperature"], args["top_k"])
    print(text)
    return text


if __name__ == "__main__":
    main()
