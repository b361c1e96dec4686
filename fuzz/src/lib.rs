//! Shared code of the fuzz targets in `fuzz_targets/`.
//!
//! `job` is `src/job.rs` itself (with `labels`, the one module it uses), compiled into this crate through `#[path]` rather than
//! by depending on the `blacktree` crate: that crate links grpcio, whose gRPC C core takes
//! about 20 minutes to build, and `src/job.rs` needs only std, serde, serde_json and
//! humantime. The fuzzed code is therefore exactly the code the orchestrator runs.
//!
//! The checks below are the properties the targets assert, shared by both.

#[path = "../../src/job.rs"]
pub mod job;
#[path = "../../src/labels.rs"]
pub mod labels;

use serde_json::Value;

use job::MAX_JOB_ID_LEN;

/// The most an AMQP short string holds; the jobId becomes a status's `message_id`.
pub const AMQP_SHORT_STRING_MAX: usize = 255;

/// Asserts the rules every jobId the decoders hand out must follow.
pub fn assert_valid_job_id(id: &str) {
    assert!(!id.trim().is_empty(), "blank jobId accepted: {id:?}");
    assert!(
        id.len() <= MAX_JOB_ID_LEN,
        "jobId of {} bytes accepted",
        id.len()
    );
    assert!(
        id.len() <= AMQP_SHORT_STRING_MAX,
        "jobId of {} bytes cannot be an AMQP message_id",
        id.len()
    );
    assert!(
        !id.chars().any(char::is_control),
        "jobId with control characters accepted: {id:?}"
    );
}

/// The numbers a reason may contain, in order, for the input it is about.
pub struct ReasonNumbers {
    /// The input's size and the limit, for the oversized reason.
    pub size_and_limit: Option<(usize, usize)>,
    /// serde_json's own line and column of the input's syntax error, if any.
    pub syntax_error_at: Option<(usize, usize)>,
}

// The wording of every reason `Job::decode` and `decode_cancel` may give, with `#`
// where a number goes. A reason outside this list could be quoting a value.
const JOB_ID_REASONS: [&str; 11] = [
    "`jobId` is missing",
    "`jobId` is empty",
    "`jobId` is longer than # bytes",
    "`jobId` contains control characters",
    "`jobId` must be a string",
    "`deploymentId` is empty",
    "`deploymentId` is longer than # bytes",
    "`deploymentId` contains control characters",
    "`deploymentId` must be a string",
    "`jobId` and `deploymentId` differ",
    "not a JSON object",
];
const FIELD_REASONS: [&str; 10] = [
    "`repoUrl` must be a string",
    "`repository` must be a string",
    "`dockerFilePath` must be a string",
    "`token` must be a string",
    "`branch` must be a string",
    "`dockerfilePath` must be a string",
    "`contextDir` must be a string",
    "`imageName` must be a string",
    "`githubToken` must be a string",
    "`timeoutSeconds` must be a positive whole number",
];
const OVERSIZED: &str = "message is # bytes, above the limit of #";
const NOT_JSON: &str = "not JSON (syntax error at line # column #)";
const NOT_OBJECT: &str = "not a JSON object";
const CANCEL_NOT_JSON: &str = "cancel message is not JSON (syntax error at line # column #)";
const CANCEL_PREFIX: &str = "cancel message: ";

/// `text` with every run of ASCII digits replaced by `#`, and those runs' values.
fn skeleton(text: &str) -> (String, Vec<&str>) {
    let mut out = String::with_capacity(text.len());
    let mut numbers = Vec::new();
    let mut digits_from = None;
    for (i, c) in text.char_indices() {
        match (c.is_ascii_digit(), digits_from) {
            (true, None) => digits_from = Some(i),
            (true, Some(_)) => {}
            (false, Some(from)) => {
                numbers.push(&text[from..i]);
                out.push('#');
                out.push(c);
                digits_from = None;
            }
            (false, None) => out.push(c),
        }
    }
    if let Some(from) = digits_from {
        numbers.push(&text[from..]);
        out.push('#');
    }
    (out, numbers)
}

/// What a reason says, once checked against the known wordings.
#[derive(Debug, PartialEq, Eq)]
pub enum ReasonKind {
    /// The message is above the size limit.
    Oversized,
    /// The message is not JSON.
    NotJson,
    /// The message is JSON but not an object.
    NotObject,
    /// The jobId is missing or invalid.
    JobId,
    /// Another field has the wrong type.
    Field,
}

