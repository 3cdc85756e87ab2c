//! The holder's side of a `POST …/messages` forwarded from another node (see
//! `core::forward`): it runs through the same code as a local POST
//! (`sse::run`), and the response it would have given goes back whole
//! (status, headers, body), for the receiving node to answer with.

use http_body_util::BodyExt;

use crate::core::forward::{ForwardReply, ForwardedPost, PostHandler};
use crate::http::context::Ctx;
use crate::http::error::error_response;
use crate::http::sse;

/// Lets the broker run the other nodes' forwards here. The handler holds the
/// server weakly: it is the broker's, which the server holds.
pub(crate) fn serve(ctx: &Ctx) {
    let weak = ctx.downgrade();
    let handler: PostHandler = std::sync::Arc::new(move |post| {
        let ctx = weak.upgrade();
        Box::pin(async move {
            match ctx {
                Some(ctx) => answer(&ctx, post).await,
                None => ForwardReply::NotHeld,
            }
        })
    });
    ctx.broker.serve_posts(handler);
}

/// Another node's forward of a POST naming one of this node's streams: the
/// stream must be the user's, on the view (the token was checked there).
async fn answer(ctx: &Ctx, post: ForwardedPost) -> ForwardReply {
    let Some(stream) = ctx
        .streams
        .find(&post.connection_id, &post.user_id, &post.view_id)
    else {
        return ForwardReply::NotHeld;
    };
    let Some(text) = post.body else {
        return ForwardReply::Held;
    };
    let ran = sse::run(
        ctx,
        Some(stream),
        &post.user_id,
        &post.view_id,
        post.role,
        post.token_expires,
        &text,
    )
    .await;
    let response = match ran {
        Ok(answer) => sse::answer_response(answer),
        Err(e) => error_response(&e),
    };
    let (parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        Err(_) => return ForwardReply::NotHeld,
    };
    ForwardReply::Answer {
        status: parts.status.as_u16(),
        headers: parts
            .headers
            .iter()
            .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
            .collect(),
        body,
    }
}
