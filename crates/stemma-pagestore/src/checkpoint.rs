//! Index checkpoints: the whole in-memory index as of a position, so that `open` replays only
//! the frames after it, and so that compaction can delete log segments (their metadata lives
//! on in the checkpoint, their live pages in pack files).
//!
//! ```text
//! <dir>/checkpoint/<lsn, 20 digits>.ckpt
//!   0   8  magic "STMPGCKP"
//!   8   4  format version (1)
//!   12  4  zero
//!   16  8  LSN: the last frame the checkpoint covers
//!   24  8  payload length
//!   32  4  CRC-32 of the payload
//!   36  4  CRC-32 of bytes 0..36
//!   40  …  payload: postcard (serde) encoding of `Snapshot`
//! ```
//!
//! Written to `<name>.tmp`, fsynced, renamed, and the directory fsynced: a checkpoint file
//! with its final name is whole. The log is made durable up to the checkpoint's position
//! before the checkpoint is written, so a checkpoint never covers frames a power loss could
//! take away.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::log::sync_dir;
use crate::state::{Extent, State, Timeline, Versions};
use crate::types::{Ino, Lsn, TimelineId};

const MAGIC: &[u8; 8] = b"STMPGCKP";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 40;

pub(crate) fn checkpoint_dir(store_dir: &Path) -> PathBuf {
    store_dir.join("checkpoint")
}

fn checkpoint_path(dir: &Path, lsn: Lsn) -> PathBuf {
    dir.join(format!("{lsn:020}.ckpt"))
}

/// What a checkpoint holds: a copy of the index as of one position.
#[derive(Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub next_lsn: Lsn,
    pub next_ino: Ino,
    pub last_time_ns: i64,
    pub gc_horizon: Lsn,
    /// Where the log went on after the checkpoint's last frame: segment and byte offset.
    pub log_seg: u32,
    pub log_off: u64,
    pub time_entries: Vec<(i64, Lsn)>,
    pub timelines: Vec<Timeline>,
    /// Encoded after the rest (a second postcard value), so that checkpoints written before
    /// external files existed still load: their payload simply ends earlier.
    #[serde(skip)]
    pub next_object: u64,
    #[serde(skip)]
    pub externals: Externals,
}

/// Every external file's versions, by timeline and inode (see `external.rs`).
pub(crate) type Externals = Vec<(TimelineId, Ino, Versions<Extent>)>;

/// The part of a checkpoint after `Snapshot`'s own fields.
#[derive(Serialize, Deserialize)]
struct Trailer {
    next_object: u64,
    externals: Externals,
}

/// Copies the index (call under the state lock), sharing every inode's versions with it
/// (see [`crate::state::SharedIndex`]): O(inodes), so the lock is held for that only, and the
/// encoding runs without it (measured in `examples/maintain.rs`).
pub(crate) fn snapshot(st: &State) -> Snapshot {
    let mut timelines: Vec<Timeline> = st.timelines.values().cloned().collect();
    timelines.sort_by_key(|t| t.id);
    Snapshot {
        next_lsn: st.next_lsn,
        next_ino: st.next_ino,
        last_time_ns: st.last_time_ns,
        gc_horizon: st.gc_horizon,
        log_seg: st.log.active().no,
        log_off: st.log.active_len,
        time_entries: st.time_index.entries.clone(),
        next_object: st.next_object,
        externals: timelines
            .iter()
            .flat_map(|t| {
                t.inodes
                    .iter()
                    .filter(|(_, ii)| !ii.external.is_empty())
                    .map(|(ino, ii)| (t.id, *ino, ii.external.clone()))
            })
            .collect(),
        timelines,
    }
}

