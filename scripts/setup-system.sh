#!/usr/bin/env bash
# Install the Debian packages listed in requirements/apt.txt (the tools the deployment checks run:
# docker-compose, prometheus/promtool). Idempotent: when everything is installed it only checks and
# exits, without `apt-get update`. Needs root (or sudo) only when something is missing.
#
# The Debian `prometheus` package may start a system Prometheus on :9090; the tests never use it
# (they start their own instance on a free loopback port with a temporary storage dir), so this
# script stops and disables it when it can, to keep the port and CPU free.
set -euo pipefail
cd "$(dirname "$0")/.."

mapfile -t wanted < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' requirements/apt.txt | grep -v '^$')

missing=()
for pkg in "${wanted[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup-system: all Debian packages present (${wanted[*]})"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "setup-system: ERROR: missing Debian packages: ${missing[*]}" >&2
  echo "setup-system: run as root (or with passwordless sudo): apt-get update && apt-get install -y ${missing[*]}" >&2
  exit 1
fi

echo "setup-system: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# policy-rc.d 101 keeps maintainer scripts from starting services (the system Prometheus) in
# containers and CI hosts; restored afterwards.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
  "${sudo[@]}" chmod +x "$policy"
  made_policy=1
fi
trap '[ "$made_policy" = 1 ] && "${sudo[@]}" rm -f "$policy"' EXIT
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"

# Belt and braces: if a system Prometheus did start (systemd host), stop it; the tests run their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  "${sudo[@]}" systemctl disable --now prometheus || true
fi

for pkg in "${missing[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || {
    echo "setup-system: ERROR: $pkg did not install" >&2
    exit 1
  }
done
echo "setup-system: done"
