//! Unit tests of the configuration: durations, addresses, workers, masking.

use super::*;

#[test]
fn durations_parse_in_human_units() {
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert!(parse_duration("5 parsecs").is_err());
}

#[test]
fn addresses_are_host_and_port() {
    assert_eq!(
        parse_host_port("127.0.0.1:5051").as_deref(),
        Ok("127.0.0.1:5051")
    );
    assert!(parse_host_port("[::1]:6000").is_ok());
    for bad in ["127.0.0.1", "http://h:1", "h:port", ":5051", "h:70000"] {
        let error = parse_host_port(bad).unwrap_err();
        assert!(error.contains("expected HOST:PORT"), "{bad}: {error}");
    }
    assert_eq!(parse_optional_host_port("").as_deref(), Ok(""));
}

#[test]
fn static_workers_need_id_host_and_port() {
    assert_eq!(
        parse_static_worker("w1=10.0.0.2:6000"),
        Ok(StaticWorker {
            id: "w1".into(),
            addr: "10.0.0.2:6000".into()
        })
    );
    assert!(parse_static_worker("10.0.0.2:6000").is_err());
    assert!(parse_static_worker("w1=10.0.0.2").is_err());
    assert!(parse_static_worker("w1=host:port").is_err());
    assert!(parse_static_worker("=h:1").is_err());
}

#[test]
fn masked_urls_hide_the_password() {
    let masked = mask_url("amqp://user:s3cret@broker:5672/%2f?heartbeat=5");
    assert!(!masked.contains("s3cret"), "{masked}");
    assert!(masked.contains("user:***@broker"), "{masked}");
    let both = mask_url("amqp://u:one@n1/%2f, amqp://u:two@n2/%2f");
    assert!(
        both.contains("u:***@n1") && both.contains("u:***@n2") && !both.contains("two"),
        "{both}"
    );
    assert_eq!(mask_url("not a url"), "<unparsable URL>");
}
