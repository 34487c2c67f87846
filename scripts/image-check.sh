#!/usr/bin/env bash
# Build the container image from the real Dockerfile and run it: the image's own
# `dispatcher`, as uid 10001 on the host network, creates private topics on the
# local broker, delivers the demo event to a local HTTPS receiver that verifies
# both signatures, and answers `dispatcher check`; it must write no file.
#
# Needs buildah (no Docker engine): `buildah bud --isolation chroot` builds and
# `buildah run --isolation chroot` runs. When the registry base image
# (python:3.11-slim) cannot be pulled, a Python 3.11 base is made from Debian
# bookworm packages with debootstrap, from the mirror apt uses, and passed as the
# Dockerfile's PYTHON_IMAGE argument.
#
# Cached, so that a repeat takes a minute or less: the debootstrap root file
# system (a tarball in $IMAGE_CHECK_CACHE) and the base image made from it, the
# wheels of the dependencies (in $IMAGE_CHECK_CACHE, per pyproject.toml), and
# buildah's layer cache (`--layers`).
# Where buildah cannot run, prints one line saying so and exits 0.
#
#   IMAGE_CHECK_CACHE   cache directory (default: ~/.cache/webhook-dispatcher/image)
#   PYTHON_IMAGE        registry base to try first (default: docker.io/library/python:3.11-slim)
#   PIP_CERT            CA bundle pip needs (a TLS-intercepting proxy), given to the build as a secret
#   KAFKA_BOOTSTRAP     the broker (default: 127.0.0.1:9092; started here if not running)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
source scripts/debian-package.sh

started=$SECONDS
registry_base=${PYTHON_IMAGE:-docker.io/library/python:3.11-slim}
local_base=localhost/webhook-dispatcher-base:python3.11-bookworm
image=localhost/webhook-dispatcher:check
cache=${IMAGE_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/webhook-dispatcher/image}
isolation=(--isolation chroot)

say() { printf 'image-check: %s\n' "$*"; }
skip() { say "SKIPPED: $*"; exit 0; }
fail() { say "FAILED: $*" >&2; exit 1; }
# Runs a command quietly, showing the end of its output only if it fails.
logged() {
    local log=$1
    shift
    if ! "$@" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        fail "$* (full output in $log)"
    fi
}

need_debian_package buildah buildah || skip "buildah is not installed, so the image is not built"
buildah info >/dev/null 2>&1 || skip "buildah cannot run here ($(buildah info 2>&1 | tail -n 1))"
mkdir -p "$cache"

# The Debian mirror apt is configured with (sources.list or sources.list.d).
debian_mirror() {
    local site
    site=$(apt-get indextargets --format '$(SITE) $(RELEASE)' 'Identifier: Packages' 2>/dev/null |
        awk '$2 == "bookworm" { print $1; exit }')
    printf '%s' "${site:-http://deb.debian.org/debian}"
}

# A Python 3.11 image from Debian packages: the interpreter, venv (ensurepip)
# and CA certificates, with `python`/`python3` in /usr/local/bin as in the
# official image, so the Dockerfile's stages work unchanged.
make_debian_base() {
    local tarball=$cache/bookworm-python3.11-rootfs.tar root context mirror
    if [[ ! -s $tarball ]]; then
        [[ $(id -u) == 0 ]] ||
            skip "the registry base cannot be pulled, and making one with debootstrap needs root"
        need_debian_package debootstrap debootstrap ||
            skip "the registry base cannot be pulled and debootstrap is not installed"
        mirror=$(debian_mirror)
        say "making a Python 3.11 base from Debian bookworm packages ($mirror) with debootstrap"
        rm -rf "$cache"/rootfs.* # what an interrupted run left
        root=$(mktemp -d "$cache/rootfs.XXXXXX")
        # debootstrap does not resolve virtual packages: python3.11-venv needs
        # python3.11-distutils, which python3-distutils provides.
        logged "$cache/debootstrap.log" debootstrap --variant=minbase \
            --include=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,ca-certificates \
            bookworm "$root" "$mirror"
        ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python3"
        ln -sf python3 "$root/usr/local/bin/python"
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        # Device nodes and kernel file systems come from the runtime, not the image.
        tar -C "$root" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
            -cf "$tarball.part" .
        mv "$tarball.part" "$tarball"
        rm -rf "$root"
    fi
    say "importing the cached Debian root file system as $local_base"
    context=$(mktemp -d "$cache/context.XXXXXX")
    ln "$tarball" "$context/rootfs.tar" 2>/dev/null || cp "$tarball" "$context/rootfs.tar"
    cat >"$context/Containerfile" <<'EOF'
FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8 PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["python3"]
EOF
    logged "$cache/base-build.log" buildah bud "${isolation[@]}" -t "$local_base" "$context"
    rm -rf "$context"
}

image_present() { buildah inspect --type image "$1" >/dev/null 2>&1; }

