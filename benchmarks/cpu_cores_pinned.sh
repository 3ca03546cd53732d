#!/usr/bin/env bash
# Decode on 1 core / 2 cores (1 and 2 CPU streams) against mlx-lm, each run pinned to its own cores
# so that the three run side by side on a machine with 5+ idle cores (`taskset`, Linux). The
# bench-sized synthetic 4-bit checkpoint of bench_vs_mlx_lm.py is written once to $WORK.
#   bash benchmarks/cpu_cores_pinned.sh [WORK] [OUTDIR]      # ~8 min on a 16-core server
#   P=128 R=2 bash benchmarks/cpu_cores_pinned.sh             # shorter prompt, 2 repetitions (~3 min)
set -euo pipefail
WORK=${1:-/tmp/s35bench}
OUTDIR=${2:-.}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -f "$WORK/config.json" ] || ${PYTHON:-python} -c "
from pathlib import Path
from step35_mlx.bench_checkpoint import BenchShape, bench_config, write_checkpoint
write_checkpoint(Path('$WORK'), bench_config(BenchShape()), 0)"
for f in tokenizer.json tokenizer_config.json special_tokens_map.json; do  # bench's prompts are random ids
  cp step35_mlx/demo/model/$f "$WORK/"
done
PIN=taskset
taskset -c 0 true 2>/dev/null || { echo "taskset does not work here: runs are not pinned"; PIN=; }
run() {  # cores streams name
  ${PIN:+taskset -c "$1"} ${PYTHON:-python} -m step35_mlx bench --model "$WORK" -p "${P:-512}" -n "${N:-128}" -r "${R:-3}" --vs-mlx-lm \
    --streams "$2" > "$OUTDIR/$3.txt" 2> "$OUTDIR/$3.err" || echo "$3 failed" >> "$OUTDIR/$3.err"
}
run 0 1 one_core_one_stream &
run 2,3 1 two_cores_one_stream &
run 4,5 2 two_cores_two_streams &
wait
for f in one_core_one_stream two_cores_one_stream two_cores_two_streams; do
  echo "== $f"; cat "$OUTDIR/$f.txt"; tail -3 "$OUTDIR/$f.err"
done
