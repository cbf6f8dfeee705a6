//! Memory by key prefix: SCAN the keyspace (all of it, or the first N keys as a
//! sample), `MEMORY USAGE` and `PTTL` of every key in one pipeline per SCAN reply,
//! grouped by the first segments of the key (`service:entity:*`, depth chosen by
//! the operator). The result — groups, biggest keys, TTL distribution, how many
//! keys were looked at and how long it took — is kept on the job's row.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap},
    time::Instant,
};

use bytes::Bytes;
use fred::prelude::{Client, ClientLike, Value};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{
    conn::{self, Nodes, arg, bytes_arg, key_cmd, scan_once},
    keys, redis_error,
};
use crate::jobs::Progress;

/// `COUNT` per SCAN call of the job.
pub const SCAN_COUNT: u32 = 1000;
/// Groups kept in the result (the rest are summed as "other").
pub const KEEP_GROUPS: usize = 200;
/// Distinct groups counted before new ones go into "other" (bounds memory).
pub const MAX_GROUPS: usize = 100_000;
/// Biggest keys kept.
pub const BIGGEST: usize = 25;
/// Deepest prefix depth.
pub const MAX_DEPTH: usize = 6;

/// What to scan and how to group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Params {
    pub db: u8,
    pub depth: usize,
    pub separator: String,
    /// A MATCH glob ("*" for everything).
    pub pattern: String,
    /// Look at this many keys at most (a sample); `None` scans everything.
    pub sample: Option<u64>,
}

impl Params {
    /// From the form: `db`, `depth`, `separator`, `pattern`, `sample` (empty = all).
    pub fn parse(form: &BTreeMap<String, String>) -> Result<Params, String> {
        let get = |k: &str| form.get(k).map(|v| v.trim()).unwrap_or("");
        let db = match get("db") {
            "" => 0,
            v => v
                .parse::<u8>()
                .ok()
                .filter(|d| *d < 64)
                .ok_or("“db” must be a database number (0–63).")?,
        };
        let depth = match get("depth") {
            "" => 2,
            v => v
                .parse::<usize>()
                .ok()
                .filter(|d| (1..=MAX_DEPTH).contains(d))
                .ok_or(format!("“depth” must be between 1 and {MAX_DEPTH}."))?,
        };
        let separator = match form.get("separator").map(String::as_str).unwrap_or("") {
            "" => ":".to_string(),
            s if s.len() == 1 && s.is_ascii() && !s.chars().all(char::is_control) => s.to_string(),
            _ => return Err("“separator” must be one character, like : or /.".into()),
        };
        let pattern = match get("pattern") {
            "" => "*".to_string(),
            p => {
                keys::check_pattern(p)?;
                p.to_string()
            }
        };
        let sample = match get("sample").replace(',', "").as_str() {
            "" | "all" => None,
            v => Some(
                v.parse::<u64>()
                    .ok()
                    .filter(|n| *n >= 100)
                    .ok_or("“sample” must be a number of keys (100 or more), or empty for all.")?,
            ),
        };
        Ok(Params {
            db,
            depth,
            separator,
            pattern,
            sample,
        })
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    pub fn from_json(v: &serde_json::Value) -> Result<Params, String> {
        serde_json::from_value(v.clone()).map_err(|e| format!("bad parameters: {e}"))
    }
}

#[derive(Default, Clone, Copy)]
struct Sum {
    keys: u64,
    bytes: u64,
    with_ttl: u64,
}

/// TTL buckets: label and upper bound in ms (exclusive).
const TTL_BUCKETS: [(&str, i64); 6] = [
    ("under 1 minute", 60_000),
    ("1 minute – 1 hour", 3_600_000),
    ("1 hour – 1 day", 86_400_000),
    ("1 day – 7 days", 604_800_000),
    ("7 days – 30 days", 2_592_000_000),
    ("30 days or more", i64::MAX),
];

fn ttl_bucket(ttl_ms: i64) -> usize {
    if ttl_ms < 0 {
        0
    } else {
        1 + TTL_BUCKETS
            .iter()
            .position(|(_, upper)| ttl_ms < *upper)
            .unwrap_or(5)
    }
}

/// What the scan accumulates.
struct Tally {
    groups: HashMap<Vec<u8>, Sum>,
    other: Sum,
    ttl: [Sum; 7],
    biggest: BinaryHeap<Reverse<(u64, Vec<u8>, i64)>>,
    total: Sum,
    no_memory: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            groups: HashMap::new(),
            other: Sum::default(),
            ttl: [Sum::default(); 7],
            biggest: BinaryHeap::new(),
            total: Sum::default(),
            no_memory: 0,
        }
    }

    fn add(&mut self, p: &Params, key: &[u8], bytes: Option<u64>, ttl_ms: i64) {
        if ttl_ms == -2 {
            return; // gone between SCAN and the pipeline
        }
        let Some(bytes) = bytes else {
            self.no_memory += 1;
            return;
        };
        let has_ttl = u64::from(ttl_ms >= 0);
        let add = |s: &mut Sum| {
            s.keys += 1;
            s.bytes += bytes;
            s.with_ttl += has_ttl;
        };
        add(&mut self.total);
        add(&mut self.ttl[ttl_bucket(ttl_ms)]);
        let prefix = keys::prefix_of(key, p.separator.as_bytes()[0], p.depth);
        if let Some(s) = self.groups.get_mut(&prefix) {
            add(s);
        } else if self.groups.len() < MAX_GROUPS {
            let mut s = Sum::default();
            add(&mut s);
            self.groups.insert(prefix, s);
        } else {
            add(&mut self.other);
        }
        if self.biggest.len() < BIGGEST {
            self.biggest.push(Reverse((bytes, key.to_vec(), ttl_ms)));
        } else if self
            .biggest
            .peek()
            .is_some_and(|Reverse((b, _, _))| *b < bytes)
        {
            self.biggest.pop();
            self.biggest.push(Reverse((bytes, key.to_vec(), ttl_ms)));
        }
    }
}

