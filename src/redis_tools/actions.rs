//! The gated Redis actions and the Redis jobs.
//!
//! Actions (approval per the target's policy; flushes always need a second person
//! and the target's name typed by the one who runs them):
//! `redis.keys.delete`, `redis.flushdb`, `redis.flushall`, `redis.slowlog.reset`,
//! `redis.client.kill`, `redis.config.set`.
//!
//! Jobs: `redis.memory_by_prefix` (submitted by an operator), `redis.keys.delete`
//! (the work of an approved delete, handed off), `redis.bgsave`.
//!
//! Over 600 lines: every gated Redis action (delete by pattern, flush, client kill,
//! config set, slowlog reset) and its job follow one shape and are read side by
//! side.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use fred::{
    prelude::{Client, ClientLike, Value},
    types::InfoKind,
};
use futures::{FutureExt, future::BoxFuture};
use serde_json::json;

use super::{
    admin,
    conn::{self, arg, node_cmd, value_text},
    delete, memory, redis_error,
};
use crate::{
    approvals::{Action, Assessment, ExecCtx, Severity},
    config::TargetKind,
    jobs::{Job, JobCtx, JobKind},
    state::AppState,
    targets::{Target, redis::parse_info},
};

/// Every Redis action.
pub fn actions() -> Vec<Arc<dyn Action>> {
    vec![
        Arc::new(DeleteByPattern),
        Arc::new(Flush { all: false }),
        Arc::new(Flush { all: true }),
        Arc::new(SlowlogReset),
        Arc::new(ClientKill),
        Arc::new(ConfigSet),
    ]
}

/// Every Redis job kind.
pub fn job_kinds() -> Vec<Arc<dyn JobKind>> {
    vec![
        Arc::new(MemoryJob),
        Arc::new(DeleteJob),
        Arc::new(BgsaveJob),
    ]
}

fn db_of(form: &BTreeMap<String, String>) -> Result<u8, String> {
    match form.get("db").map(|v| v.trim()).unwrap_or("") {
        "" => Ok(0),
        v => v
            .parse::<u8>()
            .ok()
            .filter(|d| *d < 64)
            .ok_or_else(|| "“db” must be a database number (0–63).".to_string()),
    }
}

fn db_param(params: &serde_json::Value) -> u8 {
    params
        .get("db")
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
        .min(63) as u8
}

// ----------------------------------------------------------------------------
// Delete by pattern

/// `redis.keys.delete`: SCAN + UNLINK of the keys matching a pattern, as a job.
pub struct DeleteByPattern;

pub const DELETE_KIND: &str = "redis.keys.delete";

impl Action for DeleteByPattern {
    fn kind(&self) -> &'static str {
        DELETE_KIND
    }
    fn title(&self) -> &'static str {
        "Delete keys by pattern"
    }
    fn target_kind(&self) -> TargetKind {
        TargetKind::Redis
    }
    fn severity(&self) -> Severity {
        Severity::Destructive
    }
    fn parse(&self, form: &BTreeMap<String, String>) -> Result<serde_json::Value, String> {
        delete::Params::parse(form).map(|p| p.to_json())
    }
    fn describe(&self, params: &serde_json::Value) -> String {
        let Ok(p) = delete::Params::from_json(params) else {
            return "Delete keys by pattern: the parameters are not valid.".into();
        };
        let measured = match &p.measured {
            Some(m) if m.matches_every_key() => format!(
                " Measured by dbops when this was asked: the pattern {} — treated as a flush: \
                 an approver is needed whatever the target's policy.",
                m.sentence(p.db)
            ),
            Some(m) => format!(
                " Measured by dbops when this was asked: the pattern {}. Just before it runs, \
                 dbops measures again: if the pattern then matches every key, nothing is deleted \
                 and the request fails (ask again: it is then treated as a flush).",
                m.sentence(p.db)
            ),
            None => String::new(),
        };
        format!(
            "Deletes every key of database {} whose name matches the glob “{}”{}: \
             SCAN cursor MATCH “{}” COUNT {} on every primary (every shard of a cluster), and for each \
             reply UNLINK of the keys it returned, sent in the same round trip as the next SCAN. \
             UNLINK removes keys at once and frees big values in a background thread; no command \
             works on more than {} keys, and when the server is slow the job pauses between batches. \
             Keys written while it runs may or may not be deleted. It runs as a job with progress \
             and can be stopped; what was deleted stays deleted.{measured}",
            p.db,
            p.pattern,
            match (p.expected, &p.measured) {
                (Some(n), None) => format!(" (the preview counted {n} keys)"),
                _ => String::new(),
            },
            p.pattern,
            p.batch,
            p.batch
        )
    }
    fn assess<'a>(
        &'a self,
        _state: &'a AppState,
        target: &'a Arc<Target>,
        params: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<Assessment, String>> {
        async move {
            let p = delete::Params::from_json(params)?;
            let m = measure(target, &p).await?;
            let needs_approver = m.matches_every_key().then(|| {
                format!(
                    "The pattern {} — treated as a flush: a delete would empty the database, so \
                     an approver is needed whatever the target's policy.",
                    m.sentence(p.db)
                )
            });
            let mut facts = serde_json::Map::new();
            facts.insert("measured".into(), json!(m));
            Ok(Assessment {
                facts,
                needs_approver,
            })
        }
        .boxed()
    }
    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        params: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        async move {
            let p = delete::Params::from_json(params)?;
            conn::check_db(false, p.db)?;
            // Measured again: a delete asked for (and perhaps approved automatically)
            // as a subset must not empty the database because keys went away since.
            let approved_as_flush = p.measured.as_ref().is_some_and(|m| m.matches_every_key());
            if !approved_as_flush {
                let now = measure(&ctx.target, &p).await?;
                if now.matches_every_key() {
                    return Err(format!(
                        "Refused: the pattern “{}” now {}, so deleting would empty the database, \
                         and this request was not approved as a flush. Nothing was deleted. Ask \
                         again: the new request is treated as a flush and needs an approver.",
                        p.pattern,
                        now.sentence(p.db)
                    ));
                }
            }
            crate::jobs::hand_off(&ctx, DELETE_KIND, p.to_json()).await
        }
        .boxed()
    }
}

