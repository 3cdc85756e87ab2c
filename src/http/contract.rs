//! The machine-readable contract, served exactly as it is kept in `docs/`:
//! `GET /api/openapi.json` (OpenAPI 3.1 of every route) and
//! `GET /api/messages.schema.json` (JSON Schema of every WebSocket and SSE
//! message, which the OpenAPI document refers to by that relative name).
//!
//! Compiled in like the pages, so the document a server serves is the one
//! of its own build; cached like them (ETag, 304).

use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::Filter;

use crate::http::web::{fnv1a, if_none_match, serve, Asset};

const JSON: &str = "application/json";

pub(crate) const OPENAPI: Asset = Asset {
    name: "openapi.json",
    content_type: JSON,
    body: include_bytes!("../../docs/openapi.json"),
    hash: fnv1a(include_bytes!("../../docs/openapi.json")),
};

pub(crate) const MESSAGES: Asset = Asset {
    name: "messages.schema.json",
    content_type: JSON,
    body: include_bytes!("../../docs/messages.schema.json"),
    hash: fnv1a(include_bytes!("../../docs/messages.schema.json")),
};

/// GET /api/openapi.json and GET /api/messages.schema.json; public, like
/// the pages: they describe the server, they hold nothing of anyone's.
pub(crate) fn routes() -> BoxedFilter<(Response,)> {
    let openapi = warp::path!("api" / "openapi.json")
        .and(warp::get())
        .and(if_none_match())
        .map(|tag: Option<String>| serve(&OPENAPI, tag.as_deref()));
    let messages = warp::path!("api" / "messages.schema.json")
        .and(warp::get())
        .and(if_none_match())
        .map(|tag: Option<String>| serve(&MESSAGES, tag.as_deref()));
    openapi.or(messages).unify().boxed()
}
