//! The one binary encoding of commands, log entries, records and peer messages: bincode 2
//! (standard config) through serde. A leaf: it names no other module of the crate.

use serde::Serialize;

/// Encode with bincode 2 (standard config) through serde.
///
/// Sized first, then written into a buffer of exactly that size: bincode's `encode_to_vec` grows
/// its buffer from empty by doubling, six reallocations and copies for a 300-byte log entry, and
/// every write is encoded several times (log entry, replication, value and dedup records).
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
    let config = bincode::config::standard();
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(v, &mut size, config)?;
    let mut out = ExactVec(Vec::with_capacity(size.bytes_written));
    bincode::serde::encode_into_writer(v, &mut out, config)?;
    Ok(out.0)
}

/// A bincode writer appending to a Vec sized beforehand.
struct ExactVec(Vec<u8>);

impl bincode::enc::write::Writer for ExactVec {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Decode the leading fields of a bincode 2 value (a prefix struct); the rest is ignored.
pub fn decode_prefix<T: serde::de::DeserializeOwned>(
    b: &[u8],
) -> Result<T, bincode::error::DecodeError> {
    Ok(bincode::serde::decode_from_slice(b, bincode::config::standard())?.0)
}

/// Decode bincode 2; trailing bytes are an error.
pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, bincode::error::DecodeError> {
    let (v, n) = bincode::serde::decode_from_slice(b, bincode::config::standard())?;
    whole(b, n)?;
    Ok(v)
}

/// [`decode`] into a value that borrows from `b` (byte fields are not copied).
pub fn decode_borrowed<'de, T: serde::Deserialize<'de>>(
    b: &'de [u8],
) -> Result<T, bincode::error::DecodeError> {
    let (v, n) = bincode::serde::borrow_decode_from_slice(b, bincode::config::standard())?;
    whole(b, n)?;
    Ok(v)
}

/// Whether a decode of `b` that read `n` bytes consumed all of it.
fn whole(b: &[u8], n: usize) -> Result<(), bincode::error::DecodeError> {
    if n != b.len() {
        return Err(bincode::error::DecodeError::OtherString(format!(
            "{} trailing bytes",
            b.len() - n
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        /// The sized encoding is byte for byte bincode's own, in a buffer of exactly its length.
        #[test]
        fn sized_encoding_equals_bincodes(
            key in proptest::collection::vec(any::<u8>(), 0..600),
            text in ".{0,80}",
            n in any::<u64>(),
            opt in any::<Option<u32>>(),
        ) {
            let v = (serde_bytes::ByteBuf::from(key), text, n, opt);
            let ours = super::encode(&v).expect("encode");
            let theirs = bincode::serde::encode_to_vec(&v, bincode::config::standard()).expect("encode");
            prop_assert_eq!(&ours, &theirs);
            prop_assert_eq!(ours.capacity(), ours.len());
        }
    }
}
