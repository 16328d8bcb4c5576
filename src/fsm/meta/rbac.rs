//! Role-based access control: permissions, built-in roles, and the in-memory index that answers
//! checks from replicated state.
//!
//! The [`RbacIndex`] holds users, teams, roles and bindings (the small kinds) and a precomputed
//! map subject -> scope -> permission bits. Storage feeds it every row the state machine writes,
//! in the same step as apply, and reloads it after a snapshot install. A check costs one row
//! lookup (the resource: its owner and ancestors) plus a few hash lookups.

use std::collections::HashMap;

use super::apply::{decode_record, index_ids, load_head, load_record};
use super::index::IX_KIND;
use super::{fmt_id, Id, Kind, Permission, Record, Spec};
use crate::fsm::{FsmError, StateRead};
use crate::keys;

/// Resource types beyond the entity kinds (`Kind as u8` are the others).
pub const RT_SECRET: u8 = 16;
pub const RT_STACK: u8 = 17;
const RT_MAX: u8 = 17;
/// Matches every resource type or every action.
pub const ANY: u8 = 255;

pub const A_CREATE: u8 = 1;
pub const A_READ: u8 = 2;
pub const A_UPDATE: u8 = 3;
pub const A_DELETE: u8 = 4;
pub const A_SHARE: u8 = 5;
pub const A_PROMOTE: u8 = 6;
const A_MAX: u8 = 6;

pub fn action_name(a: u8) -> &'static str {
    match a {
        A_CREATE => "create",
        A_READ => "read",
        A_UPDATE => "update",
        A_DELETE => "delete",
        A_SHARE => "share",
        A_PROMOTE => "promote",
        ANY => "*",
        _ => "?",
    }
}

pub fn parse_action(s: &str) -> Option<u8> {
    [
        A_CREATE, A_READ, A_UPDATE, A_DELETE, A_SHARE, A_PROMOTE, ANY,
    ]
    .into_iter()
    .find(|a| action_name(*a) == s)
}

pub fn resource_name(rt: u8) -> &'static str {
    match rt {
        RT_SECRET => "secret",
        RT_STACK => "stack",
        ANY => "*",
        other => Kind::from_u8(other).map(|k| k.name()).unwrap_or("?"),
    }
}

pub fn parse_resource(s: &str) -> Option<u8> {
    match s {
        "secret" => Some(RT_SECRET),
        "stack" => Some(RT_STACK),
        "*" => Some(ANY),
        other => Kind::parse(other).map(|k| k as u8),
    }
}

pub fn check_permission(p: &Permission) -> Result<(), String> {
    let rt_ok = p.resource == ANY || (1..=RT_MAX).contains(&p.resource);
    let a_ok = p.action == ANY || (1..=A_MAX).contains(&p.action);
    if !rt_ok || !a_ok {
        return Err(format!(
            "unknown permission (resource type {}, action {})",
            p.resource, p.action
        ));
    }
    Ok(())
}

fn bit(rt: u8, a: u8) -> u128 {
    1u128 << ((rt as u32 - 1) * A_MAX as u32 + (a as u32 - 1))
}

/// The permission bits of a set of permissions (wildcards expanded).
pub fn bits(perms: &[Permission]) -> u128 {
    let mut b = 0u128;
    for p in perms {
        let rts: Vec<u8> = if p.resource == ANY {
            (1..=RT_MAX).collect()
        } else if (1..=RT_MAX).contains(&p.resource) {
            vec![p.resource]
        } else {
            continue;
        };
        let acts: Vec<u8> = if p.action == ANY {
            (1..=A_MAX).collect()
        } else if (1..=A_MAX).contains(&p.action) {
            vec![p.action]
        } else {
            continue;
        };
        for rt in &rts {
            for a in &acts {
                b |= bit(*rt, *a);
            }
        }
    }
    b
}

pub fn has(bits: u128, rt: u8, a: u8) -> bool {
    (1..=RT_MAX).contains(&rt) && (1..=A_MAX).contains(&a) && bits & bit(rt, a) != 0
}

