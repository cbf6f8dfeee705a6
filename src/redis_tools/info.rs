//! The overview of a Redis target, from INFO: memory, clients, traffic, hit ratio,
//! evictions, rejected connections, keyspace, persistence and replication — with
//! warnings where a value crosses a threshold — and the topology (replicas,
//! sentinel's view, cluster shards).
//!
//! The seeds' runbooks say "watch `evicted_keys`, `keyspace_misses`,
//! `rejected_connections`" without numbers; the thresholds below are the usual
//! ones (RedisInsight's and the Prometheus redis_exporter mixin's alerts) and are
//! listed in the README.
//!
//! Over 600 lines: INFO, replication, cluster and sentinel facts are summarized
//! into one overview with shared number and duration formatting; about 50 lines are
//! tests.

use std::collections::HashMap;

use fred::prelude::{Client, ClientLike, ServerConfig, Value};

use super::conn::{self, Deployment, arg, node_cmd, value_text};
use crate::{fmt, targets::Target};

/// Memory used over `maxmemory` at or above which the overview warns.
pub const MEMORY_WARN_PERCENT: f64 = 80.0;
/// Hit ratio below which it warns (once there were at least [`HIT_RATIO_MIN_LOOKUPS`]).
pub const HIT_RATIO_WARN_PERCENT: f64 = 80.0;
pub const HIT_RATIO_MIN_LOOKUPS: i64 = 1000;
/// Fragmentation above which it warns (with at least 100 MiB used: small
/// instances always look fragmented).
pub const FRAGMENTATION_WARN: f64 = 1.5;
/// Connected clients over `maxclients` at or above which it warns.
pub const CLIENTS_WARN_PERCENT: f64 = 80.0;

/// One fact of the overview.
#[derive(Debug, Clone)]
pub struct Fact {
    pub label: &'static str,
    pub value: String,
    /// A warning about this value, for the page (empty: fine).
    pub warning: String,
}

/// A group of facts ("Memory", "Persistence").
#[derive(Debug, Clone)]
pub struct Section {
    pub title: &'static str,
    pub facts: Vec<Fact>,
}

/// One line of INFO keyspace.
#[derive(Debug, Clone)]
pub struct DbLine {
    pub db: u8,
    pub keys: i64,
    pub expires: i64,
    pub avg_ttl_ms: i64,
}

/// One node in the topology table.
#[derive(Debug, Clone, Default)]
pub struct NodeRow {
    pub role: String,
    pub address: String,
    pub state: String,
    pub detail: String,
}

/// What the overview page shows.
#[derive(Debug, Clone)]
pub struct Overview {
    pub deployment: &'static str,
    pub version: String,
    pub role: String,
    pub sections: Vec<Section>,
    pub keyspace: Vec<DbLine>,
    pub warnings: Vec<String>,
    pub topology: Vec<NodeRow>,
    /// Why part of the topology could not be read (empty: all of it was).
    pub topology_problem: String,
}

fn num(info: &HashMap<String, String>, k: &str) -> i64 {
    info.get(k)
        .and_then(|v| v.parse::<f64>().ok())
        .map(|f| f as i64)
        .unwrap_or(0)
}

fn float(info: &HashMap<String, String>, k: &str) -> Option<f64> {
    info.get(k).and_then(|v| v.parse::<f64>().ok())
}

fn text(info: &HashMap<String, String>, k: &str) -> String {
    info.get(k).cloned().unwrap_or_default()
}

fn fact(label: &'static str, value: impl Into<String>) -> Fact {
    Fact {
        label,
        value: value.into(),
        warning: String::new(),
    }
}

fn warn(label: &'static str, value: impl Into<String>, warning: Option<String>) -> Fact {
    Fact {
        label,
        value: value.into(),
        warning: warning.unwrap_or_default(),
    }
}

