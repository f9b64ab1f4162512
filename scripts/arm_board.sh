#!/usr/bin/env bash
# An emulated aarch64 edge board hosting a TVM RPC server on 127.0.0.1.
#
# The board is a Debian arm64 userland (debootstrap) run under qemu-user through proot: binfmt_misc
# is not registered on our machines, so a plain chroot fails with "Exec format error", while
# `proot -q qemu-aarch64-static` needs neither binfmt nor privileges. Run `--help` for usage.
set -euo pipefail

usage() {
  cat <<EOF
Usage: scripts/arm_board.sh COMMAND [OPTIONS]

An emulated aarch64 board (Debian arm64 + Python + TVM's aarch64 wheels, run with qemu-user
through proot) that serves TVM RPC on 127.0.0.1.

Commands:
  start [--port PORT] [--tracker HOST:PORT --key KEY] [--timeout SEC]
          Set the board up on first use (from Debian's and Python's registries; minutes), then
          start 'python -m tvm.exec.rpc_server --host 127.0.0.1 --port PORT' in it and return once
          it accepts sessions (with --tracker: once KEY is registered there). Starting a running
          board with the same options only reports it. PORT defaults to 9095; SEC to 300.
  stop    Kill the board's process group and any process it left behind.
  status  Say whether the board runs, with its port, pid and log; exit 0 if it runs, 3 if not.
  setup   Only set the board up (what start does on first use).
  python DIR [ARGS...]
          Run the board's Python (TVM's aarch64 wheels and numpy; no tvmconv, no compiler) with
          the host folder DIR mounted at /mnt/host as its working directory, e.g. to load an
          exported bundle with tvmconv's runtime alone. Needs a set-up board, not a running one.
  -h, --help  This text.

