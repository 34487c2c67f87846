#!/usr/bin/env bash
# Local single-node Kafka (KRaft, combined broker+controller) for development
# and integration tests. Built from the Maven Central jars so that it needs
# nothing but Java and Maven: no container runtime, no distribution tarball.
#
#   scripts/kafka.sh start|stop|status|fetch
#
# Environment:
#   KAFKA_LOCAL_DIR        cache/state directory      (default: <repo>/.kafka)
#   KAFKA_PORT             client listener port        (default: 9092)
#   KAFKA_CONTROLLER_PORT  KRaft controller port       (default: 9093)
#   KAFKA_START_TIMEOUT    seconds to wait for ready   (default: 60)
#   KAFKA_STOP_TIMEOUT     seconds before SIGKILL      (default: 30)
#   PYTHON                 interpreter with confluent_kafka, used for the
#                          readiness probe             (default: <repo>/.venv/bin/python)
#
# Exit status of `status`: 0 running and answering, 3 otherwise.
set -euo pipefail

readonly KAFKA_VERSION=4.1.1
readonly HOST=127.0.0.1

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
readonly SCRIPT_DIR REPO_DIR

KAFKA_DIR=${KAFKA_LOCAL_DIR:-$REPO_DIR/.kafka}
PORT=${KAFKA_PORT:-9092}
CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
PYTHON=${PYTHON:-$REPO_DIR/.venv/bin/python}
START_TIMEOUT=${KAFKA_START_TIMEOUT:-60}
STOP_TIMEOUT=${KAFKA_STOP_TIMEOUT:-30}

for pair in KAFKA_PORT=PORT KAFKA_CONTROLLER_PORT=CONTROLLER_PORT \
        KAFKA_START_TIMEOUT=START_TIMEOUT KAFKA_STOP_TIMEOUT=STOP_TIMEOUT; do
    var=${pair#*=}
    [[ ${!var} =~ ^[0-9]+$ ]] \
        || { printf 'kafka: error: %s must be a whole number, got %q\n' "${pair%%=*}" "${!var}" >&2; exit 2; }
done

LIBS=$KAFKA_DIR/libs
DATA=$KAFKA_DIR/data
LOGS=$KAFKA_DIR/logs
PROPS=$KAFKA_DIR/server.properties
PIDFILE=$KAFKA_DIR/kafka.pid
# Written only after Maven has copied every jar, so an interrupted download is
# retried instead of leaving a half classpath that fails in confusing ways.
MARKER=$LIBS/.fetched-$KAFKA_VERSION
LOG4J_CONFIG=$SCRIPT_DIR/kafka/log4j2.properties
POM=$SCRIPT_DIR/kafka/pom.xml

say() { printf 'kafka: %s\n' "$*"; }
die() { printf 'kafka: error: %s\n' "$*" >&2; exit 1; }

now() { printf '%s' "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Shared by the broker and the storage tool so both log to the same place.
JAVA_COMMON=(
    -Djava.awt.headless=true
    "-Dkafka.logs.dir=$LOGS"
    "-Dlog4j2.configurationFile=$LOG4J_CONFIG"
    -cp "$LIBS/*"
)

# --- process tracking -------------------------------------------------------

# Prints the broker's pid if the pid file names a live process that really is
# this broker; a recycled pid belonging to something else counts as stale.
running_pid() {
    local pid args
    [[ -f $PIDFILE ]] || return 1
    pid=$(<"$PIDFILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # -ww: the whole command line, whatever COLUMNS says (ps cuts it to that width,
    # and a cut line would make a running broker look like someone else's pid).
    args=$(ps -ww -o args= -p "$pid" 2>/dev/null) || return 1
    [[ $args == *kafka.Kafka*"$PROPS"* ]] || return 1
    printf '%s' "$pid"
}

clear_stale_pidfile() {
    if [[ -f $PIDFILE ]] && ! running_pid >/dev/null; then
        say "removing stale pid file (pid $(<"$PIDFILE") is not this broker)"
        rm -f "$PIDFILE"
        return 0
    fi
    return 1
}

# A zombie still answers kill -0, but it is as good as gone.
process_alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $state != Z* ]]
}

