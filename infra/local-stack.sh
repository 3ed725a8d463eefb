#!/usr/bin/env bash
# Start (or stop) the local stack as long-lived services, all state under the data directory, every listener on
# 127.0.0.1: a Prefect server, an MLflow tracking + registry server, a Ray head node with its dashboard, and a
# Prefect worker of the `process` work pool `effnet` (created here), to which the deployments (train-family/b0-b7,
# ...) are deployed, so `prefect deployment run` and the nightly schedule work. `start` writes the stack's
# addresses to $DATA/stack.json, which every `effnet` command reads; `stop` removes it, after which the same data
# directory works without the stack (same stores, same files). `make up` / `make down` / `make status` run it.
# Usage: infra/local-stack.sh start|stop|status
# Ports: EFFNET_PREFECT_PORT (4200), EFFNET_MLFLOW_PORT (5000), EFFNET_RAY_PORT (6379), EFFNET_RAY_DASHBOARD_PORT
# (8265), EFFNET_RAY_CLIENT_PORT (10001), EFFNET_RAY_AGENT_PORT (52365); Ray's other ports are chosen free.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="$(realpath -m "${EFFNET_DATA_DIR:-$PWD/data}")"
BIN="$PWD/.venv/bin"
RUN="$DATA/run"
PREFECT_PORT="${EFFNET_PREFECT_PORT:-4200}"
MLFLOW_PORT="${EFFNET_MLFLOW_PORT:-5000}"
RAY_PORT="${EFFNET_RAY_PORT:-6379}"
RAY_DASHBOARD_PORT="${EFFNET_RAY_DASHBOARD_PORT:-8265}"
RAY_CLIENT_PORT="${EFFNET_RAY_CLIENT_PORT:-10001}"
RAY_AGENT_PORT="${EFFNET_RAY_AGENT_PORT:-52365}"
SERVICES="prefect mlflow ray worker"  # start order; stop goes the other way
WORK_POOL="effnet"  # a `process` work pool: its worker runs each flow run as a child process, on this machine
WORKER_NAME="$WORK_POOL-local"
STACK_FILE="$DATA/stack.json"
mkdir -p "$RUN" "$DATA/logs" "$DATA/mlflow/artifacts" "$DATA/prefect"
export EFFNET_DATA_DIR="$DATA" PREFECT_HOME="$DATA/prefect" PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
# Ray on one machine: node address 127.0.0.1, so every Ray server (GCS, raylet, agents, workers) listens on
# loopback only. Without it Ray replaces 127.0.0.1 by the host's address and binds all interfaces.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Ray 2.60 turns on token auth for a new cluster (token in ~/.ray/auth_token); its clients must say so.
export RAY_AUTH_MODE=token

prefect_api() {  # path [curl args]: a Prefect API call, its JSON on stdout
  local path=$1; shift
  curl -sf "$@" "$PREFECT_API_URL/$path" 2>/dev/null
}

worker_online() {  # our worker's own heartbeat, newer than its pid file: a dead worker's record stays ONLINE a while
  prefect_api "work_pools/$WORK_POOL/workers/filter" -X POST -H 'Content-Type: application/json' -d '{}' \
    | "$BIN/python" -c 'import json, os, sys; from datetime import datetime
name, pidfile = sys.argv[1:]
since = os.path.getmtime(pidfile)
ok = any(w["name"] == name and w["status"] == "ONLINE" and datetime.fromisoformat(w["last_heartbeat_time"]).timestamp() >= since
         for w in json.load(sys.stdin))
sys.exit(0 if ok else 1)' "$WORKER_NAME" "$RUN/worker.pid" 2>/dev/null
}

deployed() {  # are the deployments on the work pool? (the first and the last of the list stand for them all)
  local name
  for name in train-family/b0-b7 nightly/demo; do
    prefect_api "deployments/name/$name" | grep -q "\"work_pool_name\":\"$WORK_POOL\"" || return 1
  done
}

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

healthy() {  # name: does the service answer, not only exist?
  case $1 in
    prefect) curl -sf "http://127.0.0.1:$PREFECT_PORT/api/health" >/dev/null 2>&1 ;;
    mlflow) curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1 ;;
    ray) "$BIN/ray" status --address "127.0.0.1:$RAY_PORT" >/dev/null 2>&1 ;;
    worker) alive worker && worker_online ;;
  esac
}

