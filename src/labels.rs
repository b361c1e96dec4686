//! Labels: what a worker offers (`--label key=value`, and `region=<region>` from its
//! registration) and what a job requires (`"labels": {"arch": "arm64"}`). A job goes
//! only to a worker that has every label it requires; a job without labels goes
//! anywhere. A leaf: jobs, the registry, the ledger and the metrics all use it.

use std::fmt;

use serde_json::{Map, Value};

/// The most labels a job may require or a worker may offer.
pub const MAX_LABELS: usize = 16;

/// The longest key or value, in bytes.
pub const MAX_LABEL_LEN: usize = 63;

/// What a label must look like, for error messages (which never quote a value).
pub const LABEL_RULES: &str = "at most 16 labels, each key 1 to 63 of [A-Za-z0-9._/-] and \
                               each value 1 to 63 of [A-Za-z0-9._:/@+-]";

/// One `key=value` label.
pub type Label = (String, String);

/// A set of labels, sorted by key (one value per key). Its `Display` is the canonical
/// `key=value,key=value` form that logs and the `labels` metric label use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Vec<Label>);

impl Labels {
    /// Checked labels from pairs; a key given twice keeps its last value.
    pub fn new(pairs: impl IntoIterator<Item = Label>) -> Result<Labels, String> {
        let mut labels: Vec<Label> = Vec::new();
        for (key, value) in pairs {
            if !valid_key(&key) || !valid_value(&value) {
                return Err(format!("labels must be {LABEL_RULES}"));
            }
            match labels.binary_search_by(|(k, _)| k.cmp(&key)) {
                Ok(i) => labels[i].1 = value,
                Err(i) => labels.insert(i, (key, value)),
            }
        }
        if labels.len() > MAX_LABELS {
            return Err(format!("labels must be {LABEL_RULES}"));
        }
        Ok(Labels(labels))
    }

    /// Labels from a JSON object of strings (a job's `labels`); `null` is none.
    pub fn from_json(value: &Value) -> Result<Labels, String> {
        let rules = || format!("`labels` must be an object of strings: {LABEL_RULES}");
        match value {
            Value::Null => Ok(Labels::default()),
            Value::Object(fields) if fields.len() <= MAX_LABELS => {
                let pairs = fields.iter().map(|(key, value)| match value {
                    Value::String(value) => Ok((key.clone(), value.clone())),
                    _ => Err(rules()),
                });
                Labels::new(pairs.collect::<Result<Vec<_>, _>>()?).map_err(|_| rules())
            }
            _ => Err(rules()),
        }
    }

    /// The labels as a JSON object.
    pub fn to_json(&self) -> Value {
        let fields: Map<String, Value> = self
            .0
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        Value::Object(fields)
    }

    /// The same labels plus `key=value` when `value` is a valid label value (a worker's
    /// region, which older workers send as free text); `None` when it is not.
    pub fn with(&self, key: &str, value: &str) -> Option<Labels> {
        let mut pairs = self.0.clone();
        pairs.push((key.to_string(), value.to_string()));
        Labels::new(pairs).ok()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether these labels (a worker's) include every one of `required` (a job's).
    pub fn satisfies(&self, required: &Labels) -> bool {
        required.0.iter().all(
            |(key, value)| match self.0.binary_search_by(|(k, _)| k.cmp(key)) {
                Ok(i) => self.0[i].1 == *value,
                Err(_) => false,
            },
        )
    }

    /// The labels, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (key, value)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Labels::from_json(&Value::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// Parses `key=value` (a `--label` flag).
pub fn parse_label(text: &str) -> Result<Label, String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))?;
    let label = (key.to_string(), value.to_string());
    Labels::new([label.clone()])?;
    Ok(label)
}

fn valid_key(key: &str) -> bool {
    valid(key, |c| c.is_ascii_alphanumeric() || "._/-".contains(c))
}

fn valid_value(value: &str) -> bool {
    valid(value, |c| {
        c.is_ascii_alphanumeric() || "._:/@+-".contains(c)
    })
}

fn valid(text: &str, allowed: impl Fn(char) -> bool) -> bool {
    (1..=MAX_LABEL_LEN).contains(&text.len()) && text.chars().all(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap()
    }

    #[test]
    fn a_worker_satisfies_the_labels_it_has_all_of() {
        let worker = labels(&[("arch", "arm64"), ("region", "eu"), ("gpu", "yes")]);
        assert!(worker.satisfies(&Labels::default()));
        assert!(worker.satisfies(&labels(&[("arch", "arm64")])));
        assert!(worker.satisfies(&labels(&[("region", "eu"), ("arch", "arm64")])));
        assert!(!worker.satisfies(&labels(&[("arch", "amd64")])));
        assert!(!worker.satisfies(&labels(&[("arch", "arm64"), ("os", "linux")])));
        assert!(!Labels::default().satisfies(&labels(&[("arch", "arm64")])));
    }

    #[test]
    fn labels_are_sorted_and_print_canonically() {
        let l = labels(&[("os", "linux"), ("arch", "arm64"), ("os", "windows")]);
        assert_eq!(l.to_string(), "arch=arm64,os=windows");
        assert_eq!(l, labels(&[("arch", "arm64"), ("os", "windows")]));
        assert_eq!(Labels::from_json(&l.to_json()).unwrap(), l);
    }

    #[test]
    fn bad_labels_are_refused_without_quoting_them() {
        let secret = "ghp_0123456789abcdef";
        for value in [
            serde_json::json!({"arch": 64}),
            serde_json::json!(["arch=arm64"]),
            serde_json::json!({"arch": ""}),
            serde_json::json!({"arch": format!("{secret} x")}),
            serde_json::json!({"a,b": "c"}),
            serde_json::json!({"k": "v".repeat(64)}),
            Value::Object((0..17).map(|i| (format!("k{i}"), "v".into())).collect()),
        ] {
            let error = Labels::from_json(&value).unwrap_err();
            assert!(error.contains("`labels` must be"), "{error}");
            assert!(!error.contains(secret), "{error}");
        }
        assert!(Labels::from_json(&Value::Null).unwrap().is_empty());
    }

    #[test]
    fn a_region_becomes_a_label_only_when_it_is_a_valid_value() {
        let l = labels(&[("arch", "arm64")]);
        assert_eq!(
            l.with("region", "eu-west-1").unwrap().to_string(),
            "arch=arm64,region=eu-west-1"
        );
        assert!(l.with("region", "Europe (West)").is_none());
    }

    #[test]
    fn label_flags_parse() {
        assert_eq!(
            parse_label("arch=arm64").unwrap(),
            ("arch".into(), "arm64".into())
        );
        assert!(parse_label("arch").is_err());
        assert!(parse_label("=arm64").is_err());
        assert!(parse_label("arch=").is_err());
    }
}
