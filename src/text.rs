//! Safe rendering of names that come from files (tensor names, paths, JSON keys).
//!
//! Names read from a checkpoint are attacker-controlled: a tensor called `"\x1b]0;pwned\x07"` must
//! not reach a terminal as an escape sequence. Everything printed goes through [`q`].

use std::fmt;
use std::path::Path;

/// Sorted numbers as ranges: `0-3, 5, 8-9` (`none` when empty).
pub fn ranges(v: &[usize]) -> String {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j { v[i].to_string() } else { format!("{}-{}", v[i], v[j]) });
        i = j + 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

/// A name wrapped in backticks with control and non-printing characters escaped.
pub struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`")?;
        for c in self.0.chars() {
            if c.is_control()
                || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
            {
                for e in c.escape_unicode() {
                    write!(f, "{e}")?;
                }
            } else if c == '`' {
                f.write_str("\\`")?;
            } else {
                write!(f, "{c}")?;
            }
        }
        f.write_str("`")
    }
}

/// Quotes a name for an error message or a report.
pub fn q(s: &str) -> Quoted<'_> {
    Quoted(s)
}

/// Quotes a path for an error message (lossy for non-UTF-8 paths).
pub fn qp(p: &Path) -> String {
    q(&p.to_string_lossy()).to_string()
}

/// Renders a shape as `[a, b, c]`.
pub fn shape(s: &[usize]) -> String {
    let inner: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    format!("[{}]", inner.join(", "))
}

/// Compares names so that embedded numbers sort numerically (`layers.2` before `layers.10`).
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, _) => return std::cmp::Ordering::Less,
            (_, None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                let ta = trim_zeros(da);
                let tb = trim_zeros(db);
                let ord = ta.len().cmp(&tb.len()).then(ta.cmp(tb)).then(na.cmp(&nb));
                if ord.is_ne() {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|&&c| c == b'0').count();
    &d[n.min(d.len().saturating_sub(1))..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_characters() {
        assert_eq!(q("a\u{1b}[31mb").to_string(), "`a\\u{1b}[31mb`");
        assert_eq!(q("x\ny").to_string(), "`x\\u{a}y`");
        assert_eq!(q("model.layers.0.weight").to_string(), "`model.layers.0.weight`");
        assert_eq!(q("a\u{202e}b").to_string(), "`a\\u{202e}b`");
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["l.10.w", "l.2.w", "l.1.w", "l.02.w", "a"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["a", "l.1.w", "l.2.w", "l.02.w", "l.10.w"]);
    }
}
