//! The library built with the `override` feature, for the tests that run programs on
//! it (`preload.rs`, `secure.rs`): one release build in a target directory of the
//! tests' own, shared by both (the second build is a no-op).

use std::path::{Path, PathBuf};
use std::process::Command;

/// What a `-static` program linked with `liblgmalloc.a` needs after the archive: keep
/// the archive's `malloc` (so glibc's `malloc.o` is not pulled in), then the C runtime
/// libraries Rust's std uses.
pub const STATIC_LINK_TAIL: [&str; 6] = [
    "-Wl,--undefined=malloc",
    "-lpthread",
    "-ldl",
    "-lm",
    "-lrt",
    "-lutil",
];

/// Builds `cargo build --release --features override --lib` into
/// `<tmpdir>/override-build` and returns its `release` directory (holding
/// `liblgmalloc.so` and `liblgmalloc.a`).
pub fn build_override(manifest_dir: &Path, tmpdir: &Path) -> Result<PathBuf, String> {
    let target = tmpdir.join("override-build");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release", "--features", "override", "--lib"])
        .current_dir(manifest_dir)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build --release --features override failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let release = target.join("release");
    for product in ["liblgmalloc.so", "liblgmalloc.a"] {
        if !release.join(product).is_file() {
            return Err(format!("{product} missing in {}", release.display()));
        }
    }
    Ok(release)
}
