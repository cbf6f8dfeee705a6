//! Delete by pattern, the safe way round the runbook's
//! `redis-cli --scan --pattern P | xargs -L 1 redis-cli DEL`:
//!
//! 1. a **preview** scans to the end within a time budget and says exactly how many
//!    keys match (or how far it got), with a sample of them and their memory;
//! 2. the **delete** (an approved action handed to a job) SCANs and UNLINKs in
//!    batches on every primary. Each round trip carries the UNLINK of one SCAN
//!    reply and the next SCAN, so no command works on more than one batch; UNLINK
//!    frees big values in a background thread. When a round trip is slow (the
//!    server is busy) the job pauses as long again before the next one, so other
//!    clients always get their turn. It stops between batches when asked.

use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::{ClientLike, Value};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{
    conn::{self, Nodes, arg, bytes_arg, node_cmd, scan_once},
    keys, memory, redis_error,
};
use crate::jobs::Progress;

/// How long a preview may scan.
pub const PREVIEW_BUDGET: Duration = Duration::from_secs(3);
/// Keys shown in a preview.
pub const PREVIEW_SAMPLE: usize = 20;
/// Keys per batch of the delete (SCAN COUNT).
pub const DEFAULT_BATCH: u32 = 1000;
/// A round trip slower than this makes the delete pause as long again.
pub const SLOW_ROUND_TRIP: Duration = Duration::from_millis(10);

/// A key in a preview.
#[derive(Debug, Clone, Serialize)]
pub struct SampleKey {
    pub name: String,
    pub hex: String,
    pub bytes: Option<u64>,
}

/// What a delete would remove.
#[derive(Debug, Clone, Serialize)]
pub struct Preview {
    pub db: u8,
    pub pattern: String,
    /// The scan reached the end of every node within the budget: `matched` is exact.
    pub complete: bool,
    pub matched: u64,
    /// Memory of the matched keys (MEMORY USAGE, summed).
    pub bytes: u64,
    pub sample: Vec<SampleKey>,
    pub dbsize: u64,
    pub scan_calls: u64,
    pub elapsed_ms: u64,
    pub nodes: usize,
}

/// Scans for `pattern` until done or [`PREVIEW_BUDGET`] is spent.
pub async fn preview(nodes: &Nodes, pattern: &str) -> Result<Preview, String> {
    keys::check_pattern(pattern)?;
    let started = Instant::now();
    let mut out = Preview {
        db: nodes.db,
        pattern: pattern.to_string(),
        complete: true,
        matched: 0,
        bytes: 0,
        sample: vec![],
        dbsize: 0,
        scan_calls: 0,
        elapsed_ms: 0,
        nodes: nodes.conns.len(),
    };
    for c in &nodes.conns {
        out.dbsize += conn::dbsize(&c.client).await?;
    }
    'nodes: for c in &nodes.conns {
        let mut cursor = Bytes::from_static(b"0");
        loop {
            if started.elapsed() > PREVIEW_BUDGET {
                out.complete = false;
                break 'nodes;
            }
            let (next, batch) =
                scan_once(&c.client, &cursor, Some(pattern), None, DEFAULT_BATCH).await?;
            out.scan_calls += 1;
            if !batch.is_empty() {
                let usage = memory::usage(&c.client, &batch).await?;
                for (k, (bytes, ttl)) in batch.iter().zip(usage) {
                    if ttl == -2 {
                        continue;
                    }
                    out.matched += 1;
                    out.bytes += bytes.unwrap_or(0);
                    if out.sample.len() < PREVIEW_SAMPLE {
                        out.sample.push(SampleKey {
                            name: keys::display(k),
                            hex: keys::encode(k),
                            bytes,
                        });
                    }
                }
            }
            if next.as_ref() == b"0" {
                break;
            }
            cursor = next;
        }
    }
    out.sample.sort_by(|a, b| a.name.cmp(&b.name));
    out.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(out)
}

