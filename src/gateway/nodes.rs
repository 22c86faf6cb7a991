//! This gateway as one instance among many: its identity, its journal directory, what crashed
//! instances left behind, and the heartbeat that keeps its leases its own.
//!
//! * **Identity.** `gateway.node_id` (default `{hostname}:{port}`) names the node; each process
//!   is an instance, `{node_id}/{start}`, and its leases are held under that. Two processes of
//!   one node side by side (a rolling deploy) therefore never share a lease.
//! * **Journal.** Each instance journals its settlements in a directory of its own under the
//!   journal root, which it holds locked (an OS file lock, released when the process dies,
//!   however it dies). At start an instance looks for directories whose lock it can take: their
//!   process is gone, so it replays their settlements (idempotent by request id) and returns
//!   their leases at once, then removes them. A directory of a live process (locked) is left
//!   alone, and so is one written for another store (its `instance` file says which).
//! * **Heartbeat.** Every [`HEARTBEAT_EVERY`] the instance renews its row; any gateway sweeps
//!   instances that have not renewed for `gateway.lease_expiry_ms` and returns their leases. An
//!   instance that could not renew for half that time stops spending what it holds (it might be
//!   swept), and one that finds itself swept forgets its leased credit.

use super::journal::{Journal, Recovered};
use crate::conf::{Backend, Conf};
use sha2::Digest;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often an instance renews its heartbeat (and sweeps instances that stopped).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// A segment of the journal is sealed past this size (and deleted once all of it is stored).
const SEGMENT_BYTES: u64 = 8 << 20;
const LOCK_FILE: &str = "lock";
const INSTANCE_FILE: &str = "instance";

/// A new instance id for this process.
pub fn new_instance_id(node_id: &str, now_ms: i64) -> String {
    format!("{node_id}/{now_ms:x}{:04x}", rand::random::<u16>())
}

/// Where instances journal, or `None` for an in-memory store (nothing outlives the process, so
/// there is nothing to replay into).
pub fn journal_root(conf: &Conf) -> Option<PathBuf> {
    if let Some(d) = &conf.gateway.journal_dir {
        return Some(d.clone());
    }
    match conf.store.backend {
        Backend::Sqlite => crate::store::sqlite_path(conf.store.url.expose()).map(|p| {
            let mut name = p.file_name().unwrap_or_default().to_os_string();
            name.push(".settlements");
            p.with_file_name(name)
        }),
        Backend::Postgres => Some(PathBuf::from("data/settlements")),
    }
}

/// Which store a journal belongs to: a digest of the store's URL, so a journal is never replayed
/// into another database that happens to share the journal root.
pub fn store_fingerprint(conf: &Conf) -> String {
    let digest = sha2::Sha256::digest(conf.store.url.expose().as_bytes());
    hex::encode(&digest[..8])
}

