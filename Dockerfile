# syntax=docker/dockerfile:1
# Build: a release binary with templates and static files compiled in.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY templates templates
COPY static static
COPY migrations migrations
RUN cargo build --release --locked && cp target/release/dbops /usr/local/bin/dbops

# Run: Debian slim with the PostgreSQL client tools dbops drives (pg_dump,
# pg_restore, psql) and nothing else.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-client redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/dbops --create-home dbops
COPY --from=build /usr/local/bin/dbops /usr/local/bin/dbops
USER dbops
WORKDIR /var/lib/dbops
ENV DBOPS_CONFIG=/etc/dbops/dbops.toml
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s CMD ["/bin/sh", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q ok <&3"]
ENTRYPOINT ["dbops"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
