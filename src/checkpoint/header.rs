//! Parsing and validating one safetensors header, treating the file as hostile.
//!
//! Checks: the 8-byte length prefix, a header cap, UTF-8 JSON of the expected shape, known dtypes,
//! checked shape and size arithmetic, and data offsets that tile the data area exactly (no gap, no
//! overlap, nothing past the end of the file).

use super::{CheckpointError, HeaderProblem};
use crate::dtype::Dtype;
use crate::text::q;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Largest header accepted, as in the safetensors crate.
pub const MAX_HEADER: u64 = 100_000_000;

/// One tensor as its file describes it. Offsets are absolute within the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawTensor {
    /// Element type.
    pub dtype: Dtype,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// First byte of the data, from the start of the file.
    pub start: u64,
    /// One past the last byte of the data, from the start of the file.
    pub end: u64,
}

/// The parsed header of one file.
#[derive(Debug)]
pub struct Header {
    /// Length of the whole header region, prefix included (data begins here).
    pub data_base: u64,
    /// Tensors by name.
    pub tensors: BTreeMap<String, RawTensor>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Reads the length prefix; returns the header length in bytes.
pub fn header_len(path: &Path, prefix: &[u8], file_size: u64) -> Result<u64, CheckpointError> {
    let bad = |problem| CheckpointError::Header { path: path.to_owned(), problem };
    let Some(p) = prefix.get(..8) else {
        return Err(bad(HeaderProblem::Truncated { size: file_size }));
    };
    let n = u64::from_le_bytes(p.try_into().expect("8 bytes"));
    if n > MAX_HEADER {
        return Err(bad(HeaderProblem::TooLarge { len: n }));
    }
    if n.checked_add(8).is_none_or(|end| end > file_size) {
        return Err(bad(HeaderProblem::BeyondFile { len: n, size: file_size }));
    }
    Ok(n)
}

/// Parses the JSON header `json` of a file of `file_size` bytes.
pub fn parse(path: &Path, json: &[u8], file_size: u64) -> Result<Header, CheckpointError> {
    let bad = |problem| CheckpointError::Header { path: path.to_owned(), problem };
    let data_base = 8 + json.len() as u64;
    let text = std::str::from_utf8(json).map_err(|e| bad(HeaderProblem::Json(format!("not UTF-8: {e}"))))?;
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(text.trim_end_matches(' ')).map_err(|e| bad(HeaderProblem::Json(e.to_string())))?;
    let mut tensors = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            let ok = value.as_object().is_some_and(|m| m.values().all(|v| v.is_string()));
            if !ok {
                return Err(bad(HeaderProblem::Json("`__metadata__` must map strings to strings".into())));
            }
            continue;
        }
        let entry: Entry = serde_json::from_value(value)
            .map_err(|e| bad(HeaderProblem::Entry { tensor: name.clone(), msg: e.to_string() }))?;
        let dtype: Dtype = entry
            .dtype
            .parse()
            .map_err(|_| bad(HeaderProblem::UnknownDtype { tensor: name.clone(), dtype: entry.dtype.clone() }))?;
        let shape: Vec<usize> = entry
            .shape
            .iter()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<_>>()
            .ok_or_else(|| bad(HeaderProblem::Entry { tensor: name.clone(), msg: "dimension too large".into() }))?;
        let bytes = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad(HeaderProblem::Entry { tensor: name.clone(), msg: "size overflows".into() }))?;
        let [s, e] = entry.data_offsets;
        if e < s || e - s != bytes {
            return Err(bad(HeaderProblem::SizeMismatch {
                tensor: name,
                dtype,
                shape,
                offsets: [s, e],
                expected: bytes,
            }));
        }
        let start = data_base.checked_add(s);
        let end = data_base.checked_add(e);
        let (Some(start), Some(end)) = (start, end) else {
            return Err(bad(HeaderProblem::BeyondEnd { tensor: name, end: e, data_len: file_size - data_base }));
        };
        tensors.insert(name, RawTensor { dtype, shape, start, end });
    }
    // Offsets must tile [data_base, file_size) exactly.
    let mut order: Vec<(&String, &RawTensor)> = tensors.iter().collect();
    order.sort_by_key(|(n, t)| (t.start, t.end, n.as_str()));
    let mut cursor = data_base;
    let mut prev: Option<&str> = None;
    for (name, t) in &order {
        if t.start != cursor {
            let problem = if t.start < cursor {
                HeaderProblem::Overlap { a: prev.unwrap_or("").to_string(), b: name.to_string() }
            } else {
                HeaderProblem::Gap {
                    after: prev.map(str::to_string),
                    before: name.to_string(),
                    bytes: t.start - cursor,
                }
            };
            return Err(bad(problem));
        }
        cursor = t.end;
        prev = Some(name.as_str());
    }
    if cursor != file_size {
        if cursor > file_size {
            let name = prev.unwrap_or("").to_string();
            return Err(bad(HeaderProblem::BeyondEnd {
                tensor: name,
                end: cursor - data_base,
                data_len: file_size - data_base,
            }));
        }
        return Err(bad(HeaderProblem::TrailingBytes { bytes: file_size - cursor }));
    }
    Ok(Header { data_base, tensors })
}