/// `1d 2h`, `3h 4m`, `5m 6s`.
pub fn duration_text(secs: i64) -> String {
    let (d, h, m, s) = (
        secs / 86400,
        secs % 86400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

fn unix_time(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| fmt::time(&t))
        .unwrap_or_else(|| "never".into())
}

/// Builds the overview's sections and warnings from a parsed INFO (pure, so it
/// is unit-tested with INFO texts).
pub fn summarize(info: &HashMap<String, String>) -> (Vec<Section>, Vec<DbLine>, Vec<String>) {
    let mut warnings = Vec::new();
    let used = num(info, "used_memory");
    let max = num(info, "maxmemory");
    let policy = text(info, "maxmemory_policy");

    // Memory.
    let mem_warning = if max > 0 {
        let pct = used as f64 * 100.0 / max as f64;
        (pct >= MEMORY_WARN_PERCENT).then(|| {
            format!(
                "Memory is at {pct:.0}% of maxmemory (warning at {MEMORY_WARN_PERCENT:.0}%): {}",
                if policy == "noeviction" {
                    "with noeviction, writes will be refused when it is full"
                } else {
                    "keys will be evicted when it is full"
                }
            )
        })
    } else {
        None
    };
    let max_text = if max > 0 {
        format!(
            "{} ({:.0}% used)",
            fmt::bytes(max),
            used as f64 * 100.0 / max as f64
        )
    } else {
        "no limit (0)".to_string()
    };
    let max_warning = (max == 0).then(|| {
        "No maxmemory: Redis grows until the operating system runs out of memory (the runbook sets 256mb).".to_string()
    });
    let frag = float(info, "mem_fragmentation_ratio");
    let frag_warning = frag.and_then(|f| {
        if f > FRAGMENTATION_WARN && used > 100 << 20 {
            Some(format!(
                "Fragmentation {f:.2} is above {FRAGMENTATION_WARN}: the process holds much more memory than its data needs."
            ))
        } else if f < 1.0 && used > 100 << 20 {
            Some(format!("Fragmentation {f:.2} is below 1: part of Redis' memory may be swapped out."))
        } else {
            None
        }
    });
    let memory = Section {
        title: "Memory",
        facts: vec![
            warn("Used", fmt::bytes(used), mem_warning.clone()),
            fact("Peak", fmt::bytes(num(info, "used_memory_peak"))),
            warn("Max (maxmemory)", max_text, max_warning.clone()),
            fact("Eviction policy", policy.clone()),
            warn(
                "Fragmentation ratio",
                frag.map(|f| format!("{f:.2}")).unwrap_or_default(),
                frag_warning.clone(),
            ),
            fact("Resident (RSS)", fmt::bytes(num(info, "used_memory_rss"))),
        ],
    };
    warnings.extend(mem_warning);
    warnings.extend(frag_warning);

    // Clients and traffic.
    let clients = num(info, "connected_clients");
    let maxclients = num(info, "maxclients");
    let clients_warning = (maxclients > 0
        && clients as f64 * 100.0 / maxclients as f64 >= CLIENTS_WARN_PERCENT)
        .then(|| format!("{clients} of {maxclients} client connections are in use."));
    let blocked = num(info, "blocked_clients");
    let rejected = num(info, "rejected_connections");
    let rejected_warning = (rejected > 0).then(|| {
        format!("{rejected} connections were rejected since the start (maxclients {maxclients} reached).")
    });
    let evicted = num(info, "evicted_keys");
    let evicted_warning = (evicted > 0).then(|| {
        format!(
            "{} keys were evicted since the start: memory is full and Redis drops keys ({policy}).",
            fmt::count(evicted)
        )
    });
    let hits = num(info, "keyspace_hits");
    let misses = num(info, "keyspace_misses");
    let ratio = (hits + misses > 0).then(|| hits as f64 * 100.0 / (hits + misses) as f64);
    let ratio_warning = ratio.and_then(|r| {
        (hits + misses >= HIT_RATIO_MIN_LOOKUPS && r < HIT_RATIO_WARN_PERCENT).then(|| {
            format!(
                "Hit ratio {r:.1}% is below {HIT_RATIO_WARN_PERCENT:.0}%: {} lookups missed (keyspace_misses).",
                fmt::count(misses)
            )
        })
    });
    let traffic = Section {
        title: "Clients and traffic",
        facts: vec![
            warn(
                "Connected clients",
                format!("{clients} of {maxclients}"),
                clients_warning.clone(),
            ),
            fact("Blocked clients", blocked.to_string()),
            warn(
                "Rejected connections",
                fmt::count(rejected),
                rejected_warning.clone(),
            ),
            fact(
                "Operations per second",
                fmt::count(num(info, "instantaneous_ops_per_sec")),
            ),
            warn(
                "Hit ratio",
                ratio
                    .map(|r| {
                        format!(
                            "{r:.1}% ({} hits, {} misses)",
                            fmt::count(hits),
                            fmt::count(misses)
                        )
                    })
                    .unwrap_or_else(|| "no lookups yet".into()),
                ratio_warning.clone(),
            ),
            fact("Keyspace misses", fmt::count(misses)),
            warn("Evicted keys", fmt::count(evicted), evicted_warning.clone()),
            fact("Expired keys", fmt::count(num(info, "expired_keys"))),
        ],
    };
    warnings.extend(clients_warning);
    warnings.extend(rejected_warning);
    warnings.extend(evicted_warning);
    warnings.extend(ratio_warning);

    // Persistence.
    let bgsave_status = text(info, "rdb_last_bgsave_status");
    let bgsave_warning = (!bgsave_status.is_empty() && bgsave_status != "ok").then(|| {
        format!("The last background save failed (rdb_last_bgsave_status: {bgsave_status}).")
    });
    let aof_on = text(info, "aof_enabled") == "1";
    let aof_write = text(info, "aof_last_write_status");
    let aof_warning = (aof_on && !aof_write.is_empty() && aof_write != "ok")
        .then(|| format!("The last AOF write failed (aof_last_write_status: {aof_write})."));
    let rewrite_status = text(info, "aof_last_bgrewrite_status");
    let persistence = Section {
        title: "Persistence",
        facts: vec![
            fact("Last save", unix_time(num(info, "rdb_last_save_time"))),
            warn(
                "Last background save",
                bgsave_status,
                bgsave_warning.clone(),
            ),
            fact(
                "Changes since last save",
                fmt::count(num(info, "rdb_changes_since_last_save")),
            ),
            fact(
                "Save in progress",
                if text(info, "rdb_bgsave_in_progress") == "1" {
                    "yes"
                } else {
                    "no"
                },
            ),
            warn(
                "AOF",
                if aof_on { "on" } else { "off" },
                aof_warning.clone(),
            ),
            fact(
                "Last AOF rewrite",
                if rewrite_status.is_empty() {
                    String::new()
                } else {
                    let secs = num(info, "aof_last_rewrite_time_sec");
                    if secs < 0 {
                        format!("{rewrite_status} (never ran)")
                    } else {
                        format!("{rewrite_status}, took {secs} s")
                    }
                },
            ),
        ],
    };
    warnings.extend(bgsave_warning);
    warnings.extend(aof_warning);

    // Replication.
    let role = text(info, "role");
    let mut repl = vec![fact("Role", role.clone())];
    if role == "slave" {
        let link = text(info, "master_link_status");
        let link_warning = (link != "up").then(|| {
            format!("The link to the primary is {link}: this replica is not receiving writes.")
        });
        repl.push(fact(
            "Primary",
            format!(
                "{}:{}",
                text(info, "master_host"),
                text(info, "master_port")
            ),
        ));
        repl.push(warn("Link", link, link_warning.clone()));
        repl.push(fact("Offset", fmt::count(num(info, "slave_repl_offset"))));
        warnings.extend(link_warning);
    } else {
        repl.push(fact("Replicas", num(info, "connected_slaves").to_string()));
        repl.push(fact("Offset", fmt::count(num(info, "master_repl_offset"))));
    }
    let replication = Section {
        title: "Replication",
        facts: repl,
    };

    let server = Section {
        title: "Server",
        facts: vec![
            fact("Version", text(info, "redis_version")),
            fact("Mode", text(info, "redis_mode")),
            fact("Uptime", duration_text(num(info, "uptime_in_seconds"))),
        ],
    };

    let mut keyspace: Vec<DbLine> = info
        .iter()
        .filter_map(|(k, v)| {
            let db = k.strip_prefix("db")?.parse::<u8>().ok()?;
            let field = |name: &str| {
                v.split(',')
                    .find_map(|p| p.strip_prefix(name))
                    .and_then(|n| n.parse::<i64>().ok())
                    .unwrap_or(0)
            };
            Some(DbLine {
                db,
                keys: field("keys="),
                expires: field("expires="),
                avg_ttl_ms: field("avg_ttl="),
            })
        })
        .collect();
    keyspace.sort_by_key(|d| d.db);

    (
        vec![server, memory, traffic, persistence, replication],
        keyspace,
        warnings,
    )
}

/// The replicas a primary lists in INFO replication (`slave0:ip=…,port=…,state=…,offset=…,lag=…`).
pub fn replicas_of(info: &HashMap<String, String>) -> Vec<NodeRow> {
    let mut rows: Vec<(u32, NodeRow)> = info
        .iter()
        .filter_map(|(k, v)| {
            let n = k.strip_prefix("slave")?.parse::<u32>().ok()?;
            let field = |name: &str| {
                v.split(',')
                    .find_map(|p| p.strip_prefix(name))
                    .unwrap_or("")
                    .to_string()
            };
            Some((
                n,
                NodeRow {
                    role: "replica".into(),
                    address: format!("{}:{}", field("ip="), field("port=")),
                    state: field("state="),
                    detail: format!("offset {}, lag {} s", field("offset="), field("lag=")),
                },
            ))
        })
        .collect();
    rows.sort_by_key(|(n, _)| *n);
    rows.into_iter().map(|(_, r)| r).collect()
}

/// `CLUSTER NODES` lines as table rows.
pub fn cluster_rows(nodes: &str) -> Vec<NodeRow> {
    let mut rows: Vec<NodeRow> = nodes
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let flags = f[2];
            let primary = flags.contains("master");
            let address = f[1].split('@').next().unwrap_or(f[1]).to_string();
            let slots = f[8..].join(" ");
            let short = |id: &str| id.chars().take(8).collect::<String>();
            Some(NodeRow {
                role: if primary {
                    "primary".into()
                } else {
                    "replica".into()
                },
                address,
                state: format!(
                    "{}{}",
                    f[7],
                    if flags.contains("fail") {
                        " (failing)"
                    } else {
                        ""
                    }
                ),
                detail: if primary {
                    format!(
                        "node {}, slots {}",
                        short(f[0]),
                        if slots.is_empty() {
                            "none".into()
                        } else {
                            slots
                        }
                    )
                } else {
                    format!("node {}, replica of {}", short(f[0]), short(f[3]))
                },
            })
        })
        .collect();
    rows.sort_by(|a, b| {
        (a.role != "primary")
            .cmp(&(b.role != "primary"))
            .then(a.address.cmp(&b.address))
    });
    rows
}

