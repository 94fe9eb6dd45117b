//! The mapping parser on arbitrary text: never a panic; an accepted mapping's patterns render
//! and match consistently.
#![no_main]
use libfuzzer_sys::fuzz_target;
use reshard::mapping::Mapping;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(m) = Mapping::parse(text, "fuzz.json") {
        let config = serde_json::json!({});
        let _ = reshard::mapping::dims::resolve(&m.file.dims, &config);
        for r in &m.rules {
            for p in &r.parts {
                let _ = p.pattern.matches(p.pattern.as_str());
            }
        }
    }
});