impl std::fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderProblem::Truncated { size } => write!(f, "file is {size} bytes, too short for a safetensors header"),
            HeaderProblem::TooLarge { len } => write!(f, "header length {len} exceeds the {MAX_HEADER}-byte cap"),
            HeaderProblem::BeyondFile { len, size } => {
                write!(f, "header length {len} runs past the end of the {size}-byte file (truncated?)")
            }
            HeaderProblem::Json(m) => write!(f, "header is not valid safetensors JSON: {m}"),
            HeaderProblem::Entry { tensor, msg } => write!(f, "tensor {}: {msg}", q(tensor)),
            HeaderProblem::UnknownDtype { tensor, dtype } => {
                write!(f, "tensor {} has unsupported dtype {}", q(tensor), q(dtype))
            }
            HeaderProblem::SizeMismatch { tensor, dtype, shape, offsets, expected } => write!(
                f,
                "tensor {}: {dtype} {} needs {expected} bytes but data_offsets [{}, {}] span {}",
                q(tensor),
                crate::text::shape(shape),
                offsets[0],
                offsets[1],
                offsets[1].saturating_sub(offsets[0])
            ),
            HeaderProblem::Overlap { a, b } => write!(f, "tensors {} and {} overlap", q(a), q(b)),
            HeaderProblem::Gap { after: Some(a), before, bytes } => {
                write!(f, "{bytes} unclaimed bytes between tensors {} and {}", q(a), q(before))
            }
            HeaderProblem::Gap { after: None, before, bytes } => {
                write!(f, "{bytes} unclaimed bytes before the first tensor {}", q(before))
            }
            HeaderProblem::BeyondEnd { tensor, end, data_len } => write!(
                f,
                "tensor {} ends at data offset {end}, past the {data_len}-byte data area (truncated file?)",
                q(tensor)
            ),
            HeaderProblem::TrailingBytes { bytes } => {
                write!(f, "{bytes} bytes after the last tensor belong to no tensor")
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a safetensors file image from (name, dtype, shape, data) with the given header JSON hook.
    pub fn image(entries: &[(&str, &str, &[usize], &[u8])]) -> Vec<u8> {
        let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
        let mut off = 0usize;
        let mut data = Vec::new();
        for (name, dt, shape, bytes) in entries {
            let sh: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            header += &format!(
                ",\"{name}\":{{\"dtype\":\"{dt}\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
                sh.join(","),
                off + bytes.len()
            );
            off += bytes.len();
            data.extend_from_slice(bytes);
        }
        header.push('}');
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&data);
        out
    }

    fn parse_image(img: &[u8]) -> Result<Header, CheckpointError> {
        let p = Path::new("x.safetensors");
        let n = header_len(p, img, img.len() as u64)?;
        parse(p, &img[8..8 + n as usize], img.len() as u64)
    }

    #[test]
    fn parses_a_valid_header() {
        let img = image(&[("a", "F32", &[2], &[0; 8]), ("b", "BF16", &[1, 2], &[1; 4])]);
        let h = parse_image(&img).unwrap();
        assert_eq!(h.tensors["b"].shape, vec![1, 2]);
        assert_eq!(h.tensors["b"].end, img.len() as u64);
    }

    #[test]
    fn rejects_hostile_headers() {
        let msg = |img: &[u8]| parse_image(img).unwrap_err().to_string();
        assert!(msg(&[1, 2, 3]).contains("too short"));
        let mut img = image(&[("a", "F32", &[2], &[0; 8])]);
        img.truncate(img.len() - 1);
        assert!(msg(&img).contains("past the"), "{}", msg(&img));
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(msg(&huge).contains("cap"));
        let mut beyond = 64u64.to_le_bytes().to_vec();
        beyond.extend_from_slice(b"{}      ");
        assert!(msg(&beyond).contains("runs past"));
        let bad_json = image(&[("a", "F32", &[2], &[0; 8])]);
        let mut bj = bad_json.clone();
        bj[8] = b'[';
        assert!(msg(&bj).contains("JSON"));
        assert!(msg(&image(&[("w", "F4", &[2], &[0; 1])])).contains("unsupported dtype `F4`"));
        assert!(msg(&image(&[("w", "F32", &[3], &[0; 8])])).contains("needs 12 bytes"));
        let overflow = image(&[("w", "F32", &[usize::MAX / 2, 4], &[])]);
        assert!(msg(&overflow).contains("overflow"));
        let mut trailing = image(&[("a", "F32", &[2], &[0; 8])]);
        trailing.extend_from_slice(&[0; 4]);
        assert!(msg(&trailing).contains("belong to no tensor"));
    }

    #[test]
    fn rejects_overlaps_and_gaps() {
        let hdr = |json: &str, data: usize| {
            let mut j = json.to_string();
            while j.len() % 8 != 0 {
                j.push(' ');
            }
            let mut v = (j.len() as u64).to_le_bytes().to_vec();
            v.extend_from_slice(j.as_bytes());
            v.extend(std::iter::repeat_n(0u8, data));
            v
        };
        let overlap = hdr(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
            6,
        );
        assert!(parse_image(&overlap).unwrap_err().to_string().contains("overlap"));
        let gap = hdr(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[6,10]}}"#,
            10,
        );
        assert!(parse_image(&gap).unwrap_err().to_string().contains("2 unclaimed bytes between tensors `a` and `b`"));
        let extra_key = hdr(r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}"#, 1);
        assert!(parse_image(&extra_key).unwrap_err().to_string().contains("unknown field"));
    }
}
