//! The HTTP routes of SPEC §4 as warp filters, one per route, and the mapping
//! of every rejection to the JSON error body.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use warp::filters::path::FullPath;
use warp::filters::BoxedFilter;
use warp::http::{header, HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::core::session::Verdict;
use crate::domain::access::{self, LibraryRole};
use crate::domain::error::Error;
use crate::domain::merge::Change;
use crate::domain::model::Presence;
use crate::http::context::Ctx;
use crate::http::origin;
use crate::http::ws;
use crate::protocol::auth::Verified;
use crate::store::{MemberChange, Needs, Requester, ViewRow};

/// Every route the server answers, with logging and JSON errors.
pub fn routes(ctx: Ctx) -> BoxedFilter<(Response,)> {
    let metrics = ctx.metrics.clone();
    let inner = ws::portal_view(ctx.clone())
        .or(ws::socket_io(ctx.clone()))
        .unify()
        .or(health(ctx.clone()))
        .unify()
        .or(metrics_route(ctx.clone()))
        .unify()
        .or(get_view(ctx.clone()))
        .unify()
        .or(patch_view(ctx.clone()))
        .unify()
        .or(put_member(ctx.clone()))
        .unify()
        .or(delete_member(ctx.clone()))
        .unify()
        // SPEC §7's fallback for networks that break WebSockets (sse.rs).
        .or(crate::http::sse::stream(ctx.clone()))
        .unify()
        .or(crate::http::sse::post_message(ctx.clone()))
        .unify()
        .or(preflight(ctx.clone()))
        .unify()
        // The browser pages and their assets (web.rs).
        .or(crate::http::web::routes())
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
            metrics
                .http_requests
                .with_label_values(&[&status.to_string()])
                .observe(info.elapsed().as_secs_f64());
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
/// A route added to [`routes`] needs its line here.
const ROUTE_METHODS: &[(&[&str], &str, bool)] = &[
    (&["health"], "GET", false),
    (&["metrics"], "GET", false),
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

/// Refuses (403) a browser page whose origin is neither ours nor on
/// `--allowed-origins`; requests without an `Origin` (non-browser clients) pass.
pub fn with_origin_check(ctx: Ctx) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and(with_ctx(ctx))
        .and_then(|headers: HeaderMap, ctx: Ctx| async move {
            let text = |name| {
                headers
                    .get(name)
                    .and_then(|v: &HeaderValue| v.to_str().ok())
            };
            if origin::allowed(
                text(header::ORIGIN),
                text(header::HOST),
                &ctx.config.allowed_origins,
            ) {
                Ok(())
            } else {
                if let Some(origin) = text(header::ORIGIN) {
                    log::info!("refused a request from origin {origin:?}");
                }
                Err(warp::reject::custom(Error::ForbiddenOrigin))
            }
        })
        .untuple_one()
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

/// GET /metrics
fn metrics_route(ctx: Ctx) -> BoxedFilter<(Response,)> {
    warp::path!("metrics")
        .and(warp::get())
        .and(with_ctx(ctx))
        .map(|ctx: Ctx| {
            let mut response = Response::new(ctx.metrics.render().into());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        })
        .boxed()
}

/// PUT /api/libraries/{libraryId}/members/{userId}
fn put_member(ctx: Ctx) -> BoxedFilter<(Response,)> {
    warp::path!("api" / "libraries" / String / "members" / String)
        .and(warp::put())
        .and(with_origin_check(ctx.clone()))
        .and(with_token(ctx.clone()))
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(with_ctx(ctx))
        .then(
            |library_id: String,
             user_id: String,
             caller: String,
             headers: HeaderMap,
             body,
             ctx: Ctx| async move {
                match set_member(&ctx, library_id, user_id, caller, &headers, body).await {
                    Ok(member) => json_response(StatusCode::OK, &member),
                    Err(e) => error_response(&e),
                }
            },
        )
        .boxed()
}

/// Checks in the order of PATCH: who (401/404/403), then the body
/// (415/413/400), then the change itself (404/409).
async fn set_member<S, B>(
    ctx: &Ctx,
    library_id: String,
    user_id: String,
    caller: String,
    headers: &HeaderMap,
    body: S,
) -> Result<Value, Error>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let probe = MemberChange::Remove;
    member_call(ctx, &caller, &library_id, &user_id, probe, false).await?;
    let body = json_object_body(headers, body, ctx.config.max_message_bytes).await?;
    let Some(role) = body
        .get("role")
        .and_then(Value::as_str)
        .and_then(LibraryRole::parse)
    else {
        return Err(Error::BadRequest(
            "role must be \"OWNER\", \"EDITOR\" or \"VIEWER\"".into(),
        ));
    };
    let change = MemberChange::Set(role);
    let role = member_call(ctx, &caller, &library_id, &user_id, change, true).await?;
    Ok(json!({"libraryId": library_id, "userId": user_id, "role": role}))
}

/// DELETE /api/libraries/{libraryId}/members/{userId}
fn delete_member(ctx: Ctx) -> BoxedFilter<(Response,)> {
    warp::path!("api" / "libraries" / String / "members" / String)
        .and(warp::delete())
        .and(with_origin_check(ctx.clone()))
        .and(with_token(ctx.clone()))
        .and(with_ctx(ctx))
        .then(
            |library_id: String, user_id: String, caller: String, ctx: Ctx| async move {
                let removed = member_call(
                    &ctx,
                    &caller,
                    &library_id,
                    &user_id,
                    MemberChange::Remove,
                    true,
                )
                .await;
                match removed {
                    Ok(_) => no_content(),
                    Err(e) => error_response(&e),
                }
            },
        )
        .boxed()
}

/// Runs a membership change and, once committed, wakes the revocation
/// watcher so the member's connections close now rather than at its next poll.
async fn member_call(
    ctx: &Ctx,
    caller: &str,
    library_id: &str,
    user_id: &str,
    change: MemberChange,
    apply: bool,
) -> Result<Option<String>, Error> {
    let role = ctx
        .store
        .change_member(caller, library_id, user_id, change, apply)
        .await?;
    if apply {
        ctx.revocation_nudge.now();
    }
    Ok(role)
}

pub fn with_ctx(ctx: Ctx) -> impl Filter<Extract = (Ctx,), Error = Infallible> + Clone {
    warp::any().map(move || ctx.clone())
}

/// The user of `Authorization: Bearer <JWT>`. Whether that user exists is
/// checked with the rest of the access lookup.
pub(crate) fn with_token(ctx: Ctx) -> impl Filter<Extract = (String,), Error = Rejection> + Clone {
    with_verified(ctx).map(|verified: Verified| verified.user_id)
}

/// The checked token of `Authorization: Bearer <JWT>`, for routes whose
/// change must still find it valid when it is applied.
pub(crate) fn with_verified(
    ctx: Ctx,
) -> impl Filter<Extract = (Verified,), Error = Rejection> + Clone {
    warp::header::headers_cloned().and(with_ctx(ctx)).and_then(
        |headers: HeaderMap, ctx: Ctx| async move {
            let value = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let token = crate::protocol::auth::bearer(value).ok_or(Error::InvalidToken)?;
            ctx.tokens.verify(token).map_err(warp::reject::custom)
        },
    )
}

/// When a request's token expires (its `exp` plus `--jwt-leeway`, seconds
/// since the epoch): the writer refuses its change from then on (SPEC §4).
pub(crate) fn token_expires(ctx: &Ctx, verified: &Verified) -> u64 {
    verified.exp.saturating_add(ctx.config.jwt_leeway)
}

/// GET /health
fn health(ctx: Ctx) -> BoxedFilter<(Response,)> {
    warp::path!("health")
        .and(warp::get())
        .and(with_ctx(ctx))
        .then(|ctx: Ctx| async move {
            let probe = ctx.store.ping().await;
            match probe {
                Ok(_) => {
                    let mut body = json!({"status": "ok", "connections": ctx.hub.connections()});
                    // Several nodes: Redis down is degraded, not down (this
                    // node still serves its own connections, and other nodes'
                    // changes still arrive through the database), so the
                    // status stays 200 "ok" as SPEC §4 has it, with the
                    // degradation named (README: Running several nodes).
                    if let Some(up) = ctx.broker.reachable() {
                        body["redis"] = json!(if up { "up" } else { "down" });
                    }
                    json_response(StatusCode::OK, &body)
                }
                Err(e) => {
                    e.log("health check");
                    let error = match e {
                        Error::DatabaseMissing => "database file missing",
                        _ => "database unavailable",
                    };
                    json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({"status": "unavailable", "error": error}),
                    )
                }
            }
        })
        .boxed()
}

/// GET /api/portal-views/{id}
fn get_view(ctx: Ctx) -> BoxedFilter<(Response,)> {
    warp::path!("api" / "portal-views" / String)
        .and(warp::get())
        .and(with_origin_check(ctx.clone()))
        .and(with_token(ctx.clone()))
        .and(with_ctx(ctx))
        .then(|view_id: String, user_id: String, ctx: Ctx| async move {
            match ctx.store.access(&user_id, &view_id).await {
                Ok(access) => view_response(&ctx, &access.view),
                Err(e) => error_response(&e),
            }
        })
        .boxed()
}

/// PATCH /api/portal-views/{id}
fn patch_view(ctx: Ctx) -> BoxedFilter<(Response,)> {
    warp::path!("api" / "portal-views" / String)
        .and(warp::patch())
        .and(with_origin_check(ctx.clone()))
        .and(with_verified(ctx.clone()))
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(with_ctx(ctx))
        .then(
            |view_id: String, verified: Verified, headers: HeaderMap, body, ctx: Ctx| async move {
                match patch(&ctx, view_id, verified, &headers, body).await {
                    Ok(view) => view_response(&ctx, &view),
                    Err(e) => error_response(&e),
                }
            },
        )
        .boxed()
}

/// Checks in order: the token (401), the user's rate (429), who (404/403),
/// then the body (415/413/400); then, inside the write transaction, the token
/// and access again (401/403), the precondition (412) and the state's size
/// (413).
async fn patch<S, B>(
    ctx: &Ctx,
    view_id: String,
    verified: Verified,
    headers: &HeaderMap,
    body: S,
) -> Result<ViewRow, Error>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let user_id: Arc<str> = verified.user_id.as_str().into();
    // Before any lookup or body: a flood costs a map lookup per request.
    if ctx.user_rates.check(&user_id, tokio::time::Instant::now()) != Verdict::Allowed {
        return Err(Error::RateLimited);
    }
    // Not the state: a PATCH does not send it, and it may be large.
    let grant = ctx.store.grant(&user_id, &view_id).await?;
    access::may_change_view(grant.role)?;
    let patch = json_object_body(headers, body, ctx.config.max_message_bytes).await?;
    let payload: Box<RawValue> = serde_json::value::to_raw_value(&patch)
        .map_err(|e| Error::Internal(format!("serializing a patch: {e}")))?;
    let change = Change::Merge(patch);
    change.check_depth()?;
    let if_match = headers
        .get(header::IF_MATCH)
        .map(|v| parse_if_match(v.to_str().unwrap_or("")))
        .unwrap_or(None);
    let requester = Requester {
        user_id,
        expires_at: token_expires(ctx, &verified),
        needs: Needs::Controller,
    };
    ctx.writer
        .change_and_wait(&view_id, change, payload, requester, if_match)
        .await
}

