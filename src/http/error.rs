//! The HTTP face of [`Error`] (SPEC §4): its status, the JSON error body, and
//! every warp rejection turned into that body.

use std::convert::Infallible;

use serde::Serialize;
use serde_json::json;
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Rejection, Reply};

use crate::domain::error::Error;

/// Lets a filter refuse with an [`Error`]; [`recover`] answers it.
impl warp::reject::Reject for Error {}

pub(crate) fn status(e: &Error) -> StatusCode {
    match e {
        Error::InvalidToken | Error::TokenExpired | Error::UnknownUser => StatusCode::UNAUTHORIZED,
        Error::ViewNotFound | Error::NotFound(_) | Error::Missing { .. } => StatusCode::NOT_FOUND,
        Error::AccessDenied
        | Error::AccessRevoked
        | Error::Forbidden(_)
        | Error::ForbiddenOrigin => StatusCode::FORBIDDEN,
        Error::TooManyConnections | Error::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        Error::UnknownType | Error::BadRequest(_) => StatusCode::BAD_REQUEST,
        Error::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
        Error::PayloadTooLarge | Error::StateTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        Error::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Error::Conflict(_) | Error::Conflicting(_) => StatusCode::CONFLICT,
        Error::ShuttingDown | Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Storage(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        Error::DatabaseMissing => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub(crate) fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let mut response = warp::reply::json(body).into_response();
    *response.status_mut() = status;
    response
}

/// `{"error":{"code","message"}}` with the error's status; the cause of an
/// internal error is logged, never sent.
pub(crate) fn error_response(e: &Error) -> Response {
    e.log("HTTP request");
    let status = status(e);
    let mut response = json_response(
        status,
        &json!({"error": {"code": e.code(), "message": e.client_message()}}),
    );
    if status == StatusCode::UNAUTHORIZED {
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

pub(crate) async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
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
