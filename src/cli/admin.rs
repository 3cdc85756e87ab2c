//! The administration commands (SPEC §6): users, libraries, members and
//! portal views, each run on the store at `--db`. Errors name what is
//! missing or in the way; `list` and `show` print JSON with `--json`.

use std::path::Path;

use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::failure::{Failure, NOT_FOUND};
use crate::config::Synchronous;
use crate::domain::access::{self, LibraryRole};
use crate::domain::error::Error;
use crate::engines;
use crate::store::{Admin, LibraryRow, Removed, Store};

/// `--json` of the `list` and `show` commands.
#[derive(Args, Debug, Clone, Copy)]
pub(super) struct Format {
    /// Print JSON (camelCase field names, as REST uses) instead of text
    #[arg(long)]
    json: bool,
}

/// `--force` of `user remove` and `library remove`.
#[derive(Args, Debug, Clone, Copy)]
pub(super) struct Cascade {
    /// Also remove what depends on it (libraries, their views and member
    /// rows), in one transaction; without it such a removal is refused
    #[arg(long, visible_alias = "cascade")]
    force: bool,
}

#[derive(Subcommand, Debug)]
pub(super) enum UserCmd {
    /// Add a user
    Add {
        /// User id: 1-64 characters of [A-Za-z0-9_-]
        #[arg(long)]
        id: String,
        /// Email address (unique)
        #[arg(long)]
        email: String,
        /// Display name
        #[arg(long)]
        name: String,
    },
    /// List users
    List {
        #[command(flatten)]
        format: Format,
    },
    /// Show a user, the libraries they own and their memberships
    Show {
        /// User id
        #[arg(long)]
        id: String,
        #[command(flatten)]
        format: Format,
    },
    /// Remove a user (refused while they own libraries or are a member, unless --force)
    Remove {
        /// User id
        #[arg(long)]
        id: String,
        #[command(flatten)]
        cascade: Cascade,
    },
}

#[derive(Subcommand, Debug)]
pub(super) enum LibraryCmd {
    /// Add a library owned by an existing user
    Add {
        /// Library id: 1-64 characters of [A-Za-z0-9_-]
        #[arg(long)]
        id: String,
        /// Display name
        #[arg(long)]
        name: String,
        /// User id of its owner (a controller of every view in it)
        #[arg(long)]
        owner: String,
    },
    /// List libraries
    List {
        #[command(flatten)]
        format: Format,
    },
    /// Show a library, its members and its portal views
    Show {
        /// Library id
        #[arg(long)]
        id: String,
        #[command(flatten)]
        format: Format,
    },
    /// Remove a library (refused while it has views or members, unless --force)
    Remove {
        /// Library id
        #[arg(long)]
        id: String,
        #[command(flatten)]
        cascade: Cascade,
    },
}

#[derive(Subcommand, Debug)]
pub(super) enum MemberCmd {
    /// Add a member or change their role (not the library's owner's)
    Set {
        /// Library id
        #[arg(long)]
        library: String,
        /// User id
        #[arg(long)]
        user: String,
        /// OWNER or EDITOR (controllers) or VIEWER
        #[arg(long, value_parser = LibraryRole::NAMES)]
        role: String,
    },
    /// Remove a member (not the library's owner)
    Remove {
        /// Library id
        #[arg(long)]
        library: String,
        /// User id
        #[arg(long)]
        user: String,
    },
    /// List the members of a library
    List {
        /// Library id
        #[arg(long)]
        library: String,
        #[command(flatten)]
        format: Format,
    },
}

#[derive(Subcommand, Debug)]
pub(super) enum ViewCmd {
    /// Add a portal view to a library
    Add {
        /// Portal view id: 1-64 characters of [A-Za-z0-9_-]
        #[arg(long)]
        id: String,
        /// Library id
        #[arg(long)]
        library: String,
        /// Display name
        #[arg(long)]
        name: String,
        /// Initial state, a JSON object
        #[arg(long, default_value = "{}", value_parser = parse_object)]
        state: Map<String, Value>,
    },
    /// List portal views
    List {
        #[command(flatten)]
        format: Format,
    },
    /// Print one portal view, its state included, as JSON
    Show {
        /// Portal view id
        #[arg(long)]
        id: String,
        #[command(flatten)]
        format: Format,
    },
    /// Remove a portal view (open connections to it are closed 1008 `access revoked`)
    Remove {
        /// Portal view id
        #[arg(long)]
        id: String,
    },
}

