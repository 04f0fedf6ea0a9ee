# poseidon-ts with the local bubblewrap backend, in two stages: the build stage has the compilers and
# dev dependencies, the runtime stage only the compiled daemon, production dependencies, the static
# helpers and bubblewrap. Run it as the README's "Docker" section says (the flags are needed: sandboxes
# make namespaces and cgroups):
#   docker run --init --cap-add SYS_ADMIN --cap-add NET_ADMIN --security-opt seccomp=unconfined \
#     --security-opt apparmor=unconfined --security-opt systempaths=unconfined -v /sys/fs/cgroup:/sys/fs/cgroup:rw -p 7200:7200 poseidon-ts
# BASE is a maintained Node LTS on Debian bookworm; scripts/docker-smoke.sh can build one locally.
ARG BASE=node:22-bookworm-slim

FROM ${BASE} AS build
WORKDIR /src
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev musl-tools make libseccomp-dev \
    && rm -rf /var/lib/apt/lists/*
COPY package.json package-lock.json tsconfig.json tsconfig.build.json ./
RUN npm ci --no-fund --no-audit --ignore-scripts
COPY agent/ agent/
RUN make -C agent --no-print-directory
COPY src/ src/
RUN npm run build && npm prune --omit=dev --no-fund --no-audit

FROM ${BASE}
# bubblewrap and the tools sandboxes use; nftables/iproute2 for the private networks of runners with
# network access; tini as PID 1 (reaps orphans, forwards signals; the spawner works without it too).
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      bubblewrap util-linux tar findutils coreutils nftables iproute2 tini curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/poseidon-ts
COPY --from=build /src/package.json ./
COPY --from=build /src/node_modules/ node_modules/
COPY --from=build /src/dist/ dist/
COPY --from=build /src/agent/build/poseidon-agent /src/agent/build/poseidon-spawner /src/agent/build/seccomp.bpf agent/build/
COPY api/ api/
COPY bin/ bin/
COPY configuration.example.yaml LICENSE ./
ENV NODE_ENV=production \
    POSEIDON_SERVER_ADDRESS=0.0.0.0 \
    POSEIDON_LOCAL_STATEDIR=/var/lib/poseidon-ts
# Environments survive a new container only on a volume.
VOLUME /var/lib/poseidon-ts
EXPOSE 7200
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD curl -fsS -o /dev/null http://127.0.0.1:7200/api/v1/health || exit 1
# SIGTERM drains (server.shutdowntimeout, 15 s by default): give `docker stop -t 20` or more.
STOPSIGNAL SIGTERM
# -s: also a subreaper when docker run --init put its own init in front.
ENTRYPOINT ["/usr/bin/tini", "-s", "--"]
CMD ["node", "dist/cli.js"]
