#!/usr/bin/env bash
# The unattended CPU check of data conversion on a many-core host: bench/bench_convert.py (20,000 synthetic
# dialogues, the tiny tokenizer built on the fly) with convert_data's worker processes, for the 16-core CPU
# of the H200 machine.  CPU only: it never touches the GPU.
#
#     OUT=/some/folder bash bench/host_convert_check.sh        # from the repo root, or anywhere
#     DIALOGUES=300 OUT=/tmp/x bash bench/host_convert_check.sh # a quick smoke run (default 20000)
#
# 1. installs the wheels carried in .whl/ (if any) and prints the versions (bench/gpu_setup.sh; nothing
#    needs carrying on the H200 image, which has torch, transformers, tokenizers and sentencepiece);
# 2. bench_convert.py with the default --workers (0: one per usable core, at most 16)
#    -> $OUT/bench_convert_host.json;
# 3. the same with --workers 1 (the whole conversion in one process) -> $OUT/bench_convert_host_w1.json;
# 4. the default again (timings are noisy) -> $OUT/bench_convert_host_again.json.
# Each run converts the same dialogues with this project, then with the seed's method (one slow tokenizer
# call per piece, one process), then bare sentencepiece, and exits 1 if any ids differ.  Everything printed
# also goes to $OUT/log.  Expected wall time on a 16-core host: about 35 s a run (the seed's method ~17 s),
# under 2 minutes in all; each run is cut at 150 s.
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
    for spec in "bench_convert_host.json" "bench_convert_host_w1.json --workers 1" "bench_convert_host_again.json"; do
        set -- $spec
        local json=$1
        shift
        echo "== bench_convert.py --dialogues $DIALOGUES $* -> $OUT/$json"
        timeout -k 10 150 "$PY" bench/bench_convert.py --dialogues "$DIALOGUES" "$@" --json "$OUT/$json"
        rc=$?
        echo "== exit status: $rc"
        if [ "$status" -eq 0 ] && [ "$rc" -ne 0 ]; then status=$rc; fi
    done
    echo "== done $(date -u '+%F %T') UTC"
    return "$status"
}

run 2>&1 | tee "$OUT/log"
exit "${PIPESTATUS[0]}"
