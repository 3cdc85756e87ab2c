//! Every route the server answers, assembled into one warp filter with
//! logging and JSON errors: the methods of each path (the `Allow` header of a
//! 405), CORS headers and preflights.

use warp::filters::path::FullPath;
use warp::filters::BoxedFilter;
use warp::http::{header, HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::http::context::Ctx;
use crate::http::error::recover;
use crate::http::filters::with_ctx;
use crate::http::origin;
use crate::http::rest::{self, no_content};
use crate::http::route_label;
use crate::http::{contract, sse, web, ws};

/// The SSE stream's route pattern (`route_label`).
const SSE_ROUTE: &str = "/sse/portal-view/{id}";

/// Every route the server answers, with logging and JSON errors.
pub(crate) fn routes(ctx: Ctx) -> BoxedFilter<(Response,)> {
    let metrics = ctx.metrics.clone();
    let inner = ws::portal_view(ctx.clone())
        .or(ws::socket_io(ctx.clone()))
        .unify()
        .or(rest::health(ctx.clone()))
        .unify()
        .or(rest::metrics(ctx.clone()))
        .unify()
        .or(rest::get_view(ctx.clone()))
        .unify()
        .or(rest::patch_view(ctx.clone()))
        .unify()
        .or(rest::put_member(ctx.clone()))
        .unify()
        .or(rest::delete_member(ctx.clone()))
        .unify()
        // SPEC §7's fallback for networks that break WebSockets (sse.rs).
        .or(sse::stream(ctx.clone()))
        .unify()
        .or(sse::post_message(ctx.clone()))
        .unify()
        .or(preflight(ctx.clone()))
        .unify()
        // docs/openapi.json and docs/messages.schema.json (contract.rs).
        .or(contract::routes())
        .unify()
        // The browser pages and their assets (web.rs).
        .or(web::routes())
        .unify()
        .recover(recover)
        .unify();
    let cors = !ctx.config.allowed_origins.is_empty();
    let inner = warp::path::full()
        .and(inner)
        .map(move |path: FullPath, response| with_allow(path.as_str(), cors, response));
    warp::header::headers_cloned()
        .and(with_ctx(ctx))
        .and(inner)
        .map(|headers: HeaderMap, ctx: Ctx, response: Response| {
            cors_headers(&headers, &ctx, response)
        })
        // `info.path()` carries no query string, so `?token=` is never logged.
        .with(warp::log::custom(move |info| {
            let status = info.status().as_u16();
            let route = route_label::route(info.path());
            // A 101 and an event stream's 200 begin a session rather than
            // end a request (their handshakes are counted apart).
            let session = status == 101 || status == 200 && route == SSE_ROUTE;
            if !session {
                metrics
                    .http_requests
                    .with_label_values(&[
                        route_label::method(info.method()),
                        route,
                        &status.to_string(),
                    ])
                    .observe(info.elapsed().as_secs_f64());
            }
            log::debug!(
                target: "portal_sync::http",
                "{} {} {} {:?}",
                info.method(),
                info.path(),
                status,
                info.elapsed()
            )
        }))
        .map(Reply::into_response)
        .boxed()
}

/// The methods of every route above, for the `Allow` header of a 405 (RFC
/// 9110 §15.5.6): path segments (`*` one of any, `**` the rest), the methods,
/// and whether CORS preflights (`OPTIONS`, [`preflight`]) are answered there.
/// A route added to [`routes`] needs its line here, and its path in
/// docs/openapi.json (tests/contract.rs compares the two).
pub const ROUTE_METHODS: &[(&[&str], &str, bool)] = &[
    (&["health"], "GET", false),
    (&["metrics"], "GET", false),
    (&["api", "openapi.json"], "GET", false),
    (&["api", "messages.schema.json"], "GET", false),
    (&["api", "portal-views", "*"], "GET, PATCH", true),
    (&["api", "portal-views", "*", "messages"], "POST", true),
    (
        &["api", "libraries", "*", "members", "*"],
        "PUT, DELETE",
        true,
    ),
    (&["ws", "portal-view", "*"], "GET", false),
    (&["socket.io", "**"], "GET", false),
    (&["sse", "portal-view", "*"], "GET", true),
    (&[], "GET, HEAD", false),
    (&["presenter"], "GET, HEAD", false),
    (&["viewer"], "GET, HEAD", false),
    (&["assets", "*"], "GET, HEAD", false),
];

/// The `Allow` value for `path` (as warp splits it: one trailing `/` is
/// ignored), `OPTIONS` included where preflights are answered (`cors`: an
/// allow-list is configured).
fn allowed_methods(path: &str, cors: bool) -> Option<String> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    let segments: Vec<&str> = if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').collect()
    };
    let matches = |pattern: &[&str]| {
        let rest = pattern.last() == Some(&"**");
        let fixed = if rest {
            &pattern[..pattern.len() - 1]
        } else {
            pattern
        };
        (segments.len() == fixed.len() || rest && segments.len() >= fixed.len())
            && fixed
                .iter()
                .zip(&segments)
                .all(|(p, s)| *p == *s || *p == "*" && !s.is_empty())
    };
    let (_, methods, preflight) = ROUTE_METHODS.iter().find(|(p, _, _)| matches(p))?;
    Some(if cors && *preflight {
        format!("{methods}, OPTIONS")
    } else {
        (*methods).to_string()
    })
}

