//! The administration commands (SPEC §6): users, libraries, members and
//! portal views, each run on the store at `--db`.

use std::path::Path;

use clap::Subcommand;
use serde_json::{Map, Value};

use crate::config::Synchronous;
use crate::domain::access::LibraryRole;
use crate::domain::error::Error;
use crate::engines;
use crate::store::Store;

#[derive(Subcommand, Debug)]
pub(super) enum UserCmd {
    /// Add a user
    Add {
        #[arg(long)]
        id: String,
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: String,
    },
    /// List users
    List,
}

#[derive(Subcommand, Debug)]
pub(super) enum LibraryCmd {
    /// Add a library owned by an existing user
    Add {
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        owner: String,
    },
    /// List libraries
    List,
}

#[derive(Subcommand, Debug)]
pub(super) enum MemberCmd {
    /// Add a member or change their role
    Set {
        #[arg(long)]
        library: String,
        #[arg(long)]
        user: String,
        #[arg(long, value_parser = LibraryRole::NAMES)]
        role: String,
    },
    /// Remove a member
    Remove {
        #[arg(long)]
        library: String,
        #[arg(long)]
        user: String,
    },
    /// List the members of a library
    List {
        #[arg(long)]
        library: String,
    },
}

#[derive(Subcommand, Debug)]
pub(super) enum ViewCmd {
    /// Add a portal view to a library
    Add {
        #[arg(long)]
        id: String,
        #[arg(long)]
        library: String,
        #[arg(long)]
        name: String,
        /// Initial state, a JSON object
        #[arg(long, default_value = "{}", value_parser = parse_object)]
        state: Map<String, Value>,
    },
    /// List portal views
    List,
    /// Print one portal view as JSON
    Show {
        #[arg(long)]
        id: String,
    },
}

/// `user add`, `user list`.
pub(super) fn user(path: &Path, cmd: UserCmd) -> Result<(), String> {
    admin(path, |s| {
        let c = s.admin();
        match cmd {
            UserCmd::Add { id, email, name } => {
                c.add_user(&id, &email, &name)?;
                println!("added user {id}");
                Ok(())
            }
            UserCmd::List => {
                for u in c.users()? {
                    row(&[&u.id, &u.email, &u.name]);
                }
                Ok(())
            }
        }
    })
}

/// `library add`, `library list`.
pub(super) fn library(path: &Path, cmd: LibraryCmd) -> Result<(), String> {
    admin(path, |s| {
        let c = s.admin();
        match cmd {
            LibraryCmd::Add { id, name, owner } => {
                c.add_library(&id, &name, &owner)?;
                println!("added library {id} owned by {owner}");
                Ok(())
            }
            LibraryCmd::List => {
                for l in c.libraries()? {
                    row(&[&l.id, &l.name, &l.owner_id]);
                }
                Ok(())
            }
        }
    })
}

/// `member set`, `member remove`, `member list`.
pub(super) fn member(path: &Path, cmd: MemberCmd) -> Result<(), String> {
    admin(path, |s| {
        let c = s.admin();
        match cmd {
            MemberCmd::Set {
                library,
                user,
                role,
            } => {
                let parsed = LibraryRole::parse(&role)
                    .ok_or_else(|| Error::BadRequest(format!("{role} is not a role")))?;
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
                if c.remove_member(&library, &user)? {
                    println!("removed {user} from {library}");
                    Ok(())
                } else {
                    Err(Error::BadRequest(format!(
                        "{user} is not a member of {library}"
                    )))
                }
            }
            MemberCmd::List { library } => {
                for m in c.members(&library)? {
                    row(&[&m.user_id, &m.role]);
                }
                Ok(())
            }
        }
    })
}

/// `view add`, `view list`, `view show`.
pub(super) fn view(path: &Path, cmd: ViewCmd) -> Result<(), String> {
    admin(path, |s| {
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
            ViewCmd::List => {
                for v in c.views()? {
                    let version = v.version.to_string();
                    let updated = v.updated_at.unwrap_or_default();
                    row(&[&v.id, &v.library_id, &v.name, &version, &updated]);
                }
                Ok(())
            }
            ViewCmd::Show { id } => {
                let view = s.view(&id)?.ok_or(Error::ViewNotFound)?;
                let text = serde_json::to_string_pretty(&view)
                    .map_err(|e| Error::Internal(e.to_string()))?;
                println!("{text}");
                Ok(())
            }
        }
    })
}

/// Runs an administration command on the store at `path`.
fn admin(path: &Path, f: impl FnOnce(&dyn Store) -> Result<(), Error>) -> Result<(), String> {
    let store = engines::open(path, Synchronous::Full).map_err(|e| e.to_string())?;
    f(&*store).map_err(|e| match e {
        Error::Storage(cause) => cause,
        other => other.client_message(),
    })
}

/// One line of a `list` command: tab-separated columns.
fn row(columns: &[&str]) {
    println!("{}", columns.join("\t"));
}

fn parse_object(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err("must be a JSON object".into()),
    }
}
