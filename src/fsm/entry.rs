//! One log entry in, its mutations staged and its response out: every per-entry decision of the
//! state machine lives here (format checks, request-id expiry, blank and membership entries, the
//! cluster id). Storage only supplies the state and writes what was staged.

use serde::Serialize;

use super::{apply, encode, expire, meta, Dedup, FsmError, Mutation, Request, Response, StateRead};
use super::{Command, COMMAND_FORMAT_VERSION};
use crate::keys;

/// What a log entry carries, as far as the state machine cares. `M` is the membership as it is
/// stored (storage names openraft's type; the state machine only encodes it).
pub enum Payload<'a, M> {
    Blank,
    Normal(&'a Request),
    Membership(&'a M),
}

/// Where an entry's mutations go. Reads through [`Staging::state`] must see everything staged
/// before, exactly as if each entry had been written on its own (whatever the batch boundaries).
pub trait Staging {
    fn state(&self) -> impl StateRead + '_;
    fn stage(&mut self, mutations: Vec<Mutation>);
}

/// What applying one entry decided besides its staged mutations.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub response: Response,
    /// The cluster id this entry set: the first membership entry derives it, the same on every
    /// replica. The caller publishes it to whoever reads the lineage (storage does so at once).
    pub cluster_id: Option<String>,
}

/// Applies the entry at `index`. A command in a format newer than this binary knows is
/// [`FsmError::UnsupportedFormat`]: the node must stop rather than apply it differently from
/// its peers.
pub fn apply_entry<M: Serialize>(
    stage: &mut impl Staging,
    index: u64,
    payload: Payload<'_, M>,
    dedup: Dedup,
) -> Result<Applied, FsmError> {
    let expired = expire(&stage.state(), index, dedup)?;
    stage.stage(expired);
    let mut cluster_id = None;
    let response = match payload {
        Payload::Blank => Response::None { revision: index },
        Payload::Normal(req) => {
            check_format(index, req)?;
            let (mutations, response) = apply(&stage.state(), index, req, dedup)?;
            stage.stage(mutations);
            response
        }
        Payload::Membership(membership) => {
            let stored = encode(membership)?;
            let has_id = stage.state().get_raw(keys::SM_META_CLUSTER_ID)?.is_some();
            let mut mutations = Vec::with_capacity(2);
            if !has_id {
                let id = lineage_id(&stored);
                mutations.push(Mutation::Put(
                    keys::SM_META_CLUSTER_ID.to_vec(),
                    id.clone().into_bytes(),
                ));
                cluster_id = Some(id);
            }
            mutations.insert(0, Mutation::Put(keys::SM_META_MEMBERSHIP.to_vec(), stored));
            stage.stage(mutations);
            Response::None { revision: index }
        }
    };
    Ok(Applied {
        response,
        cluster_id,
    })
}

/// Refuses a command, or a metadata op inside one, newer than this binary knows.
fn check_format(index: u64, req: &Request) -> Result<(), FsmError> {
    if req.format_version > COMMAND_FORMAT_VERSION {
        return Err(FsmError::UnsupportedFormat {
            index,
            version: req.format_version,
            supported: COMMAND_FORMAT_VERSION,
        });
    }
    if let Command::Meta { format, .. } = &req.command {
        if *format > meta::META_FORMAT_VERSION {
            return Err(FsmError::UnsupportedFormat {
                index,
                version: *format,
                supported: meta::META_FORMAT_VERSION,
            });
        }
    }
    Ok(())
}

/// A cluster lineage id: 16 hex digits derived from `material` (the first membership entry, or
/// random bytes for a new lineage).
pub fn lineage_id(material: &[u8]) -> String {
    let a = crc32fast::hash(material) as u64;
    let mut h = crc32fast::Hasher::new_with_initial(0x9e37_79b9);
    h.update(material);
    format!("{:016x}", (a << 32) | h.finalize() as u64)
}
