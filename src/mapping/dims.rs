//! Named dimensions of a mapping, bound to config.json keys or computed from other dims.

use super::DimSpec;
use std::collections::BTreeMap;

/// Resolved dimension values.
pub type Dims = BTreeMap<String, u64>;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(u64),
    Name(String),
    Op(char),
}

fn tokenize(expr: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if "+-*/".contains(c) {
            out.push(Tok::Op(c));
            chars.next();
        } else if c.is_ascii_alphanumeric() || c == '_' {
            let mut s = String::new();
            while let Some(&c) = chars.peek().filter(|c| c.is_ascii_alphanumeric() || **c == '_') {
                s.push(c);
                chars.next();
            }
            out.push(match s.parse() {
                Ok(n) => Tok::Num(n),
                Err(_) => Tok::Name(s),
            });
        } else {
            return Err(format!("unexpected `{c}` in expression `{expr}`"));
        }
    }
    // operand (op operand)*
    let ok = !out.is_empty()
        && out.len() % 2 == 1
        && out.iter().enumerate().all(|(i, t)| (i % 2 == 1) == matches!(t, Tok::Op(_)));
    if !ok {
        return Err(format!("expression `{expr}` must be `a op b op c ...` with op one of + - * /"));
    }
    Ok(out)
}

/// Checks an expression's syntax and that every name in it is a dim of `specs`.
pub fn check_expr(expr: &str, specs: &BTreeMap<String, DimSpec>) -> Result<(), String> {
    for t in tokenize(expr)? {
        if let Tok::Name(n) = t {
            if !specs.contains_key(&n) {
                return Err(format!("expression `{expr}` uses unknown dim `{n}` (declare it under `dims`)"));
            }
        }
    }
    Ok(())
}

/// Checks the syntax of every dim: exactly one of `config`/`expr`/`length`, names that exist, no
/// cycles.
pub fn check_specs(specs: &BTreeMap<String, DimSpec>) -> Result<(), (String, String)> {
    for (name, s) in specs {
        let at = format!("dims.{name}");
        match (&s.config, &s.expr, &s.length) {
            (Some(_), None, None) | (None, None, Some(_)) => {}
            (None, Some(e), None) => {
                if s.default.is_some() {
                    return Err((at, "`default` goes with `config` or `length`, not `expr`".into()));
                }
                check_expr(e, specs).map_err(|m| (at.clone(), m))?;
            }
            _ => return Err((at, "give exactly one of `config`, `expr` or `length`".into())),
        }
    }
    // Cycle check: evaluate against a config where every key is 1; only a cycle is an error here
    // (division by zero or inexact division depend on the real config).
    let ones = |_: &str, _: bool| Some(Ok(1));
    for name in specs.keys() {
        if let Err(e @ DimError::Cycle { .. }) = eval_json(name, specs, &ones, &mut Dims::new(), &mut Vec::new()) {
            return Err((format!("dims.{name}"), e.to_string()));
        }
    }
    Ok(())
}

/// Why a dimension could not be resolved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[allow(missing_docs)]
pub enum DimError {
    #[error("config.json has no key `{key}`, needed for dim `{dim}`")]
    MissingKey { dim: String, key: String },
    #[error("config.json key `{key}` (dim `{dim}`) is {found}, expected a non-negative integer")]
    NotInteger { dim: String, key: String, found: String },
    #[error("config.json key `{key}` (dim `{dim}`, its length) is {found}, expected a list")]
    NotList { dim: String, key: String, found: String },
    #[error("dim `{dim}` = `{expr}`: {msg}{}", if keys.is_empty() { String::new() } else { format!(" ({keys})") })]
    Arithmetic { dim: String, expr: String, msg: String, keys: String },
    #[error("dims form a cycle through `{dim}`")]
    Cycle { dim: String },
}

/// Looks up a dotted key path (`text_config.hidden_size`).
pub fn lookup<'a>(config: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(config, |v, k| v.get(k))
}

/// Resolves every dim against `config`.
pub fn resolve(specs: &BTreeMap<String, DimSpec>, config: &serde_json::Value) -> Result<Dims, DimError> {
    let get = |k: &str, length: bool| {
        lookup(config, k).map(|v| match length {
            false => v.as_u64().ok_or_else(|| v.to_string()),
            true => v.as_array().map(|a| a.len() as u64).ok_or_else(|| v.to_string()),
        })
    };
    let mut done = Dims::new();
    for name in specs.keys() {
        let mut stack = Vec::new();
        eval_json(name, specs, &get, &mut done, &mut stack).map_err(|e| match e {
            DimError::Arithmetic { dim, expr, msg, .. } => {
                let keys = provenance_text(&expr, specs, config);
                DimError::Arithmetic { dim, expr, msg, keys }
            }
            e => e,
        })?;
    }
    Ok(done)
}

