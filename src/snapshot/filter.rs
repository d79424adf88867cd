//! containerd's filter syntax for Walk: `field==value`, `field!=value`, `field~=regexp`,
//! `field` (present); `,` joins conditions of one filter (AND); several filters are ORed.
//! Fields: `name`, `parent`, `kind`, `labels."key"` (or `labels.key`).

use regex_lite::Regex;

use super::Info;

#[derive(Debug)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Match(Regex),
}

#[derive(Debug)]
struct Cond {
    field: Vec<String>,
    op: Op,
}

#[derive(Debug, Default)]
pub struct Filter {
    any_of: Vec<Vec<Cond>>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid filter {filter:?}: {why}")]
pub struct FilterError {
    pub filter: String,
    pub why: String,
}

impl Filter {
    pub fn parse(filters: &[String]) -> Result<Self, FilterError> {
        let mut any_of = Vec::new();
        for f in filters.iter().filter(|f| !f.trim().is_empty()) {
            let mut all = Vec::new();
            for part in split_top(f, ',') {
                all.push(parse_cond(&part).map_err(|why| FilterError {
                    filter: f.clone(),
                    why,
                })?);
            }
            any_of.push(all);
        }
        Ok(Self { any_of })
    }

    pub fn matches(&self, info: &Info) -> bool {
        self.any_of.is_empty()
            || self
                .any_of
                .iter()
                .any(|all| all.iter().all(|c| cond_matches(c, info)))
    }
}

fn cond_matches(c: &Cond, info: &Info) -> bool {
    let value: Option<String> = match c.field.first().map(String::as_str) {
        Some("name") if c.field.len() == 1 => Some(info.name.clone()),
        // containerd's adaptors (metadata, snapshots/storage) always report parent as present:
        // its metadata store walks the backend with `parent==""` for a bottom layer.
        Some("parent") if c.field.len() == 1 => Some(info.parent.clone()),
        Some("kind") if c.field.len() == 1 => Some(info.kind.as_str().to_string()),
        Some("labels") if c.field.len() == 2 => info.labels.get(&c.field[1]).cloned(),
        _ => None,
    };
    match (&c.op, value) {
        (Op::Present, v) => v.is_some(),
        (Op::Eq(want), Some(v)) => &v == want,
        (Op::Ne(want), Some(v)) => &v != want,
        (Op::Ne(want), None) => !want.is_empty(), // containerd: an absent field is ""
        (Op::Match(re), Some(v)) => re.is_match(&v),
        _ => false,
    }
}

/// Splits on `sep` outside double quotes.
fn split_top(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for ch in s.chars() {
        if escaped {
            cur.push(ch);
            escaped = false;
            continue;
        }
        match ch {
            '\\' if quoted => {
                cur.push(ch);
                escaped = true;
            }
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            c if c == sep && !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().map(|p| p.trim().to_string()).collect()
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        let inner = &s[1..s.len() - 1];
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            } else {
                out.push(c);
            }
        }
        out
    } else {
        s.to_string()
    }
}

fn parse_cond(s: &str) -> Result<Cond, String> {
    // Find the operator outside quotes.
    let bytes = s.as_bytes();
    let mut quoted = false;
    let mut op_at = None;
    for i in 0..bytes.len() {
        match bytes[i] {
            b'"' => quoted = !quoted,
            b'=' | b'!' | b'~' if !quoted && i + 1 < bytes.len() && bytes[i + 1] == b'=' => {
                op_at = Some(i);
                break;
            }
            _ => {}
        }
    }
    let (field_s, op) = match op_at {
        None => (s, Op::Present),
        Some(i) => {
            let value = unquote(&s[i + 2..]);
            let op = match bytes[i] {
                b'=' => Op::Eq(value),
                b'!' => Op::Ne(value),
                _ => Op::Match(Regex::new(&value).map_err(|e| e.to_string())?),
            };
            (&s[..i], op)
        }
    };
    let field: Vec<String> = split_top(field_s.trim(), '.')
        .into_iter()
        .map(|p| unquote(&p))
        .collect();
    let field = if field.len() > 2 && field[0] == "labels" {
        // labels.a.b without quotes: the rest is the key.
        vec!["labels".to_string(), field[1..].join(".")]
    } else {
        field
    };
    if field.iter().any(String::is_empty) {
        return Err("empty field name".into());
    }
    match field[0].as_str() {
        "name" | "parent" | "kind" if field.len() == 1 => {}
        "labels" if field.len() == 2 => {}
        other => return Err(format!("unknown field {other:?}")),
    }
    Ok(Cond { field, op })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Kind;

    fn info(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.into(),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn containerd_filters() {
        let a = info("a", "", Kind::Committed, &[("containerd.io/gc.root", "x")]);
        let b = info("b", "a", Kind::Active, &[]);
        let f = |s: &[&str]| {
            Filter::parse(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        assert!(f(&["name==a"]).matches(&a) && !f(&["name==a"]).matches(&b));
        assert!(f(&["parent==a"]).matches(&b));
        assert!(f(&["kind==active"]).matches(&b) && !f(&["kind==active"]).matches(&a));
        assert!(f(&[r#"labels."containerd.io/gc.root""#]).matches(&a));
        assert!(f(&[r#"labels."containerd.io/gc.root"==x,name==a"#]).matches(&a));
        assert!(!f(&[r#"labels."containerd.io/gc.root"==y"#]).matches(&a));
        assert!(f(&["name==zz", "name==b"]).matches(&b));
        assert!(f(&["name~=^[ab]$"]).matches(&b));
        assert!(f(&["name!=a"]).matches(&b));
        // parent is always present ("" without one), as in containerd's adaptors: its
        // metadata store walks a remote snapshotter with `parent==""` for a bottom layer.
        assert!(f(&[r#"parent=="""#]).matches(&a) && !f(&[r#"parent=="""#]).matches(&b));
        assert!(f(&["parent"]).matches(&a));
        assert!(!f(&[r#"parent!="""#]).matches(&a) && f(&[r#"parent!="""#]).matches(&b));
        assert!(Filter::parse(&["bogus==1".to_string()]).is_err());
    }
}
