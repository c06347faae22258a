# syntax=docker/dockerfile:1
# One image for `fulcrum operator` and `fulcrum proxy`: a statically linked
# binary (musl) on distroless/static, which carries CA certificates, /etc/passwd
# entries for the non-root user 65532 and nothing else (no shell).
#
#   docker build -t fulcrum:dev .
#
# Reproducible inputs: the toolchain version is pinned, dependencies come from
# Cargo.lock (--locked), and the binary is built for the build platform's
# architecture (buildx: --platform linux/amd64,linux/arm64).

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
RUN rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
# Manifests first, so that a source change does not refetch the dependencies.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
RUN cargo fetch --locked
RUN cargo build --release --locked --bin fulcrum --target "$(uname -m)-unknown-linux-musl" \
    && cp "target/$(uname -m)-unknown-linux-musl/release/fulcrum" /fulcrum \
    && strip /fulcrum \
    && /fulcrum --version

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.source="https://github.com/fulcrum-dev/fulcrum" \
      org.opencontainers.image.description="Fulcrum: a Kubernetes operator and Rust load-balancing proxy" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /fulcrum /usr/local/bin/fulcrum
USER 65532:65532
# The operator's health port and the proxy's traffic and admin ports.
EXPOSE 8080 15080 15090
# The binary answers its own health probes (/healthz); the orchestrator runs them.
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/fulcrum"]
CMD ["--help"]
