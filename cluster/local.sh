#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: a head node and worker node(s), each its own `ray start`
# (its own raylet, object store and resources), so Ray Train workers and Serve replicas really spread across
# nodes. The Jobs API and dashboard are on http://127.0.0.1:8265 (token authentication on).
#
#   cluster/local.sh up        start it (fails if it is already up)
#   cluster/local.sh status    show its nodes and resources
#   cluster/local.sh down      stop it; no Ray process of this cluster is left behind
#
# Then: .venv/bin/gan-ray submit --address http://127.0.0.1:8265 --wait -- train --workers 2 --epochs 5 \
#           --storage /tmp/gan-ray-runs
#
# Settings (environment variables; defaults in brackets):
#   GAN_RAY_HEAD_CPUS [1]          logical CPUs of the head node
#   GAN_RAY_WORKER_NODES [1]       number of worker nodes
#   GAN_RAY_WORKER_CPUS [1]        logical CPUs of each worker node. With the defaults the cluster holds exactly
#                                  two 1-CPU Train workers, one per node, so `--workers 2` spans both nodes.
#   GAN_RAY_WORKER_RESOURCES ['{"worker_node": 1}']  custom resources of each worker node (JSON)
#   GAN_RAY_GCS_PORT [6379]  GAN_RAY_DASHBOARD_PORT [8265]  GAN_RAY_CLIENT_PORT [10001] (Ray Client; keep it
#                                  outside 10002-19999, the range Ray's worker processes pick ports from)
#   GAN_RAY_AGENT_PORT [52365]     dashboard agent HTTP port of the head; worker node i uses +i
#   GAN_RAY_TEMP_DIR [/tmp/gan-ray-local-$GAN_RAY_GCS_PORT]   session files and logs of this cluster only: the
#                                  head's directly in it, worker node i's in its own worker-i/ below it
#
# `down` stops exactly this cluster's processes (those whose command line names its temp dir, and all their
# descendants), never other Ray clusters on the machine, which is why it does not call `ray stop` (that stops
# every Ray on the machine). Ray's own CLI (`ray job ...`, `ray status`) needs RAY_AUTH_MODE=token to send the
# token; gan-ray submit always sends it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GAN_RAY_VENV:-$ROOT/.venv}"
RAY="$VENV/bin/ray"
PY="$VENV/bin/python"

HEAD_CPUS="${GAN_RAY_HEAD_CPUS:-1}"
WORKER_NODES="${GAN_RAY_WORKER_NODES:-1}"
WORKER_CPUS="${GAN_RAY_WORKER_CPUS:-1}"
DEFAULT_WORKER_RESOURCES='{"worker_node": 1}'
WORKER_RESOURCES="${GAN_RAY_WORKER_RESOURCES:-$DEFAULT_WORKER_RESOURCES}"
GCS_PORT="${GAN_RAY_GCS_PORT:-6379}"
DASHBOARD_PORT="${GAN_RAY_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${GAN_RAY_CLIENT_PORT:-10001}"
AGENT_PORT="${GAN_RAY_AGENT_PORT:-52365}"
TEMP_DIR="${GAN_RAY_TEMP_DIR:-/tmp/gan-ray-local-$GCS_PORT}"
LOG="$TEMP_DIR/local-cluster.log"

# The venv's bin first: the job entrypoint (`python -m gan_ray.cli ...`) and Ray's workers use its python.
export PATH="$VENV/bin:$PATH"
# Token authentication, explicitly: `ray start` enables it only when a token file exists, and a worker node
# joining a token-auth head must be told. The token lives in ~/.ray/auth_token (created if missing), where
# `gan-ray submit` and Ray's own CLI find it.
export RAY_AUTH_MODE=token
unset RAY_ADDRESS

die() { echo "local.sh: $*" >&2; exit 1; }

cluster_pids() {
  # This cluster's processes: those whose command line names its temp dir (gcs_server, raylets, dashboard,
  # monitors) or its Ray Client port, plus all their descendants (workers, agents, job drivers, dashboard
  # modules: these rename themselves, e.g. ray::IDLE, so their command lines no longer say whose they are).
  "$PY" - "$TEMP_DIR" "$CLIENT_PORT" "$$" <<'EOF'
import os, sys
temp_dir, client_port, me = sys.argv[1], sys.argv[2], int(sys.argv[3])
children, roots = {}, set()
for name in os.listdir("/proc"):
    if not name.isdigit():
        continue
    pid = int(name)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        continue
    children.setdefault(ppid, []).append(pid)
    if pid in (me, os.getpid()) or "local.sh" in cmd:
        continue
    if temp_dir + "/" in cmd or temp_dir + " " in cmd or cmd.endswith(temp_dir) or \
            ("ray.util.client.server" in cmd and f"--port={client_port} " in cmd + " "):
        roots.add(pid)
found, stack = set(), list(roots)
while stack:
    pid = stack.pop()
    if pid not in found and pid != me:
        found.add(pid)
        stack.extend(children.get(pid, []))
print(" ".join(map(str, sorted(found))))
EOF
}

port_busy() { "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)
sys.exit(1)
EOF
}

