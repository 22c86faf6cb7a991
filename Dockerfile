# syntax=docker/dockerfile:1
# Duang Duang relay: one image with both binaries, duang-gateway and duang-admin.
#
#   docker build -t duang .
#   docker run --rm -v "$PWD/deploy/conf:/etc/duang:ro" --env-file deploy/duang.env duang duang-gateway check-conf
#
# The conf directory is not baked in: mount it at /etc/duang (read-only is enough). What the
# processes write (the gateway's settlement journal, a SQLite file, the admin's outbox) goes to
# /var/lib/duang, a volume. deploy/compose.yaml runs the whole relay from this image.

# The toolchain the project is built and tested with (Cargo.toml's rust-version is the oldest).
ARG RUST_VERSION=1.95

# ── 1. Build: the deployment profile (fat LTO, one codegen unit; about 10 minutes on 2 cores) ──
FROM rust:${RUST_VERSION}-bookworm AS build
# pingora-core builds zlib-ng (libz-ng-sys) with cmake.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The caches keep the registry and the dependencies' objects between builds; the binaries are
# copied out of the cached target dir, which is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked --bins \
 && mkdir -p /out \
 && cp target/dist/duang-gateway target/dist/duang-admin /out/

# ── 2. Run: Debian slim, no compiler, a user without a shell or a password ────────────────────
FROM debian:bookworm-slim AS runtime
# ca-certificates: the system's trust roots for https:// providers, Stripe and SMTP over TLS.
# curl: the health checks (GET /readyz on the metrics listener).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 duang \
 && useradd --system --uid 10001 --gid duang --home-dir /var/lib/duang --shell /usr/sbin/nologin duang \
 && mkdir -p /etc/duang /var/lib/duang \
 && chown duang:duang /var/lib/duang
COPY --from=build /out/duang-gateway /out/duang-admin /usr/local/bin/
USER duang:duang
WORKDIR /var/lib/duang
ENV DUANG_CONF=/etc/duang/duang.toml \
    RUST_LOG=info
VOLUME ["/etc/duang", "/var/lib/duang"]
# The API, the admin, the gateway's metrics (as deploy/conf/duang.toml sets them).
EXPOSE 8080 8081 9090
# tini forwards SIGTERM to the process and reaps children: the gateway drains on SIGTERM (its
# streams finish within gateway.graceful_shutdown_timeout_ms), so give `docker stop` more than
# that (compose: stop_grace_period).
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["duang-gateway"]
