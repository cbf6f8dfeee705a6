//! Redis tools (PRODUCT C8): everything an operator does to a Redis target besides
//! backups, without the foot-guns of the runbooks (`KEYS *`, `xargs DEL`,
//! a FLUSHALL typed into the wrong terminal).
//!
//! - [`conn`]: connections for the tools — one per primary (every primary of a
//!   cluster), on a chosen logical database, closed when dropped;
//! - [`keys`]: key names in URLs (hex) and on pages (escaped, `\xNN` for bytes);
//! - [`info`]: the overview from INFO, with warnings, and the topology (replicas,
//!   sentinel, cluster shards);
//! - [`browse`]: the key browser (SCAN with MATCH/TYPE, bounded per page) and the
//!   bounded view of one key's value;
//! - [`memory`]: memory by key prefix, as a job;
//! - [`delete`]: delete by pattern: the preview and the SCAN + UNLINK job;
//! - [`admin`]: SLOWLOG, CLIENT LIST, CONFIG GET/SET;
//! - [`actions`]: the gated actions (delete by pattern, flush, slowlog reset,
//!   client kill, config set) and the jobs (memory by prefix, bulk delete, BGSAVE).

pub mod actions;
pub mod admin;
pub mod browse;
pub mod conn;
pub mod delete;
pub mod info;
pub mod keys;
pub mod memory;

use fred::prelude::Error as RedisError;

/// A readable sentence for a Redis error (the seeds' renamed-command hardening
/// and ACLs included).
pub fn redis_error(what: &str, e: &RedisError) -> String {
    let details = e.details().to_string();
    let lower = details.to_lowercase();
    if lower.contains("noperm") {
        format!(
            "{what}: the target's Redis user is not allowed to run this command (ACL): {details}"
        )
    } else if lower.contains("unknown command") {
        format!(
            "{what}: the server does not know this command — it may be renamed or disabled \
             (rename-command in redis.conf): {details}"
        )
    } else if lower.contains("wrongpass") || lower.contains("noauth") {
        format!("{what}: authentication failed: check the password of the target's URL")
    } else {
        format!("{what}: {details}")
    }
}