/// What dbops itself measured of a pattern on the target (never what a form
/// claims): how many of the keys it looked at match. Stored with the request (so
/// the approver sees it and the hash covers it) and measured again before the
/// delete runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Measured {
    /// DBSIZE of the database, summed over its primaries.
    pub dbsize: u64,
    /// Keys the SCAN looked at (every key when `complete`).
    pub scanned: u64,
    /// Of those, how many match the pattern.
    pub matched: u64,
    /// The scan reached the end of every primary within the time budget.
    pub complete: bool,
}

impl Measured {
    /// The pattern matches every key looked at — all of them, or every key of the
    /// sample when the scan stopped early: a delete would empty the database, so it
    /// is treated as a flush.
    pub fn matches_every_key(&self) -> bool {
        (self.scanned > 0 && self.matched >= self.scanned)
            || (self.complete && self.dbsize > 0 && self.matched >= self.dbsize)
    }

    /// What was measured, in words: "matches all 1,234 keys of db 0".
    pub fn sentence(&self, db: u8) -> String {
        let n = |v: u64| crate::fmt::count(v as i64);
        match (self.complete, self.matches_every_key()) {
            (true, true) => format!(
                "matches all {} keys of db {db}",
                n(self.dbsize.max(self.matched))
            ),
            (true, false) => format!(
                "matches {} of the {} keys of db {db}",
                n(self.matched),
                n(self.dbsize)
            ),
            (false, true) => format!(
                "matches every one of the {} keys of db {db} scanned in {} s (the database has {}; the scan stopped there)",
                n(self.scanned),
                MEASURE_BUDGET.as_secs(),
                n(self.dbsize)
            ),
            (false, false) => format!(
                "matches {} of the {} keys of db {db} scanned in {} s (the database has {}; the scan stopped there)",
                n(self.matched),
                n(self.scanned),
                MEASURE_BUDGET.as_secs(),
                n(self.dbsize)
            ),
        }
    }
}

/// How long [`measure`] may scan.
pub const MEASURE_BUDGET: Duration = PREVIEW_BUDGET;

/// Measures how many keys `pattern` matches against how many there are. Each round
/// trip carries two SCANs from the same cursor with the same COUNT, one with MATCH
/// and one without: they visit the same buckets, so Redis itself (not a glob
/// matcher of ours) says how many of the keys visited match. Stops after
/// [`MEASURE_BUDGET`]; then `complete` is false and the counts cover the keys
/// visited so far.
pub async fn measure(nodes: &Nodes, pattern: &str) -> Result<Measured, String> {
    keys::check_pattern(pattern)?;
    let started = Instant::now();
    let mut out = Measured {
        dbsize: 0,
        scanned: 0,
        matched: 0,
        complete: true,
    };
    for c in &nodes.conns {
        out.dbsize += conn::dbsize(&c.client).await?;
    }
    let count = || Value::from(i64::from(DEFAULT_BATCH));
    'nodes: for c in &nodes.conns {
        let mut cursor = Bytes::from_static(b"0");
        loop {
            if started.elapsed() > MEASURE_BUDGET {
                out.complete = false;
                break 'nodes;
            }
            let pipe = c.client.pipeline();
            for with_match in [true, false] {
                let mut args = vec![bytes_arg(&cursor)];
                if with_match {
                    args.extend([arg("MATCH"), arg(pattern)]);
                }
                args.extend([arg("COUNT"), count()]);
                let () = pipe
                    .custom(node_cmd("SCAN"), args)
                    .await
                    .map_err(|e| redis_error("could not queue SCAN", &e))?;
            }
            let mut replies = Vec::with_capacity(2);
            for r in pipe.try_all::<Value>().await {
                let r = r.map_err(|e| redis_error("SCAN failed", &e))?;
                replies.push(conn::parse_scan(r).ok_or("SCAN gave an unexpected reply")?);
            }
            let [(next, matching), (_, every)] = <[_; 2]>::try_from(replies)
                .map_err(|_| "SCAN gave an unexpected reply".to_string())?;
            out.matched += matching.len() as u64;
            // Never fewer visited than matched, even if the table was resized
            // between the two.
            out.scanned += every.len().max(matching.len()) as u64;
            if next.as_ref() == b"0" {
                break;
            }
            cursor = next;
        }
    }
    Ok(out)
}

