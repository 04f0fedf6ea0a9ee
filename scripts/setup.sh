#!/usr/bin/env bash
# Installs what poseidon-ts needs on a Debian/Ubuntu host: bubblewrap and the tools every
# sandbox uses (util-linux for nsenter/setpriv, tar, findutils, coreutils), python3 for the
# test programs, nftables and iproute2 for the private networks of runners with network access,
# busybox-static (the root of the test images), skopeo and umoci (the oracle the image store is
# tested and benchmarked against), docker-registry (a real registry the image tests start on
# loopback; its Debian service is never started here), then the npm dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(bubblewrap util-linux tar findutils coreutils python3 gcc libc6-dev musl-tools make libseccomp-dev nftables iproute2 busybox-static skopeo umoci docker-registry)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # policy-rc.d 101: a package's service (docker-registry's on :5000) is not started by the install.
  policy=/usr/sbin/policy-rc.d
  [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod +x "$policy" && created_policy=1; }
  status=0
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" || status=$?
  [ -z "${created_policy:-}" ] || $sudo rm -f "$policy"
  [ "$status" -eq 0 ] || exit "$status"
fi
command -v bwrap >/dev/null || { echo "setup: bwrap is still missing" >&2; exit 1; }

# The agent every sandbox runs as its first process: a static binary, so it works in any image.
make -C agent --no-print-directory

if [ -f package-lock.json ]; then npm ci --no-fund --no-audit; else npm install --no-fund --no-audit; fi
echo "setup: done (bubblewrap $(bwrap --version | awk '{print $2}'), node $(node --version))"
