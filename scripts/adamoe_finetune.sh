#!/usr/bin/env bash
# AdaMoE in its paper's setting at CPU scale (docs/adamoe_finetune.md): pretrain a Mixtral-style top-2
# LM with the suite, write it in Hugging Face format, fine-tune it on held-out text as top-2 and converted
# to AdaMoE (3 seeds each, equal steps), and tabulate the runs with core.compare.
#   scripts/adamoe_finetune.sh                 # everything under $OUT (default /tmp/adamoe)
#   OUT=/tmp/ada SEEDS=0,1 scripts/adamoe_finetune.sh
# A step whose output exists is skipped, so the script resumes after an interruption.
# On 2 shared CPU cores (load 4-8 from other jobs): 43 min pretraining, then 10-12 min per fine-tune, three at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/adamoe}
SEEDS=${SEEDS:-0,1,2}
export OMP_NUM_THREADS=1
PY="nice -n 5 python"
mkdir -p "$OUT"

# 1. Pretrain: model=mixtral_tiny (4 blocks, width 128, 8 SwiGLU experts of width 448 in every block, Mixtral's
#    top-2 router; 5.8M parameters) on the WordNet glosses (the nlp default corpus; the last 10% is its
#    validation split and is never trained on), 2800 steps of 16 x 128 byte tokens.
[ -f "$OUT/pretrain/metrics.json" ] ||
  $PY -m nlp.train model=mixtral_tiny data.batch_size=16 trainer.max_steps=2800 output_dir="$OUT/pretrain"

# 2. Hugging Face format (a transformers Mixtral: AutoModelForCausalLM and model=hf load it, same logits).
[ -f "$OUT/mixtral_tiny_hf/config.json" ] ||
  $PY -m nlp.export checkpoint="$OUT/pretrain" out="$OUT/mixtral_tiny_hf"

# 3. Held-out text: the whole lines of the pretraining's validation split (the last 10% of the glosses'
#    bytes), 207 kB; the fine-tuning trains on its first 80% and validates on the last 20%.
[ -f "$OUT/heldout.txt" ] || $PY - "$OUT/heldout.txt" <<'PYEOF'
import sys
from nlp.data import wordnet_glosses
b = wordnet_glosses().encode("utf-8")
cut = len(b) - int(round(len(b) * 0.1))   # nlp.data.build_datasets' split at data.val_fraction=0.1
start = b.index(b"\n", cut) + 1           # the first whole line after it
open(sys.argv[1], "wb").write(b[start:])
print(f"{sys.argv[1]}: bytes {start}..{len(b)} of the glosses ({len(b) - start} bytes)")
PYEOF

# 4. Fine-tune, equal steps (experiment=adamoe_finetune: 300 steps of 16 x 128 tokens, lr 3e-4; validation
#    after every pass over the fine-tuning split), the three arms side by side, their seeds one after another.
FT="$PY -m nlp.train -m experiment=adamoe_finetune model.path=$OUT/mixtral_tiny_hf data.path=$OUT/heldout.txt seed=$SEEDS"
ADAMOE="+router=adamoe router.num_null_experts=16 router.top_k=4 router.load_loss_weight=4e-4"
pids=()
[ -d "$OUT/ft/top2" ] || { $FT hydra.sweep.dir="$OUT/ft/top2" & pids+=($!); }             # (a) the checkpoint's top-2
[ -d "$OUT/ft/adamoe" ] || { $FT $ADAMOE hydra.sweep.dir="$OUT/ft/adamoe" & pids+=($!); } # (b) AdaMoE, null rows copied
[ -d "$OUT/ft/adamoe_normal" ] || {                                                       # (c) AdaMoE, null rows ~ N(0, 0.02²)
  $FT $ADAMOE model.null_router_init=normal hydra.sweep.dir="$OUT/ft/adamoe_normal" & pids+=($!); }
for p in "${pids[@]}"; do wait "$p"; done

