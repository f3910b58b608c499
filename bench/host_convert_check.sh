#!/usr/bin/env bash
# The unattended CPU check of data conversion on a many-core host: bench/bench_convert.py (20,000 synthetic
# dialogues, the tiny tokenizer built on the fly) with convert_data's tokenizer threads, for the many-core
# CPU of a GPU host.  CPU only: it never touches the GPU.
#
#     OUT=/some/folder bash bench/host_convert_check.sh        # from the repo root, or anywhere
#     DIALOGUES=300 OUT=/tmp/x bash bench/host_convert_check.sh # a quick smoke run (default 20000)
#
# 1. installs the wheels carried in .whl/ (if any) and prints the versions (bench/gpu_setup.sh; nothing
#    needs carrying on the H200 image, which has torch, transformers, tokenizers and sentencepiece);
# 2. bench_convert.py with the default --threads (0: one per usable core, at most 16), three interleaved
#    rounds, each method's best time kept -> $OUT/bench_convert_host.json (cut at 150 s);
# 3. one round with --threads 1 (the tokenizer on one thread) -> $OUT/bench_convert_host_t1.json (cut at 60 s).
# Each round converts the same dialogues with this project, then with the seed's method (one slow tokenizer
# call per piece, one thread), then bare sentencepiece, and the script exits 1 if any ids differ.  Everything
# printed also goes to $OUT/log; the figures belong in BENCHMARKS.md.
# Exit status: 0 when every run succeeded with identical ids, else that of the first that did not
# (1 ids differ, 2 a missing package or bad argument, 124 timed out).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/bench_convert_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
# shellcheck source=gpu_setup.sh
source bench/gpu_setup.sh
DIALOGUES=${DIALOGUES:-20000}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

run() {
    gpu_setup bench_convert.py transformers tokenizers sentencepiece numpy tqdm
    echo "== cores: nproc $(nproc), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    local status=0 rc
    for spec in "150 bench_convert_host.json --repeats 3" "60 bench_convert_host_t1.json --threads 1"; do
        set -- $spec
        local limit=$1 json=$2
        shift 2
        echo "== bench_convert.py --dialogues $DIALOGUES $* -> $OUT/$json (cut at $limit s)"
        timeout -k 10 "$limit" "$PY" bench/bench_convert.py --dialogues "$DIALOGUES" "$@" --json "$OUT/$json"
        rc=$?
        echo "== exit status: $rc"
        if [ "$status" -eq 0 ] && [ "$rc" -ne 0 ]; then status=$rc; fi
    done
    echo "== done $(date -u '+%F %T') UTC"
    return "$status"
}

run 2>&1 | tee "$OUT/log"
exit "${PIPESTATUS[0]}"