fn missing(what: &'static str, id: &str) -> Error {
    Error::Missing {
        what,
        id: id.to_string(),
    }
}

fn library_row(c: &dyn Admin, id: &str) -> Result<LibraryRow, Error> {
    c.library(id)?.ok_or_else(|| missing("library", id))
}

/// A refused removal says how to go through with it.
fn or_force(e: Error, command: &str) -> Error {
    match e {
        Error::Conflicting(m) => {
            Error::Conflicting(format!("{m}: `{command} --force` removes them too"))
        }
        other => other,
    }
}

/// "removed user alice (and 1 library, 2 portal views, 3 member rows)".
fn removed(what: &str, id: &str, r: &Removed, own: (usize, usize)) -> String {
    let (libraries, views) = (r.libraries - own.0, r.views - own.1);
    let mut parts = Vec::new();
    for (n, one, many) in [
        (libraries, "library", "libraries"),
        (views, "portal view", "portal views"),
        (r.members, "member row", "member rows"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {}", if n == 1 { one } else { many }));
        }
    }
    if parts.is_empty() {
        format!("removed {what} {id}")
    } else {
        format!("removed {what} {id} (and {})", parts.join(", "))
    }
}

/// A list: tab-separated lines, or one JSON array.
fn list<T: Serialize>(
    rows: &[T],
    format: Format,
    columns: impl Fn(&T) -> Vec<String>,
) -> Result<(), Error> {
    if format.json {
        print_json(&rows)
    } else {
        for r in rows {
            println!("{}", columns(r).join("\t"));
        }
        Ok(())
    }
}

fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<(), Error> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Internal(e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// A `show`: `key: value` lines, or one JSON object.
fn show(value: &Value, format: Format) -> Result<(), Error> {
    if format.json {
        return print_json(value);
    }
    if let Value::Object(fields) = value {
        for (key, field) in fields {
            match field {
                Value::String(s) => println!("{key}: {s}"),
                other => println!("{key}: {other}"),
            }
        }
    }
    Ok(())
}

/// `user add`, `list`, `show`, `remove`.
pub(super) fn user(path: &Path, cmd: UserCmd) -> Result<(), Failure> {
    admin(path, |c| match cmd {
        UserCmd::Add { id, email, name } => {
            c.add_user(&id, &email, &name)?;
            println!("added user {id}");
            Ok(())
        }
        UserCmd::List { format } => list(&c.users()?, format, |u| {
            vec![u.id.clone(), u.email.clone(), u.name.clone()]
        }),
        UserCmd::Show { id, format } => {
            let user = c.user(&id)?.ok_or_else(|| missing("user", &id))?;
            let mut owner_of = Vec::new();
            let mut member_of = Vec::new();
            for library in c.libraries()? {
                if library.owner_id == id {
                    owner_of.push(library.id.clone());
                }
                if let Some(m) = c
                    .members(&library.id)?
                    .into_iter()
                    .find(|m| m.user_id == id)
                {
                    member_of.push(json!({"libraryId": library.id, "role": m.role}));
                }
            }
            show(
                &json!({
                    "id": user.id,
                    "email": user.email,
                    "name": user.name,
                    "ownerOf": owner_of,
                    "memberOf": member_of,
                }),
                format,
            )
        }
        UserCmd::Remove { id, cascade } => {
            let r = c
                .remove_user(&id, cascade.force)
                .map_err(|e| or_force(e, "user remove"))?;
            println!("{}", removed("user", &id, &r, (0, 0)));
            Ok(())
        }
    })
}

/// `library add`, `list`, `show`, `remove`.
pub(super) fn library(path: &Path, cmd: LibraryCmd) -> Result<(), Failure> {
    admin(path, |c| match cmd {
        LibraryCmd::Add { id, name, owner } => {
            c.add_library(&id, &name, &owner)?;
            println!("added library {id} owned by {owner}");
            Ok(())
        }
        LibraryCmd::List { format } => list(&c.libraries()?, format, |l| {
            vec![l.id.clone(), l.name.clone(), l.owner_id.clone()]
        }),
        LibraryCmd::Show { id, format } => {
            let library = library_row(c, &id)?;
            let members = c.members(&id)?;
            let views: Vec<String> = c
                .views()?
                .into_iter()
                .filter(|v| v.library_id == id)
                .map(|v| v.id)
                .collect();
            show(
                &json!({
                    "id": library.id,
                    "name": library.name,
                    "ownerId": library.owner_id,
                    "members": members,
                    "portalViews": views,
                }),
                format,
            )
        }
        LibraryCmd::Remove { id, cascade } => {
            let r = c
                .remove_library(&id, cascade.force)
                .map_err(|e| or_force(e, "library remove"))?;
            println!("{}", removed("library", &id, &r, (1, 0)));
            Ok(())
        }
    })
}

/// `member set`, `remove`, `list`. The library's owner keeps their standing
/// whatever their member row says, so changing it is refused as REST does
/// (SPEC §4's 409, the rule in `domain::access`).
pub(super) fn member(path: &Path, cmd: MemberCmd) -> Result<(), Failure> {
    let owner_rule = |user: &str, library: &LibraryRow| {
        access::may_change_member(user, &library.owner_id).map_err(|e| {
            Error::Conflicting(format!(
                "{user} owns library {}: {}",
                library.id,
                e.client_message()
            ))
        })
    };
    admin_with(path, |c| match cmd {
        MemberCmd::Set {
            library,
            user,
            role,
        } => {
            let parsed = LibraryRole::parse(&role)
                .ok_or_else(|| Error::BadRequest(format!("{role} is not a role")))?;
            owner_rule(&user, &library_row(c, &library)?)?;
            match c.set_member(&library, &user, parsed)? {
                Some(old) if old == role => {
                    println!("{user} already is {role} in {library}")
                }
                Some(old) => println!("{user}: {old} -> {role} in {library}"),
                None => println!("added {user} to {library} as {role}"),
            }
            Ok(())
        }
        MemberCmd::Remove { library, user } => {
            let row = library_row(c, &library)?;
            if !c.user_exists(&user)? {
                return Err(missing("user", &user).into());
            }
            owner_rule(&user, &row)?;
            if c.remove_member(&library, &user)? {
                println!("removed {user} from {library}");
                Ok(())
            } else {
                Err(Failure::new(
                    NOT_FOUND,
                    format!("{user} is not a member of {library}"),
                ))
            }
        }
        MemberCmd::List { library, format } => {
            library_row(c, &library)?;
            Ok(list(&c.members(&library)?, format, |m| {
                vec![m.user_id.clone(), m.role.clone()]
            })?)
        }
    })
}

/// `view add`, `list`, `show`, `remove`.
pub(super) fn view(path: &Path, cmd: ViewCmd) -> Result<(), Failure> {
    admin_store(path, |s| {
        let c = s.admin();
        match cmd {
            ViewCmd::Add {
                id,
                library,
                name,
                state,
            } => {
                c.add_view(&id, &library, &name, &state)?;
                println!("added portal view {id} to {library}");
                Ok(())
            }
            ViewCmd::List { format } => list(&c.views()?, format, |v| {
                vec![
                    v.id.clone(),
                    v.library_id.clone(),
                    v.name.clone(),
                    v.version.to_string(),
                    v.updated_at.clone().unwrap_or_default(),
                ]
            }),
            // JSON either way: the state is JSON.
            ViewCmd::Show { id, format: _ } => {
                print_json(&s.view(&id)?.ok_or_else(|| missing("portal view", &id))?)
            }
            ViewCmd::Remove { id } => {
                c.remove_view(&id)?;
                println!("removed portal view {id}");
                Ok(())
            }
        }
    })
}

fn admin(path: &Path, f: impl FnOnce(&dyn Admin) -> Result<(), Error>) -> Result<(), Failure> {
    admin_with(path, |c| Ok(f(c)?))
}

fn admin_with(
    path: &Path,
    f: impl FnOnce(&dyn Admin) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let store = engines::open(path, Synchronous::Full)?;
    f(store.admin())
}

/// Runs an administration command on the store at `path`.
fn admin_store(
    path: &Path,
    f: impl FnOnce(&dyn Store) -> Result<(), Error>,
) -> Result<(), Failure> {
    let store = engines::open(path, Synchronous::Full)?;
    Ok(f(&*store)?)
}

fn parse_object(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err("must be a JSON object".into()),
    }
}
