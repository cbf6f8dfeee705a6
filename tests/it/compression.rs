//! Backups compressed by dbops (zstd, issue #23) against the real server: they
//! verify, test-restore and restore with the source's row counts, a damaged one
//! is refused with a sentence, a download restores by hand with the command the
//! page shows, and backups compressed by pg_dump itself (every backup from
//! before) still restore.

use dbops::{
    audit::AuditCtx,
    auth::Role,
    backups::run::{self, BackupRequest, Trigger},
};
use reqwest::StatusCode;
use sqlx::{Connection, Executor, PgConnection};

use crate::{
    backups::{app_config, row_counts, source_db, temp_dir, wait_ended, wait_for},
    helpers::{TestApp, services, spawn_app_with},
};

/// zstd's frame magic number: every file dbops compressed starts with it.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

async fn backup_now(app: &TestApp) -> i64 {
    let id = run::request(
        &app.state(),
        &AuditCtx::system(),
        "src",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    let (status, error) = wait_for(app, id).await;
    assert_eq!(status, "good", "{error:?}");
    id
}

/// The stored file's key, size, size before compression, and compression.
async fn artifact(app: &TestApp, id: i64) -> (String, i64, Option<i64>, Option<String>) {
    sqlx::query_as("SELECT storage_key, bytes, raw_bytes, compression FROM backups WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

fn new_name() -> String {
    format!("dbops_it_zs_{}", uuid::Uuid::new_v4().simple())
}

async fn admin() -> PgConnection {
    PgConnection::connect(&format!("{}/postgres", services().await.pg_base))
        .await
        .unwrap()
}

async fn drop_database(name: &str) {
    let _ = admin()
        .await
        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await;
}

async fn database_exists(name: &str) -> bool {
    sqlx::query_scalar::<_, i32>("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut admin().await)
        .await
        .unwrap()
        .is_some()
}

/// Restores backup `id` through the restore page into a new database with
/// `jobs`; returns the restore's (status, error) and the database's name.
async fn restore_through_the_page(
    app: &TestApp,
    id: i64,
    jobs: &str,
) -> ((String, Option<String>), String) {
    let mut op = app.logged_in(Role::Operator).await;
    op.get(&format!("/backups/{id}/restore")).await;
    let name = new_name();
    let r = op
        .post(
            &format!("/backups/{id}/restore"),
            &[("database", name.as_str()), ("jobs", jobs)],
        )
        .await;
    let location = r
        .location()
        .unwrap_or_else(|| panic!("{}", r.text))
        .to_string();
    let rid: i64 = location.rsplit('/').next().unwrap().parse().unwrap();
    (wait_ended(app, "restores", rid).await, name)
}

/// The one-line command the backup's page gives for restoring the download by
/// hand.
fn by_hand_command(page: &str) -> String {
    let html = scraper::Html::parse_document(page);
    let sel = scraper::Selector::parse("p.by-hand code").unwrap();
    html.select(&sel)
        .next()
        .unwrap_or_else(|| panic!("no restore-by-hand line on the page: {page}"))
        .text()
        .collect()
}

#[tokio::test]
async fn a_zstd_backup_verifies_restores_with_equal_row_counts_and_by_hand_with_the_documented_command()
 {
    let src = source_db(20_000).await;
    let dir = temp_dir("zstd");
    // The test restore also restores it (decompressed on the fly) and compares
    // row counts with the dumped snapshot.
    let extra =
        "[postgres.backup]\ntest_restore = true\ncompression_level = 3\ncompression_threads = 2\n";
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, extra),
        &[("SRC", src.url.clone())],
    )
    .await;
    let expected = row_counts(&src.url).await;
    let id = backup_now(&app).await;
    let (key, bytes, raw, compression) = artifact(&app, id).await;
    assert_eq!(compression.as_deref(), Some("zstd"));
    assert!(key.ends_with(".dump.zst"), "{key}");
    let stored = std::fs::read(dir.join(&key)).unwrap();
    assert_eq!(stored.len() as i64, bytes);
    assert_eq!(stored[..4], ZSTD_MAGIC, "the stored file is zstd");
    let raw = raw.expect("the size before compression is recorded");
    assert!(raw > bytes * 2, "{raw} bytes compressed to {bytes}");
    let verification: serde_json::Value =
        sqlx::query_scalar("SELECT verification FROM backups WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(verification["table_data"], 3, "{verification}");
    assert_eq!(
        verification["test_restore"]["row_counts_match"], true,
        "{verification}"
    );

    // Restored by dbops, streamed into a serial pg_restore and decompressed
    // into the scratch file of a parallel one.
    for jobs in ["1", "2"] {
        let ((status, error), name) = restore_through_the_page(&app, id, jobs).await;
        assert_eq!(status, "succeeded", "jobs {jobs}: {error:?}");
        let url = format!("{}/{name}", services().await.pg_base);
        assert_eq!(row_counts(&url).await, expected, "jobs {jobs}");
        drop_database(&name).await;
    }

    // Downloaded as stored, and restored by hand with the page's command.
    let mut op = app.logged_in(Role::Operator).await;
    let page = op.get(&format!("/backups/{id}")).await;
    assert!(
        page.text.contains("zstd"),
        "the page says how it is compressed"
    );
    let command = by_hand_command(&page.text);
    let file = key.rsplit('/').next().unwrap().to_string();
    assert_eq!(
        command,
        format!("zstd -d < {file} | pg_restore --no-owner -d DBNAME")
    );
    let r = op
        .client
        .get(app.url(&format!("/backups/{id}/download")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let disposition = r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(disposition.contains(&file), "{disposition}");
    let body = r.bytes().await.unwrap();
    assert!(body[..] == stored[..], "the download is the stored file");
    let downloads = temp_dir("zstd-download");
    std::fs::write(downloads.join(&file), &body).unwrap();
    let name = new_name();
    admin()
        .await
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    let url = format!("{}/{name}", services().await.pg_base);
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; {}",
            command.replace("DBNAME", &url)
        ))
        .current_dir(&downloads)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(row_counts(&url).await, expected, "restored by hand");
    drop_database(&name).await;
    let _ = std::fs::remove_dir_all(&downloads);
    src.drop_db().await;
}

#[tokio::test]
async fn a_damaged_zstd_backup_is_refused_even_when_its_recorded_checksum_was_rewritten_to_match() {
    let src = source_db(2_000).await;
    let dir = temp_dir("zstd-damaged");
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, ""),
        &[("SRC", src.url.clone())],
    )
    .await;
    let id = backup_now(&app).await;
    let (key, _, _, compression) = artifact(&app, id).await;
    assert_eq!(compression.as_deref(), Some("zstd"));
    let file = dir.join(&key);
    let original = std::fs::read(&file).unwrap();
    let mut flipped = original.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x01;
    let cut = original[..original.len() - 7].to_vec();
    for (what, damaged) in [("one byte flipped", flipped), ("truncated", cut)] {
        // As if the file had been damaged before its checksum was taken: only
        // zstd's own frame checksum and end can tell.
        use sha2::Digest;
        std::fs::write(&file, &damaged).unwrap();
        sqlx::query("UPDATE backups SET sha256 = $2, bytes = $3 WHERE id = $1")
            .bind(id)
            .bind(hex::encode(sha2::Sha256::digest(&damaged)))
            .bind(damaged.len() as i64)
            .execute(&app.db)
            .await
            .unwrap();
        for jobs in ["1", "2"] {
            let ((status, error), name) = restore_through_the_page(&app, id, jobs).await;
            assert_eq!(status, "failed", "{what}, jobs {jobs}");
            let error = error.unwrap_or_default();
            assert!(
                error.contains("the backup file is damaged: it does not decompress"),
                "{what}, jobs {jobs}: {error}"
            );
            assert!(!database_exists(&name).await, "{what}: nothing is left");
        }
    }
    let last: i64 = sqlx::query_scalar("SELECT max(id) FROM restores")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let mut op = app.logged_in(Role::Operator).await;
    let page = op.get(&format!("/restores/{last}")).await;
    assert!(
        page.text.contains("the backup file is damaged"),
        "the restore's page says why: {}",
        page.text
    );
    src.drop_db().await;
}

#[tokio::test]
async fn a_backup_compressed_by_pg_dump_itself_still_restores_in_place_and_streamed() {
    let src = source_db(5_000).await;
    let dir = temp_dir("gzip");
    // `compression = "pg_dump"`: pg_dump's own gzip, as every backup before dbops
    // compressed (their rows have no compression either).
    let extra = "[postgres.backup]\ncompression = \"pg_dump\"\n";
    let app = spawn_app_with(
        &app_config("src", "SRC", "dev", &dir, extra),
        &[("SRC", src.url.clone())],
    )
    .await;
    let expected = row_counts(&src.url).await;
    let id = backup_now(&app).await;
    let (key, bytes, _, compression) = artifact(&app, id).await;
    assert_eq!(compression, None);
    assert!(key.ends_with(".dump"), "{key}");
    let stored = std::fs::read(dir.join(&key)).unwrap();
    assert_eq!(&stored[..5], b"PGDMP", "pg_dump's own custom archive");
    assert_eq!(stored.len() as i64, bytes);
    // Compressed by pg_dump: the archive's header says gzip level -1 (default),
    // and pg_restore lists it.
    let list = std::process::Command::new("pg_restore")
        .arg("--list")
        .arg(dir.join(&key))
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("Compression: -1") || list.contains("Compression: gzip"),
        "{list}"
    );
    for jobs in ["1", "2"] {
        let ((status, error), name) = restore_through_the_page(&app, id, jobs).await;
        assert_eq!(status, "succeeded", "jobs {jobs}: {error:?}");
        let url = format!("{}/{name}", services().await.pg_base);
        assert_eq!(row_counts(&url).await, expected, "jobs {jobs}");
        drop_database(&name).await;
    }
    // The file restored in place is still there, unchanged.
    assert!(std::fs::read(dir.join(&key)).unwrap() == stored);
    let mut op = app.logged_in(Role::Operator).await;
    let page = op.get(&format!("/backups/{id}")).await;
    let file = key.rsplit('/').next().unwrap();
    assert_eq!(
        by_hand_command(&page.text),
        format!("pg_restore --no-owner -d DBNAME {file}")
    );
    src.drop_db().await;
}
