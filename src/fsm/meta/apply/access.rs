//! Users, teams, roles, bindings and API keys.

use super::*;

/// A new user: its API keys are added by `AddApiKey` only.
pub(super) fn prepare_user(
    email: String,
    external_id: String,
    active: bool,
    service_account: bool,
) -> Spec {
    Spec::User {
        email,
        external_id,
        active,
        service_account,
        api_keys: Vec::new(),
    }
}

/// A new team: every member is a user of the team's organization.
pub(super) fn prepare_team(tx: &Tx<'_>, d: &Draft, members: Vec<Id>) -> R<Spec> {
    check_members(tx, &d.org, &members)?;
    Ok(Spec::Team { members })
}

/// A new role: only organizations create built-in roles.
pub(super) fn prepare_role(permissions: Vec<Permission>) -> Spec {
    Spec::Role {
        permissions,
        builtin: false,
    }
}

/// A new binding: its subject (a user or team), role and scope all belong to its organization;
/// it is named after its id when no name is given.
pub(super) fn prepare_binding(
    tx: &Tx<'_>,
    d: &mut Draft,
    subject: Id,
    role: Id,
    scope: Id,
) -> R<Spec> {
    let org = d.org;
    let s = tx.must(&subject, "subject")?;
    if !matches!(s.kind(), Kind::User | Kind::Team) || s.org() != org {
        return invalid("a binding's subject must be a user or team of the organization");
    }
    let r = tx.must_kind(&role, Kind::Role)?;
    if r.org() != org {
        return invalid("the role belongs to another organization");
    }
    let sc = tx.must(&scope, "scope")?;
    if sc.org() != org {
        return invalid("the scope belongs to another organization");
    }
    if d.name.is_empty() {
        d.name = fmt_id(&d.id);
    }
    Ok(Spec::RoleBinding {
        subject,
        role,
        scope,
    })
}

/// The built-in roles every new organization gets, with deterministic ids.
pub(super) fn write_builtin_roles(tx: &mut Tx<'_>, index: u64, at_ms: u64, org: &Id) -> R<()> {
    for (role, perms) in rbac::builtin_roles() {
        let r = Record {
            format: META_FORMAT_VERSION,
            id: builtin_role_id(org, role),
            parent: *org,
            ancestors: vec![*org],
            name: role.to_string(),
            owner: NIL,
            created_ms: at_ms,
            updated_ms: at_ms,
            create_revision: index,
            mod_revision: index,
            tags: Vec::new(),
            spec: Spec::Role {
                permissions: perms,
                builtin: true,
            },
        };
        tx.write_row(None, Some(&r))?;
    }
    Ok(())
}

pub(super) fn check_members(tx: &Tx<'_>, org: &Id, members: &[Id]) -> R<()> {
    let mut seen = members.to_vec();
    seen.sort();
    seen.dedup();
    if seen.len() != members.len() {
        return invalid("duplicate team members");
    }
    for m in members {
        let u = tx.must_kind(m, Kind::User)?;
        if u.org() != *org {
            return invalid("a team member belongs to another organization");
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn add_api_key(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    user: &Id,
    key_id: &str,
    sha256: &[u8; 32],
    grace_ms: u64,
) -> R<Record> {
    let old = tx.must_kind(user, Kind::User)?;
    check(validate_name(Kind::User, key_id).map_err(|e| format!("key id: {e}")))?;
    let ak = keys::meta_api_key(sha256);
    if tx.get(&ak)?.is_some() {
        return refuse(
            MetaErrorKind::AlreadyExists,
            "this API key is already registered",
        );
    }
    let mut new = old.clone();
    let mut dropped = Vec::new();
    if let Spec::User {
        service_account,
        api_keys,
        ..
    } = &mut new.spec
    {
        if !*service_account {
            return invalid("API keys belong to service accounts only");
        }
        if api_keys.iter().any(|k| k.key_id == key_id) {
            return refuse(
                MetaErrorKind::AlreadyExists,
                format!("key id {key_id:?} already exists"),
            );
        }
        // Expired keys are dropped; live ones expire after the grace period.
        api_keys.retain(|k| {
            let expired = k.expires_ms != 0 && k.expires_ms <= at_ms;
            if expired {
                dropped.push(k.sha256);
            }
            !expired
        });
        for k in api_keys.iter_mut() {
            let end = at_ms.saturating_add(grace_ms);
            if k.expires_ms == 0 || k.expires_ms > end {
                k.expires_ms = end;
            }
        }
        api_keys.push(ApiKey {
            key_id: key_id.to_string(),
            sha256: *sha256,
            created_ms: at_ms,
            expires_ms: 0,
        });
    }
    for h in dropped {
        tx.delete(keys::meta_api_key(&h));
    }
    tx.put(ak, user.to_vec());
    new.mod_revision = index;
    new.updated_ms = at_ms;
    tx.write_row(Some(&old), Some(&new))?;
    Ok(new)
}

pub(super) fn revoke_api_key(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    user: &Id,
    key_id: &str,
) -> R<Record> {
    let old = tx.must_kind(user, Kind::User)?;
    let mut new = old.clone();
    let mut removed = None;
    if let Spec::User { api_keys, .. } = &mut new.spec {
        if let Some(pos) = api_keys.iter().position(|k| k.key_id == key_id) {
            removed = Some(api_keys.remove(pos).sha256);
        }
    }
    let Some(h) = removed else {
        return refuse(
            MetaErrorKind::NotFound,
            format!("key id {key_id:?} not found"),
        );
    };
    tx.delete(keys::meta_api_key(&h));
    new.mod_revision = index;
    new.updated_ms = at_ms;
    tx.write_row(Some(&old), Some(&new))?;
    Ok(new)
}