/// A `SENTINEL MASTER`/`REPLICAS` reply entry (a flat name/value array) as a map.
fn pairs(v: Value) -> HashMap<String, String> {
    let items = v.into_array();
    items
        .chunks(2)
        .filter_map(|c| match c {
            [k, v] => Some((value_text(k), value_text(v))),
            _ => None,
        })
        .collect()
}

/// What sentinel says about the service: the primary, its replicas and the
/// sentinels, asked from the first sentinel that answers.
async fn sentinel_rows(target: &Target, base: &Client) -> Result<Vec<NodeRow>, String> {
    let config = base.client_config();
    let ServerConfig::Sentinel {
        hosts,
        service_name,
        ..
    } = &config.server
    else {
        return Ok(vec![]);
    };
    let mut last_error = String::from("no sentinel is configured");
    for host in hosts {
        let mut cfg = config.clone();
        cfg.server = ServerConfig::Centralized {
            server: host.clone(),
        };
        // Sentinels have no databases and usually no password of the data nodes.
        cfg.database = None;
        cfg.password = None;
        cfg.username = None;
        let client = Client::new(
            cfg,
            Some(base.perf_config()),
            Some(base.connection_config().clone()),
            None,
        );
        let limit = base.connection_config().connection_timeout * 2;
        let connected = tokio::time::timeout(limit, client.init()).await;
        if !matches!(connected, Ok(Ok(_))) {
            last_error = format!("sentinel {}:{} did not answer", host.host, host.port);
            continue;
        }
        let guard = conn::Conn {
            client,
            label: format!("{}:{}", host.host, host.port),
        };
        let ask = |sub: &'static str| {
            guard.client.custom::<Value, Value>(
                node_cmd("SENTINEL"),
                vec![arg(sub), arg(service_name.to_string())],
            )
        };
        let master = match ask("MASTER").await {
            Ok(v) => pairs(v),
            Err(e) => {
                last_error = target.scrub(&super::redis_error("SENTINEL MASTER failed", &e));
                continue;
            }
        };
        let mut rows = vec![NodeRow {
            role: "primary".into(),
            address: format!(
                "{}:{}",
                master.get("ip").cloned().unwrap_or_default(),
                master.get("port").cloned().unwrap_or_default()
            ),
            state: master.get("flags").cloned().unwrap_or_default(),
            detail: format!(
                "service {service_name}, quorum {}, {} other sentinels",
                master.get("quorum").cloned().unwrap_or_default(),
                master
                    .get("num-other-sentinels")
                    .cloned()
                    .unwrap_or_default()
            ),
        }];
        if let Ok(v) = ask("REPLICAS").await {
            for r in v.into_array() {
                let r = pairs(r);
                rows.push(NodeRow {
                    role: "replica".into(),
                    address: format!(
                        "{}:{}",
                        r.get("ip").cloned().unwrap_or_default(),
                        r.get("port").cloned().unwrap_or_default()
                    ),
                    state: r.get("flags").cloned().unwrap_or_default(),
                    detail: format!(
                        "link {}, offset {}",
                        r.get("master-link-status").cloned().unwrap_or_default(),
                        r.get("slave-repl-offset").cloned().unwrap_or_default()
                    ),
                });
            }
        }
        rows.push(NodeRow {
            role: "sentinel".into(),
            address: guard.label.clone(),
            state: "answering".into(),
            detail: "asked for this table".into(),
        });
        if let Ok(v) = ask("SENTINELS").await {
            for s in v.into_array() {
                let s = pairs(s);
                rows.push(NodeRow {
                    role: "sentinel".into(),
                    address: format!(
                        "{}:{}",
                        s.get("ip").cloned().unwrap_or_default(),
                        s.get("port").cloned().unwrap_or_default()
                    ),
                    state: s.get("flags").cloned().unwrap_or_default(),
                    detail: String::new(),
                });
            }
        }
        return Ok(rows);
    }
    Err(last_error)
}