step=$SECONDS
if image_present "$registry_base" || timeout 60 buildah pull -q "$registry_base" >/dev/null 2>&1; then
    base=$registry_base
else
    say "the registry base $registry_base cannot be pulled; using a Debian-built Python 3.11"
    image_present "$local_base" || make_debian_base
    base=$local_base
fi
say "base image $base ready in $((SECONDS - step)) s"

bash scripts/bootstrap.sh
step=$SECONDS
# pip inside the build trusts what pip here trusts (a proxy's CA, say).
build_options=()
if [[ -s ${PIP_CERT:-} ]]; then
    build_options+=(--secret "id=pip-ca,src=$PIP_CERT")
fi
# The wheels of every dependency (and of the build back-end), collected here once
# per pyproject.toml and mounted into the build, which then needs no package
# index: pip's own cache cannot be relied on (a proxy may forbid caching). Only
# when this Python is the image's (3.11), so that the wheels fit it.
wheelhouse=$cache/wheels
if .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    stamp=$wheelhouse/.pyproject-$(sha256sum pyproject.toml | cut -c1-16)
    if [[ ! -f $stamp ]]; then
        say "collecting the wheels the image needs into $wheelhouse"
        rm -rf "$wheelhouse"
        mkdir -p "$wheelhouse"
        # The project's dependencies and its build back-end, not the project.
        .venv/bin/python -c 'import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(project["project"]["dependencies"] + project["build-system"]["requires"]))' \
            >"$cache/requirements.txt"
        logged "$cache/wheels.log" .venv/bin/pip wheel --wheel-dir "$wheelhouse" \
            --requirement "$cache/requirements.txt"
        touch "$stamp"
    fi
    build_options+=(--volume "$wheelhouse:/wheelhouse:ro")
fi
say "building the Dockerfile (buildah bud --isolation chroot, PYTHON_IMAGE=$base)"
# The docker format keeps the Dockerfile's HEALTHCHECK, which OCI images drop.
logged "$cache/build.log" buildah bud "${isolation[@]}" --format docker --layers --pull=false \
    "${build_options[@]}" --build-arg "PYTHON_IMAGE=$base" -t "$image" -f Dockerfile .
say "image $image built in $((SECONDS - step)) s"

source scripts/broker-lease.sh
export KAFKA_BOOTSTRAP=${KAFKA_BOOTSTRAP:-127.0.0.1:${KAFKA_PORT:-9092}}

work=$(mktemp -d /tmp/image-check.XXXXXX)
chmod 755 "$work" # uid 10001 in the image reads the demo's CA certificate here
container=$(buildah from --pull=false "$image")
cleanup() {
    buildah rm "$container" >/dev/null 2>&1 || true
    rm -rf "$work"
    _release_broker
}
trap cleanup EXIT
touch "$work/started"

# `dispatcher` of the built image, as uid 10001, on the host network, with the
# caller's DISPATCHER_* settings; $work (the demo's certificates) is mounted read-only.
# buildah answers a SIGTERM by killing what it runs, so the SIGTERM goes to the
# dispatcher process itself (found among buildah's descendants), which drains
# and exits as it would in a pod.
cat >"$work/dispatcher-in-image" <<EOF
#!/usr/bin/env bash
settings=()
for name in \$(compgen -e | grep '^DISPATCHER_' || true); do
    settings+=(--env "\$name=\${!name}")
done
buildah run ${isolation[*]} --user 10001:10001 --network host \\
    --volume "$work:$work:ro" "\${settings[@]}" "$container" dispatcher "\$@" &
runner=\$!
forward() {
    local level=\$runner pid
    while [[ -n \$level ]]; do
        for pid in \$level; do
            [[ \$(ps -o comm= -p "\$pid") == dispatcher ]] && kill -TERM "\$pid"
        done
        level=\$(ps -o pid= --ppid "\$(echo \$level | tr ' ' ,)" || true)
    done
}
trap forward TERM
wait \$runner || true  # returns early when the trap runs
wait \$runner
EOF
chmod +x "$work/dispatcher-in-image"

say "the image runs as: $(buildah run "${isolation[@]}" --user 10001:10001 "$container" id)"
step=$SECONDS
TMPDIR=$work .venv/bin/python scripts/demo.py --dispatcher "$work/dispatcher-in-image" \
    --namespace "image-check.$(date +%s).$$"

# Nothing the dispatcher ran as uid 10001 wrote a file: it works on a read-only root.
root=$(buildah mount "$container")
written=$(find "$root" -xdev -user 10001 -newer "$work/started" | sed "s|^$root||")
buildah umount "$container" >/dev/null
[[ -z $written ]] || fail "the dispatcher wrote into the image's file system: $written"
say "the image's dispatcher wrote no file (fit for a read-only root)"
say "OK: built and ran the image in $((SECONDS - started)) s (delivery run $((SECONDS - step)) s)"