Environment:
  TVMCONV_BOARD_DIR     cache folder: arm64 root file system, wheels, pid, log, lock
                        (default \$HOME/.cache/tvmconv/arm_board; about 0.8 GB once set up)
  TVMCONV_BOARD_MIRROR  Debian mirror (default: the host's apt Debian URI, else deb.debian.org)
  TVMCONV_BOARD_PYPI    Python package index (default https://pypi.org/simple)
  PYTHON                host Python for downloading wheels and the readiness check (default: the
                        repository's .venv/bin/python when it exists, else python3)

Host packages: qemu-user-static debootstrap proot (and g++-aarch64-linux-gnu to cross-compile
kernels for the board); installed when missing if run as root.
Example: scripts/arm_board.sh start && python scripts/arm_board_check.py --port 9095
EOF
}

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BOARD_DIR=${TVMCONV_BOARD_DIR:-$HOME/.cache/tvmconv/arm_board}
ROOTFS=$BOARD_DIR/rootfs
WHEELS=$BOARD_DIR/wheels
STEPS_DIR=$BOARD_DIR/steps      # one marker file per completed setup step
PID_FILE=$BOARD_DIR/board.pid   # pid of the board's session leader (proot), = its process group
STATE_FILE=$BOARD_DIR/board.state
LOG_FILE=$BOARD_DIR/board.log
SETUP_LOG=$BOARD_DIR/setup.log
LOCK_FILE=$BOARD_DIR/board.lock

SUITE=bookworm                  # python3 3.11: apache-tvm-ffi's wheels cover CPython 3.11-3.13
VENV=/opt/tvm                   # inside the board
TVM_PINS=(apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1)   # ffi 0.1.15 segfaults in TVM
WHEEL_PKGS=("${TVM_PINS[@]}" numpy ml_dtypes typing_extensions psutil cloudpickle tornado)
SETUP_STEPS=(rootfs wheels venv)
# Every process of the board carries this variable: stop finds stragglers by it, status checks
# that the pid in the pid file is still the board's.
BOARD_MARK="TVMCONV_ARM_BOARD_DIR=$BOARD_DIR"

say() { printf 'arm_board: %s\n' "$*"; }
die() { printf 'arm_board: error: %s\n' "$*" >&2; exit 1; }

host_python() {
  if [[ -n ${PYTHON:-} ]]; then
    printf '%s\n' "$PYTHON"
  elif [[ -x $REPO_ROOT/.venv/bin/python ]]; then
    printf '%s\n' "$REPO_ROOT/.venv/bin/python"
  else
    printf 'python3\n'
  fi
}

debian_mirror() {
  if [[ -n ${TVMCONV_BOARD_MIRROR:-} ]]; then
    printf '%s\n' "$TVMCONV_BOARD_MIRROR"
    return
  fi
  local uri
  uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
    grep -v '^[[:space:]]*#' | grep -oE '(https?://[^ ]*/debian)/?( |$)' | head -n 1 | tr -d ' ' || true)
  printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

# --- host packages ----------------------------------------------------------------------------

ensure_host_packages() {
  local missing=() optional=()
  command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v proot >/dev/null || missing+=(proot)
  command -v aarch64-linux-gnu-g++ >/dev/null || optional+=(g++-aarch64-linux-gnu)
  ((${#missing[@]} + ${#optional[@]})) || return 0
  local pkgs=("${missing[@]}" "${optional[@]}")
  if ((EUID == 0)); then
    say "installing host packages: ${pkgs[*]}"
    if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${pkgs[@]}"; } >>"$SETUP_LOG" 2>&1; then
      tail -n 20 "$SETUP_LOG" >&2
      die "apt-get install ${pkgs[*]} failed (log: $SETUP_LOG)"
    fi
  elif ((${#missing[@]})); then
    die "missing host packages; as root run: apt-get update && apt-get install -y ${pkgs[*]}"
  else
    say "note: no aarch64-linux-gnu-g++ to cross-compile for the board; as root run:" \
      "apt-get update && apt-get install -y ${optional[*]}"
  fi
}

# --- running things inside the board ----------------------------------------------------------

# board_argv [PROOT_OPTIONS...]: sets BOARD_ARGV to the command prefix that runs a command in the
# arm64 root, with a clean environment (the host's PIP_* and PYTHON* settings would leak in).
board_argv() {
  BOARD_ARGV=(env -i HOME=/root LANG=C.UTF-8 TERM=dumb PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$BOARD_MARK"
    proot -q "$(command -v qemu-aarch64-static)" -r "$ROOTFS" -w / "$@")
}

board_run() {  # board_run [PROOT_OPTIONS...] -- COMMAND...
  local opts=()
  while [[ $1 != -- ]]; do opts+=("$1"); shift; done
  shift
  board_argv "${opts[@]}"
  "${BOARD_ARGV[@]}" "$@"
}

# --- setup: one marker per step; (re)doing a step drops the markers of the steps after it -----

step_rootfs() {
  # A half-done tree cannot be resumed reliably: start again from an empty folder. As root, debootstrap's
  # second stage mounts proc and sys in the tree for real; one that was killed leaves them mounted, and
  # rm cannot delete a mounted sysfs: unmount what lies under the tree first, deepest first.
  if [[ -d $ROOTFS ]] && ((EUID == 0)); then
    awk -v root="$ROOTFS/" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
  fi
  rm -rf "$ROOTFS"
  mkdir -p "$ROOTFS"
  local mirror fakeroot=()
  mirror=$(debian_mirror)
  if ((EUID != 0)); then
    command -v fakeroot >/dev/null || die "debootstrap's first stage needs root or fakeroot"
    fakeroot=(fakeroot)
  fi
  echo "debootstrap first stage from $mirror"
  "${fakeroot[@]}" debootstrap --arch=arm64 --foreign --variant=minbase \
    --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOTFS" "$mirror"
  echo "debootstrap second stage (emulated)"
  board_run -0 -- /usr/bin/env DEBOOTSTRAP_DIR=/debootstrap /bin/sh /debootstrap/debootstrap --second-stage
  board_run -- /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' >"$BOARD_DIR/python_version"
  echo "board python $(cat "$BOARD_DIR/python_version")"
}

step_wheels() {
  # pip runs on the host (fast) and fetches the aarch64 wheels for the board's Python from PyPI
  # only: the host's pip configuration (local mirrors, find-links) is ignored.
  local py pyver
  py=$(host_python)
  pyver=$(cat "$BOARD_DIR/python_version")
  mkdir -p "$WHEELS"
  env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_NO_INDEX PIP_CONFIG_FILE=/dev/null \
    "$py" -m pip download --index-url "${TVMCONV_BOARD_PYPI:-https://pypi.org/simple}" \
    --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version "$pyver" \
    -d "$WHEELS" "${WHEEL_PKGS[@]}"
}

step_venv() {
  rm -rf "${ROOTFS:?}$VENV"
  board_run -0 -b "$WHEELS:/wheels" -- /usr/bin/python3 -m venv "$VENV"
  board_run -0 -b "$WHEELS:/wheels" -- "$VENV/bin/python" -m pip install --no-index --no-cache-dir \
    --find-links /wheels "${WHEEL_PKGS[@]}"
  local got want="aarch64 0.27.0.post1 0.1.14.post1"
  got=$(board_run -- "$VENV/bin/python" -c \
    'import platform, tvm, tvm_ffi; print(platform.machine(), tvm.__version__, tvm_ffi.__version__)')
  echo "board reports: $got"
  [[ $got == "$want" ]] || { echo "expected: $want"; return 1; }
}

run_step() {
  local name=$1 i later=0
  [[ -e $STEPS_DIR/$name ]] && return 0
  for i in "${SETUP_STEPS[@]}"; do
    [[ $i == "$name" ]] && later=1
    ((later)) && rm -f "$STEPS_DIR/$i"
  done
  say "setup step '$name' (log: $SETUP_LOG)"
  local t0=$SECONDS rc=0
  echo "=== $(date -Is) step $name" >>"$SETUP_LOG"
  # Run asynchronously and wait: a function called on the left of || would run with errexit off.
  ("step_$name") >>"$SETUP_LOG" 2>&1 </dev/null &
  wait $! || rc=$?
  if ((rc)); then
    tail -n 25 "$SETUP_LOG" >&2
    die "setup step '$name' failed (exit $rc); rerun start to retry it (full log: $SETUP_LOG)"
  fi
  touch "$STEPS_DIR/$name"
  say "setup step '$name' done in $((SECONDS - t0)) s"
}

setup_board() {
  mkdir -p "$STEPS_DIR"
  ensure_host_packages
  local step
  for step in "${SETUP_STEPS[@]}"; do run_step "$step"; done
}

# --- process bookkeeping ----------------------------------------------------------------------

is_board_pid() {  # the process exists and carries this board's mark
  [[ -n ${1:-} ]] && grep -qzxF -- "$BOARD_MARK" "/proc/$1/environ" 2>/dev/null
}

running_pid() {  # prints the leader's pid and succeeds when the board runs
  local pid
  [[ -f $PID_FILE ]] || return 1
  pid=$(<"$PID_FILE")
  is_board_pid "$pid" || return 1
  printf '%s\n' "$pid"
}

board_pids() {  # every live process carrying the mark (stragglers included)
  local dir pid
  for dir in /proc/[0-9]*; do
    pid=${dir#/proc/}
    is_board_pid "$pid" && printf '%s\n' "$pid"
  done
  return 0
}

kill_board() {
  local pid=${1:-} left i
  if [[ -n $pid ]]; then
    kill -TERM -- "-$pid" 2>/dev/null || true   # the Python processes; proot ignores SIGTERM
    sleep 1
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  for i in 1 2 3 4 5 6 7 8 9 10; do
    left=$(board_pids)
    [[ -z $left ]] && break
    # shellcheck disable=SC2086  # one pid per word
    kill -KILL $left 2>/dev/null || true
    sleep 0.5
  done
  rm -f "$PID_FILE" "$STATE_FILE"
  [[ -z $left ]] || die "processes still alive after SIGKILL: $left"
}

listening() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }  # HOST PORT: something listens there

# Polls until the server accepts a session (or, with a tracker, until its key and port are
# registered there). Exit 0: ready; 1: timed out; 2: the board died; 4: no TVM in this Python.
READY_PROBE='
import logging, socket, sys, time
port, pid, deadline, tracker, key = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
try:
    from tvm import rpc
except ImportError:
    sys.exit(4)
logging.disable(logging.WARNING)  # TVM logs every failed attempt
last = "no attempt yet"
while True:
    try:
        with open("/proc/%d/stat" % pid) as stat:
            alive = stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        alive = False
    if not alive:
        print("the board process exited")
        sys.exit(2)
    try:
        if tracker:
            host, tport = tracker.rsplit(":", 1)
            socket.create_connection((host, int(tport)), timeout=5).close()  # connect_tracker retries 60 s
            info = rpc.connect_tracker(host, int(tport)).summary()
            mine = [s for s in info["server_info"] if s.get("key") == "server:" + key and s["addr"][1] == port]
            if mine and key in info["queue_info"]:
                sys.exit(0)
            last = "key %r on port %d not registered yet: %s" % (key, port, info)
        else:
            session = rpc.connect("127.0.0.1", port, session_timeout=60)
            if session.cpu().exist:  # a round trip to the board
                sys.exit(0)
            last = "the board reports no CPU device"
    except Exception as err:
        last = "%s: %s" % (type(err).__name__, err)
    if time.time() > deadline:
        print("last check: " + last.strip().splitlines()[-1][:400])
        sys.exit(1)
    time.sleep(2)
'

wait_ready() {
  local pid=$1 port=$2 deadline=$(($(date +%s) + $3)) tracker=$4 key=$5 rc=0 py
  py=$(host_python)
  "$py" -c "$READY_PROBE" "$port" "$pid" "$deadline" "$tracker" "$key" || rc=$?
  if ((rc == 4)); then
    say "host Python $py has no TVM: checking from inside the board (slower)"
    rc=0
    board_run -b /proc -- "$VENV/bin/python" -c "$READY_PROBE" "$port" "$pid" "$deadline" "$tracker" "$key" || rc=$?
  fi
  return "$rc"
}

# --- commands ---------------------------------------------------------------------------------

take_lock() {
  mkdir -p "$BOARD_DIR"
  exec 9>"$LOCK_FILE"
  if ! flock -n 9; then
    say "another arm_board.sh holds $LOCK_FILE; waiting for it"
    flock 9
  fi
}

read_state() {  # sets RUN_PORT, RUN_TRACKER, RUN_KEY: the options the running board was started with
  # shellcheck source=/dev/null
  source "$STATE_FILE"
}

describe() {  # PID PORT TRACKER KEY
  printf 'pid %s, port %s%s, log %s' "$1" "$2" "${3:+, tracker $3 key $4}" "$LOG_FILE"
}

cmd_status() {
  local pid
  if pid=$(running_pid); then
    read_state
    say "running: $(describe "$pid" "$RUN_PORT" "$RUN_TRACKER" "$RUN_KEY")"
    return 0
  fi
  say "not running (log: $LOG_FILE)"
  return 3
}

cmd_start() {
  local port=9095 tracker="" key="" timeout=300
  while (($#)); do
    case $1 in
      --port) port=${2:?--port needs a value}; shift 2 ;;
      --tracker) tracker=${2:?--tracker needs HOST:PORT}; shift 2 ;;
      --key) key=${2:?--key needs a value}; shift 2 ;;
      --timeout) timeout=${2:?--timeout needs seconds}; shift 2 ;;
      -h | --help) usage; exit 0 ;;
      *) die "start: unknown option '$1' (see --help)" ;;
    esac
  done
  if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65534)); then
    die "--port must be 1..65534, got '$port'"
  fi
  [[ $timeout =~ ^[0-9]+$ ]] || die "--timeout must be whole seconds, got '$timeout'"
  if [[ -n $tracker || -n $key ]]; then
    [[ -n $tracker ]] || die "--key needs --tracker HOST:PORT"
    [[ $tracker =~ ^[^:]+:[0-9]+$ ]] || die "--tracker must be HOST:PORT, got '$tracker'"
    [[ -n $key ]] || die "--tracker needs --key KEY"
  fi

  take_lock
  local pid
  if pid=$(running_pid); then
    read_state
    if [[ $RUN_PORT != "$port" || $RUN_TRACKER != "$tracker" || $RUN_KEY != "$key" ]]; then
      die "already running with other options ($(describe "$pid" "$RUN_PORT" "$RUN_TRACKER" "$RUN_KEY")); stop it first"
    fi
    say "already running: $(describe "$pid" "$port" "$tracker" "$key")"
    return 0
  fi
  kill_board ""  # stragglers of a board that died or was killed without stop
  setup_board
  listening 127.0.0.1 "$port" && die "port $port on 127.0.0.1 is taken by another process"
  [[ -z $tracker ]] || listening "${tracker%:*}" "${tracker##*:}" ||
    die "no tracker listening at $tracker (start one: python -m tvm.exec.rpc_tracker --host ${tracker%:*} --port ${tracker##*:})"

  local args=(--host 127.0.0.1 --port "$port" --port-end "$((port + 1))")
  [[ -n $tracker ]] && args+=(--tracker "$tracker" --key "$key")
  echo "=== $(date -Is) start: rpc_server ${args[*]}" >>"$LOG_FILE"
  local log_start
  log_start=$(wc -l <"$LOG_FILE")
  local t0=$SECONDS
  # setsid: the board gets its own session and process group, which stop kills as a whole.
  # 9>&-: the server must not inherit the lock.
  board_argv -b /dev -b /proc -b /sys
  setsid "${BOARD_ARGV[@]}" "$VENV/bin/python" -m tvm.exec.rpc_server "${args[@]}" \
    </dev/null >>"$LOG_FILE" 2>&1 9>&- &
  pid=$!
  echo "$pid" >"$PID_FILE"
  printf 'RUN_PORT=%q\nRUN_TRACKER=%q\nRUN_KEY=%q\n' "$port" "$tracker" "$key" >"$STATE_FILE"
  say "board starting (pid $pid), waiting up to $timeout s for ${tracker:+key $key at tracker $tracker via }port $port"

  local rc=0
  wait_ready "$pid" "$port" "$timeout" "$tracker" "$key" || rc=$?
  if ((rc)); then
    echo "--- $LOG_FILE since this start:" >&2
    sed -n "$log_start,\$p" "$LOG_FILE" | tail -n 30 >&2
    kill_board "$pid"
    case $rc in
      2) die "the board exited before accepting sessions" ;;
      1) die "the board did not accept sessions within $timeout s" ;;
      *) die "readiness check failed (exit $rc)" ;;
    esac
  fi
  say "ready in $((SECONDS - t0)) s: $(describe "$pid" "$port" "$tracker" "$key")"
}

cmd_python() {
  (($#)) || die "python needs a host folder"
  local dir
  dir=$(cd "$1" 2>/dev/null && pwd) || die "no folder '$1'"
  shift
  [[ -x $ROOTFS$VENV/bin/python ]] || die "the board is not set up: run scripts/arm_board.sh setup"
  board_run -b "$dir:/mnt/host" -b /dev -b /proc -w /mnt/host -- "$VENV/bin/python" "$@"
}

cmd_stop() {
  take_lock
  local pid
  if pid=$(running_pid); then
    kill_board "$pid"
    say "stopped (pid $pid)"
  else
    kill_board ""
    say "not running"
  fi
}

main() {
  local cmd=${1:-}
  (($#)) && shift
  case $cmd in
    start) cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status || exit $? ;;
    setup) take_lock; setup_board ;;
    python) cmd_python "$@" ;;
    -h | --help | help) usage ;;
    "") usage >&2; exit 2 ;;
    *) usage >&2; die "unknown command '$cmd'" ;;
  esac
}

main "$@"
