//! SLOWLOG, CLIENT LIST and CONFIG GET on every primary, and the checks behind
//! the gated CONFIG SET (which settings, which values).

use std::collections::BTreeMap;

use fred::prelude::{Client, ClientLike, Value};

use super::{
    conn::{Nodes, arg, node_cmd, value_bytes, value_text},
    keys, redis_error,
};

/// One SLOWLOG entry.
#[derive(Debug, Clone)]
pub struct SlowEntry {
    pub node: String,
    pub id: i64,
    pub at: String,
    pub micros: i64,
    pub command: String,
    pub client: String,
}

/// The newest `n` slow commands of every primary, slowest first.
pub async fn slowlog(nodes: &Nodes, n: u32) -> Result<Vec<SlowEntry>, String> {
    let mut out = Vec::new();
    for c in &nodes.conns {
        let v: Value = c
            .client
            .custom(
                node_cmd("SLOWLOG"),
                vec![arg("GET"), Value::from(i64::from(n))],
            )
            .await
            .map_err(|e| redis_error("SLOWLOG GET failed", &e))?;
        for e in v.into_array() {
            let f = e.into_array();
            if f.len() < 4 {
                continue;
            }
            let words: Vec<String> = f[3]
                .clone()
                .into_array()
                .into_iter()
                .map(|a| {
                    value_bytes(a)
                        .map(|b| keys::display(&b))
                        .unwrap_or_default()
                })
                .collect();
            let mut command = words.join(" ");
            if command.len() > 500 {
                let mut cut = 500;
                while !command.is_char_boundary(cut) {
                    cut -= 1;
                }
                command.truncate(cut);
                command.push('…');
            }
            out.push(SlowEntry {
                node: c.label.clone(),
                id: f[0].as_i64().unwrap_or(0),
                at: chrono::DateTime::from_timestamp(f[1].as_i64().unwrap_or(0), 0)
                    .map(|t| crate::fmt::time(&t))
                    .unwrap_or_default(),
                micros: f[2].as_i64().unwrap_or(0),
                command,
                client: f.get(4).map(value_text).unwrap_or_default(),
            });
        }
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.micros));
    Ok(out)
}

/// One connected client (a CLIENT LIST line).
#[derive(Debug, Clone)]
pub struct ClientRow {
    pub node: String,
    pub id: String,
    pub addr: String,
    pub name: String,
    pub user: String,
    pub age: String,
    pub idle: String,
    pub db: String,
    pub cmd: String,
    pub flags: String,
    /// The connection dbops uses for this page.
    pub is_dbops: bool,
}

/// Parses `CLIENT LIST` output (`id=7 addr=… name=… …` per line).
pub fn parse_client_list(text: &str) -> Vec<BTreeMap<String, String>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split(' ')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

async fn client_id(client: &Client) -> Option<String> {
    client
        .custom::<Value, Value>(node_cmd("CLIENT"), vec![arg("ID")])
        .await
        .ok()
        .map(|v| value_text(&v))
}

/// Every client of every primary.
pub async fn clients(nodes: &Nodes) -> Result<Vec<ClientRow>, String> {
    let mut out = Vec::new();
    for c in &nodes.conns {
        let own = client_id(&c.client).await;
        let v: Value = c
            .client
            .custom(node_cmd("CLIENT"), vec![arg("LIST")])
            .await
            .map_err(|e| redis_error("CLIENT LIST failed", &e))?;
        for m in parse_client_list(&value_text(&v)) {
            let get = |k: &str| m.get(k).cloned().unwrap_or_default();
            out.push(ClientRow {
                node: c.label.clone(),
                is_dbops: own.as_deref() == m.get("id").map(String::as_str),
                id: get("id"),
                addr: get("addr"),
                name: get("name"),
                user: get("user"),
                age: get("age"),
                idle: get("idle"),
                db: get("db"),
                cmd: get("cmd"),
                flags: get("flags"),
            });
        }
    }
    Ok(out)
}

/// The settings the seeds tune, shown on the config page; the first five can be
/// changed (gated).
pub const SHOWN_SETTINGS: [&str; 14] = [
    "maxmemory",
    "maxmemory-policy",
    "appendonly",
    "appendfsync",
    "save",
    "maxmemory-samples",
    "maxclients",
    "timeout",
    "tcp-keepalive",
    "slowlog-log-slower-than",
    "slowlog-max-len",
    "lazyfree-lazy-user-del",
    "databases",
    "hz",
];

/// What CONFIG SET may change.
pub const SETTABLE: [&str; 5] = [
    "maxmemory",
    "maxmemory-policy",
    "appendonly",
    "appendfsync",
    "save",
];

pub const POLICIES: [&str; 8] = [
    "noeviction",
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
];

/// One setting's value on every primary.
#[derive(Debug, Clone)]
pub struct Setting {
    pub name: &'static str,
    /// `node → value`; one entry on a standalone server.
    pub values: Vec<(String, String)>,
    pub settable: bool,
}

