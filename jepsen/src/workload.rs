//! Client operations of each workload. Every operation is recorded as an invocation before it is
//! sent and as ok / fail / info when it ends. Writes end in `info` (unknown) on any error that
//! does not prove the write was not applied; reads that error end in `fail` (a read changes
//! nothing).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metaraft::client::new_request_id;
use metaraft::pb;
use metaraft::pb::kv_client::KvClient;
use metaraft::pb::metadata_client::MetadataClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use tonic::Code;

use crate::checker::Workload;
use crate::history::{Event, Kind, F};

/// Appends events to the in-memory history and to the history file as they happen, so a run
/// that dies midway still leaves what it saw.
pub struct Recorder {
    pub t0: Instant,
    events: Mutex<(Vec<Event>, Option<std::io::BufWriter<std::fs::File>>)>,
}

impl Recorder {
    pub fn new(t0: Instant, file: Option<std::fs::File>) -> Recorder {
        Recorder {
            t0,
            events: Mutex::new((Vec::new(), file.map(std::io::BufWriter::new))),
        }
    }
    pub fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
    pub fn record(&self, mut e: Event) -> Event {
        e.time_ns = self.now_ns();
        let mut g = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = g.1.as_mut() {
            // A failed history write is reported at flush; the in-memory copy stays complete.
            let _ = serde_json::to_writer(&mut *w, &e);
            let _ = w.write_all(b"\n");
        }
        g.0.push(e.clone());
        e
    }
    pub fn finish(&self) -> std::io::Result<Vec<Event>> {
        let mut g = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = g.1.as_mut() {
            w.flush()?;
        }
        Ok(g.0.clone())
    }
}

pub struct ClientCfg {
    pub workload: Workload,
    pub clients: u64,
    /// Pause between one client's operations.
    pub delay: Duration,
    pub op_timeout: Duration,
    pub seed: u64,
    pub keys: u64,
    /// Versions workload: the artifact every client adds versions to.
    pub artifact: String,
}

/// What a write's error says about whether it took effect.
fn write_outcome(code: Code) -> Kind {
    match code {
        // Refused by validation before it was proposed.
        Code::InvalidArgument | Code::ResourceExhausted => Kind::Fail,
        _ => Kind::Info,
    }
}

fn parse_value(kv: &pb::KeyValue) -> Option<i64> {
    std::str::from_utf8(&kv.value).ok()?.parse().ok()
}

fn read_opts(c: pb::Consistency, min_revision: u64) -> Option<pb::ReadOptions> {
    Some(pb::ReadOptions {
        consistency: c as i32,
        min_revision,
        max_lag: 0,
    })
}

async fn timed<T>(
    d: Duration,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Code> {
    match tokio::time::timeout(d, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(s.code()),
        Err(_) => Err(Code::DeadlineExceeded),
    }
}

fn err_text(c: Code) -> Option<String> {
    Some(format!("{c:?}"))
}

fn invoke(process: u64, f: F, key: Option<&str>, node: u64) -> Event {
    let mut e = Event::new(process, Kind::Invoke, f, 0);
    e.key = key.map(str::to_string);
    e.node = Some(node);
    e
}

fn put_req(key: &str, value: String, request_id: String) -> pb::PutRequest {
    pb::PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.into_bytes(),
        expected_revision: None,
        request_id,
    }
}

/// Records `inv`, runs `call`, and records the completion: `ok` fills in the reply and says
/// whether it is `ok` or a definite `fail` (a CAS whose compare failed). An error is `fail` for
/// reads; for writes, whatever [`write_outcome`] can prove, else `info`.
async fn perform<T>(
    rec: &Recorder,
    inv: Event,
    timeout: Duration,
    is_write: bool,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ok: impl FnOnce(&mut Event, T) -> Kind,
) -> Kind {
    rec.record(inv.clone());
    let mut c = inv;
    match timed(timeout, call).await {
        Ok(r) => c.kind = ok(&mut c, r),
        Err(code) => {
            c.kind = if is_write {
                write_outcome(code)
            } else {
                Kind::Fail
            };
            c.error = err_text(code);
        }
    }
    rec.record(c).kind
}

/// One client's state across its operations.
struct ClientState {
    rng: StdRng,
    /// The process id its operations are recorded under (a new one after an unknown outcome).
    process: u64,
    /// The node it talks to (the next one after an error).
    node: usize,
    /// Its index among the clients.
    index: u64,
    /// Values it added so far (set and versions workloads).
    counter: i64,
    /// The highest revision it saw (session workload).
    last_seen: u64,
}

