//! Model-based proptests: run lifecycle, version numbering, RBAC decisions.

use super::*;

#[derive(Debug, Clone)]
enum StepAction {
    Create,
    Set(usize, RunStatus, bool),
    Delete(usize),
}

fn status_strategy() -> impl Strategy<Value = RunStatus> {
    prop::sample::select(RunStatus::ALL.to_vec())
}

fn step_actions() -> impl Strategy<Value = Vec<StepAction>> {
    prop::collection::vec(
        prop_oneof![
            2 => Just(StepAction::Create),
            6 => (0..8usize, status_strategy(), prop::bool::weighted(0.1)).prop_map(|(i, s, r)| StepAction::Set(i, s, r)),
            1 => (0..8usize).prop_map(StepAction::Delete),
        ],
        1..60,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The run lifecycle against a reference: step statuses only move as the rules allow, the
    /// run's counts equal the steps' statuses, and its status is derived from them.
    #[test]
    fn run_lifecycle_matches_the_model(actions in step_actions(), expected in 0u32..4) {
        let mut w = World::new();
        let (_, _, p, u) = w.tree();
        let run = w.create(p, "r", u, run_spec(NIL, expected));
        let mut steps: Vec<(Id, RunStatus)> = Vec::new();
        let mut run_status = RunStatus::Initializing;
        for a in actions {
            let mut resumed = false;
            match a {
                StepAction::Create => {
                    let id = w.fresh();
                    let name = format!("s{}", w.next_id);
                    let resp = w.op(MetaOp::Create { id, parent: run.id, name, owner: u, tags: vec![], spec: step_spec(1, "") });
                    if run_status.is_finished() {
                        prop_assert!(matches!(resp, MetaResponse::Error { kind: MetaErrorKind::FailedPrecondition, .. }), "{:?}", resp);
                    } else {
                        prop_assert!(matches!(resp, MetaResponse::Record(_)), "{:?}", resp);
                        steps.push((id, RunStatus::Initializing));
                    }
                }
                StepAction::Set(i, to, resume) => {
                    if steps.is_empty() { continue; }
                    let i = i % steps.len();
                    let (id, from) = steps[i];
                    let resp = w.op(MetaOp::SetStepStatus { id, status: to, resume });
                    let allowed = if resume {
                        from.is_finished() && !to.is_finished()
                    } else {
                        !from.is_finished() && from.can_move_to(to) && !run_status.is_finished()
                    };
                    prop_assert_eq!(matches!(resp, MetaResponse::Record(_)), allowed, "{:?} -> {:?} resume={} run={:?}: {:?}", from, to, resume, run_status, resp);
                    if allowed {
                        steps[i].1 = to;
                        resumed = resume;
                    }
                }
                StepAction::Delete(i) => {
                    if steps.is_empty() { continue; }
                    let i = i % steps.len();
                    let (id, _) = steps.remove(i);
                    let resp = w.op(MetaOp::Delete { id, expected_revision: None });
                    prop_assert!(matches!(resp, MetaResponse::Deleted { removed: 1 }), "{:?}", resp);
                }
            }
            // Reference derivation from the model's steps.
            let r = w.get(&run.id);
            let Spec::PipelineRun { status, step_counts, .. } = r.spec else { unreachable!() };
            let mut counts = [0u32; 9];
            counts[0] = expected;
            for (_, s) in &steps { counts[*s as usize] += 1; }
            prop_assert_eq!(step_counts, counts);
            if run_status.is_finished() && !resumed {
                prop_assert_eq!(status, run_status, "a finished run changed without a resume");
            } else {
                let finished = steps.iter().filter(|(_, s)| s.is_finished()).count() as u32;
                let started = steps.iter().any(|(_, s)| *s != RunStatus::Initializing);
                if steps.iter().any(|(_, s)| *s == RunStatus::Failed) {
                    prop_assert_eq!(status, RunStatus::Failed);
                } else if expected > 0 && finished >= expected && finished as usize == steps.len() {
                    prop_assert!(matches!(status, RunStatus::Completed | RunStatus::Stopped), "{:?}", status);
                } else if started || resumed {
                    prop_assert_eq!(status, RunStatus::Running);
                } else {
                    prop_assert_eq!(status, run_status);
                }
            }
            run_status = status;
        }
    }

    /// Versions of one artifact created in any interleaving with deletes are numbered 1, 2, 3...
    /// in creation order: unique, never reused, no gaps in what was handed out.
    #[test]
    fn version_numbers_are_unique_and_gap_free(ops in prop::collection::vec(prop::bool::weighted(0.8), 1..80)) {
        let mut w = World::new();
        let (_, _, p, u) = w.tree();
        let a = w.create(p, "dataset", u, Spec::Artifact { artifact_type: "data".into(), latest_version: 0 });
        let mut handed = Vec::new();
        let mut live: Vec<Id> = Vec::new();
        for create in ops {
            if create || live.is_empty() {
                let v = w.create(a.id, "x", u, Spec::ArtifactVersion { uri: "s3://b/k".into(), content_hash: String::new(), run: NIL, number: 0 });
                let Spec::ArtifactVersion { number, .. } = v.spec else { unreachable!() };
                handed.push(number);
                live.push(v.id);
            } else {
                let id = live.remove(0);
                w.op(MetaOp::Delete { id, expected_revision: None });
            }
        }
        let want: Vec<u64> = (1..=handed.len() as u64).collect();
        prop_assert_eq!(handed, want);
        let page = query::list(&w.s, &ListQuery { kind: Some(Kind::ArtifactVersion), parent: a.id, page_size: 1000, ..Default::default() }).expect("list");
        prop_assert_eq!(page.records.len(), live.len());
        prop_assert_eq!(page.total, live.len() as u64);
    }

    /// RBAC decisions of the index equal a naive evaluator's, for random bindings, teams,
    /// owners and targets.
    #[test]
    fn rbac_index_agrees_with_naive_evaluator(
        bindings in prop::collection::vec((0..4usize, 0..3usize, 0..5usize), 0..8),
        team_members in prop::collection::vec(0..4usize, 0..4),
        checks in prop::collection::vec((0..4usize, 1u8..=6, 0..5usize, prop::bool::ANY), 1..40),
    ) {
        let mut w = World::new();
        let (org, ws, p, alice) = w.tree();
        let mut users = vec![alice];
        for n in ["bob", "carol"] {
            users.push(w.create(org, n, NIL, user_spec(false)).id);
        }
        let mut members: Vec<Id> = team_members.iter().map(|i| users[i % users.len()]).collect();
        members.sort();
        members.dedup();
        let team = w.create(org, "t", NIL, Spec::Team { members }).id;
        let subjects = [users[0], users[1], users[2], team];
        let pipe = w.create(p, "pipe", users[1], Spec::Pipeline { description: String::new(), run_count: 0 });
        let run = w.create(p, "run", users[2], run_spec(pipe.id, 0));
        let targets = [org, ws, p, pipe.id, run.id];
        let roles = ["admin", "developer", "viewer"];
        for (s, r, t) in bindings {
            let id = w.fresh();
            let role = apply::builtin_role_id(&org, roles[r]);
            w.op(MetaOp::Create { id, parent: org, name: String::new(), owner: NIL, tags: vec![], spec: Spec::RoleBinding { subject: subjects[s], role, scope: targets[t] } });
        }
        let ix = rbac_index(&w);
        for (s, action, t, create_child) in checks {
            let subject = subjects[s.min(2)];
            let rt = create_child.then_some(Kind::PipelineRun as u8);
            let fast = ix.check(&w.s, &subject, action, rt, &targets[t]).expect("check").allowed();
            let slow = rbac::naive_check(&w.s, &subject, action, rt, &targets[t]).expect("naive");
            prop_assert_eq!(fast, slow, "subject {} action {} target {}", s, action, t);
        }
    }
}
