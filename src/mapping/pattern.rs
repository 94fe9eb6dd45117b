//! Name patterns of mapping files: literal text with `{var}` placeholders.
//!
//! `{i}` matches one or more ASCII digits (a layer index); `{p:weight|bias}` matches one of the
//! listed alternatives. Two placeholders must be separated by literal text, so a match is unique.
//! The same syntax without alternatives is used for target templates, whose variables must all be
//! bound by the source pattern.

use std::collections::{BTreeMap, BTreeSet};

/// Variable bindings of one match, e.g. `{"i": "3", "p": "weight"}`.
pub type Bindings = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Var { name: String, alts: Option<Vec<String>> },
}

/// A compiled pattern or template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    segs: Vec<Seg>,
}

impl Pattern {
    /// Parses `text`; the error says what is wrong (the caller adds where).
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let mut segs = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(open) = rest.find('{') {
                if open > 0 {
                    segs.push(Seg::Lit(rest[..open].to_string()));
                }
                let close = rest[open..].find('}').ok_or_else(|| format!("unclosed `{{` in pattern `{text}`"))? + open;
                let body = &rest[open + 1..close];
                let (name, alts) = match body.split_once(':') {
                    Some((n, a)) => {
                        let alts: Vec<String> = a.split('|').map(str::to_string).collect();
                        if alts.iter().any(|s| s.is_empty() || s.contains(['{', '}'])) {
                            return Err(format!("empty or malformed alternative in `{{{body}}}` of pattern `{text}`"));
                        }
                        (n, Some(alts))
                    }
                    None => (body, None),
                };
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "bad placeholder name `{name}` in pattern `{text}` (use letters, digits, `_`)"
                    ));
                }
                if matches!(segs.last(), Some(Seg::Var { .. })) {
                    return Err(format!("placeholders in `{text}` must be separated by literal text"));
                }
                if segs.iter().any(|s| matches!(s, Seg::Var { name: n, .. } if n == name)) {
                    return Err(format!("placeholder `{{{name}}}` appears twice in pattern `{text}`"));
                }
                segs.push(Seg::Var { name: name.to_string(), alts });
                rest = &rest[close + 1..];
            } else {
                if rest.contains('}') {
                    return Err(format!("stray `}}` in pattern `{text}`"));
                }
                segs.push(Seg::Lit(rest.to_string()));
                rest = "";
            }
        }
        if segs.is_empty() {
            return Err("empty pattern".into());
        }
        Ok(Pattern { text: text.to_string(), segs })
    }

    /// The text the pattern was parsed from.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The placeholder names.
    pub fn vars(&self) -> BTreeSet<&str> {
        self.segs
            .iter()
            .filter_map(|s| match s {
                Seg::Var { name, .. } => Some(name.as_str()),
                Seg::Lit(_) => None,
            })
            .collect()
    }

    /// Whether the pattern has alternatives (templates must not).
    pub fn has_alternatives(&self) -> bool {
        self.segs.iter().any(|s| matches!(s, Seg::Var { alts: Some(_), .. }))
    }

    /// The alternatives of placeholder `var`; `None` for a digit placeholder or an unknown name.
    pub fn alternatives(&self, var: &str) -> Option<&[String]> {
        self.segs.iter().find_map(|s| match s {
            Seg::Var { name, alts: Some(alts) } if name == var => Some(alts.as_slice()),
            _ => None,
        })
    }

    /// Every combination of the alternatives of `vars` (each must be a placeholder with
    /// alternatives), at most `cap` of them; the error says which var is not or that there are
    /// more than `cap`.
    pub fn combinations(&self, vars: &[&str], cap: usize) -> Result<Vec<Bindings>, String> {
        let mut out = vec![Bindings::new()];
        for v in vars {
            let alts = self.alternatives(v).ok_or_else(|| {
                format!("`{{{v}}}` must be a placeholder with alternatives (`{{{v}:a|b}}`) of `{}`", self.text)
            })?;
            if out.len().saturating_mul(alts.len()) > cap {
                return Err(format!("the placeholders of `{}` give more than {cap} combinations", self.text));
            }
            out = out
                .into_iter()
                .flat_map(|b| {
                    alts.iter().map(move |a| {
                        let mut b = b.clone();
                        b.insert(v.to_string(), a.clone());
                        b
                    })
                })
                .collect();
        }
        Ok(out)
    }

    /// Matches a whole name, returning the bindings.
    pub fn matches(&self, name: &str) -> Option<Bindings> {
        let mut b = Bindings::new();
        match_from(&self.segs, name, &mut b).then_some(b)
    }

    /// Renders the pattern with `b`. Variables not in `b` are left as `{var}` (validation makes
    /// sure that cannot happen for targets).
    pub fn render(&self, b: &Bindings) -> String {
        let mut out = String::new();
        for s in &self.segs {
            match s {
                Seg::Lit(l) => out.push_str(l),
                Seg::Var { name, .. } => match b.get(name) {
                    Some(v) => out.push_str(v),
                    None => {
                        out.push('{');
                        out.push_str(name);
                        out.push('}');
                    }
                },
            }
        }
        out
    }
}

