//! Log segments: committed entries appended as checksummed records to rotating files.
//!
//! A segment starts with a 32-byte header (magic, format version, cluster id) followed by
//! records: `u32 body length, u32 CRC32(body)`, body = `u64 index, u64 term, u64 unix ms
//! (when the backup received it), entry bytes` (bincode of the openraft entry), little endian.
//! A segment is named after its first index; records inside are consecutive.

use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{sync_dir, BackupError, BACKUP_FORMAT_VERSION};

const MAGIC: &[u8; 8] = b"MRSEG\0\0\x01";
const HEADER_LEN: u64 = 32;
const REC_HEAD: usize = 8;
/// A record body larger than this is damage, not data (entries are bounded far below it).
const MAX_BODY: u32 = 256 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentRecord {
    pub index: u64,
    pub term: u64,
    pub unix_ms: u64,
    pub entry: Vec<u8>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SegmentInfo {
    pub path: PathBuf,
    pub first: u64,
    /// `first - 1` for a segment with no records yet.
    pub last: u64,
    pub records: u64,
    pub bytes: u64,
    pub first_unix_ms: u64,
    pub last_unix_ms: u64,
}

fn header(cluster_id: &str) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&BACKUP_FORMAT_VERSION.to_le_bytes());
    let id = cluster_id.as_bytes();
    let n = id.len().min(16);
    h[16..16 + n].copy_from_slice(&id[..n]);
    h
}

