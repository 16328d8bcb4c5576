//! Small file helpers shared by the layers that stream files (snapshots, backups).

use std::io::Read;

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

#[cfg(test)]
mod tests {
    #[test]
    fn fills_across_short_reads() {
        let data: Vec<u8> = (0..10).collect();
        // A reader that returns one byte at a time.
        struct Slow<'a>(&'a [u8]);
        impl std::io::Read for Slow<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0.is_empty() || buf.is_empty() {
                    return Ok(0);
                }
                buf[0] = self.0[0];
                self.0 = &self.0[1..];
                Ok(1)
            }
        }
        let mut buf = [0u8; 4];
        let mut r = Slow(&data);
        assert_eq!(super::read_full(&mut r, &mut buf).unwrap(), 4);
        assert_eq!(buf, [0, 1, 2, 3]);
        let mut big = [0u8; 20];
        assert_eq!(super::read_full(&mut r, &mut big).unwrap(), 6);
    }
}
