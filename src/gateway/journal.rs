//! An append-only local journal of opaque payloads, so that a settled request survives a SIGKILL
//! between the answer's last bytes and the usage writer's database write.
//!
//! Each run appends to a segment of its own, `segment-{n:020}.journal`; an entry is its payload's
//! length (u32 LE), its CRC-32 (u32 LE) and the payload. At open, every old segment is read up to
//! its first bad entry: the good entries are handed back, the bad tail is copied aside and cut
//! off. A segment is deleted once it is sealed and all its entries are reported stored.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// The largest payload: a length prefix past it is taken for damage, not for an entry.
const MAX_PAYLOAD: usize = 16 << 20;
const HEADER: usize = 8;

// The gateway shares one journal between its threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Journal>();
};

pub struct Journal {
    dir: PathBuf,
    segment_bytes: u64,
    inner: Mutex<Inner>,
}

struct Inner {
    /// `Arc` so that `sync` can take the handle and leave the lock before the disk works.
    current: Arc<File>,
    current_number: u64,
    current_len: u64,
    /// A write failed part way: what follows in the segment would sit behind a broken entry and
    /// never be read back, so the next append starts a new segment.
    current_broken: bool,
    /// Entries not yet stored, by segment; a segment leaves the map when its file is deleted.
    pending: BTreeMap<u64, u64>,
    backlog: u64,
    /// Sealed segments written since the last `sync`, which must reach the disk with it.
    unsynced: Vec<Arc<File>>,
    /// A segment file was created since the last `sync`: its directory entry needs syncing too.
    dir_unsynced: bool,
}

/// Which segment an entry went to; handed back to `stored` once the entry is in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

/// What a previous run left behind.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Good entries of old segments, oldest first, each with its ticket.
    pub entries: Vec<(Ticket, Vec<u8>)>,
    /// Bad tails found (one per damaged segment).
    pub corrupt: Vec<CorruptTail>,
}

#[derive(Debug)]
pub struct CorruptTail {
    pub segment: PathBuf,
    /// Byte offset in the segment where the first bad entry starts.
    pub offset: u64,
    /// How many bytes from there to the end were set aside.
    pub bytes: u64,
    /// Where those bytes were copied.
    pub kept_at: PathBuf,
}

impl Journal {
    /// Opens or creates the journal in `dir` (created with parents if missing). Reads every old
    /// segment, returns its good entries and reports damaged tails, and starts a new segment for
    /// this run's appends (old segments are never appended to). `segment_bytes`: a segment that
    /// has grown past this is sealed and the next append starts a new one.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<(Journal, Recovered)> {
        fs::create_dir_all(dir)?;
        let mut numbers = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            if let Some(n) = entry.file_name().to_str().and_then(segment_number) {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        let mut recovered = Recovered::default();
        let mut pending = BTreeMap::new();
        for &n in &numbers {
            let path = segment_path(dir, n);
            let data = fs::read(&path)?;
            let (payloads, good_len) = read_entries(&data);
            if good_len < data.len() {
                let kept_at = dir.join(format!("corrupt-{n:020}-{good_len}.bin"));
                let mut kept = File::create(&kept_at)?;
                kept.write_all(&data[good_len..])?;
                // The copy is on disk before the segment loses those bytes.
                kept.sync_all()?;
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(good_len as u64)?;
                recovered.corrupt.push(CorruptTail {
                    segment: path.clone(),
                    offset: good_len as u64,
                    bytes: (data.len() - good_len) as u64,
                    kept_at,
                });
            }
            if payloads.is_empty() {
                fs::remove_file(&path)?;
                continue;
            }
            pending.insert(n, payloads.len() as u64);
            let ticket = Ticket(n);
            recovered
                .entries
                .extend(payloads.into_iter().map(|p| (ticket, p.to_vec())));
        }
        let current_number = numbers.last().map_or(Ok(0), |&n| next_number(n))?;
        let current = create_segment(dir, current_number)?;
        pending.insert(current_number, 0);
        let backlog = recovered.entries.len() as u64;
        let inner = Inner {
            current: Arc::new(current),
            current_number,
            current_len: 0,
            current_broken: false,
            pending,
            backlog,
            unsynced: Vec::new(),
            dir_unsynced: true,
        };
        let journal = Journal {
            dir: dir.to_path_buf(),
            segment_bytes,
            inner: Mutex::new(inner),
        };
        Ok((journal, recovered))
    }

