//! The REST routes of SPEC §4, one warp filter each: the view (GET, PATCH
//! with `If-Match`), the members (PUT, DELETE), `/health` and `/metrics`, and
//! the request bodies they read.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use warp::filters::BoxedFilter;
use warp::http::{header, HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Filter;

use crate::core::session::Verdict;
use crate::domain::access::{self, LibraryRole};
use crate::domain::error::Error;
use crate::domain::merge::Change;
use crate::domain::model::Presence;
use crate::http::context::Ctx;
use crate::http::error::{error_response, json_response};
use crate::http::filters::{token_expires, with_ctx, with_origin_check, with_token, with_verified};
use crate::protocol::auth::Verified;
use crate::store::{MemberChange, Needs, Requester, ViewRow};

/// GET /health
pub(crate) fn health(ctx: Ctx) -> BoxedFilter<(Response,)> {
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

/// GET /metrics
pub(crate) fn metrics(ctx: Ctx) -> BoxedFilter<(Response,)> {
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

/// GET /api/portal-views/{id}
pub(crate) fn get_view(ctx: Ctx) -> BoxedFilter<(Response,)> {
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
pub(crate) fn patch_view(ctx: Ctx) -> BoxedFilter<(Response,)> {
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
fn parse_if_match(value: &str) -> Option<Vec<i64>> {
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

/// PUT /api/libraries/{libraryId}/members/{userId}
pub(crate) fn put_member(ctx: Ctx) -> BoxedFilter<(Response,)> {
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
pub(crate) fn delete_member(ctx: Ctx) -> BoxedFilter<(Response,)> {
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

/// 204 with an empty body.
pub(crate) fn no_content() -> Response {
    let mut response = Response::new(Default::default());
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
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
}
