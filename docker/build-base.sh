#!/usr/bin/env bash
# Build the local base images docker/Dockerfile needs where no container registry
# is reachable, from Debian's packages alone (debootstrap, then `docker import`):
#
#   fabric-base:bookworm        python3 + python3-venv     (the slim runtime stage)
#   fabric-base:bookworm-build  the same + gcc, python3-dev (the wheel-building stage)
#
# Both are reused when already present (pass --force to rebuild). It also fills
# docker/wheels/ with wheels of fabric's build and runtime dependencies, fetched
# by the host's pip for the image's Python, so the image build needs no network.
# Then build with:
#   docker build -f docker/Dockerfile --build-arg BASE=fabric-base:bookworm \
#       --build-arg BUILD_BASE=fabric-base:bookworm-build .
# docker/compose.yaml reads FABRIC_BASE and FABRIC_BUILD_BASE for the same purpose,
# from docker/.env, which this script writes.
#
# Environment: SUITE (bookworm), MIRROR (the Debian mirror from /etc/apt, else
# deb.debian.org), FABRIC_BASE, FABRIC_BUILD_BASE (the tags), PYTHON (host python for pip).
# Needs root (debootstrap), debootstrap, docker.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
suite=${SUITE:-bookworm}
runtime_tag=${FABRIC_BASE:-fabric-base:$suite}
build_tag=${FABRIC_BUILD_BASE:-fabric-base:$suite-build}
python=${PYTHON:-python3}
force=0
[[ ${1:-} == --force ]] && force=1

log() { printf 'build-base: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The Debian mirror apt already uses here (deb822 .sources or one-line .list), so
# the same network path that serves `apt-get` serves debootstrap.
find_mirror() {
    local uri
    uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources \
        | awk '{print $2}' | grep -E '/debian/?$' | head -n1 || true)
    [[ -n $uri ]] || uri=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
        | grep -E '/debian/?$' | head -n1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# debootstrap one root file system with the given extra packages, strip what a
# container never reads, and import it as an image.
bootstrap_and_import() {
    local tag=$1 include=$2
    local rootfs=$work/rootfs-${tag//[:\/]/-}
    log "debootstrap $suite ($include) from $mirror -> $tag"
    debootstrap --variant=minbase --cache-dir="$work/debs" --include="$include" \
        "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* \
        "$rootfs"/var/log/*.log "$rootfs"/dev/*
    tar --numeric-owner -C "$rootfs" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        --message "fabric base: debootstrap $suite minbase + $include" - "$tag" >/dev/null
    rm -rf "$rootfs"
    log "imported $tag"
}

# Wheels of the build requirements and runtime dependencies, for the image's
# CPython (minor version and glibc of $suite), so `pip install --no-index` works
# in the image build.
fetch_wheels() {
    local pyver wheels=$here/wheels
    pyver=$(docker run --rm "$runtime_tag" python3 -c \
        'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    mkdir -p "$wheels"
    mapfile -t reqs < <("$python" - "$root/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    meta = tomllib.load(f)
for req in meta["build-system"]["requires"] + meta["project"]["dependencies"] + ["wheel"]:
    print(req)
EOF
)
    log "pip download for CPython $pyver: ${reqs[*]}"
    "$python" -m pip download --quiet --dest "$wheels" --only-binary=:all: \
        --python-version "$pyver" --implementation cp --platform manylinux2014_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 "${reqs[@]}"
}

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "no Docker engine answers (is dockerd running?)"

if ((force == 0)) && have_image "$runtime_tag" && have_image "$build_tag"; then
    log "reusing $runtime_tag and $build_tag (--force rebuilds them)"
else
    ((EUID == 0)) || die "debootstrap needs root"
    command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
    mirror=${MIRROR:-$(find_mirror)}
    work=$(mktemp -d /var/tmp/fabric-base.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/debs"
    bootstrap_and_import "$runtime_tag" python3,python3-venv,ca-certificates
    bootstrap_and_import "$build_tag" python3,python3-venv,ca-certificates,python3-dev,gcc,libc6-dev
fi
fetch_wheels
# docker compose reads this file beside compose.yaml, so the one-line check
# builds on these images with no variable to export.
printf 'FABRIC_BASE=%s\nFABRIC_BUILD_BASE=%s\n' "$runtime_tag" "$build_tag" >"$here/.env"
log "ready: BASE=$runtime_tag BUILD_BASE=$build_tag (written to docker/.env), wheels in docker/wheels/"
