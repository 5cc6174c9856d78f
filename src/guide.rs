//! The guides, as the repository's `docs/` holds them, rendered here so that they can be
//! read on docs.rs as well; the README links here. (Links from one guide to another are
//! relative to `docs/` and resolve in the repository, not on this page: use this list.)
//!
//! - [`architecture`]: the map of the modules, and the one-way flow of an update.
//! - [`delivery`]: the guarantees, and why they hold.
//! - [`wire_format`]: the notification payload, for other languages.
//! - [`operations`]: a deployment checklist; PgBouncer, standbys, the queue, sizing,
//!   monitoring and metrics, and where connection settings differ from libpq's.
//! - [`security`]: the threat model, signed updates, TLS, who may connect.
//! - [`containers`]: your own containerized integration tests with PostgreSQL and updatepipe.
//! - [`benchmarks`]: figures and how to reproduce them.
//! - [`changelog`]: what changed, release by release.

// The guides are Markdown for people first: what rustdoc would read as a link or an HTML
// tag in them is prose.
#![allow(
    clippy::doc_lazy_continuation,
    clippy::doc_markdown,
    clippy::doc_overindented_list_items,
    clippy::too_long_first_doc_paragraph,
    rustdoc::broken_intra_doc_links,
    rustdoc::invalid_html_tags,
    rustdoc::bare_urls,
    rustdoc::invalid_rust_codeblocks
)]

#[doc = include_str!("../docs/architecture.md")]
pub mod architecture {}

#[doc = include_str!("../docs/delivery.md")]
pub mod delivery {}

#[doc = include_str!("../docs/wire-format.md")]
pub mod wire_format {}

#[doc = include_str!("../docs/operations.md")]
pub mod operations {}

#[doc = include_str!("../docs/security.md")]
pub mod security {}

#[doc = include_str!("../docs/containers.md")]
pub mod containers {}

#[doc = include_str!("../BENCHMARKS.md")]
pub mod benchmarks {}

#[doc = include_str!("../CHANGELOG.md")]
pub mod changelog {}
