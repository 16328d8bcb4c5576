//! The metadata gRPC services: `Metadata` (resources), `Identity` (API keys) and `Rbac`.
//!
//! This layer only translates: protobuf <-> domain types, id parsing, and one [`MetaOp`] per
//! write. Every rule is decided by the state machine (`fsm::meta::apply`); reads run the pure
//! queries of `fsm::meta::query` over one consistent snapshot.

use tonic::{Request, Response, Status};

mod convert;

use convert::*;
pub use convert::{record_to_pb, spec_from_pb};

use super::status::ApiError;
use super::{Api, ApiResult};
use crate::fsm::meta::query::{self, ListQuery, Order};
use crate::fsm::meta::rbac::Reason;
use crate::fsm::meta::{fmt_id, Id, Kind, MetaErrorKind, MetaOp, MetaResponse};
use crate::fsm::{self, Command};
use crate::pb;
use crate::pb::identity_server::Identity;
use crate::pb::metadata_server::Metadata;
use crate::pb::rbac_server::Rbac;

/// A CreateApiKey retried with the request id of one that was applied gets the first call's
/// record back, whose key is not the secret this call made: answering with it would hand out
/// a secret that never works. The first call's secret is never stored, so it cannot be shown
/// again; the caller is told so (its key stays valid if that first answer arrived).
fn refuse_replayed_key(
    rec: &crate::fsm::meta::Record,
    key_id: &str,
    made: &[u8; 32],
    request_id: &str,
) -> ApiResult<()> {
    let crate::fsm::meta::Spec::User { api_keys, .. } = &rec.spec else {
        return Err(ApiError::Internal("API key added to a non-user".into()));
    };
    match api_keys.iter().find(|k| k.key_id == key_id) {
        Some(k) if k.sha256 == *made => Ok(()),
        _ => Err(ApiError::Meta(
            MetaErrorKind::AlreadyExists,
            format!(
                "request id {request_id:?} already created API key {key_id:?}; its secret was \
                 returned to that first call only and is never stored: if it was lost, revoke \
                 the key and create another with a new request id"
            ),
        )),
    }
}

/// Most resources one CheckPermissions call may ask about.
pub const MAX_CHECK_BATCH: usize = 1000;

impl Api {
    /// Commits one meta op; a domain refusal becomes its gRPC status.
    async fn meta_write(&self, request_id: String, op: MetaOp) -> ApiResult<(MetaResponse, u64)> {
        self.check_request_id(&request_id)?;
        let cmd = Command::meta(&op).map_err(|e| ApiError::Internal(e.to_string()))?;
        match self.write(request_id, cmd).await? {
            fsm::Response::Meta {
                revision,
                response: MetaResponse::Error { kind, message },
            } => {
                let _ = revision;
                Err(ApiError::Meta(kind, message))
            }
            fsm::Response::Meta { revision, response } => Ok((response, revision)),
            other => Err(ApiError::Internal(format!(
                "unexpected response to a meta command: {other:?}"
            ))),
        }
    }

    async fn record_write(
        &self,
        request_id: String,
        op: MetaOp,
    ) -> ApiResult<pb::ResourceResponse> {
        match self.meta_write(request_id, op).await? {
            (MetaResponse::Record(r), revision) => Ok(pb::ResourceResponse {
                resource: Some(record_to_pb(&r)),
                revision,
            }),
            (other, _) => Err(ApiError::Internal(format!(
                "unexpected meta response {other:?}"
            ))),
        }
    }

    async fn create_inner(&self, r: pb::CreateResourceRequest) -> ApiResult<pb::ResourceResponse> {
        let res = r
            .resource
            .ok_or_else(|| ApiError::Invalid("resource is required".into()))?;
        let spec = spec_from_pb(&res)?;
        let id = if res.id.is_empty() {
            new_id()
        } else {
            id_field("id", &res.id)?
        };
        let op = MetaOp::Create {
            id,
            parent: opt_id("parent_id", &res.parent_id)?,
            name: res.name,
            owner: opt_id("owner_id", &res.owner_id)?,
            tags: res.tags,
            spec,
        };
        self.record_write(r.request_id, op).await
    }

