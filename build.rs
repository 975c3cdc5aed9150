//! Links liblgmalloc.so with the code ordinary processes run gathered at its start
//! (`scripts/hot-text.ld`, written by `scripts/hot-text`): the kernel maps a library's
//! code in 64 KiB windows around each page a process touches, so code spread over the
//! whole text left 616-736 KiB of it resident in `python3 -c pass` (480-544 KiB
//! gathered).
//!
//! Only where the linker takes the script: an empty library is linked with it first, with
//! the same compiler, target and flags, and the script is left out when that fails (a
//! linker without `INSERT`, such as mold), so the build never depends on it.
//! `LGMALLOC_NO_HOT_TEXT=1` leaves it out as well.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SCRIPT: &str = "scripts/hot-text.ld";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={SCRIPT}");
    println!("cargo:rerun-if-env-changed=LGMALLOC_NO_HOT_TEXT");
    if env::var_os("LGMALLOC_NO_HOT_TEXT").is_some_and(|v| v != "0") {
        return;
    }
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let Some(manifest) = env::var_os("CARGO_MANIFEST_DIR") else {
        return;
    };
    let script = Path::new(&manifest).join(SCRIPT);
    if !script.is_file() {
        return;
    }
    let link_arg = format!("-Wl,-T,{}", script.display());
    if linker_takes(&link_arg) {
        println!("cargo:rustc-cdylib-link-arg={link_arg}");
    } else {
        println!(
            "cargo:warning=the linker does not take {SCRIPT}: liblgmalloc.so is linked without it (more of its code resident per process)"
        );
    }
}

/// Whether an empty cdylib links with `link_arg`, built as this crate is.
fn linker_takes(link_arg: &str) -> bool {
    let Some(out_dir) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        return false;
    };
    let source = out_dir.join("hot_text_probe.rs");
    let library = out_dir.join("libhot_text_probe.so");
    let probe =
        "#[unsafe(no_mangle)]\npub extern \"C\" fn lgmalloc_hot_text_probe() -> i32 {\n    7\n}\n";
    if fs::write(&source, probe).is_err() {
        return false;
    }
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.args([
        "--edition",
        "2024",
        "--crate-type",
        "cdylib",
        "-C",
        "opt-level=1",
    ]);
    if let Ok(target) = env::var("TARGET") {
        cmd.args(["--target", &target]);
    }
    if let Ok(flags) = env::var("CARGO_ENCODED_RUSTFLAGS") {
        cmd.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    }
    cmd.arg("-C").arg(format!("link-arg={link_arg}"));
    cmd.arg("-o").arg(&library).arg(&source);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let linked = cmd.status().is_ok_and(|s| s.success()) && library.is_file();
    let _ = fs::remove_file(&library);
    linked
}