/// One client: runs operations against its node until `until`, moving to the next node after
/// an error.
pub async fn client_loop(
    cfg: Arc<ClientCfg>,
    rec: Arc<Recorder>,
    kvs: Vec<KvClient<Channel>>,
    mds: Vec<MetadataClient<Channel>>,
    index: u64,
    until: Instant,
) {
    let mut st = ClientState {
        rng: StdRng::seed_from_u64(cfg.seed.wrapping_mul(1_000_003).wrapping_add(index)),
        process: index,
        node: (index as usize) % kvs.len(),
        index,
        counter: 0,
        last_seen: 0,
    };
    while Instant::now() < until {
        let kv = kvs[st.node].clone();
        let key_no = st.rng.gen_range(0..cfg.keys);
        let outcome = match cfg.workload {
            Workload::Register => register_op(&cfg, &rec, kv, &mut st, key_no).await,
            Workload::Set => set_op(&cfg, &rec, kv, &mut st).await,
            Workload::Session => session_op(&cfg, &rec, kv, &mut st, key_no).await,
            Workload::Versions => version_op(&cfg, &rec, &mds, &mut st).await,
            Workload::Idempotent => idempotent_op(&cfg, &rec, &kvs, &mut st, until).await,
        };
        if outcome != Kind::Ok {
            st.node = (st.node + 1) % kvs.len();
        }
        if outcome == Kind::Info && cfg.workload == Workload::Register {
            // An operation with unknown outcome never ends, as in Jepsen: the client continues
            // as a new process.
            st.process += cfg.clients;
        }
        tokio::time::sleep(cfg.delay).await;
    }
}

/// Register: a linearizable read, a write or a compare-and-set of one of a few keys.
async fn register_op(
    cfg: &ClientCfg,
    rec: &Recorder,
    mut kv: KvClient<Channel>,
    st: &mut ClientState,
    key_no: u64,
) -> Kind {
    let (t, n) = (cfg.op_timeout, st.node as u64 + 1);
    let key = format!("reg/{key_no}");
    match st.rng.gen_range(0..4) {
        0 | 1 => {
            let inv = invoke(st.process, F::Read, Some(&key), n);
            let get = kv.get(pb::GetRequest {
                key: key.into_bytes(),
                read: read_opts(pb::Consistency::Linearizable, 0),
            });
            perform(rec, inv, t, false, get, |c, r| {
                c.value = r.kv.as_ref().and_then(parse_value);
                c.index = Some(r.applied_index);
                Kind::Ok
            })
            .await
        }
        2 => {
            let v = st.rng.gen_range(0..5);
            let mut inv = invoke(st.process, F::Write, Some(&key), n);
            inv.value = Some(v);
            let put = kv.put(put_req(&key, v.to_string(), new_request_id()));
            perform(rec, inv, t, true, put, |c, r| {
                c.revision = Some(r.revision);
                Kind::Ok
            })
            .await
        }
        _ => {
            let (old, new) = (st.rng.gen_range(0..5), st.rng.gen_range(0..5));
            let mut inv = invoke(st.process, F::Cas, Some(&key), n);
            inv.expected = Some(old);
            inv.value = Some(new);
            let txn = kv.txn(pb::TxnRequest {
                compares: vec![pb::Compare {
                    key: key.clone().into_bytes(),
                    target: Some(pb::compare::Target::Value(old.to_string().into_bytes())),
                }],
                success: vec![pb::TxnOp {
                    op: Some(pb::txn_op::Op::Put(pb::PutOp {
                        key: key.into_bytes(),
                        value: new.to_string().into_bytes(),
                    })),
                }],
                failure: vec![],
                request_id: new_request_id(),
            });
            perform(rec, inv, t, true, txn, |c, r| {
                if r.succeeded {
                    c.revision = Some(r.revision);
                    Kind::Ok
                } else {
                    // The compare did not hold: certainly not applied.
                    c.error = Some("compare failed".into());
                    Kind::Fail
                }
            })
            .await
        }
    }
}

/// Set: adds a unique value, each under its own key.
async fn set_op(
    cfg: &ClientCfg,
    rec: &Recorder,
    mut kv: KvClient<Channel>,
    st: &mut ClientState,
) -> Kind {
    let (t, n) = (cfg.op_timeout, st.node as u64 + 1);
    st.counter += 1;
    let v = st.index as i64 * 10_000_000 + st.counter;
    let mut inv = invoke(st.process, F::Add, None, n);
    inv.value = Some(v);
    let key = format!("set/{v:016}");
    let put = kv.put(put_req(&key, v.to_string(), new_request_id()));
    perform(rec, inv, t, true, put, |c, r| {
        c.revision = Some(r.revision);
        Kind::Ok
    })
    .await
}

