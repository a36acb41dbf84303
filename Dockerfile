# syntax=docker/dockerfile:1
#
# The Connected Apps image: one binary, `connected-apps serve` as the
# entry point, so a deployment picks roles with `--roles api`,
# `--roles flusher` or `--roles scheduler` (all three without).
#
#   docker build -t connected-apps .
#   docker run -e DATABASE_URL=… -e REDIS_URL=… -e JWT_SECRET=… \
#     -e DATA_ENCRYPTION_KEYS=… -e APP_ENV=production -p 8000:8000 connected-apps --roles api
#
# Stages: `chef` (the toolchain and cargo-chef), `planner` (the dependency
# recipe), `builder` (dependencies built from the recipe alone, so they
# stay cached while only the sources change; then the binary, in the
# `dist` profile),
# `runtime` (Debian slim with CA certificates, a non-root user, the
# binary). scripts/check-image.sh builds the runtime stage's root
# filesystem without a container engine and runs it.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /build

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# The dist profile (Cargo.toml): whole-program LTO, one codegen unit, no
# debug information, symbols stripped: 27 MB where a development release
# build is about 150 MB with its line tables.
ENV CARGO_INCREMENTAL=0
COPY --from=planner /build/recipe.json recipe.json
RUN cargo chef cook --profile dist --locked --recipe-path recipe.json
COPY . .
RUN cargo build --profile dist --locked --bin connected-apps

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# CA certificates, for TLS to Stripe, Redis (rediss://) and Postgres
# (sslmode=verify-full); nothing else: the binary links only libc. Not
# pinned: the roots must follow Debian's updates (a pin would keep a root
# Debian has revoked).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 connected-apps \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin connected-apps
COPY --from=builder /build/target/dist/connected-apps /usr/local/bin/connected-apps
USER 10001:10001
ENV PORT=8000 \
    BIND_ADDRESS=0.0.0.0 \
    LOG_FORMAT=json
EXPOSE 8000
# The image has no curl: the binary asks its own /health/live.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["connected-apps", "healthcheck"]
ENTRYPOINT ["connected-apps", "serve"]