    /// Appends one entry with a single write(2) to the current segment (O_APPEND), rotating first
    /// if the segment is past `segment_bytes`. No fsync here.
    pub fn append(&self, payload: &[u8]) -> io::Result<Ticket> {
        self.append_many(&[payload])
    }

    /// Appends several entries in one write (same framing), returning one ticket for all: they
    /// go to one segment.
    pub fn append_many(&self, payloads: &[&[u8]]) -> io::Result<Ticket> {
        // Framed before taking the lock, so appenders wait on each other for the write alone.
        let mut frame = Vec::with_capacity(payloads.iter().map(|p| HEADER + p.len()).sum());
        for p in payloads {
            if p.len() > MAX_PAYLOAD {
                let e = format!("journal entry of {} bytes is over {MAX_PAYLOAD}", p.len());
                return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
            }
            frame.extend_from_slice(&(p.len() as u32).to_le_bytes());
            frame.extend_from_slice(&crc32fast::hash(p).to_le_bytes());
            frame.extend_from_slice(p);
        }
        let mut inner = self.lock();
        if payloads.is_empty() {
            return Ok(Ticket(inner.current_number));
        }
        if inner.current_broken || inner.current_len > self.segment_bytes {
            self.rotate(&mut inner)?;
        }
        // O_APPEND: one write(2) lands whole at the end; `write_all` loops only on a short write.
        if let Err(e) = (&*inner.current).write_all(&frame) {
            inner.current_broken = true;
            return Err(e);
        }
        inner.current_len += frame.len() as u64;
        let n = inner.current_number;
        *inner.pending.entry(n).or_insert(0) += payloads.len() as u64;
        inner.backlog += payloads.len() as u64;
        Ok(Ticket(n))
    }

    /// `n` entries of segment `ticket` are now stored elsewhere. A segment that is no longer the
    /// current one and whose entries are all stored is deleted. Entries recovered at open count
    /// for their old segments, so storing all recovered entries deletes the old segments.
    pub fn stored(&self, ticket: Ticket, n: u64) {
        let mut inner = self.lock();
        let Some(left) = inner.pending.get_mut(&ticket.0) else {
            tracing::warn!(
                segment = ticket.0,
                n,
                "journal: stored for a deleted segment"
            );
            return;
        };
        if n > *left {
            tracing::warn!(
                segment = ticket.0,
                n,
                left = *left,
                "journal: stored more than appended"
            );
        }
        let done = n.min(*left);
        *left -= done;
        let empty = *left == 0;
        inner.backlog -= done;
        if empty && ticket.0 != inner.current_number {
            inner.pending.remove(&ticket.0);
            self.delete_segment(ticket.0);
        }
    }

    /// Entries appended (or recovered) and not yet reported stored.
    pub fn backlog(&self) -> u64 {
        self.lock().backlog
    }

    /// fsync (sync_data) of the current segment, and of segments sealed since the last call, so
    /// a power loss cannot lose what was appended before this call.
    pub fn sync(&self) -> io::Result<()> {
        let (mut sealed, current, dir_unsynced) = {
            let mut inner = self.lock();
            let sealed = std::mem::take(&mut inner.unsynced);
            let dir_unsynced = std::mem::replace(&mut inner.dir_unsynced, false);
            (sealed, inner.current.clone(), dir_unsynced)
        };
        // The lock is released: appends go on while the disk syncs.
        let result = (|| {
            if dir_unsynced {
                File::open(&self.dir)?.sync_all()?;
            }
            while let Some(f) = sealed.last() {
                f.sync_data()?;
                sealed.pop();
            }
            current.sync_data()
        })();
        if result.is_err() {
            // What was not synced stays due for the next call (the current segment always is).
            let mut inner = self.lock();
            inner.dir_unsynced |= dir_unsynced;
            inner.unsynced.extend(sealed);
        }
        result
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere leaves the counters as they were between two statements; the files
        // are still the truth, so carry on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seals the current segment and starts the next one.
    fn rotate(&self, inner: &mut Inner) -> io::Result<()> {
        let next = next_number(inner.current_number)?;
        let file = Arc::new(create_segment(&self.dir, next)?);
        let sealed = std::mem::replace(&mut inner.current, file);
        let sealed_number = std::mem::replace(&mut inner.current_number, next);
        inner.current_len = 0;
        inner.current_broken = false;
        inner.dir_unsynced = true;
        inner.pending.insert(next, 0);
        if inner.pending.get(&sealed_number) == Some(&0) {
            inner.pending.remove(&sealed_number);
            self.delete_segment(sealed_number);
        } else {
            inner.unsynced.push(sealed);
        }
        Ok(())
    }

    fn delete_segment(&self, n: u64) {
        let path = segment_path(&self.dir, n);
        if let Err(e) = fs::remove_file(&path) {
            // Its entries are stored, so a leftover file only replays them at the next open.
            tracing::warn!(error = %e, path = %path.display(), "journal: deleting a stored segment failed");
        }
    }
}

fn next_number(n: u64) -> io::Result<u64> {
    let exhausted = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "journal segment numbers exhausted",
        )
    };
    n.checked_add(1).ok_or_else(exhausted)
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("segment-{n:020}.journal"))
}

