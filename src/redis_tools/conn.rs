//! Connections for the Redis tools.
//!
//! The target's shared client (see [`crate::targets::redis`]) stays on database 0
//! and is used for INFO and other server-wide reads. Everything that walks the
//! keyspace gets connections of its own ([`Nodes`]): one per primary — the one
//! server of a standalone or sentinel target, every primary of a cluster —
//! configured for the chosen logical database (so nobody's `SELECT` changes
//! anybody else's database), without reconnect retries, and closed when dropped.

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use fred::{
    prelude::{Client, ClientLike, Config, ServerConfig, Value},
    types::{ClusterHash, CustomCommand},
};

use super::redis_error;
use crate::{
    config::TargetKind,
    targets::{Target, redis::parse_info},
};

/// Logical databases a standalone server has by default (CONFIG GET databases
/// may be refused on managed services).
pub const DEFAULT_DATABASES: u8 = 16;

/// A dedicated connection, closed (QUIT) when dropped.
pub struct Conn {
    pub client: Client,
    /// `host:port` of the server it talks to.
    pub label: String,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let c = self.client.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), c.quit()).await;
            });
        }
    }
}

/// One connection per primary, all on database `db`.
pub struct Nodes {
    pub conns: Vec<Conn>,
    pub clustered: bool,
    pub db: u8,
}

/// How the target is deployed, from its URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deployment {
    Standalone,
    Sentinel,
    Cluster,
}

impl Deployment {
    pub fn of(client: &Client) -> Deployment {
        if client.is_clustered() {
            Deployment::Cluster
        } else if client.uses_sentinels() {
            Deployment::Sentinel
        } else {
            Deployment::Standalone
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Deployment::Standalone => "standalone",
            Deployment::Sentinel => "sentinel",
            Deployment::Cluster => "cluster",
        }
    }
}

/// The target's shared client, after checking that the target is Redis.
pub async fn shared(target: &Target) -> Result<Client, String> {
    if target.kind() != TargetKind::Redis {
        return Err(format!(
            "{} is a PostgreSQL database; the Redis tools work on Redis targets.",
            target.name()
        ));
    }
    target.redis().await
}

pub fn label(server: &ServerConfig) -> String {
    match server {
        ServerConfig::Centralized { server } => format!("{}:{}", server.host, server.port),
        other => other
            .hosts()
            .first()
            .map(|s| format!("{}:{}", s.host, s.port))
            .unwrap_or_default(),
    }
}

async fn connect(
    base: &Client,
    mut config: Config,
    db: Option<u8>,
    target: &Target,
) -> Result<Conn, String> {
    config.database = db.filter(|d| *d > 0);
    let conn = Conn {
        label: label(&config.server),
        client: Client::new(
            config,
            Some(base.perf_config()),
            Some(base.connection_config().clone()),
            None,
        ),
    };
    let limit = base
        .connection_config()
        .connection_timeout
        .max(Duration::from_secs(1))
        * 2;
    match tokio::time::timeout(limit, conn.client.init()).await {
        Ok(Ok(_task)) => Ok(conn),
        Ok(Err(e)) => Err(target.scrub(&redis_error(
            &format!("could not connect to {}", conn.label),
            &e,
        ))),
        Err(_) => Err(format!(
            "could not connect to {}: no answer within {} s",
            conn.label,
            limit.as_secs()
        )),
    }
}

/// Checks a logical database number for this deployment.
pub fn check_db(clustered: bool, db: u8) -> Result<(), String> {
    if clustered && db != 0 {
        return Err("A Redis cluster has only database 0.".into());
    }
    if db >= 64 {
        return Err(format!("There is no database {db}."));
    }
    Ok(())
}

