#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, with its S3 store and MLflow server, for tests and demos.
#
#   cluster/local/multinode.sh up            # as root; prints the addresses
#   cluster/local/multinode.sh submit -- python pipelines/train.py --config demo ...
#   cluster/local/multinode.sh exec python -c '...'     # a command that sees the cluster's env
#   cluster/local/multinode.sh status | node-pids w1 | kill-node w1 | start-node w1
#   cluster/local/multinode.sh down          # stops every process it started, by PID
#
# Every Ray node lives in its own network namespace with its own address, on a bridge inside the head's
# namespace (head 10.203.0.1, worker i 10.203.0.(1+i)); Ray binds those addresses, and nothing outside the
# namespaces can reach them. The S3 server (moto) and MLflow run in the head's namespace. Needs root and
# `ip netns`. (Two Ray nodes on 127.0.0.1 are not an option: the variable that keeps Ray on loopback,
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, also makes `ray start --address` refuse to join.) Everything is
# torn down by PID, never with `ray stop` (which would stop every Ray on the machine).
#
# Settings (environment): DNM_MN_DIR state dir (short: Ray's socket paths must stay under 107 chars),
# DNM_MN_PREFIX namespace prefix, DNM_MN_NET first three octets,
# DNM_MN_WORKERS worker nodes, DNM_MN_CPUS logical CPUs per node, DNM_MN_BUCKET.
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${DNM_PYTHON:-$REPO/.venv/bin/python}
BIN=$(dirname "$PY")
STATE=${DNM_MN_DIR:-/tmp/dnm-mn}
PREFIX=${DNM_MN_PREFIX:-dnm}
NET=${DNM_MN_NET:-10.203.0}
WORKERS=${DNM_MN_WORKERS:-1}
CPUS=${DNM_MN_CPUS:-1}
BUCKET=${DNM_MN_BUCKET:-dinomaly}
READY_TIMEOUT_S=${DNM_MN_TIMEOUT_S:-120}

die() { echo "multinode: $*" >&2; exit 1; }
log() { echo "multinode: $*" >&2; }

# --------------------------------------------------------------------------- addresses and environment

check_netns() {
  [[ $(id -u) == 0 ]] || die "needs root: every Ray node gets its own network namespace (ip netns)"
  ip netns list >/dev/null 2>&1 || die "'ip netns' does not work here (iproute2 and CAP_SYS_ADMIN needed)"
}

# Writes $STATE/env: everything later commands (and the tests) need to find the cluster.
write_env() {
  cat >"$STATE/env" <<EOF
PREFIX=$PREFIX
NET=$NET
WORKERS=$WORKERS
HEAD_IP=$NET.1
GCS_ADDRESS=$NET.1:6379
DASHBOARD_URL=http://$NET.1:8265
S3_ENDPOINT=http://$NET.1:9000
MLFLOW_URI=http://$NET.1:5000
BUCKET=$BUCKET
EOF
}

load_env() {
  [[ -f $STATE/env ]] || die "no cluster state in $STATE (run: $0 up)"
  # shellcheck disable=SC1091
  source "$STATE/env"
}

node_ip() {  # head | w<i>
  if [[ $1 == head ]]; then echo "$NET.1"; else echo "$NET.$((1 + ${1#w}))"; fi
}

ns_of() { echo "$PREFIX-$1"; }

# Runs "$@" on node $1, inside its namespace, with the cluster's environment.
on_node() {
  local node=$1; shift
  local -a vars=(
    PATH="$BIN:$PATH" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
    RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5 RAY_TRAIN_ENABLE_PRINT_PATCH=0
    AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
    AWS_ENDPOINT_URL="$S3_ENDPOINT" MLFLOW_S3_ENDPOINT_URL="$S3_ENDPOINT" MLFLOW_TRACKING_URI="$MLFLOW_URI"
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false RAY_ADDRESS="$GCS_ADDRESS" RAY_API_SERVER_ADDRESS="$DASHBOARD_URL"
    DNM_DASHBOARD_URL="$DASHBOARD_URL" DNM_MN_DIR="$STATE")
  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 would force 127.0.0.1; here each node has its own address.
  # gloo finds its address from the hostname (loopback here) unless told the interface.
  ip netns exec "$(ns_of "$node")" env -u RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER GLOO_SOCKET_IFNAME=eth0 \
    "${vars[@]}" "$@"
}

wait_for() {  # description, command...: poll until the command succeeds or the timeout passes
  local what=$1; shift
  local deadline=$((SECONDS + READY_TIMEOUT_S))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what not ready after ${READY_TIMEOUT_S}s (logs: $STATE/logs)"
    sleep 0.5
  done
}

