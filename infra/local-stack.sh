#!/usr/bin/env bash
# Start (or stop) the local stack as long-lived services, all state under the data directory, every listener on
# 127.0.0.1: a Prefect server, an MLflow tracking + registry server, a Ray head node with its dashboard, and a
# process that serves the deployments (train-family/b0-b7, ...) so `prefect deployment run` and the nightly
# schedule work. `start` writes the stack's addresses to $DATA/stack.json, which every `effnet` command reads;
# `stop` removes it, after which the same data directory works without the stack (same stores, same files).
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
SERVICES="prefect mlflow ray serve"  # start order; stop goes the other way
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

alive() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

healthy() {  # name: does the service answer, not only exist?
  case $1 in
    prefect) curl -sf "http://127.0.0.1:$PREFECT_PORT/api/health" >/dev/null 2>&1 ;;
    mlflow) curl -sf "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1 ;;
    ray) "$BIN/ray" status --address "127.0.0.1:$RAY_PORT" >/dev/null 2>&1 ;;
    # Serving = its deployments are registered with the server (train-family/demo stands for them all).
    serve) alive serve && curl -sf "$PREFECT_API_URL/deployments/name/train-family/demo" >/dev/null 2>&1 ;;
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
    ray) echo "$BIN/ray" start --head --block --port "$RAY_PORT" --include-dashboard=true \
      --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT" --ray-client-server-port "$RAY_CLIENT_PORT" \
      --dashboard-agent-listen-port "$RAY_AGENT_PORT" --disable-usage-stats ;;
    serve) echo "$BIN/effnet" serve ;;
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
  if [ "$name" != serve ] && healthy "$name"; then
    echo "$name: something else already answers on its port; stop it or choose another port" >&2; return 1; fi
  # Its own session (setsid): stopping the stack signals the service's whole process group. The log is appended
  # to, so a failed start keeps what the last good one wrote.
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

stop_one() {  # name: SIGTERM to its process group, SIGKILL after 30 s
  local name=$1 pid
  [ -f "$RUN/$name.pid" ] || return 0
  pid=$(cat "$RUN/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 30); do pgrep -g "$pid" >/dev/null || break; sleep 1; done
    pgrep -g "$pid" >/dev/null && kill -KILL -- "-$pid" 2>/dev/null || true
    echo "$name: stopped"
  fi
  rm -f "$RUN/$name.pid"
}

case "${1:-}" in
  start)
    for name in $SERVICES; do
      # The deployments' flows read stack.json: write it before the serve process starts.
      [ "$name" = serve ] && write_stack_file
      start_one "$name" || { echo "start failed: run '$0 stop' to clean up" >&2; exit 1; }
    done
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
    exit $code
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