/// Encodes a snapshot: the checkpoint's last LSN and the file's bytes.
pub(crate) fn encode(snap: &Snapshot) -> Result<(Lsn, Vec<u8>)> {
    let lsn = snap.next_lsn - 1;
    let trailer = Trailer {
        next_object: snap.next_object,
        externals: snap.externals.clone(),
    };
    let out = postcard::to_extend(snap, vec![0u8; HEADER_LEN]).map_err(|e| {
        Error::InvalidArgument(format!("encoding the index checkpoint at {lsn}: {e}"))
    })?;
    let mut out = postcard::to_extend(&trailer, out).map_err(|e| {
        Error::InvalidArgument(format!("encoding the index checkpoint at {lsn}: {e}"))
    })?;
    let payload_len = (out.len() - HEADER_LEN) as u64;
    let payload_crc = crc32fast::hash(&out[HEADER_LEN..]);
    out[0..8].copy_from_slice(MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[16..24].copy_from_slice(&lsn.to_le_bytes());
    out[24..32].copy_from_slice(&payload_len.to_le_bytes());
    out[32..36].copy_from_slice(&payload_crc.to_le_bytes());
    let crc = crc32fast::hash(&out[0..36]);
    out[36..40].copy_from_slice(&crc.to_le_bytes());
    Ok((lsn, out))
}

/// Writes a checkpoint durably: temporary name, fsync, rename, fsync of the directory.
pub(crate) fn write(dir: &Path, lsn: Lsn, bytes: &[u8]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(Error::io("creating the checkpoint directory", dir))?;
    let path = checkpoint_path(dir, lsn);
    let tmp = path.with_extension("ckpt.tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(Error::io("creating a checkpoint", &tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(Error::io("writing a checkpoint", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(Error::io("renaming a checkpoint into place", &path))?;
    sync_dir(dir)?;
    Ok(path)
}

/// The checkpoints in `dir`, oldest first, and the leftovers of interrupted writes.
/// Checkpoints by position, oldest first.
pub(crate) type Checkpoints = Vec<(Lsn, PathBuf)>;

pub(crate) fn list(dir: &Path) -> Result<(Checkpoints, Vec<PathBuf>)> {
    let mut found = Vec::new();
    let mut tmp = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((found, tmp)),
        Err(e) => return Err(Error::io("listing checkpoints", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(Error::io("listing checkpoints", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".tmp") {
            tmp.push(entry.path());
        } else if let Some(lsn) = name
            .strip_suffix(".ckpt")
            .and_then(|n| n.parse::<Lsn>().ok())
        {
            found.push((lsn, entry.path()));
        }
    }
    found.sort();
    Ok((found, tmp))
}

/// Reads and checks one checkpoint. Any damage is corruption: a checkpoint under its final
/// name was fsynced whole before the rename.
pub(crate) fn load(path: &Path, lsn: Lsn) -> Result<Snapshot> {
    let corrupt = |offset: u64, reason: String| Error::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let bytes = std::fs::read(path).map_err(Error::io("reading a checkpoint", path))?;
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(0, "shorter than a checkpoint header".into()));
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i..i + 8]);
        u64::from_le_bytes(b)
    };
    if &bytes[0..8] != MAGIC {
        return Err(corrupt(0, "not a checkpoint (bad magic)".into()));
    }
    if u32_at(36) != crc32fast::hash(&bytes[0..36]) {
        return Err(corrupt(0, "checkpoint header checksum mismatch".into()));
    }
    if u32_at(8) != VERSION {
        return Err(corrupt(
            8,
            format!(
                "checkpoint format version {}, this build reads {VERSION}",
                u32_at(8)
            ),
        ));
    }
    if u64_at(16) != lsn {
        return Err(corrupt(
            16,
            format!("header says position {}, the name {lsn}", u64_at(16)),
        ));
    }
    let payload = &bytes[HEADER_LEN..];
    if u64_at(24) != payload.len() as u64 {
        return Err(corrupt(
            24,
            format!(
                "payload of {} bytes where the header says {}",
                payload.len(),
                u64_at(24)
            ),
        ));
    }
    if u32_at(32) != crc32fast::hash(payload) {
        return Err(corrupt(
            HEADER_LEN as u64,
            "checkpoint checksum mismatch".into(),
        ));
    }
    let (mut snap, rest): (Snapshot, &[u8]) = postcard::take_from_bytes(payload)
        .map_err(|e| corrupt(HEADER_LEN as u64, format!("undecodable checkpoint: {e}")))?;
    if !rest.is_empty() {
        let t: Trailer = postcard::from_bytes(rest)
            .map_err(|e| corrupt(HEADER_LEN as u64, format!("undecodable checkpoint: {e}")))?;
        snap.next_object = t.next_object;
        snap.externals = t.externals;
    }
    if snap.next_lsn != lsn + 1 {
        return Err(corrupt(
            HEADER_LEN as u64,
            format!(
                "checkpoint of position {lsn} says the next is {}",
                snap.next_lsn
            ),
        ));
    }
    Ok(snap)
}

/// Removes every checkpoint but `keep`, and leftovers of interrupted writes.
pub(crate) fn remove_all_but(dir: &Path, keep: Lsn) -> Result<()> {
    let (found, tmp) = list(dir)?;
    let mut removed = false;
    for path in found
        .into_iter()
        .filter(|(l, _)| *l != keep)
        .map(|(_, p)| p)
        .chain(tmp)
    {
        match std::fs::remove_file(&path) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("removing an old checkpoint", &path)(e)),
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Size of a file, for reports; 0 when it cannot be read.
pub(crate) fn file_len(f: &File) -> u64 {
    f.metadata().map_or(0, |m| m.len())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::state::Loc;

    /// The pages of an inode moved from a `BTreeMap` to a persistent `imbl::OrdMap`; both
    /// must encode to the same bytes, so that checkpoints written before still load.
    #[test]
    fn a_persistent_page_map_encodes_like_the_btree_map_it_replaced() {
        let mut old: BTreeMap<u64, Vec<(u64, Loc)>> = BTreeMap::new();
        let mut new: imbl::OrdMap<u64, Vec<(u64, Loc)>> = imbl::OrdMap::new();
        for page in (0..5000u64).rev().step_by(3) {
            let v = vec![
                (page * 7, Loc::Zero),
                (page * 7 + 1, Loc::Data { file: 3, off: page }),
            ];
            old.insert(page, v.clone());
            new.insert(page, v);
        }
        let a = postcard::to_allocvec(&old).expect("encode");
        let b = postcard::to_allocvec(&new).expect("encode");
        assert_eq!(a, b);
        let back: imbl::OrdMap<u64, Vec<(u64, Loc)>> = postcard::from_bytes(&a).expect("decode");
        assert_eq!(back, new);
    }
}
