//! The metadata domain: organizations, workspaces, projects, users and service accounts, teams,
//! roles and bindings, pipelines, runs and steps, artifacts and models with their versions, run
//! metadata and tags (see docs/metadata.md).
//!
//! Every entity is one [`Record`] row with a typed [`Spec`]. A [`MetaOp`] is one Raft command and
//! is applied atomically by [`apply::apply_meta`]: uniqueness, references, cascades, derived
//! fields (run status, run counts, version numbers) and status transitions are all decided there,
//! from replicated state, never by read-then-write in the API layer. Secondary indexes
//! ([`index`]) and their counts are written in the same batch as the row. Queries
//! ([`query`]) and permission checks ([`rbac`]) are pure functions over a [`super::StateRead`].

pub mod apply;
pub mod index;
pub mod query;
pub mod rbac;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

/// Format of stored records and meta commands. A record or command with a newer format is a
/// clear error, never guessed at (docs/upgrades.md).
pub const META_FORMAT_VERSION: u8 = 1;

/// Limits enforced inside apply (so every replica agrees) and by the API before proposing.
pub const MAX_NAME_BYTES: usize = 256;
pub const MAX_TEXT_BYTES: usize = 4096;
pub const MAX_TAGS: usize = 64;
pub const MAX_TEAM_MEMBERS: usize = 10_000;
pub const MAX_PERMISSIONS: usize = 256;
/// Steps, metadata and versions removed with their parent in one command; a bigger cascade is
/// refused (delete the children in pages first, or purge).
pub const MAX_CASCADE: usize = 20_000;
/// Longest chain of parent runs (a cycle is impossible by construction: parents exist first).
pub const MAX_RUN_DEPTH: usize = 64;

/// A 16-byte UUID.
pub type Id = [u8; 16];

pub const NIL: Id = [0; 16];

/// Formats an id as a UUID string.
pub fn fmt_id(id: &Id) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Parses a UUID string (hyphenated or 32 hex digits).
pub fn parse_id(s: &str) -> Result<Id, String> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let ok_shape = s.len() == 32
        || (s.len() == 36 && [8, 13, 18, 23].iter().all(|&i| s.as_bytes()[i] == b'-'));
    if !ok_shape || hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("malformed id {s:?}: expected a UUID"));
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(id)
}

/// Entity kinds. The byte values are stored in keys: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum Kind {
    Organization = 1,
    Workspace = 2,
    Project = 3,
    User = 4,
    Team = 5,
    Role = 6,
    RoleBinding = 7,
    Pipeline = 8,
    PipelineRun = 9,
    StepRun = 10,
    Artifact = 11,
    ArtifactVersion = 12,
    Model = 13,
    ModelVersion = 14,
    RunMetadata = 15,
}

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::Organization,
        Kind::Workspace,
        Kind::Project,
        Kind::User,
        Kind::Team,
        Kind::Role,
        Kind::RoleBinding,
        Kind::Pipeline,
        Kind::PipelineRun,
        Kind::StepRun,
        Kind::Artifact,
        Kind::ArtifactVersion,
        Kind::Model,
        Kind::ModelVersion,
        Kind::RunMetadata,
    ];

    pub fn from_u8(b: u8) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| *k as u8 == b)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Organization => "organization",
            Kind::Workspace => "workspace",
            Kind::Project => "project",
            Kind::User => "user",
            Kind::Team => "team",
            Kind::Role => "role",
            Kind::RoleBinding => "role_binding",
            Kind::Pipeline => "pipeline",
            Kind::PipelineRun => "pipeline_run",
            Kind::StepRun => "step_run",
            Kind::Artifact => "artifact",
            Kind::ArtifactVersion => "artifact_version",
            Kind::Model => "model",
            Kind::ModelVersion => "model_version",
            Kind::RunMetadata => "run_metadata",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.name() == s)
    }

    /// The kinds a record of this kind may be created under (`None` = top level).
    pub fn parent_kinds(self) -> &'static [Kind] {
        match self {
            Kind::Organization => &[],
            Kind::Workspace | Kind::User | Kind::Team | Kind::Role | Kind::RoleBinding => {
                &[Kind::Organization]
            }
            Kind::Project => &[Kind::Workspace],
            Kind::Pipeline | Kind::PipelineRun | Kind::Artifact | Kind::Model => &[Kind::Project],
            Kind::StepRun => &[Kind::PipelineRun],
            Kind::ArtifactVersion => &[Kind::Artifact],
            Kind::ModelVersion => &[Kind::Model],
            Kind::RunMetadata => &[
                Kind::PipelineRun,
                Kind::StepRun,
                Kind::ArtifactVersion,
                Kind::ModelVersion,
            ],
        }
    }
}

/// Run and step status. Stored as a byte in index keys: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum RunStatus {
    Initializing = 1,
    Running = 2,
    Retrying = 3,
    Completed = 4,
    Failed = 5,
    Stopped = 6,
    Cached = 7,
    Skipped = 8,
}