/// Evaluates an expression over resolved dims (the syntax of `expr` dims).
pub fn eval(expr: &str, dims: &Dims) -> Result<u64, String> {
    let toks = tokenize(expr)?;
    let vals = toks
        .iter()
        .map(|t| match t {
            Tok::Num(n) => Ok(*n),
            Tok::Name(n) => dims.get(n).copied().ok_or_else(|| format!("unknown dim `{n}`")),
            Tok::Op(_) => Ok(0),
        })
        .collect::<Result<Vec<u64>, String>>()?;
    arithmetic(&toks, &vals)
}

/// A config.json key a dim comes from, and what config.json holds there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySource {
    /// The dotted key.
    pub key: String,
    /// ` = 32`, ` has 3 entries`, ` is absent`.
    pub value: String,
    /// The key is absent and the dim's `default` was used.
    pub defaulted: bool,
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`{}", self.key, self.value)?;
        if self.defaulted {
            f.write_str(" (absent from config.json: the default)")?;
        }
        Ok(())
    }
}

/// The config.json keys an expression is computed from, each with its value as config.json
/// gives it (`` `d_model` = 32 ``, `` `encoder_ffn_dim` = 1536 (absent from config.json: the
/// default) ``, `` `vision_config.supported_aspect_ratios` has 3 entries ``). Empty for a number.
pub fn provenance(expr: &str, specs: &BTreeMap<String, DimSpec>, config: &serde_json::Value) -> Vec<KeySource> {
    let mut out = Vec::new();
    let mut seen = Vec::new();
    collect_keys(expr, specs, config, &mut out, &mut seen);
    out
}

/// [`provenance`] as one string, `, `-separated.
pub fn provenance_text(expr: &str, specs: &BTreeMap<String, DimSpec>, config: &serde_json::Value) -> String {
    provenance(expr, specs, config).iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

fn collect_keys(
    expr: &str,
    specs: &BTreeMap<String, DimSpec>,
    config: &serde_json::Value,
    out: &mut Vec<KeySource>,
    seen: &mut Vec<String>,
) {
    for t in tokenize(expr).unwrap_or_default() {
        let Tok::Name(n) = t else { continue };
        if seen.contains(&n) {
            continue;
        }
        seen.push(n.clone());
        let Some(spec) = specs.get(&n) else { continue };
        if let Some(e) = &spec.expr {
            collect_keys(e, specs, config, out, seen);
            continue;
        }
        let (key, length) = match (&spec.config, &spec.length) {
            (Some(k), _) => (k, false),
            (None, Some(k)) => (k, true),
            (None, None) => continue,
        };
        let (value, defaulted) = match (lookup(config, key), spec.default) {
            (Some(v), _) => match v.as_array() {
                Some(a) if length => (format!(" has {} entries", a.len()), false),
                _ => (format!(" = {v}"), false),
            },
            (None, Some(d)) if length => (format!(" has {d} entries"), true),
            (None, Some(d)) => (format!(" = {d}"), true),
            (None, None) => (" is absent".to_string(), false),
        };
        out.push(KeySource { key: key.clone(), value, defaulted });
    }
}

/// `vals[0] op vals[2] op ...` left to right; `toks` is a checked `operand (op operand)*`.
fn arithmetic(toks: &[Tok], vals: &[u64]) -> Result<u64, String> {
    let mut acc = vals[0];
    for i in (1..toks.len()).step_by(2) {
        let rhs = vals[i + 1];
        let Tok::Op(op) = toks[i] else { unreachable!("checked by tokenize") };
        acc = match op {
            '+' => acc.checked_add(rhs),
            '-' => acc.checked_sub(rhs),
            '*' => acc.checked_mul(rhs),
            _ if rhs == 0 => return Err(format!("{acc} / 0")),
            _ if acc % rhs != 0 => return Err(format!("{acc} / {rhs} is not exact")),
            _ => Some(acc / rhs),
        }
        .ok_or_else(|| "overflow or negative result".to_string())?;
    }
    Ok(acc)
}

/// Reads a config key: `Some(Ok(n))`, `Some(Err(what it holds))`, or `None` when absent; with
/// `true`, the length of the list at the key.
type Getter<'a> = dyn Fn(&str, bool) -> Option<Result<u64, String>> + 'a;

fn eval_json(
    name: &str,
    specs: &BTreeMap<String, DimSpec>,
    get: &Getter<'_>,
    done: &mut Dims,
    stack: &mut Vec<String>,
) -> Result<u64, DimError> {
    if let Some(v) = done.get(name) {
        return Ok(*v);
    }
    if stack.iter().any(|s| s == name) {
        return Err(DimError::Cycle { dim: name.to_string() });
    }
    let spec = &specs[name];
    let value = if let Some(key) = spec.config.as_ref().or(spec.length.as_ref()) {
        let length = spec.config.is_none();
        match (get(key, length), spec.default) {
            (Some(Ok(v)), _) => v,
            (Some(Err(found)), _) if length => {
                return Err(DimError::NotList { dim: name.into(), key: key.clone(), found })
            }
            (Some(Err(found)), _) => return Err(DimError::NotInteger { dim: name.into(), key: key.clone(), found }),
            (None, Some(d)) => d,
            (None, None) => return Err(DimError::MissingKey { dim: name.into(), key: key.clone() }),
        }
    } else {
        let expr = spec.expr.as_deref().unwrap_or_default();
        let arith =
            |msg: String| DimError::Arithmetic { dim: name.into(), expr: expr.into(), msg, keys: String::new() };
        let toks = tokenize(expr).map_err(arith)?;
        stack.push(name.to_string());
        let mut vals = Vec::new();
        for t in &toks {
            vals.push(match t {
                Tok::Num(n) => *n,
                Tok::Name(n) => eval_json(n, specs, get, done, stack)?,
                Tok::Op(_) => 0,
            });
        }
        stack.pop();
        arithmetic(&toks, &vals).map_err(arith)?
    };
    done.insert(name.to_string(), value);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn specs(v: serde_json::Value) -> BTreeMap<String, DimSpec> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn resolves_config_keys_and_expressions() {
        let s = specs(json!({
            "hidden": {"config": "text_config.hidden_size"},
            "heads": {"config": "text_config.heads"},
            "kv": {"config": "text_config.kv", "default": 4},
            "head_dim": {"expr": "hidden / heads"},
            "rows": {"expr": "hidden + 8"}
        }));
        let d = resolve(&s, &json!({"text_config": {"hidden_size": 96, "heads": 12}})).unwrap();
        assert_eq!((d["head_dim"], d["kv"], d["rows"]), (8, 4, 104));
    }

    #[test]
    fn reports_missing_and_inexact() {
        let s = specs(json!({"h": {"config": "a.b"}, "n": {"config": "n"}, "x": {"expr": "h / n"}}));
        let e = resolve(&s, &json!({"n": 7})).unwrap_err();
        assert_eq!(e.to_string(), "config.json has no key `a.b`, needed for dim `h`");
        let e = resolve(&s, &json!({"a": {"b": 96}, "n": 7})).unwrap_err();
        assert!(e.to_string().contains("96 / 7 is not exact"), "{e}");
        let e = resolve(&s, &json!({"a": {"b": "96"}, "n": 7})).unwrap_err();
        assert!(e.to_string().contains("expected a non-negative integer"), "{e}");
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(check_specs(&specs(json!({"a": {"expr": "a * 2"}}))).unwrap_err().1.contains("cycle"));
        assert!(check_specs(&specs(json!({"a": {"expr": "b * 2"}}))).unwrap_err().1.contains("unknown dim"));
        assert!(check_specs(&specs(json!({"a": {"expr": "2 *"}}))).is_err());
        assert!(check_specs(&specs(json!({"a": {}}))).is_err());
        assert!(check_specs(&specs(json!({"a": {"config": "x"}, "b": {"expr": "a / 0"}}))).is_ok());
        assert!(check_specs(&specs(json!({"a": {"config": "x", "length": "y"}})))
            .unwrap_err()
            .1
            .contains("exactly one"));
        assert!(check_specs(&specs(json!({"a": {"expr": "2", "default": 1}}))).unwrap_err().1.contains("`default`"));
    }

    #[test]
    fn lengths_expressions_and_their_config_keys() {
        let s = specs(json!({
            "ratios": {"length": "v.ratios", "default": 8},
            "hidden": {"config": "h"},
            "heads": {"config": "n"},
            "ffn": {"config": "f", "default": 1536},
            "head_dim": {"expr": "hidden / heads"},
            "rows": {"expr": "ratios + 1"}
        }));
        let cfg = json!({"v": {"ratios": [[1, 1], [1, 2], [2, 1]]}, "h": 64, "n": 8});
        let d = resolve(&s, &cfg).unwrap();
        assert_eq!((d["rows"], d["ffn"], d["head_dim"]), (4, 1536, 8));
        assert_eq!(eval("head_dim * heads + 2", &d).unwrap(), 66);
        assert!(eval("head_dim / 3", &d).unwrap_err().contains("8 / 3 is not exact"));
        assert!(eval("nope", &d).unwrap_err().contains("unknown dim `nope`"));
        assert_eq!(provenance_text("rows * head_dim", &s, &cfg), "`v.ratios` has 3 entries, `h` = 64, `n` = 8");
        assert_eq!(provenance_text("ffn + 3", &s, &cfg), "`f` = 1536 (absent from config.json: the default)");
        assert_eq!(resolve(&s, &json!({"h": 64, "n": 8})).unwrap()["rows"], 9);
        // A zero divisor names the config key it comes from.
        let e = resolve(&s, &json!({"h": 64, "n": 0})).unwrap_err().to_string();
        assert_eq!(e, "dim `head_dim` = `hidden / heads`: 64 / 0 (`h` = 64, `n` = 0)");
        let e = resolve(&s, &json!({"h": 64, "n": 8, "v": {"ratios": 3}})).unwrap_err().to_string();
        assert!(e.contains("`v.ratios` (dim `ratios`, its length) is 3, expected a list"), "{e}");
    }
}
