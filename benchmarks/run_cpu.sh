#!/usr/bin/env bash
# The CPU tables of benchmarks/README.md: every command with its date, then its table (about 4 minutes on 2 cores).
# One torch thread: on a CPU shared with other jobs, spinning OpenMP threads collapse throughput (see the README).
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
bench() {
  echo -e "\n\`python benchmarks/$*\` ($(date '+%Y-%m-%d %H:%M %Z'))\n"
  python "benchmarks/$@" --threads 1 2> >(grep -v '^WARNING clustering' >&2) || status=1
}
bench bench_exact_ranking.py --model tiny --sizes 6000,12000 --repeat 2 --fast-dtype none
bench bench_exact_ranking.py --model tiny --sizes 6000 --mentions 32 --naive-mentions 20
bench bench_exact_ranking.py --model b32 --sizes 2000 --mentions 40 --naive-mentions 20 --repeat 2 --fast-dtype none
bench bench_two_stage.py --model tiny --sizes 2000,10000
bench bench_two_stage.py --model tiny --sizes 10000 --noise -1
bench bench_two_stage.py --model b32 --sizes 10000 --mentions 32
bench bench_entity_encoding.py --model tiny --sizes 4096 --repeat 2
bench bench_entity_encoding.py --model b32 --sizes 64 --batch-size 32
exit $status
