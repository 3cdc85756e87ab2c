//! Opening a session: SPEC §3's checks (token, expiry, user, view, access),
//! then the join and the `connected` snapshot.

use std::sync::{Arc, Mutex};

use super::expiry::Expiry;
use super::rate::RateLimit;
use super::{Membership, Sender, Session};
use crate::core::connlog::{self, ConnLog, Peer};
use crate::core::context::Core;
use crate::core::forward;
use crate::core::hub::{Joiner, Outbox};
use crate::domain::error::Error;
use crate::protocol;
use crate::store::Access;

/// What the opening request carried: the transport reads it (the token from
/// the query or a header) and hands it in as plain values.
pub struct Params {
    pub view_id: String,
    pub token: Option<String>,
    /// The transport and the socket's peer, for the connection's log lines.
    pub peer: Peer,
}

/// Who was admitted, and the hub's revocation and room counts when their
/// access was read.
struct Admitted {
    user_id: String,
    access: Access,
    /// The token's `exp` claim.
    exp: u64,
    revocations: u64,
    rooms_seen: u64,
}

/// SPEC §3's checks, then the join: a session ready to run, or the refusal
/// (counted in the metrics; the transport shows it as a close code or an
/// HTTP status).
pub(crate) async fn open(ctx: &Core, params: Params) -> Result<Session, Error> {
    let (peer, view_id) = (params.peer, params.view_id.clone());
    let mut user_id = None;
    let opened = match admit(ctx, &params, &mut user_id).await {
        Ok(admitted) => Session::join(ctx, params.view_id, admitted, peer).await,
        Err(e) => Err(e),
    };
    if let Err(e) = &opened {
        e.log("handshake");
        ctx.metrics
            .refused
            .with_label_values(&[&e.close_code().to_string()])
            .inc();
        connlog::refused(&ctx.metrics, &peer, &view_id, user_id.as_deref(), e);
    }
    opened
}

/// SPEC §3's checks in order: token, expiry, user, view, access.
/// `user_id` is set once the token names one, for the refusal's log line.
async fn admit(
    ctx: &Core,
    params: &Params,
    user_id: &mut Option<String>,
) -> Result<Admitted, Error> {
    let token = params.token.as_deref().ok_or(Error::InvalidToken)?;
    let verified = ctx.tokens.verify(token)?;
    *user_id = Some(verified.user_id.clone());
    let revocations = ctx.hub.revocations();
    let rooms_seen = ctx.hub.rooms_created();
    let access = ctx.store.access(&verified.user_id, &params.view_id).await?;
    Ok(Admitted {
        user_id: verified.user_id,
        access,
        exp: verified.exp,
        revocations,
        rooms_seen,
    })
}

impl Session {
    /// Joins the view's room *before* taking the snapshot for `connected`, so
    /// that no broadcast can fall between the two.
    async fn join(
        ctx: &Core,
        view_id: String,
        admitted: Admitted,
        peer: Peer,
    ) -> Result<Session, Error> {
        let Admitted {
            user_id,
            access: Access { role, mut view },
            exp,
            revocations,
            rooms_seen,
        } = admitted;
        let user_id: Arc<str> = user_id.into();
        let view_id: Arc<str> = view_id.into();
        let outbox = Arc::new(Outbox::new(ctx.config.send_queue_bytes));
        let joined = ctx
            .hub
            .join(Joiner {
                view_id: view_id.clone(),
                library_id: view.library_id.as_str().into(),
                user_id: user_id.clone(),
                role,
                outbox: outbox.clone(),
                base_version: view.version,
                rooms_seen,
            })
            .map_err(|_| Error::TooManyConnections)?;
        let membership = Membership {
            ctx: ctx.clone(),
            view_id: view_id.clone(),
            key: joined.key,
        };
        if ctx.hub.revocations() != revocations {
            // A membership changed between our access lookup and our join, too
            // early for the revocation to have found this connection: look again.
            let fresh = ctx.store.access(&user_id, &view_id).await?;
            if fresh.role != role {
                return Err(Error::AccessRevoked);
            }
            view = fresh.view;
        } else if joined.last_version > view.version || joined.reread {
            // A change was broadcast between our read and our join, or may have
            // been before the room existed (reaching no one): re-read.
            view = ctx.store.view(&view_id).await?.ok_or(Error::ViewNotFound)?;
        }
        // Names this node, so another node can forward a POST to it (SPEC §7).
        let connection_id: Arc<str> =
            forward::connection_id(ctx.broker.node_id().as_deref(), new_connection_id()).into();
        outbox.push_front(protocol::connected(&protocol::Connected {
            portal_view_id: &view_id,
            connection_id: &connection_id,
            user_id: &user_id,
            role,
            state: &view.state,
            version: view.version,
            presence: joined.presence,
        }));
        let expiry = Arc::new(Expiry::new(exp, ctx.config.jwt_leeway));
        Ok(Session {
            sender: Sender {
                user_id,
                view_id,
                role,
                connection: Some((joined.key, connection_id)),
                token_expires: expiry.closes_at(),
                expiry: Some(expiry.clone()),
            },
            _membership: membership,
            outbox,
            last_version: view.version,
            expiry,
            rate: Arc::new(Mutex::new(RateLimit::new(
                ctx.config.rate_per_sec,
                ctx.config.rate_burst,
            ))),
            log: ConnLog::new(peer),
        })
    }
}

/// 96 random bits as hex: unguessable, so an id can later name a connection
/// (SPEC §7's `X-Connection-Id`) without being a handle others can forge.
pub(crate) fn new_connection_id() -> String {
    let mut bytes = [0u8; 12];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: fall back to something unique, if guessable.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bytes[..8].copy_from_slice(&n.to_be_bytes());
    }
    // By hand: twelve `format!` calls were 7.8 k instructions per handshake
    // under callgrind, more than the connection's log line.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(2 * bytes.len());
    for b in bytes {
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    id
}