command_of() {  # name -> the service's command line
  case $1 in
    prefect) echo "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" ;;
    # Artifacts go straight to files under the data directory (no proxy), so an experiment's artifact location
    # is a plain path that the SQLite store alone can also use when the stack is down.
    mlflow) echo "$BIN/mlflow" server --backend-store-uri "sqlite:///$DATA/mlflow/mlflow.db" \
      --default-artifact-root "$DATA/mlflow/artifacts" --no-serve-artifacts --host 127.0.0.1 --port "$MLFLOW_PORT" ;;
    # --block keeps one parent for every Ray process: its pid stops them all, and status can trust it.
    # No preemption watcher (Ray Train starts one per run, an actor polling for nodes being drained): on one
    # machine there is nothing to drain, and its start is on the way to every job's first step.
    ray) echo env RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0 "$BIN/ray" start --head --block --port "$RAY_PORT" --include-dashboard=true \
      --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" --ray-client-server-port "$RAY_CLIENT_PORT" \
      --dashboard-agent-listen-port "$RAY_AGENT_PORT" --disable-usage-stats ;;
    # The worker runs each flow run with its own python (this venv's) and environment (the stack's, exported
    # above); RAY_ADDRESS names the head, as stack.json does for `effnet` commands. No pool creation (ensure_pool
    # does that) and no package installs. It polls every 2 s (Prefect's default: 10 s), so that a run starts
    # within seconds of `prefect deployment run`; on a local server the polls cost nothing.
    worker) echo env "RAY_ADDRESS=127.0.0.1:$RAY_PORT" PREFECT_WORKER_QUERY_SECONDS=2 "$BIN/prefect" worker start --pool "$WORK_POOL" \
      --name "$WORKER_NAME" --no-create-pool-if-not-found --install-policy never ;;
  esac
}

wait_healthy() {  # name, seconds
  for _ in $(seq "$2"); do
    healthy "$1" && return 0
    alive "$1" || { echo "$1: exited while starting; see $DATA/logs/$1.log" >&2; tail -5 "$DATA/logs/$1.log" >&2; return 1; }
    sleep 1
  done
  echo "$1: did not answer within $2 s; see $DATA/logs/$1.log" >&2; return 1
}

start_one() {
  local name=$1
  if alive "$name"; then echo "$name: already running (pid $(cat "$RUN/$name.pid"))"; return 0; fi
  if [ "$name" != worker ] && healthy "$name"; then
    echo "$name: something else already answers on its port; stop it or choose another port" >&2; return 1; fi
  # Its own session (setsid): stopping the stack signals the service, then its whole process group (and those of
  # its descendants that made groups of their own). The log is appended to, so a failed start keeps what the last
  # good one wrote.
  echo "==== $(date -Is) start" >>"$DATA/logs/$name.log"
  # shellcheck disable=SC2046
  setsid nohup $(command_of "$name") >>"$DATA/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
  wait_healthy "$name" 180 || return 1
  echo "$name: started (pid $(cat "$RUN/$name.pid"), log $DATA/logs/$name.log)"
}

write_stack_file() {
  local tmp="$STACK_FILE.tmp"
  cat >"$tmp" <<EOF
{
 "prefect_api_url": "$PREFECT_API_URL",
 "mlflow_tracking_uri": "$MLFLOW_TRACKING_URI",
 "ray_address": "127.0.0.1:$RAY_PORT",
 "ray_dashboard_url": "http://127.0.0.1:$RAY_DASHBOARD_PORT",
 "ray_auth_mode": "$RAY_AUTH_MODE"
}
EOF
  mv "$tmp" "$STACK_FILE"
}

ensure_pool() {
  if prefect_api "work_pools/$WORK_POOL" >/dev/null; then echo "work pool $WORK_POOL: exists"; return 0; fi
  echo "==== $(date -Is) work pool" >>"$DATA/logs/deploy.log"
  "$BIN/prefect" work-pool create "$WORK_POOL" --type process >>"$DATA/logs/deploy.log" 2>&1 \
    || { echo "work pool $WORK_POOL: not created; see $DATA/logs/deploy.log" >&2; return 1; }
  echo "work pool $WORK_POOL (process): created"
}