/// Reads the overview of a Redis target.
#[tracing::instrument(skip(target), fields(target = %target.name()))]
pub async fn overview(target: &Target) -> Result<Overview, String> {
    let base = conn::shared(target).await?;
    let deployment = Deployment::of(&base);
    let info = conn::info(&base).await.map_err(|e| target.scrub(&e))?;
    let (sections, keyspace, mut warnings) = summarize(&info);
    let mut topology = Vec::new();
    let mut topology_problem = String::new();
    match deployment {
        Deployment::Cluster => {
            let reply: Result<Value, _> =
                base.custom(node_cmd("CLUSTER"), vec![arg("NODES")]).await;
            match reply {
                Ok(v) => topology = cluster_rows(&value_text(&v)),
                Err(e) => {
                    topology_problem = target.scrub(&super::redis_error("CLUSTER NODES failed", &e))
                }
            }
            let failing = topology
                .iter()
                .filter(|r| r.state.contains("failing") || r.state == "disconnected")
                .count();
            if failing > 0 {
                warnings.push(format!(
                    "{failing} cluster node(s) are failing or disconnected."
                ));
            }
        }
        Deployment::Sentinel => match sentinel_rows(target, &base).await {
            Ok(rows) => topology = rows,
            Err(e) => topology_problem = e,
        },
        Deployment::Standalone => {
            let role = info.get("role").cloned().unwrap_or_default();
            topology.push(NodeRow {
                role: if role == "slave" {
                    "replica".into()
                } else {
                    "primary".into()
                },
                address: conn::label(&base.client_config().server),
                state: "this server".into(),
                detail: if role == "slave" {
                    format!(
                        "replica of {}:{}, link {}",
                        text(&info, "master_host"),
                        text(&info, "master_port"),
                        text(&info, "master_link_status")
                    )
                } else {
                    String::new()
                },
            });
            if role == "master" {
                topology.extend(replicas_of(&info));
            }
        }
    }
    Ok(Overview {
        deployment: deployment.as_str(),
        version: info.get("redis_version").cloned().unwrap_or_default(),
        role: info.get("role").cloned().unwrap_or_default(),
        sections,
        keyspace,
        warnings,
        topology,
        topology_problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::redis::parse_info;

    const INFO: &str = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\nuptime_in_seconds:90061\r\n\
# Clients\r\nconnected_clients:9\r\nmaxclients:10\r\nblocked_clients:1\r\n\
# Memory\r\nused_memory:900\r\nused_memory_peak:950\r\nmaxmemory:1000\r\nmaxmemory_policy:noeviction\r\nmem_fragmentation_ratio:1.20\r\n\
# Persistence\r\nrdb_last_save_time:1700000000\r\nrdb_last_bgsave_status:err\r\nrdb_bgsave_in_progress:0\r\naof_enabled:0\r\n\
# Stats\r\nkeyspace_hits:100\r\nkeyspace_misses:900\r\nevicted_keys:5\r\nrejected_connections:2\r\ninstantaneous_ops_per_sec:12\r\n\
# Replication\r\nrole:master\r\nconnected_slaves:1\r\nslave0:ip=10.0.0.2,port=6380,state=online,offset=42,lag=0\r\nmaster_repl_offset:42\r\n\
# Keyspace\r\ndb0:keys=10,expires=2,avg_ttl=5000\r\ndb3:keys=5,expires=0,avg_ttl=0\r\n";

    #[test]
    fn thresholds_turn_into_warnings() {
        let (sections, keyspace, warnings) = summarize(&parse_info(INFO));
        let all = warnings.join("\n");
        assert!(all.contains("Memory is at 90%"), "{all}");
        assert!(all.contains("writes will be refused"), "{all}");
        assert!(all.contains("5 keys were evicted"), "{all}");
        assert!(all.contains("2 connections were rejected"), "{all}");
        assert!(all.contains("Hit ratio 10.0%"), "{all}");
        assert!(all.contains("9 of 10 client connections"), "{all}");
        assert!(all.contains("last background save failed"), "{all}");
        assert_eq!(keyspace.len(), 2);
        assert_eq!(keyspace[1].db, 3);
        assert_eq!(keyspace[0].expires, 2);
        assert_eq!(sections[0].facts[2].value, "1d 1h");
    }

    #[test]
    fn a_quiet_server_has_no_warnings_but_a_missing_maxmemory_is_said() {
        let (_, _, warnings) = summarize(&parse_info(
            "used_memory:100\r\nmaxmemory:0\r\nkeyspace_hits:10\r\nkeyspace_misses:90\r\nrdb_last_bgsave_status:ok\r\nrole:master\r\n",
        ));
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn replicas_and_cluster_nodes_are_listed() {
        let r = replicas_of(&parse_info(INFO));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].address, "10.0.0.2:6380");
        let rows = cluster_rows(
            "07c3 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460\n\
             e1a2 127.0.0.1:30004@40004 slave 07c3 0 0 1 connected\n",
        );
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].role, "primary");
        assert!(rows[0].detail.contains("0-5460"));
        assert!(rows[1].detail.contains("replica of 07c3"));
    }
}