/// The work of an approved delete.
pub struct DeleteJob;

impl JobKind for DeleteJob {
    fn kind(&self) -> &'static str {
        DELETE_KIND
    }
    fn title(&self) -> &'static str {
        "Delete keys by pattern"
    }
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        async move {
            let p = delete::Params::from_json(&ctx.job.params)?;
            let nodes = conn::primaries(&ctx.target, p.db).await?;
            delete::run(&nodes, &p, &ctx.progress, &ctx.cancel).await
        }
        .boxed()
    }
}

/// [`delete::measure`] of the request's pattern on its database, with the
/// target's secrets scrubbed from errors.
async fn measure(target: &Target, p: &delete::Params) -> Result<delete::Measured, String> {
    let measured = async {
        let nodes = conn::primaries(target, p.db).await?;
        delete::measure(&nodes, &p.pattern).await
    }
    .await;
    measured.map_err(|e| {
        format!(
            "dbops could not measure what “{}” matches on db {}: {}",
            p.pattern,
            p.db,
            target.scrub(&e)
        )
    })
}

// ----------------------------------------------------------------------------
// Memory by prefix

pub const MEMORY_KIND: &str = "redis.memory_by_prefix";

/// `redis.memory_by_prefix`.
pub struct MemoryJob;

impl JobKind for MemoryJob {
    fn kind(&self) -> &'static str {
        MEMORY_KIND
    }
    fn title(&self) -> &'static str {
        "Memory by key prefix"
    }
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        async move {
            let p = memory::Params::from_json(&ctx.job.params)?;
            let nodes = conn::primaries(&ctx.target, p.db).await?;
            memory::run(&nodes, &p, &ctx.progress, &ctx.cancel).await
        }
        .boxed()
    }
    fn result_url(&self, job: &Job) -> Option<String> {
        Some(format!(
            "/targets/{}/redis/memory?job={}",
            job.target, job.id
        ))
    }
}

// ----------------------------------------------------------------------------
// BGSAVE

pub const BGSAVE_KIND: &str = "redis.bgsave";

/// `redis.bgsave`: a background save on every primary, waited for.
pub struct BgsaveJob;

async fn persistence(client: &Client) -> Result<std::collections::HashMap<String, String>, String> {
    let text: String = client
        .info(Some(InfoKind::Persistence))
        .await
        .map_err(|e| redis_error("INFO persistence failed", &e))?;
    Ok(parse_info(&text))
}

