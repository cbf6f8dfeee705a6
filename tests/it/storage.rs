//! Where backups are kept: a local directory and a real S3-compatible server (moto,
//! started from PyPI's `moto[server]` for each test). Uploads become visible only
//! when committed, aborts leave nothing, and keys cannot escape the root.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use dbops::storage::{
    LocalStorage, S3Settings, S3Storage, Storage, StorageError, Upload, sha256_of,
};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1024 * 1024;

/// A fresh directory, removed at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "dbops-storage-{what}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every file under `dir`, hidden ones included, relative to `dir`.
fn all_files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(base, &path, out);
            } else {
                out.push(
                    path.strip_prefix(base)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Writes `total` bytes of pseudo-random data in `chunk`-sized writes, returning
/// their SHA-256 (hex), the way a pg_dump pipe would feed an upload.
async fn write_data(upload: &mut Box<dyn Upload>, total: usize, chunk: usize, seed: u64) -> String {
    let mut state = seed | 1;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; chunk];
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk);
        for word in buf[..n].chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        upload.write_all(&buf[..n]).await.unwrap();
        hasher.update(&buf[..n]);
        left -= n;
    }
    upload.flush().await.unwrap();
    hex::encode(hasher.finalize())
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_committed_local_backup_reads_back_with_the_same_sha256() {
    let dir = TempDir::new("commit");
    let root = dir.0.join("backups");
    let storage = LocalStorage::new(root.clone()).unwrap();
    assert_eq!(mode_of(&root), 0o700);
    assert_eq!(storage.kind(), "local");
    assert_eq!(
        storage.describe(),
        format!("local directory {}", root.display())
    );

    let key = "pg/prod/2024-05-01T02-00-00Z.dump";
    let mut upload = storage.create(key).await.unwrap();
    let sha = write_data(&mut upload, 20 * MIB, 64 * 1024, 7).await;

    // Written but not committed: on disk only under a hidden temporary name.
    assert_eq!(storage.list("").await.unwrap(), Vec::<String>::new());
    assert!(matches!(
        storage.size(key).await,
        Err(StorageError::NotFound(_))
    ));
    let files = all_files(&root);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].starts_with("pg/prod/.2024-05-01T02-00-00Z.dump.partial-"),
        "{files:?}"
    );
    assert_eq!(mode_of(&root.join(&files[0])), 0o600);
    assert_eq!(mode_of(&root.join("pg/prod")), 0o700);

    upload.commit().await.unwrap();

    assert_eq!(all_files(&root), vec![key.to_string()]);
    assert_eq!(storage.list("").await.unwrap(), vec![key.to_string()]);
    assert_eq!(storage.list("pg").await.unwrap(), vec![key.to_string()]);
    assert_eq!(
        storage.list("pg/prod/").await.unwrap(),
        vec![key.to_string()]
    );
    assert_eq!(storage.list("pg/pro").await.unwrap(), Vec::<String>::new());
    assert_eq!(storage.size(key).await.unwrap(), 20 * MIB as u64);
    assert_eq!(mode_of(&root.join(key)), 0o600);
    assert_eq!(
        sha256_of(&storage, key).await.unwrap(),
        (sha.clone(), 20 * MIB as u64)
    );

    // open() streams the same bytes.
    let mut r = storage.open(key).await.unwrap();
    let mut all = Vec::new();
    r.read_to_end(&mut all).await.unwrap();
    assert_eq!(hex::encode(Sha256::digest(&all)), sha);

    storage.delete(key).await.unwrap();
    storage.delete(key).await.unwrap(); // already gone: still fine
    assert_eq!(storage.list("").await.unwrap(), Vec::<String>::new());
    assert!(matches!(
        storage.open(key).await.err().unwrap(),
        StorageError::NotFound(_)
    ));
}

