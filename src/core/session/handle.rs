//! SPEC §3.1 for one inbound message, whatever carried it: the rate verdict,
//! parse, the check against the role, then the reply or the writer's job.

use std::time::{SystemTime, UNIX_EPOCH};

use super::rate::Verdict;
use super::Sender;
use crate::core::context::Core;
use crate::core::hub::SyncAsked;
use crate::core::writer::{Job, Reply, ReplyTo, Snapshot};
use crate::domain::clock::now_secs;
use crate::domain::error::Error;
use crate::protocol::{self, Command, Inbound, Refusal, Token};
use crate::protocol::{Author, Via};
use crate::store::{Needs, Requester};

const RATE_LIMIT_EXCEEDED: (u16, &str) = (1008, "rate limit exceeded");

/// What to do after an inbound message.
pub(crate) enum Flow {
    Continue,
    Close(u16, &'static str),
}

/// SPEC §3.1 for one inbound message, whatever carried it: the rate verdict
/// (the caller owns the bucket) → parse → check against the role → apply.
/// Replies go to `reply`; a POST is answered exactly once on every path.
pub(crate) async fn handle(
    ctx: &Core,
    sender: &Sender,
    verdict: Verdict,
    text: &str,
    reply: ReplyTo,
) -> Flow {
    let count = |kind: &str, outcome: &str| {
        ctx.metrics
            .inbound
            .with_label_values(&[kind, outcome])
            .inc();
    };
    if verdict != Verdict::Allowed {
        match protocol::rate_limited(text) {
            Ok(Refusal::Reply { error, id }) => {
                count(protocol::type_label(text), "rate_limited");
                reply.refuse(error, id);
            }
            _ => {
                count("invalid", "unsupported");
                reply.unsupported();
                return Flow::Close(1003, "unsupported data");
            }
        }
        if verdict == Verdict::Exceeded {
            return Flow::Close(RATE_LIMIT_EXCEEDED.0, RATE_LIMIT_EXCEEDED.1);
        }
        return Flow::Continue;
    }
    let Inbound { id, command } = match protocol::parse(text, sender.role) {
        Ok(inbound) => inbound,
        Err(Refusal::Unsupported) => {
            count("invalid", "unsupported");
            reply.unsupported();
            return Flow::Close(1003, "unsupported data");
        }
        Err(Refusal::Reply { error, id }) => {
            let outcome = match error {
                Error::Forbidden(_) => "forbidden",
                Error::UnknownType => "unknown_type",
                _ => "bad_request",
            };
            count(protocol::type_label(text), outcome);
            reply.refuse(error, id);
            return Flow::Continue;
        }
    };
    if let Command::RefreshToken(token) = &command {
        match refresh(ctx, sender, token) {
            Ok(exp) => {
                count(command.name(), "accepted");
                reply.reply(Some(protocol::token_refreshed(exp, id.as_deref())));
            }
            Err(error) => {
                count(command.name(), "bad_request");
                reply.refuse(error, id);
            }
        }
        return Flow::Continue;
    }
    count(command.name(), "accepted");
    let view_id = &sender.view_id;
    match command {
        // Answered above.
        Command::RefreshToken(_) => {}
        Command::Ping => {
            reply.reply(Some(protocol::pong(id.as_deref(), now_ms())));
        }
        Command::Change { change, payload } => {
            let job = Job::Change {
                view_id: view_id.clone(),
                change,
                payload,
                author: Author {
                    user_id: sender.user_id.clone(),
                    via: Via::Message(sender.connection.clone()),
                },
                // Whatever the role was when the message arrived, it must
                // still hold when the change is applied (SPEC §4).
                requester: Requester {
                    user_id: sender.user_id.clone(),
                    expires_at: sender.token_expires,
                    needs: Needs::Controller,
                },
                if_match: None,
                reply: Reply::Message { to: reply, id },
            };
            if ctx.writer.submit(job).await.is_err() {
                return Flow::Close(1011, "internal error");
            }
        }
        Command::RequestSync => {
            let asked = match &sender.connection {
                Some((key, connection_id)) => {
                    ctx.hub
                        .request_sync(view_id, *key, &sender.user_id, connection_id, id)
                }
                // A POST naming no stream of its own could never receive a
                // later answer: it gets the stored state now, and nobody is asked.
                None => SyncAsked::AnswerNow(id),
            };
            match asked {
                SyncAsked::Forwarded(forward) => {
                    ctx.broker.request_sync(view_id, &forward);
                    reply.reply(None);
                }
                SyncAsked::Waiting => reply.reply(None),
                SyncAsked::AnswerNow(id) => {
                    let job = Job::Snapshot(Snapshot {
                        view_id: view_id.clone(),
                        to: reply,
                        id,
                    });
                    if ctx.writer.submit(job).await.is_err() {
                        return Flow::Close(1011, "internal error");
                    }
                }
            }
        }
    }
    Flow::Continue
}

/// SPEC §9: a token valid by SPEC §2's rules (the same leeway), for the
/// session's own user, moves its expiry; returns the new `exp`. Whether the
/// user still has access is not asked again: a change of access closes the
/// session by revocation (SPEC §3.4), so a live session's user had it.
/// Nothing here logs the token.
fn refresh(ctx: &Core, sender: &Sender, token: &Token) -> Result<u64, Error> {
    let Some(expiry) = &sender.expiry else {
        return Err(Error::BadRequest(
            "refresh-token needs X-Connection-Id naming your SSE stream: \
             a POST of its own has no session to refresh"
                .into(),
        ));
    };
    let verified = ctx.tokens.verify(token.as_str()).map_err(|e| match e {
        Error::TokenExpired => Error::BadRequest("token expired".into()),
        _ => Error::BadRequest("invalid token".into()),
    })?;
    if *verified.user_id != *sender.user_id {
        return Err(Error::BadRequest("token is for another user".into()));
    }
    expiry.refresh(verified.exp, ctx.config.jwt_leeway, now_secs())?;
    Ok(verified.exp)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