impl Setting {
    /// The value when every node agrees, else the values by node.
    pub fn value_text(&self) -> String {
        let first = self
            .values
            .first()
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        if self.values.iter().all(|(_, v)| *v == first) {
            first
        } else {
            self.values
                .iter()
                .map(|(n, v)| format!("{n}: {v}"))
                .collect::<Vec<_>>()
                .join("; ")
        }
    }
}

/// `CONFIG GET name` on one node (`None` when the server does not have it).
pub async fn config_get(client: &Client, name: &str) -> Result<Option<String>, String> {
    let v: Value = client
        .custom(node_cmd("CONFIG"), vec![arg("GET"), arg(name)])
        .await
        .map_err(|e| redis_error(&format!("CONFIG GET {name} failed"), &e))?;
    let items = v.into_array();
    Ok(items.get(1).map(value_text))
}

/// The shown settings on every primary.
pub async fn settings(nodes: &Nodes) -> Result<Vec<Setting>, String> {
    let mut out = Vec::new();
    for name in SHOWN_SETTINGS {
        let mut values = Vec::new();
        for c in &nodes.conns {
            if let Some(v) = config_get(&c.client, name).await? {
                values.push((c.label.clone(), v));
            }
        }
        if !values.is_empty() {
            out.push(Setting {
                name,
                values,
                settable: SETTABLE.contains(&name),
            });
        }
    }
    Ok(out)
}

/// Parses a memory size as redis.conf writes it (`0`, `1048576`, `256mb`, `1gb`,
/// `100k`) into bytes.
pub fn parse_memory(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" => 1000,
        "kb" => 1024,
        "m" => 1_000_000,
        "mb" => 1024 * 1024,
        "g" => 1_000_000_000,
        "gb" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Checks a CONFIG SET and returns the canonical value to send.
pub fn check_setting(name: &str, value: &str) -> Result<String, String> {
    let v = value.trim();
    match name {
        "maxmemory" => parse_memory(v).map(|b| b.to_string()).ok_or_else(|| {
            "maxmemory must be a size such as 256mb, 2gb or 0 (no limit).".to_string()
        }),
        "maxmemory-policy" => {
            let v = v.to_ascii_lowercase();
            if POLICIES.contains(&v.as_str()) {
                Ok(v)
            } else {
                Err(format!(
                    "maxmemory-policy must be one of {}.",
                    POLICIES.join(", ")
                ))
            }
        }
        "appendonly" => match v.to_ascii_lowercase().as_str() {
            "yes" | "no" => Ok(v.to_ascii_lowercase()),
            _ => Err("appendonly must be yes or no.".into()),
        },
        "appendfsync" => match v.to_ascii_lowercase().as_str() {
            s @ ("always" | "everysec" | "no") => Ok(s.to_string()),
            _ => Err("appendfsync must be always, everysec or no.".into()),
        },
        "save" => {
            let nums: Vec<&str> = v.split_whitespace().collect();
            let ok = nums.len().is_multiple_of(2)
                && nums.len() <= 32
                && nums.iter().all(|n| n.parse::<u64>().is_ok_and(|x| x > 0));
            if ok {
                Ok(nums.join(" "))
            } else {
                Err("save must be pairs of “seconds changes” (e.g. 3600 1 300 100 60 10000), or empty to turn snapshots off.".into())
            }
        }
        other => Err(format!(
            "dbops changes only {}; {other} is not one of them.",
            SETTABLE.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_are_read_like_redis_conf() {
        assert_eq!(parse_memory("0"), Some(0));
        assert_eq!(parse_memory("256mb"), Some(256 << 20));
        assert_eq!(parse_memory("1GB"), Some(1 << 30));
        assert_eq!(parse_memory("100k"), Some(100_000));
        assert_eq!(parse_memory("12 parsecs"), None);
        assert_eq!(parse_memory("-5"), None);
    }

    #[test]
    fn settings_are_validated_and_made_canonical() {
        assert_eq!(check_setting("maxmemory", "256mb").unwrap(), "268435456");
        assert_eq!(
            check_setting("maxmemory-policy", "AllKeys-LRU").unwrap(),
            "allkeys-lru"
        );
        assert!(check_setting("maxmemory-policy", "lru-please").is_err());
        assert_eq!(check_setting("appendonly", "YES").unwrap(), "yes");
        assert!(check_setting("appendfsync", "sometimes").is_err());
        assert_eq!(
            check_setting("save", " 3600 1  300 100 ").unwrap(),
            "3600 1 300 100"
        );
        assert_eq!(check_setting("save", "").unwrap(), "");
        assert!(check_setting("save", "3600").is_err());
        assert!(check_setting("requirepass", "x").is_err());
        assert!(check_setting("dir", "/tmp").is_err());
    }

    #[test]
    fn client_list_lines_are_parsed() {
        let rows = parse_client_list(
            "id=7 addr=127.0.0.1:5000 laddr=127.0.0.1:6379 fd=8 name= age=3 idle=0 flags=N db=0 cmd=client|list user=default\n",
        );
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["id"], "7");
        assert_eq!(rows[0]["cmd"], "client|list");
        assert_eq!(rows[0]["name"], "");
    }
}
