//! `metaraft backup create|stream|verify|list` and `metaraft restore`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use metaraft::backup::{self, base::BaseHeader, BaseWriter, SegmentRecord, SegmentWriter};
use metaraft::client::Client;
use metaraft::config::defaults;
use metaraft::pb;

use super::args::{Conn, Output};
use super::runtime;

#[derive(Subcommand, Debug)]
pub enum BackupCmd {
    /// A consistent full backup from one node (a follower or learner when there is one).
    Create {
        #[command(flatten)]
        conn: Conn,
        /// Backup directory (created if missing; a new base-<index> goes inside).
        #[arg(long)]
        out: PathBuf,
        /// Pace the transfer to this many MB/s (0: unlimited), leaving the node's CPU and disk
        /// to writes. See docs/backup-restore.md for the measured effect.
        #[arg(long, default_value_t = defaults::BACKUP_MAX_RATE_MB)]
        max_rate_mb: u64,
    },
    /// Continuous backup: a base, then every committed entry appended to segment files. Resumes
    /// where it stopped; takes a new base when the log it needs was purged.
    Stream {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        out: PathBuf,
        /// Pace base transfers to this many MB/s (0: unlimited).
        #[arg(long, default_value_t = defaults::BACKUP_MAX_RATE_MB)]
        max_rate_mb: u64,
        /// Fsync segments at least this often (milliseconds).
        #[arg(long, default_value_t = defaults::BACKUP_FSYNC_INTERVAL_MS)]
        fsync_interval_ms: u64,
        /// Start a new segment file past this size (KiB).
        #[arg(long, default_value_t = defaults::BACKUP_SEGMENT_KB)]
        segment_kb: u64,
        /// Take a new base every this many entries (0: only when needed).
        #[arg(long, default_value_t = defaults::BACKUP_BASE_EVERY)]
        base_every: u64,
        /// Keep this many newest bases (older bases and their segments are pruned; 0 keeps all).
        #[arg(long, default_value_t = defaults::BACKUP_RETAIN_BASES)]
        retain_bases: usize,
        /// Stop once this index is written and synced (for scripts and tests).
        #[arg(long)]
        until_index: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration_s: Option<u64>,
    },
    /// Check every checksum and the chain of segments; names the file and offset of any damage.
    Verify {
        dir: PathBuf,
        /// Skip re-reading base data files (manifests and segments are still checked).
        #[arg(long)]
        quick: bool,
    },
    /// What can be restored: bases and index/time ranges.
    List {
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Backup directory.
    #[arg(long)]
    pub from: PathBuf,
    /// Restore to exactly this index (default: the latest restorable).
    #[arg(long)]
    pub to_index: Option<u64>,
    /// Restore to the last entry received at or before this time: RFC 3339 UTC
    /// (2026-11-27T04:00:00Z) or unix milliseconds.
    #[arg(long)]
    pub to_time: Option<String>,
    /// Data directory of the new node (must be empty or absent).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The restored node's id and addresses in the new cluster.
    #[arg(long, default_value_t = defaults::RESTORE_NODE_ID)]
    pub node_id: u64,
    #[arg(long, default_value = defaults::PEER_ADDR)]
    pub peer_addr: String,
    #[arg(long, default_value = defaults::CLIENT_ADDR)]
    pub client_addr: String,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

pub fn run(op: BackupCmd) -> Result<ExitCode> {
    match op {
        BackupCmd::Verify { dir, quick } => {
            let cat = backup::verify(&dir, !quick)?;
            println!(
                "ok: {} bases, {} segments ({} records), cluster {}",
                cat.bases.len(),
                cat.segments.len(),
                cat.segments.iter().map(|s| s.records).sum::<u64>(),
                cat.cluster_id
            );
            Ok(ExitCode::SUCCESS)
        }
        BackupCmd::List { dir, output } => {
            let cat = backup::verify(&dir, false)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&cat)?),
                Output::Text => {
                    println!("cluster {}", cat.cluster_id);
                    for b in &cat.bases {
                        println!(
                            "base  index {:>10}  term {:>4}  {:>10} bytes  hash {:08x}  taken {}",
                            b.index,
                            b.term,
                            b.bytes,
                            b.state_hash,
                            fmt_ms(b.created_unix_ms)
                        );
                    }
                    for r in &cat.restorable {
                        println!(
                            "restorable  index {}..={}  time {} .. {}",
                            r.from_index,
                            r.to_index,
                            fmt_ms(r.from_unix_ms),
                            fmt_ms(r.to_unix_ms)
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCmd::Create {
            conn,
            out,
            max_rate_mb,
        } => runtime::multi_thread()?.block_on(async {
            let c = conn.client()?;
            let (path, m) = take_base(&c, &out, max_rate_mb << 20).await?;
            println!(
                "base backup at index {} (term {}, hash {:08x}, {} files) in {}",
                m.applied_index,
                m.applied_term,
                m.state_hash,
                m.files.len(),
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }),
        BackupCmd::Stream {
            conn,
            out,
            max_rate_mb,
            fsync_interval_ms,
            segment_kb,
            base_every,
            retain_bases,
            until_index,
            duration_s,
        } => runtime::multi_thread()?.block_on(stream(StreamOpts {
            conn,
            out,
            rate: max_rate_mb << 20,
            fsync_every: Duration::from_millis(fsync_interval_ms),
            segment_bytes: segment_kb.max(1) << 10,
            base_every,
            retain_bases,
            until_index,
            deadline: duration_s.map(|s| Instant::now() + Duration::from_secs(s)),
        })),
    }
}

fn fmt_ms(ms: u64) -> String {
    format!("{}.{:03}s", ms / 1000, ms % 1000)
}

/// Which endpoint to read from: a learner (DR replica) or follower when the cluster has one, so
/// the leader's disk and CPU stay for writes.
async fn pick_source(c: &Client) -> Result<Client> {
    let s = c.status(false).await.context("cluster status")?;
    let rank = |role: &str| match role {
        "learner" => 0,
        "follower" => 1,
        _ => 2,
    };
    let best = s
        .members
        .iter()
        .filter(|m| m.error.is_empty() && !m.client_addr.is_empty())
        .min_by_key(|m| rank(&m.role));
    match best {
        Some(m) => Ok(Client::with_tls(
            std::slice::from_ref(&m.client_addr),
            Duration::from_secs(30),
            c.tls(),
        )?),
        None => bail!("no member answered the status call"),
    }
}

async fn take_base(c: &Client, out: &Path, rate: u64) -> Result<(PathBuf, backup::BaseManifest)> {
    let src = pick_source(c).await?;
    let mut s = src
        .backup_snapshot(0, rate)
        .await
        .context("starting the snapshot stream")?;
    let first = s.message().await?.context("empty snapshot stream")?;
    let Some(pb::backup_chunk::Kind::Header(h)) = first.kind else {
        bail!("snapshot stream did not start with a header");
    };
    let header = BaseHeader {
        cluster_id: h.cluster_id,
        node_id: h.node_id,
        applied_index: h.applied_index,
        applied_term: h.applied_term,
        membership_json: h.membership_json,
        state_hash: h.state_hash,
        snapshot_meta: h.snapshot_meta,
        files: h
            .files
            .iter()
            .map(|f| (f.name.clone(), f.size, f.crc32))
            .collect(),
    };
    if let Some(existing) = backup::list_bases(out)?.first() {
        let m = backup::BaseManifest::read(&existing.1)?;
        if m.cluster_id != header.cluster_id {
            bail!(
                "{} holds backups of cluster {}, the node belongs to cluster {}: use another directory",
                out.display(),
                m.cluster_id,
                header.cluster_id
            );
        }
    }
    let mut w = BaseWriter::begin(out, header)?;
    while let Some(chunk) = s.message().await? {
        match chunk.kind {
            Some(pb::backup_chunk::Kind::Data(d)) => {
                w.chunk(d.file_index, d.offset, &d.data, d.crc32)?
            }
            _ => bail!("unexpected message inside the snapshot stream"),
        }
    }
    Ok(w.finish()?)
}

struct StreamOpts {
    conn: Conn,
    out: PathBuf,
    rate: u64,
    fsync_every: Duration,
    segment_bytes: u64,
    base_every: u64,
    retain_bases: usize,
    until_index: Option<u64>,
    deadline: Option<Instant>,
}

/// Where a stream stands: the next index due, and entries written since the last base.
struct Cursor {
    next: u64,
    since_base: u64,
}

/// What a stream does next.
enum Flow {
    /// Go on reading the current tail stream.
    Continue,
    /// Stop with success: segments synced (a signal, the deadline, or --until-index).
    Done,
    /// Connect again (to the best source) after a pause.
    Reconnect,
}

async fn stream(o: StreamOpts) -> Result<ExitCode> {
    let c = o.conn.client()?;
    let (mut w, next) = open_segments(&c, &o).await?;
    let mut cur = Cursor {
        next,
        since_base: 0,
    };
    eprintln!(
        "streaming committed entries from index {} into {}",
        cur.next,
        o.out.display()
    );
    let mut term_sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        if o.deadline.is_some_and(|d| Instant::now() >= d) {
            w.sync()?;
            return Ok(ExitCode::SUCCESS);
        }
        let src = match pick_source(&c).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("no source yet: {e:#}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let s = match src.tail_log(0, cur.next).await {
            Ok(s) => s,
            Err(e) => {
                if e.code() == Some(tonic::Code::FailedPrecondition) {
                    cur.next = rebase(&c, &o, &mut w, &e.to_string()).await?;
                    cur.since_base = 0;
                } else {
                    eprintln!("tail: {e}; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
        };
        if let Flow::Done = follow(&c, &o, &mut w, &mut cur, s, &mut term_sig).await? {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The segment writer, resumed where the last stream stopped (after a first base when the
/// directory has none), and the next index to stream.
async fn open_segments(c: &Client, o: &StreamOpts) -> Result<(SegmentWriter, u64)> {
    std::fs::create_dir_all(&o.out)?;
    if backup::list_bases(&o.out)?.is_empty() {
        let (p, m) = take_base(c, &o.out, o.rate).await?;
        eprintln!(
            "base backup at index {} in {}",
            m.applied_index,
            p.display()
        );
    }
    let cluster = backup::verify(&o.out, false)?.cluster_id;
    let (mut w, last, note) = SegmentWriter::resume(
        &backup::segments_dir(&o.out),
        &cluster,
        o.segment_bytes,
        o.fsync_every,
    )?;
    if let Some(n) = note {
        eprintln!("{n}");
    }
    let latest_base =
        || -> Result<u64> { Ok(backup::list_bases(&o.out)?.last().map(|b| b.0).unwrap_or(0)) };
    let next = match last {
        Some(l) if l >= latest_base()? => l + 1,
        _ => {
            w.close()?;
            latest_base()? + 1
        }
    };
    Ok((w, next))
}

/// Reads one tail stream into the segments until it ends, fails or the stream should stop;
/// syncs the segments every `fsync_every` meanwhile.
async fn follow(
    c: &Client,
    o: &StreamOpts,
    w: &mut SegmentWriter,
    cur: &mut Cursor,
    mut s: tonic::Streaming<pb::LogRecord>,
    term_sig: &mut tokio::signal::unix::Signal,
) -> Result<Flow> {
    loop {
        let msg = tokio::select! {
            m = s.message() => m,
            _ = tokio::signal::ctrl_c() => { w.sync()?; return Ok(Flow::Done); }
            _ = term_sig.recv() => { w.sync()?; return Ok(Flow::Done); }
            _ = tokio::time::sleep(o.fsync_every) => {
                w.sync()?;
                if o.deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(Flow::Done);
                }
                continue;
            }
        };
        match msg {
            Ok(Some(r)) => {
                if let Flow::Done = append(c, o, w, cur, r).await? {
                    return Ok(Flow::Done);
                }
            }
            Ok(None) => return Ok(Flow::Reconnect),
            Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                cur.next = rebase(c, o, w, &e.to_string()).await?;
                cur.since_base = 0;
                return Ok(Flow::Reconnect);
            }
            Err(e) => {
                eprintln!("tail stream: {e}; reconnecting");
                w.sync()?;
                return Ok(Flow::Reconnect);
            }
        }
    }
}

/// Appends the next record; takes a new base every `base_every` entries.
async fn append(
    c: &Client,
    o: &StreamOpts,
    w: &mut SegmentWriter,
    cur: &mut Cursor,
    r: pb::LogRecord,
) -> Result<Flow> {
    if r.index != cur.next {
        bail!("node sent index {} where {} was due", r.index, cur.next);
    }
    w.append(&SegmentRecord {
        index: r.index,
        term: r.term,
        unix_ms: backup::now_unix_ms(),
        entry: r.entry,
    })?;
    cur.next += 1;
    cur.since_base += 1;
    if o.until_index.is_some_and(|u| r.index >= u) {
        w.sync()?;
        return Ok(Flow::Done);
    }
    if o.base_every > 0 && cur.since_base >= o.base_every {
        w.sync()?;
        let (p, m) = take_base(c, &o.out, o.rate).await?;
        eprintln!(
            "base backup at index {} in {}",
            m.applied_index,
            p.display()
        );
        cur.since_base = 0;
        prune(o)?;
    }
    if o.deadline.is_some_and(|d| Instant::now() >= d) {
        w.sync()?;
        return Ok(Flow::Done);
    }
    Ok(Flow::Continue)
}

/// The log the stream needs is gone: end the current segment, take a new base, and continue
/// after it. Returns the next index to stream.
async fn rebase(c: &Client, o: &StreamOpts, w: &mut SegmentWriter, why: &str) -> Result<u64> {
    eprintln!("{why}; taking a new base backup");
    w.close()?;
    let (p, m) = take_base(c, &o.out, o.rate).await?;
    eprintln!(
        "base backup at index {} in {}",
        m.applied_index,
        p.display()
    );
    prune(o)?;
    Ok(m.applied_index + 1)
}

fn prune(o: &StreamOpts) -> Result<()> {
    for p in backup::prune(&o.out, o.retain_bases)? {
        eprintln!("pruned {}", p.display());
    }
    Ok(())
}

pub fn restore(a: RestoreArgs) -> Result<ExitCode> {
    let to_time_ms = match &a.to_time {
        None => None,
        Some(t) => Some(parse_time(t)?),
    };
    let opts = backup::restore::RestoreOpts {
        from: a.from,
        data_dir: a.data_dir,
        to_index: a.to_index,
        to_time_ms,
        node_id: a.node_id,
        peer_addr: a.peer_addr,
        client_addr: a.client_addr,
        dedup_window: defaults::DEDUP_WINDOW,
    };
    let r = runtime::multi_thread()?.block_on(backup::restore::restore(&opts))?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        Output::Text => println!(
            "restored index {} (base {} + {} entries replayed) in {:.2}s; state hash {:08x}@{}\n\
             new cluster {} (was {}); start it with: metaraft serve --node-id {} --data-dir {} ...",
            r.restored_index,
            r.base_index,
            r.replayed_entries,
            r.seconds,
            r.state_hash,
            r.restored_index,
            r.cluster_id,
            r.previous_cluster_id,
            opts.node_id,
            opts.data_dir.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// RFC 3339 UTC (`2026-11-27T04:00:00Z`, optional fraction) or unix milliseconds.
fn parse_time(t: &str) -> Result<u64> {
    if let Ok(ms) = t.parse::<u64>() {
        return Ok(ms);
    }
    let bad =
        || anyhow::anyhow!("--to-time {t:?}: expected 2026-11-27T04:00:00Z or unix milliseconds");
    let s = t.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = s.split_once('T').ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_>>()?;
    if d.len() != 3
        || h.len() != 3
        || !(1..=12).contains(&d[1])
        || !(1..=31).contains(&d[2])
        || h[0] > 23
        || h[1] > 59
        || h[2] > 60
    {
        return Err(bad());
    }
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let frac_ms: i64 = format!("{:0<3}", &frac[..frac.len().min(3)])
        .parse()
        .map_err(|_| bad())?;
    let ms = ((days * 86400 + h[0] * 3600 + h[1] * 60 + h[2]) * 1000) + frac_ms;
    if ms < 0 {
        return Err(bad());
    }
    Ok(ms as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn times_parse() {
        assert_eq!(parse_time("0").unwrap(), 0);
        assert_eq!(parse_time("1970-01-01T00:00:01Z").unwrap(), 1000);
        assert_eq!(
            parse_time("2026-11-27T04:00:00.5Z").unwrap(),
            1_795_752_000_500
        );
        for bad in [
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-27 04:00:00",
            "2026-11-27T04:00:00",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
