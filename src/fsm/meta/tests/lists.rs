//! Lists: filters, pagination, counts.

use super::*;

#[test]
fn lists_filter_and_paginate_newest_first_with_counts() {
    let mut w = World::new();
    let (_, _, p, u) = w.tree();
    let pipe = w.create(
        p,
        "train",
        u,
        Spec::Pipeline {
            description: String::new(),
            run_count: 0,
        },
    );
    let mut runs = Vec::new();
    for i in 0..25 {
        let r = w.create(
            p,
            &format!("r{i:02}"),
            u,
            run_spec(if i % 2 == 0 { pipe.id } else { NIL }, 0),
        );
        if i % 3 == 0 {
            w.ok(MetaOp::SetRunStatus {
                id: r.id,
                status: RunStatus::Failed,
                resume: false,
            });
        }
        if i % 5 == 0 {
            w.ok(MetaOp::Update {
                id: r.id,
                expected_revision: None,
                name: None,
                tags: Some(vec!["nightly".into()]),
                spec: None,
            });
        }
        runs.push(r);
    }
    let mut q = ListQuery {
        kind: Some(Kind::PipelineRun),
        parent: p,
        page_size: 10,
        ..Default::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = query::list(&w.s, &q).expect("list");
        assert_eq!(page.total, 25);
        seen.extend(page.records.iter().map(|r| r.name.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        q.page_token = page.next_page_token;
    }
    let expected: Vec<String> = (0..25).rev().map(|i| format!("r{i:02}")).collect();
    assert_eq!(seen, expected, "newest first, every run exactly once");
    let failed = query::list(
        &w.s,
        &ListQuery {
            kind: Some(Kind::PipelineRun),
            parent: p,
            status: Some(RunStatus::Failed),
            page_size: 100,
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(failed.records.len(), 9);
    assert_eq!(failed.total, 9);
    let both = query::list(
        &w.s,
        &ListQuery {
            kind: Some(Kind::PipelineRun),
            parent: p,
            status: Some(RunStatus::Failed),
            pipeline: Some(pipe.id),
            page_size: 100,
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(both.records.len(), 5); // 0, 6, 12, 18, 24
    let tagged_failed = query::list(
        &w.s,
        &ListQuery {
            kind: Some(Kind::PipelineRun),
            parent: p,
            tag: Some("nightly".into()),
            status: Some(RunStatus::Failed),
            page_size: 100,
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(tagged_failed.records.len(), 2); // 0, 15
    assert!(!tagged_failed.total_exact);
    // A time range: the runs created strictly inside it.
    let t5 = runs[5].created_ms;
    let t10 = runs[10].created_ms;
    let ranged = query::list(
        &w.s,
        &ListQuery {
            kind: Some(Kind::PipelineRun),
            parent: p,
            created_after_ms: Some(t5),
            created_before_ms: Some(t10),
            page_size: 100,
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(
        ranged
            .records
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        vec!["r09", "r08", "r07", "r06", "r05"]
    );
    // By name; tokens belong to their query.
    let by_name = query::list(
        &w.s,
        &ListQuery {
            kind: Some(Kind::PipelineRun),
            parent: p,
            order: Order::Name,
            page_size: 3,
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(
        by_name
            .records
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        vec!["r00", "r01", "r02"]
    );
    let foreign = ListQuery {
        kind: Some(Kind::PipelineRun),
        parent: p,
        status: Some(RunStatus::Failed),
        page_token: by_name.next_page_token.clone(),
        ..Default::default()
    };
    assert!(matches!(
        query::list(&w.s, &foreign),
        Err(query::QueryError::Invalid(_))
    ));
    let garbage = ListQuery {
        kind: Some(Kind::PipelineRun),
        parent: p,
        page_token: "zz".into(),
        ..Default::default()
    };
    assert!(matches!(
        query::list(&w.s, &garbage),
        Err(query::QueryError::Invalid(_))
    ));
    let too_big = ListQuery {
        kind: Some(Kind::PipelineRun),
        parent: p,
        page_size: 100_000,
        ..Default::default()
    };
    assert!(matches!(
        query::list(&w.s, &too_big),
        Err(query::QueryError::Invalid(_))
    ));
}
