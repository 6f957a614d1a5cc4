#!/usr/bin/env bash
# On the GPU machine (after `source .whl/setup.sh`): the whole server over HTTP, measured with
# `python -m server.bench` on the Llama-3.1-8B shape with dummy weights:
#   b1:   8 requests one at a time, 128 prompt / 256 output tokens (TPOT and inter-chunk latency)
#   1000: 1000 requests of 1024 / 128 tokens sent at once (output tokens/s)
# then SIGTERM, timing the stop.
#
#   bash benchmarks/bench_http_gpu.sh LABEL TOKENIZER_DIR [server flags ...]
#
# MODEL and NUM replace the config and the 1000 (for a trial run on the CPU with a tiny config);
# OUTLEN replaces the 128 output tokens of the throughput run.
# CODE=DIR serves from another checkout (e.g. an older commit, for a before/after); the bench
# client is always this checkout's. Results: $OUT/LABEL.{b1,1000}.{txt,json}, LABEL.server.log.
# Use a tokenizer that covers the model's vocabulary (benchmarks/make_bench_tokenizer.py): with a
# smaller one, ids past its end decode to nothing and never reach the client as text.
set -uo pipefail
label=$1 tok=$2
shift 2
code=${CODE:-$PWD}
out=${OUT:-/tmp}
port=${PORT:-18000}
model=${MODEL:-configs/llama-3.1-8b.json}
num=${NUM:-1000}
outlen=${OUTLEN:-128}
(cd "$code" && PYTHONPATH="$code${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m server \
    --model "$model" --load-format dummy --tokenizer "$tok" --port "$port" "$@") \
    > "$out/$label.server.log" 2>&1 &
pid=$!
for _ in $(seq 900); do
  curl -sf "127.0.0.1:$port/health" > /dev/null && break
  kill -0 "$pid" 2> /dev/null || { echo "$label: server exited"; tail -20 "$out/$label.server.log"; exit 1; }
  sleep 0.5
done
bench="python3 -m server.bench --base-url http://127.0.0.1:$port --backend completions --tokenizer $tok
       --random-range-ratio 1.0 --disable-tqdm"
$bench --num-prompts 8 --random-input-len 128 --random-output-len 256 --max-concurrency 1 \
  --output "$out/$label.b1.json" > "$out/$label.b1.txt" 2>&1
$bench --num-prompts "$num" --random-input-len 1024 --random-output-len "$outlen" \
  --output "$out/$label.1000.json" > "$out/$label.1000.txt" 2>&1
t0=$(date +%s.%N)
kill -TERM "$pid"
wait "$pid"
rc=$?
stop_s=$(python3 -c "import time; print(f'{time.time() - $t0:.2f}')")
b1=$(grep -E "Median TPOT|Median ITL|P99 ITL" "$out/$label.b1.txt" | awk -F: '{gsub(/ /, "", $2); printf "%s ", $2}')
tput=$(grep -E "Output token throughput" "$out/$label.1000.txt" | awk -F: '{gsub(/ /, "", $2); print $2}')
killed=$(grep -c "did not stop in time" "$out/$label.server.log")
echo "$label | b1 TPOT/ITL p50/ITL p99 ms: $b1| ${num}x1024/${outlen} out tok/s: $tput | stop ${stop_s}s rc $rc, killed $killed"
