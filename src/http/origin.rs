//! Which browser origins may use the WebSocket and REST routes: the defence
//! against cross-site WebSocket hijacking, where a page on another site opens a
//! socket that the browser authenticates with the victim's cookies or a token
//! it can reach.

/// Decides whether a request with this `Origin` may proceed.
///
/// - No `Origin` header: not a browser page (curl, wscat, a Rust client), allowed.
/// - The server's own origin (the `Origin` names the `Host` the request was
///   sent to): allowed, so the pages the server ships always work.
/// - Otherwise only origins on the allow-list (exact `scheme://host[:port]`,
///   compared case-insensitively; `*` allows every origin).
pub fn allowed(origin: Option<&str>, host: Option<&str>, allow_list: &[String]) -> bool {
    let Some(origin) = origin.map(str::trim) else {
        return true;
    };
    if listed(origin, allow_list) {
        return true;
    }
    match (authority(origin), host) {
        (Some((scheme, authority)), Some(host)) => same_authority(scheme, authority, host.trim()),
        _ => false,
    }
}

/// True when the origin is on the allow-list (not merely same-origin): such a
/// response carries CORS headers so the page can read it.
pub fn listed(origin: &str, allow_list: &[String]) -> bool {
    let origin = origin.trim_end_matches('/');
    allow_list
        .iter()
        .any(|o| o == "*" || o.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

/// `https://Example.com:8443` → (`https`, `Example.com:8443`). `null` and
/// anything that is not `http(s)://authority` give `None`.
fn authority(origin: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = origin.split_once("://")?;
    let scheme_ok = scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https");
    (scheme_ok && !rest.is_empty() && !rest.contains('/')).then_some((scheme, rest))
}

/// Compares an origin's authority with a `Host` header, treating an omitted
/// default port (80 for http, 443 for https) as written.
fn same_authority(scheme: &str, origin: &str, host: &str) -> bool {
    let default = if scheme.eq_ignore_ascii_case("https") {
        ":443"
    } else {
        ":80"
    };
    let normal = |a: &str| -> String {
        let a = a.to_ascii_lowercase();
        match a.strip_suffix(default) {
            Some(bare) => bare.to_string(),
            None => a,
        }
    };
    normal(origin) == normal(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let none: Vec<String> = Vec::new();
        let list = vec!["https://app.example.com".to_string()];
        let host = Some("127.0.0.1:3000");
        assert!(allowed(None, host, &none), "non-browser client");
        assert!(
            allowed(Some("http://127.0.0.1:3000"), host, &none),
            "same origin"
        );
        assert!(allowed(Some("HTTP://127.0.0.1:3000"), host, &none));
        assert!(!allowed(Some("http://evil.example"), host, &none));
        assert!(!allowed(Some("null"), host, &none));
        assert!(
            !allowed(Some("http://127.0.0.1:3001"), host, &none),
            "other port"
        );
        assert!(!allowed(
            Some("https://127.0.0.1:3000"),
            Some("127.0.0.1"),
            &none
        ));
        assert!(allowed(
            Some("http://example.com"),
            Some("example.com:80"),
            &none
        ));
        assert!(allowed(
            Some("https://example.com:443"),
            Some("example.com"),
            &none
        ));
        assert!(
            allowed(Some("https://app.example.com"), host, &list),
            "listed"
        );
        assert!(allowed(Some("https://APP.example.com/"), host, &list));
        assert!(!allowed(Some("https://app.example.com.evil"), host, &list));
        assert!(
            !allowed(Some("http://evil.example"), None, &none),
            "no Host"
        );
        assert!(allowed(Some("http://anything"), host, &["*".to_string()]));
    }
}
