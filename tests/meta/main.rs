//! Cluster tests of the metadata services with three real `metaraft serve` processes: concurrent
//! writers through every node, reads and permission checks on followers, restarts, bad input.

#![allow(clippy::await_holding_lock)]

#[path = "../common/mod.rs"]
mod common;
mod concurrency;
mod input;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use metaraft::client::Client;
use metaraft::pb;
use metaraft::pb::resource::Spec as S;
use tonic::Code;

async fn create(c: &Client, parent: &str, name: &str, owner: &str, spec: S) -> pb::Resource {
    c.meta_create(pb::CreateResourceRequest {
        resource: Some(pb::Resource {
            parent_id: parent.into(),
            name: name.into(),
            owner_id: owner.into(),
            spec: Some(spec),
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("create {name}: {e}"))
    .resource
    .expect("resource")
}

fn session(rev: u64) -> Option<pb::ReadOptions> {
    Some(pb::ReadOptions {
        consistency: pb::Consistency::Session as i32,
        min_revision: rev,
        max_lag: 0,
    })
}

/// org, alice, workspace, project (through the given client).
async fn tree(c: &Client) -> (String, String, String, String) {
    let org = create(c, "", "acme", "", S::Organization(Default::default()))
        .await
        .id;
    let alice = create(
        c,
        &org,
        "alice",
        "",
        S::User(pb::UserSpec {
            active: true,
            ..Default::default()
        }),
    )
    .await
    .id;
    let ws = create(c, &org, "ml", &alice, S::Workspace(Default::default()))
        .await
        .id;
    let p = create(c, &ws, "vision", &alice, S::Project(Default::default()))
        .await
        .id;
    (org, alice, ws, p)
}

fn code_of(e: metaraft::client::ClientError) -> Code {
    e.code().expect("a gRPC status")
}
