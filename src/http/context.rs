//! What every route is handed: the live server ([`Core`]) and the parts only
//! HTTP needs.

use std::ops::Deref;
use std::sync::Arc;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::core::context::Core;
use crate::core::rest_rate::UserRates;
use crate::http::streams::Streams;

/// Cheap to clone: one `Arc`.
#[derive(Clone)]
pub struct Ctx(Arc<Shared>);

pub struct Shared {
    pub core: Core,
    /// The SSE streams of this node, for SPEC §7's POST route.
    pub streams: Streams,
    /// Per-user rate buckets of REST messages (PATCH, stream-less POSTs).
    pub user_rates: UserRates,
    /// Owned here rather than left to warp: warp's default 128 KiB read buffer
    /// per socket is most of a connection's memory (see STACK.md).
    pub ws_config: WebSocketConfig,
}

impl Ctx {
    pub fn new(core: Core) -> Ctx {
        let config = &core.config;
        let user_rates = UserRates::new(config.rate_per_sec, config.rate_burst);
        let max = config.max_message_bytes;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        Ctx(Arc::new(Shared {
            core,
            streams: Default::default(),
            user_rates,
            ws_config,
        }))
    }
}

/// A [`Ctx`] that does not keep the server alive (for callbacks the
/// server's own parts hold).
pub(crate) struct WeakCtx(std::sync::Weak<Shared>);

impl WeakCtx {
    pub(crate) fn upgrade(&self) -> Option<Ctx> {
        self.0.upgrade().map(Ctx)
    }
}

impl Ctx {
    pub(crate) fn downgrade(&self) -> WeakCtx {
        WeakCtx(Arc::downgrade(&self.0))
    }
}

impl Deref for Ctx {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Routes read the core's parts (`ctx.config`, `ctx.hub`, …) as their own.
impl Deref for Shared {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}