fn dir_name(instance_id: &str) -> String {
    instance_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// This instance's journal, with its directory locked for as long as the process lives.
pub struct LocalJournal {
    pub journal: Journal,
    pub dir: PathBuf,
    _lock: File,
}

fn lock_dir(dir: &Path) -> io::Result<Option<File>> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))?;
    match lock.try_lock() {
        Ok(()) => Ok(Some(lock)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Creates and locks this instance's journal directory under `root`.
pub fn open_local(root: &Path, instance_id: &str, fingerprint: &str) -> io::Result<LocalJournal> {
    let dir = root.join(dir_name(instance_id));
    fs::create_dir_all(&dir)?;
    let lock = lock_dir(&dir)?.ok_or_else(|| {
        io::Error::other(format!(
            "{} is locked by another running gateway",
            dir.display()
        ))
    })?;
    let mut f = File::create(dir.join(INSTANCE_FILE))?;
    writeln!(f, "{instance_id}\n{fingerprint}")?;
    f.sync_all()?;
    let (journal, recovered) = Journal::open(&dir, SEGMENT_BYTES)?;
    debug_assert!(
        recovered.entries.is_empty(),
        "a new instance's directory is new"
    );
    Ok(LocalJournal {
        journal,
        dir,
        _lock: lock,
    })
}

/// What a dead instance left: its settlements to replay, then its leases to return.
pub struct Orphan {
    pub instance_id: String,
    pub dir: PathBuf,
    pub journal: Journal,
    pub recovered: Recovered,
    _lock: File,
}

impl Orphan {
    /// Everything replayed and its leases returned: the directory goes, except the damaged
    /// tails it set aside, which move up to the journal root (`damaged-<instance>-<file>`) for
    /// the operator to look at.
    pub fn remove(self) {
        let Orphan {
            dir,
            journal,
            recovered,
            ..
        } = self;
        drop(journal);
        if let Some(root) = dir.parent() {
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            for c in &recovered.corrupt {
                let file = c.kept_at.file_name().unwrap_or_default().to_string_lossy();
                let to = root.join(format!("damaged-{name}-{file}"));
                match fs::rename(&c.kept_at, &to) {
                    Ok(()) => {
                        tracing::error!(kept_at = %to.display(), offset = c.offset, bytes = c.bytes, "a damaged journal tail is kept here")
                    }
                    Err(e) => tracing::error!(error = %e, "cannot keep a damaged journal tail"),
                }
            }
        }
        if let Err(e) = fs::remove_dir_all(&dir) {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot remove a replayed journal");
        }
    }
}

/// The journals under `root` of instances that are gone (their lock is free) and that wrote to
/// this store. Damaged entries are reported and set aside by [`Journal::open`].
pub fn orphans(root: &Path, fingerprint: &str, own_dir: &Path) -> Vec<Orphan> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if dir == own_dir || !dir.is_dir() {
            continue;
        }
        let Ok(text) = fs::read_to_string(dir.join(INSTANCE_FILE)) else {
            continue;
        };
        let mut lines = text.lines();
        let (Some(instance_id), Some(fp)) = (lines.next(), lines.next()) else {
            continue;
        };
        if fp != fingerprint {
            continue;
        }
        let lock = match lock_dir(&dir) {
            Ok(Some(l)) => l,
            Ok(None) => continue, // a live gateway's
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot lock an old journal");
                continue;
            }
        };
        match Journal::open(&dir, SEGMENT_BYTES) {
            Ok((journal, recovered)) => {
                for c in &recovered.corrupt {
                    tracing::error!(
                        segment = %c.segment.display(),
                        offset = c.offset,
                        bytes = c.bytes,
                        kept_at = %c.kept_at.display(),
                        "a journal segment ends in a damaged entry: the entries before it are replayed, the rest is kept aside"
                    );
                }
                out.push(Orphan {
                    instance_id: instance_id.to_owned(),
                    dir,
                    journal,
                    recovered,
                    _lock: lock,
                });
            }
            Err(e) => {
                tracing::error!(error = %e, dir = %dir.display(), "cannot read an old journal")
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_instances_journal_is_found_and_a_live_ones_is_not() {
        let root = tempfile::tempdir().expect("dir");
        let live = open_local(root.path(), "n:1/a", "fp").expect("live");
        let other_store = open_local(root.path(), "n:1/c", "other").expect("other");
        {
            let dead = open_local(root.path(), "n:1/b", "fp").expect("dead");
            dead.journal.append(b"settlement").expect("append");
        }
        drop(other_store);
        let found = orphans(root.path(), "fp", &live.dir);
        assert_eq!(found.len(), 1, "only the dead instance of this store");
        assert_eq!(found[0].instance_id, "n:1/b");
        assert_eq!(found[0].recovered.entries.len(), 1);
        assert_eq!(found[0].recovered.entries[0].1, b"settlement");
        // While one gateway replays it, another does not take it too.
        assert!(orphans(root.path(), "fp", &live.dir).is_empty());
        let dir = found[0].dir.clone();
        for o in found {
            o.remove();
        }
        assert!(!dir.exists());
        // A second process cannot take a live instance's directory.
        assert!(open_local(root.path(), "n:1/a", "fp").is_err());
    }
}
