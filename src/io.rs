//! Atomic file and directory writes: a crash never leaves a half-written file under its final name.
//!
//! Files go to a temporary name in the same directory, are flushed and fsynced, then renamed.
//! Directories (checkpoints) are built under `.<name>.tmp-<pid>` and renamed into place. A process
//! killed mid-write leaves such temporaries behind: [`recover_temporaries`] removes them (and puts
//! back a directory caught between its two renames) when a run resumes.
//!
//! **Fault injection (tests only).** `SPPO_FAIL_WRITES_AFTER_BYTES=N` makes every atomic write fail
//! with ENOSPC ("No space left on device") once more than N bytes have gone through the atomic
//! writers of this process; `SPPO_FAIL_WRITES_MATCHING=TEXT` restricts the count and the failure to
//! writes whose temporary path contains TEXT. They let tests check that a full disk mid-checkpoint
//! loses nothing; unset (always, outside tests), they cost one relaxed atomic load per write.

use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

fn tmp_sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// The injected-failure settings, read once.
struct FaultInjection {
    after_bytes: u64,
    matching: Option<String>,
}

fn fault_injection() -> Option<&'static FaultInjection> {
    static CELL: OnceLock<Option<FaultInjection>> = OnceLock::new();
    CELL.get_or_init(|| {
        let after_bytes = std::env::var("SPPO_FAIL_WRITES_AFTER_BYTES").ok()?.trim().parse().ok()?;
        Some(FaultInjection { after_bytes, matching: std::env::var("SPPO_FAIL_WRITES_MATCHING").ok().filter(|s| !s.is_empty()) })
    })
    .as_ref()
}

/// Counts `bytes` written to `tmp` against the injected limit; ENOSPC once it is passed.
fn injected_write_failure(tmp: &Path, bytes: u64) -> std::io::Result<()> {
    static WRITTEN: AtomicU64 = AtomicU64::new(0);
    let Some(f) = fault_injection() else { return Ok(()) };
    if f.matching.as_ref().is_some_and(|m| !tmp.to_string_lossy().contains(m.as_str())) {
        return Ok(());
    }
    let total = WRITTEN.fetch_add(bytes, Ordering::Relaxed) + bytes;
    if total > f.after_bytes {
        // ENOSPC, as the kernel reports a full disk.
        return Err(std::io::Error::from_raw_os_error(28));
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(Into::into))
}

/// Like [`write_atomic`], with the content produced by a writer callback (large files).
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    }
    let tmp = tmp_sibling(path, "tmp");
    let result = (|| -> Result<()> {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fill(&mut f).with_context(|| format!("writing {}", path.display()))?;
        f.flush().with_context(|| format!("writing {}", path.display()))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        injected_write_failure(&tmp, len).with_context(|| format!("writing {}", path.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", path.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Builds a directory atomically: `fill` writes into a fresh temporary sibling directory, which then
/// replaces `dir` (an existing `dir` is moved aside first and removed after the swap). On error the
/// temporary is removed and `dir` is left as it was.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(parent) = dir.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| format!("creating directory {}", parent.display()))?;
    }
    let tmp = tmp_sibling(dir, "tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = tmp_sibling(dir, "old");
    if dir.exists() {
        if old.exists() {
            fs::remove_dir_all(&old)?;
        }
        fs::rename(dir, &old).with_context(|| format!("moving aside {}", dir.display()))?;
    }
    fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    if old.exists() {
        fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

/// `.<name>.<tag>-<pid>` → (name, tag), for the temporaries of this module.
fn parse_temporary(file_name: &str) -> Option<(&str, &str)> {
    let rest = file_name.strip_prefix('.')?;
    let (head, pid) = rest.rsplit_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (name, tag) = head.rsplit_once('.')?;
    (!name.is_empty() && (tag == "tmp" || tag == "old")).then_some((name, tag))
}

/// Cleans up after a process killed mid-write in `dir` (not recursive): a directory caught between
/// the two renames of [`write_dir_atomic`] (final name missing, `.old` copy present) gets its
/// previous, complete version back; every other temporary of another process is removed. Returns
/// the paths removed or restored.
pub fn recover_temporaries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut touched = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else { return Ok(touched) };
    let own = format!("-{}", std::process::id());
    let mut found: Vec<(PathBuf, String, String)> = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let file_name = e.file_name().to_string_lossy().into_owned();
        if file_name.ends_with(&own) {
            continue;
        }
        if let Some((name, tag)) = parse_temporary(&file_name) {
            found.push((e.path(), name.to_string(), tag.to_string()));
        }
    }
    // Restores first, so that a restored directory is not also deleted.
    found.sort_by_key(|(_, _, tag)| tag != "old");
    for (path, name, tag) in found {
        let target = dir.join(&name);
        if tag == "old" && !target.exists() {
            fs::rename(&path, &target).with_context(|| format!("restoring {} from {}", target.display(), path.display()))?;
        } else if path.is_dir() {
            fs::remove_dir_all(&path).with_context(|| format!("removing stale {}", path.display()))?;
        } else {
            fs::remove_file(&path).with_context(|| format!("removing stale {}", path.display()))?;
        }
        touched.push(path);
    }
    Ok(touched)
}

/// Whether `e` (or anything in its chain) is the operating system's "no space left on device".
pub fn is_storage_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.raw_os_error() == Some(28)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_are_recognised() {
        assert_eq!(parse_temporary(".checkpoint.tmp-123"), Some(("checkpoint", "tmp")));
        assert_eq!(parse_temporary(".state.json.old-9"), Some(("state.json", "old")));
        assert_eq!(parse_temporary(".checkpoint.tmp-"), None);
        assert_eq!(parse_temporary("checkpoint.tmp-1"), None);
        assert_eq!(parse_temporary(".hidden"), None);
    }

    #[test]
    fn recovery_restores_a_directory_caught_between_renames_and_removes_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        // Killed between "move aside" and "rename into place": `train` is missing.
        fs::create_dir_all(d.join(".train.old-4000000")).unwrap();
        fs::write(d.join(".train.old-4000000/state.json"), "old").unwrap();
        fs::create_dir_all(d.join(".train.tmp-4000000")).unwrap();
        fs::write(d.join(".manifest.json.tmp-4000001"), "half").unwrap();
        fs::create_dir_all(d.join("checkpoint")).unwrap();
        fs::create_dir_all(d.join(".checkpoint.old-4000002")).unwrap();
        let touched = recover_temporaries(d).unwrap();
        assert_eq!(touched.len(), 4, "{touched:?}");
        assert_eq!(fs::read_to_string(d.join("train/state.json")).unwrap(), "old");
        let left: Vec<_> = fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert!(left.iter().all(|n| !n.starts_with('.')), "{left:?}");
    }
}
