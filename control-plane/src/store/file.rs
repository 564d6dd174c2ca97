//! The embedded store: a snapshot and a change log in the data directory.
//!
//! Each change is appended to `changes.log` (one JSON line per record, fsync
//! per batch), so a write costs the size of the change, not of the registry.
//! When the log outgrows the last snapshot it is compacted: the whole state is
//! written atomically to `state.json` (temporary file, fsync, rename, fsync of
//! the directory) and the log starts again. A crash between the two only
//! replays records the snapshot already holds, which changes nothing.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Persisted, Record, Store, StoreError};

/// Format version of the persisted document.
const FORMAT: u32 = 1;
/// The log is compacted once it is larger than this many bytes and larger
/// than the last snapshot.
const COMPACT_MIN_BYTES: u64 = 4 << 20;

/// The embedded default: a snapshot and a change log in the data directory.
pub struct FileStore {
    dir: PathBuf,
    log: std::sync::Mutex<Option<File>>,
}

#[derive(Serialize, Deserialize)]
struct Document {
    format: u32,
    #[serde(flatten)]
    state: Persisted,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, source }
}

impl FileStore {
    /// Opens (creating if needed) a data directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            log: std::sync::Mutex::new(None),
        })
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("changes.log")
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }

    fn size(path: &Path) -> u64 {
        fs::metadata(path).map_or(0, |m| m.len())
    }
}

impl Store for FileStore {
    fn load(&self) -> Result<Option<Persisted>, StoreError> {
        let snap = self.snapshot_path();
        let mut state = match fs::read(&snap) {
            Ok(text) => {
                let doc: Document =
                    serde_json::from_slice(&text).map_err(|e| StoreError::Corrupt {
                        path: snap.clone(),
                        message: e.to_string(),
                    })?;
                if doc.format != FORMAT {
                    return Err(StoreError::Corrupt {
                        path: snap,
                        message: format!(
                            "format {} is not supported (expected {FORMAT})",
                            doc.format
                        ),
                    });
                }
                Some(doc.state)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(StoreError::Io { path: snap, source }),
        };
        let log = self.log_path();
        let file = match File::open(&log) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(state),
            Err(source) => return Err(StoreError::Io { path: log, source }),
        };
        let lines: Vec<String> = BufReader::new(file)
            .lines()
            .collect::<Result<_, _>>()
            .map_err(io_err(&log))?;
        let mut records = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<Record>(line) {
                Ok(r) => records.push(r),
                // A torn last line is a batch that was never acknowledged.
                Err(_) if i + 1 == lines.len() => {
                    tracing::warn!(path = %log.display(), line = i + 1, "ignoring a torn last record");
                }
                Err(e) => {
                    return Err(StoreError::Corrupt {
                        path: log,
                        message: format!("line {}: {e}", i + 1),
                    });
                }
            }
        }
        if !records.is_empty() {
            state.get_or_insert_with(Persisted::default).replay(records);
        }
        Ok(state)
    }

    fn append(&self, records: &[Record]) -> Result<(), StoreError> {
        let path = self.log_path();
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?;
            buf.push(b'\n');
        }
        let mut guard = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            *guard = Some(f);
            self.sync_dir()?;
        }
        let f = guard.as_mut().ok_or_else(|| StoreError::Io {
            path: path.clone(),
            source: std::io::Error::other("log not open"),
        })?;
        f.write_all(&buf).map_err(io_err(&path))?;
        f.sync_data().map_err(io_err(&path))
    }

    fn wants_compaction(&self) -> bool {
        let log = Self::size(&self.log_path());
        log > COMPACT_MIN_BYTES && log > Self::size(&self.snapshot_path())
    }

    fn compact(&self, state: &Persisted) -> Result<(), StoreError> {
        let path = self.snapshot_path();
        let tmp = self.dir.join("state.json.tmp");
        let doc = Document {
            format: FORMAT,
            state: state.clone(),
        };
        let bytes = serde_json::to_vec(&doc).map_err(|e| StoreError::Corrupt {
            path: tmp.clone(),
            message: e.to_string(),
        })?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(&bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        self.sync_dir()?;
        // Start a new log; until this completes the old one replays harmlessly.
        let mut guard = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let log = self.log_path();
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&log)
            .map_err(io_err(&log))?;
        f.sync_all().map_err(io_err(&log))?;
        *guard = Some(
            OpenOptions::new()
                .append(true)
                .open(&log)
                .map_err(io_err(&log))?,
        );
        Ok(())
    }

    fn describe(&self) -> String {
        format!("embedded files in {}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PersistedEndpoint;
    use wayfinder_proto::v1::Health;
    use wayfinder_proto::v1::Instance;

    fn endpoint(id: &str, port: u32, health: Health) -> PersistedEndpoint {
        PersistedEndpoint {
            instance: Instance {
                service: "web".into(),
                instance_id: id.into(),
                address: "127.0.0.1".into(),
                port,
                ..Default::default()
            },
            health,
            version: 1,
            lease: Some(3),
            ttl_ms: Some(10_000),
        }
    }

    fn put(id: &str, port: u32, health: Health) -> Record {
        Record::PutEndpoint {
            service: "web".into(),
            endpoint: endpoint(id, port, health),
        }
    }

    fn ids(p: &Persisted) -> Vec<(String, Health)> {
        p.services
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .map(|e| (e.instance.instance_id.clone(), e.health))
            .collect()
    }

    #[test]
    fn log_replays_in_order_and_survives_compaction_and_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("opens");
        assert!(store.load().expect("empty is fine").is_none());

        store
            .append(&[
                put("web-1", 1, Health::Serving),
                put("web-2", 2, Health::Serving),
                Record::Counters {
                    version: 2,
                    next_lease: 4,
                },
            ])
            .expect("appends");
        store
            .append(&[
                put("web-1", 1, Health::NotServing),
                Record::DeleteEndpoint {
                    service: "web".into(),
                    instance_id: "web-2".into(),
                },
                Record::Counters {
                    version: 4,
                    next_lease: 4,
                },
            ])
            .expect("appends");
        let state = store.load().expect("loads").expect("present");
        assert_eq!(ids(&state), vec![("web-1".to_string(), Health::NotServing)]);
        assert_eq!((state.version, state.next_lease), (4, 4));

        // Compact, then keep appending on top of the snapshot.
        store.compact(&state).expect("compacts");
        store
            .append(&[put("web-3", 3, Health::Unknown)])
            .expect("appends");
        let state = store.load().expect("loads").expect("present");
        assert_eq!(ids(&state).len(), 2);
        assert_eq!(state.version, 4);

        // A torn last line (crash mid-write) is ignored; a torn middle is not.
        let log = dir.path().join("changes.log");
        let mut f = OpenOptions::new().append(true).open(&log).expect("log");
        f.write_all(b"{\"op\":\"put_end").expect("writes");
        assert_eq!(
            ids(&store.load().expect("loads").expect("present")).len(),
            2
        );
        f.write_all(b"\n{}\n").expect("writes");
        let err = store.load().expect_err("corrupt middle refused");
        assert!(err.to_string().contains("changes.log"), "{err}");
    }

    #[test]
    fn garbage_snapshot_is_refused_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path()).expect("opens");
        fs::write(dir.path().join("state.json"), b"{not json").expect("writes");
        let err = store.load().expect_err("garbage refused");
        assert!(err.to_string().contains("state.json"), "{err}");
    }
}
