//! Engine targets: which engine, and which range of its releases, an output must load in.
//!
//! The set of tensors an engine's `state_dict()` holds changes between releases (vLLM's attention
//! layers gained persistent `_k_scale`-style buffers at one release, and its sharded-state loader
//! requires every key and refuses unknown ones), so one mapping file can declare several targets
//! (`engines`), each a named, inclusive version range, and rules and constants that apply to some
//! of them only. `--target` picks one by name or by a release (`vllm==0.20.1`).

use serde::{Deserialize, Serialize};
use std::fmt;

/// A release number `major.minor.patch` (a `.postN` or local suffix is ignored: post releases
/// keep the code of their release).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub [u32; 3]);

impl Version {
    /// Parses `0.11`, `0.11.0`, `0.10.1.1` (the fourth number is ignored) or `0.11.2.post2`.
    pub fn parse(s: &str) -> Result<Version, String> {
        let core = s.split(['+', '-']).next().unwrap_or_default();
        let mut nums = Vec::new();
        for p in core.split('.') {
            if p.starts_with("post") || p.starts_with("dev") || p.starts_with("rc") {
                break;
            }
            nums.push(p.parse::<u32>().map_err(|_| format!("`{s}` is not a release number like 0.11.0"))?);
        }
        if nums.len() < 2 || nums.len() > 4 {
            return Err(format!("`{s}` is not a release number like 0.11.0"));
        }
        Ok(Version([nums[0], nums[1], nums.get(2).copied().unwrap_or(0)]))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c] = self.0;
        write!(f, "{a}.{b}.{c}")
    }
}

/// One target of a mapping file: an engine and an inclusive range of its releases whose model
/// code gives the same `state_dict()` for this family.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineTarget {
    /// Name users pass to `--target` (`vllm-0.11`).
    pub name: String,
    /// Engine (`vllm`).
    pub engine: String,
    /// First release of the range.
    pub min_version: String,
    /// Last release of the range.
    pub max_version: String,
    /// Which model code of the engine loads the output (`in-tree model_executor/models/whisper.py`).
    pub model_code: String,
    /// What proves that the engine loads the output, and what does not: a test, a recorded check,
    /// or a reading of the source only.
    pub evidence: String,
}

impl EngineTarget {
    /// The range as parsed versions (checked when the mapping loads).
    pub fn range(&self) -> (Version, Version) {
        let v = |s: &str| Version::parse(s).unwrap_or(Version([0, 0, 0]));
        (v(&self.min_version), v(&self.max_version))
    }

    /// Whether `v` is inside the range.
    pub fn contains(&self, v: Version) -> bool {
        let (lo, hi) = self.range();
        lo <= v && v <= hi
    }

    /// `vllm-0.11 (vllm 0.11.0 to 0.32.0)`.
    pub fn describe(&self) -> String {
        format!("{} ({} {} to {})", self.name, self.engine, self.min_version, self.max_version)
    }
}

/// Checks a mapping's targets: names unique, versions parse, ranges ordered and disjoint per
/// engine; and that the default names one of them. Errors are `(json path, message)`.
pub fn check_targets(targets: &[EngineTarget], default: Option<&str>) -> Result<(), (String, String)> {
    for (i, t) in targets.iter().enumerate() {
        let at = |k: &str| format!("engines[{i}].{k}");
        if t.name.is_empty() || t.name.contains(char::is_whitespace) || t.name.contains("==") {
            return Err((at("name"), format!("`{}` is not a usable target name", t.name)));
        }
        let lo = Version::parse(&t.min_version).map_err(|m| (at("min_version"), m))?;
        let hi = Version::parse(&t.max_version).map_err(|m| (at("max_version"), m))?;
        if lo > hi {
            return Err((at("max_version"), format!("{} is before min_version {}", t.max_version, t.min_version)));
        }
        for (j, u) in targets[..i].iter().enumerate() {
            if u.name == t.name {
                return Err((at("name"), format!("`{}` is also the name of engines[{j}]", t.name)));
            }
            let (ulo, uhi) = u.range();
            if u.engine == t.engine && lo <= uhi && ulo <= hi {
                return Err((at("min_version"), format!("range overlaps engines[{j}] (`{}`)", u.name)));
            }
        }
    }
    match (default, targets.is_empty()) {
        (None, false) => Err(("default_engine".into(), "required when `engines` are declared".into())),
        (Some(_), true) => Err(("default_engine".into(), "given, but no `engines` are declared".into())),
        (Some(d), false) if !targets.iter().any(|t| t.name == d) => {
            Err(("default_engine".into(), format!("`{d}` is not the name of one of `engines`")))
        }
        _ => Ok(()),
    }
}