fn segment_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("segment-")?.strip_suffix(".journal")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn create_segment(dir: &Path, n: u64) -> io::Result<File> {
    // `create_new`: a segment of an earlier run is never written to again.
    OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(segment_path(dir, n))
}

/// The payloads of the good entries at the start of `data`, and how many bytes they take.
fn read_entries(data: &[u8]) -> (Vec<&[u8]>, usize) {
    let le_u32 = |at: usize| Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?));
    let mut payloads = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(crc)) = (le_u32(at), le_u32(at + 4)) {
        let (start, len) = (at + HEADER, len as usize);
        let good = |p: &&[u8]| len <= MAX_PAYLOAD && crc32fast::hash(p) == crc;
        let Some(payload) = data.get(start..start + len).filter(good) else {
            break;
        };
        payloads.push(payload);
        at = start + len;
    }
    (payloads, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn segments(dir: &Path) -> Vec<u64> {
        let mut v: Vec<u64> = fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| segment_number(e.unwrap().file_name().to_str()?))
            .collect();
        v.sort_unstable();
        v
    }

    fn payloads(r: &Recovered) -> Vec<Vec<u8>> {
        r.entries.iter().map(|(_, p)| p.clone()).collect()
    }

    #[test]
    fn entries_survive_a_restart_until_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let written: Vec<Vec<u8>> = vec![b"one".to_vec(), vec![], vec![0, 255, 7], vec![9; 5000]];
        {
            let (j, r) = Journal::open(&dir, 1 << 20).unwrap();
            assert!(r.entries.is_empty() && r.corrupt.is_empty());
            for p in &written {
                j.append(p).unwrap();
            }
            j.sync().unwrap();
            assert_eq!(j.backlog(), 4);
        }
        let (j, r) = Journal::open(&dir, 1 << 20).unwrap();
        assert_eq!(payloads(&r), written);
        assert!(r.corrupt.is_empty());
        assert_eq!(j.backlog(), 4);
        assert_eq!(segments(&dir), vec![0, 1]);
        let ticket = r.entries[0].0;
        assert!(r.entries.iter().all(|(t, _)| *t == ticket));
        j.stored(ticket, 3);
        assert_eq!(
            segments(&dir),
            vec![0, 1],
            "one entry of segment 0 is not stored yet"
        );
        j.stored(ticket, 1);
        assert_eq!(segments(&dir), vec![1]);
        assert_eq!(j.backlog(), 0);
    }

    #[test]
    fn sealed_segments_are_deleted_once_stored() {
        let tmp = tempfile::tempdir().unwrap();
        // Each entry is 8 + 10 bytes: the segment is past 30 bytes after two.
        let (j, _) = Journal::open(tmp.path(), 30).unwrap();
        let tickets: Vec<Ticket> = (0..6u8).map(|i| j.append(&[i; 10]).unwrap()).collect();
        assert_eq!(tickets[0], tickets[1]);
        assert_ne!(tickets[1], tickets[2]);
        assert_eq!(segments(tmp.path()).len(), 3);
        assert_eq!(j.backlog(), 6);
        j.stored(tickets[0], 2);
        assert_eq!(j.backlog(), 4);
        j.stored(tickets[2], 2);
        assert_eq!(segments(tmp.path()), vec![tickets[4].0]);
        j.stored(tickets[4], 2);
        assert_eq!(j.backlog(), 0);
        assert_eq!(
            segments(tmp.path()),
            vec![tickets[4].0],
            "the current segment stays"
        );
        // The next append seals the emptied current segment, which goes at once.
        let t = j.append(b"x").unwrap();
        assert_eq!(segments(tmp.path()), vec![t.0]);
        assert_eq!(j.backlog(), 1);
    }

    /// Writes entries `0..3` of 20 bytes each to a fresh journal, damages them with `damage`, and
    /// checks what the next open finds: `good` entries kept, the tail from their end set aside.
    fn check_damage(damage: impl FnOnce(&Path), good: usize, tail: u64) {
        let tmp = tempfile::tempdir().unwrap();
        let entry = |i: u8| vec![i; 20];
        {
            let (j, _) = Journal::open(tmp.path(), 1 << 20).unwrap();
            for i in 0..3 {
                j.append(&entry(i)).unwrap();
            }
        }
        let seg = segment_path(tmp.path(), 0);
        let before = fs::read(&seg).unwrap();
        damage(&seg);
        let damaged = fs::read(&seg).unwrap();
        let (j, r) = Journal::open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(payloads(&r), (0..good as u8).map(entry).collect::<Vec<_>>());
        let [c] = &r.corrupt[..] else {
            panic!("one corrupt tail expected: {:?}", r.corrupt)
        };
        let offset = (good * 28) as u64;
        assert_eq!(
            (c.segment.as_path(), c.offset, c.bytes),
            (seg.as_path(), offset, tail)
        );
        assert_eq!(fs::read(&c.kept_at).unwrap(), &damaged[offset as usize..]);
        assert_eq!(fs::read(&seg).unwrap(), &before[..offset as usize]);
        j.append(b"after").unwrap();
        drop(j);
        let (_, r) = Journal::open(tmp.path(), 1 << 20).unwrap();
        let mut expected: Vec<Vec<u8>> = (0..good as u8).map(entry).collect();
        expected.push(b"after".to_vec());
        assert_eq!(payloads(&r), expected);
        assert!(
            r.corrupt.is_empty(),
            "the truncated segment reads clean: {:?}",
            r.corrupt
        );
    }

    #[test]
    fn a_cut_last_entry_is_set_aside() {
        let cut = |seg: &Path| {
            let f = OpenOptions::new().write(true).open(seg).unwrap();
            f.set_len(3 * 28 - 5).unwrap();
        };
        check_damage(cut, 2, 28 - 5);
    }

    #[test]
    fn a_flipped_byte_sets_aside_its_entry_and_what_follows() {
        let flip = |seg: &Path| {
            let mut data = fs::read(seg).unwrap();
            data[28 + 8 + 10] ^= 0x40;
            fs::write(seg, data).unwrap();
        };
        check_damage(flip, 1, 2 * 28);
    }

    #[test]
    fn garbage_does_not_panic() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut files: Vec<Vec<u8>> = vec![
            u32::MAX.to_le_bytes().repeat(3),
            ((MAX_PAYLOAD + 1) as u32).to_le_bytes().to_vec(),
            [16u32.to_le_bytes(), 0u32.to_le_bytes()].concat(),
            vec![1, 2, 3],
        ];
        for _ in 0..200 {
            let len = rng.random_range(0..64);
            files.push((0..len).map(|_| rng.random()).collect());
        }
        for (i, garbage) in files.iter().enumerate() {
            let dir = tmp.path().join(i.to_string());
            fs::create_dir(&dir).unwrap();
            fs::write(segment_path(&dir, 7), garbage).unwrap();
            let (j, r) = Journal::open(&dir, 1 << 20).unwrap();
            // Every byte is either in a good entry or set aside.
            let good: usize = r.entries.iter().map(|(_, p)| HEADER + p.len()).sum();
            let set_aside: u64 = r.corrupt.iter().map(|c| c.bytes).sum();
            assert_eq!(good as u64 + set_aside, garbage.len() as u64, "file {i}");
            assert_eq!(j.append(b"ok").unwrap(), Ticket(8));
        }
        let (j, _) = Journal::open(tmp.path(), 1 << 20).unwrap();
        let too_big = vec![0; MAX_PAYLOAD + 1];
        let e = j.append(&too_big).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(j.backlog(), 0);
    }

    #[test]
    fn append_many_reads_back_as_separate_entries() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (j, _) = Journal::open(tmp.path(), 1 << 20).unwrap();
            j.append(b"first").unwrap();
            let t = j.append_many(&[b"a", b"", b"ccc"]).unwrap();
            assert_eq!(t, Ticket(0));
            assert_eq!(j.backlog(), 4);
        }
        let (j, r) = Journal::open(tmp.path(), 1 << 20).unwrap();
        let expected: Vec<Vec<u8>> =
            vec![b"first".to_vec(), b"a".to_vec(), vec![], b"ccc".to_vec()];
        assert_eq!(payloads(&r), expected);
        j.stored(Ticket(0), 4);
        assert_eq!(segments(tmp.path()), vec![1]);
    }
}
