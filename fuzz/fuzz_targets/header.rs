//! The safetensors header reader on arbitrary file images: never a panic, and every accepted
//! header describes tensors inside the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use reshard::checkpoint::header;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let p = Path::new("fuzz.safetensors");
    let size = data.len() as u64;
    let Ok(n) = header::header_len(p, data, size) else { return };
    let Some(json) = data.get(8..8 + n as usize) else { panic!("accepted a header length past the data") };
    if let Ok(h) = header::parse(p, json, size) {
        for t in h.tensors.values() {
            assert!(t.start >= h.data_base && t.start <= t.end && t.end <= size);
            let elems: u64 = t.shape.iter().map(|&d| d as u64).product();
            assert_eq!(t.end - t.start, elems * t.dtype.size() as u64);
        }
    }
});