/// Built-in roles, created with every organization.
pub fn builtin_roles() -> Vec<(&'static str, Vec<Permission>)> {
    let p = |resource, action| Permission { resource, action };
    let admin = vec![p(ANY, ANY)];
    let mut developer = Vec::new();
    for rt in 1..=RT_MAX {
        let identity = matches!(
            Kind::from_u8(rt),
            Some(Kind::Organization | Kind::User | Kind::Team | Kind::Role | Kind::RoleBinding)
        );
        if identity {
            developer.push(p(rt, A_READ));
        } else {
            for a in [A_CREATE, A_READ, A_UPDATE, A_DELETE, A_PROMOTE] {
                developer.push(p(rt, a));
            }
        }
    }
    let viewer = vec![p(ANY, A_READ)];
    vec![
        ("admin", admin),
        ("developer", developer),
        ("viewer", viewer),
    ]
}

/// Why a check was allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The subject created the resource.
    Owner,
    /// A binding granted it: (binding, role name, scope, via team).
    Binding {
        binding: Id,
        role: String,
        scope: Id,
        team: Option<Id>,
    },
    Denied(String),
}

impl Reason {
    pub fn allowed(&self) -> bool {
        !matches!(self, Reason::Denied(_))
    }

    pub fn describe(&self) -> String {
        match self {
            Reason::Owner => "allowed: the subject owns the resource".into(),
            Reason::Binding {
                binding,
                role,
                scope,
                team,
            } => format!(
                "allowed by binding {} (role {role:?} at scope {}{})",
                fmt_id(binding),
                fmt_id(scope),
                team.map(|t| format!(", through team {}", fmt_id(&t)))
                    .unwrap_or_default()
            ),
            Reason::Denied(why) => format!("denied: {why}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Role {
    name: String,
    bits: u128,
}

#[derive(Debug, Clone)]
struct Binding {
    subject: Id,
    role: Id,
    scope: Id,
}

/// What a check needs of a resource; fixed for the life of an id (kind, owner and parent never
/// change), so it is cached and only dropped when the row is written again or deleted.
#[derive(Debug)]
pub struct Facts {
    kind: u8,
    owner: Id,
    ancestors: Vec<Id>,
    create_revision: u64,
}

/// Resources whose facts are cached; beyond this the cache is cleared and refilled.
pub const FACTS_CACHE_ENTRIES: usize = 500_000;

/// What one subject may do, by scope: (bits, binding, via team).
type Grants = HashMap<Id, Vec<(u128, Id, Option<Id>)>>;

/// The in-memory RBAC index. Keep it in step with apply through [`RbacIndex::observe`].
#[derive(Debug, Default)]
pub struct RbacIndex {
    users: HashMap<Id, bool>,
    roles: HashMap<Id, Role>,
    bindings: HashMap<Id, Binding>,
    teams: HashMap<Id, Vec<Id>>,
    /// Derived, rebuilt by [`Self::refresh`] when `dirty`.
    grants: HashMap<Id, Grants>,
    dirty: bool,
    /// Facts of recently checked resources (a check then needs no RocksDB read).
    facts: std::sync::Mutex<HashMap<Id, std::sync::Arc<Facts>>>,
}

/// Brings `index` up to date with one written batch (key -> value, None for a delete). Takes
/// the write lock only when the batch wrote metadata rows: key/value writes, the hot path, never
/// do.
pub fn observe_batch(
    index: &std::sync::RwLock<RbacIndex>,
    writes: &crate::fsm::Overlay,
) -> Result<(), FsmError> {
    let mut rows = writes
        .iter()
        .filter(|(k, _)| k.first() == Some(&keys::META_ROW))
        .peekable();
    if rows.peek().is_none() {
        return Ok(());
    }
    let mut ix = index.write().unwrap_or_else(|p| p.into_inner());
    for (k, v) in rows {
        ix.observe(k, v.as_deref())?;
    }
    Ok(())
}

impl RbacIndex {
    /// Loads the index from a state (at open and after a snapshot install).
    pub fn load(state: &dyn StateRead) -> Result<RbacIndex, FsmError> {
        let mut ix = RbacIndex::default();
        for kind in [Kind::User, Kind::Team, Kind::Role, Kind::RoleBinding] {
            let prefix = keys::meta_index_prefix(IX_KIND, &[kind as u8]);
            for id in index_ids(state, &prefix, usize::MAX)? {
                if let Some(r) = load_record(state, &id)? {
                    ix.put(&r);
                }
            }
        }
        ix.refresh();
        Ok(ix)
    }

    /// Feeds one written state-machine key (a row put, or a row delete when `value` is None).
    pub fn observe(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), FsmError> {
        if key.first() != Some(&keys::META_ROW) || key.len() != 17 {
            return Ok(());
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&key[1..]);
        // Any write of the row drops its cached facts (a delete, or an id created anew).
        self.facts
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match value {
            Some(raw) => {
                let r = decode_record(key, raw)?;
                self.put(&r);
            }
            None => {
                let removed = self.users.remove(&id).is_some()
                    | self.roles.remove(&id).is_some()
                    | self.bindings.remove(&id).is_some()
                    | self.teams.remove(&id).is_some();
                self.dirty |= removed;
            }
        }
        Ok(())
    }

    fn facts_cache(&self) -> std::sync::MutexGuard<'_, HashMap<Id, std::sync::Arc<Facts>>> {
        self.facts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A resource's facts as of `applied`: from the cache, or read from `state` and cached.
    fn facts(
        &self,
        state: &dyn StateRead,
        applied: u64,
        id: &Id,
    ) -> Result<Option<std::sync::Arc<Facts>>, FsmError> {
        if let Some(f) = self.facts_cache().get(id) {
            if f.create_revision <= applied {
                return Ok(Some(f.clone()));
            }
        }
        let Some((kind, owner, ancestors, create_revision)) = load_head(state, id)? else {
            return Ok(None);
        };
        let f = std::sync::Arc::new(Facts {
            kind: kind as u8,
            owner,
            ancestors,
            create_revision,
        });
        let mut c = self.facts_cache();
        if c.len() >= FACTS_CACHE_ENTRIES {
            c.clear();
        }
        c.insert(*id, f.clone());
        Ok(Some(f))
    }

    fn put(&mut self, r: &Record) {
        match &r.spec {
            // Only the active flag matters to checks; other user updates change nothing.
            Spec::User { active, .. } if self.users.insert(r.id, *active) != Some(*active) => {
                self.dirty = true;
            }
            Spec::Team { members } => {
                self.teams.insert(r.id, members.clone());
                self.dirty = true;
            }
            Spec::Role { permissions, .. } => {
                self.roles.insert(
                    r.id,
                    Role {
                        name: r.name.clone(),
                        bits: bits(permissions),
                    },
                );
                self.dirty = true;
            }
            Spec::RoleBinding {
                subject,
                role,
                scope,
            } => {
                self.bindings.insert(
                    r.id,
                    Binding {
                        subject: *subject,
                        role: *role,
                        scope: *scope,
                    },
                );
                self.dirty = true;
            }
            _ => {}
        }
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Rebuilds the precomputed grants (cheap: bindings are few; run once per changed batch).
    pub fn refresh(&mut self) {
        if !self.dirty && !self.grants.is_empty() {
            return;
        }
        let mut grants: HashMap<Id, Grants> = HashMap::new();
        for (bid, b) in &self.bindings {
            let Some(role) = self.roles.get(&b.role) else {
                continue;
            };
            let mut give = |subject: Id, team: Option<Id>| {
                grants
                    .entry(subject)
                    .or_default()
                    .entry(b.scope)
                    .or_default()
                    .push((role.bits, *bid, team));
            };
            if let Some(members) = self.teams.get(&b.subject) {
                for m in members {
                    give(*m, Some(b.subject));
                }
            } else {
                give(b.subject, None);
            }
        }
        // Deterministic order for explain: by binding id.
        for g in grants.values_mut() {
            for v in g.values_mut() {
                v.sort_by_key(|a| a.1);
            }
        }
        self.grants = grants;
        self.dirty = false;
    }

    /// Checks `action` on resource type `rt` at `target` (a resource, or the scope a resource of
    /// type `rt` would be created in) for `subject`. Call [`Self::refresh`] first if dirty.
    pub fn check(
        &self,
        state: &dyn StateRead,
        subject: &Id,
        action: u8,
        rt: Option<u8>,
        target: &Id,
    ) -> Result<Reason, FsmError> {
        self.check_at(state, u64::MAX, subject, action, rt, target)
    }

    /// [`Self::check`] against a state at applied index `applied` (cached resource facts created
    /// after it are not used).
    pub fn check_at(
        &self,
        state: &dyn StateRead,
        applied: u64,
        subject: &Id,
        action: u8,
        rt: Option<u8>,
        target: &Id,
    ) -> Result<Reason, FsmError> {
        match self.users.get(subject) {
            None => return Ok(Reason::Denied(format!("no user {}", fmt_id(subject)))),
            Some(false) => return Ok(Reason::Denied("the user is deactivated".into())),
            Some(true) => {}
        }
        let Some(r) = self.facts(state, applied, target)? else {
            return Ok(Reason::Denied(format!(
                "resource {} not found",
                fmt_id(target)
            )));
        };
        let rt = rt.unwrap_or(r.kind);
        if r.owner == *subject && rt == r.kind {
            return Ok(Reason::Owner);
        }
        let Some(g) = self.grants.get(subject) else {
            return Ok(Reason::Denied("no role bindings for the subject".into()));
        };
        // The resource itself, then its containers from the nearest up.
        let scopes = std::iter::once(target).chain(r.ancestors.iter().rev());
        for s in scopes {
            if let Some(list) = g.get(s) {
                for (b, bid, team) in list {
                    if has(*b, rt, action) {
                        let role = self
                            .bindings
                            .get(bid)
                            .and_then(|x| self.roles.get(&x.role))
                            .map(|x| x.name.clone())
                            .unwrap_or_default();
                        return Ok(Reason::Binding {
                            binding: *bid,
                            role,
                            scope: *s,
                            team: *team,
                        });
                    }
                }
            }
        }
        Ok(Reason::Denied(format!(
            "no binding on {} or its containers grants {} on {}",
            fmt_id(target),
            action_name(action),
            resource_name(rt)
        )))
    }

    /// Scopes where `subject` holds (rt, action) through a binding.
    pub fn granted_scopes(&self, subject: &Id, rt: u8, action: u8) -> Vec<Id> {
        let mut out: Vec<Id> = self
            .grants
            .get(subject)
            .map(|g| {
                g.iter()
                    .filter(|(_, l)| l.iter().any(|(b, _, _)| has(*b, rt, action)))
                    .map(|(s, _)| *s)
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    pub fn user_active(&self, id: &Id) -> Option<bool> {
        self.users.get(id).copied()
    }
}

/// The obvious evaluator, straight from the rules, for tests: walks every binding.
pub fn naive_check(
    state: &dyn StateRead,
    subject: &Id,
    action: u8,
    rt: Option<u8>,
    target: &Id,
) -> Result<bool, FsmError> {
    let Some(user) = load_record(state, subject)? else {
        return Ok(false);
    };
    if !matches!(user.spec, Spec::User { active: true, .. }) {
        return Ok(false);
    }
    let Some(r) = load_record(state, target)? else {
        return Ok(false);
    };
    let rt = rt.unwrap_or(r.kind() as u8);
    if r.owner == *subject && rt == r.kind() as u8 {
        return Ok(true);
    }
    let prefix = keys::meta_index_prefix(IX_KIND, &[Kind::RoleBinding as u8]);
    for b in index_ids(state, &prefix, usize::MAX)? {
        let Some(br) = load_record(state, &b)? else {
            continue;
        };
        let Spec::RoleBinding {
            subject: s,
            role,
            scope,
        } = br.spec
        else {
            continue;
        };
        let applies_to_me = s == *subject
            || matches!(load_record(state, &s)?, Some(Record { spec: Spec::Team { members }, .. }) if members.contains(subject));
        let in_scope = scope == r.id || r.ancestors.contains(&scope);
        if !applies_to_me || !in_scope {
            continue;
        }
        if let Some(Record {
            spec: Spec::Role { permissions, .. },
            ..
        }) = load_record(state, &role)?
        {
            if permissions.iter().any(|p| {
                (p.resource == ANY || p.resource == rt) && (p.action == ANY || p.action == action)
            }) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}
