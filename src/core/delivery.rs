//! A committed broadcast on its way to this node's connections: the frame
//! itself ([`Broadcast`]), the in-order rule every room applies to it under
//! its lock, and what one offer to a room did. A leaf, so that the writer,
//! the broker seam, the hub and the sequencer all name the same frame
//! without importing each other.

use std::ops::Range;

use tokio_tungstenite::tungstenite::Message;

/// One state-change broadcast, as the sequencer delivers it.
pub struct Broadcast {
    pub msg: Message,
    pub version: i64,
    /// The sending connection's hub key: it does not get its own change back.
    pub except: Option<u64>,
}

/// Versions `from..=to` are missing before `frames[at]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub at: usize,
    pub from: i64,
    pub to: i64,
}

/// What one offer to a room did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offered {
    /// Frames queued, over all connections.
    pub queued: usize,
    /// The room's last delivered version afterwards.
    pub last: i64,
    /// Where delivery stopped, when gaps are filled.
    pub gap: Option<Gap>,
}

/// Which of a view's `frames` (in increasing version order) a room whose
/// last delivered version is `last` takes now: versions it already has are
/// skipped, and, when gaps are filled, the run stops before a version that
/// skips ahead (see `core::sequencer` for why a single node fills none).
/// The hub applies this under the room's lock.
pub(crate) fn in_order(
    last: i64,
    frames: &[Broadcast],
    fill_gaps: bool,
) -> (Range<usize>, Option<Gap>) {
    let start = frames.partition_point(|f| f.version <= last);
    if !fill_gaps {
        return (start..frames.len(), None);
    }
    let mut prev = last;
    for (i, frame) in frames.iter().enumerate().skip(start) {
        if frame.version != prev + 1 {
            let gap = Gap {
                at: i,
                from: prev + 1,
                to: frame.version - 1,
            };
            return (start..i, Some(gap));
        }
        prev = frame.version;
    }
    (start..frames.len(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(versions: &[i64]) -> Vec<Broadcast> {
        versions
            .iter()
            .map(|&version| Broadcast {
                msg: Message::text("x"),
                version,
                except: None,
            })
            .collect()
    }

    #[test]
    fn versions_already_delivered_are_skipped() {
        assert_eq!(in_order(5, &frames(&[4, 5, 6, 7]), true), (2..4, None));
        assert_eq!(in_order(5, &frames(&[4, 5]), false), (2..2, None));
    }

    #[test]
    fn a_version_that_skips_ahead_stops_the_run_when_gaps_are_filled() {
        let gap = Gap {
            at: 2,
            from: 8,
            to: 9,
        };
        assert_eq!(
            in_order(5, &frames(&[6, 7, 10, 11]), true),
            (0..2, Some(gap))
        );
        assert_eq!(
            in_order(5, &frames(&[8]), true),
            (
                0..0,
                Some(Gap {
                    at: 0,
                    from: 6,
                    to: 7
                })
            )
        );
        // One writer in commit order: nothing between can be missing.
        assert_eq!(in_order(5, &frames(&[6, 7, 10, 11]), false), (0..4, None));
    }
}