/// Session: writes, session reads at the highest revision seen, and stale reads.
async fn session_op(
    cfg: &ClientCfg,
    rec: &Recorder,
    mut kv: KvClient<Channel>,
    st: &mut ClientState,
    key_no: u64,
) -> Kind {
    let (t, n) = (cfg.op_timeout, st.node as u64 + 1);
    let key = format!("sess/{key_no}");
    let choice = st.rng.gen_range(0..5);
    if choice < 2 {
        let v = st.rng.gen_range(0..1000);
        let mut inv = invoke(st.process, F::Write, Some(&key), n);
        inv.value = Some(v);
        let put = kv.put(put_req(&key, v.to_string(), new_request_id()));
        let mut rev = None;
        let k = perform(rec, inv, t, true, put, |c, r| {
            c.revision = Some(r.revision);
            rev = Some(r.revision);
            Kind::Ok
        })
        .await;
        st.last_seen = st.last_seen.max(rev.unwrap_or(0));
        k
    } else {
        let (f, consistency, min) = if choice < 4 {
            (F::SessionRead, pb::Consistency::Session, st.last_seen)
        } else {
            (F::StaleRead, pb::Consistency::Stale, 0)
        };
        let mut inv = invoke(st.process, f, Some(&key), n);
        inv.index = Some(min);
        let get = kv.get(pb::GetRequest {
            key: key.into_bytes(),
            read: read_opts(consistency, min),
        });
        let mut served = None;
        let k = perform(rec, inv, t, false, get, |c, r| {
            c.index = Some(r.applied_index);
            c.revision = Some(r.kv.as_ref().map(|k| k.mod_revision).unwrap_or(0));
            c.value = r.kv.as_ref().and_then(parse_value);
            served = Some(r.applied_index);
            Kind::Ok
        })
        .await;
        if f == F::SessionRead {
            st.last_seen = st.last_seen.max(served.unwrap_or(0));
        }
        k
    }
}

/// Versions: adds a version to the shared artifact.
async fn version_op(
    cfg: &ClientCfg,
    rec: &Recorder,
    mds: &[MetadataClient<Channel>],
    st: &mut ClientState,
) -> Kind {
    let (t, n) = (cfg.op_timeout, st.node as u64 + 1);
    st.counter += 1;
    let v = st.index as i64 * 10_000_000 + st.counter;
    let mut inv = invoke(st.process, F::AddVersion, None, n);
    inv.value = Some(v);
    let mut md = mds[st.node].clone();
    let create = md.create(version_req(&cfg.artifact, v));
    perform(rec, inv, t, true, create, |c, r| {
        c.revision = Some(r.revision);
        c.version = match r.resource.and_then(|r| r.spec) {
            Some(pb::resource::Spec::ArtifactVersion(s)) => Some(s.number),
            _ => None,
        };
        Kind::Ok
    })
    .await
}

