#!/usr/bin/env bash
# Builds the Docker image and runs the README's curl walk-through against a container started with
# the README's `docker run` flags. Installs what it needs itself (docker.io, mmdebstrap), starts
# dockerd if none runs. No base image can be pulled on an offline host, so the base is built
# locally: a bookworm root file system (mmdebstrap from the host's apt mirror) plus the host's node
# binary, tagged poseidon-ts-base:local and passed as BASE. Set SMOKE_BASE to use a real node image.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
need=()
command -v dockerd >/dev/null || need+=(docker.io)
[ -n "${SMOKE_BASE:-}" ] || command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ]; then
  echo "smoke: installing ${need[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
started_dockerd=""
if ! docker info >/dev/null 2>&1; then
  # --iptables=false --ip-forward=false: a dockerd managing iptables sets the FORWARD policy to DROP
  # and switches on forwarding for every interface, which changes the runner networks of every
  # poseidon-ts on this host (they forward through nftables, per uplink). The build uses the host's
  # network instead, and -p is served by docker-proxy without NAT rules. The dockerd started here
  # is stopped again at the end.
  echo "smoke: starting dockerd --iptables=false --ip-forward=false (log in /tmp/poseidon-smoke-dockerd.log)"
  $sudo sh -c 'dockerd --iptables=false --ip6tables=false --ip-forward=false >/tmp/poseidon-smoke-dockerd.log 2>&1 & echo $! >/tmp/poseidon-smoke-dockerd.pid'
  started_dockerd=1
  for _ in $(seq 1 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "smoke: dockerd does not start here:"; tail -20 /tmp/poseidon-smoke-dockerd.log; exit 1; }
fi
base="${SMOKE_BASE:-poseidon-ts-base:node-npm-ca}"
if [ -z "${SMOKE_BASE:-}" ] && ! docker image inspect "$base" >/dev/null 2>&1; then
  echo "smoke: building $base locally (mmdebstrap bookworm + host node $(node --version) and npm $(npm --version))"
  root=$(mktemp -d)
  $sudo mmdebstrap --variant=minbase --include=ca-certificates bookworm "$root/rootfs.tar"
  mkdir "$root/ctx" && cp "$(command -v node)" "$root/ctx/node"
  # npm too: the build stage runs npm ci (the host's npm package, as a node image ships it).
  cp -r "$(dirname "$(readlink -f "$(command -v npm)")")/.." "$root/ctx/npm"
  # The host's trusted certificates as well, so that npm ci in the build stage trusts what the host
  # trusts (e.g. a TLS-inspecting proxy in front of the registry).
  cp /etc/ssl/certs/ca-certificates.crt "$root/ctx/ca-certificates.crt"
  printf 'FROM scratch\nADD rootfs.tar /\nCOPY node /usr/local/bin/node\nCOPY npm /usr/local/lib/node_modules/npm\nCOPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\nENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt\nRUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm\n' > "$root/ctx/Dockerfile"
  mv "$root/rootfs.tar" "$root/ctx/"
  docker build -q --network host -t "$base" "$root/ctx"
  rm -rf "$root"
fi
docker build -q --network host --build-arg BASE="$base" -t poseidon-ts:smoke .
docker image ls poseidon-ts:smoke --format 'smoke: image {{.Repository}}:{{.Tag}} {{.Size}}'
port=$((20000 + RANDOM % 20000))
# The walk-through's "python" runs on the container's own system: an offline host cannot pull it.
cid=$(docker run -d --init --cap-add SYS_ADMIN --cap-add NET_ADMIN --security-opt seccomp=unconfined \
  --security-opt apparmor=unconfined --security-opt systempaths=unconfined -v /sys/fs/cgroup:/sys/fs/cgroup:rw -p "127.0.0.1:$port:7200" \
  -e POSEIDON_LOCAL_IMAGES='{"python":"host"}' poseidon-ts:smoke)
# The daemon in the container drains on SIGTERM and removes its runners' cgroups, which live in the
# host's cgroup tree (the mount is shared): stop it gracefully, never with a bare SIGKILL. A dockerd
# started here goes again, with the bridge it made.
cleanup() {
  docker logs "$cid" 2>&1 | tail -20
  docker stop -t 30 "$cid" >/dev/null 2>&1 || true
  docker rm -f "$cid" >/dev/null 2>&1 || true
  if [ -n "${started_dockerd:-}" ]; then
    $sudo kill "$(cat /tmp/poseidon-smoke-dockerd.pid)" || true
    for _ in $(seq 1 30); do docker info >/dev/null 2>&1 || break; sleep 1; done
    $sudo ip link delete docker0 2>/dev/null || true
  fi
}
trap cleanup EXIT
API="http://127.0.0.1:$port/api/v1"
for _ in $(seq 1 30); do curl -fsS -o /dev/null "$API/health" 2>/dev/null && break; sleep 1; done
set -x
curl -fsS -i -X PUT "$API/execution-environments/1" -H 'Content-Type: application/json' \
  -d '{"id":1,"image":"python","prewarmingPoolSize":1,"cpuLimit":20,"memoryLimit":256,"networkAccess":false,"exposedPorts":[]}'
sleep 3
RUNNER=$(curl -fsS -X POST "$API/runners" -H 'Content-Type: application/json' -d '{"executionEnvironmentId":1,"inactivityTimeout":60}' | sed 's/.*"runnerId":"\([^"]*\)".*/\1/')
curl -fsS -i -X PATCH "$API/runners/$RUNNER/files" -H 'Content-Type: application/json' \
  -d '{"copy":[{"path":"hello.sh","content":"'"$(printf 'echo hello from the container' | base64)"'"}]}'
curl -fsS "$API/runners/$RUNNER/files?recursive=true"
curl -fsS "$API/runners/$RUNNER/files/raw?path=hello.sh"
curl -fsS -i -X DELETE "$API/runners/$RUNNER"
curl -fsS "$API/statistics/execution-environments"
docker inspect --format '{{.State.Health.Status}}' "$cid"
set +x
echo "smoke: passed"