fn encode(r: &SegmentRecord) -> Vec<u8> {
    let mut body = Vec::with_capacity(24 + r.entry.len());
    body.extend_from_slice(&r.index.to_le_bytes());
    body.extend_from_slice(&r.term.to_le_bytes());
    body.extend_from_slice(&r.unix_ms.to_le_bytes());
    body.extend_from_slice(&r.entry);
    let mut out = Vec::with_capacity(REC_HEAD + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl SegmentInfo {
    /// A segment of `bytes` bytes named for index `first`, before any record is read.
    fn empty(path: &Path, first: u64, bytes: u64) -> SegmentInfo {
        SegmentInfo {
            path: path.to_path_buf(),
            first,
            last: first - 1,
            records: 0,
            bytes,
            first_unix_ms: 0,
            last_unix_ms: 0,
        }
    }
}

/// Reads and checks a segment's header: the magic, a format this binary reads, and (unless
/// `cluster_id` is empty) the cluster it belongs to.
fn check_header(r: &mut impl Read, path: &Path, cluster_id: &str) -> Result<(), BackupError> {
    let damaged = |offset: u64, what: String| BackupError::Damaged {
        path: path.to_path_buf(),
        offset,
        what,
    };
    let mut h = [0u8; HEADER_LEN as usize];
    r.read_exact(&mut h)
        .map_err(BackupError::io("read", path))?;
    if &h[..8] != MAGIC {
        return Err(damaged(0, "not a metaraft log segment (bad magic)".into()));
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version > BACKUP_FORMAT_VERSION {
        return Err(damaged(
            8,
            format!("segment format {version} is newer than this metaraft"),
        ));
    }
    let seg_cluster = String::from_utf8_lossy(&h[16..32])
        .trim_end_matches('\0')
        .to_string();
    if !cluster_id.is_empty() && seg_cluster != cluster_id {
        return Err(BackupError::Chain(format!(
            "{} belongs to cluster {seg_cluster:?}, the backup to {cluster_id:?}",
            path.display()
        )));
    }
    Ok(())
}

/// Reads a segment, calling `each` for every record. `torn_tail_ok`: an incomplete last record
/// (a crash mid-append) ends the scan instead of being damage; the valid length is returned.
pub fn read_segment(
    path: &Path,
    cluster_id: &str,
    torn_tail_ok: bool,
    mut each: impl FnMut(SegmentRecord) -> Result<(), BackupError>,
) -> Result<(SegmentInfo, u64), BackupError> {
    let damaged = |offset: u64, what: String| BackupError::Damaged {
        path: path.to_path_buf(),
        offset,
        what,
    };
    let name_first = path
        .file_name()
        .and_then(|n| super::index_in_name(&n.to_string_lossy(), "seg-", ".log"))
        // Log indexes start at 1: "seg-0..." names no segment (and `first - 1` below needs it).
        .filter(|&first| first > 0)
        .ok_or_else(|| BackupError::Invalid {
            path: path.to_path_buf(),
            what: "not a segment file name (seg-<20 digits>.log)".into(),
        })?;
    let f = std::fs::File::open(path).map_err(BackupError::io("open", path))?;
    let len = f.metadata().map_err(BackupError::io("stat", path))?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    if len < HEADER_LEN {
        if torn_tail_ok {
            return Ok((SegmentInfo::empty(path, name_first, 0), 0));
        }
        return Err(damaged(0, "shorter than a segment header".into()));
    }
    check_header(&mut r, path, cluster_id)?;
    let mut info = SegmentInfo::empty(path, name_first, len);
    let mut offset = HEADER_LEN;
    let mut body = Vec::new();
    while offset < len {
        let remaining = len - offset;
        if remaining < REC_HEAD as u64 {
            if torn_tail_ok {
                break;
            }
            return Err(damaged(offset, "truncated record header".into()));
        }
        let mut rh = [0u8; REC_HEAD];
        r.read_exact(&mut rh)
            .map_err(BackupError::io("read", path))?;
        let blen = u32::from_le_bytes([rh[0], rh[1], rh[2], rh[3]]);
        let crc = u32::from_le_bytes([rh[4], rh[5], rh[6], rh[7]]);
        if !(24..=MAX_BODY).contains(&blen) {
            return Err(damaged(offset, format!("impossible record length {blen}")));
        }
        if (blen as u64) > remaining - REC_HEAD as u64 {
            if torn_tail_ok {
                break;
            }
            return Err(damaged(offset, "truncated record".into()));
        }
        body.resize(blen as usize, 0);
        r.read_exact(&mut body)
            .map_err(BackupError::io("read", path))?;
        if crc32fast::hash(&body) != crc {
            return Err(damaged(offset, "record CRC mismatch".into()));
        }
        let rec = SegmentRecord {
            index: u64_at(&body, 0),
            term: u64_at(&body, 8),
            unix_ms: u64_at(&body, 16),
            entry: body[24..].to_vec(),
        };
        if rec.index != info.last + 1 {
            return Err(damaged(
                offset,
                format!("record index {} follows {}", rec.index, info.last),
            ));
        }
        if info.records == 0 {
            info.first_unix_ms = rec.unix_ms;
        }
        info.last = rec.index;
        info.last_unix_ms = rec.unix_ms;
        info.records += 1;
        offset += REC_HEAD as u64 + blen as u64;
        each(rec)?;
    }
    Ok((info, offset))
}

/// Lists every segment in `dir` (oldest first), checking each record and the chain: each
/// segment must start right after the previous one ends. `torn_tail_ok` applies to the last.
pub fn scan_all(
    dir: &Path,
    cluster_id: &str,
    torn_tail_ok: bool,
) -> Result<Vec<SegmentInfo>, BackupError> {
    let mut paths = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd {
                let e = e.map_err(BackupError::io("read", dir))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(i) = super::index_in_name(&name, "seg-", ".log") {
                    paths.push((i, e.path()));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(BackupError::io("read", dir)(e)),
    }
    paths.sort();
    let mut out: Vec<SegmentInfo> = Vec::new();
    let n = paths.len();
    for (k, (_, p)) in paths.into_iter().enumerate() {
        let (info, _) = read_segment(&p, cluster_id, torn_tail_ok && k + 1 == n, |_| Ok(()))?;
        if let Some(prev) = out.last() {
            if info.first <= prev.last {
                return Err(BackupError::Chain(format!(
                    "{} starts at index {}, inside {} (which ends at {})",
                    info.path.display(),
                    info.first,
                    prev.path.display(),
                    prev.last
                )));
            }
        }
        out.push(info);
    }
    Ok(out)
}

/// Segments must follow each other without a gap, unless a base backup bridges it (a new base
/// is taken when the log the stream needed was purged): a base `b` with
/// `next.first - 1 <= b <= next.last`. Anything else is a missing segment.
pub fn check_chain(segs: &[SegmentInfo], bases: &[u64]) -> Result<(), BackupError> {
    for w in segs.windows(2) {
        let (prev, next) = (&w[0], &w[1]);
        if next.first == prev.last + 1 {
            continue;
        }
        let bridged = bases
            .iter()
            .any(|&b| next.first.saturating_sub(1) <= b && b <= next.last);
        if !bridged {
            return Err(BackupError::Chain(format!(
                "gap: {} ends at index {}, {} starts at {} and no base backup covers the gap \
                 (a segment is missing)",
                prev.path.display(),
                prev.last,
                next.path.display(),
                next.first
            )));
        }
    }
    Ok(())
}

/// Appends records to rotating segments, fsyncing at most every `fsync_every` (and on
/// rotation and [`SegmentWriter::sync`]).
pub struct SegmentWriter {
    dir: PathBuf,
    cluster_id: String,
    max_bytes: u64,
    fsync_every: Duration,
    file: Option<(std::io::BufWriter<std::fs::File>, PathBuf, u64)>,
    last_index: Option<u64>,
    last_sync: Instant,
    dirty: bool,
}

impl SegmentWriter {
    /// Opens `dir` for appending after whatever it holds. A torn record at the end of the last
    /// segment (an interrupted append) is cut off. Returns the writer and the last index held.
    pub fn resume(
        dir: &Path,
        cluster_id: &str,
        max_bytes: u64,
        fsync_every: Duration,
    ) -> Result<(SegmentWriter, Option<u64>, Option<String>), BackupError> {
        std::fs::create_dir_all(dir).map_err(BackupError::io("create", dir))?;
        let segs = scan_all(dir, cluster_id, true)?;
        let mut note = None;
        let mut w = SegmentWriter {
            dir: dir.to_path_buf(),
            cluster_id: cluster_id.to_string(),
            max_bytes,
            fsync_every,
            file: None,
            last_index: None,
            last_sync: Instant::now(),
            dirty: false,
        };
        if let Some(last) = segs.last() {
            let (info, valid) = read_segment(&last.path, cluster_id, true, |_| Ok(()))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&last.path)
                .map_err(BackupError::io("open", &last.path))?;
            if valid < info.bytes || valid < HEADER_LEN {
                note = Some(format!(
                    "{}: cut a torn record at byte {valid} (an interrupted append)",
                    last.path.display()
                ));
                if valid < HEADER_LEN {
                    f.set_len(0)
                        .map_err(BackupError::io("truncate", &last.path))?;
                    f.write_all(&header(cluster_id))
                        .map_err(BackupError::io("write", &last.path))?;
                } else {
                    f.set_len(valid)
                        .map_err(BackupError::io("truncate", &last.path))?;
                }
                f.sync_all().map_err(BackupError::io("fsync", &last.path))?;
            }
            let end = f
                .seek(SeekFrom::End(0))
                .map_err(BackupError::io("seek", &last.path))?;
            w.last_index = if info.records > 0 || segs.len() > 1 {
                Some(info.last)
            } else {
                None
            };
            w.file = Some((
                std::io::BufWriter::with_capacity(1 << 20, f),
                last.path.clone(),
                end,
            ));
        }
        let last = w.last_index;
        Ok((w, last, note))
    }

    pub fn last_index(&self) -> Option<u64> {
        self.last_index
    }

    /// Starts the next segment at `first`.
    fn rotate(&mut self, first: u64) -> Result<(), BackupError> {
        self.sync()?;
        let p = self.dir.join(format!("seg-{first:020}.log"));
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&p)
            .map_err(BackupError::io("create", &p))?;
        f.write_all(&header(&self.cluster_id))
            .map_err(BackupError::io("write", &p))?;
        f.sync_all().map_err(BackupError::io("fsync", &p))?;
        sync_dir(&self.dir)?;
        self.file = Some((std::io::BufWriter::with_capacity(1 << 20, f), p, HEADER_LEN));
        Ok(())
    }

    pub fn append(&mut self, rec: &SegmentRecord) -> Result<(), BackupError> {
        if let Some(last) = self.last_index {
            if rec.index != last + 1 {
                return Err(BackupError::Chain(format!(
                    "record {} does not follow {last}",
                    rec.index
                )));
            }
        }
        let full = match &self.file {
            None => true,
            Some((_, _, bytes)) => *bytes >= self.max_bytes,
        };
        if full {
            self.rotate(rec.index)?;
        }
        let b = encode(rec);
        if let Some((f, p, bytes)) = self.file.as_mut() {
            f.write_all(&b).map_err(BackupError::io("write", p))?;
            *bytes += b.len() as u64;
        }
        self.last_index = Some(rec.index);
        self.dirty = true;
        if self.last_sync.elapsed() >= self.fsync_every {
            self.sync()?;
        }
        Ok(())
    }

    pub fn sync(&mut self) -> Result<(), BackupError> {
        if self.dirty {
            if let Some((f, p, _)) = self.file.as_mut() {
                f.flush().map_err(BackupError::io("write", p))?;
                let f = f.get_ref();
                f.sync_data().map_err(BackupError::io("fsync", p))?;
            }
            self.dirty = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Ends the current segment so the next record starts a new one (after a new base, a gap
    /// is never bridged inside one file).
    pub fn close(&mut self) -> Result<(), BackupError> {
        self.sync()?;
        self.file = None;
        self.last_index = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u64) -> SegmentRecord {
        SegmentRecord {
            index: i,
            term: 2,
            unix_ms: 1000 + i,
            entry: vec![i as u8; 40],
        }
    }

    #[test]
    fn append_rotate_resume_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, last, _) = SegmentWriter::resume(d.path(), "c1", 300, Duration::ZERO).unwrap();
        assert_eq!(last, None);
        for i in 5..20 {
            w.append(&rec(i)).unwrap();
        }
        w.sync().unwrap();
        drop(w);
        let segs = scan_all(d.path(), "c1", false).unwrap();
        assert!(segs.len() > 1, "rotated");
        assert_eq!(segs[0].first, 5);
        assert_eq!(segs.last().unwrap().last, 19);
        let (mut w, last, note) =
            SegmentWriter::resume(d.path(), "c1", 300, Duration::ZERO).unwrap();
        assert_eq!(last, Some(19));
        assert!(note.is_none());
        assert!(w.append(&rec(21)).is_err(), "a gap is refused");
        w.append(&rec(20)).unwrap();
        let mut seen = Vec::new();
        for s in scan_all(d.path(), "c1", false).unwrap() {
            read_segment(&s.path, "c1", false, |r| {
                seen.push(r);
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(seen, (5..21).map(rec).collect::<Vec<_>>());
    }

    #[test]
    fn torn_tail_is_cut_on_resume_but_damage_elsewhere_is_named() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, ..) = SegmentWriter::resume(d.path(), "c1", 1 << 20, Duration::ZERO).unwrap();
        for i in 1..=3 {
            w.append(&rec(i)).unwrap();
        }
        drop(w);
        let p = d.path().join(format!("seg-{:020}.log", 1));
        let len = std::fs::metadata(&p).unwrap().len();
        // Torn: the last record half written.
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 10).unwrap();
        let e = scan_all(d.path(), "c1", false).unwrap_err().to_string();
        assert!(e.contains("truncated record"), "{e}");
        let (_, last, note) =
            SegmentWriter::resume(d.path(), "c1", 1 << 20, Duration::ZERO).unwrap();
        assert_eq!(last, Some(2));
        assert!(note.unwrap().contains("torn"));
        // A flipped byte inside a record is damage with its offset.
        let mut b = std::fs::read(&p).unwrap();
        b[HEADER_LEN as usize + 20] ^= 0xff;
        std::fs::write(&p, &b).unwrap();
        let e = scan_all(d.path(), "c1", false).unwrap_err().to_string();
        assert!(e.contains("offset 32") && e.contains("CRC"), "{e}");
        // Another cluster's segment is refused.
        std::fs::write(&p, header("other")).unwrap();
        let e = scan_all(d.path(), "c1", false).unwrap_err().to_string();
        assert!(e.contains("belongs to cluster"), "{e}");
    }

    #[test]
    fn missing_segment_is_a_gap() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, ..) = SegmentWriter::resume(d.path(), "c1", 100, Duration::ZERO).unwrap();
        for i in 1..=12 {
            w.append(&rec(i)).unwrap();
        }
        drop(w);
        let segs = scan_all(d.path(), "c1", false).unwrap();
        assert!(segs.len() >= 3);
        std::fs::remove_file(&segs[1].path).unwrap();
        let segs2 = scan_all(d.path(), "c1", false).unwrap();
        let e = check_chain(&segs2, &[]).unwrap_err().to_string();
        assert!(e.contains("gap") && e.contains("missing"), "{e}");
        // A base inside the gap bridges it.
        check_chain(&segs2, &[segs[2].first - 1]).unwrap();
    }

    #[test]
    fn a_segment_named_for_index_zero_is_refused_not_a_panic() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, ..) = SegmentWriter::resume(d.path(), "c1", 1 << 20, Duration::ZERO).unwrap();
        w.append(&rec(1)).unwrap();
        drop(w);
        let seg = scan_all(d.path(), "c1", false).unwrap().remove(0).path;
        let zero = seg.with_file_name(format!("seg-{:020}.log", 0));
        std::fs::rename(&seg, &zero).unwrap();
        for torn_tail_ok in [false, true] {
            let e = read_segment(&zero, "c1", torn_tail_ok, |_| Ok(())).unwrap_err();
            assert!(e.to_string().contains("not a segment file name"), "{e}");
        }
    }
}