    async fn get_meta_inner(&self, r: pb::GetResourceRequest) -> ApiResult<pb::ResourceResponse> {
        use pb::get_resource_request::Key;
        enum K {
            Id(Id),
            Name(Kind, Id, String, u32),
        }
        let key = match r.key {
            Some(Key::Id(s)) => K::Id(id_field("id", &s)?),
            Some(Key::ByName(b)) => K::Name(
                kind_from_pb(b.kind)?,
                opt_id("parent_id", &b.parent_id)?,
                b.name,
                b.attempt,
            ),
            None => return Err(ApiError::Invalid("give an id or by_name".into())),
        };
        let (rec, applied) = self.read(r.read).await?.view(|v| match &key {
            K::Id(id) => query::get(v, id),
            K::Name(k, p, n, a) => query::get_by_name(v, *k, p, n, *a),
        })?;
        Ok(pb::ResourceResponse {
            resource: Some(record_to_pb(&rec?)),
            revision: applied,
        })
    }

    async fn update_inner(&self, r: pb::UpdateResourceRequest) -> ApiResult<pb::ResourceResponse> {
        let spec = match &r.spec {
            Some(s) => Some(spec_from_pb(s)?),
            None => None,
        };
        let op = MetaOp::Update {
            id: id_field("id", &r.id)?,
            expected_revision: r.expected_revision,
            name: r.name,
            tags: r.set_tags.then_some(r.tags),
            spec,
        };
        self.record_write(r.request_id, op).await
    }

    async fn delete_meta_inner(
        &self,
        r: pb::DeleteResourceRequest,
    ) -> ApiResult<pb::DeleteResourceResponse> {
        let op = MetaOp::Delete {
            id: id_field("id", &r.id)?,
            expected_revision: r.expected_revision,
        };
        match self.meta_write(r.request_id, op).await? {
            (MetaResponse::Deleted { removed }, revision) => {
                Ok(pb::DeleteResourceResponse { removed, revision })
            }
            (other, _) => Err(ApiError::Internal(format!(
                "unexpected meta response {other:?}"
            ))),
        }
    }

