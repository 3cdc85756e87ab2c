//! Every permission rule of SPEC, in one place: who has which role in a
//! library's views, which role may send which message, who may change a
//! view's state, who may manage a library's members, and what a request must
//! still hold when its change is applied. Storage and transports only ask.

use std::sync::Arc;

use crate::domain::error::Error;
use crate::domain::model::Role;

/// A member row's role (SPEC §1 `library_members.role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LibraryRole {
    Owner,
    Editor,
    Viewer,
}

impl LibraryRole {
    /// The values SPEC allows in the column, as written there.
    pub const NAMES: [&'static str; 3] = ["OWNER", "EDITOR", "VIEWER"];

    /// The stored text's role; anything else (another tool's `viewer`, say)
    /// is no role at all.
    pub fn parse(text: &str) -> Option<LibraryRole> {
        match text {
            "OWNER" => Some(LibraryRole::Owner),
            "EDITOR" => Some(LibraryRole::Editor),
            "VIEWER" => Some(LibraryRole::Viewer),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LibraryRole::Owner => "OWNER",
            LibraryRole::Editor => "EDITOR",
            LibraryRole::Viewer => "VIEWER",
        }
    }
}

/// SPEC §1 "Role": the library's owner or an OWNER/EDITOR member controls; a
/// VIEWER member views; anyone else has no access (`None`). `owner_id` is
/// `None` when the view's library row is missing.
pub(crate) fn role_in_library(
    user_id: &str,
    owner_id: Option<&str>,
    member: Option<LibraryRole>,
) -> Option<Role> {
    if owner_id == Some(user_id) {
        return Some(Role::Controller);
    }
    match member? {
        LibraryRole::Owner | LibraryRole::Editor => Some(Role::Controller),
        LibraryRole::Viewer => Some(Role::Viewer),
    }
}

/// [`role_in_library`] as the handshake and REST reads need it: no role is
/// 403 `ACCESS_DENIED`.
pub(crate) fn required_role(
    user_id: &str,
    owner_id: Option<&str>,
    member: Option<LibraryRole>,
) -> Result<Role, Error> {
    role_in_library(user_id, owner_id, member).ok_or(Error::AccessDenied)
}

/// The client message types of SPEC §3.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Ping,
    PortalViewUpdate,
    ItemUpdate,
    RequestSync,
    SyncResponse,
    RefreshToken,
}

/// SPEC §3.1's permission table, the only place it is written down:
/// (type, its wire name, controller may send, viewer may send).
const PERMISSIONS: [(Kind, &str, bool, bool); 6] = [
    (Kind::Ping, "ping", true, true),
    (Kind::PortalViewUpdate, "portal-view-update", true, false),
    (Kind::ItemUpdate, "item-update", true, false),
    (Kind::RequestSync, "request-sync", false, true),
    (Kind::SyncResponse, "sync-response", true, false),
    (Kind::RefreshToken, "refresh-token", true, true),
];

impl Kind {
    pub(crate) fn from_name(name: &str) -> Option<Kind> {
        PERMISSIONS
            .iter()
            .find(|(_, n, _, _)| *n == name)
            .map(|(k, ..)| *k)
    }

    pub(crate) fn name(self) -> &'static str {
        PERMISSIONS
            .iter()
            .find(|(k, ..)| *k == self)
            .map_or("", |(_, n, ..)| n)
    }

    pub(crate) fn allowed(self, role: Role) -> bool {
        PERMISSIONS.iter().any(|&(k, _, controller, viewer)| {
            k == self
                && match role {
                    Role::Controller => controller,
                    Role::Viewer => viewer,
                }
        })
    }

    /// A message this role may not send: 403 `FORBIDDEN`, the socket kept open.
    pub(crate) fn check(self, role: Role) -> Result<(), Error> {
        if self.allowed(role) {
            return Ok(());
        }
        Err(Error::Forbidden(match role {
            Role::Controller => "controllers may not send this message type",
            Role::Viewer => "viewers may not send this message type",
        }))
    }
}

/// SPEC §4 PATCH (and every state change when applied): only controllers.
pub(crate) fn may_change_view(role: Role) -> Result<(), Error> {
    match role {
        Role::Controller => Ok(()),
        Role::Viewer => Err(Error::Forbidden(
            "only controllers may change a portal view",
        )),
    }
}

