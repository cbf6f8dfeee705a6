//! The key browser: SCAN with MATCH and TYPE, a bounded amount of scanning per
//! page, across every primary of a cluster; each key's type, TTL and memory in one
//! pipeline per node. And the bounded view of one key's value, paged inside big
//! values (GETRANGE, LRANGE, SSCAN, HSCAN, ZRANGE, XRANGE).
//!
//! Paging never misses or repeats a key of a keyspace that does not change: a page
//! takes whole SCAN replies only (the cursor moves past a reply, so a reply cut in
//! half would lose keys), and the next page continues from the cursor where this
//! one stopped — on the same node, or the next node once a node's scan is done.

use std::collections::HashSet;

use bytes::Bytes;
use fred::prelude::{Client, ClientLike, Value};

use super::{
    conn::{Nodes, arg, bytes_arg, key_cmd, scan_once, value_bytes, value_text},
    keys, redis_error,
};

/// Keys a page aims for (it may hold up to one SCAN reply more).
pub const PAGE_KEYS: usize = 100;
/// Most SCAN calls one page makes: a sparse pattern over a big keyspace stops
/// here and says how far it got instead of scanning on.
pub const MAX_SCAN_CALLS: usize = 25;
/// `COUNT` given to SCAN by default (work per call on the server).
pub const DEFAULT_COUNT: u32 = 500;
/// The types SCAN TYPE knows.
pub const TYPES: [&str; 6] = ["string", "list", "set", "zset", "hash", "stream"];

/// Where a scan stands: which primary, and its cursor there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub node: usize,
    pub cursor: String,
}

impl Position {
    pub fn start() -> Position {
        Position {
            node: 0,
            cursor: "0".into(),
        }
    }

    /// `node-cursor`, for URLs.
    pub fn to_param(&self) -> String {
        format!("{}-{}", self.node, self.cursor)
    }

    pub fn parse(s: &str) -> Result<Position, String> {
        let bad = || "The page position in the address is not valid.".to_string();
        let (n, c) = s.split_once('-').ok_or_else(bad)?;
        let node = n.parse::<usize>().map_err(|_| bad())?;
        if c.is_empty() || c.len() > 24 || !c.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(Position {
            node,
            cursor: c.to_string(),
        })
    }
}

/// A key in the list.
#[derive(Debug, Clone)]
pub struct KeyRow {
    pub hex: String,
    pub name: String,
    pub kind: String,
    /// Milliseconds to live; -1 no expiry, -2 gone.
    pub ttl_ms: i64,
    pub memory: Option<i64>,
}

impl KeyRow {
    pub fn ttl_text(&self) -> String {
        ttl_text(self.ttl_ms)
    }
}

/// `no expiry`, `gone`, `3m 20s`.
pub fn ttl_text(ms: i64) -> String {
    match ms {
        -1 => "no expiry".into(),
        ..0 => "gone".into(),
        ms if ms < 1000 => format!("{ms} ms"),
        ms => super::info::duration_text(ms / 1000),
    }
}

/// One page of the browser.
#[derive(Debug, Clone)]
pub struct ScanPage {
    pub rows: Vec<KeyRow>,
    /// Where the next page starts; `None` once every node was scanned to the end.
    pub next: Option<Position>,
    pub scan_calls: usize,
    pub nodes: usize,
}

