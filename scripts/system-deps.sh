#!/usr/bin/env bash
# Installs the Debian packages that tests and benchmarks start for real, when missing.
# Usage: scripts/system-deps.sh PACKAGE:COMMAND ...   (e.g. redis-server:redis-server)
# A package without a command of its own (a PHP extension) is written PACKAGE: and checked
# with dpkg.
set -euo pipefail
missing=()
for pair in "$@"; do
  pkg=${pair%%:*}; cmd=${pair#*:}
  if [ -z "$cmd" ]; then
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    continue
  fi
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q >/dev/null
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