impl RunStatus {
    pub const ALL: [RunStatus; 8] = [
        RunStatus::Initializing,
        RunStatus::Running,
        RunStatus::Retrying,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Stopped,
        RunStatus::Cached,
        RunStatus::Skipped,
    ];

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunStatus::Completed
                | RunStatus::Failed
                | RunStatus::Stopped
                | RunStatus::Cached
                | RunStatus::Skipped
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Initializing => "initializing",
            RunStatus::Running => "running",
            RunStatus::Retrying => "retrying",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Stopped => "stopped",
            RunStatus::Cached => "cached",
            RunStatus::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        RunStatus::ALL.iter().copied().find(|k| k.name() == s)
    }

    /// Whether `self -> to` is allowed. A finished status never changes except by an explicit
    /// resume (which the caller checks), and nothing goes back to initializing.
    pub fn can_move_to(self, to: RunStatus) -> bool {
        if self.is_finished() {
            return false;
        }
        if self == to {
            return true;
        }
        !matches!(to, RunStatus::Initializing)
    }
}

/// Model version stages. Staging and production hold at most one version each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum Stage {
    None = 0,
    Staging = 1,
    Production = 2,
    Archived = 3,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::None,
        Stage::Staging,
        Stage::Production,
        Stage::Archived,
    ];
    pub fn exclusive(self) -> bool {
        matches!(self, Stage::Staging | Stage::Production)
    }
    pub fn name(self) -> &'static str {
        match self {
            Stage::None => "none",
            Stage::Staging => "staging",
            Stage::Production => "production",
            Stage::Archived => "archived",
        }
    }
    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.iter().copied().find(|k| k.name() == s)
    }
}

/// A typed run-metadata value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaValue {
    Str(String),
    Int(i64),
    /// Stored as its bits so records stay `Eq`-comparable and hash deterministically.
    Float(u64),
    Bool(bool),
}

impl MetaValue {
    /// The bytes an equality filter matches on (type tag + value).
    pub fn canonical(&self) -> Vec<u8> {
        match self {
            MetaValue::Str(s) => [b"s".as_slice(), s.as_bytes()].concat(),
            MetaValue::Int(i) => [b"i".as_slice(), &i.to_be_bytes()].concat(),
            MetaValue::Float(f) => [b"f".as_slice(), &f.to_be_bytes()].concat(),
            MetaValue::Bool(b) => vec![b'b', *b as u8],
        }
    }
    pub fn byte_len(&self) -> usize {
        match self {
            MetaValue::Str(s) => s.len(),
            _ => 8,
        }
    }
}

/// A hashed API key of a service account. The secret itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub key_id: String,
    pub sha256: [u8; 32],
    pub created_ms: u64,
    /// 0 = no expiry; set to now + grace when the key is rotated out.
    pub expires_ms: u64,
}

/// A permission: (resource type, action); [`rbac::ANY`] matches every type or action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Permission {
    pub resource: u8,
    pub action: u8,
}

/// Per-kind fields. Fields marked "derived" are maintained by apply and ignored on update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Spec {
    Organization {
        display_name: String,
    },
    Workspace {
        display_name: String,
    },
    Project {
        display_name: String,
        description: String,
    },
    User {
        email: String,
        external_id: String,
        active: bool,
        service_account: bool,
        /// Derived (managed by AddApiKey / RevokeApiKey).
        api_keys: Vec<ApiKey>,
    },
    Team {
        members: Vec<Id>,
    },
    Role {
        permissions: Vec<Permission>,
        /// Derived: built-in roles are created with their organization and are read-only.
        builtin: bool,
    },
    RoleBinding {
        subject: Id,
        role: Id,
        scope: Id,
    },
    Pipeline {
        description: String,
        /// Derived.
        run_count: u64,
    },
    PipelineRun {
        pipeline: Id,
        orchestrator_run_id: String,
        parent_run: Id,
        /// Derived from the steps (and SetRunStatus).
        status: RunStatus,
        /// Derived.
        start_ms: u64,
        /// Derived.
        end_ms: u64,
        /// Derived: per-status step counts, indexed by `RunStatus as usize`.
        step_counts: [u32; 9],
        /// Derived: the run's number within its pipeline (1, 2, ...).
        index: u64,
    },
    StepRun {
        attempt: u32,
        cache_key: String,
        /// Derived.
        status: RunStatus,
        /// Derived.
        heartbeat_ms: u64,
        /// Derived.
        start_ms: u64,
        /// Derived.
        end_ms: u64,
    },
    Artifact {
        artifact_type: String,
        /// Derived: the highest version number handed out.
        latest_version: u64,
    },
    ArtifactVersion {
        uri: String,
        content_hash: String,
        run: Id,
        /// Derived: gap-free per artifact.
        number: u64,
    },
    Model {
        description: String,
        /// Derived.
        latest_version: u64,
    },
    ModelVersion {
        artifact_version: Id,
        run: Id,
        /// Derived.
        number: u64,
        /// Derived (PromoteModelVersion).
        stage: Stage,
    },
    RunMetadata {
        value: MetaValue,
    },
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Organization { .. } => Kind::Organization,
            Spec::Workspace { .. } => Kind::Workspace,
            Spec::Project { .. } => Kind::Project,
            Spec::User { .. } => Kind::User,
            Spec::Team { .. } => Kind::Team,
            Spec::Role { .. } => Kind::Role,
            Spec::RoleBinding { .. } => Kind::RoleBinding,
            Spec::Pipeline { .. } => Kind::Pipeline,
            Spec::PipelineRun { .. } => Kind::PipelineRun,
            Spec::StepRun { .. } => Kind::StepRun,
            Spec::Artifact { .. } => Kind::Artifact,
            Spec::ArtifactVersion { .. } => Kind::ArtifactVersion,
            Spec::Model { .. } => Kind::Model,
            Spec::ModelVersion { .. } => Kind::ModelVersion,
            Spec::RunMetadata { .. } => Kind::RunMetadata,
        }
    }
}