/// Idempotent: one write retried with its request id on the next nodes until it has an answer.
async fn idempotent_op(
    cfg: &ClientCfg,
    rec: &Recorder,
    kvs: &[KvClient<Channel>],
    st: &mut ClientState,
    until: Instant,
) -> Kind {
    let t = cfg.op_timeout;
    let id = new_request_id();
    let mut last = Kind::Info;
    for attempt in 0..5u64 {
        let at = (st.node + attempt as usize) % kvs.len();
        let mut inv = invoke(
            st.process,
            F::IdemWrite,
            Some("idem/counter"),
            at as u64 + 1,
        );
        inv.request_id = Some(id.clone());
        let mut kv = kvs[at].clone();
        let put = kv.put(put_req("idem/counter", id.clone(), id.clone()));
        last = perform(rec, inv, t, true, put, |c, r| {
            c.revision = Some(r.revision);
            Kind::Ok
        })
        .await;
        if last != Kind::Info || Instant::now() >= until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// A create of one artifact version tagged with `v` (in its uri), with a fresh request id.
fn version_req(artifact: &str, v: i64) -> pb::CreateResourceRequest {
    pb::CreateResourceRequest {
        resource: Some(pb::Resource {
            parent_id: artifact.to_string(),
            spec: Some(pb::resource::Spec::ArtifactVersion(
                pb::ArtifactVersionSpec {
                    uri: format!("v/{v}"),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        request_id: new_request_id(),
    }
}

/// Every version of `artifact` as `number * VALUE_SPAN + value`, in one linearizable listing.
async fn list_versions(md: &mut MetadataClient<Channel>, artifact: &str) -> Result<Vec<i64>, Code> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = timed(
            Duration::from_secs(5),
            md.list(pb::ListResourcesRequest {
                kind: pb::ResourceKind::ArtifactVersion as i32,
                parent_id: artifact.to_string(),
                page_size: 1000,
                page_token: token.clone(),
                read: read_opts(pb::Consistency::Linearizable, 0),
                ..Default::default()
            }),
        )
        .await?;
        for r in &page.resources {
            if let Some(pb::resource::Spec::ArtifactVersion(s)) = &r.spec {
                let v: i64 = s
                    .uri
                    .strip_prefix("v/")
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(-1);
                out.push(s.number as i64 * crate::checker::versions::VALUE_SPAN + v);
            }
        }
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        token = page.next_page_token;
    }
}

/// Creates the organization, workspace, project and artifact of the versions workload, through
/// any node, retrying until the cluster takes it; returns the artifact id.
pub async fn setup_versions(client: &metaraft::client::Client) -> Result<String, String> {
    let mut parent = String::new();
    let steps: [(&str, pb::resource::Spec); 4] = [
        (
            "jepsen",
            pb::resource::Spec::Organization(Default::default()),
        ),
        ("ws", pb::resource::Spec::Workspace(Default::default())),
        ("p", pb::resource::Spec::Project(Default::default())),
        ("artifact", pb::resource::Spec::Artifact(Default::default())),
    ];
    for (name, spec) in steps {
        let req = pb::CreateResourceRequest {
            resource: Some(pb::Resource {
                parent_id: parent.clone(),
                name: name.into(),
                spec: Some(spec),
                ..Default::default()
            }),
            request_id: new_request_id(),
        };
        let r = client
            .meta_create(req)
            .await
            .map_err(|e| format!("creating {name}: {e}"))?;
        parent = r.resource.map(|r| r.id).unwrap_or_default();
    }
    Ok(parent)
}

/// The final read after healing, retried until it succeeds or `patience` passes.
pub async fn final_read(
    cfg: &ClientCfg,
    rec: &Recorder,
    kvs: &[KvClient<Channel>],
    mds: &[MetadataClient<Channel>],
    patience: Duration,
) -> bool {
    let workload = cfg.workload;
    let process = 1_000_000;
    let deadline = Instant::now() + patience;
    let mut node = 0;
    loop {
        let mut kv = kvs[node % kvs.len()].clone();
        node += 1;
        let mut inv = Event::new(process, Kind::Invoke, F::FinalRead, 0);
        inv.node = Some((node % kvs.len()) as u64);
        match workload {
            Workload::Set => {
                rec.record(inv.clone());
                let mut values = Vec::new();
                let mut start_after = Vec::new();
                let mut ok = true;
                loop {
                    let r = timed(
                        Duration::from_secs(5),
                        kv.range(pb::RangeRequest {
                            prefix: b"set/".to_vec(),
                            start_after: start_after.clone(),
                            limit: 1000,
                            read: read_opts(pb::Consistency::Linearizable, 0),
                            keys_only: false,
                        }),
                    )
                    .await;
                    match r {
                        Ok(resp) => {
                            values.extend(resp.kvs.iter().filter_map(parse_value));
                            match resp.kvs.last() {
                                Some(last) if resp.more => start_after = last.key.clone(),
                                _ => break,
                            }
                        }
                        Err(code) => {
                            let mut c = inv.clone();
                            c.kind = Kind::Fail;
                            c.error = err_text(code);
                            rec.record(c);
                            ok = false;
                            break;
                        }
                    }
                }
                if ok {
                    let mut c = inv;
                    c.kind = Kind::Ok;
                    c.values = Some(values);
                    rec.record(c);
                    return true;
                }
            }
            Workload::Idempotent => {
                inv.key = Some("idem/counter".into());
                rec.record(inv.clone());
                let r = timed(
                    Duration::from_secs(5),
                    kv.get(pb::GetRequest {
                        key: b"idem/counter".to_vec(),
                        read: read_opts(pb::Consistency::Linearizable, 0),
                    }),
                )
                .await;
                let mut c = inv;
                match r {
                    Ok(resp) => {
                        c.kind = Kind::Ok;
                        c.version = Some(resp.kv.map(|k| k.version).unwrap_or(0));
                        rec.record(c);
                        return true;
                    }
                    Err(code) => {
                        c.kind = Kind::Fail;
                        c.error = err_text(code);
                        rec.record(c);
                    }
                }
            }
            Workload::Versions => {
                rec.record(inv.clone());
                let mut md = mds[node % mds.len()].clone();
                let mut c = inv;
                match list_versions(&mut md, &cfg.artifact).await {
                    Ok(values) => {
                        c.kind = Kind::Ok;
                        c.values = Some(values);
                        rec.record(c);
                        return true;
                    }
                    Err(code) => {
                        c.kind = Kind::Fail;
                        c.error = err_text(code);
                        rec.record(c);
                    }
                }
            }
            Workload::Register | Workload::Session => return true,
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
