"""Sample text from a trained language model.

    python -m nlp.generate checkpoint=outputs/nlp/<run> prompt="dog: a member of" max_new_tokens=200 seed=0

``checkpoint`` is a run directory of ``nlp.train`` (it holds ``config.yaml`` and
``checkpoints/last.ckpt`` or the final weights ``model.pt``) or one of those files; the run's
``data.tokenizer`` (byte, bpe or a Hugging Face tokenizer directory) encodes the prompt and decodes the
text. Sampling uses temperature, top-k and top-p (``top_p=0.9``: nucleus sampling; ``temperature=0``
is greedy) and is deterministic under a fixed ``seed``.

A KV cache makes each new token cost one position (``cache=auto``, the default: whenever the routers
route every token by itself alone; ``cache=true`` requires it, ``cache=false`` recomputes the whole
context for every token). ``bench=true`` times both on the same prompt and prints tokens/s side by side:

    python -m nlp.generate checkpoint=outputs/nlp/<run> prompt="dog: " max_new_tokens=200 bench=true
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from core.engine import load_checkpoint
from nlp.data import build_tokenizer
from nlp.models import check_top_p
from nlp.training import build_model

__all__ = ["bench_generation", "generate_text", "load_model", "main"]

DEFAULTS = {"checkpoint": None, "prompt": "", "max_new_tokens": 200, "seed": 0, "temperature": 0.8,
            "top_k": 40, "top_p": 1.0, "device": "cpu", "cache": "auto", "bench": "false", "repeats": 3}
CACHE_CHOICES = {"auto": None, "true": True, "false": False}


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


def _prompt_ids(model, tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.bos_token_id]
    return torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)


def generate_text(model, tokenizer, prompt: str = "", max_new_tokens: int = 200, seed: int = 0,
                  temperature: float = 0.8, top_k: int | None = 40, use_cache: bool | None = None,
                  top_p: float | None = None) -> str:
    """The prompt followed by ``max_new_tokens`` sampled tokens, decoded (``use_cache``: see
    ``MoETransformerLM.generate``)."""
    gen = torch.Generator().manual_seed(int(seed))
    out = model.generate(_prompt_ids(model, tokenizer, prompt), max_new_tokens, temperature=temperature, top_k=top_k,
                         generator=gen, use_cache=use_cache, top_p=top_p)
    return tokenizer.decode(out[0].tolist())


def bench_generation(model, tokenizer, prompt: str = "", max_new_tokens: int = 200, seed: int = 0,
                     temperature: float = 0.8, top_k: int | None = 40, repeats: int = 3) -> dict:
    """Generation speed without and with the KV cache on the same prompt and seed: the best of
    ``repeats`` timings of each (after one short warm-up), as new tokens per second, and whether
    both gave the same tokens. Returns ``{"no_cache": tok/s, "cache": tok/s or None, "speedup",
    "same_tokens", "cache_problem"}``; prints them side by side."""
    ids_BT = _prompt_ids(model, tokenizer, prompt)
    why = model.kv_cache_problem()
    modes = {"no_cache": False} if why is not None else {"no_cache": False, "cache": True}
    rates, outs = {}, {}
    for name, use_cache in modes.items():
        model.generate(ids_BT, min(4, max_new_tokens), temperature=temperature, top_k=top_k,
                       generator=torch.Generator().manual_seed(int(seed)), use_cache=use_cache)
        best = float("inf")
        for _ in range(max(1, int(repeats))):
            gen = torch.Generator().manual_seed(int(seed))
            start = time.perf_counter()
            outs[name] = model.generate(ids_BT, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen,
                                        use_cache=use_cache)
            best = min(best, time.perf_counter() - start)
        rates[name] = (outs[name].shape[1] - ids_BT.shape[1]) / best
    result = {"no_cache": rates["no_cache"], "cache": rates.get("cache"), "cache_problem": why,
              "speedup": rates["cache"] / rates["no_cache"] if "cache" in rates else None,
              "same_tokens": bool(torch.equal(outs["no_cache"], outs["cache"])) if "cache" in outs else None}
    print(f"{type(model).__name__}, {max_new_tokens} new tokens after a {ids_BT.shape[1]}-token prompt, batch 1, "
          f"{ids_BT.device}, {torch.get_num_threads()} threads (best of {max(1, int(repeats))}):")
    print(f"  without cache  {result['no_cache']:10.1f} tokens/s")
    if why is not None:
        print(f"  KV cache       not used: {why}")
    else:
        print(f"  KV cache       {result['cache']:10.1f} tokens/s   {result['speedup']:.2f}x, "
              f"same tokens: {'yes' if result['same_tokens'] else 'NO'}")
    return result


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
        args["top_p"] = float(args["top_p"])
        args["repeats"] = int(args["repeats"])
    except ValueError as err:
        raise ValueError(f"nlp.generate: {err}; max_new_tokens, seed, top_k and repeats are integers, temperature "
                         "and top_p numbers.") from err
    check_top_p(args["top_p"])
    if args["max_new_tokens"] < 0:
        raise ValueError(f"max_new_tokens={args['max_new_tokens']} is not allowed: it must be >= 0.")
    for key in ("cache", "bench"):
        args[key] = str(args[key]).lower()
    if args["cache"] not in CACHE_CHOICES:
        raise ValueError(f"cache={args['cache']!r} is not allowed: use auto, true or false.")
    if args["bench"] not in ("true", "false"):
        raise ValueError(f"bench={args['bench']!r} is not allowed: use true or false.")
    if not args["checkpoint"]:
        raise ValueError("checkpoint=... is required: a run directory of nlp.train or a checkpoint file.")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    model, tokenizer = load_model(args["checkpoint"], args["device"])
    sampling = (args["prompt"], args["max_new_tokens"], args["seed"], args["temperature"], args["top_k"])
    if args["bench"] == "true":
        bench_generation(model, tokenizer, *sampling, repeats=args["repeats"])
    elif args["cache"] == "auto" and model.kv_cache_problem() is not None:
        print(f"no KV cache, the context is recomputed for every token: {model.kv_cache_problem()}", file=sys.stderr)
    text = generate_text(model, tokenizer, *sampling, use_cache=CACHE_CHOICES[args["cache"]], top_p=args["top_p"])
    print(text)
    return text


if __name__ == "__main__":
    main()
