//! `metaraft bench`: a closed-loop load generator.
//!
//! `concurrency` workers each keep one request in flight for `duration`, over `keys` keys with
//! `value_size`-byte values; `read_ratio` of operations are Gets at the chosen consistency, spread
//! round-robin over all endpoints. Prints throughput and p50/p99/p99.9 latency (HDR histogram),
//! optionally as JSON. The metadata workloads (`--workload`) are in [`meta`].

pub mod meta;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

use metaraft::client::Client;
use metaraft::config::defaults;
use metaraft::pb;

use super::args::{ClientTlsArgs, ConsistencyArg};
use super::runtime;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[arg(
        long,
        value_delimiter = ',',
        default_value = defaults::CLIENT_ENDPOINTS
    )]
    pub endpoints: Vec<String>,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Fraction of operations that are reads (0.0 - 1.0).
    #[arg(long, default_value_t = 0.0)]
    pub read_ratio: f64,
    #[arg(long, value_enum, default_value = "linearizable")]
    pub consistency: ConsistencyArg,
    /// Seconds of measurement.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Write every key once before measuring (so reads find values).
    #[arg(long)]
    pub preload: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// What to drive: metaraft, or an etcd v3 cluster at --endpoints (same load shape).
    #[arg(long, value_enum, default_value = "metaraft")]
    pub target: Target,
    /// Async threads of the load generator; 0: chosen as a node's `runtime_threads` = 0 is
    /// (1 on at most 2 CPUs, else one per CPU). The same for both targets.
    #[arg(long, default_value_t = defaults::RUNTIME_THREADS)]
    pub threads: usize,
    /// kv (Put/Get), or a metadata workload: ci-burst, dashboard, steady, registry, admin
    /// (see docs/benchmarks.md).
    #[arg(long, value_enum, default_value = "kv")]
    pub workload: meta::Workload,
    /// TLS towards metaraft's client port (as for every client subcommand); etcd is plaintext.
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq)]
pub enum Target {
    Metaraft,
    Etcd,
}

/// One connection's worth of client for either system.
#[derive(Clone)]
enum Conn {
    Metaraft(metaraft::pb::kv_client::KvClient<tonic::transport::Channel>),
    /// etcd's KV service through the same client transport as metaraft's ([`metaraft::client::channel`]),
    /// with the request and response types of the `etcd-client` crate.
    Etcd(tonic::client::Grpc<tonic::transport::Channel>),
}

const ETCD_PUT: &str = "/etcdserverpb.KV/Put";
const ETCD_RANGE: &str = "/etcdserverpb.KV/Range";

async fn etcd_unary<Req, Resp>(
    c: &mut tonic::client::Grpc<tonic::transport::Channel>,
    path: &'static str,
    req: Req,
) -> Result<Resp>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    c.ready().await?;
    let codec = tonic::codec::ProstCodec::<Req, Resp>::default();
    let path = http::uri::PathAndQuery::from_static(path);
    Ok(c.unary(tonic::Request::new(req), path, codec)
        .await?
        .into_inner())
}

impl Conn {
    async fn connect(
        target: Target,
        endpoint: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Conn> {
        Ok(match target {
            Target::Metaraft => Conn::Metaraft(
                Client::with_tls(&[endpoint.to_string()], Duration::from_secs(10), tls)?.kv_at(0),
            ),
            Target::Etcd => Conn::Etcd(tonic::client::Grpc::new(metaraft::client::channel(
                endpoint,
                Duration::from_secs(10),
            )?)),
        })
    }

    async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        match self {
            Conn::Metaraft(c) => {
                let request_id = metaraft::client::new_request_id();
                c.put(pb::PutRequest {
                    key,
                    value,
                    expected_revision: None,
                    request_id,
                })
                .await?;
            }
            Conn::Etcd(c) => {
                let req = etcd_client::proto::PbPutRequest {
                    key,
                    value,
                    ..Default::default()
                };
                etcd_unary::<_, etcd_client::proto::PbPutResponse>(c, ETCD_PUT, req).await?;
            }
        }
        Ok(())
    }

    async fn get(&mut self, key: Vec<u8>, consistency: ConsistencyArg) -> Result<()> {
        match self {
            Conn::Metaraft(c) => {
                let read = Some(pb::ReadOptions {
                    consistency: consistency.to_pb() as i32,
                    min_revision: 0,
                    max_lag: 0,
                });
                c.get(pb::GetRequest { key, read }).await?;
            }
            Conn::Etcd(c) => {
                // etcd has linearizable and serializable (local) reads; session maps to serializable.
                // etcd has no lease read: the closest guarantee is its linearizable read.
                let serializable = !matches!(
                    consistency,
                    ConsistencyArg::Linearizable | ConsistencyArg::Lease
                );
                let req = etcd_client::proto::PbRangeRequest {
                    key,
                    serializable,
                    ..Default::default()
                };
                etcd_unary::<_, etcd_client::proto::PbRangeResponse>(c, ETCD_RANGE, req).await?;
            }
        }
        Ok(())
    }
}

struct Stats {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    /// What the first failed request said.
    first_error: Option<String>,
}

/// Runs the load generator in a runtime of `--threads` threads.
pub fn run(a: BenchArgs) -> Result<std::process::ExitCode> {
    if a.threads > metaraft::config::MAX_RUNTIME_THREADS {
        bail!(
            "--threads must be at most {}",
            metaraft::config::MAX_RUNTIME_THREADS
        );
    }
    let threads = metaraft::config::runtime_threads_here(a.threads);
    runtime::with_threads(threads)?.block_on(bench(a))
}