/// A PATCH or PUT body, checked in SPEC §4's order: Content-Type (415), size
/// (413), a JSON object (400).
async fn json_object_body<S, B>(
    headers: &HeaderMap,
    body: S,
    limit: usize,
) -> Result<serde_json::Map<String, Value>, Error>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    check_content_type(headers)?;
    let body = read_limited(body, headers, limit).await?;
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::BadRequest("the body must be a JSON object".into())),
        Err(e) => Err(Error::BadRequest(format!("the body is not JSON: {e}"))),
    }
}

pub(crate) fn check_content_type(headers: &HeaderMap) -> Result<(), Error> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or(Error::UnsupportedMediaType)?;
    let essence = value.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json")
        || essence.eq_ignore_ascii_case("application/merge-patch+json")
    {
        Ok(())
    } else {
        Err(Error::UnsupportedMediaType)
    }
}

/// How long a request body may take to arrive once its head is read (hyper's
/// header timeout covers only the head): a client that stalls mid-body must
/// not hold a connection and a task forever.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads a body, refusing (413) a `Content-Length` over `limit` before reading
/// anything and any body as soon as it passes `limit` (a chunked body has no
/// length to trust); a body that stalls gets 400 after [`BODY_TIMEOUT`].
pub(crate) async fn read_limited<S, B>(
    mut body: S,
    headers: &HeaderMap,
    limit: usize,
) -> Result<BytesMut, Error>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(Error::PayloadTooLarge);
    }
    let read = async {
        let mut out = BytesMut::new();
        while let Some(chunk) = body.next().await {
            let mut chunk =
                chunk.map_err(|e| Error::BadRequest(format!("reading the body: {e}")))?;
            if out.len() + chunk.remaining() > limit {
                return Err(Error::PayloadTooLarge);
            }
            while chunk.has_remaining() {
                let part = chunk.chunk();
                out.extend_from_slice(part);
                let n = part.len();
                chunk.advance(n);
            }
        }
        Ok(out)
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .map_err(|_| Error::BadRequest("the request body did not arrive in time".into()))?
}

