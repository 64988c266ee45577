#!/usr/bin/env bash
# Build the Dockerfile for real with buildah, run the image and check that
#   - the image's own HEALTHCHECK command passes inside the running container,
#   - the image and every process of the service run as a non-root user,
#   - POST /v1/captions answers a photo with the bundled model (behind the API key, as documented),
#   - the image holds the package, its model and the service and nothing else of the repository
#     (no tests, examples, data, benchmarks, docs, .venv, cache/, runs/),
# then print the image size.
#
#   bash docker/smoke-test.sh [--keep] [--reuse] [--rebuild-base]      (as root)
#
#   --keep          keep the image localhost/captioner:smoke afterwards (removed by default)
#   --reuse         check the image an earlier --keep run left instead of building (implies --keep)
#   --rebuild-base  make the debootstrap base image again
#
# Offline by design: the base image is made by debootstrap (Debian bookworm's python3.11 in a venv
# at /opt/venv, on PATH, as python:3.11-slim has python and pip on PATH) and the wheels are fetched
# by the host's pip (its indexes and the wheels on its disk) into a local PEP 503 index, mounted
# into the build at /wheels and passed as the Dockerfile's PIP_INDEX_URL and TORCH_INDEX_URL: the
# build downloads nothing. Needs root, buildah, debootstrap, curl and jq
# (apt-get install -y buildah debootstrap curl jq), a host Python 3.11 with pip (the image's
# Python; PYTHON=... to name one) and about 25 GB of free disk while it runs.
# Cached between runs: the base image (localhost/captioner-base:bookworm, in buildah's storage) and
# the wheels ($CAPTIONER_SMOKE_CACHE, default .cache/docker/ in the repository, git-ignored).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${CAPTIONER_SMOKE_CACHE:-$ROOT/.cache/docker}
WHEELS=$CACHE/wheels
PYTHON=${PYTHON:-python3}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=localhost/captioner-base:bookworm
IMAGE=localhost/captioner:smoke
CONTAINER=captioner-smoke
API_KEY=smoke-test-key
PHOTO=$ROOT/examples/chelsea.jpg
EXPECT_WORD=cat  # the bundled model says "a little black cat is playing with ..." on every inference path
KEEP=0 REUSE=0 REBUILD_BASE=0
for arg in "$@"; do
    case $arg in
        --keep) KEEP=1 ;;
        --reuse) REUSE=1 KEEP=1 ;;
        --rebuild-base) REBUILD_BASE=1 ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done

say() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
checks() { "$PYTHON" "$ROOT/docker/smoke_checks.py" "$@"; }

[ "$(id -u)" = 0 ] || fail "run as root (debootstrap and buildah's chroot isolation need it)"
for tool in buildah debootstrap curl jq; do
    command -v "$tool" >/dev/null || fail "$tool not found: apt-get install -y buildah debootstrap curl jq"
done
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
    || fail "$PYTHON is not Python 3.11, the image's Python, for which the wheels are fetched: set PYTHON=..."

SERVICE_PID=
WORK=$(mktemp -d /tmp/captioner-smoke.XXXXXX)
descendants() {  # the process ids below $1, deepest first
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        descendants "$child"
        echo "$child"
    done
}
stop_service() {
    [ -n "$SERVICE_PID" ] || return 0
    local pids pid
    pids="$(descendants "$SERVICE_PID") $SERVICE_PID"
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 20); do
        kill -0 "$SERVICE_PID" 2>/dev/null || break
        sleep 0.5
    done
    for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
    wait "$SERVICE_PID" 2>/dev/null || true
    SERVICE_PID=
}
cleanup() {
    local rc=$?
    stop_service
    buildah umount "$CONTAINER" >/dev/null 2>&1 || true
    buildah rm "$CONTAINER" "$CONTAINER-base" >/dev/null 2>&1 || true
    if [ "$KEEP" = 0 ]; then buildah rmi "$IMAGE" >/dev/null 2>&1 || true; fi
    rm -rf "$WORK"
    [ $rc = 0 ] || echo "smoke test FAILED (exit status $rc)" >&2
}
trap cleanup EXIT
# What a run killed before its clean-up left behind.
buildah rm "$CONTAINER" "$CONTAINER-base" >/dev/null 2>&1 || true