async fn bench(a: BenchArgs) -> Result<std::process::ExitCode> {
    if a.workload != meta::Workload::Kv {
        return bench_meta(&a).await;
    }
    if a.concurrency == 0 || a.keys == 0 || a.duration == 0 {
        bail!("--concurrency, --keys and --duration must be > 0");
    }
    if !(0.0..=1.0).contains(&a.read_ratio) {
        bail!("--read-ratio must be between 0 and 1");
    }
    // One connection per endpoint: workers are spread evenly so reads hit every node.
    let tls = a.tls.config()?;
    if tls.is_some() && a.target != Target::Metaraft {
        bail!("--ca-file: TLS is for --target metaraft only");
    }
    let mut conns = Vec::new();
    for e in &a.endpoints {
        conns.push(Conn::connect(a.target, e, tls.clone()).await?);
    }
    let value = vec![b'x'; a.value_size];
    if a.preload {
        preload(&conns, &a, &value).await?;
    }
    let start = Instant::now();
    let total = measure(&conns, &a, &value).await?;
    let secs = start.elapsed().as_secs_f64();
    report(&a, &total, secs);
    if total.ok == 0 {
        // A run where nothing succeeded measured nothing: say why and fail, so a script (or
        // compare-etcd.sh) never reads it as a figure.
        eprintln!(
            "error: no request succeeded; the first failure: {}",
            total.first_error.as_deref().unwrap_or("none recorded")
        );
        return Ok(std::process::ExitCode::FAILURE);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// A metadata workload (`--workload` other than kv), in [`meta`].
async fn bench_meta(a: &BenchArgs) -> Result<std::process::ExitCode> {
    if a.target != Target::Metaraft {
        bail!("metadata workloads drive metaraft only");
    }
    if a.concurrency == 0 || a.duration == 0 {
        bail!("--concurrency and --duration must be > 0");
    }
    let o = meta::Opts {
        tls: a.tls.config()?,
        endpoints: a.endpoints.clone(),
        concurrency: a.concurrency,
        duration: a.duration,
        json: a.json,
    };
    meta::run(a.workload, o).await
}

/// Writes every key once (`--preload`), with up to 64 writers.
async fn preload(conns: &[Conn], a: &BenchArgs, value: &[u8]) -> Result<()> {
    let mut set = tokio::task::JoinSet::new();
    let next = Arc::new(AtomicU64::new(0));
    for w in 0..a.concurrency.min(64) {
        let (mut c, next, value, keys) = (
            conns[w % conns.len()].clone(),
            next.clone(),
            value.to_vec(),
            a.keys,
        );
        set.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= keys {
                    return Ok::<_, anyhow::Error>(());
                }
                c.put(key(k), value.clone()).await?;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// `--concurrency` workers for `--duration` seconds; their stats summed.
async fn measure(conns: &[Conn], a: &BenchArgs, value: &[u8]) -> Result<Stats> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for w in 0..a.concurrency {
        let kv = conns[w % conns.len()].clone();
        let (stop, value, a) = (stop.clone(), value.to_vec(), a.clone());
        set.spawn(worker(kv, a, value, stop));
    }
    tokio::time::sleep(Duration::from_secs(a.duration)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Stats {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        ok: 0,
        errors: 0,
        first_error: None,
    };
    while let Some(r) = set.join_next().await {
        let s = r?;
        total.hist.add(&s.hist)?;
        total.ok += s.ok;
        total.errors += s.errors;
        if total.first_error.is_none() {
            total.first_error = s.first_error;
        }
    }
    Ok(total)
}

/// One request in flight until `stop`: a Get with probability `--read-ratio`, else a Put.
async fn worker(mut kv: Conn, a: BenchArgs, value: Vec<u8>, stop: Arc<AtomicBool>) -> Stats {
    let mut st = Stats {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds"),
        ok: 0,
        errors: 0,
        first_error: None,
    };
    let mut rng = rand::rngs::StdRng::from_entropy();
    while !stop.load(Ordering::Relaxed) {
        let k = key(rng.gen_range(0..a.keys));
        let t = Instant::now();
        let r = if rng.gen_bool(a.read_ratio) {
            kv.get(k, a.consistency).await
        } else {
            kv.put(k, value.clone()).await
        };
        match r {
            Ok(()) => {
                st.ok += 1;
                let _ = st.hist.record(t.elapsed().as_micros().max(1) as u64);
            }
            Err(e) => {
                st.errors += 1;
                st.first_error.get_or_insert_with(|| format!("{e:#}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    st
}

/// Throughput and latency percentiles, as text or (`--json`) one JSON object.
fn report(a: &BenchArgs, total: &Stats, secs: f64) {
    let ms = |q: f64| total.hist.value_at_quantile(q) as f64 / 1000.0;
    let tput = total.ok as f64 / secs;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "target": format!("{:?}", a.target).to_lowercase(), "concurrency": a.concurrency, "keys": a.keys, "value_size": a.value_size,
                "read_ratio": a.read_ratio, "consistency": format!("{:?}", a.consistency).to_lowercase(),
                "seconds": secs, "ok": total.ok, "errors": total.errors, "ops_per_sec": tput,
                "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999), "max_ms": total.hist.max() as f64 / 1000.0,
            })
        );
    } else {
        println!(
            "{}: {:.0} ops/s  ok {}  errors {}  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  ({} in flight, {:.0}% reads, {}-byte values, {:.1}s)",
            format!("{:?}", a.target).to_lowercase(), tput, total.ok, total.errors, ms(0.5), ms(0.99), ms(0.999), a.concurrency, a.read_ratio * 100.0, a.value_size, secs
        );
    }
}

fn key(k: u64) -> Vec<u8> {
    format!("bench/{k:010}").into_bytes()
}
