//! Read queries over metadata: get by id or name, list with filters and keyset pagination.
//!
//! Every list walks one secondary index from a key, so a deep page costs what page 1 costs. The
//! page token is the last index key returned, with a checksum of the query it belongs to, so a
//! token is refused when reused with another query. Totals are the index's incremental count.

use super::apply::{index_ids, load_record, read_count};
use super::index::{self, sort_key};
use super::{fmt_id, Id, Kind, MetaValue, Record, RunStatus, Spec, Stage, NIL};
use crate::fsm::{FsmError, StateRead};
use crate::keys;

pub const MAX_PAGE_SIZE: usize = 1000;
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Index entries one list call may examine when it has to filter (more filters than one index
/// covers): a page may come back short with a token to continue.
pub const SCAN_BUDGET: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Fsm(#[from] FsmError),
}

pub fn get(state: &dyn StateRead, id: &Id) -> Result<Record, QueryError> {
    load_record(state, id)?.ok_or_else(|| QueryError::NotFound(format!("{} not found", fmt_id(id))))
}

/// By unique name under a parent (step runs: `name` and `attempt`).
pub fn get_by_name(
    state: &dyn StateRead,
    kind: Kind,
    parent: &Id,
    name: &str,
    attempt: u32,
) -> Result<Record, QueryError> {
    let mut uname = name.as_bytes().to_vec();
    if kind == Kind::StepRun {
        uname.push(0);
        uname.extend_from_slice(&attempt.to_be_bytes());
    }
    let nk = keys::meta_name(kind as u8, parent, &uname);
    let not_found = || {
        QueryError::NotFound(format!(
            "no {} named {name:?} in {}",
            kind.name(),
            fmt_id(parent)
        ))
    };
    let Some(raw) = state.get_raw(&nk)? else {
        return Err(not_found());
    };
    let id: Id = raw.as_slice().try_into().map_err(|_| FsmError::Corrupt {
        key: nk.clone(),
        reason: "name index value is not an id".into(),
    })?;
    load_record(state, &id)?.ok_or_else(not_found)
}

/// The latest step run in a project with this cache key.
pub fn by_cache_key(state: &dyn StateRead, project: &Id, key: &str) -> Result<Record, QueryError> {
    let ck = keys::meta_cache(project, key);
    let nf = || QueryError::NotFound("no step run with that cache key".into());
    let Some(raw) = state.get_raw(&ck)? else {
        return Err(nf());
    };
    let id: Id = raw.as_slice().try_into().map_err(|_| FsmError::Corrupt {
        key: ck.clone(),
        reason: "cache index value is not an id".into(),
    })?;
    load_record(state, &id)?.ok_or_else(nf)
}

/// The service account an API key (its SHA-256) belongs to, if the key is live at `now_ms`.
pub fn verify_api_key(
    state: &dyn StateRead,
    sha256: &[u8; 32],
    now_ms: u64,
) -> Result<Option<Record>, FsmError> {
    let Some(raw) = state.get_raw(&keys::meta_api_key(sha256))? else {
        return Ok(None);
    };
    let Ok(id) = <Id>::try_from(raw.as_slice()) else {
        return Ok(None);
    };
    let Some(user) = load_record(state, &id)? else {
        return Ok(None);
    };
    let live = match &user.spec {
        Spec::User {
            active: true,
            api_keys,
            ..
        } => api_keys
            .iter()
            .any(|k| k.sha256 == *sha256 && (k.expires_ms == 0 || k.expires_ms > now_ms)),
        _ => false,
    };
    Ok(live.then_some(user))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    #[default]
    Newest,
    Name,
}

/// A list query: children of `parent` of one kind, optionally filtered.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub kind: Option<Kind>,
    pub parent: Id,
    pub status: Option<RunStatus>,
    pub pipeline: Option<Id>,
    pub owner: Option<Id>,
    pub tag: Option<String>,
    pub metadata: Option<(String, MetaValue)>,
    pub stage: Option<Stage>,
    /// Created at or after (ms).
    pub created_after_ms: Option<u64>,
    /// Created before (ms).
    pub created_before_ms: Option<u64>,
    pub order: Order,
    pub page_size: usize,
    pub page_token: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListPage {
    pub records: Vec<Record>,
    pub next_page_token: String,
    /// Entries of the index the query walked (exact when `total_exact`).
    pub total: u64,
    /// False when filters beyond the walked index or a time range apply.
    pub total_exact: bool,
}

/// Which index a query walks, and what must still be filtered.
struct Plan {
    prefix: Vec<u8>,
    residual: bool,
}

fn plan(q: &ListQuery, kind: Kind) -> Result<Plan, QueryError> {
    let k = [kind as u8];
    let run = kind == Kind::PipelineRun;
    if (q.status.is_some() || q.pipeline.is_some() || q.metadata.is_some()) && !run {
        return Err(QueryError::Invalid(
            "status, pipeline and metadata filters apply to pipeline runs".into(),
        ));
    }
    if q.stage.is_some() && kind != Kind::ModelVersion {
        return Err(QueryError::Invalid(
            "the stage filter applies to model versions".into(),
        ));
    }
    let mut filters = 0;
    for on in [
        q.status.is_some(),
        q.pipeline.is_some(),
        q.owner.is_some(),
        q.tag.is_some(),
        q.metadata.is_some(),
        q.stage.is_some(),
    ] {
        filters += on as usize;
    }
    let p = &q.parent;
    let (prefix, covered) = if let (Some(pl), Some(st)) = (q.pipeline, q.status) {
        (
            keys::meta_index_prefix(index::IX_PIPELINE_STATUS, &[&pl[..], &[st as u8]].concat()),
            2,
        )
    } else if let Some((key, value)) = &q.metadata {
        (
            keys::meta_index_prefix(
                index::IX_RUN_META,
                &index::run_meta_scope(p, key, &value.canonical()),
            ),
            1,
        )
    } else if let Some(pl) = q.pipeline {
        (keys::meta_index_prefix(index::IX_PIPELINE, &pl), 1)
    } else if let Some(st) = q.status {
        (
            keys::meta_index_prefix(index::IX_STATUS, &[&p[..], &k, &[st as u8]].concat()),
            1,
        )
    } else if let Some(stage) = q.stage {
        (
            keys::meta_index_prefix(index::IX_STAGE, &[&p[..], &[stage as u8]].concat()),
            1,
        )
    } else if let Some(o) = q.owner {
        (
            keys::meta_index_prefix(index::IX_OWNER, &[&p[..], &k, &o].concat()),
            1,
        )
    } else if let Some(t) = &q.tag {
        (
            keys::meta_index_prefix(index::IX_TAG, &[&p[..], &k, t.as_bytes(), &[0]].concat()),
            1,
        )
    } else {
        (
            keys::meta_index_prefix(index::IX_CHILDREN, &[&p[..], &k].concat()),
            0,
        )
    };
    Ok(Plan {
        prefix,
        residual: filters > covered,
    })
}

fn matches(q: &ListQuery, r: &Record) -> bool {
    if let Some(st) = q.status {
        if !matches!(&r.spec, Spec::PipelineRun { status, .. } if *status == st) {
            return false;
        }
    }
    if let Some(pl) = q.pipeline {
        if !matches!(&r.spec, Spec::PipelineRun { pipeline, .. } if *pipeline == pl) {
            return false;
        }
    }
    if let Some(o) = q.owner {
        if r.owner != o {
            return false;
        }
    }
    if let Some(t) = &q.tag {
        if !r.tags.contains(t) {
            return false;
        }
    }
    if let Some(stage) = q.stage {
        if !matches!(&r.spec, Spec::ModelVersion { stage: s, .. } if *s == stage) {
            return false;
        }
    }
    if r.parent != q.parent {
        return false;
    }
    true
}

fn token_check(prefix: &[u8], q: &ListQuery) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(prefix);
    h.update(&[q.order as u8]);
    h.update(&q.created_after_ms.unwrap_or(0).to_be_bytes());
    h.update(&q.created_before_ms.unwrap_or(u64::MAX).to_be_bytes());
    h.finalize()
}