port_in_use() {
    timeout 1 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

# Checked up front so that a missing client library is reported as such, not
# as a broker that never answered.
require_probe() {
    [[ -x $PYTHON ]] || die "no Python at $PYTHON (set PYTHON to one with confluent_kafka)"
    "$PYTHON" -c 'import confluent_kafka' 2>/dev/null \
        || die "confluent_kafka is not importable from $PYTHON (set PYTHON)"
}

# Asks the broker for metadata until it lists itself as a live broker, which
# in KRaft only happens once it has registered with the controller and been
# unfenced, i.e. when topics can actually be created and written.
# Exit codes: 0 ready, 1 deadline passed, 2 broker process exited.
probe() {
    local deadline=$1 pid=${2:-0}
    "$PYTHON" - "$HOST:$PORT" "$deadline" "$pid" <<'PY'
import sys
import time

from confluent_kafka.admin import AdminClient

bootstrap, deadline, pid = sys.argv[1], time.monotonic() + float(sys.argv[2]), int(sys.argv[3])

admin = AdminClient({
    "bootstrap.servers": bootstrap,
    # librdkafka's default backoff grows to 10 s between connection attempts,
    # which would add seconds to every start; the broker is local.
    "reconnect.backoff.ms": 50,
    "reconnect.backoff.max.ms": 250,
    # Connection-refused noise while the JVM boots is expected, not news.
    "log_level": 0,
    "error_cb": lambda err: None,
})

def alive():
    if not pid:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True

while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        sys.exit(1)
    if not alive():
        sys.exit(2)
    try:
        if admin.list_topics(timeout=min(2.0, max(remaining, 0.1))).brokers:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
PY
}

show_logs() {
    if [[ -s $LOGS/server.log ]]; then
        printf -- '--- last 30 lines of %s ---\n' "$LOGS/server.log" >&2
        tail -n 30 "$LOGS/server.log" >&2
    else
        printf -- '--- %s is empty or missing ---\n' "$LOGS/server.log" >&2
    fi
    # JVM-level failures (bad classpath, OOM, crash) happen outside log4j.
    if [[ -s $LOGS/kafka.out ]]; then
        printf -- '--- last 30 lines of %s ---\n' "$LOGS/kafka.out" >&2
        tail -n 30 "$LOGS/kafka.out" >&2
    fi
}

# --- setup ------------------------------------------------------------------

fetch() {
    if [[ -f $MARKER ]]; then
        return 0
    fi
    command -v mvn >/dev/null || die "mvn not found on PATH"
    local t0 tmp=$LIBS.partial
    t0=$(now)
    say "fetching Kafka $KAFKA_VERSION and its runtime dependencies with Maven"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    # Captured because Maven 3.8 emits stray colour escapes even with -q -B;
    # shown only when something went wrong.
    local out
    if ! out=$(mvn -q -B -Dstyle.color=never -f "$POM" \
            -Dkafka.version="$KAFKA_VERSION" \
            dependency:copy-dependencies \
            -DincludeScope=runtime \
            -DoutputDirectory="$tmp" 2>&1); then
        printf '%s\n' "$out" >&2
        rm -rf "$tmp"
        die "Maven could not fetch the Kafka jars"
    fi
    compgen -G "$tmp/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null \
        || die "Maven finished but kafka_2.13-$KAFKA_VERSION.jar is missing from $tmp"
    touch "$tmp/.fetched-$KAFKA_VERSION"
    rm -rf "$LIBS"
    mv "$tmp" "$LIBS"
    say "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars in $(elapsed "$t0") s"
}

write_config() {
    mkdir -p "$DATA" "$LOGS"
    # Rewritten on every start so that port changes take effect; everything not
    # listed here keeps Kafka's defaults.
    cat >"$PROPS" <<EOF
# Generated by scripts/kafka.sh on each start; edits are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA

# One node: every internal topic must be satisfiable by a single replica.
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Kafka's 50 partitions each for offsets and transactions are for spreading
# coordinators over many brokers. On one node they are only load time: after a
# restart every group waits for its coordinator partition to be read back.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4

# Tests join groups constantly; the default 3 s delay is pure waiting here.
group.initial.rebalance.delay.ms=0
# A typo in a topic name should fail loudly, not create a new topic.
auto.create.topics.enable=false
EOF
}

format_storage() {
    if [[ -f $DATA/meta.properties ]]; then
        return 0
    fi
    local cluster_id out
    cluster_id=$(java -Xmx128m "${JAVA_COMMON[@]}" kafka.tools.StorageTool random-uuid 2>>"$LOGS/kafka.out") \
        || { show_logs; die "could not generate a cluster id"; }
    # --standalone makes this node the sole voter of a dynamic KRaft quorum.
    if ! out=$(java -Xmx256m "${JAVA_COMMON[@]}" kafka.tools.StorageTool \
            format -t "$cluster_id" -c "$PROPS" --standalone 2>&1); then
        printf '%s\n' "$out" >&2
        die "formatting $DATA failed"
    fi
    say "formatted $DATA (cluster id $cluster_id)"
}

# --- commands ---------------------------------------------------------------

cmd_fetch() {
    fetch
    say "jars for Kafka $KAFKA_VERSION are in $LIBS"
}

cmd_start() {
    local pid rc t0
    require_probe
    if pid=$(running_pid); then
        if probe 5 "$pid"; then
            say "already running (pid $pid) on $HOST:$PORT"
            return 0
        fi
        say "running (pid $pid) but not answering yet; waiting up to $START_TIMEOUT s"
        t0=$(now)
        rc=0
        probe "$START_TIMEOUT" "$pid" || rc=$?
        if ((rc == 0)); then
            say "ready on $HOST:$PORT after $(elapsed "$t0") s more"
            return 0
        fi
        show_logs
        die "pid $pid is not answering on $HOST:$PORT; try: $0 stop && $0 start"
    fi
    if clear_stale_pidfile; then
        # The controller still holds the dead broker's registration until its
        # session times out (broker.session.timeout.ms, 9 s by default).
        say "the previous broker did not stop cleanly; this start will take ~10 s longer"
    fi

    local p
    for p in "$PORT" "$CONTROLLER_PORT"; do
        if port_in_use "$p"; then
            die "port $HOST:$p is already in use by another process (set KAFKA_PORT / KAFKA_CONTROLLER_PORT)"
        fi
    done

    command -v java >/dev/null || die "java not found on PATH"
    fetch
    write_config
    format_storage

    : >"$LOGS/kafka.out"
    t0=$(now)
    # setsid: the broker must outlive the shell (and terminal) that started it.
    # Fd 9 is the start/stop lock; the broker must not inherit and hold it.
    setsid nohup java \
        -Xms256m -Xmx512m \
        -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
        "${JAVA_COMMON[@]}" \
        kafka.Kafka "$PROPS" \
        >>"$LOGS/kafka.out" 2>&1 </dev/null 9>&- &
    pid=$!
    printf '%s\n' "$pid" >"$PIDFILE"

    rc=0
    probe "$START_TIMEOUT" "$pid" || rc=$?
    case $rc in
        0)
            say "started on $HOST:$PORT in $(elapsed "$t0") s (pid $pid, logs in $LOGS)"
            ;;
        2)
            rm -f "$PIDFILE"
            show_logs
            die "broker exited during start-up"
            ;;
        *)
            show_logs
            die "not answering on $HOST:$PORT after $START_TIMEOUT s (pid $pid left running; '$0 stop' ends it)"
            ;;
    esac
}