deploy_flows() {  # worker_was_running: deploy unless the deployments are on the pool and nothing was restarted
  if [ "$1" = yes ] && deployed; then echo "deployments: already on work pool $WORK_POOL"; return 0; fi
  echo "==== $(date -Is) deploy" >>"$DATA/logs/deploy.log"
  "$BIN/effnet" deploy --pool "$WORK_POOL" >>"$DATA/logs/deploy.log" 2>&1 \
    || { echo "deploy failed; see $DATA/logs/deploy.log" >&2; tail -5 "$DATA/logs/deploy.log" >&2; return 1; }
  echo "deployments: $(tail -1 "$DATA/logs/deploy.log")"
}

descendants() {  # pid: every process below it, also those in a session of their own (a worker's flow runs)
  local child
  for child in $(pgrep -P "$1"); do echo "$child"; descendants "$child"; done
}

groups_of() {  # pid: the process groups of it and of its descendants
  local pids
  pids=$({ echo "$1"; descendants "$1"; } | paste -sd,)
  ps -o pgid= -p "$pids" 2>/dev/null | tr -d ' ' | sort -u
}

any_in() {  # process groups: does one of them still have a process?
  local group
  for group in $1; do pgrep -g "$group" >/dev/null && return 0; done
  return 1
}

wait_gone() {  # process groups, seconds: wait until none has a process left
  for _ in $(seq "$2"); do any_in "$1" || return 0; sleep 1; done
  ! any_in "$1"
}

stop_one() {  # name: SIGTERM to the service, then to every process group of it, SIGKILL after 30 s
  local name=$1 pid groups own others group
  [ -f "$RUN/$name.pid" ] || return 0
  pid=$(cat "$RUN/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    groups=$(groups_of "$pid")  # before any signal, while the tree is whole
    own=$pid  # setsid made it the leader of its group
    others=$(echo "$groups" | grep -vx "$own" || true)
    # The service first, so that it stops what it started in its own order (Ray drains its node in seconds;
    # signalled all at once, its driver waits 30 s for a GCS that is already gone). The groups that left its
    # own (a worker's flow runs, in sessions of their own) get theirs now: the worker only stops taking runs.
    kill -TERM "$pid" 2>/dev/null || true
    for group in $others; do kill -TERM -- "-$group" 2>/dev/null || true; done
    # What is left after 10 s gets SIGTERM too (a second one stops a Prefect worker at once), SIGKILL at 30 s.
    if ! wait_gone "$own" 10; then kill -TERM -- "-$own" 2>/dev/null || true; fi
    wait_gone "$groups" 20 || for group in $groups; do
      pgrep -g "$group" >/dev/null && kill -KILL -- "-$group" 2>/dev/null; done
    echo "$name: stopped"
  fi
  rm -f "$RUN/$name.pid"
}

case "${1:-}" in
  start)
    failed() { echo "start failed: run '$0 stop' to clean up" >&2; exit 1; }
    worker_was_running=$(alive worker && echo yes || echo no)
    for name in $SERVICES; do
      # The flows the worker runs read stack.json, and it polls a pool that must exist: both before it starts.
      if [ "$name" = worker ]; then write_stack_file; ensure_pool || failed; fi
      start_one "$name" || failed
    done
    deploy_flows "$worker_was_running" || failed
    echo "Prefect UI http://127.0.0.1:$PREFECT_PORT  MLflow UI http://127.0.0.1:$MLFLOW_PORT  Ray dashboard http://127.0.0.1:$RAY_DASHBOARD_PORT"
    echo "effnet commands with this data directory use the stack ($STACK_FILE); for the prefect CLI:"
    echo "  export PREFECT_API_URL=$PREFECT_API_URL"
    ;;
  stop)
    rm -f "$STACK_FILE"
    for name in $(echo $SERVICES | tr ' ' '\n' | tac); do stop_one "$name"; done
    ;;
  status)
    code=0
    for name in $SERVICES; do
      if alive "$name" && healthy "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"
      elif alive "$name"; then echo "$name: started but not answering (pid $(cat "$RUN/$name.pid"), log $DATA/logs/$name.log)"; code=1
      else echo "$name: stopped"; code=1; fi
    done
    if healthy prefect; then
      if deployed; then echo "deployments: on work pool $WORK_POOL"
      else echo "deployments: not on work pool $WORK_POOL (start deploys them)"; code=1; fi
    fi
    exit $code
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
