//! Who may read the HTTP endpoint (`--http-auth-file`): one token, sent as
//! `Authorization: Bearer TOKEN` (Prometheus, scripts) or as the password of HTTP basic
//! auth with any user name (a browser's login prompt). Compared in constant time.

use base64::Engine;

use crate::grpc::constant_time_eq;
use crate::job::Secret;

/// The token the HTTP endpoint asks for.
#[derive(Debug)]
pub struct HttpAuth {
    token: Secret,
}

impl HttpAuth {
    /// Asks for `token` (never empty: `read_secret_file` refuses an empty file).
    pub fn new(token: Secret) -> HttpAuth {
        HttpAuth { token }
    }

    /// Whether the `Authorization` header carries the token.
    pub fn admits(&self, authorization: Option<&str>) -> bool {
        let Some((scheme, credentials)) = authorization.and_then(|a| a.trim().split_once(' '))
        else {
            return false;
        };
        let expected = self.token.expose().as_bytes();
        if scheme.eq_ignore_ascii_case("bearer") {
            return constant_time_eq(credentials.trim().as_bytes(), expected);
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials.trim())
        else {
            return false;
        };
        let password = match decoded.iter().position(|&b| b == b':') {
            Some(colon) => &decoded[colon + 1..],
            None => return false,
        };
        constant_time_eq(password, expected)
    }
}

/// Whether `listen` (`HOST:PORT`) is a loopback address, which only this host reaches.
pub fn is_loopback(listen: &str) -> bool {
    if let Ok(addr) = listen.parse::<std::net::SocketAddr>() {
        return addr.ip().is_loopback();
    }
    listen
        .rsplit_once(':')
        .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_taken_as_bearer_or_as_a_basic_password_and_nothing_else() {
        let auth = HttpAuth::new(Secret::new("s3cret-token".into()));
        let basic = |pair: &str| {
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
            format!("Basic {encoded}")
        };
        assert!(auth.admits(Some("Bearer s3cret-token")));
        assert!(auth.admits(Some("bearer  s3cret-token ")));
        assert!(auth.admits(Some(&basic("anyone:s3cret-token"))));
        assert!(!auth.admits(None));
        assert!(!auth.admits(Some("Bearer s3cret-toke")));
        assert!(!auth.admits(Some("Bearer s3cret-token2")));
        assert!(!auth.admits(Some(&basic("s3cret-token:wrong"))));
        assert!(!auth.admits(Some(&basic("s3cret-token"))), "no password");
        assert!(!auth.admits(Some("Basic !!!")));
        assert!(!auth.admits(Some("Token s3cret-token")));
    }

    #[test]
    fn loopback_addresses_are_told_apart() {
        assert!(is_loopback("127.0.0.1:9464"));
        assert!(is_loopback("[::1]:9464"));
        assert!(is_loopback("localhost:9464"));
        assert!(!is_loopback("0.0.0.0:9464"));
        assert!(!is_loopback("10.0.0.5:9464"));
        assert!(!is_loopback("example.com:9464"));
    }
}
