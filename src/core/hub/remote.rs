//! What this node knows of the other nodes' connections (with a broker that
//! shares presence): per view and node a [`Summary`], which presence, the
//! per-user limit and the `joined`/`left` news count like local connections;
//! and which of this node's views the others must be told of again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::core::hub::room::{Person, RoomInner};
use crate::core::lock::lock;
use crate::domain::model::Role;

/// One node's connections to one view: what presence and the per-user limit
/// need from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// (user, role, connections)
    pub people: Vec<(String, Role, usize)>,
    pub connections: usize,
}

impl Summary {
    /// This node's share of a view, as other nodes receive it.
    pub(super) fn of(room: &RoomInner) -> Summary {
        Summary {
            people: room
                .people
                .iter()
                .map(|((user, role), n)| (user.to_string(), *role, *n))
                .collect(),
            connections: room.members.len(),
        }
    }
}

#[derive(Default)]
pub(super) struct Remote {
    by_view: HashMap<Arc<str>, HashMap<Arc<str>, Summary>>,
    /// Connections per user on other nodes, over all views.
    pub per_user: HashMap<Arc<str>, usize>,
}

impl Remote {
    /// The view's remote people and connections, summed over nodes.
    pub fn aggregate(&self, view_id: &str) -> (HashMap<Person, usize>, usize) {
        let mut people = HashMap::new();
        let mut connections = 0;
        for summary in self
            .by_view
            .get(view_id)
            .into_iter()
            .flat_map(|n| n.values())
        {
            connections += summary.connections;
            for (user, role, n) in &summary.people {
                *people.entry((Arc::from(user.as_str()), *role)).or_insert(0) += n;
            }
        }
        (people, connections)
    }

    /// Another node's connections to a view changed (`None`: it has none, or
    /// it died): its summary and the per-user totals.
    pub fn apply(&mut self, view_id: &str, node: &str, summary: Option<Summary>) {
        let view: Arc<str> = view_id.into();
        let nodes = self.by_view.entry(view.clone()).or_default();
        let old = match summary.filter(|s| s.connections > 0) {
            Some(new) => nodes.insert(node.into(), new.clone()),
            None => nodes.remove(node),
        };
        let new_people: Vec<(String, usize)> = nodes
            .get(node)
            .map(|s| s.people.iter().map(|(u, _, n)| (u.clone(), *n)).collect())
            .unwrap_or_default();
        if nodes.is_empty() {
            self.by_view.remove(&view);
        }
        for (user, _, n) in old.iter().flat_map(|s| s.people.iter()) {
            if let Some(count) = self.per_user.get_mut(user.as_str()) {
                *count = count.saturating_sub(*n);
                if *count == 0 {
                    self.per_user.remove(user.as_str());
                }
            }
        }
        for (user, n) in new_people {
            *self.per_user.entry(user.as_str().into()).or_insert(0) += n;
        }
    }

    /// The views a node has connections to.
    pub fn views_of(&self, node: &str) -> Vec<Arc<str>> {
        self.by_view
            .iter()
            .filter(|(_, nodes)| nodes.contains_key(node))
            .map(|(view, _)| view.clone())
            .collect()
    }

    /// The (view, node) pairs known here that `entries` no longer has.
    pub fn stale(&self, entries: &[(String, String, Summary)]) -> Vec<(Arc<str>, Arc<str>)> {
        let fresh: HashSet<(String, String)> = entries
            .iter()
            .map(|(view, node, _)| (view.clone(), node.clone()))
            .collect();
        self.by_view
            .iter()
            .flat_map(|(view, nodes)| nodes.keys().map(move |node| (view.clone(), node.clone())))
            .filter(|(view, node)| !fresh.contains(&(view.to_string(), node.to_string())))
            .collect()
    }

    /// The other nodes known to have connections, sorted.
    pub fn nodes(&self) -> Vec<Arc<str>> {
        let mut nodes: Vec<Arc<str>> = self
            .by_view
            .values()
            .flat_map(|n| n.keys().cloned())
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }
}

/// Views whose local connections changed since this node last told the
/// others; `None` unless presence is shared.
#[derive(Default)]
pub(super) struct Shared(Mutex<Option<HashSet<Arc<str>>>>);

impl Shared {
    /// From now on, changes are collected.
    pub fn enable(&self) {
        let mut shared = lock(&self.0);
        if shared.is_none() {
            *shared = Some(Default::default());
        }
    }

    pub fn changed(&self, view_id: &Arc<str>) {
        if let Some(set) = lock(&self.0).as_mut() {
            set.insert(view_id.clone());
        }
    }

    pub fn extend(&self, views: Vec<Arc<str>>) {
        if let Some(set) = lock(&self.0).as_mut() {
            set.extend(views);
        }
    }

    /// The views changed since the last call (none unless presence is shared).
    pub fn take(&self) -> HashSet<Arc<str>> {
        lock(&self.0)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }
}