# --------------------------------------------------------------------------- network namespaces

make_namespaces() {
  local head_ns i ns
  head_ns=$(ns_of head)
  ip netns add "$head_ns"
  ip -n "$head_ns" link set lo up
  # the bridge is called eth0 like the workers' interfaces, so one GLOO_SOCKET_IFNAME fits every node
  ip -n "$head_ns" link add eth0 type bridge
  ip -n "$head_ns" addr add "$NET.1/24" dev eth0
  ip -n "$head_ns" link set eth0 up
  # a default route only so that Ray's "which address do I reach the world from" probe finds the node's
  # own address; the namespaces have no link to the host, so nothing can leave them
  ip -n "$head_ns" route add default dev eth0
  for ((i = 1; i <= WORKERS; i++)); do
    ns=$(ns_of "w$i")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # both veth ends are created inside namespaces: nothing is added to the host's network
    ip -n "$head_ns" link add "w$i" type veth peer name eth0 netns "$ns"
    ip -n "$head_ns" link set "w$i" master eth0 up
    ip -n "$ns" addr add "$(node_ip "w$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$NET.1"
  done
}

delete_namespaces() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-(head|w[0-9]+)$" || true); do
    ip netns delete "$ns"
  done
}

# --------------------------------------------------------------------------- services

start_s3() {  # in the background; wait_s3 waits for it
  local port=${S3_ENDPOINT##*:}
  on_node head "$PY" -m moto.server -H "$HEAD_IP" -p "$port" >"$STATE/logs/s3.log" 2>&1 &
}

wait_s3() {
  wait_for "S3 server at $S3_ENDPOINT" on_node head "$PY" -c \
    "import urllib.request as u; u.urlopen('$S3_ENDPOINT/moto-api/data.json', timeout=1)"
  on_node head "$PY" -c "import boto3; boto3.client('s3').create_bucket(Bucket='$BUCKET')"
}

start_mlflow() {  # in the background; wait_mlflow waits for it
  local port=${MLFLOW_URI##*:}
  # job execution off: with it on, SIGTERM leaves orphaned huey_consumer processes (MLflow 3 job workers)
  on_node head "$BIN/mlflow" server --host "$HEAD_IP" --port "$port" --workers 1 \
    --backend-store-uri "sqlite:///$STATE/mlflow.db" --artifacts-destination "s3://$BUCKET/mlartifacts" \
    >"$STATE/logs/mlflow.log" 2>&1 &
}

wait_mlflow() {
  wait_for "MLflow server at $MLFLOW_URI" on_node head "$PY" -c \
    "import urllib.request as u; assert u.urlopen('$MLFLOW_URI/health', timeout=1).read() == b'OK'"
}

# ray start flags of a node (into the array FLAGS): its address, CPUs, temp dir and a node_<name> resource.
node_flags() {
  local node=$1
  FLAGS=(--node-ip-address "$(node_ip "$node")" --num-cpus "$CPUS" --object-store-memory 268435456
    --temp-dir "$STATE/$node" --disable-usage-stats --resources "{\"node_$node\": 1}")
}

start_head() {
  local gcs_port=${GCS_ADDRESS##*:} dash_port=${DASHBOARD_URL##*:}
  # fast node-death detection (default 5 x 3 s) so a killed node is noticed in ~2 s
  node_flags head
  on_node head env RAY_health_check_period_ms=500 RAY_health_check_failure_threshold=4 \
    "$BIN/ray" start --head --port "$gcs_port" --dashboard-host "$HEAD_IP" --dashboard-port "$dash_port" \
    "${FLAGS[@]}" >"$STATE/logs/ray-head.log" 2>&1 || die "ray start --head failed: $(tail -n 5 "$STATE/logs/ray-head.log")"
}

start_worker() {
  local node=$1
  node_flags "$node"
  on_node "$node" "$BIN/ray" start --address "$GCS_ADDRESS" "${FLAGS[@]}" \
    >"$STATE/logs/ray-$node.log" 2>&1 || die "ray start of $node failed: $(tail -n 5 "$STATE/logs/ray-$node.log")"
  wait_node "$node"
}

wait_node() {  # until the node is registered and alive in the GCS (one driver, polling inside)
  on_node head "$PY" - "$1" "$READY_TIMEOUT_S" <<'EOF' || die "Ray node $1 did not join (logs: $STATE/logs)"
import sys, time, ray
ray.init(logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[2])
while not any(n["Alive"] and n["Resources"].get(f"node_{sys.argv[1]}") for n in ray.nodes()):
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.5)
EOF
}

# --------------------------------------------------------------------------- processes, by PID

node_pids() {  # every process of one Ray node: all processes in its namespace (the head's: services too)
  ip netns pids "$(ns_of "$1")" 2>/dev/null || true
}

kill_pids() {  # signal, pids...
  local sig=$1; shift
  (($#)) && kill "-$sig" "$@" 2>/dev/null || true
}

kill_node() {  # SIGKILL every process of the node (a crash, not a shutdown); returns once they are gone
  local node=$1 deadline
  # shellcheck disable=SC2046
  kill_pids KILL $(node_pids "$node")
  deadline=$((SECONDS + 15))
  while [[ -n $(node_pids "$node") ]]; do
    ((SECONDS < deadline)) || die "node $node still has processes: $(node_pids "$node" | tr '\n' ' ')"
    sleep 0.2
  done
}

stop_node() {  # TERM, wait, then KILL whatever is left
  local node=$1 deadline pids
  # shellcheck disable=SC2046
  kill_pids TERM $(node_pids "$node")
  deadline=$((SECONDS + 8))
  while [[ -n $(node_pids "$node") ]] && ((SECONDS < deadline)); do sleep 0.3; done
  # shellcheck disable=SC2046
  kill_pids KILL $(node_pids "$node")
}

# --------------------------------------------------------------------------- commands

cmd_up() {
  [[ -f $STATE/env ]] && die "a cluster is already up in $STATE (run: $0 down)"
  check_netns
  mkdir -p "$STATE/logs"
  write_env
  load_env
  "$PY" -c "import secrets; print(secrets.token_hex(32))" >"$STATE/auth_token"
  chmod 600 "$STATE/auth_token"
  trap '[[ ${UP_DONE:-} == 1 ]] || { log "up failed; tearing down"; cmd_down; }' EXIT
  make_namespaces
  start_s3
  start_mlflow  # both start while Ray does: the three take ~15-25 s each on a busy 2-core box
  start_head
  for ((i = 1; i <= WORKERS; i++)); do start_worker "w$i"; done
  wait_s3
  wait_mlflow
  UP_DONE=1
  log "up: head $HEAD_IP + $WORKERS worker node(s); S3 $S3_ENDPOINT bucket $BUCKET; MLflow $MLFLOW_URI"
  log "dashboard $DASHBOARD_URL; state and logs in $STATE"
}

cmd_down() {
  [[ -f $STATE/env ]] || { log "nothing to stop in $STATE"; return 0; }
  load_env
  local i
  for ((i = WORKERS; i >= 1; i--)); do stop_node "w$i"; done
  stop_node head
  delete_namespaces
  rm -f "$STATE/env"
  log "down: every process stopped; logs kept in $STATE/logs"
}

cmd_status() {
  load_env
  local node i
  echo "head=$HEAD_IP s3=$S3_ENDPOINT mlflow=$MLFLOW_URI dashboard=$DASHBOARD_URL"
  for node in head $(for ((i = 1; i <= WORKERS; i++)); do echo "w$i"; done); do
    echo "$node ip=$(node_ip "$node") pids=$(node_pids "$node" | wc -l)"
  done
  on_node head "$BIN/ray" status --address "$GCS_ADDRESS"
}

# ray job submit from inside the head's namespace; the job's runtime_env carries the storage/MLflow env.
cmd_submit() {
  load_env
  local runtime_env
  runtime_env=$("$PY" - "$S3_ENDPOINT" "$MLFLOW_URI" <<'EOF'
import json, sys
env = {"AWS_ENDPOINT_URL": sys.argv[1], "MLFLOW_S3_ENDPOINT_URL": sys.argv[1], "MLFLOW_TRACKING_URI": sys.argv[2],
       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "OMP_NUM_THREADS": "1"}
print(json.dumps({"env_vars": env}))
EOF
)
  [[ " $* " == *" -- "* ]] || die "usage: $0 submit [ray job submit options] -- ENTRYPOINT..."
  cd "$REPO"
  on_node head "$BIN/ray" job submit --address "$DASHBOARD_URL" --working-dir "$REPO" \
    --runtime-env-json "$runtime_env" "$@"
}

main() {
  local cmd=${1:-}
  shift || true
  case $cmd in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    submit) cmd_submit "$@" ;;
    exec) load_env; on_node head "$@" ;;
    env) load_env; cat "$STATE/env" ;;
    node-pids) load_env; node_pids "${1:?node name, e.g. w1}" ;;
    kill-node) load_env; kill_node "${1:?node name, e.g. w1}" ;;
    stop-node) load_env; stop_node "${1:?node name, e.g. w1}" ;;
    start-node) load_env; start_worker "${1:?node name, e.g. w1}" ;;
    *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; [[ -z $cmd || $cmd == help || $cmd == -h ]] || exit 2 ;;
  esac
}

main "$@"