    async fn list_inner(
        &self,
        r: pb::ListResourcesRequest,
    ) -> ApiResult<pb::ListResourcesResponse> {
        let q = ListQuery {
            kind: Some(kind_from_pb(r.kind)?),
            parent: opt_id("parent_id", &r.parent_id)?,
            status: match r.status {
                0 => None,
                s => Some(status_from_pb(s)?),
            },
            pipeline: match r.pipeline_id.as_str() {
                "" => None,
                s => Some(id_field("pipeline_id", s)?),
            },
            owner: match r.owner_id.as_str() {
                "" => None,
                s => Some(id_field("owner_id", s)?),
            },
            tag: (!r.tag.is_empty()).then_some(r.tag),
            metadata: if r.metadata_key.is_empty() {
                None
            } else {
                Some((r.metadata_key, value_from_pb(r.metadata_value.as_ref())?))
            },
            stage: match r.stage {
                None => None,
                Some(s) => Some(stage_from_pb(s)?),
            },
            created_after_ms: (r.created_after_ms > 0).then_some(r.created_after_ms),
            created_before_ms: (r.created_before_ms > 0).then_some(r.created_before_ms),
            order: match r.order {
                0 => Order::Newest,
                1 => Order::Name,
                o => return Err(ApiError::Invalid(format!("unknown order {o}"))),
            },
            page_size: r.page_size as usize,
            page_token: r.page_token,
        };
        let reader = self.read(r.read).await?;
        let (page, applied) =
            tokio::task::spawn_blocking(move || reader.view(|v| query::list(v, &q)))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))??;
        let page = page?;
        Ok(pb::ListResourcesResponse {
            resources: page.records.iter().map(record_to_pb).collect(),
            next_page_token: page.next_page_token,
            total: page.total,
            total_exact: page.total_exact,
            applied_index: applied,
        })
    }

    async fn cache_key_inner(&self, r: pb::CacheKeyRequest) -> ApiResult<pb::ResourceResponse> {
        let project = id_field("project_id", &r.project_id)?;
        let (rec, applied) = self
            .read(r.read)
            .await?
            .view(|v| query::by_cache_key(v, &project, &r.cache_key))?;
        Ok(pb::ResourceResponse {
            resource: Some(record_to_pb(&rec?)),
            revision: applied,
        })
    }

    async fn purge_inner(&self, r: pb::PurgeRunsRequest) -> ApiResult<pb::PurgeRunsResponse> {
        let op = MetaOp::PurgeRuns {
            project: id_field("project_id", &r.project_id)?,
            before_ms: r.before_ms,
            limit: r.limit,
        };
        match self.meta_write(r.request_id, op).await? {
            (
                MetaResponse::Purged {
                    removed,
                    runs,
                    more,
                },
                revision,
            ) => Ok(pb::PurgeRunsResponse {
                runs,
                removed,
                more,
                revision,
            }),
            (other, _) => Err(ApiError::Internal(format!(
                "unexpected meta response {other:?}"
            ))),
        }
    }

    async fn create_key_inner(
        &self,
        r: pb::CreateApiKeyRequest,
    ) -> ApiResult<pb::CreateApiKeyResponse> {
        let user = id_field("service_account_id", &r.service_account_id)?;
        // The secret is made here and only its hash is replicated: apply never sees it.
        let secret = format!(
            "mrk_{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        );
        let hash = sha256(&secret);
        let op = MetaOp::AddApiKey {
            user,
            key_id: r.key_id.clone(),
            sha256: hash,
            grace_ms: r.grace_ms,
        };
        let request_id = r.request_id.clone();
        match self.meta_write(r.request_id, op).await? {
            (MetaResponse::Record(rec), revision) => {
                refuse_replayed_key(&rec, &r.key_id, &hash, &request_id)?;
                Ok(pb::CreateApiKeyResponse {
                    secret,
                    service_account: Some(record_to_pb(&rec)),
                    revision,
                })
            }
            (other, _) => Err(ApiError::Internal(format!(
                "unexpected meta response {other:?}"
            ))),
        }
    }

    async fn verify_key_inner(
        &self,
        r: pb::VerifyApiKeyRequest,
    ) -> ApiResult<pb::VerifyApiKeyResponse> {
        if r.secret.is_empty() || r.secret.len() > 256 {
            return Err(ApiError::Invalid("secret must be 1..256 bytes".into()));
        }
        let reader = self.read(r.read).await?;
        let h = sha256(&r.secret);
        let now = crate::metrics::now_unix_ms();
        let user = reader.view(|v| query::verify_api_key(v, &h, now))?.0?;
        Ok(pb::VerifyApiKeyResponse {
            valid: user.is_some(),
            service_account: user.as_ref().map(record_to_pb),
        })
    }

    async fn check_inner(
        &self,
        r: pb::CheckPermissionsRequest,
    ) -> ApiResult<pb::CheckPermissionsResponse> {
        let subject = id_field("subject_id", &r.subject_id)?;
        let action = action_field(&r.action)?;
        let rt = rt_field(&r.resource_type)?;
        if r.resource_ids.len() > MAX_CHECK_BATCH {
            return Err(ApiError::TooLarge(format!(
                "{} resources, limit {MAX_CHECK_BATCH}",
                r.resource_ids.len()
            )));
        }
        let ids: Vec<Id> = r
            .resource_ids
            .iter()
            .map(|s| id_field("resource_ids", s))
            .collect::<ApiResult<_>>()?;
        let (allowed, applied) = self.read(r.read).await?.with_rbac(|ix, v| {
            let mut out = Vec::with_capacity(ids.len());
            for id in &ids {
                out.push(
                    ix.check_at(v, v.applied, &subject, action, rt, id)
                        .map(|d| d.allowed())?,
                );
            }
            Ok::<_, fsm::FsmError>(out)
        })?;
        let allowed = allowed?;
        Ok(pb::CheckPermissionsResponse {
            allowed,
            applied_index: applied,
        })
    }

    async fn list_allowed_inner(
        &self,
        r: pb::ListAllowedRequest,
    ) -> ApiResult<pb::ListAllowedResponse> {
        let subject = id_field("subject_id", &r.subject_id)?;
        let action = action_field(&r.action)?;
        let rt = rt_field(&r.resource_type)?
            .ok_or_else(|| ApiError::Invalid("resource_type is required".into()))?;
        let scope = id_field("scope_id", &r.scope_id)?;
        let reader = self.read(r.read).await?;
        let barrier = reader.barrier();
        // The index lock is held only for the decision and the granted scopes: apply waits on
        // it, so the scan of owned resources runs after, on its own snapshot.
        let ((at_scope, active, granted), _) = reader.with_rbac(|ix, v| {
            (
                ix.check_at(v, v.applied, &subject, action, Some(rt), &scope),
                ix.user_active(&subject),
                ix.granted_scopes(&subject, rt, action),
            )
        })?;
        match active {
            None => {
                return Err(ApiError::Meta(
                    MetaErrorKind::NotFound,
                    format!("no user {}", fmt_id(&subject)),
                ))
            }
            // A deactivated user is allowed nothing, owned resources included.
            Some(false) => {
                return Ok(pb::ListAllowedResponse {
                    applied_index: barrier,
                    ..Default::default()
                })
            }
            Some(true) => {}
        }
        if matches!(at_scope?, Reason::Binding { .. }) {
            return Ok(pb::ListAllowedResponse {
                all: true,
                applied_index: barrier,
                ..Default::default()
            });
        }
        tokio::task::spawn_blocking(move || {
            let (resp, applied) = reader.view(|v| -> ApiResult<pb::ListAllowedResponse> {
                let mut resp = pb::ListAllowedResponse::default();
                if query::get(v, &scope).is_err() {
                    return Err(ApiError::Meta(
                        MetaErrorKind::NotFound,
                        format!("scope {} not found", fmt_id(&scope)),
                    ));
                }
                let mut ids = Vec::new();
                for s in granted {
                    let Ok(rec) = query::get(v, &s) else { continue };
                    if !rec.ancestors.contains(&scope) {
                        continue;
                    }
                    if rec.kind() as u8 == rt {
                        ids.push(s);
                    } else {
                        resp.scope_ids.push(fmt_id(&s));
                    }
                }
                if let Some(kind) = Kind::from_u8(rt) {
                    ids.extend(query::owned_in_scope(v, &subject, kind, &scope, 10_000)?);
                }
                ids.sort();
                ids.dedup();
                resp.ids = ids.iter().map(fmt_id).collect();
                Ok(resp)
            })?;
            Ok(pb::ListAllowedResponse {
                applied_index: applied,
                ..resp?
            })
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
    }

    async fn explain_inner(&self, r: pb::ExplainRequest) -> ApiResult<pb::ExplainResponse> {
        let subject = id_field("subject_id", &r.subject_id)?;
        let action = action_field(&r.action)?;
        let rt = rt_field(&r.resource_type)?;
        let target = id_field("resource_id", &r.resource_id)?;
        let (reason, applied) = self
            .read(r.read)
            .await?
            .with_rbac(|ix, v| ix.check_at(v, v.applied, &subject, action, rt, &target))?;
        let reason = reason?;
        let mut resp = pb::ExplainResponse {
            allowed: reason.allowed(),
            explanation: reason.describe(),
            applied_index: applied,
            ..Default::default()
        };
        match reason {
            Reason::Owner => resp.owner = true,
            Reason::Binding {
                binding,
                role,
                scope,
                team,
            } => {
                resp.binding_id = fmt_id(&binding);
                resp.role = role;
                resp.scope_id = fmt_id(&scope);
                resp.team_id = team.map(|t| fmt_id(&t)).unwrap_or_default();
            }
            Reason::Denied(_) => {}
        }
        Ok(resp)
    }
}

#[tonic::async_trait]
impl Metadata for Api {
    async fn create(
        &self,
        req: Request<pb::CreateResourceRequest>,
    ) -> Result<Response<pb::ResourceResponse>, Status> {
        rpc!(self, "MetaCreate", self.create_inner(req.into_inner()))
    }
    async fn get(
        &self,
        req: Request<pb::GetResourceRequest>,
    ) -> Result<Response<pb::ResourceResponse>, Status> {
        rpc!(self, "MetaGet", self.get_meta_inner(req.into_inner()))
    }
    async fn update(
        &self,
        req: Request<pb::UpdateResourceRequest>,
    ) -> Result<Response<pb::ResourceResponse>, Status> {
        rpc!(self, "MetaUpdate", self.update_inner(req.into_inner()))
    }
    async fn delete(
        &self,
        req: Request<pb::DeleteResourceRequest>,
    ) -> Result<Response<pb::DeleteResourceResponse>, Status> {
        rpc!(self, "MetaDelete", self.delete_meta_inner(req.into_inner()))
    }
    async fn list(
        &self,
        req: Request<pb::ListResourcesRequest>,
    ) -> Result<Response<pb::ListResourcesResponse>, Status> {
        rpc!(self, "MetaList", self.list_inner(req.into_inner()))
    }
    async fn set_step_status(
        &self,
        req: Request<pb::SetStatusRequest>,
    ) -> Result<Response<pb::ResourceResponse>, Status> {
        let r = req.into_inner();
        rpc!(self, "SetStepStatus", async {
            let op = MetaOp::SetStepStatus {
                id: id_field("id", &r.id)?,
                status: status_from_pb(r.status)?,
                resume: r.resume,
            };
            self.record_write(r.request_id, op).await
        })
    }
    async fn set_run_status(
        &self,
        req: Request<pb::SetStatusRequest>,
    ) -> Result<Response<pb::ResourceResponse>, Status> {
        let r = req.into_inner();
        rpc!(self, "SetRunStatus", async {
            let op = MetaOp::SetRunStatus {
                id: id_field("id", &r.id)?,
                status: status_from_pb(r.status)?,
                resume: r.resume,
            };
            self.record_write(r.request_id, op).await
        })
    }
    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::ResourceResponse>, Status> {
        let r = req.into_inner();
        rpc!(self, "Heartbeat", async {
            let op = MetaOp::Heartbeat {
                id: id_field("id", &r.id)?,
            };
            self.record_write(r.request_id, op).await
        })
    }
    async fn promote_model_version(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::ResourceResponse>, Status> {
        let r = req.into_inner();
        rpc!(self, "PromoteModelVersion", async {
            let op = MetaOp::Promote {
                id: id_field("model_version_id", &r.model_version_id)?,
                stage: stage_from_pb(r.stage)?,
                archive_existing: r.archive_existing,
            };
            self.record_write(r.request_id, op).await
        })
    }
    async fn purge_runs(
        &self,
        req: Request<pb::PurgeRunsRequest>,
    ) -> Result<Response<pb::PurgeRunsResponse>, Status> {
        rpc!(self, "PurgeRuns", self.purge_inner(req.into_inner()))
    }
    async fn find_step_by_cache_key(
        &self,
        req: Request<pb::CacheKeyRequest>,
    ) -> Result<Response<pb::ResourceResponse>, Status> {
        rpc!(
            self,
            "FindStepByCacheKey",
            self.cache_key_inner(req.into_inner())
        )
    }
}

#[tonic::async_trait]
impl Identity for Api {
    async fn create_api_key(
        &self,
        req: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        rpc!(
            self,
            "CreateApiKey",
            self.create_key_inner(req.into_inner())
        )
    }
    async fn revoke_api_key(
        &self,
        req: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ResourceResponse>, Status> {
        let r = req.into_inner();
        rpc!(self, "RevokeApiKey", async {
            let op = MetaOp::RevokeApiKey {
                user: id_field("service_account_id", &r.service_account_id)?,
                key_id: r.key_id,
            };
            self.record_write(r.request_id, op).await
        })
    }
    async fn verify_api_key(
        &self,
        req: Request<pb::VerifyApiKeyRequest>,
    ) -> Result<Response<pb::VerifyApiKeyResponse>, Status> {
        rpc!(
            self,
            "VerifyApiKey",
            self.verify_key_inner(req.into_inner())
        )
    }
}

#[tonic::async_trait]
impl Rbac for Api {
    async fn check_permissions(
        &self,
        req: Request<pb::CheckPermissionsRequest>,
    ) -> Result<Response<pb::CheckPermissionsResponse>, Status> {
        rpc!(self, "CheckPermissions", self.check_inner(req.into_inner()))
    }
    async fn list_allowed(
        &self,
        req: Request<pb::ListAllowedRequest>,
    ) -> Result<Response<pb::ListAllowedResponse>, Status> {
        rpc!(
            self,
            "ListAllowed",
            self.list_allowed_inner(req.into_inner())
        )
    }
    async fn explain(
        &self,
        req: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        rpc!(self, "Explain", self.explain_inner(req.into_inner()))
    }
}