/// The approved parameters of a delete.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Params {
    pub db: u8,
    pub pattern: String,
    /// What the preview counted (for the approver and the progress bar).
    #[serde(default)]
    pub expected: Option<u64>,
    /// Keys per batch.
    pub batch: u32,
    /// What dbops measured when the request was made (see [`measure`]); absent
    /// in requests made before it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
}

impl Params {
    pub fn parse(form: &std::collections::BTreeMap<String, String>) -> Result<Params, String> {
        let get = |k: &str| form.get(k).map(|v| v.trim()).unwrap_or("");
        let db = match get("db") {
            "" => 0,
            v => v
                .parse::<u8>()
                .ok()
                .filter(|d| *d < 64)
                .ok_or("“db” must be a database number (0–63).")?,
        };
        // The pattern is taken exactly as typed (spaces are legal in keys).
        let pattern = form.get("pattern").cloned().unwrap_or_default();
        keys::check_pattern(&pattern)?;
        if keys::matches_everything(&pattern) {
            return Err(format!(
                "“{pattern}” matches every key: use Flush database instead, which always needs an approver and the target's name typed."
            ));
        }
        let expected = match get("expected") {
            "" => None,
            v => Some(
                v.parse::<u64>()
                    .map_err(|_| "“expected” must be a number of keys.")?,
            ),
        };
        let batch = match get("batch") {
            "" => DEFAULT_BATCH,
            v => v
                .parse::<u32>()
                .ok()
                .filter(|b| (10..=10_000).contains(b))
                .ok_or("“batch” must be between 10 and 10,000 keys.")?,
        };
        Ok(Params {
            db,
            pattern,
            expected,
            batch,
            measured: None,
        })
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    pub fn from_json(v: &serde_json::Value) -> Result<Params, String> {
        serde_json::from_value(v.clone()).map_err(|e| format!("bad parameters: {e}"))
    }
}

/// What a delete did so far.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    pub deleted: u64,
    pub scanned_keys: u64,
    pub round_trips: u64,
    pub max_round_trip_ms: f64,
    pub paused_ms: u64,
}

