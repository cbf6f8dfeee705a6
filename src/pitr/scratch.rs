//! Scratch space of point-in-time recovery, under `<backups directory>/.pitr/`:
//! directories that base backups are unpacked into (verification, recoveries),
//! and the scratch PostgreSQL server a recovery runs (see [`super::recover`]).
//!
//! The scratch server is started from the machine's server binaries of the
//! target's major version (through [`crate::devcluster`], as the `postgres` user
//! when dbops is root), listens on 127.0.0.1 on a free port (password
//! authentication only) and on a Unix socket in a 0700 directory dbops alone can
//! enter (trust: how dbops, its `pg_dump` and its pages connect). Its WAL comes
//! through dbops: `restore_command` is a small script that asks the recovery's
//! job for each file ([`WalServer`]), which fetches it from the archive checked
//! against its recorded SHA-256 ([`super::segments::fetch`]) — the scratch
//! server's user gets no console database URL, no storage key.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
};

use tokio_util::sync::CancellationToken;

use crate::{jobs::Progress, state::AppState, storage::Storage};

/// `<backups directory>/.pitr`.
pub fn root(state: &AppState) -> PathBuf {
    state.config.backups.directory.join(".pitr")
}

/// A directory removed (with what is in it) when dropped.
pub struct ScratchDir {
    path: PathBuf,
    keep: bool,
}

impl ScratchDir {
    /// A new, empty `<root>/<purpose>-<uuid>` (mode 0755: the server's user must
    /// reach what is unpacked in it).
    pub fn create(state: &AppState, purpose: &str) -> Result<ScratchDir, String> {
        let path = root(state).join(format!("{purpose}-{}", uuid::Uuid::new_v4().simple()));
        Self::at(path)
    }