/// `If-Match`: `*` (any version), or a list of `"<version>"` / bare numbers.
/// Anything else (a weak tag, garbage) can never match, so it gives 412.
/// Returns `None` for "no condition".
pub fn parse_if_match(value: &str) -> Option<Vec<i64>> {
    let mut versions = Vec::new();
    for tag in value.split(',').map(str::trim) {
        if tag == "*" {
            return None;
        }
        let bare = tag
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(tag);
        if let Ok(v) = bare.parse::<i64>() {
            versions.push(v);
        }
    }
    Some(versions)
}

fn view_response(ctx: &Ctx, view: &ViewRow) -> Response {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        id: &'a str,
        library_id: &'a str,
        name: &'a str,
        state: &'a RawValue,
        version: i64,
        updated_at: Option<&'a str>,
        presence: Presence,
    }
    let mut response = json_response(
        StatusCode::OK,
        &Body {
            id: &view.id,
            library_id: &view.library_id,
            name: &view.name,
            state: &view.state,
            version: view.version,
            updated_at: view.updated_at.as_deref(),
            presence: ctx.hub.presence(&view.id),
        },
    );
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", view.version)) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

/// 204 with an empty body.
fn no_content() -> Response {
    let mut response = Response::new(Default::default());
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

pub fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let mut response = warp::reply::json(body).into_response();
    *response.status_mut() = status;
    response
}