/// Starts a BGSAVE (waiting for a save or AOF rewrite already running), waits for
/// it to end and reports its outcome.
pub async fn bgsave_node(
    client: &Client,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<serde_json::Value, String> {
    let poll = Duration::from_millis(200);
    loop {
        if cancel.is_cancelled() {
            return Err("stopped before the save started".into());
        }
        let r: Result<Value, _> = client.custom(node_cmd("BGSAVE"), Vec::<Value>::new()).await;
        match r {
            Ok(_) => break,
            Err(e) if e.details().contains("in progress") => tokio::time::sleep(poll).await,
            Err(e) => return Err(redis_error("BGSAVE was refused", &e)),
        }
    }
    loop {
        let info = persistence(client).await?;
        if info.get("rdb_bgsave_in_progress").map(String::as_str) == Some("0") {
            let get = |k: &str| info.get(k).cloned().unwrap_or_default();
            return Ok(json!({
                "status": get("rdb_last_bgsave_status"),
                "seconds": get("rdb_last_bgsave_time_sec").parse::<i64>().unwrap_or(-1),
                "last_save_unix": get("rdb_last_save_time").parse::<i64>().unwrap_or(0),
                "cow_bytes": get("rdb_last_cow_size").parse::<i64>().unwrap_or(0),
            }));
        }
        if cancel.is_cancelled() {
            return Err("stopped while the save was running (Redis finishes it anyway)".into());
        }
        tokio::time::sleep(poll).await;
    }
}

impl JobKind for BgsaveJob {
    fn kind(&self) -> &'static str {
        BGSAVE_KIND
    }
    fn title(&self) -> &'static str {
        "Background save (BGSAVE)"
    }
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        async move {
            ctx.progress.set_phase("saving");
            let nodes = conn::primaries(&ctx.target, 0).await?;
            ctx.progress.set_items_total(nodes.conns.len() as u64);
            let mut out = Vec::new();
            let mut failed = Vec::new();
            for c in &nodes.conns {
                let mut r = bgsave_node(&c.client, &ctx.cancel)
                    .await
                    .map_err(|e| format!("{}: {e}", c.label))?;
                if r["status"] != "ok" {
                    failed.push(format!("{} ({})", c.label, r["status"].as_str().unwrap_or("?")));
                }
                r["node"] = json!(c.label);
                out.push(r);
                ctx.progress.add_items(1);
            }
            if failed.is_empty() {
                Ok(json!({ "nodes": out }))
            } else {
                Err(format!(
                    "the background save failed on {} (rdb_last_bgsave_status); see the server's log for why (disk full, no permission on dir)",
                    failed.join(", ")
                ))
            }
        }
        .boxed()
    }
}

// ----------------------------------------------------------------------------
// FLUSHDB / FLUSHALL

/// `redis.flushdb` (one database) or `redis.flushall` (all of them).
pub struct Flush {
    pub all: bool,
}

impl Action for Flush {
    fn kind(&self) -> &'static str {
        if self.all {
            "redis.flushall"
        } else {
            "redis.flushdb"
        }
    }
    fn title(&self) -> &'static str {
        if self.all {
            "Flush all databases"
        } else {
            "Flush database"
        }
    }
    fn target_kind(&self) -> TargetKind {
        TargetKind::Redis
    }
    fn severity(&self) -> Severity {
        Severity::Destructive
    }
    fn always_needs_approval(&self) -> bool {
        true
    }
    fn confirm_name(&self) -> bool {
        true
    }
    fn parse(&self, form: &BTreeMap<String, String>) -> Result<serde_json::Value, String> {
        if self.all {
            Ok(json!({}))
        } else {
            Ok(json!({ "db": db_of(form)? }))
        }
    }
    fn describe(&self, params: &serde_json::Value) -> String {
        let what = if self.all {
            "FLUSHALL ASYNC — deletes every key of every database".to_string()
        } else {
            format!(
                "FLUSHDB ASYNC on database {} — deletes every key of that database",
                db_param(params)
            )
        };
        format!(
            "{what}, on every primary (every shard of a cluster). The keys disappear at once; their \
             memory is freed in a background thread, so the server is not blocked. This cannot be \
             undone. It always needs an approver, whatever the target's policy, and whoever runs it \
             types the target's name to confirm."
        )
    }
    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        params: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        async move {
            let db = if self.all { 0 } else { db_param(params) };
            let nodes = conn::primaries(&ctx.target, db).await?;
            let mut out = Vec::new();
            let mut before = 0u64;
            for c in &nodes.conns {
                let keys = if self.all {
                    let info = conn::info(&c.client).await?;
                    crate::targets::redis::total_keys(&info).max(0) as u64
                } else {
                    conn::dbsize(&c.client).await?
                };
                before += keys;
                let cmd = if self.all { "FLUSHALL" } else { "FLUSHDB" };
                let _: Value = c
                    .client
                    .custom(node_cmd(cmd), vec![arg("ASYNC")])
                    .await
                    .map_err(|e| ctx.target.scrub(&redis_error(&format!("{cmd} failed on {}", c.label), &e)))?;
                out.push(json!({ "node": c.label, "keys_before": keys }));
            }
            Ok(json!({ "keys_before": before, "db": if self.all { None } else { Some(db) }, "nodes": out }))
        }
        .boxed()
    }
}