/// The target `want` selects: a target name, or `ENGINE==VERSION` (the target whose range holds
/// that release). `None` selects the default. The error says why; [`known_hint`] lists the
/// known targets.
pub fn select<'a>(
    targets: &'a [EngineTarget],
    default: Option<&str>,
    want: Option<&str>,
) -> Result<Option<&'a EngineTarget>, String> {
    let Some(want) = want.or(default) else { return Ok(None) };
    if let Some(t) = targets.iter().find(|t| t.name == want) {
        return Ok(Some(t));
    }
    let by_release = want.split_once("==").map(|(e, v)| (e.trim(), Version::parse(v.trim())));
    if let Some((engine, Ok(v))) = &by_release {
        if let Some(t) = targets.iter().find(|t| t.engine == *engine && t.contains(*v)) {
            return Ok(Some(t));
        }
    }
    let why = match by_release {
        Some((_, Err(m))) => m,
        Some((engine, Ok(v))) => format!("no target covers {engine} {v}"),
        None => format!("`{want}` is not a target"),
    };
    Err(why)
}

/// The hint after an unknown target: the known ones, and an example of `ENGINE==VERSION`.
pub fn known_hint(targets: &[EngineTarget]) -> String {
    match targets.last() {
        None => "this mapping declares no targets".into(),
        Some(last) => format!(
            "known targets: {}; or give ENGINE==VERSION, e.g. `{}=={}`",
            targets.iter().map(EngineTarget::describe).collect::<Vec<_>>().join(", "),
            last.engine,
            last.max_version
        ),
    }
}

/// Whether a rule limited to `names` (or to all targets, with `None`) applies to `target`.
pub fn applies(names: &Option<Vec<String>>, target: Option<&EngineTarget>) -> bool {
    match (names, target) {
        (None, _) => true,
        (Some(n), Some(t)) => n.iter().any(|x| x == &t.name),
        (Some(_), None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, lo: &str, hi: &str) -> EngineTarget {
        EngineTarget {
            name: name.into(),
            engine: "vllm".into(),
            min_version: lo.into(),
            max_version: hi.into(),
            model_code: String::new(),
            evidence: String::new(),
        }
    }

    #[test]
    fn versions_parse_and_order() {
        assert_eq!(Version::parse("0.11").unwrap(), Version([0, 11, 0]));
        assert_eq!(Version::parse("0.10.1.1").unwrap(), Version([0, 10, 1]));
        assert_eq!(Version::parse("0.11.2.post2").unwrap(), Version([0, 11, 2]));
        assert_eq!(Version::parse("0.13.0+cpu").unwrap(), Version([0, 13, 0]));
        assert!(Version::parse("0.9.2").unwrap() < Version::parse("0.10.0").unwrap());
        for bad in ["", "1", "a.b", "0.x.1", "1.2.3.4.5"] {
            assert!(Version::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn select_by_name_release_or_default() {
        let ts = [t("old", "0.8.5", "0.10.2"), t("new", "0.11.0", "0.32.0")];
        assert_eq!(select(&ts, Some("new"), None).unwrap().unwrap().name, "new");
        assert_eq!(select(&ts, Some("new"), Some("old")).unwrap().unwrap().name, "old");
        assert_eq!(select(&ts, Some("new"), Some("vllm==0.10.1.1")).unwrap().unwrap().name, "old");
        assert_eq!(select(&ts, Some("new"), Some("vllm==0.20.1")).unwrap().unwrap().name, "new");
        assert_eq!(select(&ts, Some("new"), Some("vllm==0.33.0")).unwrap_err(), "no target covers vllm 0.33.0");
        assert_eq!(select(&ts, Some("new"), Some("sglang")).unwrap_err(), "`sglang` is not a target");
        assert!(select(&ts, Some("new"), Some("vllm==x")).unwrap_err().contains("not a release number"));
        assert_eq!(select(&[], None, None).unwrap(), None);
        assert!(select(&[], None, Some("new")).is_err());
        assert_eq!(
            known_hint(&ts),
            "known targets: old (vllm 0.8.5 to 0.10.2), new (vllm 0.11.0 to 0.32.0); or give ENGINE==VERSION, e.g. `vllm==0.32.0`"
        );
        assert_eq!(known_hint(&[]), "this mapping declares no targets");
    }

    #[test]
    fn bad_target_lists_are_refused() {
        let at = |ts: &[EngineTarget], d: Option<&str>| check_targets(ts, d).unwrap_err().0;
        assert_eq!(at(&[t("a", "0.11.0", "0.10.0")], Some("a")), "engines[0].max_version");
        assert_eq!(at(&[t("a", "0.1.0", "0.5.0"), t("b", "0.5.0", "0.6.0")], Some("a")), "engines[1].min_version");
        assert_eq!(at(&[t("a", "0.1.0", "0.2.0"), t("a", "0.3.0", "0.4.0")], Some("a")), "engines[1].name");
        assert_eq!(at(&[t("a", "0.1.0", "0.2.0")], None), "default_engine");
        assert_eq!(at(&[t("a", "0.1.0", "0.2.0")], Some("b")), "default_engine");
        assert_eq!(at(&[], Some("b")), "default_engine");
        assert_eq!(at(&[t("a b", "0.1.0", "0.2.0")], Some("a b")), "engines[0].name");
        assert!(check_targets(&[t("a", "0.1.0", "0.2.0"), t("b", "0.3.0", "0.4")], Some("b")).is_ok());
    }
}
