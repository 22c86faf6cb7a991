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

use super::hold::CreditBook;
use super::journal::{Journal, Recovered};
use super::spend::SpendBook;
use crate::conf::{Backend, Conf};
use crate::store::Store;
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

/// Journals a settlement for this instance (see the module doc); `None` when there is no
/// journal or the append failed (logged: the settlement still goes to the writer, and only a
/// crash before it is written could lose it).
pub fn journal_settlement(
    journal: Option<&LocalJournal>,
    s: &crate::store::Settlement,
) -> Option<super::journal::Ticket> {
    let j = journal?;
    // A settlement's JSON is 500-700 bytes: written into room for it, not grown from 128.
    let mut entry = Vec::with_capacity(1024);
    serde_json::to_writer(&mut entry, s).ok()?;
    match j.journal.append(&entry) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(error = %e, request_id = %s.record.request_id, "journaling a settlement failed");
            None
        }
    }
}

/// Gives back what idle accounts and capped keys hold unpromised (idle since `idle_before_ms`,
/// nothing in flight).
pub async fn return_idle(
    credit: &CreditBook,
    spend: &SpendBook,
    instance_id: &str,
    store: &Store,
    idle_before_ms: i64,
) {
    for (key_id, amount) in spend.take_idle(idle_before_ms) {
        if let Err(e) = store.return_cap_lease(key_id, instance_id, amount).await {
            tracing::warn!(error = %e, key_id, "returning idle room under a spend cap failed; keeping it");
            spend.restore(key_id, amount);
        }
    }
    for (account_id, amount) in credit.take_idle(idle_before_ms) {
        if let Err(e) = store
            .return_lease(account_id, instance_id, Some(amount))
            .await
        {
            tracing::warn!(error = %e, account_id, "returning an idle lease failed; keeping it");
            credit.restore(account_id, amount);
        }
    }
}

/// Answers recalls: another node short of an account's credit (or of a key's room), or a debit
/// that reached this node's lease, asked for what this node holds unpromised.
pub async fn answer_recalls(
    credit: &CreditBook,
    spend: &SpendBook,
    instance_id: &str,
    store: &Store,
) {
    if let Ok(keys) = store.recalled_caps(instance_id).await {
        for (key_id, asker) in keys {
            if spend
                .room(key_id)
                .is_some_and(|r| !r.gives_way_to(instance_id, &asker))
            {
                continue;
            }
            let amount = spend.take_unpromised(key_id);
            if let Err(e) = store.return_cap_lease(key_id, instance_id, amount).await {
                tracing::warn!(error = %e, key_id, "answering a spend-cap recall failed; keeping the room");
                spend.restore(key_id, amount);
            }
        }
    }
    let Ok(accounts) = store.recalled(instance_id).await else {
        return;
    };
    for (account_id, asker) in accounts {
        if credit
            .room(account_id)
            .is_some_and(|r| !r.gives_way_to(instance_id, &asker))
        {
            continue; // short itself, and the asker gives way to it
        }
        let amount = credit.take_unpromised(account_id);
        match store
            .return_lease(account_id, instance_id, Some(amount))
            .await
        {
            Ok(back) => tracing::debug!(account_id, %back, "answered a lease recall"),
            Err(e) => {
                tracing::warn!(error = %e, account_id, "answering a lease recall failed; keeping the credit");
                credit.restore(account_id, amount);
            }
        }
    }
}

/// What recovering one dead instance did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredInstance {
    pub instance_id: String,
    pub replayed: usize,
    pub leases: usize,
    pub returned: crate::money::NanoUsd,
}

/// Replays what dead instances under the journal root (beside `own_dir`) left, idempotently by
/// request id, returns their leases, and removes their journals. Retries until the store takes
/// it all.
pub async fn recover_orphans(
    own_dir: &Path,
    fingerprint: &str,
    store: &Store,
) -> Vec<RecoveredInstance> {
    let Some(root) = own_dir.parent() else {
        return Vec::new();
    };
    let mut done = Vec::new();
    for orphan in orphans(root, fingerprint, own_dir) {
        let mut settlements = Vec::with_capacity(orphan.recovered.entries.len());
        for (i, (_, entry)) in orphan.recovered.entries.iter().enumerate() {
            match serde_json::from_slice::<crate::store::Settlement>(entry) {
                Ok(s) => settlements.push(s),
                Err(e) => {
                    tracing::error!(error = %e, entry = i, dir = %orphan.dir.display(), "a journal entry is not a settlement; skipped")
                }
            }
        }
        let mut attempt = 0u32;
        for chunk in settlements.chunks(256) {
            while let Err(e) = store.settle_batch(&orphan.instance_id, chunk).await {
                attempt += 1;
                tracing::error!(error = %e, instance = %orphan.instance_id, "replaying a crashed instance's settlements failed; retrying");
                tokio::time::sleep(Duration::from_millis(200u64 << attempt.min(5))).await;
            }
        }
        let (leases, returned) = loop {
            match store.return_node_leases(&orphan.instance_id).await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::error!(error = %e, "returning a crashed instance's leases failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let _ = store.forget_instance(&orphan.instance_id).await;
        tracing::info!(
            instance = %orphan.instance_id,
            replayed = settlements.len(),
            leases,
            %returned,
            "recovered a gateway instance that did not shut down cleanly"
        );
        done.push(RecoveredInstance {
            instance_id: orphan.instance_id.clone(),
            replayed: settlements.len(),
            leases,
            returned,
        });
        orphan.remove();
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What journaling costs a request: serializing its settlement and one append (no fsync).
    /// A measurement, not a check: `benches/journal_cost.sh` runs it in a release build.
    #[test]
    #[ignore = "a benchmark: benches/journal_cost.sh"]
    fn journal_cost() {
        let root = tempfile::tempdir().expect("dir");
        let local = open_local(root.path(), "bench:1/1", "fp").expect("journal");
        let s = crate::store::Settlement {
            billed: crate::money::NanoUsd::from_nanos(123_456),
            over_hold: crate::money::NanoUsd::ZERO,
            capped: false,
            record: crate::store::UsageRecord {
                request_id: "req_019ad0000000a1b2c3d4e5f6".into(),
                account_id: 42,
                key_id: 7,
                tier: "budget".into(),
                provider: Some("openai".into()),
                upstream_model: Some("gpt-4.1-mini".into()),
                stream: true,
                input_tokens: 120,
                output_tokens: 480,
                cached_input_tokens: 0,
                cache_write_tokens: 0,
                reasoning_tokens: 0,
                provider_cost: crate::money::NanoUsd::from_nanos(100_000),
                billed: crate::money::NanoUsd::from_nanos(123_456),
                http_status: 200,
                error_code: None,
                attempts: 1,
                latency_ms: 830,
                ttft_ms: Some(120),
                started_at: 1_764_547_200_000,
                finished_at: 1_764_547_200_830,
            },
        };
        let n = 200_000;
        let started = std::time::Instant::now();
        for _ in 0..n {
            let t = journal_settlement(Some(&local), &s).expect("appended");
            local.journal.stored(t, 1);
        }
        let per = started.elapsed().as_nanos() as f64 / f64::from(n);
        let bytes = serde_json::to_vec(&s).expect("json").len() + 8;
        println!(
            "journal: {per:.0} ns per settlement ({bytes} bytes, serialize + append + stored)"
        );
    }

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
