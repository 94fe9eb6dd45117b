//! The index reader on arbitrary JSON: never a panic; accepted file names stay inside the
//! checkpoint directory.
#![no_main]
use libfuzzer_sys::fuzz_target;
use reshard::checkpoint::index;

fuzz_target!(|data: &[u8]| {
    if let Ok(idx) = index::parse_index(data, std::path::Path::new("fuzz.index.json")) {
        for f in idx.files() {
            assert!(index::is_inside(&f), "accepted {f:?}");
        }
    }
});