/// Dedicated connections to every primary, on database `db`.
pub async fn primaries(target: &Target, db: u8) -> Result<Nodes, String> {
    let base = shared(target).await?;
    let clustered = base.is_clustered();
    check_db(clustered, db)?;
    let configs: Vec<Config> = if clustered {
        base.split_cluster()
            .map_err(|e| redis_error("could not list the cluster's primaries", &e))?
            .iter()
            .map(|c| c.client_config())
            .collect()
    } else {
        vec![base.client_config()]
    };
    let conns = futures::future::join_all(
        configs
            .into_iter()
            .map(|cfg| connect(&base, cfg, Some(db), target)),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    Ok(Nodes {
        conns,
        clustered,
        db,
    })
}

/// A client for commands on single keys of database `db`: a dedicated connection
/// on that database, or on a cluster the shared client, which routes each command
/// to the node holding its key's slot.
pub struct KeyClient {
    pub client: Client,
    _own: Option<Conn>,
}

pub async fn for_keys(target: &Target, db: u8) -> Result<KeyClient, String> {
    let base = shared(target).await?;
    check_db(base.is_clustered(), db)?;
    if base.is_clustered() {
        Ok(KeyClient {
            client: base,
            _own: None,
        })
    } else {
        let conn = connect(&base, base.client_config(), Some(db), target).await?;
        Ok(KeyClient {
            client: conn.client.clone(),
            _own: Some(conn),
        })
    }
}

/// A command routed by its first key (or anywhere, on a non-cluster client).
pub fn key_cmd(name: &'static str) -> CustomCommand {
    CustomCommand::new_static(name, ClusterHash::FirstKey, false)
}

/// A command for whichever node the client talks to.
pub fn node_cmd(name: &'static str) -> CustomCommand {
    CustomCommand::new_static(name, ClusterHash::Random, false)
}

pub fn arg(s: impl Into<String>) -> Value {
    Value::from(s.into())
}

pub fn bytes_arg(b: &[u8]) -> Value {
    Value::Bytes(Bytes::copy_from_slice(b))
}

/// Bytes of a bulk reply.
pub fn value_bytes(v: Value) -> Option<Bytes> {
    match v {
        Value::Bytes(b) => Some(b),
        Value::String(s) => Some(s.into_inner()),
        Value::Integer(i) => Some(Bytes::from(i.to_string())),
        Value::Double(d) => Some(Bytes::from(d.to_string())),
        _ => None,
    }
}

/// Text of a reply (lossy).
pub fn value_text(v: &Value) -> String {
    match v {
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Value::String(s) => s.to_string(),
        Value::Integer(i) => i.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Null => String::new(),
        other => format!("{other:?}"),
    }
}

/// One `SCAN cursor [MATCH p] [TYPE t] COUNT n` on one node: the next cursor and
/// the keys.
pub async fn scan_once(
    client: &Client,
    cursor: &[u8],
    pattern: Option<&str>,
    kind: Option<&str>,
    count: u32,
) -> Result<(Bytes, Vec<Bytes>), String> {
    let mut args = vec![bytes_arg(cursor)];
    if let Some(p) = pattern.filter(|p| !p.is_empty() && *p != "*") {
        args.push(arg("MATCH"));
        args.push(arg(p));
    }
    args.push(arg("COUNT"));
    args.push(Value::from(i64::from(count)));
    if let Some(t) = kind.filter(|t| !t.is_empty()) {
        args.push(arg("TYPE"));
        args.push(arg(t));
    }
    let reply: Value = client
        .custom(node_cmd("SCAN"), args)
        .await
        .map_err(|e| redis_error("SCAN failed", &e))?;
    parse_scan(reply).ok_or_else(|| "SCAN gave an unexpected reply".to_string())
}

/// `[cursor, [item, …]]`, the reply of SCAN, HSCAN, SSCAN.
pub fn parse_scan(reply: Value) -> Option<(Bytes, Vec<Bytes>)> {
    let mut parts = reply.into_array().into_iter();
    let cursor = value_bytes(parts.next()?)?;
    let items = match parts.next()? {
        Value::Array(items) => items
            .into_iter()
            .map(value_bytes)
            .collect::<Option<Vec<_>>>()?,
        Value::Null => Vec::new(),
        one => vec![value_bytes(one)?],
    };
    Some((cursor, items))
}

/// INFO (all sections) of the node this client talks to, parsed.
pub async fn info(client: &Client) -> Result<HashMap<String, String>, String> {
    let text: String = client
        .info(None)
        .await
        .map_err(|e| redis_error("INFO failed", &e))?;
    Ok(parse_info(&text))
}

/// DBSIZE of the client's database.
pub async fn dbsize(client: &Client) -> Result<u64, String> {
    let v: Value = client
        .custom(node_cmd("DBSIZE"), Vec::<Value>::new())
        .await
        .map_err(|e| redis_error("DBSIZE failed", &e))?;
    Ok(v.as_i64().unwrap_or(0).max(0) as u64)
}

/// How many logical databases the server has (16 when CONFIG is refused).
pub async fn database_count(client: &Client) -> u8 {
    if client.is_clustered() {
        return 1;
    }
    let reply: Result<Value, _> = client
        .custom(node_cmd("CONFIG"), vec![arg("GET"), arg("databases")])
        .await;
    reply
        .ok()
        .map(|v| v.into_array())
        .and_then(|a| a.get(1).map(value_text))
        .and_then(|t| t.parse::<u16>().ok())
        .map(|n| n.clamp(1, 64) as u8)
        .unwrap_or(DEFAULT_DATABASES)
}
