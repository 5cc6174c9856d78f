//! A version 1 envelope as read, before it is checked: the shape both readers fill (the
//! exact-form reader in `canonical.rs`, and serde for any other form), which `decode.rs`
//! then validates.

use serde::Deserialize;

use crate::update::{RawUpdate, object_only};

/// A version 1 envelope as read, before it is checked: a JSON object only.
#[derive(Deserialize)]
#[serde(remote = "Self")]
#[cfg_attr(test, derive(Debug, PartialEq))]
pub(super) struct WireIn<'a> {
    pub(super) v: u64,
    pub(super) o: String,
    #[serde(default)]
    pub(super) p: Option<u32>,
    pub(super) s: u64,
    #[serde(borrow)]
    pub(super) u: Vec<RawUpdate<'a>>,
    #[serde(default, deserialize_with = "mark")]
    pub(super) t: bool,
    #[serde(default, deserialize_with = "mark")]
    pub(super) d: bool,
    #[serde(default, deserialize_with = "mark")]
    pub(super) r: bool,
    #[serde(default, deserialize_with = "mark")]
    pub(super) h: bool,
    /// When a signed envelope was sealed, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub(super) w: Option<u64>,
}

object_only!(WireIn, "an envelope object");

/// A mark field: `1`/`0` as written, and for other implementations' convenience also
/// `true`/`false` and `null` (absent).
fn mark<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mark {
        Number(u64),
        Bool(bool),
    }
    Ok(match Option::<Mark>::deserialize(deserializer)? {
        None | Some(Mark::Number(0)) | Some(Mark::Bool(false)) => false,
        Some(Mark::Number(1)) | Some(Mark::Bool(true)) => true,
        Some(Mark::Number(_)) => return Err(serde::de::Error::custom("a mark is 0 or 1")),
    })
}
