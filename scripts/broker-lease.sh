# Sourced by the demo, test and benchmark commands: make sure the local broker
# runs, and stop it again on exit only if this command started it.
_lease_started=0
if ! bash scripts/kafka.sh status >/dev/null 2>&1; then
    bash scripts/kafka.sh start
    _lease_started=1
fi
_release_broker() {
    if [[ $_lease_started == 1 ]]; then
        bash scripts/kafka.sh stop || true
    fi
}
trap _release_broker EXIT