/// `MEMORY USAGE` and `PTTL` of a batch of keys on one node, in one pipeline.
pub async fn usage(client: &Client, keys: &[Bytes]) -> Result<Vec<(Option<u64>, i64)>, String> {
    let pipe = client.pipeline();
    for k in keys {
        let () = pipe
            .custom(key_cmd("MEMORY"), vec![arg("USAGE"), bytes_arg(k)])
            .await
            .map_err(|e| redis_error("could not queue MEMORY USAGE", &e))?;
        let () = pipe
            .custom(key_cmd("PTTL"), vec![bytes_arg(k)])
            .await
            .map_err(|e| redis_error("could not queue PTTL", &e))?;
    }
    let results: Vec<Result<Value, _>> = pipe.try_all().await;
    if results.len() != keys.len() * 2 {
        return Err("Redis answered fewer commands than were sent".into());
    }
    let mut out = Vec::with_capacity(keys.len());
    let mut it = results.into_iter();
    while let (Some(m), Some(t)) = (it.next(), it.next()) {
        let m = m.map_err(|e| redis_error("MEMORY USAGE failed", &e))?;
        let t = t.map_err(|e| redis_error("PTTL failed", &e))?;
        out.push((
            m.as_i64().map(|n| n.max(0) as u64),
            t.as_i64().unwrap_or(-2),
        ));
    }
    Ok(out)
}

