# syntax=docker/dockerfile:1
#
# dbops in a container: the console binary, plus pg_dump/pg_restore/psql,
# pg_basebackup/pg_receivewal and the server binaries of every PostgreSQL major
# it supports (dbops picks, per target, the lowest installed major that is at
# least the server's; see src/backups/pgdump.rs::pick).
#
# tests/it/deploy.rs parses this file: PG_MAJORS below must cover every
# PostgreSQL image major used in docker-compose.yml and deploy/k8s/, and the
# rules it checks (non-root USER, HEALTHCHECK, OCI labels, cargo auditable) fail
# the test suite when they are removed. README "Deploy" states the size budget.

# The majors whose client tools (and server binaries) go into the image.
ARG PG_MAJORS="13 14 15 16 17 18"
# The PostgreSQL project's archive signing key (apt.postgresql.org), pinned by
# fingerprint: the build fails if the downloaded key is another one.
ARG PGDG_KEY_FINGERPRINT=B97B0AFCAA1A47F044F244A07FCC7D46ACCC4CF8

# --- build: a release binary with templates, static files and migrations
# compiled in, and its dependency list embedded (cargo auditable) so that
# `cargo audit bin`, syft or trivy can read the SBOM from the binary itself.
FROM rust:1.95-bookworm AS build
RUN cargo install cargo-auditable --locked --version 0.7.7
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY templates templates
COPY static static
COPY migrations migrations
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo auditable build --release --locked \
 && install -m 0755 target/release/dbops /usr/local/bin/dbops

# --- keys: fetch the archive key and check its fingerprint; curl and gpg stay
# in this stage, out of the image.
FROM debian:bookworm-slim AS keys
ARG PGDG_KEY_FINGERPRINT
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
 && rm -rf /var/lib/apt/lists/*
RUN curl -fsSL https://www.postgresql.org/media/keys/ACCC4CF8.asc -o /tmp/pgdg.asc \
 && got="$(gpg --batch --show-keys --with-colons /tmp/pgdg.asc | awk -F: '$1 == "fpr" { print $10; exit }')" \
 && if [ "$got" != "$PGDG_KEY_FINGERPRINT" ]; then echo "unexpected PGDG key: $got" >&2; exit 1; fi \
 && gpg --batch --dearmor -o /pgdg.gpg /tmp/pgdg.asc

# --- the image
FROM debian:bookworm-slim
ARG PG_MAJORS
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="dbops" \
      org.opencontainers.image.description="A web console for the people who keep a team's PostgreSQL and Redis running" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim" \
      io.dbops.postgresql.majors="${PG_MAJORS}"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=keys /pgdg.gpg /usr/share/keyrings/apt.postgresql.org.gpg
# Client tools of each major (pg_dump, pg_restore, psql, pg_basebackup,
# pg_receivewal) and its server binaries (postgres, pg_ctl, initdb: replaying WAL
# for point-in-time recovery needs the server of the backup's major). No cluster
# is created: dbops makes its own, under its data directory, when it needs one.
# Versions come from the PostgreSQL archive, which carries one current minor per
# major; pinning them here would break the build at every minor release.
# hadolint ignore=DL3008
RUN echo "deb [signed-by=/usr/share/keyrings/apt.postgresql.org.gpg] http://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" \
      > /etc/apt/sources.list.d/pgdg.list \
 && mkdir -p /etc/postgresql-common/createcluster.d \
 && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/dbops.conf \
 && packages=() \
 && for major in ${PG_MAJORS}; do packages+=("postgresql-client-${major}" "postgresql-${major}"); done \
 && apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tzdata redis-tools "${packages[@]}" \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* /usr/share/man/* \
 && for major in ${PG_MAJORS}; do /usr/lib/postgresql/"${major}"/bin/pg_dump --version; done \
 && useradd --system --uid 10001 --gid 0 --home-dir /var/lib/dbops --no-create-home --shell /usr/sbin/nologin dbops \
 && install -d -o 10001 -g 0 -m 0770 /var/lib/dbops /var/lib/dbops/backups \
 && install -d -m 0755 /etc/dbops
COPY --from=build /usr/local/bin/dbops /usr/local/bin/dbops
# Only /var/lib/dbops (backups, scratch clusters) and /tmp (0600 passfiles, made
# and removed per backup) are written: run with a read-only root filesystem, a
# volume here and a tmpfs on /tmp.
VOLUME ["/var/lib/dbops"]
WORKDIR /var/lib/dbops
ENV DBOPS_CONFIG=/etc/dbops/dbops.toml
USER 10001:0
EXPOSE 8080
# `dbops healthcheck` asks /healthz on loopback: no curl or shell in the check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["dbops", "healthcheck", "--port", "8080"]
ENTRYPOINT ["dbops"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