wait_for_nodes() {
  # Until the head sees every node alive (the state API authenticates with the token).
  local want=$(( WORKER_NODES + 1 ))
  "$PY" - "$DASHBOARD_PORT" "$want" <<'EOF'
import sys, time
from ray.util.state import list_nodes
port, want = sys.argv[1], int(sys.argv[2])
deadline, alive = time.time() + 120, 0
while time.time() < deadline:
    try:
        alive = sum(n.state == "ALIVE" for n in list_nodes(address=f"http://127.0.0.1:{port}"))
    except Exception:
        alive = 0
    if alive >= want:
        sys.exit(0)
    time.sleep(1)
sys.exit(f"only {alive} of {want} nodes came up within 120 s")
EOF
}

start_nodes() {
  # One attempt at starting the head and the worker nodes; returns non-zero (and leaves cleanup to the caller)
  # on failure.
  # Each node its own temp dir, as on separate machines: nodes sharing one unpack each job's working_dir into
  # the same runtime_resources directory, and one node's agent replaced it under the job driver running on the
  # other (the first job after `up` died with its own modules missing: FileNotFoundError / ModuleNotFoundError).
  echo "starting head node (${HEAD_CPUS} CPU, GCS :$GCS_PORT, dashboard http://127.0.0.1:$DASHBOARD_PORT)"
  "$RAY" start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" --num-cpus "$HEAD_CPUS" --num-gpus 0 \
      --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
      --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$AGENT_PORT" \
      --temp-dir "$TEMP_DIR" --disable-usage-stats >>"$LOG" 2>&1 || { echo "head node failed to start" >&2; return 1; }
  local i
  for i in $(seq 1 "$WORKER_NODES"); do
    echo "starting worker node $i (${WORKER_CPUS} CPU, resources $WORKER_RESOURCES)"
    "$RAY" start --address "127.0.0.1:$GCS_PORT" --node-ip-address 127.0.0.1 --num-cpus "$WORKER_CPUS" \
        --num-gpus 0 --resources "$WORKER_RESOURCES" --dashboard-agent-listen-port $(( AGENT_PORT + i )) \
        --temp-dir "$TEMP_DIR/worker-$i" --disable-usage-stats >>"$LOG" 2>&1 || { echo "worker node $i failed to start" >&2; return 1; }
  done
  wait_for_nodes
}

cmd_up() {
  [ -x "$RAY" ] || die "no Ray in $VENV: run 'make venv' first"
  if [ -n "$(cluster_pids)" ]; then die "a local cluster is already running in $TEMP_DIR (cluster/local.sh down)"; fi
  for port in "$GCS_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT" $(seq "$AGENT_PORT" $(( AGENT_PORT + WORKER_NODES ))); do
    if port_busy "$port"; then die "port $port is in use (another Ray cluster?); set GAN_RAY_*_PORT"; fi
  done
  mkdir -p "$TEMP_DIR"
  : > "$LOG"
  "$RAY" get-auth-token --generate > /dev/null 2>>"$LOG" || die "cannot create the auth token (see $LOG)"
  # Ray gives a raylet 30 s to register; a heavily loaded machine can miss that, so a failed start is cleaned
  # up and tried again (GAN_RAY_START_ATTEMPTS, default 3).
  local attempt attempts="${GAN_RAY_START_ATTEMPTS:-3}"
  for attempt in $(seq 1 "$attempts"); do
    if start_nodes; then
      cat <<EOF
Ray cluster up: 1 head + $WORKER_NODES worker node(s); Jobs API and dashboard: http://127.0.0.1:$DASHBOARD_PORT
  submit: $VENV/bin/gan-ray submit --address http://127.0.0.1:$DASHBOARD_PORT --wait -- train --workers 2 --storage /tmp/gan-ray-runs
  stop:   cluster/local.sh down
EOF
      return 0
    fi
    tail -n 5 "$LOG" >&2
    cmd_down > /dev/null 2>&1 || true
    [ "$attempt" -lt "$attempts" ] && echo "retrying ($((attempt + 1))/$attempts)" >&2
  done
  die "the cluster did not come up after $attempts attempts (log: $LOG)"
}

cmd_status() {
  [ -n "$(cluster_pids)" ] || { echo "no local cluster running in $TEMP_DIR"; return 1; }
  "$RAY" status --address "127.0.0.1:$GCS_PORT"
}

cmd_down() {
  local pids
  pids="$(cluster_pids)"
  if [ -z "$pids" ]; then echo "no local cluster running in $TEMP_DIR"; return 0; fi
  echo "stopping the local cluster ($(echo $pids | wc -w) processes)"
  kill -TERM $pids 2>/dev/null || true
  local _
  for _ in $(seq 1 25); do   # up to 5 s for a clean exit
    pids="$(cluster_pids)"
    [ -z "$pids" ] && break
    sleep 0.2
  done
  if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null || true; sleep 0.5; fi
  pids="$(cluster_pids)"
  [ -z "$pids" ] || { echo "local.sh: processes still running: $pids" >&2; return 1; }
  echo "local cluster stopped; no Ray process of it is left"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: cluster/local.sh up|status|down" >&2; exit 2 ;;
esac