/// Asserts that a reason of `Job::decode` (or of `decode_cancel` when `cancel`) is one
/// of the known wordings with the right numbers, and quotes none of the input's values.
pub fn check_reason(
    reason: &str,
    input: &[u8],
    numbers: &ReasonNumbers,
    cancel: bool,
) -> ReasonKind {
    let (shape, found) = skeleton(reason);
    let as_number = |s: &str| s.parse::<usize>().ok();
    let found: Vec<Option<usize>> = found.into_iter().map(as_number).collect();
    let job_id_shape = |s: &str| JOB_ID_REASONS.contains(&s);
    let kind = if cancel {
        if shape == CANCEL_NOT_JSON {
            ReasonKind::NotJson
        } else if shape.strip_prefix(CANCEL_PREFIX).is_some_and(job_id_shape) {
            ReasonKind::JobId
        } else {
            panic!("unknown cancel reason: {reason:?}")
        }
    } else if shape == OVERSIZED {
        ReasonKind::Oversized
    } else if shape == NOT_JSON {
        ReasonKind::NotJson
    } else if shape == NOT_OBJECT {
        ReasonKind::NotObject
    } else if job_id_shape(&shape) {
        ReasonKind::JobId
    } else if FIELD_REASONS.contains(&shape.as_str()) {
        ReasonKind::Field
    } else {
        panic!("unknown reason: {reason:?}")
    };
    let expected: Vec<Option<usize>> = match kind {
        ReasonKind::Oversized => {
            let (size, limit) = numbers
                .size_and_limit
                .expect("oversized reason for a fitting message");
            vec![Some(size), Some(limit)]
        }
        ReasonKind::NotJson => {
            let (line, column) = numbers
                .syntax_error_at
                .expect("not-JSON reason for valid JSON");
            vec![Some(line), Some(column)]
        }
        ReasonKind::JobId if shape.ends_with("is longer than # bytes") => {
            vec![Some(MAX_JOB_ID_LEN)]
        }
        _ => vec![],
    };
    assert_eq!(found, expected, "wrong numbers in {reason:?}");
    assert_quotes_no_value(reason, input);
    kind
}

/// Asserts that `text` quotes no string of the JSON `input`: not its `githubToken` (4
/// bytes or more) and no other string value of 8 bytes or more. A value may only show
/// up as part of the fixed wording (with any digits standing for the reason's own
/// numbers), e.g. a token `"jobId"` in "`jobId` is missing".
pub fn assert_quotes_no_value(text: &str, input: &[u8]) {
    let Ok(message) = serde_json::from_slice::<Value>(input) else {
        return;
    };
    let (text_shape, _) = skeleton(text);
    let quoted = |value: &str| text.contains(value) && !text_shape.contains(&skeleton(value).0);
    if let Some(token) = message.get("githubToken").and_then(Value::as_str) {
        if token.len() >= 4 {
            assert!(!quoted(token), "{text:?} quotes the githubToken");
        }
    }
    let mut strings = Vec::new();
    collect_strings(&message, &mut strings);
    for value in strings {
        if value.len() >= 8 {
            assert!(!quoted(value), "{text:?} quotes the value {value:?}");
        }
    }
}

/// Every string value in `value`, at any depth (object keys excluded).
pub fn collect_strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(fields) => fields.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

/// The line and column serde_json reports for `input`'s syntax error, if it has one.
pub fn syntax_error_at(input: &[u8]) -> Option<(usize, usize)> {
    serde_json::from_slice::<Value>(input)
        .err()
        .map(|e| (e.line(), e.column()))
}

/// For each byte of the JSON text `json`, whether it is part of an escape sequence
/// after its backslash (`n` of `\n`, `u001f` of `\u001f`): where a raw occurrence of a
/// string in the text comes from the escaping, not from the escaped content.
pub fn escape_tails(json: &[u8]) -> Vec<bool> {
    let mut tails = vec![false; json.len()];
    let mut in_string = false;
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => in_string = !in_string,
            b'\\' if in_string => {
                let len = if json.get(i + 1) == Some(&b'u') { 5 } else { 1 };
                let end = (i + 1 + len).min(json.len());
                tails[i + 1..end].iter_mut().for_each(|t| *t = true);
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    tails
}

/// Start offsets of every (possibly overlapping) occurrence of `needle` in `haystack`.
pub fn occurrences(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    if needle.is_empty() || needle.len() > haystack.len() {
        return Vec::new();
    }
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}
