//! Shipping the files of a checkpoint, for snapshot transfer between members (`net::snapshot`)
//! and for base backups (`api::backup` sends, `backup::base` receives): listing them with sizes
//! and CRC32s, reading them as CRC'd chunks, refusing unsafe names, receiving each file with
//! every check as its chunks land, and moving a finished directory into place durably.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Bytes per shipped chunk.
pub const CHUNK_SIZE: usize = 1 << 20;

/// One file of a checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedFile {
    pub name: String,
    pub size: u64,
    pub crc32: u32,
    pub path: PathBuf,
}

/// Lists the regular files of `dir`, sorted by name, with their sizes and CRC32s.
pub fn list_files(dir: &Path) -> std::io::Result<Vec<ListedFile>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if !e.file_type()?.is_file() {
            continue;
        }
        let (size, crc32) = file_crc(&e.path())?;
        out.push(ListedFile {
            name: e.file_name().to_string_lossy().into_owned(),
            size,
            crc32,
            path: e.path(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn file_crc(path: &Path) -> std::io::Result<(u64, u32)> {
    let mut f = File::open(path)?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    Ok((n, h.finalize()))
}

/// Total size of the files of a directory (0 if it cannot be read: the transfer then reports
/// the real error). Metadata only: the CRCs are computed once, by the transfer itself.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// One chunk read from a listed file.
pub struct Chunk {
    pub file_index: u32,
    pub offset: u64,
    pub data: Vec<u8>,
    pub crc32: u32,
}

/// Reads `files` in order as chunks of at most [`CHUNK_SIZE`] bytes and hands each to `sink`,
/// which returns false to stop (its receiver went away). An empty file yields no chunk.
pub fn read_chunks(
    files: &[ListedFile],
    mut sink: impl FnMut(Chunk) -> bool,
) -> Result<(), (PathBuf, std::io::Error)> {
    for (i, f) in files.iter().enumerate() {
        let mut file = File::open(&f.path).map_err(|e| (f.path.clone(), e))?;
        let mut offset = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK_SIZE];
            let n = read_full(&mut file, &mut buf).map_err(|e| (f.path.clone(), e))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            let crc32 = crc32fast::hash(&buf);
            let chunk = Chunk {
                file_index: i as u32,
                offset,
                data: buf,
                crc32,
            };
            if !sink(chunk) {
                return Ok(());
            }
            offset += n as u64;
        }
    }
    Ok(())
}

/// Reads until `buf` is full or the file ends; returns how many bytes were read.
pub fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

/// Whether a name sent by a peer or a backup stream may become a file name in the receiving
/// directory: one plain component, no way out of it.
pub fn safe_name(n: &str) -> bool {
    !n.is_empty()
        && n != "."
        && n != ".."
        && !n.contains('/')
        && !n.contains('\\')
        && !n.contains('\0')
}

/// Why a received chunk or file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk at offset {offset} has a bad CRC")]
    BadCrc { offset: u64 },
    #[error("chunk at offset {offset}, expected {expected}")]
    Offset { offset: u64, expected: u64 },
    #[error("more data than the {size} bytes announced")]
    TooLong { size: u64 },
    #[error("received {got} bytes, {size} announced")]
    Short { got: u64, size: u64 },
    #[error("file CRC mismatch")]
    FileCrc,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One file being received: every chunk is checked as it lands (its CRC, its offset, the
/// announced size), and [`IncomingFile::finish`] checks the whole file and fsyncs it.
pub struct IncomingFile {
    path: PathBuf,
    file: File,
    size: u64,
    crc32: u32,
    written: u64,
    hasher: crc32fast::Hasher,
}

impl IncomingFile {
    /// Creates `path` for a file announced as `size` bytes with CRC32 `crc32`.
    pub fn create(path: PathBuf, size: u64, crc32: u32) -> Result<IncomingFile, ChunkError> {
        let file = File::create(&path).map_err(|source| ChunkError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(IncomingFile {
            path,
            file,
            size,
            crc32,
            written: 0,
            hasher: crc32fast::Hasher::new(),
        })
    }

    /// Checks and appends one chunk.
    pub fn write(&mut self, offset: u64, data: &[u8], crc32: u32) -> Result<(), ChunkError> {
        if crc32fast::hash(data) != crc32 {
            return Err(ChunkError::BadCrc { offset });
        }
        if offset != self.written {
            return Err(ChunkError::Offset {
                offset,
                expected: self.written,
            });
        }
        if self.written + data.len() as u64 > self.size {
            return Err(ChunkError::TooLong { size: self.size });
        }
        self.file.write_all(data).map_err(|source| ChunkError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.hasher.update(data);
        self.written += data.len() as u64;
        Ok(())
    }

    /// Checks the whole file against what was announced and fsyncs it.
    pub fn finish(self) -> Result<(), ChunkError> {
        if self.written != self.size {
            return Err(ChunkError::Short {
                got: self.written,
                size: self.size,
            });
        }
        if self.hasher.finalize() != self.crc32 {
            return Err(ChunkError::FileCrc);
        }
        self.file.sync_all().map_err(|source| ChunkError::Io {
            path: self.path,
            source,
        })
    }
}

/// Moves a fully written directory into place durably: fsync it, rename it to `fin`, fsync the
/// directory that holds `fin`. Returns the path that failed with the error.
pub fn publish(tmp: &Path, fin: &Path) -> Result<(), (PathBuf, std::io::Error)> {
    sync_dir(tmp).map_err(|e| (tmp.to_path_buf(), e))?;
    std::fs::rename(tmp, fin).map_err(|e| (fin.to_path_buf(), e))?;
    if let Some(parent) = fin.parent() {
        sync_dir(parent).map_err(|e| (parent.to_path_buf(), e))?;
    }
    Ok(())
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_full_fills_across_short_reads() {
        struct Slow<'a>(&'a [u8]);
        impl Read for Slow<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(3);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut buf = [0u8; 10];
        assert_eq!(
            read_full(&mut Slow(b"abcdefghijkl"), &mut buf).expect("read"),
            10
        );
        assert_eq!(&buf, b"abcdefghij");
        assert_eq!(read_full(&mut Slow(b"ab"), &mut buf).expect("read"), 2);
    }

    #[test]
    fn listed_files_read_back_as_chunks_that_receive_intact() {
        let src = tempfile::tempdir().expect("tmp");
        let big: Vec<u8> = (0..CHUNK_SIZE + 17).map(|i| (i % 251) as u8).collect();
        std::fs::write(src.path().join("b.sst"), &big).expect("write");
        std::fs::write(src.path().join("a.meta"), b"meta").expect("write");
        std::fs::write(src.path().join("empty"), b"").expect("write");
        std::fs::create_dir(src.path().join("sub")).expect("mkdir");
        let files = list_files(src.path()).expect("list");
        let names: Vec<_> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.meta", "b.sst", "empty"]);
        assert_eq!(dir_bytes(src.path()), big.len() as u64 + 4);

        let dst = tempfile::tempdir().expect("tmp");
        let tmp = dst.path().join("incoming");
        std::fs::create_dir(&tmp).expect("mkdir");
        let mut incoming: Vec<IncomingFile> = files
            .iter()
            .map(|f| IncomingFile::create(tmp.join(&f.name), f.size, f.crc32).expect("create"))
            .collect();
        let mut chunks = 0;
        read_chunks(&files, |c| {
            chunks += 1;
            incoming[c.file_index as usize]
                .write(c.offset, &c.data, c.crc32)
                .expect("chunk");
            true
        })
        .expect("read");
        assert_eq!(
            chunks, 3,
            "two chunks of the big file, one of the small, none empty"
        );
        for f in incoming {
            f.finish().expect("finish");
        }
        let fin = dst.path().join("final");
        publish(&tmp, &fin).expect("publish");
        assert_eq!(std::fs::read(fin.join("b.sst")).expect("read"), big);
    }

    #[test]
    fn every_bad_chunk_and_short_or_damaged_file_is_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let data = b"abcdef";
        let crc = crc32fast::hash(data);
        let open = |n: &str, size, crc| IncomingFile::create(d.path().join(n), size, crc);
        let mut f = open("a", 6, crc).expect("create");
        assert!(matches!(
            f.write(0, data, crc ^ 1),
            Err(ChunkError::BadCrc { .. })
        ));
        assert!(matches!(
            f.write(2, data, crc),
            Err(ChunkError::Offset { expected: 0, .. })
        ));
        let mut f = open("b", 3, crc).expect("create");
        assert!(matches!(
            f.write(0, data, crc),
            Err(ChunkError::TooLong { .. })
        ));
        let mut f = open("c", 6, crc).expect("create");
        f.write(0, &data[..2], crc32fast::hash(&data[..2]))
            .expect("chunk");
        let e = f.finish().expect_err("short");
        assert!(e.to_string().contains("received 2 bytes"), "{e}");
        let mut f = open("d", 6, crc ^ 1).expect("create");
        f.write(0, data, crc).expect("chunk");
        assert!(matches!(f.finish(), Err(ChunkError::FileCrc)));
        for bad in ["", ".", "..", "../x", "a/b", "a\\b", "nul\0"] {
            assert!(!safe_name(bad), "{bad:?}");
        }
        assert!(safe_name("000123.sst"));
    }
}
