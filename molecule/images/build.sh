#!/usr/bin/env bash
# Builds the systemd-ready Debian test images from debootstrap with `docker import`
# (no registry needed):  morag-test/debian12:latest  and  morag-test/debian13:latest.
# Used by the molecule scenarios, the site scenario, `make lab` and CI.
# morag-test/debian11 (bullseye, systemd 247) is built only on request: no role supports
# Debian 11, but tests/systemd proves the worker unit on systemd older than 252 with it.
#
#   molecule/images/build.sh [11] [12] [13]     (default: 12 and 13)
#   FORCE=1 molecule/images/build.sh       (rebuild even if cached)
#
# Cached: each image carries the label morag.recipe = sha256 of this script and the
# release; it is rebuilt only when that hash differs (the recipe changed) or it is absent.
# The images carry fresh apt lists, so roles rarely need an `apt-get update`.
set -euo pipefail

MIRROR=${MORAG_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${MORAG_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# What every test host needs: systemd as PID 1, Python for Ansible, python3-apt for check
# mode, dbus for systemd-run, sudo for become, venv/pip for morag_app, libnfs-utils for the
# userspace NFS checks, iproute2/procps for debugging.
PACKAGES=systemd,systemd-sysv,dbus,python3,python3-apt,python3-venv,python3-pip,sudo,ca-certificates,iproute2,procps,libnfs-utils,gnupg,curl

declare -A SUITE=([11]=bullseye [12]=bookworm [13]=trixie)
HERE=$(cd "$(dirname "$0")" && pwd)
RECIPE_HASH=$(sha256sum "$HERE/build.sh" | cut -c1-16)

log() { echo "[images] $*" >&2; }

build_one() {
  local version=$1 suite=${SUITE[$1]}
  local name="morag-test/debian${version}:latest"
  local want="${RECIPE_HASH}-${suite}"
  local have
  have=$(docker image inspect "$name" --format '{{ index .Config.Labels "morag.recipe" }}' 2>/dev/null || true)
  if [ "$have" = "$want" ] && [ -z "${FORCE:-}" ]; then
    log "$name is up to date (recipe $want)"
    return 0
  fi
  local root
  root=$(mktemp -d "/var/tmp/morag-image-${suite}.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$root'" RETURN
  log "debootstrap $suite into $root"
  local started=$SECONDS
  debootstrap --variant=minbase --include="$PACKAGES" "$suite" "$root" "$MIRROR" >"$root.log" 2>&1 || {
    tail -30 "$root.log" >&2; rm -f "$root.log"; return 1; }
  rm -f "$root.log"

  # Debian's deb822 sources (main only; the nvidia_driver role adds contrib/non-free).
  rm -f "$root/etc/apt/sources.list"
  local updates="$suite-updates"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $MIRROR
Suites: $suite $updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  # A container: no getty, no udev-style units that fail, no kernel-only mounts.
  for unit in getty@tty1.service console-getty.service systemd-udevd.service \
              systemd-udevd-control.socket systemd-udevd-kernel.socket \
              systemd-modules-load.service sys-kernel-config.mount sys-kernel-debug.mount \
              sys-kernel-tracing.mount systemd-remount-fs.service systemd-firstboot.service \
              apt-daily.timer apt-daily-upgrade.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
  done
  echo 'APT::Install-Recommends "false";' >"$root/etc/apt/apt.conf.d/90morag-no-recommends"
  : >"$root/etc/machine-id"
  chroot "$root" apt-get update -q >/dev/null 2>&1
  chroot "$root" apt-get clean
  rm -rf "$root"/var/log/*.log "$root"/tmp/* "$root"/var/cache/debconf/*-old

  log "docker import $name"
  tar --numeric-owner -C "$root" -c . | docker import \
    --change 'CMD ["/lib/systemd/systemd"]' \
    --change 'ENV container=docker' \
    --change "LABEL morag.recipe=$want" \
    - "$name" >/dev/null
  log "$name built in $((SECONDS - started))s"
}

versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(12 13)
for v in "${versions[@]}"; do
  [ -n "${SUITE[$v]:-}" ] || { echo "unknown Debian version $v (11, 12 or 13)" >&2; exit 2; }
done
pids=()
for v in "${versions[@]}"; do build_one "$v" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
