# syntax=docker/dockerfile:1
# Three targets: `build` compiles the binary, `node` is a small image that runs it, `test`
# has what the test suite needs (Rust, PostgreSQL's server binaries for the throwaway
# clusters some tests start, and PgBouncer). docker-compose.yml uses `node` and `test`.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin updatepipe

FROM rust:1.95-bookworm AS test
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql pgbouncer \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

FROM debian:bookworm-slim AS node
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/updatepipe /usr/local/bin/updatepipe
USER nobody
ENTRYPOINT ["updatepipe"]
CMD ["listen"]