/// SPEC §4's membership routes: the library's owner or an OWNER member may
/// manage its members; another member is 403 `FORBIDDEN`, anyone else 403
/// `ACCESS_DENIED`. `caller_member` is the caller's stored role text, if any
/// (a row whose text is not a role still makes the caller a member).
pub(crate) fn may_manage_members(
    caller: &str,
    owner_id: &str,
    caller_member: Option<&str>,
) -> Result<(), Error> {
    if caller == owner_id {
        return Ok(());
    }
    match caller_member.map(LibraryRole::parse) {
        Some(Some(LibraryRole::Owner)) => Ok(()),
        Some(_) => Err(Error::Forbidden(
            "only the library's owners may manage its members",
        )),
        None => Err(Error::AccessDenied),
    }
}

/// The library's owner (its `owner_id`) is not a member row: 409.
pub(crate) fn may_change_member(user_id: &str, owner_id: &str) -> Result<(), Error> {
    if user_id == owner_id {
        Err(Error::Conflict(
            "the library's owner cannot be changed this way",
        ))
    } else {
        Ok(())
    }
}

/// Who asked for an op, which must still hold when it is applied (SPEC §4:
/// access and the token are checked again then). Engines check it inside the
/// write transaction, so no membership change can slip between check and
/// write, and every route that writes gets the check without having to
/// remember it.
#[derive(Debug, Clone)]
pub struct Requester {
    pub user_id: Arc<str>,
    /// Seconds since the epoch from which the token (its `exp` plus
    /// `--jwt-leeway`) is expired.
    pub expires_at: u64,
    pub needs: Needs,
}

/// The role an op's requester must still have in the view's library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// A state change: the library's owner, or an OWNER or EDITOR member.
    Controller,
    /// Any role at all (reading the state, as the server's own sync-response does).
    Member,
}

/// What an engine read of a user in a library, inside its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    NoSuchUser,
    Role(Option<Role>),
}

impl Requester {
    /// The refusal, if the requester may no longer do this: a token expired
    /// (401), a user deleted (401, as for a token of an unknown user), no role
    /// left (403 `ACCESS_DENIED`), or a controller downgraded to viewer (403
    /// `FORBIDDEN`, as a viewer's PATCH is on arrival).
    pub fn refusal(&self, now: u64, standing: Standing) -> Option<Error> {
        if self.expires_at <= now {
            return Some(Error::TokenExpired);
        }
        match (standing, self.needs) {
            (Standing::NoSuchUser, _) => Some(Error::UnknownUser),
            (Standing::Role(None), _) => Some(Error::AccessDenied),
            (Standing::Role(Some(role)), Needs::Controller) => may_change_view(role).err(),
            (Standing::Role(Some(_)), Needs::Member) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        let role = |member: Option<&str>| member.and_then(LibraryRole::parse);
        assert_eq!(
            role_in_library("u", Some("u"), None),
            Some(Role::Controller)
        );
        assert_eq!(
            role_in_library("u", Some("o"), role(Some("OWNER"))),
            Some(Role::Controller)
        );
        assert_eq!(
            role_in_library("u", Some("o"), role(Some("EDITOR"))),
            Some(Role::Controller)
        );
        assert_eq!(
            role_in_library("u", Some("o"), role(Some("VIEWER"))),
            Some(Role::Viewer)
        );
        assert_eq!(role_in_library("u", Some("o"), None), None);
        assert_eq!(role_in_library("u", Some("o"), role(Some("viewer"))), None);
        assert_eq!(role_in_library("u", None, None), None);
    }

    #[test]
    fn permission_table() {
        use Role::*;
        let table = [
            ("ping", true, true),
            ("portal-view-update", true, false),
            ("item-update", true, false),
            ("request-sync", false, true),
            ("sync-response", true, false),
            ("refresh-token", true, true),
        ];
        for (name, c, v) in table {
            let kind = Kind::from_name(name).expect("known");
            assert_eq!(kind.name(), name);
            assert_eq!(kind.allowed(Controller), c, "{name} controller");
            assert_eq!(kind.allowed(Viewer), v, "{name} viewer");
        }
    }

    #[test]
    fn member_management() {
        assert!(may_manage_members("o", "o", None).is_ok());
        assert!(may_manage_members("m", "o", Some("OWNER")).is_ok());
        assert!(matches!(
            may_manage_members("m", "o", Some("EDITOR")),
            Err(Error::Forbidden(_))
        ));
        assert!(matches!(
            may_manage_members("m", "o", Some("junk")),
            Err(Error::Forbidden(_))
        ));
        assert!(matches!(
            may_manage_members("m", "o", None),
            Err(Error::AccessDenied)
        ));
        assert!(matches!(
            may_change_member("o", "o"),
            Err(Error::Conflict(_))
        ));
        assert!(may_change_member("m", "o").is_ok());
    }
}