/// Every 405 names the methods its route does answer.
fn with_allow(path: &str, cors: bool, mut response: Response) -> Response {
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        match allowed_methods(path, cors).map(|m| HeaderValue::from_str(&m)) {
            Some(Ok(allow)) => {
                response.headers_mut().insert(header::ALLOW, allow);
            }
            _ => log::warn!("a 405 for {path:?}, which no route's methods name"),
        }
    }
    response
}

/// Lets pages from an allow-listed origin read our answers (CORS).
fn cors_headers(request: &HeaderMap, ctx: &Ctx, mut response: Response) -> Response {
    let Some(origin) = request.get(header::ORIGIN).cloned() else {
        return response;
    };
    let listed = origin
        .to_str()
        .is_ok_and(|o| origin::listed(o, &ctx.config.allowed_origins));
    if listed {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("ETag"),
        );
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

/// OPTIONS /api/… and OPTIONS /sse/portal-view/{id} (CORS preflight from an
/// allow-listed origin).
fn preflight(ctx: Ctx) -> BoxedFilter<(Response,)> {
    // What each preflighted path allows: (methods, request headers).
    let api = warp::path("api").map(|| {
        (
            "GET, PATCH, PUT, DELETE, POST",
            "authorization, content-type, if-match, x-connection-id",
        )
    });
    // A page on another origin reads the stream with fetch(), which sends the
    // token as `Authorization` (an EventSource cannot set headers).
    let sse = warp::path!("sse" / "portal-view" / String).map(|_| ("GET", "authorization"));
    // Not `warp::options()`: its 405 for every other method would outrank the
    // 404 of an unknown /api route.
    warp::method()
        .and(warp::header::headers_cloned())
        .and(with_ctx(ctx))
        .and_then(
            |method: warp::http::Method, headers: HeaderMap, ctx: Ctx| async move {
                let listed = headers
                    .get(header::ORIGIN)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|o| origin::listed(o, &ctx.config.allowed_origins));
                // Only a cross-origin page that is allowed needs an answer;
                // anything else falls through to the routes' own 404/405.
                if method == warp::http::Method::OPTIONS && listed {
                    Ok(())
                } else {
                    Err(warp::reject::not_found())
                }
            },
        )
        .untuple_one()
        .and(api.or(sse).unify())
        .map(|(methods, headers): (&'static str, &'static str)| {
            let mut response = no_content();
            let h = response.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(methods),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(headers),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            response
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_names_the_methods_of_the_route() {
        let allow = |path| allowed_methods(path, false);
        assert_eq!(allow("/health").as_deref(), Some("GET"));
        assert_eq!(allow("/health/").as_deref(), Some("GET"));
        assert_eq!(
            allow("/api/portal-views/pv1").as_deref(),
            Some("GET, PATCH")
        );
        assert_eq!(
            allowed_methods("/api/portal-views/pv1", true).as_deref(),
            Some("GET, PATCH, OPTIONS")
        );
        assert_eq!(
            allow("/api/portal-views/pv1/messages").as_deref(),
            Some("POST")
        );
        assert_eq!(
            allow("/api/libraries/lib1/members/u1").as_deref(),
            Some("PUT, DELETE")
        );
        assert_eq!(allow("/socket.io/").as_deref(), Some("GET"));
        assert_eq!(allow("/socket.io/x/y").as_deref(), Some("GET"));
        assert_eq!(allow("/").as_deref(), Some("GET, HEAD"));
        assert_eq!(allow("/api/portal-views/").as_deref(), None);
        assert_eq!(allow("/nothing").as_deref(), None);
    }

    /// A route added to `ROUTE_METHODS` needs its metrics label, or its
    /// requests would all be `other`.
    #[test]
    fn every_route_has_a_metrics_label() {
        let labelled = route_label::patterns();
        for (pattern, _, _) in ROUTE_METHODS {
            assert!(
                labelled.iter().any(|p| p.as_slice() == *pattern),
                "no route_label template for {pattern:?}"
            );
        }
        assert_eq!(labelled.len(), ROUTE_METHODS.len());
        assert_eq!(route_label::route("/sse/portal-view/pv1"), SSE_ROUTE);
    }
}
