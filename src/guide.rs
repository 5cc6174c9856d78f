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
//! - [`maddy`]: mixed fleets with maddy's nodes, and migrating from maddy's pipe.
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

#[doc = include_str!("../docs/maddy.md")]
pub mod maddy {}

#[doc = include_str!("../docs/security.md")]
pub mod security {}

#[doc = include_str!("../docs/containers.md")]
pub mod containers {}

#[doc = include_str!("../BENCHMARKS.md")]
pub mod benchmarks {}

#[doc = include_str!("../CHANGELOG.md")]
pub mod changelog {}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "tests.rs")
            {
                out.push(path);
            }
        }
    }

    /// The map names every folder and source file under `src/`: a module added or moved
    /// without the map being told fails here.
    #[test]
    fn the_architecture_map_names_every_module() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let map = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
        let mut files = Vec::new();
        sources(&root.join("src"), &mut files);
        let mut missing = Vec::new();
        for file in &files {
            let relative = file.strip_prefix(root.join("src")).unwrap();
            let parts: Vec<String> = relative
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let name = parts.last().unwrap().clone();
            let stem = name.trim_end_matches(".rs");
            let wanted: Vec<String> = match parts.len() {
                1 => vec![format!("`{stem}`"), format!("`{name}`")],
                _ if name == "mod.rs" => vec![format!("`{}/`", parts[parts.len() - 2])],
                _ => vec![
                    format!("`{name}`"),
                    format!("`{}/{name}`", parts[parts.len() - 2]),
                ],
            };
            if !wanted.iter().any(|w| map.contains(w.as_str())) {
                missing.push(format!(
                    "{} (as {})",
                    relative.display(),
                    wanted.join(" or ")
                ));
            }
        }
        assert!(
            files.len() > 50,
            "{} files: is the walk reading src/?",
            files.len()
        );
        assert!(
            missing.is_empty(),
            "docs/architecture.md does not name: {missing:#?}"
        );
    }

    /// A number with thousands separators, as the guides write them.
    fn thousands(n: usize) -> String {
        let digits = n.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    }

    fn seconds(d: std::time::Duration) -> String {
        format!("{} s", d.as_secs())
    }

    /// Wherever a guide gives a setting's default right after naming it ("`with_x` (default
    /// N)", "`with_x`, N by default"), it is the code's: a default changed in one place and
    /// not the other fails here. And claims the code has outgrown are not made again.
    #[test]
    fn the_guides_give_the_codes_defaults() {
        use crate::*;
        let expected: Vec<(&str, String)> = vec![
            (
                "with_max_queued_pushes",
                thousands(DEFAULT_MAX_QUEUED_PUSHES),
            ),
            (
                "with_max_queued_bytes",
                format!("{} MiB", DEFAULT_MAX_QUEUED_BYTES >> 20),
            ),
            ("with_max_buffered", thousands(DEFAULT_MAX_BUFFERED)),
            ("with_log_page_rows", thousands(DEFAULT_LOG_PAGE_ROWS)),
            (
                "with_log_page_bytes",
                format!("{} MiB", DEFAULT_LOG_PAGE_BYTES >> 20),
            ),
            ("with_pool_size", DEFAULT_POOL_SIZE.to_string()),
            ("with_max_batch", thousands(DEFAULT_MAX_BATCH)),
            ("with_health_interval", seconds(DEFAULT_HEALTH_INTERVAL)),
            ("with_connect_timeout", seconds(DEFAULT_CONNECT_TIMEOUT)),
            ("with_statement_timeout", seconds(DEFAULT_STATEMENT_TIMEOUT)),
            ("with_lock_timeout", seconds(DEFAULT_LOCK_TIMEOUT)),
            (
                "with_idle_in_transaction_timeout",
                seconds(DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT),
            ),
            (
                "with_retention",
                format!("{} h", DEFAULT_RETENTION.as_secs() / 3600),
            ),
        ];
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "md"))
            .collect();
        docs.push(root.join("README.md"));
        let mut wrong = Vec::new();
        let mut checked = 0;
        for doc in &docs {
            let text = std::fs::read_to_string(doc).unwrap().replace('\n', " ");
            for stale in [
                "without paging",
                "not bounded by count",
                "everything missed in one query",
            ] {
                if text.contains(stale) {
                    wrong.push(format!("{}: {stale:?}", doc.display()));
                }
            }
            for (setter, value) in &expected {
                let name = format!("{setter}`");
                for (at, _) in text.match_indices(&name) {
                    let after: String = text[at + name.len()..].chars().take(60).collect();
                    // "(default N" right after the name, or ", N by default".
                    let given = after.strip_prefix(" (default ").or_else(|| {
                        after
                            .strip_prefix(", ")
                            .filter(|a| a.contains(" by default"))
                    });
                    let Some(given) = given.map(str::trim_start) else {
                        continue;
                    };
                    if !given.starts_with(|c: char| c.is_ascii_digit()) {
                        continue;
                    }
                    checked += 1;
                    if !given.replace(',', "").starts_with(&value.replace(',', "")) {
                        let shown = doc.file_name().unwrap().to_string_lossy();
                        wrong.push(format!(
                            "{shown}: `{setter}` {after:?}, the code says {value}"
                        ));
                    }
                }
            }
        }
        assert!(checked >= 3, "only {checked} defaults found in the guides");
        assert!(
            wrong.is_empty(),
            "the guides say otherwise than the code: {wrong:#?}"
        );
    }
}