fn encode_token(check: u32, last_key_tail: &[u8]) -> String {
    let mut b = check.to_be_bytes().to_vec();
    b.extend_from_slice(last_key_tail);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn decode_token(tok: &str, check: u32) -> Result<Vec<u8>, QueryError> {
    let bad = || QueryError::Invalid("malformed or foreign page token".into());
    if !tok.len().is_multiple_of(2) || tok.len() < 8 || tok.len() > 2048 {
        return Err(bad());
    }
    let bytes: Result<Vec<u8>, _> = (0..tok.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(tok.get(i..i + 2).unwrap_or("zz"), 16))
        .collect();
    let bytes = bytes.map_err(|_| bad())?;
    if bytes[..4] != check.to_be_bytes() {
        return Err(bad());
    }
    Ok(bytes[4..].to_vec())
}

/// The page size asked for (0: the default), refused past the maximum; a time range must not
/// be empty.
fn page_size(q: &ListQuery) -> Result<usize, QueryError> {
    let size = match q.page_size {
        0 => DEFAULT_PAGE_SIZE,
        n if n > MAX_PAGE_SIZE => {
            return Err(QueryError::Invalid(format!(
                "page_size {n} exceeds {MAX_PAGE_SIZE}"
            )))
        }
        n => n,
    };
    if let (Some(a), Some(b)) = (q.created_after_ms, q.created_before_ms) {
        if a >= b {
            return Err(QueryError::Invalid("empty time range".into()));
        }
    }
    Ok(size)
}

/// The index keys a newest-first page scans: a time range is a contiguous key range, and a page
/// token starts strictly after the last key of the previous page.
fn newest_first_range(
    q: &ListQuery,
    prefix: &[u8],
    check: u32,
) -> Result<(Vec<u8>, Vec<u8>), QueryError> {
    let lo = match q.created_before_ms {
        Some(b) => keys::meta_index(prefix, sort_key(b).saturating_add(1), 0, &NIL),
        None => prefix.to_vec(),
    };
    let hi = match q.created_after_ms {
        Some(a) => keys::meta_index(prefix, sort_key(a), u64::MAX, &[0xff; 16]),
        None => keys::prefix_end(prefix).unwrap_or_else(|| vec![0xff; 64]),
    };
    let mut start = lo;
    if !q.page_token.is_empty() {
        let tail = decode_token(&q.page_token, check)?;
        let mut k = prefix.to_vec();
        k.extend_from_slice(&tail);
        k.push(0); // strictly after
        if k > start {
            start = k;
        }
    }
    Ok((start, hi))
}

/// Lists one page.
pub fn list(state: &dyn StateRead, q: &ListQuery) -> Result<ListPage, QueryError> {
    let kind = q
        .kind
        .ok_or_else(|| QueryError::Invalid("list needs a kind".into()))?;
    let size = page_size(q)?;
    if q.order == Order::Name {
        return list_by_name(state, q, kind, size);
    }
    let plan = plan(q, kind)?;
    let check = token_check(&plan.prefix, q);
    let (mut start, hi) = newest_first_range(q, &plan.prefix, check)?;
    let total = read_count(state, &keys::meta_count(&plan.prefix))?;
    let mut records = Vec::with_capacity(size);
    let mut examined = 0usize;
    let mut last_key: Option<Vec<u8>> = None;
    let mut exhausted = false;
    while records.len() < size {
        if start >= hi {
            exhausted = true;
            break;
        }
        let want = if plan.residual {
            256
        } else {
            size - records.len() + 1
        };
        let rows = state.scan(&start, &hi, want)?;
        if rows.is_empty() {
            exhausted = true;
            break;
        }
        let n = rows.len();
        for (k, _) in rows {
            if records.len() == size {
                break;
            }
            examined += 1;
            let id: Id = match k.get(k.len().saturating_sub(16)..).map(<Id>::try_from) {
                Some(Ok(id)) => id,
                _ => continue,
            };
            last_key = Some(k.clone());
            start = k;
            start.push(0);
            if let Some(r) = load_record(state, &id)? {
                if !plan.residual || matches_run(q, &r) {
                    records.push(r);
                }
            }
        }
        if n < want && records.len() < size {
            exhausted = true;
            break;
        }
        if plan.residual && examined >= SCAN_BUDGET {
            break;
        }
    }
    // More may follow unless the range ran out; peek one entry to avoid an empty last page.
    let more = !exhausted
        && match &last_key {
            Some(_) => !state.scan(&start, &hi, 1)?.is_empty(),
            None => false,
        };
    let next_page_token = match (&last_key, more) {
        (Some(k), true) => encode_token(check, &k[plan.prefix.len()..]),
        _ => String::new(),
    };
    Ok(ListPage {
        records,
        next_page_token,
        total,
        total_exact: !plan.residual
            && q.created_after_ms.is_none()
            && q.created_before_ms.is_none(),
    })
}

fn matches_run(q: &ListQuery, r: &Record) -> bool {
    // Metadata filters were covered by the index (it lists the run); the rest are checked here.
    let mut q2 = q.clone();
    q2.metadata = None;
    matches(&q2, r)
}

fn list_by_name(
    state: &dyn StateRead,
    q: &ListQuery,
    kind: Kind,
    size: usize,
) -> Result<ListPage, QueryError> {
    if q.status.is_some()
        || q.pipeline.is_some()
        || q.owner.is_some()
        || q.tag.is_some()
        || q.metadata.is_some()
        || q.stage.is_some()
        || q.created_after_ms.is_some()
        || q.created_before_ms.is_some()
    {
        return Err(QueryError::Invalid(
            "filters need newest-first order (order by name lists everything)".into(),
        ));
    }
    let prefix = keys::meta_name(kind as u8, &q.parent, b"");
    let check = token_check(&prefix, q);
    let end = keys::prefix_end(&prefix).unwrap_or_else(|| vec![0xff; 64]);
    let mut start = prefix.clone();
    if !q.page_token.is_empty() {
        let tail = decode_token(&q.page_token, check)?;
        start.extend_from_slice(&tail);
        start.push(0);
    }
    let rows = state.scan(&start, &end, size + 1)?;
    let more = rows.len() > size;
    let mut records = Vec::new();
    let mut last = None;
    for (k, v) in rows.into_iter().take(size) {
        let Ok(id) = <Id>::try_from(v.as_slice()) else {
            continue;
        };
        if let Some(r) = load_record(state, &id)? {
            records.push(r);
        }
        last = Some(k);
    }
    let next_page_token = match (last, more) {
        (Some(k), true) => encode_token(check, &k[prefix.len()..]),
        _ => String::new(),
    };
    let children =
        keys::meta_index_prefix(index::IX_CHILDREN, &[&q.parent[..], &[kind as u8]].concat());
    Ok(ListPage {
        records,
        next_page_token,
        total: read_count(state, &keys::meta_count(&children))?,
        total_exact: true,
    })
}

/// The ids of `kind` the subject owns under `scope` (for ListAllowed), at most `limit`.
pub fn owned_in_scope(
    state: &dyn StateRead,
    owner: &Id,
    kind: Kind,
    scope: &Id,
    limit: usize,
) -> Result<Vec<Id>, FsmError> {
    let prefix = keys::meta_index_prefix(index::IX_OWNED, &[&owner[..], &[kind as u8]].concat());
    let mut out = Vec::new();
    for id in index_ids(state, &prefix, usize::MAX)? {
        if out.len() >= limit {
            break;
        }
        if let Some(r) = load_record(state, &id)? {
            if r.id == *scope || r.ancestors.contains(scope) {
                out.push(id);
            }
        }
    }
    Ok(out)
}
