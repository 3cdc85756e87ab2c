//! What this node knows of the other nodes' connections (with a broker that
//! shares presence): per view and node a [`Summary`], which presence, the
//! per-user limit and the `joined`/`left` news count like local connections.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::core::hub::room::{Person, RoomInner};
use crate::core::hub::Hub;
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
}

impl RoomInner {
    /// This node's share of the view, as other nodes receive it.
    fn summary(&self) -> Summary {
        Summary {
            people: self
                .people
                .iter()
                .map(|((user, role), n)| (user.to_string(), *role, *n))
                .collect(),
            connections: self.members.len(),
        }
    }
}

impl Hub {
    /// From now on, local presence changes are collected for
    /// [`Hub::take_summaries`].
    pub fn share_presence(&self) {
        let mut shared = lock(&self.shared);
        if shared.is_none() {
            *shared = Some(Default::default());
        }
    }

    pub(super) fn shared_changed(&self, view_id: &Arc<str>) {
        if let Some(set) = lock(&self.shared).as_mut() {
            set.insert(view_id.clone());
        }
    }

    /// Marks every local view as changed, so all are told again (after the
    /// broker came back, it may have lost them).
    pub fn share_all_again(&self) {
        let views: Vec<Arc<str>> = lock(&self.rooms).by_view.keys().cloned().collect();
        if let Some(set) = lock(&self.shared).as_mut() {
            set.extend(views);
        }
    }

    /// This node's summary of every view whose connections changed since the
    /// last call (an empty summary for a view it no longer has).
    pub fn take_summaries(&self) -> Vec<(Arc<str>, Summary)> {
        let views = match lock(&self.shared).as_mut() {
            Some(set) => std::mem::take(set),
            None => return Vec::new(),
        };
        views
            .into_iter()
            .map(|view| {
                let summary = self
                    .room(&view)
                    .map(|room| lock(&room.inner).summary())
                    .unwrap_or_default();
                (view, summary)
            })
            .collect()
    }

    /// Another node's connections to a view changed (`None`: it has none, or
    /// it died). Updates counts, per-user totals and the `joined`/`left` news
    /// for this node's controllers.
    pub fn apply_remote(&self, view_id: &str, node: &str, summary: Option<Summary>) {
        let rooms = lock(&self.rooms);
        let mut remote = lock(&self.remote);
        let view: Arc<str> = view_id.into();
        let nodes = remote.by_view.entry(view.clone()).or_default();
        let old = match summary.filter(|s| s.connections > 0) {
            Some(new) => nodes.insert(node.into(), new.clone()),
            None => nodes.remove(node),
        };
        let new_people: Vec<(String, usize)> = nodes
            .get(node)
            .map(|s| s.people.iter().map(|(u, _, n)| (u.clone(), *n)).collect())
            .unwrap_or_default();
        if nodes.is_empty() {
            remote.by_view.remove(&view);
        }
        for (user, _, n) in old.iter().flat_map(|s| s.people.iter()) {
            if let Some(count) = remote.per_user.get_mut(user.as_str()) {
                *count = count.saturating_sub(*n);
                if *count == 0 {
                    remote.per_user.remove(user.as_str());
                }
            }
        }
        for (user, n) in new_people {
            *remote.per_user.entry(user.as_str().into()).or_insert(0) += n;
        }
        let Some(room) = rooms.by_view.get(view_id).cloned() else {
            return;
        };
        let (people, connections) = remote.aggregate(view_id);
        drop(remote);
        drop(rooms);
        let mut inner = lock(&room.inner);
        let before: Vec<Person> = inner
            .remote_people
            .keys()
            .chain(people.keys())
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let was: Vec<bool> = before.iter().map(|p| inner.is_present(p)).collect();
        let changed = inner.remote_people != people || inner.remote_connections != connections;
        inner.remote_people = people;
        inner.remote_connections = connections;
        if !changed || !inner.has_controller() {
            return;
        }
        for (person, was) in before.iter().zip(was) {
            let is = inner.is_present(person);
            if is != was {
                inner.record(&person.0, person.1, is);
            }
        }
        self.mark_dirty(&room, &mut inner);
    }

    /// Forgets everything about a node (it died, or the broker lost track of
    /// it); returns the views it had.
    pub fn forget_node(&self, node: &str) -> Vec<Arc<str>> {
        let views: Vec<Arc<str>> = lock(&self.remote)
            .by_view
            .iter()
            .filter(|(_, nodes)| nodes.contains_key(node))
            .map(|(view, _)| view.clone())
            .collect();
        for view in &views {
            self.apply_remote(view, node, None);
        }
        views
    }

    /// Replaces everything known of other nodes with what the broker holds
    /// (after (re)subscribing, messages may have been missed).
    pub fn replace_remote(&self, entries: Vec<(String, String, Summary)>) {
        let fresh: HashSet<(String, String)> = entries
            .iter()
            .map(|(view, node, _)| (view.clone(), node.clone()))
            .collect();
        let stale: Vec<(Arc<str>, Arc<str>)> = lock(&self.remote)
            .by_view
            .iter()
            .flat_map(|(view, nodes)| nodes.keys().map(move |node| (view.clone(), node.clone())))
            .filter(|(view, node)| !fresh.contains(&(view.to_string(), node.to_string())))
            .collect();
        for (view, node) in stale {
            self.apply_remote(&view, &node, None);
        }
        for (view, node, summary) in entries {
            self.apply_remote(&view, &node, Some(summary));
        }
    }

    /// The other nodes this node knows to have connections.
    pub fn remote_nodes(&self) -> Vec<Arc<str>> {
        let mut nodes: Vec<Arc<str>> = lock(&self.remote)
            .by_view
            .values()
            .flat_map(|n| n.keys().cloned())
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::hub::testing::{join, joiner, out, texts};
    use crate::core::hub::{Limits, TooManyConnections};

    #[test]
    fn other_nodes_count_in_presence_limits_and_news() {
        let hub = Hub::new(Limits {
            per_user: 2,
            ..Limits::default()
        });
        let (_, controller) = join(&hub, "v", "boss", Role::Controller);
        let summary = |people: &[(&str, Role, usize)]| Summary {
            people: people
                .iter()
                .map(|(u, r, n)| (u.to_string(), *r, *n))
                .collect(),
            connections: people.iter().map(|p| p.2).sum(),
        };
        hub.apply_remote("v", "n2", Some(summary(&[("carol", Role::Viewer, 2)])));
        hub.flush_presence();
        let events = texts(&controller);
        assert_eq!(
            events[0]["joined"],
            serde_json::json!([{"userId": "carol", "role": "viewer"}])
        );
        assert_eq!(
            events[0]["presence"],
            serde_json::json!({"controllers": 1, "viewers": 1, "connections": 3})
        );
        // carol's tab here is her third: no news, and over the per-user limit.
        assert_eq!(
            hub.join(joiner("v", "carol", Role::Viewer, out()))
                .expect_err("limit counts every node"),
            TooManyConnections
        );
        // The node dies: carol leaves.
        assert_eq!(hub.forget_node("n2").len(), 1);
        hub.flush_presence();
        let events = texts(&controller);
        assert_eq!(
            events[0]["left"],
            serde_json::json!([{"userId": "carol", "role": "viewer"}])
        );
        assert_eq!(hub.presence("v").connections, 1);
    }
}
