//! `metaraft rbac ...`: roles, bindings, permission checks and `explain`.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::json;

use metaraft::client::Client;
use metaraft::fsm::meta::Kind;
use metaraft::pb;
use metaraft::pb::resource::Spec as S;

use super::resource::{list_all, permissions, print_resources};
use crate::cli::args::{Conn, Output};
use crate::cli::runtime;

#[derive(Subcommand, Debug)]
pub enum RbacCmd {
    /// List the roles of an organization.
    Roles {
        org: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Create a custom role: --permission resource_type:action (either may be *).
    CreateRole {
        org: String,
        name: String,
        #[arg(long = "permission", required = true)]
        permissions: Vec<String>,
    },
    /// Give a role (id or name) to a user or team at a scope (org, workspace, project, resource).
    Bind {
        org: String,
        #[arg(long)]
        subject: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        scope: String,
    },
    /// Remove a binding.
    Unbind { binding: String },
    /// List an organization's bindings.
    Bindings {
        org: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Check one or more resources; prints allowed/denied per resource.
    Check {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        action: String,
        /// Check creating/acting on this type inside each resource instead of the resource.
        #[arg(long, default_value = "")]
        resource_type: String,
        #[arg(required = true)]
        resources: Vec<String>,
    },
    /// Explain a decision: which binding granted it, or why it was denied.
    Explain {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        action: String,
        #[arg(long, default_value = "")]
        resource_type: String,
        resource: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

/// Runs one `rbac` command.
pub fn run_rbac(conn: Conn, op: RbacCmd) -> Result<ExitCode> {
    runtime::multi_thread()?.block_on(async { rbac(conn.client()?, op).await })
}

async fn rbac(c: Client, op: RbacCmd) -> Result<ExitCode> {
    match op {
        RbacCmd::Roles { org, output } => list_in_org(&c, Kind::Role, org, output).await,
        RbacCmd::Bindings { org, output } => list_in_org(&c, Kind::RoleBinding, org, output).await,
        RbacCmd::CreateRole {
            org,
            name,
            permissions: perms,
        } => create_role(&c, org, name, perms).await,
        RbacCmd::Bind {
            org,
            subject,
            role,
            scope,
        } => bind(&c, org, subject, role, scope).await,
        RbacCmd::Unbind { binding } => {
            c.meta_delete(pb::DeleteResourceRequest {
                id: binding,
                ..Default::default()
            })
            .await?;
            println!("removed");
            Ok(ExitCode::SUCCESS)
        }
        RbacCmd::Check {
            subject,
            action,
            resource_type,
            resources,
        } => check(&c, subject, action, resource_type, resources).await,
        RbacCmd::Explain {
            subject,
            action,
            resource_type,
            resource,
            output,
        } => explain(&c, subject, action, resource_type, resource, output).await,
    }
}

/// Every role (by name) or binding (newest first) of an organization.
async fn list_in_org(c: &Client, kind: Kind, org: String, output: Output) -> Result<ExitCode> {
    let req = pb::ListResourcesRequest {
        kind: kind as i32,
        parent_id: org,
        order: if kind == Kind::Role { 1 } else { 0 },
        page_size: 1000,
        ..Default::default()
    };
    print_resources(&list_all(c, req, true).await?, output);
    Ok(ExitCode::SUCCESS)
}

async fn create_role(
    c: &Client,
    org: String,
    name: String,
    perms: Vec<String>,
) -> Result<ExitCode> {
    let r = c
        .meta_create(pb::CreateResourceRequest {
            resource: Some(pb::Resource {
                parent_id: org,
                name,
                spec: Some(S::Role(pb::RoleSpec {
                    permissions: permissions(&perms.join(","))?,
                    builtin: false,
                })),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?;
    print_resources(r.resource.as_slice(), Output::Text);
    Ok(ExitCode::SUCCESS)
}

async fn bind(
    c: &Client,
    org: String,
    subject: String,
    role: String,
    scope: String,
) -> Result<ExitCode> {
    let role_id = role_id(c, &org, &role).await?;
    let r = c
        .meta_create(pb::CreateResourceRequest {
            resource: Some(pb::Resource {
                parent_id: org,
                spec: Some(S::RoleBinding(pb::RoleBindingSpec {
                    subject_id: subject,
                    role_id,
                    scope_id: scope,
                })),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?;
    print_resources(r.resource.as_slice(), Output::Text);
    Ok(ExitCode::SUCCESS)
}

/// A role given by id, or by name in the organization.
async fn role_id(c: &Client, org: &str, role: &str) -> Result<String> {
    if metaraft::fsm::meta::parse_id(role).is_ok() {
        return Ok(role.to_string());
    }
    let r = c
        .meta_get(pb::GetResourceRequest {
            key: Some(pb::get_resource_request::Key::ByName(pb::ByName {
                kind: Kind::Role as i32,
                parent_id: org.to_string(),
                name: role.to_string(),
                attempt: 0,
            })),
            read: None,
        })
        .await
        .with_context(|| format!("role {role:?}"))?;
    Ok(r.resource.map(|r| r.id).unwrap_or_default())
}

/// One line per resource; exit code 2 when any is denied.
async fn check(
    c: &Client,
    subject: String,
    action: String,
    resource_type: String,
    resources: Vec<String>,
) -> Result<ExitCode> {
    let r = c
        .check_permissions(pb::CheckPermissionsRequest {
            subject_id: subject,
            action,
            resource_type,
            resource_ids: resources.clone(),
            read: None,
        })
        .await?;
    let mut all = true;
    for (id, ok) in resources.iter().zip(r.allowed) {
        println!("{id} {}", if ok { "allowed" } else { "denied" });
        all &= ok;
    }
    Ok(if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// The decision and why; exit code 2 when denied.
async fn explain(
    c: &Client,
    subject: String,
    action: String,
    resource_type: String,
    resource: String,
    output: Output,
) -> Result<ExitCode> {
    let r = c
        .explain(pb::ExplainRequest {
            subject_id: subject,
            action,
            resource_type,
            resource_id: resource,
            read: None,
        })
        .await?;
    match output {
        Output::Text => println!("{}", r.explanation),
        Output::Json => println!(
            "{}",
            json!({
                "allowed": r.allowed,
                "explanation": r.explanation,
                "owner": r.owner,
                "binding_id": r.binding_id,
                "role": r.role,
                "scope_id": r.scope_id,
                "team_id": r.team_id,
            })
        ),
    }
    Ok(if r.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
