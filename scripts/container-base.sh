#!/usr/bin/env bash
# Creates the base image the Dockerfile names, docker.io/library/debian:bookworm-slim,
# without any registry: debootstrap a minimal Debian 12 and import it into the local
# container store (shared by podman and buildah). Skips everything when the image is
# already there, so only the first run pays for debootstrap.
# Usage: scripts/container-base.sh
#   (env: BASE_IMAGE, DEBIAN_MIRROR, DEBIAN_SUITE, CONTAINER_BASE_TMPDIR)
set -euo pipefail

IMAGE=${BASE_IMAGE:-docker.io/library/debian:bookworm-slim}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if podman image exists "$IMAGE"; then
  exit 0
fi
for tool in debootstrap podman; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || {
    echo "container-base: $tool is missing; run scripts/system-deps.sh $tool:$tool" >&2
    exit 1
  }
done

# Two runs at once (parallel test sessions) would debootstrap twice; let one wait.
lock_dir=${XDG_RUNTIME_DIR:-/tmp}
exec 9>"$lock_dir/publer-proxy-container-base.lock"
flock 9
if podman image exists "$IMAGE"; then
  exit 0
fi

# /var/tmp, not /tmp: debootstrap runs programs inside the tree, which a noexec /tmp forbids.
rootfs=$(mktemp -d "${CONTAINER_BASE_TMPDIR:-/var/tmp}/debian-rootfs.XXXXXX")
case $rootfs in */debian-rootfs.*) ;; *) echo "container-base: bad work dir '$rootfs'" >&2; exit 1 ;; esac
trap '$SUDO rm -rf "$rootfs" "$rootfs.log"' EXIT
echo "container-base: debootstrap $SUITE from $MIRROR (once; the image is cached as $IMAGE)"
PATH="$PATH:/usr/sbin:/sbin" $SUDO debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" \
  >"$rootfs.log" 2>&1 || {
  tail -n 30 "$rootfs.log" >&2
  exit 1
}

# Make it look like the official slim image: the same apt sources (with security updates),
# no documentation, manuals or translations (now or from later installs), no package lists,
# caches or logs of the bootstrap itself.
$SUDO tee "$rootfs/etc/dpkg/dpkg.cfg.d/slim" >/dev/null <<'SLIM'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
SLIM
$SUDO find "$rootfs/usr/share/doc" -mindepth 1 -not -type d -not -name copyright -delete
$SUDO find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
$SUDO rm -rf "$rootfs"/usr/share/groff/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/linda/* \
  "$rootfs"/usr/share/lintian/overrides/* "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/man/*
$SUDO rm -f "$rootfs/etc/apt/sources.list"
$SUDO tee "$rootfs/etc/apt/sources.list.d/debian.sources" >/dev/null <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
$SUDO rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
  "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/* "$rootfs"/debootstrap

$SUDO tar --numeric-owner -C "$rootfs" -c . |
  podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    - "$IMAGE" >/dev/null
echo "container-base: created $IMAGE"