# -- 1. the base image: Debian bookworm and its python3.11 -----------------------------------------
make_base() {
    say "making the base image $BASE with debootstrap ($MIRROR)"
    local rootfs=$WORK/rootfs base=$CONTAINER-base mnt
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,netbase,tzdata \
        bookworm "$rootfs" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    buildah from --quiet --name "$base" scratch >/dev/null
    mnt=$(buildah mount "$base")
    tar -C "$rootfs" -cf - . | tar -C "$mnt" -xpf - --numeric-owner
    buildah umount "$base" >/dev/null
    rm -rf "$rootfs"
    # python:3.11-slim's contract with the Dockerfile: `python` and `pip` on PATH, for root.
    buildah run --isolation chroot "$base" -- python3 -m venv /opt/venv
    buildah config --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd python3 --created-by "debootstrap bookworm; python3 -m venv /opt/venv" "$base"
    buildah rmi "$BASE" >/dev/null 2>&1 || true
    buildah commit --quiet --format docker --rm "$base" "$BASE" >/dev/null
}

# -- 2. the wheels: a local package index ----------------------------------------------------------
fetch_wheels() {
    say "fetching the wheels into $WHEELS (pip of $PYTHON)"
    mkdir -p "$WHEELS"
    # What the Dockerfile installs: torch and torchvision, then the project with its
    # dependencies and its build backend (read from pyproject.toml).
    checks requirements "$ROOT/pyproject.toml" > "$WORK/requirements.txt"
    "$PYTHON" -m pip download --dest "$WHEELS" -r "$WORK/requirements.txt" > "$WORK/pip.log" 2>&1 \
        || { tail -20 "$WORK/pip.log"; fail "pip download: the host's pip must reach these packages"; }
    # Wheels that lie on this disk already become hard links to them (PyTorch's are 3 GB).
    local file dir orig
    for file in "$WHEELS"/*; do
        for dir in /opt/wheels /opt/pypi/files /opt/pypi-more/files; do
            orig=$dir/$(basename "$file")
            if [ -f "$orig" ] && [ ! "$file" -ef "$orig" ] && cmp -s "$file" "$orig"; then
                ln -f "$orig" "$file" 2>/dev/null || true
                break
            fi
        done
    done
    checks index "$WHEELS"
}

# -- 3. the build ----------------------------------------------------------------------------------
build_image() {
    say "building $IMAGE from the Dockerfile (buildah, chroot isolation)"
    local started=$SECONDS
    buildah rmi "$IMAGE" >/dev/null 2>&1 || true  # an image an earlier --keep run left
    buildah build --isolation chroot --format docker --pull=false --tag "$IMAGE" \
        --build-arg BASE_IMAGE="$BASE" \
        --build-arg PIP_INDEX_URL=file:///wheels/simple \
        --build-arg TORCH_INDEX_URL=file:///wheels/simple \
        --volume "$WHEELS:/wheels:ro" \
        --file "$ROOT/Dockerfile" "$ROOT" > "$WORK/build.log" 2>&1 \
        || { tail -40 "$WORK/build.log"; fail "buildah build"; }
    grep '^Successfully installed' "$WORK/build.log" | sed 's/^/   /' | cut -c1-200
    ok "built in $(( SECONDS - started )) s"
}

if [ "$REUSE" = 1 ]; then
    buildah inspect --type image "$IMAGE" >/dev/null 2>&1 || fail "no image $IMAGE to reuse: run with --keep first"
    say "checking the image $IMAGE an earlier run kept"
else
    if [ "$REBUILD_BASE" = 1 ] || ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then make_base; fi
    buildah from --quiet --name "$CONTAINER" "$BASE" >/dev/null
    ok "base image $BASE: $(buildah run --isolation chroot "$CONTAINER" -- python --version)"
    buildah rm "$CONTAINER" >/dev/null
    fetch_wheels
    build_image
fi
config=$(buildah inspect --type image "$IMAGE" | jq .Docker.config)
image_config() { jq -r "$1" <<<"$config"; }

# -- 4. what the image holds -----------------------------------------------------------------------
say "the image's files"
buildah from --quiet --name "$CONTAINER" "$IMAGE" >/dev/null
checks files "$(buildah mount "$CONTAINER")" "$ROOT" "$(image_config .WorkingDir)"
buildah umount "$CONTAINER" >/dev/null

# -- 5. the running service ------------------------------------------------------------------------
say "running the image"
user=$(image_config '.User // ""')
case $user in ""|root|0|0:*|root:*) fail "the image's USER is '$user', not a non-root user" ;; esac
uid=$(buildah run --isolation chroot "$CONTAINER" -- id -u)
[ "$uid" != 0 ] || fail "commands in the image run as root"
ok "USER $user: $(buildah run --isolation chroot "$CONTAINER" -- id)"

# The image's ENTRYPOINT + CMD as the image's user. buildah's chroot isolation shares the host's
# network, so the service listens on loopback, on a free port.
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port
run_env=(--env CAPTIONER_HOST=127.0.0.1 --env CAPTIONER_PORT="$port" --env CAPTIONER_API_KEYS="$API_KEY")
mapfile -t command < <(image_config '(.Entrypoint // []) + (.Cmd // []) | .[]')
started=$SECONDS
buildah run --isolation chroot --network host "${run_env[@]}" "$CONTAINER" -- "${command[@]}" \
    > "$WORK/service.log" 2>&1 &
SERVICE_PID=$!
ok "started ${command[*]} on 127.0.0.1:$port"

# The image's HEALTHCHECK command, run inside the container as an engine runs it, until it passes.
mapfile -t health < <(image_config '.Healthcheck.Test // [] | .[]')
case ${health[0]:-} in
    CMD-SHELL) health=(/bin/sh -c "${health[1]}") ;;
    CMD) health=("${health[@]:1}") ;;
    *) fail "the image has no HEALTHCHECK (an OCI-format build drops it: build with --format docker)" ;;
esac
until buildah run --isolation chroot --network host "${run_env[@]}" "$CONTAINER" -- "${health[@]}" >/dev/null 2>&1; do
    kill -0 "$SERVICE_PID" 2>/dev/null || { cat "$WORK/service.log"; fail "the service exited"; }
    [ $(( SECONDS - started )) -lt 180 ] || { cat "$WORK/service.log"; fail "the health check still fails after 180 s"; }
    sleep 2
done
ok "HEALTHCHECK passes $(( SECONDS - started )) s after the start: ${health[*]}"

processes=0
for pid in $(descendants "$SERVICE_PID"); do
    name=$(cat "/proc/$pid/comm" 2>/dev/null) || continue
    case $(readlink "/proc/$pid/exe") in /memfd:buildah*) continue ;; esac  # buildah's chroot helpers
    puid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
    [ "$puid" = "$uid" ] || fail "process $pid ($name) of the service runs as uid $puid, not $uid"
    processes=$(( processes + 1 ))
done
[ "$processes" -gt 0 ] || fail "found no process of the service"
ok "all $processes processes of the service (gunicorn's master and workers) run as uid $uid"

until curl -fsS -o /dev/null "$url/readyz"; do
    [ $(( SECONDS - started )) -lt 240 ] || { cat "$WORK/service.log"; fail "/readyz is not ready after 240 s"; }
    sleep 2
done
ok "GET /readyz: ready $(( SECONDS - started )) s after the start"
status=$(curl -sS -o /dev/null -w '%{http_code}' -H 'Content-Type: image/jpeg' --data-binary @"$PHOTO" "$url/v1/captions")
[ "$status" = 401 ] || fail "POST /v1/captions without the API key answered $status, not 401"
ok "POST /v1/captions without the API key: 401"
curl -fsS -H "Authorization: Bearer $API_KEY" -H 'Content-Type: image/jpeg' --data-binary @"$PHOTO" \
    "$url/v1/captions" > "$WORK/captions.json" || { cat "$WORK/service.log"; fail "POST /v1/captions"; }
checks caption "$WORK/captions.json" "$(basename "$PHOTO")" "$EXPECT_WORD"
stop_service

# -- 6. the size -----------------------------------------------------------------------------------
say "the image"
files_mb=$(( $(du -sb "$(buildah mount "$CONTAINER")" | cut -f1) / 1000000 ))
buildah umount "$CONTAINER" >/dev/null
echo "$IMAGE: $(buildah images --format '{{.Size}}' "$IMAGE") ($files_mb MB of files; base $BASE $(buildah images --format '{{.Size}}' "$BASE"))"
[ "$KEEP" = 0 ] || echo "kept: $IMAGE; for Docker: buildah push $IMAGE docker-archive:captioner.tar:captioner:latest && docker load -i captioner.tar"
echo "smoke test passed"