/// One entity row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub format: u8,
    pub id: Id,
    pub parent: Id,
    /// The chain of containers above the parent, root first, parent last (empty for an org).
    pub ancestors: Vec<Id>,
    pub name: String,
    pub owner: Id,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub tags: Vec<String>,
    pub spec: Spec,
}

impl Record {
    pub fn kind(&self) -> Kind {
        self.spec.kind()
    }

    /// The project this record lives in (NIL above project level).
    pub fn project(&self) -> Id {
        self.ancestors.get(2).copied().unwrap_or(NIL)
    }

    /// The organization (its own id for an organization).
    pub fn org(&self) -> Id {
        if self.kind() == Kind::Organization {
            self.id
        } else {
            self.ancestors.first().copied().unwrap_or(NIL)
        }
    }

    /// The bytes that make (kind, parent, uname) unique.
    pub fn unique_name(&self) -> Vec<u8> {
        match &self.spec {
            Spec::StepRun { attempt, .. } => {
                let mut v = self.name.as_bytes().to_vec();
                v.push(0);
                v.extend_from_slice(&attempt.to_be_bytes());
                v
            }
            _ => self.name.as_bytes().to_vec(),
        }
    }
}

/// A metadata command: applied as one Raft entry, atomically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaOp {
    /// Creates a record. Derived fields of `spec` are ignored. Creating an organization also
    /// creates its built-in roles (admin, developer, viewer).
    Create {
        id: Id,
        parent: Id,
        name: String,
        owner: Id,
        tags: Vec<String>,
        spec: Spec,
    },
    /// Replaces the editable fields of a record (name, tags, non-derived spec fields).
    Update {
        id: Id,
        expected_revision: Option<u64>,
        name: Option<String>,
        tags: Option<Vec<String>>,
        spec: Option<Spec>,
    },
    /// Deletes a record with its dependents (steps, metadata, versions, bindings of a role...).
    /// Containers (organization, workspace, project, pipeline with runs) must be empty first.
    Delete {
        id: Id,
        expected_revision: Option<u64>,
    },
    /// Moves a step run to a new status; the run's status follows.
    SetStepStatus {
        id: Id,
        status: RunStatus,
        resume: bool,
    },
    /// Sets a run's status directly (e.g. stopped by a user, or resumed).
    SetRunStatus {
        id: Id,
        status: RunStatus,
        resume: bool,
    },
    /// A running step's heartbeat.
    Heartbeat {
        id: Id,
    },
    /// Moves a model version to a stage; the version holding an exclusive stage is archived when
    /// `archive_existing`, otherwise the promotion is refused.
    Promote {
        id: Id,
        stage: Stage,
        archive_existing: bool,
    },
    /// Adds an API key to a service account; its other live keys expire after `grace_ms`.
    AddApiKey {
        user: Id,
        key_id: String,
        sha256: [u8; 32],
        grace_ms: u64,
    },
    RevokeApiKey {
        user: Id,
        key_id: String,
    },
    /// Deletes up to `limit` runs of a project created before `before_ms`, with their steps and
    /// metadata (oldest first). The response says whether more remain.
    PurgeRuns {
        project: Id,
        before_ms: u64,
        limit: u32,
    },
}

/// What a domain rule refused; deterministic, so it is a response (and deduplicated), not a
/// failure of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaErrorKind {
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Invalid,
    RevisionMismatch,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaResponse {
    Record(Box<Record>),
    Deleted {
        removed: u64,
    },
    Purged {
        removed: u64,
        runs: u64,
        more: bool,
    },
    Error {
        kind: MetaErrorKind,
        message: String,
    },
}