#[tokio::test]
async fn an_aborted_or_dropped_local_upload_leaves_no_file() {
    let dir = TempDir::new("abort");
    let storage = LocalStorage::new(dir.0.clone()).unwrap();

    let mut upload = storage.create("pg/a.dump").await.unwrap();
    write_data(&mut upload, 3 * MIB, 100_000, 1).await;
    assert_eq!(all_files(&dir.0).len(), 1);
    upload.abort().await.unwrap();
    assert_eq!(all_files(&dir.0), Vec::<String>::new());

    // A cancelled backup task drops its upload: the same clean-up.
    let mut upload = storage.create("pg/b.dump").await.unwrap();
    write_data(&mut upload, MIB, 4096, 2).await;
    drop(upload);
    assert_eq!(all_files(&dir.0), Vec::<String>::new());
    assert_eq!(storage.list("").await.unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn remove_partials_cleans_crash_leftovers_but_not_uploads_in_progress() {
    let dir = TempDir::new("partials");
    let storage = LocalStorage::new(dir.0.clone()).unwrap();

    // What a crash mid-backup leaves behind.
    std::fs::create_dir_all(dir.0.join("pg/prod")).unwrap();
    let leftover = dir
        .0
        .join("pg/prod/.old.dump.partial-0f0e0d0c0b0a09080706050403020100");
    std::fs::write(&leftover, b"half a dump").unwrap();
    assert_eq!(storage.list("").await.unwrap(), Vec::<String>::new());

    // An upload still being written (by this process or another one).
    let mut running = storage.create("pg/prod/new.dump").await.unwrap();
    let sha = write_data(&mut running, 100_000, 10_000, 3).await;

    assert_eq!(storage.remove_partials().await.unwrap(), 1);
    assert!(!leftover.exists());
    let files = all_files(&dir.0);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with("pg/prod/.new.dump.partial-"));

    running.commit().await.unwrap();
    assert_eq!(
        storage.list("").await.unwrap(),
        vec!["pg/prod/new.dump".to_string()]
    );
    assert_eq!(
        sha256_of(&storage, "pg/prod/new.dump").await.unwrap(),
        (sha, 100_000)
    );
    assert_eq!(storage.remove_partials().await.unwrap(), 0);
}

#[tokio::test]
async fn keys_that_could_escape_the_backup_directory_are_refused() {
    let dir = TempDir::new("traversal");
    let root = dir.0.join("root");
    let storage = LocalStorage::new(root.clone()).unwrap();
    std::fs::write(dir.0.join("outside"), b"not a backup").unwrap();

    for key in [
        "../x",
        "/etc/x",
        "a//b",
        "a/../../b",
        "../outside",
        "..",
        ".",
        "",
        "a/",
        "a/.x",
        "a\\..\\b",
    ] {
        let e = storage.create(key).await.err().unwrap();
        assert!(
            matches!(&e, StorageError::Config(m) if m.contains("refused backup key")),
            "{key:?}: {e}"
        );
        assert!(storage.open(key).await.is_err(), "{key:?}");
        assert!(storage.size(key).await.is_err(), "{key:?}");
        assert!(storage.delete(key).await.is_err(), "{key:?}");
    }
    assert!(storage.list("../").await.is_err());
    assert!(dir.0.join("outside").exists());
    assert_eq!(all_files(&root), Vec::<String>::new());
    assert_eq!(all_files(&dir.0), vec!["outside".to_string()]);
}

#[tokio::test]
async fn an_unwritable_backup_directory_gives_a_readable_error_and_lists_nothing() {
    let dir = TempDir::new("unwritable");

    // A backup directory whose parent is a regular file cannot be made.
    std::fs::write(dir.0.join("file"), b"").unwrap();
    let bad_root = dir.0.join("file/backups");
    let e = LocalStorage::new(bad_root.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(&bad_root.display().to_string()) && e.contains("not a directory"),
        "{e}"
    );

    // Inside a usable root, a file where a directory should be.
    let root = dir.0.join("root");
    let storage = LocalStorage::new(root.clone()).unwrap();
    std::fs::write(root.join("pg"), b"in the way").unwrap();
    let e = storage.create("pg/prod/x.dump").await.err().unwrap();
    let msg = e.to_string();
    assert!(matches!(e, StorageError::Io(_)), "{msg}");
    assert!(
        msg.contains(&root.join("pg/prod").display().to_string())
            && msg.contains("not a directory"),
        "{msg}"
    );
    assert_eq!(storage.list("pg").await.unwrap(), Vec::<String>::new());
    assert_eq!(storage.list("pg/prod").await.unwrap(), Vec::<String>::new());
    assert_eq!(all_files(&root), vec!["pg".to_string()]);

    // Where permissions are enforced (not as root), a read-only directory.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        let ro = root.join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
        let msg = storage.create("ro/x.dump").await.err().unwrap().to_string();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(msg.starts_with("permission denied writing "), "{msg}");
        assert_eq!(storage.list("ro").await.unwrap(), Vec::<String>::new());
    }
}

