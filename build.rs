//! Bundles every `mappings/*.json` into the binary: a new family is one mapping file, no Rust
//! (issue #17). Writes `$OUT_DIR/builtin_mappings.rs`, the list `mapping::BUILTIN` includes.

use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
            .collect(),
        Err(e) => {
            println!("cargo:warning=cannot list {}: {e}", dir.display());
            Vec::new()
        }
    };
    names.sort();
    let mut code = String::from("&[\n");
    for n in &names {
        let path = dir.join(n);
        println!("cargo:rerun-if-changed={}", path.display());
        code += &format!("    ({n:?}, include_str!({:?})),\n", path.display().to_string());
    }
    code += "]\n";
    let out = Path::new(&std::env::var_os("OUT_DIR").unwrap_or_default()).join("builtin_mappings.rs");
    if let Err(e) = std::fs::write(&out, code) {
        panic!("cannot write {}: {e}", out.display());
    }
}
