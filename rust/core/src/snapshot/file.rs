//! A snapshot on disk: a directory with a state file and a memory file.
//!
//! The state file starts with one line, `kvmkit-snapshot <version> <crc32> <length>`, followed by
//! `length` bytes of JSON whose CRC-32 is `crc32`: the [`MachineState`], the memory layout, and
//! whatever the embedder keeps to rebuild the VM's devices. JSON keeps the file readable and lets
//! later versions add fields; the header catches a file that is cut short or damaged before any
//! of it is believed. The memory file is guest memory, flat and sparse.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{MachineSnapshot, MachineState, SnapshotError};
use crate::vstate::memory::MemoryImage;

/// The format version this kvmkit writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &str = "kvmkit-snapshot";
const STATE_FILE: &str = "state";
const MEMORY_FILE: &str = "memory";

#[derive(Serialize, Deserialize)]
struct StateFile {
    machine: MachineState,
    memory: MemoryLayout,
    /// What the embedder needs to rebuild the VM (its devices, say), opaque here.
    #[serde(default)]
    embedder: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
struct MemoryLayout {
    file: String,
    /// `(guest address, size)` per region, in address order.
    regions: Vec<(u64, u64)>,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { what, source }
}

impl MachineSnapshot {
    /// Writes the snapshot into directory `dir` (created if needed), with `embedder` kept beside
    /// the state for whoever loads it.
    pub fn save(&self, dir: &Path, embedder: &serde_json::Value) -> Result<(), SnapshotError> {
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create snapshot directory {}", dir.display())))?;
        self.memory.save(&dir.join(MEMORY_FILE))?;
        let state = StateFile {
            machine: self.state.clone(),
            memory: MemoryLayout { file: MEMORY_FILE.into(), regions: self.memory.regions() },
            embedder: embedder.clone(),
        };
        let body = serde_json::to_vec(&state).map_err(|e| io("cannot encode a snapshot".into())(e.into()))?;
        let header = format!("{MAGIC} {FORMAT_VERSION} {:08x} {}\n", crc32fast::hash(&body), body.len());
        let path = dir.join(STATE_FILE);
        let partial = dir.join(format!("{STATE_FILE}.partial"));
        let what = format!("cannot write snapshot state file {}", path.display());
        std::fs::write(&partial, [header.as_bytes(), &body].concat()).map_err(io(what.clone()))?;
        std::fs::rename(&partial, &path).map_err(io(what))
    }

    /// Reads a snapshot saved by [`save`](Self::save) and what the embedder kept with it. Memory is
    /// not read: a VM made from the snapshot maps the memory file and reads pages as the guest
    /// touches them.
    pub fn load(dir: &Path) -> Result<(Self, serde_json::Value), SnapshotError> {
        let path = dir.join(STATE_FILE);
        let shown = path.display().to_string();
        let bytes = std::fs::read(&path).map_err(io(format!("cannot read snapshot state file {shown}")))?;
        let body = check_header(&bytes, &shown)?;
        let corrupt = |reason: String| SnapshotError::Corrupt { path: shown.clone(), reason };
        let state: StateFile = serde_json::from_slice(body).map_err(|e| corrupt(e.to_string()))?;
        if state.memory.file.contains('/') || state.memory.file.is_empty() {
            return Err(corrupt(format!("bad memory file name {:?}", state.memory.file)));
        }
        let memory = MemoryImage::open(&dir.join(&state.memory.file), &state.memory.regions)?;
        Ok((Self { state: state.machine, memory }, state.embedder))
    }
}

/// The body of a state file after a header that says it is whole and of this version.
fn check_header<'a>(bytes: &'a [u8], path: &str) -> Result<&'a [u8], SnapshotError> {
    let not_a_snapshot = || SnapshotError::NotASnapshot { path: path.to_owned() };
    let end = bytes.iter().take(128).position(|&b| b == b'\n').ok_or_else(not_a_snapshot)?;
    let header = std::str::from_utf8(&bytes[..end]).map_err(|_| not_a_snapshot())?;
    let fields: Vec<&str> = header.split(' ').collect();
    if fields.first() != Some(&MAGIC) {
        return Err(not_a_snapshot());
    }
    let corrupt = |reason: &str| SnapshotError::Corrupt { path: path.to_owned(), reason: reason.to_owned() };
    let version: u32 = fields.get(1).and_then(|v| v.parse().ok()).ok_or_else(|| corrupt("bad header"))?;
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version { path: path.to_owned(), found: version });
    }
    let [_, _, crc, len] = fields[..] else { return Err(corrupt("bad header")) };
    let crc = u32::from_str_radix(crc, 16).map_err(|_| corrupt("bad header"))?;
    let len: usize = len.parse().map_err(|_| corrupt("bad header"))?;
    let body = &bytes[end + 1..];
    if body.len() < len {
        return Err(corrupt(&format!("cut short: {} of {len} bytes", body.len())));
    }
    if body.len() > len {
        return Err(corrupt(&format!("{} bytes past the end", body.len() - len)));
    }
    if crc32fast::hash(body) != crc {
        return Err(corrupt("its content does not match its checksum"));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(version: u32, body: &[u8]) -> Vec<u8> {
        let header = format!("{MAGIC} {version} {:08x} {}\n", crc32fast::hash(body), body.len());
        [header.as_bytes(), body].concat()
    }

    #[test]
    fn headers_name_each_problem() {
        let body = br#"{"a": 1}"#;
        assert_eq!(check_header(&file(1, body), "s").unwrap(), body);
        let err = |bytes: &[u8]| check_header(bytes, "s").unwrap_err().to_string();
        assert_eq!(err(b"hello\n{}"), "s is not a kvmkit snapshot state file");
        assert_eq!(err(&[0u8; 4096]), "s is not a kvmkit snapshot state file");
        assert_eq!(err(&file(7, body)), "s is a snapshot of format version 7; this kvmkit reads version 1");
        let whole = file(1, body);
        assert_eq!(err(&whole[..whole.len() - 2]), "snapshot state file s is corrupt: cut short: 6 of 8 bytes");
        let mut flipped = whole.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(err(&flipped), "snapshot state file s is corrupt: its content does not match its checksum");
    }
}
