# Three targets: `build` compiles the binary, `node` is a small image that runs it as an
# unprivileged user, `test` has what the test suite needs (Rust, PostgreSQL's server
# binaries for the throwaway clusters some tests start, and PgBouncer). docker-compose.yml
# uses `node` and `test`. `test` comes last: the classic builder builds every stage before
# the target, and `node`, the common one, then skips installing the test tools.
#
# No `# syntax=` line: nothing here needs a newer Dockerfile frontend, and naming one makes
# BuildKit fetch it from a registry. Builds with the classic builder (Compose 1.29's) and
# with BuildKit alike.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# 1. The dependencies, in a layer of their own. Only the manifests go in, with empty
#    stand-ins for the crate's targets (cargo refuses a manifest whose [[test]], [[bench]]
#    or [[example]] files are missing: the awk lists them, at `path` or the default place),
#    so this layer, the slow one, is rebuilt only when Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin/updatepipe \
 && touch src/lib.rs \
 && echo 'fn main() {}' > src/bin/updatepipe/main.rs \
 && echo 'fn main() {}' > build.rs \
 && awk 'function flush() { if (dir != "" && name != "") print (path != "" ? path : dir "/" name ".rs"); dir = name = path = "" } \
         /^\[\[test\]\]/ { flush(); dir = "tests"; next } \
         /^\[\[bench\]\]/ { flush(); dir = "benches"; next } \
         /^\[\[example\]\]/ { flush(); dir = "examples"; next } \
         /^\[/ { flush(); next } \
         dir != "" && $1 == "name" { name = $3; gsub(/"/, "", name) } \
         dir != "" && $1 == "path" { path = $3; gsub(/"/, "", path) } \
         END { flush() }' Cargo.toml \
    | while read -r stub; do mkdir -p "$(dirname "$stub")"; echo 'fn main() {}' > "$stub"; done \
 && cargo build --release --locked --bin updatepipe \
 && rm -rf src build.rs \
 && rm -rf target/release/.fingerprint/updatepipe-* target/release/build/updatepipe-* \
           target/release/deps/updatepipe-* target/release/deps/libupdatepipe-*
# 2. The crate: a change to its source rebuilds from here (the stand-ins' fingerprints are
#    gone above, so cargo never mistakes them for the real thing, whatever the files'
#    times). Documentation, tests, examples and benchmarks are not copied (changing them
#    rebuilds nothing): their stand-ins stay, since the manifest still names them.
COPY build.rs ./
COPY migrations migrations
COPY src src
RUN cargo build --release --locked --bin updatepipe

FROM debian:bookworm-slim AS node
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin updatepipe
COPY --from=build /src/target/release/updatepipe /usr/local/bin/updatepipe
USER updatepipe
ENTRYPOINT ["updatepipe"]
CMD ["listen"]

FROM rust:1.95-bookworm AS test
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql pgbouncer \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