    /// A new, empty directory at `path`.
    pub fn at(path: PathBuf) -> Result<ScratchDir, String> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
        if let Some(parent) = path.parent() {
            let _ = std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755));
        }
        Ok(ScratchDir { path, keep: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory when this value drops (a scratch server now lives in it).
    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.path.clone()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Streams `key` from `storage` into `tar -x` in `dir`, hashing what it reads.
/// Returns the bytes read and their SHA-256.
pub async fn unpack(
    storage: &dyn Storage,
    key: &str,
    dir: &Path,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(u64, String), String> {
    let mut reader = storage
        .open(key)
        .await
        .map_err(|e| format!("cannot read {key}: {e}"))?;
    let mut tar = crate::process::tool_command("tar")
        .arg("-C")
        .arg(dir)
        .args(["-xf", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start tar: {e}"))?;
    let mut stdin = tar.stdin.take().expect("piped stdin");
    let copied = crate::pg_tools::copy_hashed(&mut reader, &mut stdin, progress, cancel).await;
    drop(stdin);
    let out = tar
        .wait_with_output()
        .await
        .map_err(|e| format!("tar failed: {e}"))?;
    let copied = copied?;
    if !out.status.success() {
        return Err(format!(
            "the base backup does not unpack: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(copied)
}

/// The `restore_command` script of a recovery: asks the dbops job (through
/// files in `dir`) for WAL file `$1`, copies it to `$2`. Exit 1: not archived
/// (the end of the WAL); 126 (recovery aborts): the file could not be fetched
/// whole, or dbops did not answer within five minutes.
pub fn fetch_script(dir: &Path) -> String {
    let d = dir.display().to_string().replace('\'', "");
    format!(
        r#"#!/bin/sh
# restore_command of a dbops point-in-time recovery. dbops fetches each WAL file
# from its archive, checked against its recorded SHA-256, and puts it in ready/.
d='{d}'
f="$1"
case "$f" in ''|*/*|.*) exit 1 ;; esac
: > "$d/want/$f" || exit 126
n=0
while [ "$n" -lt 3000 ]; do
  if [ -e "$d/ready/$f" ]; then
    cp "$d/ready/$f" "$2" || exit 126
    rm -f "$d/ready/$f"
    exit 0
  fi
  if [ -e "$d/missing/$f" ]; then rm -f "$d/missing/$f"; exit 1; fi
  if [ -e "$d/failed/$f" ]; then exit 126; fi
  sleep 0.1
  n=$((n + 1))
done
exit 126
"#
    )
}

/// What the WAL server saw.
#[derive(Debug, Default, Clone)]
pub struct Served {
    /// The newest segment handed to the server.
    pub newest: Option<String>,
    pub files: u64,
    pub bytes: u64,
    /// A file that could not be fetched whole (the recovery must fail).
    pub failure: Option<String>,
}

/// Answers the scratch server's requests for WAL files (see [`fetch_script`])
/// until cancelled.
pub struct WalServer {
    pub dir: PathBuf,
    pub target: String,
    pub system_identifier: String,
}

impl WalServer {
    /// Creates `want/`, `ready/`, `missing/` and `failed/` in `dir` and writes the
    /// script; returns its path.
    pub fn prepare(&self) -> Result<PathBuf, String> {
        use std::os::unix::fs::PermissionsExt;
        for sub in ["want", "ready", "missing", "failed"] {
            let p = self.dir.join(sub);
            std::fs::create_dir_all(&p)
                .map_err(|e| format!("cannot create {}: {e}", p.display()))?;
        }
        let script = self.dir.join("fetch-wal.sh");
        std::fs::write(&script, fetch_script(&self.dir))
            .map_err(|e| format!("cannot write {}: {e}", script.display()))?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        Ok(script)
    }

    /// Serves requests every 100 ms until `stop` is cancelled, updating `served`.
    pub async fn serve(
        &self,
        state: &AppState,
        served: &std::sync::Mutex<Served>,
        stop: &CancellationToken,
    ) {
        let mut answered: HashSet<String> = HashSet::new();
        loop {
            let wanted: Vec<String> = std::fs::read_dir(self.dir.join("want"))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            for f in wanted {
                let _ = std::fs::remove_file(self.dir.join("want").join(&f));
                // Recovery asks for a file again after a restart: answer again.
                answered.remove(&f);
                let dest = self.dir.join("ready").join(&f);
                let fetched =
                    super::segments::fetch(state, &self.target, &self.system_identifier, &f, &dest)
                        .await;
                let mut s = served.lock().expect("not poisoned");
                match fetched {
                    Ok(_) => {
                        s.files += 1;
                        s.bytes += std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
                        if !f.ends_with(".history") {
                            s.newest = Some(f.clone());
                        }
                        let _ = crate::devcluster::give_to_server_user(&dest);
                    }
                    Err(super::segments::FetchError::NotArchived(_)) => {
                        let _ = std::fs::write(self.dir.join("missing").join(&f), b"");
                    }
                    Err(super::segments::FetchError::Failed(e)) => {
                        let _ = std::fs::write(self.dir.join("failed").join(&f), e.as_bytes());
                        s.failure = Some(format!("WAL file {f}: {e}"));
                    }
                }
                answered.insert(f);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The script answers from the files dbops writes: ready → copied (0),
    /// missing → 1, failed → 126.
    #[test]
    fn the_fetch_script_follows_the_answers() {
        let dir =
            std::env::temp_dir().join(format!("dbops-fetch-{}", uuid::Uuid::new_v4().simple()));
        for sub in ["want", "ready", "missing", "failed"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let script = dir.join("fetch.sh");
        std::fs::write(&script, fetch_script(&dir)).unwrap();
        std::fs::write(dir.join("ready/A"), b"wal bytes").unwrap();
        std::fs::write(dir.join("missing/B"), b"").unwrap();
        std::fs::write(dir.join("failed/C"), b"checksum").unwrap();
        let run = |f: &str, p: &Path| {
            crate::process::tool_command_sync("sh")
                .arg(&script)
                .arg(f)
                .arg(p)
                .status()
                .unwrap()
                .code()
        };
        let out = dir.join("out");
        assert_eq!(run("A", &out), Some(0));
        assert_eq!(std::fs::read(&out).unwrap(), b"wal bytes");
        assert!(dir.join("want/A").exists(), "the request is left for dbops");
        assert_eq!(run("B", &out), Some(1));
        assert_eq!(run("C", &out), Some(126));
        assert_eq!(run("../x", &out), Some(1));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
