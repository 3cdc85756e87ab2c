//! The bounded labels of `portal_http_request_seconds`: the pattern of the
//! route a path belongs to (`/api/portal-views/{id}`, never the id itself,
//! which would make one series per view) and the method, each from a fixed
//! list, anything else `other`.

/// Every route's pattern, one per line of `router::ROUTE_METHODS` (a test
/// there keeps the two lists in step). `{…}` is one non-empty segment; a
/// final `{path}` is one or more.
const TEMPLATES: &[&str] = &[
    "/health",
    "/metrics",
    "/api/openapi.json",
    "/api/messages.schema.json",
    "/api/portal-views/{id}",
    "/api/portal-views/{id}/messages",
    "/api/libraries/{libraryId}/members/{userId}",
    "/ws/portal-view/{id}",
    "/socket.io/{path}",
    "/sse/portal-view/{id}",
    "/",
    "/presenter",
    "/viewer",
    "/assets/{file}",
];

/// The label of a path no route answers.
pub(crate) const OTHER: &str = "other";

/// The pattern of the route `path` belongs to (one trailing `/` is ignored,
/// as warp does), or [`OTHER`].
pub(crate) fn route(path: &str) -> &'static str {
    let segments = segments(path);
    TEMPLATES
        .iter()
        .find(|template| matches(template, &segments))
        .copied()
        .unwrap_or(OTHER)
}

/// The method as a label: the ones HTTP defines that a client may send,
/// anything else `other` (a method is any token a client likes).
pub(crate) fn method(method: &warp::http::Method) -> &'static str {
    use warp::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => OTHER,
    }
}

fn segments(path: &str) -> Vec<&str> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').collect()
    }
}

fn matches(template: &str, path: &[&str]) -> bool {
    let pattern = segments(template);
    let rest = pattern.last() == Some(&"{path}");
    let fixed = if rest {
        &pattern[..pattern.len() - 1]
    } else {
        &pattern[..]
    };
    let count_ok = if rest {
        path.len() >= fixed.len()
    } else {
        path.len() == fixed.len()
    };
    count_ok
        && fixed.iter().zip(path).all(|(p, s)| {
            if p.starts_with('{') {
                !s.is_empty()
            } else {
                p == s
            }
        })
}

/// For the router's test: the pattern of every template, in
/// `ROUTE_METHODS`'s notation (`*` one segment, `**` the rest).
#[cfg(test)]
pub(crate) fn patterns() -> Vec<Vec<&'static str>> {
    TEMPLATES
        .iter()
        .map(|t| {
            segments(t)
                .into_iter()
                .map(|s| match s {
                    "{path}" => "**",
                    s if s.starts_with('{') => "*",
                    s => s,
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_their_route_pattern() {
        assert_eq!(route("/api/portal-views/pv1"), "/api/portal-views/{id}");
        assert_eq!(route("/api/portal-views/pv1/"), "/api/portal-views/{id}");
        assert_eq!(
            route("/api/portal-views/pv1/messages"),
            "/api/portal-views/{id}/messages"
        );
        assert_eq!(
            route("/api/libraries/lib1/members/u1"),
            "/api/libraries/{libraryId}/members/{userId}"
        );
        assert_eq!(route("/ws/portal-view/demo"), "/ws/portal-view/{id}");
        assert_eq!(route("/socket.io/"), "/socket.io/{path}");
        assert_eq!(route("/socket.io/x/y"), "/socket.io/{path}");
        assert_eq!(route("/"), "/");
        assert_eq!(route(""), "/");
        assert_eq!(route("/assets/app.js"), "/assets/{file}");
        assert_eq!(route("/health"), "/health");
        assert_eq!(route("/api/portal-views/"), OTHER);
        assert_eq!(route("/api/portal-views//messages"), OTHER);
        assert_eq!(route("/nothing/pv1"), OTHER);
        assert_eq!(route("/health/pv1"), OTHER);
    }

    #[test]
    fn methods_are_bounded() {
        use warp::http::Method;
        assert_eq!(method(&Method::PATCH), "PATCH");
        let custom = Method::from_bytes(b"PV1-ATTACK").expect("a method token");
        assert_eq!(method(&custom), OTHER);
    }
}