/// Runs the scan over every primary and returns the result kept on the job.
pub async fn run(
    nodes: &Nodes,
    p: &Params,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<serde_json::Value, String> {
    let started = Instant::now();
    progress.set_phase("scanning");
    let mut dbsize = 0u64;
    for c in &nodes.conns {
        dbsize += conn::dbsize(&c.client).await?;
    }
    progress.set_items_total(p.sample.map(|s| s.min(dbsize)).unwrap_or(dbsize));
    let mut tally = Tally::new();
    let mut scanned = 0u64;
    let mut calls = 0u64;
    let mut complete = true;
    'nodes: for (i, c) in nodes.conns.iter().enumerate() {
        let mut cursor = Bytes::from_static(b"0");
        loop {
            if cancel.is_cancelled() {
                return Err(format!("stopped after looking at {scanned} keys"));
            }
            let (next, batch) =
                scan_once(&c.client, &cursor, Some(&p.pattern), None, SCAN_COUNT).await?;
            calls += 1;
            let batch: Vec<Bytes> = match p.sample {
                Some(limit) if scanned + batch.len() as u64 > limit => {
                    batch.into_iter().take((limit - scanned) as usize).collect()
                }
                _ => batch,
            };
            if !batch.is_empty() {
                for (k, (bytes, ttl)) in batch.iter().zip(usage(&c.client, &batch).await?) {
                    tally.add(p, k, bytes, ttl);
                }
                scanned += batch.len() as u64;
                progress.add_items(batch.len() as u64);
            }
            if p.sample.is_some_and(|limit| scanned >= limit) {
                complete = next.as_ref() == b"0" && i + 1 == nodes.conns.len();
                break 'nodes;
            }
            if next.as_ref() == b"0" {
                break;
            }
            cursor = next;
        }
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;

    let mut groups: Vec<(Vec<u8>, Sum)> = tally.groups.into_iter().collect();
    groups.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(a.0.cmp(&b.0)));
    let group_count = groups.len();
    let mut other = tally.other;
    for (_, s) in groups.iter().skip(KEEP_GROUPS) {
        other.keys += s.keys;
        other.bytes += s.bytes;
        other.with_ttl += s.with_ttl;
    }
    let shown: Vec<serde_json::Value> = groups
        .iter()
        .take(KEEP_GROUPS)
        .map(|(prefix, s)| {
            json!({
                "prefix": keys::display(prefix),
                "pattern_hex": keys::encode(prefix),
                "keys": s.keys,
                "bytes": s.bytes,
                "with_ttl": s.with_ttl,
            })
        })
        .collect();
    let mut biggest: Vec<(u64, Vec<u8>, i64)> =
        tally.biggest.into_iter().map(|Reverse(x)| x).collect();
    biggest.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let ttl: Vec<serde_json::Value> = std::iter::once("no expiry")
        .chain(TTL_BUCKETS.iter().map(|(l, _)| *l))
        .zip(tally.ttl.iter())
        .map(|(label, s)| json!({ "bucket": label, "keys": s.keys, "bytes": s.bytes }))
        .collect();
    Ok(json!({
        "db": p.db,
        "pattern": p.pattern,
        "depth": p.depth,
        "separator": p.separator,
        "sample": p.sample,
        "complete": complete,
        "keys_scanned": scanned,
        "keys_counted": tally.total.keys,
        "keys_without_memory": tally.no_memory,
        "dbsize": dbsize,
        "total_bytes": tally.total.bytes,
        "with_ttl": tally.total.with_ttl,
        "nodes": nodes.conns.len(),
        "scan_calls": calls,
        "elapsed_ms": elapsed_ms,
        "group_count": group_count,
        "groups": shown,
        "other": { "keys": other.keys, "bytes": other.bytes, "with_ttl": other.with_ttl },
        "biggest": biggest.iter().map(|(b, k, t)| json!({
            "key": keys::display(k), "key_hex": keys::encode(k), "bytes": b, "ttl_ms": t,
        })).collect::<Vec<_>>(),
        "ttl": ttl,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters_have_defaults_and_limits() {
        let p = Params::parse(&form(&[])).unwrap();
        assert_eq!(
            p,
            Params {
                db: 0,
                depth: 2,
                separator: ":".into(),
                pattern: "*".into(),
                sample: None
            }
        );
        let p = Params::parse(&form(&[
            ("db", "3"),
            ("depth", "1"),
            ("separator", "/"),
            ("sample", "10,000"),
        ]))
        .unwrap();
        assert_eq!(
            (p.db, p.depth, p.separator.as_str(), p.sample),
            (3, 1, "/", Some(10_000))
        );
        for bad in [
            ("db", "x"),
            ("depth", "0"),
            ("depth", "9"),
            ("separator", "::"),
            ("sample", "5"),
        ] {
            assert!(Params::parse(&form(&[bad])).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_are_tallied_by_prefix_ttl_and_size() {
        let p = Params::parse(&form(&[("depth", "2")])).unwrap();
        let mut t = Tally::new();
        t.add(&p, b"auth:refresh:1", Some(100), -1);
        t.add(&p, b"auth:refresh:2", Some(50), 30_000);
        t.add(&p, b"payment:idem:1", Some(10), 7_200_000);
        t.add(&p, b"gone", Some(999), -2);
        assert_eq!(t.total.keys, 3);
        assert_eq!(t.total.bytes, 160);
        let g = &t.groups[&b"auth:refresh:*".to_vec()];
        assert_eq!((g.keys, g.bytes, g.with_ttl), (2, 150, 1));
        assert_eq!(t.ttl[0].keys, 1); // no expiry
        assert_eq!(t.ttl[1].keys, 1); // under a minute
        assert_eq!(t.ttl[3].keys, 1); // 1 h – 1 day
        assert_eq!(t.biggest.len(), 3);
    }
}
