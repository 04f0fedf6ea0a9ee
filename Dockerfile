# poseidon-ts with the local bubblewrap backend. Sandboxes need namespaces and cgroups, so run it
# privileged (or with CAP_SYS_ADMIN and a writable cgroup mount):
#   docker build -t poseidon-ts . && docker run --privileged -p 7200:7200 poseidon-ts
FROM node:20-bookworm-slim
WORKDIR /opt/poseidon-ts
COPY . .
# The same set-up script as on a host: system packages (bubblewrap, ...) and npm dependencies.
RUN bash scripts/setup.sh && rm -rf /var/lib/apt/lists/*
ENV POSEIDON_SERVER_ADDRESS=0.0.0.0 \
    POSEIDON_LOCAL_STATEDIR=/var/lib/poseidon-ts
EXPOSE 7200
CMD ["node", "--import", "tsx", "src/cli.ts"]