/// `{"error":{"code","message"}}` with the error's status; the cause of an
/// internal error is logged, never sent.
pub fn error_response(e: &Error) -> Response {
    e.log("HTTP request");
    let mut response = json_response(
        e.status(),
        &json!({"error": {"code": e.code(), "message": e.client_message()}}),
    );
    if e.status() == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if let Error::PreconditionFailed { current } = e {
        if let Ok(etag) = HeaderValue::from_str(&format!("\"{current}\"")) {
            response.headers_mut().insert(header::ETAG, etag);
        }
    }
    response
}

async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let (status, code, message) = if let Some(e) = rejection.find::<Error>() {
        return Ok(error_response(e));
    } else if rejection.is_not_found() {
        (StatusCode::NOT_FOUND, "NOT_FOUND", "no such route")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "method not allowed on this route",
        )
    } else {
        log::debug!("unhandled rejection: {rejection:?}");
        (StatusCode::BAD_REQUEST, "BAD_REQUEST", "bad request")
    };
    Ok(json_response(
        status,
        &json!({"error": {"code": code, "message": message}}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_forms() {
        assert_eq!(parse_if_match("\"12\""), Some(vec![12]));
        assert_eq!(parse_if_match("12"), Some(vec![12]));
        assert_eq!(parse_if_match("\"3\", \"4\""), Some(vec![3, 4]));
        assert_eq!(parse_if_match("*"), None);
        assert_eq!(parse_if_match("W/\"12\""), Some(vec![]));
        assert_eq!(parse_if_match("garbage"), Some(vec![]));
    }

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
}
