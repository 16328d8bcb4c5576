//! RBAC: bindings, scopes, owners and teams.

use super::*;

#[test]
fn rbac_bindings_scopes_owners_and_teams() {
    let mut w = World::new();
    let (org, ws, p, alice) = w.tree();
    let bob = w.create(org, "bob", NIL, user_spec(false)).id;
    let carol = w.create(org, "carol", NIL, user_spec(false)).id;
    let run = w.create(p, "r", alice, run_spec(NIL, 0));
    let mut ix = rbac_index(&w);
    // Owner: alice owns the run; bob has nothing.
    assert_eq!(
        ix.check(&w.s, &alice, rbac::A_DELETE, None, &run.id)
            .expect("check"),
        rbac::Reason::Owner
    );
    assert!(!ix
        .check(&w.s, &bob, rbac::A_READ, None, &run.id)
        .expect("check")
        .allowed());
    // A viewer binding at the workspace lets bob read the run, not delete it.
    let b = bind(&mut w, org, bob, "viewer", ws);
    ix.observe(
        &crate::keys::meta_row(&b.id),
        w.s.0
            .get(&crate::keys::meta_row(&b.id))
            .map(|v| v.as_slice()),
    )
    .expect("observe");
    ix.refresh();
    let r = ix
        .check(&w.s, &bob, rbac::A_READ, None, &run.id)
        .expect("check");
    assert!(
        matches!(r, rbac::Reason::Binding { scope, .. } if scope == ws),
        "{r:?}"
    );
    assert!(!ix
        .check(&w.s, &bob, rbac::A_DELETE, None, &run.id)
        .expect("check")
        .allowed());
    // A team with a developer binding on the project: carol may create pipelines there.
    let team = w.create(
        org,
        "ml-team",
        NIL,
        Spec::Team {
            members: vec![carol],
        },
    );
    bind(&mut w, org, team.id, "developer", p);
    let ix = rbac_index(&w);
    let r = ix
        .check(&w.s, &carol, rbac::A_CREATE, Some(Kind::Pipeline as u8), &p)
        .expect("check");
    assert!(
        matches!(r, rbac::Reason::Binding { team: Some(t), .. } if t == team.id),
        "{r:?}"
    );
    assert!(!ix
        .check(&w.s, &carol, rbac::A_SHARE, None, &p)
        .expect("check")
        .allowed());
    // Deleting the team removes its bindings.
    w.ok(MetaOp::Update {
        id: team.id,
        expected_revision: None,
        name: None,
        tags: None,
        spec: Some(Spec::Team { members: vec![] }),
    });
    let ix = rbac_index(&w);
    assert!(!ix
        .check(&w.s, &carol, rbac::A_CREATE, Some(Kind::Pipeline as u8), &p)
        .expect("check")
        .allowed());
    // Deactivated users are denied even as owners.
    w.ok(MetaOp::Update {
        id: alice,
        expected_revision: None,
        name: None,
        tags: None,
        spec: Some(Spec::User {
            email: String::new(),
            external_id: String::new(),
            active: false,
            service_account: false,
            api_keys: vec![],
        }),
    });
    let ix = rbac_index(&w);
    assert!(!ix
        .check(&w.s, &alice, rbac::A_READ, None, &run.id)
        .expect("check")
        .allowed());
}