fn match_from(segs: &[Seg], s: &str, b: &mut Bindings) -> bool {
    let Some((first, rest)) = segs.split_first() else {
        return s.is_empty();
    };
    match first {
        Seg::Lit(l) => s.strip_prefix(l.as_str()).is_some_and(|t| match_from(rest, t, b)),
        Seg::Var { name, alts: Some(alts) } => alts.iter().any(|a| {
            s.strip_prefix(a.as_str()).is_some_and(|t| {
                b.insert(name.clone(), a.clone());
                match_from(rest, t, b) || {
                    b.remove(name);
                    false
                }
            })
        }),
        Seg::Var { name, alts: None } => {
            let digits = s.bytes().take_while(u8::is_ascii_digit).count();
            // Longest first; the next segment is a literal, so at most a few tries.
            (1..=digits).rev().any(|n| {
                b.insert(name.clone(), s[..n].to_string());
                match_from(rest, &s[n..], b) || {
                    b.remove(name);
                    false
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_and_renders() {
        let p = Pattern::parse("model.{side:encoder|decoder}.layers.{i}.fc1.{p:weight|bias}").unwrap();
        let b = p.matches("model.decoder.layers.11.fc1.bias").unwrap();
        assert_eq!(b["side"], "decoder");
        assert_eq!(b["i"], "11");
        assert_eq!(b["p"], "bias");
        assert!(p.matches("model.decoder.layers.x.fc1.bias").is_none());
        assert!(p.matches("model.decoder.layers.1.fc1.bias.x").is_none());
        assert!(p.matches("model.middle.layers.1.fc1.bias").is_none());
        let t = Pattern::parse("model.{side}.layers.{i}.mlp.fc1.{p}").unwrap();
        assert_eq!(t.render(&b), "model.decoder.layers.11.mlp.fc1.bias");
    }

    #[test]
    fn alternatives_backtrack() {
        let p = Pattern::parse("a.{x:b|bc}.d").unwrap();
        assert_eq!(p.matches("a.bc.d").unwrap()["x"], "bc");
    }

    #[test]
    fn enumerates_alternatives() {
        let p = Pattern::parse("m.{side:encoder|decoder}.layers.{i}.{t:fc1|fc2|x}.w").unwrap();
        assert_eq!(p.alternatives("t").unwrap(), ["fc1", "fc2", "x"]);
        assert!(p.alternatives("i").is_none() && p.alternatives("zz").is_none());
        let c = p.combinations(&["side", "t"], 100).unwrap();
        assert_eq!(c.len(), 6);
        assert_eq!((c[5]["side"].as_str(), c[5]["t"].as_str()), ("decoder", "x"));
        assert_eq!(p.combinations(&[], 100).unwrap(), vec![Bindings::new()]);
        assert!(p.combinations(&["i"], 100).unwrap_err().contains("`{i}` must be a placeholder with alternatives"));
        assert!(p.combinations(&["side", "t"], 5).unwrap_err().contains("more than 5 combinations"));
    }

    #[test]
    fn rejects_bad_patterns() {
        for bad in ["a.{i", "a.}", "a.{}", "{a}{b}", "a.{i}.{i}", "a.{x:|y}", "", "a.{x-y}"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }
}
