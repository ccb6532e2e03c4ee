"""Write a trained run of ``nlp.train`` as a Hugging Face directory.

    python -m nlp.export checkpoint=outputs/nlp/<run> out=ckpt/mixtral-tiny

``checkpoint`` is a run directory (or checkpoint file) as ``nlp.generate`` reads it; the model is
rebuilt from the run's ``config.yaml`` and its final weights, then written by ``nlp.train.save_hf_dir``:
a suite ``MoETransformerLM`` of Mixtral's form (``model=mixtral_tiny``, or any SwiGLU, RMSNorm, rotary,
all-MoE model with Mixtral's router) becomes a transformers Mixtral (``nlp.hf.save_mixtral``); a
``model=hf`` run whose routers transformers has is written back in its own architecture. The result
loads with ``transformers.AutoModelForCausalLM.from_pretrained(out)`` and with ``model=hf
model.path=<out>``, with the same logits. A model transformers cannot hold is refused with the reason
(exit status 1).
"""

from __future__ import annotations

import sys

__all__ = ["export", "main"]

DEFAULTS = {"checkpoint": None, "out": None}


def export(checkpoint, out):
    """Rebuild the run at ``checkpoint`` and write it to ``out``; returns ``out`` as a Path, or None
    when transformers has no such model (``nlp.train.save_hf_dir`` logs why)."""
    from nlp.generate import load_model
    from nlp.train import save_hf_dir

    model, tokenizer = load_model(checkpoint)
    return save_hf_dir(model, out, tokenizer)


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = dict(DEFAULTS)
    for arg in sys.argv[1:] if argv is None else argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in DEFAULTS:
            print(f"error: {arg!r} is not an option of nlp.export: use checkpoint=<run dir> out=<dir>", file=sys.stderr)
            return 2
        args[key] = value
    missing = [k for k, v in args.items() if not v]
    if missing:
        print(f"error: {' and '.join(f'{k}=...' for k in missing)} required: nlp.export checkpoint=<run dir> out=<dir>",
              file=sys.stderr)
        return 2
    try:
        out = export(args["checkpoint"], args["out"])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if out is None:
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
