//! Embeds the eBPF object that `cargo xtask build-ebpf` produced. When it
//! is missing (a plain `cargo check`, clippy) an empty stub is embedded and
//! the loader reports at run time how to build the real one.

use std::{env, fs, path::PathBuf};

fn main() {
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("underpass.bpf.o");
    println!("cargo:rerun-if-env-changed=UNDERPASS_EBPF_OBJECT");
    let source = env::var_os("UNDERPASS_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest = PathBuf::from(
                env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
            );
            manifest.join("../target/bpfel-unknown-none/release/underpass-ebpf")
        });
    println!("cargo:rerun-if-changed={}", source.display());
    match fs::read(&source) {
        Ok(bytes) => fs::write(&out, bytes).expect("write the embedded eBPF object"),
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {}: embedding a stub (run `cargo xtask build-ebpf`)",
                source.display()
            );
            fs::write(&out, []).expect("write the eBPF object stub");
        }
    }
}