cmd_stop() {
    local pid t0 deadline
    if ! pid=$(running_pid); then
        clear_stale_pidfile || true
        say "not running"
        return 0
    fi
    t0=$(now)
    # SIGTERM lets the broker do a controlled shutdown and close its logs
    # cleanly, so the next start skips log recovery.
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while process_alive "$pid" && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if process_alive "$pid"; then
        say "still alive after $STOP_TIMEOUT s; sending SIGKILL to pid $pid"
        kill -KILL "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while process_alive "$pid" && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if process_alive "$pid"; then
            die "pid $pid survived SIGKILL"
        fi
    fi
    rm -f "$PIDFILE"
    say "stopped (pid $pid) in $(elapsed "$t0") s"
}

cmd_status() {
    local pid
    if ! pid=$(running_pid); then
        if [[ -f $PIDFILE ]]; then
            say "not running (stale pid file $PIDFILE)"
        elif port_in_use "$PORT"; then
            say "not running from $KAFKA_DIR, but something else listens on $HOST:$PORT"
        else
            say "not running"
        fi
        return 3
    fi
    require_probe
    if probe 5 "$pid"; then
        say "running (pid $pid) on $HOST:$PORT"
        return 0
    fi
    say "process $pid is up but not answering on $HOST:$PORT"
    return 3
}

usage() {
    printf 'usage: %s start|stop|status|fetch\n' "$0" >&2
    exit 2
}

main() {
    (($# == 1)) || usage
    case $1 in
        start | stop | status | fetch) ;;
        *) usage ;;
    esac
    mkdir -p "$KAFKA_DIR"
    # status only reads, and must answer promptly even while a start waits.
    if [[ $1 == status ]]; then
        cmd_status
        return
    fi
    # Serialises concurrent start/stop from parallel shells or test runs, which
    # would otherwise race to format storage or launch two brokers.
    exec 9>"$KAFKA_DIR/.lock"
    if ! flock -w 180 9; then
        die "another $0 is still running (lock $KAFKA_DIR/.lock)"
    fi
    "cmd_$1"
}

main "$@"
