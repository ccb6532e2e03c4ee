# Sourced by the study scripts (router_study.sh, router_regime.sh): run_sweeps runs each Hydra multirun
# command given, two runs at a time ($PAR), unless the directory its hydra.sweep.dir names already holds
# a .done marker (so a study resumes after an interruption); compare_args prints nothing but fills the
# array COMPARE_ARGS with one --command per command, as core.compare records them on the page.
PAR="hydra/launcher=parallel hydra.launcher.n_jobs=2"
export OMP_NUM_THREADS=1

run_sweeps() {
  local c dir
  for c in "$@"; do
    [[ $c =~ hydra\.sweep\.dir=([^ ]+) ]] || { echo "no hydra.sweep.dir in: $c" >&2; return 1; }
    dir=${BASH_REMATCH[1]}
    if [ -f "$dir/.done" ]; then echo "done already: $dir"; continue; fi
    echo "== $c"
    nice -n 5 $c $PAR
    touch "$dir/.done"
  done
}

compare_args() {
  local c
  COMPARE_ARGS=()
  for c in "$@"; do COMPARE_ARGS+=(--command "OMP_NUM_THREADS=1 $c $PAR"); done
}
