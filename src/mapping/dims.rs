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

/// Checks the syntax of every dim: exactly one of `config`/`expr`, names that exist, no cycles.
pub fn check_specs(specs: &BTreeMap<String, DimSpec>) -> Result<(), (String, String)> {
    for (name, s) in specs {
        let at = format!("dims.{name}");
        match (&s.config, &s.expr) {
            (Some(_), None) => {}
            (None, Some(e)) => {
                if s.default.is_some() {
                    return Err((at, "`default` only goes with `config`".into()));
                }
                for t in tokenize(e).map_err(|m| (at.clone(), m))? {
                    if let Tok::Name(n) = t {
                        if !specs.contains_key(&n) {
                            return Err((at, format!("expression uses unknown dim `{n}`")));
                        }
                    }
                }
            }
            _ => return Err((at, "give exactly one of `config` or `expr`".into())),
        }
    }
    // Cycle check: evaluate against a config where every key is 1; only a cycle is an error here
    // (division by zero or inexact division depend on the real config).
    let ones = |_: &str| Some(Ok(1));
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
    #[error("dim `{dim}` = `{expr}`: {msg}")]
    Arithmetic { dim: String, expr: String, msg: String },
    #[error("dims form a cycle through `{dim}`")]
    Cycle { dim: String },
}

/// Looks up a dotted key path (`text_config.hidden_size`).
pub fn lookup<'a>(config: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(config, |v, k| v.get(k))
}

/// Resolves every dim against `config`.
pub fn resolve(specs: &BTreeMap<String, DimSpec>, config: &serde_json::Value) -> Result<Dims, DimError> {
    let get = |k: &str| lookup(config, k).map(|v| v.as_u64().ok_or_else(|| v.to_string()));
    let mut done = Dims::new();
    for name in specs.keys() {
        let mut stack = Vec::new();
        eval_json(name, specs, &get, &mut done, &mut stack)?;
    }
    Ok(done)
}

type Getter<'a> = dyn Fn(&str) -> Option<Result<u64, String>> + 'a;

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
    let value = if let Some(key) = &spec.config {
        match (get(key), spec.default) {
            (Some(Ok(v)), _) => v,
            (Some(Err(found)), _) => return Err(DimError::NotInteger { dim: name.into(), key: key.clone(), found }),
            (None, Some(d)) => d,
            (None, None) => return Err(DimError::MissingKey { dim: name.into(), key: key.clone() }),
        }
    } else {
        let expr = spec.expr.as_deref().unwrap_or_default();
        let toks = tokenize(expr).map_err(|msg| DimError::Arithmetic { dim: name.into(), expr: expr.into(), msg })?;
        stack.push(name.to_string());
        let mut vals = Vec::new();
        for t in &toks {
            vals.push(match t {
                Tok::Num(n) => Some(*n),
                Tok::Name(n) => Some(eval_json(n, specs, get, done, stack)?),
                Tok::Op(_) => None,
            });
        }
        stack.pop();
        let arith = |msg: String| DimError::Arithmetic { dim: name.into(), expr: expr.into(), msg };
        let mut acc = vals[0].expect("operand");
        for i in (1..toks.len()).step_by(2) {
            let rhs = vals[i + 1].expect("operand");
            let Tok::Op(op) = toks[i] else { unreachable!("checked by tokenize") };
            acc = match op {
                '+' => acc.checked_add(rhs),
                '-' => acc.checked_sub(rhs),
                '*' => acc.checked_mul(rhs),
                _ if rhs == 0 => return Err(arith(format!("{acc} / 0"))),
                _ if acc % rhs != 0 => return Err(arith(format!("{acc} / {rhs} is not exact"))),
                _ => Some(acc / rhs),
            }
            .ok_or_else(|| arith("overflow or negative result".into()))?;
        }
        acc
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
    }
}
