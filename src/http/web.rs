//! The browser app: the sign-in, presenter and viewer pages and their assets
//! (`web/`), compiled into the binary and served with strict headers.
//!
//! Embedding keeps "one binary" true (no asset directory to deploy or to get
//! out of step with the server). Assets are looked up by exact name in a fixed
//! table, so no request path ever reaches the file system.

use warp::filters::BoxedFilter;
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Filter;

use crate::domain::error::Error;
use crate::http::error::error_response;

/// One embedded file.
pub(crate) struct Asset {
    pub(crate) name: &'static str,
    pub(crate) content_type: &'static str,
    pub(crate) body: &'static [u8],
    /// FNV-1a of the body, computed at compile time: a validator that changes
    /// exactly when the file does, so browsers revalidate cheaply (304).
    pub(crate) hash: u64,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

macro_rules! asset {
    ($name:literal, $content_type:expr) => {
        Asset {
            name: $name,
            content_type: $content_type,
            body: include_bytes!(concat!("../../web/", $name)),
            hash: fnv1a(include_bytes!(concat!("../../web/", $name))),
        }
    };
}

pub(crate) const INDEX: Asset = asset!("index.html", HTML);
pub(crate) const PRESENTER: Asset = asset!("presenter.html", HTML);
pub(crate) const VIEWER: Asset = asset!("viewer.html", HTML);

/// Everything under `/assets/`, by exact name.
pub(crate) const ASSETS: [Asset; 9] = [
    asset!("client.js", JS),
    asset!("sse.js", JS),
    asset!("rules.js", JS),
    asset!("app.js", JS),
    asset!("index.js", JS),
    asset!("presenter.js", JS),
    asset!("viewer.js", JS),
    asset!("style.css", CSS),
    asset!("icon.svg", SVG),
];

/// Scripts, styles, images and fonts only from this server; no inline code
/// (the pages have none), so an item title that smuggles markup cannot run.
/// `connect-src` names `ws:`/`wss:` because not every browser lets `'self'`
/// cover a WebSocket to the same host.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss:; \
     object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub(crate) const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// The page and asset routes.
pub(crate) fn routes() -> BoxedFilter<(Response,)> {
    index()
        .or(presenter())
        .unify()
        .or(viewer())
        .unify()
        .or(assets())
        .unify()
        .boxed()
}

/// GET /
fn index() -> BoxedFilter<(Response,)> {
    warp::path::end()
        .and(get_or_head())
        .and(if_none_match())
        .map(|tag: Option<String>| serve(&INDEX, tag.as_deref()))
        .boxed()
}

/// GET /presenter
fn presenter() -> BoxedFilter<(Response,)> {
    warp::path!("presenter")
        .and(get_or_head())
        .and(if_none_match())
        .map(|tag: Option<String>| serve(&PRESENTER, tag.as_deref()))
        .boxed()
}

/// GET /viewer
fn viewer() -> BoxedFilter<(Response,)> {
    warp::path!("viewer")
        .and(get_or_head())
        .and(if_none_match())
        .map(|tag: Option<String>| serve(&VIEWER, tag.as_deref()))
        .boxed()
}

/// GET /assets/{name}
fn assets() -> BoxedFilter<(Response,)> {
    warp::path!("assets" / String)
        .and(get_or_head())
        .and(if_none_match())
        .map(|name: String, tag: Option<String>| {
            match ASSETS.iter().find(|asset| asset.name == name) {
                Some(asset) => serve(asset, tag.as_deref()),
                None => {
                    let mut response = error_response(&Error::NotFound("no such asset"));
                    security_headers(&mut response);
                    response
                }
            }
        })
        .boxed()
}

/// GET, and HEAD (hyper leaves the body out).
fn get_or_head() -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::get().or(warp::head()).unify()
}

pub(crate) fn if_none_match(
) -> impl Filter<Extract = (Option<String>,), Error = std::convert::Infallible> + Clone {
    warp::header::optional::<String>(header::IF_NONE_MATCH.as_str())
        .or(warp::any().map(|| None))
        .unify()
}

/// The asset, or 304 when the browser's copy (`If-None-Match`) is current.
pub(crate) fn serve(asset: &Asset, if_none_match: Option<&str>) -> Response {
    let etag = format!("\"{:016x}\"", asset.hash);
    let fresh = if_none_match.is_some_and(|value| {
        value
            .split(',')
            .map(|tag| tag.trim().trim_start_matches("W/"))
            .any(|tag| tag == etag || tag == "*")
    });
    let mut response = if fresh {
        let mut response = Response::new(Default::default());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let mut response = Response::new(asset.body.into());
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        response
    };
    let headers = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, etag);
    }
    // Names are not fingerprinted, so a new binary may change any file:
    // always revalidate (cheap, thanks to the ETag) rather than cache blindly.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    security_headers(&mut response);
    response
}

/// Headers every page and asset carries.
fn security_headers(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Tokens travel in the URL fragment, which browsers never send; this is
    // the second lock on the door.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// The presenter and viewer links `portal-sync demo` prints: the token rides
/// in the fragment (`#token=…`), which never reaches the server or its logs.
pub(crate) fn page_url(base: &str, page: &str, token: &str, view: &str) -> String {
    format!("{base}/{page}#token={token}&view={view}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asset_names_are_unique_and_typed_by_extension() {
        for (i, asset) in ASSETS.iter().enumerate() {
            assert!(
                ASSETS[i + 1..].iter().all(|other| other.name != asset.name),
                "{} twice",
                asset.name
            );
            let expected = match asset.name.rsplit('.').next() {
                Some("js") => JS,
                Some("css") => CSS,
                Some("svg") => SVG,
                other => panic!("no content type for {other:?}"),
            };
            assert_eq!(asset.content_type, expected, "{}", asset.name);
            assert!(!asset.body.is_empty(), "{} is empty", asset.name);
        }
    }

    #[test]
    fn fnv1a_known_values() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn page_url_puts_the_token_in_the_fragment() {
        assert_eq!(
            page_url("http://127.0.0.1:3000", "viewer", "t.o.k", "demo"),
            "http://127.0.0.1:3000/viewer#token=t.o.k&view=demo"
        );
    }
}
