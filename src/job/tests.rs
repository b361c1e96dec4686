//! Unit tests of the job and status messages.

use super::*;

const LIMIT: usize = 1024;

fn decode(text: &str) -> Result<Job, Rejection> {
    Job::decode(text.as_bytes(), LIMIT)
}

#[test]
fn a_full_job_decodes_and_unknown_fields_are_ignored() {
    let job = decode(
        r#"{"jobId":"j1","repoUrl":"o/r","branch":"main","dockerfilePath":"Dockerfile",
            "contextDir":".","imageName":"app:1","githubToken":"tok","timeoutSeconds":30,
            "priority":"high"}"#,
    )
    .unwrap();
    assert_eq!(job.job_id, "j1");
    assert_eq!(job.repo_url, "o/r");
    assert_eq!(job.github_token.expose(), "tok");
    assert_eq!(job.timeout_seconds, Some(30));
    assert!(
        !format!("{job:?}").contains("tok\""),
        "token printed: {job:?}"
    );
    assert_eq!(
        Job::decode(&serde_json::to_vec(&job.to_json()).unwrap(), LIMIT),
        Ok(job)
    );
}

#[test]
fn bad_messages_are_rejected_with_a_reason_and_the_job_id_when_readable() {
    let r = decode("{not json").unwrap_err();
    assert!(r.reason.starts_with("not JSON"), "{r:?}");
    assert_eq!(r.job_id, None);
    assert_eq!(decode("[1]").unwrap_err().reason, "not a JSON object");
    assert_eq!(
        decode(r#"{"repoUrl":"x"}"#).unwrap_err().reason,
        "`jobId` is missing"
    );
    assert_eq!(
        decode(r#"{"jobId":" "}"#).unwrap_err().reason,
        "`jobId` is empty"
    );
    assert_eq!(
        decode(r#"{"jobId":7}"#).unwrap_err().reason,
        "`jobId` must be a string"
    );
    let r =
        decode(r#"{"jobId":"j2","branch":"ghp_secret_in_wrong_field","timeoutSeconds":"ghp_x"}"#)
            .unwrap_err();
    assert_eq!(r.job_id.as_deref(), Some("j2"));
    assert!(!r.reason.contains("ghp_"), "{r:?}");
    let r = decode(r#"{"jobId":"j3","imageName":["a"]}"#).unwrap_err();
    assert_eq!(r.reason, "`imageName` must be a string");
    let big = format!(r#"{{"jobId":"j4","logs":"{}"}}"#, "x".repeat(LIMIT));
    let r = decode(&big).unwrap_err();
    assert!(r.reason.contains("above the limit of 1024"), "{r:?}");
    assert_eq!(r.job_id.as_deref(), Some("j4"));
}

#[test]
fn statuses_serialise_in_camel_case_with_snake_case_outcomes() {
    let status = Status::without_answer("j1", Outcome::WorkerLost, "w1", "gone".into());
    let json: Value = serde_json::from_slice(&status.to_json()).unwrap();
    assert_eq!(json["jobId"], "j1");
    assert_eq!(json["success"], false);
    assert_eq!(json["imageUrl"], "");
    assert_eq!(json["workerId"], "w1");
    assert_eq!(json["outcome"], "worker_lost");
    assert_eq!(json["startedAt"], Value::Null);
    assert_eq!(json["durationMs"], 0);
    let started = SystemTime::now() - std::time::Duration::from_millis(1500);
    let json: Value = serde_json::from_slice(&status.started(started).to_json()).unwrap();
    assert!(json["durationMs"].as_u64().unwrap() >= 1500, "{json}");
    assert!(json["startedAt"].as_str().unwrap().ends_with('Z'), "{json}");
    assert!(json["finishedAt"].as_str().unwrap() > json["startedAt"].as_str().unwrap());
}

#[test]
fn cancel_messages_carry_a_job_id() {
    assert_eq!(decode_cancel(br#"{"jobId":"j1"}"#), Ok("j1".to_string()));
    assert!(decode_cancel(b"nope")
        .unwrap_err()
        .reason
        .contains("not JSON"));
    assert!(decode_cancel(br#"{"id":"j1"}"#)
        .unwrap_err()
        .reason
        .contains("`jobId` is missing"));
    let event = Event::now("j1", EventKind::Dispatched, "w1");
    let json: Value = serde_json::from_slice(&event.to_json()).unwrap();
    assert_eq!(
        (json["jobId"].as_str(), json["event"].as_str()),
        (Some("j1"), Some("dispatched"))
    );
}

#[test]
fn secrets_are_redacted() {
    let s = Secret::new("ghp_abc123".into());
    assert_eq!(
        s.redact("clone https://ghp_abc123@x failed"),
        "clone https://***@x failed"
    );
    assert_eq!(format!("{s:?}"), "***");
    assert_eq!(Secret::default().redact("text"), "text");
}

#[test]
fn secrets_too_short_to_be_real_are_left_alone() {
    // Seen: `githubToken: "t"` turned `us-east-1` into `us-eas***-1` in an imageUrl.
    let image = "123.dkr.ecr.us-east-1.amazonaws.com/blacktree:t1";
    for short in ["t", "token12"] {
        let s = Secret::new(short.into());
        assert!(!s.is_redacted());
        assert_eq!(s.redact(image), image);
        assert_eq!(format!("{s:?}"), "***", "still never printed");
    }
    assert!(Secret::new("token123".into()).is_redacted());
    assert_eq!(
        Secret::new("token123".into()).redact("a token123 b"),
        "a *** b"
    );
}

// The tests below pin down what the fuzz targets in fuzz/ found.

#[test]
fn a_job_id_fits_an_amqp_message_id() {
    // Found by fuzz/job_decode: a 256-byte jobId (with `\\` escapes) was accepted,
    // and AMQP short strings such as `message_id` hold 255 bytes.
    let id = |len: usize| format!("{}\\\\", "v".repeat(len - 1));
    let message = |len: usize| format!(r#"{{"jobId":"{}"}}"#, id(len));
    let job = decode(&message(255)).unwrap();
    assert_eq!(job.job_id.len(), 255);
    let r = decode(&message(256)).unwrap_err();
    assert_eq!(r.reason, "`jobId` is longer than 255 bytes");
    assert_eq!(r.job_id, None);
}

#[test]
fn huge_timeouts_are_lowered_to_what_the_worker_and_grpc_can_carry() {
    let timeout = |t: &str| {
        decode(&format!(r#"{{"jobId":"j1","timeoutSeconds":{t}}}"#)).map(|j| j.timeout_seconds)
    };
    assert_eq!(timeout("4294967295"), Ok(Some(MAX_TIMEOUT_SECONDS)));
    assert_eq!(timeout("4294967296"), Ok(Some(MAX_TIMEOUT_SECONDS)));
    assert_eq!(
        timeout("18446744073709551615"),
        Ok(Some(MAX_TIMEOUT_SECONDS))
    );
    // Past u64, fractions, exponents and signs are not whole numbers to serde_json.
    for t in ["18446744073709551616", "1.0", "1e3", "-1", "0"] {
        assert_eq!(
            timeout(t).unwrap_err().reason,
            "`timeoutSeconds` must be a positive whole number",
            "{t}"
        );
    }
}

#[test]
fn redaction_leaves_no_secret_formed_by_the_marker() {
    // One pass leaves `x` + `***` + `****`: the secret again.
    let s = Secret::new("x*******".into());
    assert_eq!(s.redact("xx***********"), "***");
    let s = Secret::new("aaaaaaa*".into());
    let redacted = s.redact("log aaaaaaaaaaaaaa* end");
    assert!(!redacted.contains("aaaaaaa*"), "{redacted}");
    assert!(redacted.starts_with("log ") && redacted.ends_with(" end"));
}

#[test]
fn an_oversized_message_gives_the_job_id_a_full_decode_reads() {
    let padded = |json: &str| format!("{json:<1100}");
    let r = decode(&padded(r#"["j1", "not a job"]"#)).unwrap_err();
    assert!(r.reason.contains("above the limit"), "{r:?}");
    assert_eq!(r.job_id, None, "an array has no jobId");
    let twice = padded(r#"{"jobId":"first","jobId":"last"}"#);
    assert_eq!(decode(&twice).unwrap_err().job_id.as_deref(), Some("last"));
    assert_eq!(
        Job::decode(twice.as_bytes(), usize::MAX).unwrap().job_id,
        "last"
    );
}

#[test]
fn odd_messages_are_rejected_without_quoting_them() {
    let deep = format!(
        r#"{{"jobId":"j1","x":{}{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let r = decode(&deep).unwrap_err();
    assert!(
        r.reason
            .starts_with("not JSON (syntax error at line 1 column"),
        "{r:?}"
    );
    let r = Job::decode(b"{\"jobId\":\"j1\",\"branch\":\"\xff\xfe\"}", LIMIT).unwrap_err();
    assert!(r.reason.starts_with("not JSON"), "{r:?}");
    assert_eq!(r.job_id, None);
}

fn decode_json(json: serde_json::Value) -> Result<Job, Rejection> {
    Job::decode(&serde_json::to_vec(&json).unwrap(), 4096)
}

#[test]
fn a_deployment_reads_as_the_deployed_orchestrator_mapped_it() {
    let mut job = decode_json(serde_json::json!({
        "deploymentId": "d-1", "token": "ghp_secret", "repository": "acme/app",
        "branch": "main", "dockerFilePath": "docker/Dockerfile", "contextDir": ".",
        "createdAt": "2026-12-01T10:00:00.000Z"
    }))
    .unwrap();
    job.derive_image_name("blacktree/");
    assert_eq!(job.dialect, Dialect::Deployment);
    assert_eq!(job.job_id, "d-1");
    assert_eq!(job.repo_url, "acme/app");
    assert_eq!(job.dockerfile_path, "docker/Dockerfile");
    assert_eq!(job.github_token.expose(), "ghp_secret");
    assert_eq!(job.image_name, "blacktree/d-1");
    assert!(!format!("{job:?}").contains("ghp_secret"));

    let mut named =
        decode_json(serde_json::json!({"deploymentId": "d-2", "imageName": "acme/x:1"})).unwrap();
    named.derive_image_name("blacktree/");
    assert_eq!(named.image_name, "acme/x:1", "imageName wins");
    let mut ours = decode_json(serde_json::json!({"jobId": "j-1"})).unwrap();
    ours.derive_image_name("blacktree/");
    assert_eq!(
        (ours.dialect, ours.image_name.as_str()),
        (Dialect::Blacktree, "")
    );
}

#[test]
fn both_ids_must_agree_and_name_the_field_they_read() {
    let both = decode_json(serde_json::json!({"jobId": "a", "deploymentId": "a"})).unwrap();
    assert_eq!(
        (both.job_id.as_str(), both.dialect),
        ("a", Dialect::Deployment)
    );
    let differ = decode_json(serde_json::json!({"jobId": "a", "deploymentId": "b"})).unwrap_err();
    assert_eq!(differ.reason, "`jobId` and `deploymentId` differ");
    assert_eq!(
        differ.job_id.as_deref(),
        Some("b"),
        "answered by its deploymentId"
    );
    let bad = decode_json(serde_json::json!({"deploymentId": 7})).unwrap_err();
    assert_eq!(bad.reason, "`deploymentId` must be a string");
    let field = decode_json(serde_json::json!({"deploymentId": "d", "token": 5})).unwrap_err();
    assert_eq!(field.reason, "`token` must be a string");
    assert_eq!(
        (field.job_id.as_deref(), field.dialect),
        (Some("d"), Dialect::Deployment)
    );
    let big = Job::decode(
        &serde_json::to_vec(&serde_json::json!({"deploymentId": "d-9", "x": "y".repeat(99)}))
            .unwrap(),
        50,
    )
    .unwrap_err();
    assert_eq!(
        (big.job_id.as_deref(), big.dialect),
        (Some("d-9"), Dialect::Deployment)
    );
    assert_eq!(decode_cancel(br#"{"deploymentId":"d-3"}"#).unwrap(), "d-3");
}

#[test]
fn a_deployment_status_carries_its_deployment_id_and_copies_lose_their_tokens() {
    let status = Status::without_answer("d-1", Outcome::Failed, "w", "boom".into())
        .in_dialect(Dialect::Deployment);
    let json: serde_json::Value = serde_json::from_slice(&status.to_json()).unwrap();
    assert_eq!(
        (json["deploymentId"].as_str(), json["jobId"].as_str()),
        (Some("d-1"), Some("d-1"))
    );
    let ours = Status::without_answer("j", Outcome::Failed, "w", String::new());
    let json: serde_json::Value = serde_json::from_slice(&ours.to_json()).unwrap();
    assert!(json.get("deploymentId").is_none());

    let copy =
        without_secrets(br#"{"deploymentId":"d","token":"ghp_x","githubToken":"ghp_y"}"#.to_vec());
    let copy = String::from_utf8(copy).unwrap();
    assert!(!copy.contains("ghp_") && copy.contains("\"d\""), "{copy}");
    assert_eq!(without_secrets(b"not json".to_vec()), b"not json");
}
