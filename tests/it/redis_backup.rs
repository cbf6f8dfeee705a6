//! Redis backups against real, throwaway redis-server instances: a logical export
//! restores every type, binary key and TTL exactly; damaged exports are refused
//! before anything is written; RDB snapshots never put the password on a command line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dbops::backups::redis_dump::{
    ExportStats, ImportMode, ImportStats, logical_export, logical_import, rdb_snapshot,
    verify_export,
};
use dbops::devcluster::RedisServer;
use dbops::jobs::Progress;
use dbops::targets::{Registry, Target};
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use tokio::io::AsyncReadExt as _;

/// A fresh directory under /tmp, removed on drop (declare it before the servers).
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        let dir =
            Path::new("/tmp").join(format!("dbops-rb-{tag}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn sub(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A throwaway redis-server (killed on drop, also when a test panics).
pub(crate) async fn redis(dir: &TempDir, name: &str) -> RedisServer {
    RedisServer::start(&dir.sub(name))
        .await
        .expect("start a throwaway redis-server")
}

async fn connect(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.expect("connect to Redis");
    client
}

/// A configured Redis target for `url`, as the console makes it.
fn target(url: &str) -> Arc<Target> {
    let url = url.to_string();
    let config = dbops::config::Config::from_toml(
        "[[redis]]\nname = \"cache\"\nurl_env = \"CACHE_URL\"\npolicy = \"dev\"\n",
        Path::new("test.toml"),
        Path::new("."),
        |k| (k == "CACHE_URL").then(|| url.clone()),
    )
    .expect("config");
    Registry::new(&config).get("cache").expect("target")
}

fn command(name: &str) -> CustomCommand {
    CustomCommand::new(name.to_string(), ClusterHash::FirstKey, false)
}

/// Runs raw commands (`[name, arg, …]`, binary-safe) in pipelines of 500.
async fn run_all(c: &Client, cmds: &[Vec<Vec<u8>>]) {
    for chunk in cmds.chunks(500) {
        let pipe = c.pipeline();
        for cmd in chunk {
            let name = String::from_utf8(cmd[0].clone()).unwrap();
            let args: Vec<Value> = cmd[1..]
                .iter()
                .map(|a| Value::Bytes(a.clone().into()))
                .collect();
            let () = pipe.custom(command(&name), args).await.unwrap();
        }
        for r in pipe.try_all::<Value>().await {
            r.expect("fill command");
        }
    }
}

async fn raw(c: &Client, parts: &[&[u8]]) -> Value {
    let name = String::from_utf8(parts[0].to_vec()).unwrap();
    let args: Vec<Value> = parts[1..]
        .iter()
        .map(|a| Value::Bytes(a.to_vec().into()))
        .collect();
    c.custom(command(&name), args).await.unwrap()
}

fn cmd(parts: &[&[u8]]) -> Vec<Vec<u8>> {
    parts.iter().map(|p| p.to_vec()).collect()
}

/// The key with a NUL, a newline and bytes that are not UTF-8 in its name.
const BINARY_KEY: &[u8] = b"bin\0key\nwith \xff\xfe\x80 bytes";
/// How many keys [`fill`] writes into databases 0 and 3.
const DB0_KEYS: u64 = 2000 + 2 + 201 + 201 + 202 + 201 + 21;
const DB3_KEYS: u64 = 500 + 100;

/// Every type, in databases 0 and 3, some keys with TTLs (1000 s) and some without.
pub(crate) async fn fill(url: &str) {
    let all_bytes: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    let mut db0: Vec<Vec<Vec<u8>>> = Vec::new();
    for i in 0..2000 {
        let k = format!("str:{i}");
        let v = format!("value-{i}");
        if i % 3 == 0 {
            db0.push(cmd(&[b"SET", k.as_bytes(), v.as_bytes(), b"EX", b"1000"]));
        } else {
            db0.push(cmd(&[b"SET", k.as_bytes(), v.as_bytes()]));
        }
    }
    db0.push(cmd(&[b"SET", BINARY_KEY, &all_bytes]));
    db0.push(cmd(&[
        b"SET",
        b"\xff\x00",
        b"\x00\r\n\xff",
        b"PX",
        b"1000000",
    ]));
    for i in 0..200 {
        let k = format!("hash:{i}");
        db0.push(cmd(&[
            b"HSET",
            k.as_bytes(),
            b"a",
            b"1",
            b"b",
            b"\xff\x00",
            b"c",
            b"3",
        ]));
        if i % 2 == 0 {
            db0.push(cmd(&[b"EXPIRE", k.as_bytes(), b"1000"]));
        }
        let k = format!("list:{i}");
        db0.push(cmd(&[b"RPUSH", k.as_bytes(), b"x", b"y", b"x", b"\x00"]));
        let k = format!("set:{i}");
        db0.push(cmd(&[b"SADD", k.as_bytes(), b"m1", b"m2", b"\xfe"]));
        let k = format!("zset:{i}");
        db0.push(cmd(&[b"ZADD", k.as_bytes(), b"1.5", b"one", b"-2", b"two"]));
        if i % 2 == 1 {
            db0.push(cmd(&[b"EXPIRE", k.as_bytes(), b"1000"]));
        }
    }
    // Large ones, so that the hash-table encodings are exported too.
    for i in 0..1000 {
        let n = i.to_string();
        let m = format!("member-{i}");
        db0.push(cmd(&[b"HSET", b"big:hash", m.as_bytes(), n.as_bytes()]));
        db0.push(cmd(&[b"RPUSH", b"big:list", m.as_bytes()]));
        db0.push(cmd(&[b"SADD", b"big:set", m.as_bytes()]));
        db0.push(cmd(&[b"SADD", b"int:set", n.as_bytes()]));
        db0.push(cmd(&[b"ZADD", b"big:zset", n.as_bytes(), m.as_bytes()]));
    }
    for i in 0..20 {
        let k = format!("stream:{i}");
        for j in 0..5 {
            let v = format!("v{j}");
            db0.push(cmd(&[
                b"XADD",
                k.as_bytes(),
                b"*",
                b"f",
                v.as_bytes(),
                b"bin",
                b"\xff",
            ]));
        }
    }
    db0.push(cmd(&[b"XADD", b"stream:grouped", b"*", b"f", b"1"]));
    db0.push(cmd(&[b"XADD", b"stream:grouped", b"*", b"f", b"2"]));
    db0.push(cmd(&[
        b"XGROUP",
        b"CREATE",
        b"stream:grouped",
        b"workers",
        b"0",
    ]));
    db0.push(cmd(&[
        b"XREADGROUP",
        b"GROUP",
        b"workers",
        b"alice",
        b"COUNT",
        b"1",
        b"STREAMS",
        b"stream:grouped",
        b">",
    ]));
    db0.push(cmd(&[b"EXPIRE", b"stream:grouped", b"1000"]));

    let mut db3: Vec<Vec<Vec<u8>>> = Vec::new();
    for i in 0..500 {
        let k = format!("three:{i}");
        db3.push(cmd(&[b"SET", k.as_bytes(), b"in db 3"]));
    }
    for i in 0..100 {
        let k = format!("three:hash:{i}");
        db3.push(cmd(&[b"HSET", k.as_bytes(), b"f", b"v"]));
        db3.push(cmd(&[b"EXPIRE", k.as_bytes(), b"1000"]));
    }

    let filler = connect(url).await;
    run_all(&filler, &db0).await;
    filler.select(3).await.unwrap();
    run_all(&filler, &db3).await;
    filler.quit().await.unwrap();
}

/// Every value of a reply, flattened into byte strings.
fn flat(v: Value, out: &mut Vec<Vec<u8>>) {
    match v {
        Value::Array(items) => items.into_iter().for_each(|i| flat(i, out)),
        Value::Map(map) => {
            for (k, v) in map.inner() {
                out.push(k.as_bytes().to_vec());
                flat(v, out);
            }
        }
        Value::Null => out.push(b"<nil>".to_vec()),
        Value::Integer(i) => out.push(i.to_string().into_bytes()),
        Value::Double(d) => out.push(d.to_string().into_bytes()),
        other => out.push(other.as_bytes().expect("bytes").to_vec()),
    }
}

/// One key as a user would read it: type, value (typed read) and when it expires
/// (PTTL + the time it was read, so that servers read a few seconds apart compare).
#[derive(Debug)]
struct Entry {
    kind: String,
    value: Vec<Vec<u8>>,
    expires_at: Option<i64>,
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Everything in database `db`, read with typed commands.
async fn contents(url: &str, db: u32) -> BTreeMap<Vec<u8>, Entry> {
    let c = connect(url).await;
    c.select(db).await.unwrap();
    let mut out = BTreeMap::new();
    let mut cursor: Vec<u8> = b"0".to_vec();
    loop {
        let reply = raw(&c, &[b"SCAN", &cursor, b"COUNT", b"1000"]).await;
        let mut parts = reply.into_array().into_iter();
        cursor = parts.next().unwrap().as_bytes().unwrap().to_vec();
        let mut keys = Vec::new();
        flat(parts.next().unwrap(), &mut keys);
        for key in keys {
            let kind = raw(&c, &[b"TYPE", &key]).await.as_string().unwrap();
            let mut value = Vec::new();
            match kind.as_str() {
                "string" => flat(raw(&c, &[b"GET", &key]).await, &mut value),
                "hash" => {
                    let mut pairs = Vec::new();
                    flat(raw(&c, &[b"HGETALL", &key]).await, &mut pairs);
                    let mut pairs: Vec<Vec<u8>> = pairs.chunks(2).map(|p| p.concat()).collect();
                    pairs.sort();
                    value = pairs;
                }
                "list" => flat(raw(&c, &[b"LRANGE", &key, b"0", b"-1"]).await, &mut value),
                "set" => {
                    flat(raw(&c, &[b"SMEMBERS", &key]).await, &mut value);
                    value.sort();
                }
                "zset" => flat(
                    raw(&c, &[b"ZRANGE", &key, b"0", b"-1", b"WITHSCORES"]).await,
                    &mut value,
                ),
                "stream" => {
                    flat(raw(&c, &[b"XRANGE", &key, b"-", b"+"]).await, &mut value);
                    flat(raw(&c, &[b"XINFO", b"GROUPS", &key]).await, &mut value);
                }
                other => panic!("unexpected type {other}"),
            }
            let pttl = raw(&c, &[b"PTTL", &key]).await.as_i64().unwrap();
            let expires_at = (pttl >= 0).then(|| unix_ms() + pttl);
            out.insert(
                key,
                Entry {
                    kind,
                    value,
                    expires_at,
                },
            );
        }
        if cursor == b"0" {
            break;
        }
    }
    c.quit().await.unwrap();
    out
}

/// Asserts that databases 0 and 3 of both servers hold the same keys, types, values
/// and (within 2 s) TTLs.
pub(crate) async fn assert_same_data(source: &str, dest: &str) {
    for db in [0, 3] {
        let a = contents(source, db).await;
        let b = contents(dest, db).await;
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "keys of database {db} differ"
        );
        for (key, ea) in &a {
            let eb = &b[key];
            let name = String::from_utf8_lossy(key);
            assert_eq!(ea.kind, eb.kind, "type of {name}");
            assert_eq!(ea.value, eb.value, "value of {name}");
            match (ea.expires_at, eb.expires_at) {
                (None, None) => {}
                (Some(a), Some(b)) => assert!(
                    (a - b).abs() <= 2000,
                    "expiry of {name} differs by {} ms",
                    a - b
                ),
                (a, b) => panic!("TTL of {name}: {a:?} vs {b:?}"),
            }
        }
    }
}

pub(crate) async fn total_keys(url: &str) -> i64 {
    let c = connect(url).await;
    let info: String = c.info(Some(fred::types::InfoKind::Keyspace)).await.unwrap();
    c.quit().await.unwrap();
    dbops::targets::redis::total_keys(&dbops::targets::redis::parse_info(&info))
}

async fn export(url: &str) -> (Vec<u8>, ExportStats) {
    let client = connect(url).await;
    let progress = Progress::new("queued");
    let mut out: Vec<u8> = Vec::new();
    let stats = logical_export(&client, &mut out, &progress)
        .await
        .expect("export");
    assert_eq!(stats.bytes, out.len() as u64);
    assert_eq!(progress.bytes(), stats.bytes);
    assert_eq!(progress.items(), stats.keys);
    client.quit().await.unwrap();
    (out, stats)
}

async fn import(url: &str, export: &[u8], mode: ImportMode) -> Result<ImportStats, String> {
    let client = connect(url).await;
    let progress = Progress::new("queued");
    let result = logical_import(&client, &mut &export[..], mode, &progress).await;
    client.quit().await.unwrap();
    result
}

#[tokio::test]
async fn a_logical_export_restores_every_type_binary_key_and_ttl_into_an_empty_redis() {
    let dir = TempDir::new("roundtrip");
    let mut source = redis(&dir, "source").await;
    let mut dest = redis(&dir, "dest").await;
    fill(&source.url()).await;

    // The caller's client keeps its database: the export SELECTs on its own connection.
    let client = connect(&source.url()).await;
    let progress = Progress::new("queued");
    let mut out: Vec<u8> = Vec::new();
    let stats = logical_export(&client, &mut out, &progress).await.unwrap();
    let db0_size: u64 = client.dbsize().await.unwrap();
    assert_eq!(db0_size, DB0_KEYS, "the caller's client left database 0");
    assert_eq!(progress.items_total(), DB0_KEYS + DB3_KEYS);
    client.quit().await.unwrap();

    assert_eq!(stats.keys, DB0_KEYS + DB3_KEYS);
    assert_eq!(stats.databases, [0, 3]);
    assert!(out.starts_with(b"DBOPS-REDIS-EXPORT 1\n"));
    let verified = verify_export(&mut &out[..]).await.unwrap();
    assert_eq!(verified, stats);

    let imported = import(&dest.url(), &out, ImportMode::IntoEmpty)
        .await
        .unwrap();
    assert_eq!(
        imported,
        ImportStats {
            restored: stats.keys,
            skipped_existing: 0,
            expired_skipped: 0
        }
    );
    assert_same_data(&source.url(), &dest.url()).await;
    let bin = raw(&connect(&dest.url()).await, &[b"GET", BINARY_KEY]).await;
    assert_eq!(bin.as_bytes().unwrap().len(), 5000);

    source.stop().await.unwrap();
    dest.stop().await.unwrap();
}

#[tokio::test]
async fn importing_again_is_refused_into_empty_skips_with_keep_and_overwrites_with_replace() {
    let dir = TempDir::new("modes");
    let mut source = redis(&dir, "source").await;
    let mut dest = redis(&dir, "dest").await;
    fill(&source.url()).await;
    let (out, stats) = export(&source.url()).await;
    import(&dest.url(), &out, ImportMode::IntoEmpty)
        .await
        .unwrap();

    // Operators change the destination after the first restore.
    let d = connect(&dest.url()).await;
    let () = d.set("str:1", "changed", None, None, false).await.unwrap();
    let _: i64 = d.del("str:2").await.unwrap();

    let refused = import(&dest.url(), &out, ImportMode::IntoEmpty)
        .await
        .unwrap_err();
    assert!(
        refused.contains("not empty") && refused.contains("database 0 holds"),
        "{refused}"
    );
    let after_refusal: Option<String> = d.get("str:2").await.unwrap();
    assert_eq!(after_refusal, None, "a refused import wrote keys");

    let kept = import(&dest.url(), &out, ImportMode::MergeKeep)
        .await
        .unwrap();
    assert_eq!(
        kept,
        ImportStats {
            restored: 1,
            skipped_existing: stats.keys - 1,
            expired_skipped: 0
        }
    );
    let v: String = d.get("str:1").await.unwrap();
    assert_eq!(v, "changed", "MergeKeep overwrote an existing key");
    let v: String = d.get("str:2").await.unwrap();
    assert_eq!(v, "value-2");

    let replaced = import(&dest.url(), &out, ImportMode::MergeReplace)
        .await
        .unwrap();
    assert_eq!(
        replaced,
        ImportStats {
            restored: stats.keys,
            skipped_existing: 0,
            expired_skipped: 0
        }
    );
    let v: String = d.get("str:1").await.unwrap();
    assert_eq!(v, "value-1", "MergeReplace kept the changed value");
    assert_same_data(&source.url(), &dest.url()).await;
    d.quit().await.unwrap();

    source.stop().await.unwrap();
    dest.stop().await.unwrap();
}

#[tokio::test]
async fn a_truncated_or_altered_export_is_refused_and_nothing_is_written() {
    let dir = TempDir::new("damaged");
    let mut source = redis(&dir, "source").await;
    let mut dest = redis(&dir, "dest").await;
    fill(&source.url()).await;
    let (out, _) = export(&source.url()).await;

    let truncated = &out[..out.len() * 2 / 3];
    let mut flipped = out.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x20;
    let no_trailer = &out[..out.len() - 41];

    for (what, bad) in [
        ("truncated", truncated),
        ("a flipped byte", &flipped[..]),
        ("no trailer", no_trailer),
    ] {
        let err = verify_export(&mut &bad[..]).await.unwrap_err();
        assert!(
            err.contains("incomplete") || err.contains("damaged"),
            "{what}: {err}"
        );
        for mode in [
            ImportMode::IntoEmpty,
            ImportMode::MergeKeep,
            ImportMode::MergeReplace,
        ] {
            let err = import(&dest.url(), bad, mode).await.unwrap_err();
            assert!(
                err.contains("incomplete") || err.contains("damaged"),
                "{what}: {err}"
            );
        }
        assert_eq!(
            total_keys(&dest.url()).await,
            0,
            "{what}: keys were written"
        );
    }
    source.stop().await.unwrap();
    dest.stop().await.unwrap();
}

#[tokio::test]
async fn keys_whose_ttl_ran_out_since_the_export_are_not_restored() {
    let dir = TempDir::new("expired");
    let mut source = redis(&dir, "source").await;
    let mut dest = redis(&dir, "dest").await;
    let s = connect(&source.url()).await;
    let () = s
        .set("short", "lived", Some(Expiration::PX(1200)), None, false)
        .await
        .unwrap();
    let () = s.set("long", "lived", None, None, false).await.unwrap();
    let (out, stats) = export(&source.url()).await;
    assert_eq!(stats.keys, 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let imported = import(&dest.url(), &out, ImportMode::IntoEmpty)
        .await
        .unwrap();
    assert_eq!(
        imported,
        ImportStats {
            restored: 1,
            skipped_existing: 0,
            expired_skipped: 1
        }
    );
    let d = connect(&dest.url()).await;
    let short: Option<String> = d.get("short").await.unwrap();
    let long: Option<String> = d.get("long").await.unwrap();
    assert_eq!((short, long.as_deref()), (None, Some("lived")));

    source.stop().await.unwrap();
    dest.stop().await.unwrap();
}

/// Pseudo-random bytes, so that the RDB's LZF compression cannot shrink them.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The pids of running `redis-cli` processes and their command lines.
fn redis_cli_processes() -> Vec<(u32, Vec<u8>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() == "redis-cli" {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push((pid, cmdline));
        }
    }
    found
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn an_rdb_snapshot_is_fetched_without_the_password_on_any_command_line() {
    let dir = TempDir::new("rdb");
    let mut server = redis(&dir, "server").await;
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let c = connect(&server.url()).await;
    // ~4 MB that does not compress: more than the pipes hold, so redis-cli stays alive
    // (blocked on its stdout) until the test reads.
    let cmds: Vec<Vec<Vec<u8>>> = (0..2000u64)
        .map(|i| cmd(&[b"SET", format!("k{i}").as_bytes(), &noise(i, 2048)]))
        .collect();
    run_all(&c, &cmds).await;
    let _: Value = raw(
        &c,
        &[b"CONFIG", b"SET", b"requirepass", password.as_bytes()],
    )
    .await;
    c.quit().await.unwrap();

    let url = format!("redis://:{password}@127.0.0.1:{}", server.port());
    let t = target(&url);
    let progress = Arc::new(Progress::new("queued"));
    let (mut writer, mut reader) = tokio::io::duplex(64 << 10);
    let task = {
        let (t, progress) = (t.clone(), progress.clone());
        tokio::spawn(async move { rdb_snapshot(&t, &mut writer, &progress).await })
    };

    // While it runs: every redis-cli's command line is free of the password, and ours
    // got it through its environment.
    let port = server.port().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let ours = loop {
        let procs = redis_cli_processes();
        for (pid, cmdline) in &procs {
            assert!(
                !contains(cmdline, password.as_bytes()),
                "password on the command line of redis-cli {pid}"
            );
        }
        if let Some((pid, _)) = procs
            .iter()
            .find(|(_, cmdline)| contains(cmdline, b"--rdb") && contains(cmdline, port.as_bytes()))
        {
            break *pid;
        }
        assert!(Instant::now() < deadline, "no redis-cli process was seen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let environ = std::fs::read(format!("/proc/{ours}/environ")).unwrap_or_default();
    assert!(contains(
        &environ,
        format!("REDISCLI_AUTH={password}").as_bytes()
    ));

    let path = dir.sub("snapshot.rdb");
    let mut file = tokio::fs::File::create(&path).await.unwrap();
    tokio::io::copy(&mut reader, &mut file).await.unwrap();
    drop(file);
    let written = task.await.unwrap().expect("snapshot");

    let mut head = [0u8; 5];
    let mut file = tokio::fs::File::open(&path).await.unwrap();
    file.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"REDIS");
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size > 2000 * 2048, "snapshot of {size} bytes");
    assert_eq!(written, size);
    assert_eq!(progress.bytes(), size);

    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_rdb_snapshot_with_a_wrong_password_fails_with_a_readable_auth_error() {
    let dir = TempDir::new("rdbauth");
    let mut server = redis(&dir, "server").await;
    let c = connect(&server.url()).await;
    let _: Value = raw(&c, &[b"CONFIG", b"SET", b"requirepass", b"the-right-one"]).await;
    c.quit().await.unwrap();

    let url = format!("redis://:not-the-password@127.0.0.1:{}", server.port());
    let t = target(&url);
    let mut out: Vec<u8> = Vec::new();
    let err = rdb_snapshot(&t, &mut out, &Progress::new("queued"))
        .await
        .unwrap_err();
    assert!(err.starts_with("authentication failed"), "{err}");
    assert!(
        !err.contains("not-the-password") && !err.contains(&url),
        "{err}"
    );
    assert!(out.is_empty(), "something was written: {} bytes", out.len());

    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_rdb_snapshot_refused_by_the_server_suggests_a_logical_export() {
    let dir = TempDir::new("rdbperm");
    let mut server = redis(&dir, "server").await;
    let c = connect(&server.url()).await;
    // Like a managed service: the user may do everything except replicate.
    let _: Value = raw(
        &c,
        &[
            b"ACL", b"SETUSER", b"ops", b"on", b">ops-pw", b"~*", b"+@all", b"-sync", b"-psync",
        ],
    )
    .await;
    c.quit().await.unwrap();

    let t = target(&format!("redis://ops:ops-pw@127.0.0.1:{}", server.port()));
    let mut out: Vec<u8> = Vec::new();
    let err = rdb_snapshot(&t, &mut out, &Progress::new("queued"))
        .await
        .unwrap_err();
    assert!(err.contains("use a logical export"), "{err}");
    assert!(!err.contains("ops-pw"), "{err}");

    server.stop().await.unwrap();
}