// ----------------------------------------------------------------------------
// SLOWLOG RESET

/// `redis.slowlog.reset`.
pub struct SlowlogReset;

impl Action for SlowlogReset {
    fn kind(&self) -> &'static str {
        "redis.slowlog.reset"
    }
    fn title(&self) -> &'static str {
        "Reset the slow log"
    }
    fn target_kind(&self) -> TargetKind {
        TargetKind::Redis
    }
    fn severity(&self) -> Severity {
        Severity::Disruptive
    }
    fn parse(&self, _form: &BTreeMap<String, String>) -> Result<serde_json::Value, String> {
        Ok(json!({}))
    }
    fn describe(&self, _params: &serde_json::Value) -> String {
        "SLOWLOG RESET on every primary — forgets every recorded slow command (the evidence of past \
         slowness is lost; nothing else changes, no lock, no data touched)."
            .into()
    }
    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        _params: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        async move {
            let nodes = conn::primaries(&ctx.target, 0).await?;
            let mut cleared = 0i64;
            for c in &nodes.conns {
                let n: Value = c
                    .client
                    .custom(node_cmd("SLOWLOG"), vec![arg("LEN")])
                    .await
                    .map_err(|e| redis_error("SLOWLOG LEN failed", &e))?;
                cleared += n.as_i64().unwrap_or(0);
                let _: Value = c
                    .client
                    .custom(node_cmd("SLOWLOG"), vec![arg("RESET")])
                    .await
                    .map_err(|e| redis_error("SLOWLOG RESET failed", &e))?;
            }
            Ok(json!({ "entries_cleared": cleared, "nodes": nodes.conns.len() }))
        }
        .boxed()
    }
}

// ----------------------------------------------------------------------------
// CLIENT KILL

/// `redis.client.kill`: one connection, by its id (ids are never reused).
pub struct ClientKill;

struct KillRef {
    node: String,
    id: u64,
    addr: String,
}

fn kill_ref(params: &serde_json::Value) -> Result<KillRef, String> {
    let text = |k: &str| {
        params
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let id = params
        .get("id")
        .and_then(|v| {
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        })
        .ok_or("“id” must be the client's id (a whole number) from the clients page.")?;
    let node = text("node");
    let addr = text("addr");
    for (name, v) in [("node", &node), ("addr", &addr)] {
        if v.len() > 200 || v.chars().any(char::is_control) {
            return Err(format!("“{name}” is not an address."));
        }
    }
    Ok(KillRef { node, id, addr })
}

impl Action for ClientKill {
    fn kind(&self) -> &'static str {
        "redis.client.kill"
    }
    fn title(&self) -> &'static str {
        "Disconnect a Redis client"
    }
    fn target_kind(&self) -> TargetKind {
        TargetKind::Redis
    }
    fn severity(&self) -> Severity {
        Severity::Destructive
    }
    fn parse(&self, form: &BTreeMap<String, String>) -> Result<serde_json::Value, String> {
        let v = json!({
            "id": form.get("id").cloned().unwrap_or_default(),
            "node": form.get("node").cloned().unwrap_or_default().trim(),
            "addr": form.get("addr").cloned().unwrap_or_default().trim(),
        });
        let r = kill_ref(&v)?;
        Ok(json!({ "id": r.id, "node": r.node, "addr": r.addr }))
    }
    fn describe(&self, params: &serde_json::Value) -> String {
        match kill_ref(params) {
            Ok(r) => format!(
                "CLIENT KILL ID {} on {} — closes that one connection{}; a command it is running \
                 finishes first, a MULTI it has open is discarded, and its client may reconnect. \
                 Client ids are never reused, and it runs only if the client is still connected from \
                 the same address.",
                r.id,
                if r.node.is_empty() {
                    "the server".to_string()
                } else {
                    r.node.clone()
                },
                if r.addr.is_empty() {
                    String::new()
                } else {
                    format!(" (from {})", r.addr)
                }
            ),
            Err(_) => "Disconnect a client: the parameters are not valid.".into(),
        }
    }
    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        params: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        async move {
            let r = kill_ref(params)?;
            let nodes = conn::primaries(&ctx.target, 0).await?;
            let c = nodes
                .conns
                .iter()
                .find(|c| c.label == r.node || (nodes.conns.len() == 1 && r.node.is_empty()))
                .ok_or_else(|| format!("{} is not a primary of this target any more.", r.node))?;
            let list: Value = c
                .client
                .custom(node_cmd("CLIENT"), vec![arg("LIST"), arg("ID"), arg(r.id.to_string())])
                .await
                .map_err(|e| redis_error("CLIENT LIST failed", &e))?;
            let rows = admin::parse_client_list(&value_text(&list));
            let Some(row) = rows.first() else {
                return Err(format!("Client {} has already disconnected; nothing was done.", r.id));
            };
            let now_addr = row.get("addr").cloned().unwrap_or_default();
            if !r.addr.is_empty() && now_addr != r.addr {
                return Err(format!(
                    "Client {} is now connected from {now_addr}, not {}; nothing was done.",
                    r.id, r.addr
                ));
            }
            let killed: Value = c
                .client
                .custom(node_cmd("CLIENT"), vec![arg("KILL"), arg("ID"), arg(r.id.to_string())])
                .await
                .map_err(|e| redis_error("CLIENT KILL failed", &e))?;
            Ok(json!({ "killed": killed.as_i64().unwrap_or(0), "id": r.id, "addr": now_addr, "node": c.label }))
        }
        .boxed()
    }
}