/// Scans from `from` for at most [`MAX_SCAN_CALLS`] calls or until about
/// [`PAGE_KEYS`] keys are found; then reads type, TTL and memory of what it found.
pub async fn scan_page(
    nodes: &Nodes,
    pattern: &str,
    kind: Option<&str>,
    count: u32,
    from: &Position,
) -> Result<ScanPage, String> {
    let mut found: Vec<(usize, Bytes)> = Vec::new();
    let mut seen: HashSet<(usize, Bytes)> = HashSet::new();
    let mut pos = from.clone();
    let mut calls = 0;
    let mut done = pos.node >= nodes.conns.len();
    while !done && calls < MAX_SCAN_CALLS && found.len() < PAGE_KEYS {
        let client = &nodes.conns[pos.node].client;
        let (next, batch) =
            scan_once(client, pos.cursor.as_bytes(), Some(pattern), kind, count).await?;
        calls += 1;
        for k in batch {
            if seen.insert((pos.node, k.clone())) {
                found.push((pos.node, k));
            }
        }
        let next = String::from_utf8_lossy(&next).into_owned();
        if next == "0" {
            pos = Position {
                node: pos.node + 1,
                cursor: "0".into(),
            };
            done = pos.node >= nodes.conns.len();
        } else {
            pos.cursor = next;
        }
    }
    let mut rows = Vec::with_capacity(found.len());
    for (i, conn) in nodes.conns.iter().enumerate() {
        let keys: Vec<Bytes> = found
            .iter()
            .filter(|(n, _)| *n == i)
            .map(|(_, k)| k.clone())
            .collect();
        if !keys.is_empty() {
            rows.extend(describe_keys(&conn.client, &keys).await?);
        }
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(ScanPage {
        rows,
        next: (!done).then_some(pos),
        scan_calls: calls,
        nodes: nodes.conns.len(),
    })
}

/// TYPE, PTTL and MEMORY USAGE of keys on one node, in one pipeline.
pub async fn describe_keys(client: &Client, keys: &[Bytes]) -> Result<Vec<KeyRow>, String> {
    let pipe = client.pipeline();
    for k in keys {
        for name in ["TYPE", "PTTL"] {
            let () = pipe
                .custom(key_cmd(name), vec![bytes_arg(k)])
                .await
                .map_err(|e| redis_error("could not queue a command", &e))?;
        }
        let () = pipe
            .custom(key_cmd("MEMORY"), vec![arg("USAGE"), bytes_arg(k)])
            .await
            .map_err(|e| redis_error("could not queue a command", &e))?;
    }
    let results: Vec<Result<Value, _>> = pipe.try_all().await;
    let mut out = Vec::with_capacity(keys.len());
    let mut it = results.into_iter();
    for k in keys {
        let (Some(t), Some(ttl), Some(mem)) = (it.next(), it.next(), it.next()) else {
            return Err("Redis answered fewer commands than were sent".into());
        };
        let t = t.map_err(|e| redis_error("TYPE failed", &e))?;
        let ttl = ttl.map_err(|e| redis_error("PTTL failed", &e))?;
        // MEMORY USAGE may be refused (ACL) while the rest works: show no number then.
        let mem = mem.ok().and_then(|v| v.as_i64());
        out.push(KeyRow {
            hex: keys::encode(k),
            name: keys::display(k),
            kind: value_text(&t),
            ttl_ms: ttl.as_i64().unwrap_or(-2),
            memory: mem,
        });
    }
    Ok(out)
}

/// Bytes of a string value shown per page.
pub const STRING_PAGE: i64 = 4096;
/// Elements of a list, set, hash, sorted set or stream shown per page.
pub const ITEMS_PAGE: i64 = 100;
/// Bytes of one element shown (the rest is cut, with its length said).
pub const ELEMENT_LIMIT: usize = 1024;

/// One key and a bounded part of its value.
#[derive(Debug, Clone)]
pub struct KeyView {
    pub hex: String,
    pub name: String,
    pub kind: String,
    pub ttl_ms: i64,
    pub memory: Option<i64>,
    pub encoding: String,
    /// Length in the type's unit (bytes, elements, fields, entries).
    pub length: i64,
    pub unit: &'static str,
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    /// What this page shows, in words ("bytes 0–4095 of 10,000").
    pub position: String,
    /// The `at` of the next page, when there is more.
    pub next: Option<String>,
    /// Some element was cut at [`ELEMENT_LIMIT`] bytes.
    pub cut: bool,
}

impl KeyView {
    pub fn ttl_text(&self) -> String {
        ttl_text(self.ttl_ms)
    }
}

fn cell(b: &[u8], cut: &mut bool) -> String {
    let (text, was_cut) = keys::display_cut(b, ELEMENT_LIMIT);
    if was_cut {
        *cut = true;
        format!("{text}… ({} bytes in all)", b.len())
    } else {
        text
    }
}

fn bytes_of(v: Value) -> Bytes {
    value_bytes(v).unwrap_or_default()
}

/// Reads one key: its facts and the page of its value that starts at `at`
/// (byte offset, index, scan cursor or stream id, by type; empty = the start).
/// `None` when the key does not exist.
pub async fn view_key(client: &Client, key: &[u8], at: &str) -> Result<Option<KeyView>, String> {
    let k = || bytes_arg(key);
    let pipe = client.pipeline();
    for (name, extra) in [
        ("TYPE", None),
        ("PTTL", None),
        ("MEMORY", Some("USAGE")),
        ("OBJECT", Some("ENCODING")),
    ] {
        let args = match extra {
            Some(sub) => vec![arg(sub), k()],
            None => vec![k()],
        };
        let () = pipe
            .custom(key_cmd(name), args)
            .await
            .map_err(|e| redis_error("could not queue a command", &e))?;
    }
    let mut r = pipe.try_all::<Value>().await.into_iter();
    let kind = value_text(&r.next().and_then(|v| v.ok()).unwrap_or(Value::Null));
    if kind == "none" || kind.is_empty() {
        return Ok(None);
    }
    let ttl_ms = r
        .next()
        .and_then(|v| v.ok())
        .and_then(|v| v.as_i64())
        .unwrap_or(-2);
    let memory = r.next().and_then(|v| v.ok()).and_then(|v| v.as_i64());
    let encoding = r
        .next()
        .and_then(|v| v.ok())
        .map(|v| value_text(&v))
        .unwrap_or_default();

    let num_at = || -> Result<i64, String> {
        if at.is_empty() {
            Ok(0)
        } else {
            at.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| "The page position in the address is not valid.".to_string())
        }
    };
    let cursor_at = || -> Result<String, String> {
        if at.is_empty() {
            Ok("0".into())
        } else if at.len() <= 24 && at.bytes().all(|b| b.is_ascii_digit()) {
            Ok(at.to_string())
        } else {
            Err("The page position in the address is not valid.".into())
        }
    };
    let call = |name: &'static str, args: Vec<Value>| async move {
        client
            .custom::<Value, Value>(key_cmd(name), args)
            .await
            .map_err(|e| redis_error(&format!("{name} failed"), &e))
    };
    let len_of = |name: &'static str| async move {
        call(name, vec![bytes_arg(key)])
            .await
            .map(|v| v.as_i64().unwrap_or(0))
    };

    let mut cut = false;
    let mut view = KeyView {
        hex: keys::encode(key),
        name: keys::display(key),
        kind: kind.clone(),
        ttl_ms,
        memory,
        encoding,
        length: 0,
        unit: "",
        columns: vec![],
        rows: vec![],
        position: String::new(),
        next: None,
        cut: false,
    };
    match kind.as_str() {
        "string" => {
            let off = num_at()?;
            view.length = len_of("STRLEN").await?;
            view.unit = "bytes";
            let v = call(
                "GETRANGE",
                vec![k(), Value::from(off), Value::from(off + STRING_PAGE - 1)],
            )
            .await?;
            let b = bytes_of(v);
            view.columns = vec!["Value"];
            view.rows = vec![vec![keys::display(&b)]];
            let end = off + b.len() as i64;
            view.position = if view.length == 0 {
                "empty string".into()
            } else {
                format!("bytes {off}–{} of {}", end.max(off + 1) - 1, view.length)
            };
            view.next = (end < view.length).then(|| end.to_string());
        }
        "list" => {
            let off = num_at()?;
            view.length = len_of("LLEN").await?;
            view.unit = "elements";
            let v = call(
                "LRANGE",
                vec![k(), Value::from(off), Value::from(off + ITEMS_PAGE - 1)],
            )
            .await?;
            view.columns = vec!["Index", "Element"];
            for (i, e) in v.into_array().into_iter().enumerate() {
                view.rows.push(vec![
                    (off + i as i64).to_string(),
                    cell(&bytes_of(e), &mut cut),
                ]);
            }
            let end = off + view.rows.len() as i64;
            view.position = format!("elements {off}–{} of {}", (end - 1).max(off), view.length);
            view.next = (end < view.length).then(|| end.to_string());
        }
        "zset" => {
            let off = num_at()?;
            view.length = len_of("ZCARD").await?;
            view.unit = "members";
            let v = call(
                "ZRANGE",
                vec![
                    k(),
                    Value::from(off),
                    Value::from(off + ITEMS_PAGE - 1),
                    arg("WITHSCORES"),
                ],
            )
            .await?;
            view.columns = vec!["Rank", "Member", "Score"];
            let items = v.into_array();
            for (i, pair) in items.chunks(2).enumerate() {
                if let [m, s] = pair {
                    view.rows.push(vec![
                        (off + i as i64).to_string(),
                        cell(&bytes_of(m.clone()), &mut cut),
                        value_text(s),
                    ]);
                }
            }
            let end = off + view.rows.len() as i64;
            view.position = format!("ranks {off}–{} of {}", (end - 1).max(off), view.length);
            view.next = (end < view.length).then(|| end.to_string());
        }
        "hash" | "set" => {
            let cursor = cursor_at()?;
            let (len_cmd, scan_cmd) = if kind == "hash" {
                ("HLEN", "HSCAN")
            } else {
                ("SCARD", "SSCAN")
            };
            view.length = len_of(len_cmd).await?;
            view.unit = if kind == "hash" { "fields" } else { "members" };
            let v = call(
                scan_cmd,
                vec![
                    k(),
                    arg(cursor.clone()),
                    arg("COUNT"),
                    Value::from(ITEMS_PAGE),
                ],
            )
            .await?;
            let (next, items) = super::conn::parse_scan(v)
                .ok_or_else(|| format!("{scan_cmd} gave an unexpected reply"))?;
            if kind == "hash" {
                view.columns = vec!["Field", "Value"];
                for pair in items.chunks(2) {
                    if let [f, v] = pair {
                        view.rows.push(vec![cell(f, &mut cut), cell(v, &mut cut)]);
                    }
                }
            } else {
                view.columns = vec!["Member"];
                for m in &items {
                    view.rows.push(vec![cell(m, &mut cut)]);
                }
            }
            view.position = format!(
                "{} {} of {} ({})",
                view.rows.len(),
                view.unit,
                view.length,
                if cursor == "0" {
                    "first page".to_string()
                } else {
                    "a later page".to_string()
                }
            );
            let next = String::from_utf8_lossy(&next).into_owned();
            view.next = (next != "0").then_some(next);
        }
        "stream" => {
            let start = if at.is_empty() {
                "-".to_string()
            } else if at.len() <= 48 && at.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
                format!("({at}")
            } else {
                return Err("The page position in the address is not valid.".into());
            };
            view.length = len_of("XLEN").await?;
            view.unit = "entries";
            let v = call(
                "XRANGE",
                vec![
                    k(),
                    arg(start),
                    arg("+"),
                    arg("COUNT"),
                    Value::from(ITEMS_PAGE),
                ],
            )
            .await?;
            view.columns = vec!["Entry id", "Fields"];
            let mut last = String::new();
            for entry in v.into_array() {
                let mut parts = entry.into_array().into_iter();
                let id = parts.next().map(|v| value_text(&v)).unwrap_or_default();
                let fields = parts.next().map(|f| f.into_array()).unwrap_or_default();
                let text = fields
                    .chunks(2)
                    .map(|p| match p {
                        [f, v] => format!(
                            "{}={}",
                            cell(&bytes_of(f.clone()), &mut cut),
                            cell(&bytes_of(v.clone()), &mut cut)
                        ),
                        _ => String::new(),
                    })
                    .collect::<Vec<_>>()
                    .join("  ");
                last = id.clone();
                view.rows.push(vec![id, text]);
            }
            view.position = format!(
                "{} entries{} of {}",
                view.rows.len(),
                if at.is_empty() {
                    ""
                } else {
                    " after the previous page"
                },
                view.length
            );
            view.next = (view.rows.len() as i64 == ITEMS_PAGE && !last.is_empty()).then_some(last);
        }
        other => {
            view.position = format!("dbops cannot show values of type {other}.");
        }
    }
    view.cut = cut;
    Ok(Some(view))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_bad_ones_are_refused() {
        let p = Position {
            node: 2,
            cursor: "1234".into(),
        };
        assert_eq!(Position::parse(&p.to_param()).unwrap(), p);
        for bad in ["", "x-1", "1-", "1-abc", "1-1;DEL"] {
            assert!(Position::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ttls_read_well() {
        assert_eq!(ttl_text(-1), "no expiry");
        assert_eq!(ttl_text(-2), "gone");
        assert_eq!(ttl_text(500), "500 ms");
        assert_eq!(ttl_text(200_000), "3m 20s");
    }
}