// ---------------------------------------------------------------------------
// S3 against moto

/// A moto S3 server on its own port, killed when dropped (also when the test fails).
pub struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Installs `moto[server]` from PyPI unless it is importable already (once per run).
fn ensure_moto() {
    static INSTALLED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    if *done {
        return;
    }
    let importable = || {
        Command::new("python3")
            .args(["-c", "import moto, moto.server, flask, flask_cors"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !importable() {
        let out = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "moto[server]"])
            .output()
            .expect("python3 is needed for the S3 tests");
        assert!(
            out.status.success() && importable(),
            "installing moto[server] failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    *done = true;
}

pub async fn start_moto() -> Moto {
    let started = Instant::now();
    // reqwest (here, for moto) needs a TLS provider even for plain http.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tokio::task::spawn_blocking(ensure_moto).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::env::temp_dir().join(format!("dbops-moto-{port}-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("python3 -m moto.server starts");
    let moto = Moto { child, port, log };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(moto.url()).send().await
            && r.status().is_success()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "moto did not answer on port {}: {}",
            moto.port,
            std::fs::read_to_string(&moto.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("moto ready on port {port} after {:?}", started.elapsed());
    moto
}

impl Moto {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (object_store cannot); moto accepts an unsigned PUT.
    pub async fn create_bucket(&self) -> String {
        let bucket = format!("dbops-it-{}", uuid::Uuid::new_v4().simple());
        let r = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.url()))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{:?}", r.text().await);
        bucket
    }

    /// The raw XML of the bucket's multipart uploads in progress.
    async fn multipart_uploads(&self, bucket: &str) -> String {
        reqwest::Client::new()
            .get(format!("{}/{bucket}?uploads", self.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    fn settings(&self, bucket: &str, prefix: &str) -> S3Settings {
        S3Settings {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            region: "us-east-1".into(),
            endpoint: Some(self.url()),
            access_key_id: "AKIDDBOPSTEST".into(),
            secret_access_key: SecretString::from("dbops-test-secret-value".to_string()),
            allow_http: true,
        }
    }
}

/// The text between `<tag>` and `</tag>`, every time it occurs.
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(&open)
        .skip(1)
        .filter_map(|s| s.split(&close).next().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn an_s3_backup_is_sent_in_parts_and_becomes_visible_only_on_commit() {
    let started = Instant::now();
    let moto = start_moto().await;
    let bucket = moto.create_bucket().await;
    let storage = S3Storage::new(&moto.settings(&bucket, "dbops/backups")).unwrap();
    assert_eq!(storage.kind(), "s3");
    assert_eq!(
        storage.describe(),
        format!("s3://{bucket}/dbops/backups at {}", moto.url())
    );

    let key = "pg/prod/big.dump";
    let total = 40 * MIB;
    let mut upload = storage.create(key).await.unwrap();
    let sha = write_data(&mut upload, total, 256 * 1024, 11).await;

    // Parts are on their way while the object is still invisible.
    let uploads = moto.multipart_uploads(&bucket).await;
    assert_eq!(
        xml_values(&uploads, "Key"),
        vec!["dbops/backups/pg/prod/big.dump".to_string()],
        "{uploads}"
    );
    let upload_id = xml_values(&uploads, "UploadId").remove(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let parts = reqwest::Client::new()
            .get(format!(
                "{}/{bucket}/dbops/backups/{key}?uploadId={upload_id}",
                moto.url()
            ))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if xml_values(&parts, "PartNumber").len() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "parts not sent before commit: {parts}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(storage.list("").await.unwrap(), Vec::<String>::new());
    assert!(matches!(
        storage.size(key).await,
        Err(StorageError::NotFound(_))
    ));

    upload.commit().await.unwrap();

    assert_eq!(
        xml_values(&moto.multipart_uploads(&bucket).await, "Upload"),
        Vec::<String>::new()
    );
    assert_eq!(storage.size(key).await.unwrap(), total as u64);
    assert_eq!(sha256_of(&storage, key).await.unwrap(), (sha, total as u64));
    // The object's ETag says how many parts made it: 16 + 16 + 8 MiB.
    use object_store::ObjectStoreExt;
    let raw = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&bucket)
        .with_region("us-east-1")
        .with_endpoint(moto.url())
        .with_allow_http(true)
        .with_access_key_id("AKIDDBOPSTEST")
        .with_secret_access_key("dbops-test-secret-value")
        .build()
        .unwrap();
    let meta = raw
        .head(&object_store::path::Path::from(format!(
            "dbops/backups/{key}"
        )))
        .await
        .unwrap();
    assert!(
        meta.e_tag
            .as_deref()
            .is_some_and(|t| t.trim_matches('"').ends_with("-3")),
        "{:?}",
        meta.e_tag
    );

    // An aborted upload leaves neither an object nor an unfinished upload.
    let mut aborted = storage.create("pg/prod/aborted.dump").await.unwrap();
    write_data(&mut aborted, 20 * MIB, 256 * 1024, 12).await;
    assert_eq!(
        xml_values(&moto.multipart_uploads(&bucket).await, "Upload").len(),
        1
    );
    aborted.abort().await.unwrap();
    assert_eq!(
        xml_values(&moto.multipart_uploads(&bucket).await, "Upload"),
        Vec::<String>::new()
    );
    assert!(matches!(
        storage.size("pg/prod/aborted.dump").await,
        Err(StorageError::NotFound(_))
    ));

    // A small backup (under one part) is a single PUT at commit.
    let mut small = storage.create("redis/cache/dump.rdb").await.unwrap();
    let small_sha = write_data(&mut small, 1000, 100, 13).await;
    assert_eq!(storage.list("redis").await.unwrap(), Vec::<String>::new());
    small.commit().await.unwrap();
    assert_eq!(
        sha256_of(&storage, "redis/cache/dump.rdb").await.unwrap(),
        (small_sha, 1000)
    );

    // Listing is by whole segments under the configured prefix.
    assert_eq!(
        storage.list("").await.unwrap(),
        vec![key.to_string(), "redis/cache/dump.rdb".to_string()]
    );
    assert_eq!(storage.list("pg").await.unwrap(), vec![key.to_string()]);
    assert_eq!(
        storage.list("pg/prod/").await.unwrap(),
        vec![key.to_string()]
    );
    assert_eq!(storage.list("p").await.unwrap(), Vec::<String>::new());
    assert_eq!(storage.remove_partials().await.unwrap(), 0);

    storage.delete(key).await.unwrap();
    storage.delete(key).await.unwrap(); // already gone: still fine
    assert_eq!(
        storage.list("").await.unwrap(),
        vec!["redis/cache/dump.rdb".to_string()]
    );
    assert!(matches!(
        storage.open(key).await.err().unwrap(),
        StorageError::NotFound(_)
    ));
    eprintln!("S3 test took {:?} (moto start included)", started.elapsed());
}

#[tokio::test]
async fn a_dropped_s3_upload_is_aborted_and_s3_errors_name_the_place_but_no_secret() {
    let moto = start_moto().await;
    let bucket = moto.create_bucket().await;
    let storage = S3Storage::new(&moto.settings(&bucket, "")).unwrap();

    // A cancelled backup task drops its upload: the multipart upload is aborted.
    let mut upload = storage.create("pg/cancelled.dump").await.unwrap();
    write_data(&mut upload, 20 * MIB, 256 * 1024, 21).await;
    assert_eq!(
        xml_values(&moto.multipart_uploads(&bucket).await, "Upload").len(),
        1
    );
    drop(upload);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !xml_values(&moto.multipart_uploads(&bucket).await, "Upload").is_empty() {
        assert!(Instant::now() < deadline, "the dropped upload stayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(storage.list("").await.unwrap(), Vec::<String>::new());

    // A bucket that does not exist: a readable error, no credentials in it.
    let missing = S3Storage::new(&moto.settings("no-such-bucket-dbops", "x")).unwrap();
    let mut upload = missing.create("pg/a.dump").await.unwrap();
    upload.write_all(b"tiny").await.unwrap();
    let e = upload.commit().await.unwrap_err().to_string();
    assert!(
        e.contains("s3://no-such-bucket-dbops/x/pg/a.dump")
            && e.contains("The specified bucket does not exist (NoSuchBucket)"),
        "{e}"
    );
    assert!(
        !e.contains("dbops-test-secret-value") && !e.contains("AKIDDBOPSTEST"),
        "{e}"
    );
    let e = missing.open("pg/a.dump").await.err().unwrap();
    assert!(matches!(e, StorageError::Config(_)), "{e}");
    assert_eq!(
        e.to_string(),
        "the S3 bucket no-such-bucket-dbops does not exist \
         (reading s3://no-such-bucket-dbops/x/pg/a.dump)"
    );
}