# 5. Before fine-tuning: each arm's validation perplexity and true experts per token at conversion.
$PY - "$OUT" <<'PYEOF'
import functools, sys
import core
from core.routers.adamoe import AdaMoERouter
from core.engine import TensorLoader
from nlp.data import build_datasets
from nlp.hf import load_hf_lm
from nlp.training import lm_evaluate
out = sys.argv[1]
_, _, val = build_datasets(path=f"{out}/heldout.txt", seq_len=128, val_fraction=0.2)
ada = functools.partial(AdaMoERouter, num_null_experts=16, top_k=4, load_loss_weight=4e-4)
for name, kw in [("top-2", {}), ("adamoe (copy)", dict(router=ada)),
                 ("adamoe (normal)", dict(router=ada, null_router_init="normal"))]:
    model = load_hf_lm(f"{out}/mixtral_tiny_hf", max_seq_len=128, **kw).eval()
    batches, ept = list(TensorLoader(val.tensors(), 64)), []
    for batch in batches:  # true experts per token of each batch, averaged over tokens
        lm_evaluate(model, [batch])
        ept.append(core.routing_stats(model)["experts_per_token"] * batch[0].numel())
    res = lm_evaluate(model, batches)
    print(f"{name:16s} before fine-tuning: val ppl {res['ppl']:.3f}, "
          f"true experts/token {sum(ept) / sum(b[0].numel() for b in batches):.3f}")
PYEOF

# 6. The table: mean ± std, 95% t-interval over seeds, difference to top-2 paired by seed.
python -m core.compare "$OUT/ft" --out "$OUT/compare" --baseline "checkpoint (mixtral)" \
  --title "AdaMoE fine-tuning of a suite-pretrained Mixtral" \
  --command "scripts/adamoe_finetune.sh"

# 7. True experts per token and FLOPs against top-2, per arm (mean ± std, 95% t-interval over seeds).
python - "$OUT/ft" <<'PYEOF'
import json, sys
from pathlib import Path
from core.compare import Stat
runs = {}
for f in sorted(Path(sys.argv[1]).glob("*/*/metrics.json")):
    runs.setdefault(f.parent.parent.name, []).append(json.loads(f.read_text()))
fmt = lambda s, p: f"{s.mean:.{p}f} ± {s.std:.{p}f} [{s.mean - s.ci95:.{p}f}, {s.mean + s.ci95:.{p}f}]" if s.n > 1 \
    else f"{s.mean:.{p}f}"
base = Stat([m["flops_per_token"] for m in runs.get("top2", [])])
print("| arm | n | val ppl | true experts / token | expert FLOPs / top-2 | model FLOPs / token vs top-2 |")
print("|---|---|---|---|---|---|")
for arm, ms in runs.items():
    ppl = Stat([m["val_ppl"] for m in ms])
    ept = Stat([m["experts_per_token"] for m in ms])
    ratio = Stat([m["experts_per_token"] / 2 for m in ms])
    flops = Stat([m["flops_per_token"] / base.mean for m in ms]) if base.n else None
    print(f"| {arm} | {ppl.n} | {fmt(ppl, 3)} | {fmt(ept, 3)} | {fmt(ratio, 3)} | {fmt(flops, 3) if flops else 'n/a'} |")
print()
print("validation perplexity / true experts per token after each pass (mean over seeds):")
for arm, ms in runs.items():
    dirs = sorted(f.parent for f in Path(sys.argv[1]).glob(f"{arm}/*/metrics.json"))
    evals = [[json.loads(l) for l in (d / "history.jsonl").read_text().splitlines() if '"end_of_epoch"' in l]
             for d in dirs]
    cells = []
    for i in range(min(len(e) for e in evals)):
        ppl = Stat([e[i]["val_ppl"] for e in evals])
        ept = Stat([e[i]["val_routing"]["experts_per_token"] for e in evals])
        cells.append(f"step {evals[0][i]['step']}: {ppl.mean:.3f} / {ept.mean:.2f}")
    print(f"  {arm:14s} " + ", ".join(cells))
PYEOF
