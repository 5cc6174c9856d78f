//! Rebuilds the crate when a migration changes: they are embedded with refinery.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