// ----------------------------------------------------------------------------
// CONFIG SET

/// `redis.config.set` of one of [`admin::SETTABLE`].
pub struct ConfigSet;

fn setting_of(params: &serde_json::Value) -> Result<(String, String), String> {
    let name = params
        .get("name")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let value = params.get("value").and_then(|v| v.as_str()).unwrap_or("");
    let value = admin::check_setting(&name, value)?;
    Ok((name, value))
}

impl Action for ConfigSet {
    fn kind(&self) -> &'static str {
        "redis.config.set"
    }
    fn title(&self) -> &'static str {
        "Change a Redis setting"
    }
    fn target_kind(&self) -> TargetKind {
        TargetKind::Redis
    }
    fn severity(&self) -> Severity {
        Severity::Destructive
    }
    fn parse(&self, form: &BTreeMap<String, String>) -> Result<serde_json::Value, String> {
        let (name, value) = setting_of(&json!({
            "name": form.get("name").cloned().unwrap_or_default(),
            "value": form.get("value").cloned().unwrap_or_default(),
        }))?;
        Ok(json!({ "name": name, "value": value }))
    }
    fn describe(&self, params: &serde_json::Value) -> String {
        let Ok((name, value)) = setting_of(params) else {
            return "Change a Redis setting: the parameters are not valid.".into();
        };
        let effect = match name.as_str() {
            "maxmemory" => {
                "A limit below the memory in use makes Redis evict keys (or refuse writes under noeviction) at once."
            }
            "maxmemory-policy" => {
                "Decides which keys Redis drops when memory is full; noeviction refuses writes instead."
            }
            "appendonly" => {
                "Turning it on starts an AOF rewrite in a forked child (disk and memory copy-on-write); turning it off stops the AOF."
            }
            "appendfsync" => {
                "Trades durability (always) against write latency; everysec loses at most a second of writes."
            }
            _ => "Changes when RDB snapshots are taken; empty turns automatic snapshots off.",
        };
        format!(
            "CONFIG SET {name} \"{value}\" on every primary, at once and for the running server only \
             (not written to redis.conf: a restart goes back to the file's value). The old and new \
             values are read and logged. {effect}"
        )
    }
    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        params: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<serde_json::Value, String>> {
        async move {
            let (name, value) = setting_of(params)?;
            let nodes = conn::primaries(&ctx.target, 0).await?;
            let mut out = Vec::new();
            for c in &nodes.conns {
                let old = admin::config_get(&c.client, &name)
                    .await?
                    .unwrap_or_default();
                let _: Value = c
                    .client
                    .custom(
                        node_cmd("CONFIG"),
                        vec![arg("SET"), arg(name.clone()), arg(value.clone())],
                    )
                    .await
                    .map_err(|e| {
                        format!(
                            "{} (the settings of nodes before it were changed: {})",
                            redis_error(&format!("CONFIG SET {name} failed on {}", c.label), &e),
                            serde_json::to_string(&out).unwrap_or_default()
                        )
                    })?;
                let new = admin::config_get(&c.client, &name)
                    .await?
                    .unwrap_or_default();
                out.push(json!({ "node": c.label, "old": old, "new": new }));
            }
            let first = out.first().cloned().unwrap_or_default();
            Ok(json!({ "name": name, "old": first["old"], "new": first["new"], "nodes": out }))
        }
        .boxed()
    }
}