/// SCAN + UNLINK on every primary. Returns the counts for the log; a stop or an
/// error says how many keys were deleted before it.
pub async fn run(
    nodes: &Nodes,
    p: &Params,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<serde_json::Value, String> {
    if keys::matches_everything(&p.pattern) {
        return Err("a pattern that matches every key is refused (use Flush database)".into());
    }
    let started = Instant::now();
    progress.set_phase("deleting");
    if let Some(n) = p.expected {
        progress.set_items_total(n);
    }
    let mut counts = Counts::default();
    for c in &nodes.conns {
        delete_on_node(&c.client, nodes.clustered, p, progress, cancel, &mut counts)
            .await
            .map_err(|e| format!("{e} ({} keys were deleted before this)", counts.deleted))?;
    }
    Ok(json!({
        "db": p.db,
        "pattern": p.pattern,
        "deleted": counts.deleted,
        "scanned_keys": counts.scanned_keys,
        "round_trips": counts.round_trips,
        "max_round_trip_ms": (counts.max_round_trip_ms * 100.0).round() / 100.0,
        "paused_ms": counts.paused_ms,
        "elapsed_ms": started.elapsed().as_millis() as u64,
        "nodes": nodes.conns.len(),
    }))
}

fn scan_args(cursor: &[u8], p: &Params) -> Vec<Value> {
    vec![
        bytes_arg(cursor),
        arg("MATCH"),
        arg(p.pattern.clone()),
        arg("COUNT"),
        Value::from(i64::from(p.batch)),
    ]
}

async fn delete_on_node(
    client: &fred::prelude::Client,
    clustered: bool,
    p: &Params,
    progress: &Progress,
    cancel: &CancellationToken,
    counts: &mut Counts,
) -> Result<(), String> {
    let (mut next, mut batch) = scan_once(client, b"0", Some(&p.pattern), None, p.batch).await?;
    counts.round_trips += 1;
    loop {
        if cancel.is_cancelled() {
            return Err(format!("stopped after deleting {} keys", counts.deleted));
        }
        let more = next.as_ref() != b"0";
        if batch.is_empty() && !more {
            return Ok(());
        }
        counts.scanned_keys += batch.len() as u64;
        let pipe = client.pipeline();
        if !batch.is_empty() {
            if clustered {
                // Keys of one node may sit in different slots: one UNLINK each.
                for k in &batch {
                    let () = pipe
                        .custom(node_cmd("UNLINK"), vec![bytes_arg(k)])
                        .await
                        .map_err(|e| redis_error("could not queue UNLINK", &e))?;
                }
            } else {
                let () = pipe
                    .custom(
                        node_cmd("UNLINK"),
                        batch.iter().map(|k| bytes_arg(k)).collect::<Vec<_>>(),
                    )
                    .await
                    .map_err(|e| redis_error("could not queue UNLINK", &e))?;
            }
        }
        if more {
            let () = pipe
                .custom(node_cmd("SCAN"), scan_args(&next, p))
                .await
                .map_err(|e| redis_error("could not queue SCAN", &e))?;
        }
        let sent = Instant::now();
        let mut results: Vec<Result<Value, _>> = pipe.try_all().await;
        let rtt = sent.elapsed();
        counts.round_trips += 1;
        counts.max_round_trip_ms = counts.max_round_trip_ms.max(rtt.as_secs_f64() * 1000.0);
        let scan_reply = if more { results.pop() } else { None };
        for r in results {
            let n = r.map_err(|e| redis_error("UNLINK failed", &e))?;
            let n = n.as_i64().unwrap_or(0).max(0) as u64;
            counts.deleted += n;
            progress.add_items(n);
        }
        match scan_reply {
            Some(reply) => {
                let reply = reply.map_err(|e| redis_error("SCAN failed", &e))?;
                (next, batch) = conn::parse_scan(reply).ok_or("SCAN gave an unexpected reply")?;
            }
            None => {
                next = Bytes::from_static(b"0");
                batch = Vec::new();
            }
        }
        if rtt > SLOW_ROUND_TRIP {
            // The server is busy: give other clients as much time as we took.
            counts.paused_ms += rtt.as_millis() as u64;
            tokio::time::sleep(rtt).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn form(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_pattern_is_a_flush_when_it_matches_every_key_it_was_measured_against() {
        let m = |dbsize, scanned, matched, complete| Measured {
            dbsize,
            scanned,
            matched,
            complete,
        };
        let all = m(1234, 1234, 1234, true);
        assert!(all.matches_every_key());
        assert_eq!(all.sentence(0), "matches all 1,234 keys of db 0");
        let some = m(1234, 1234, 34, true);
        assert!(!some.matches_every_key());
        assert_eq!(some.sentence(2), "matches 34 of the 1,234 keys of db 2");
        // Every key of a sample, the full count unknown: a flush too.
        let sample = m(5_000_000, 80_000, 80_000, false);
        assert!(sample.matches_every_key());
        assert!(
            sample
                .sentence(0)
                .starts_with("matches every one of the 80,000 keys")
        );
        assert!(!m(5_000_000, 80_000, 79_999, false).matches_every_key());
        // Nothing looked at, nothing matched: not a flush (measured again before it runs).
        assert!(!m(0, 0, 0, true).matches_every_key());
    }

    #[test]
    fn a_pattern_for_everything_is_refused_and_points_to_flush() {
        let err = Params::parse(&form(&[("pattern", "*")])).unwrap_err();
        assert!(err.contains("Flush database"), "{err}");
        assert!(Params::parse(&form(&[("pattern", "")])).is_err());
        let p = Params::parse(&form(&[
            ("pattern", "payment:idem:*"),
            ("db", "2"),
            ("expected", "12"),
        ]))
        .unwrap();
        assert_eq!(
            p,
            Params {
                db: 2,
                pattern: "payment:idem:*".into(),
                expected: Some(12),
                batch: DEFAULT_BATCH,
                measured: None,
            }
        );
        assert_eq!(Params::from_json(&p.to_json()).unwrap(), p);
        assert!(Params::parse(&form(&[("pattern", "a*"), ("batch", "5")])).is_err());
    }
}
