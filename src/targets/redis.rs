//! Redis targets: one fred client per target, made on first use and made again
//! after a failed connect, and the facts the overview shows (from INFO).

use std::collections::HashMap;

use fred::prelude::*;
use secrecy::ExposeSecret;

use super::{Health, Target, bounded};

/// What the overview shows of a Redis target.
#[derive(Debug, Clone)]
pub struct RedisStatus {
    pub version: String,
    pub role: String,
    pub used_memory: i64,
    pub maxmemory: i64,
    pub clients: i64,
    pub keys: i64,
}

/// Parses INFO's `key:value` lines (sections and comments skipped).
pub fn parse_info(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Sums `keys=` over the `dbN:keys=..,expires=..` lines of INFO keyspace.
pub fn total_keys(info: &HashMap<String, String>) -> i64 {
    info.iter()
        .filter(|(k, _)| k.starts_with("db") && k[2..].chars().all(|c| c.is_ascii_digit()))
        .filter_map(|(_, v)| {
            v.split(',')
                .find_map(|p| p.strip_prefix("keys="))
                .and_then(|n| n.parse::<i64>().ok())
        })
        .sum()
}

impl Target {
    /// A connected client for this Redis target.
    pub async fn redis(&self) -> Result<Client, String> {
        let mut slot = self.redis.lock().await;
        if let Some(c) = slot.as_ref()
            && c.is_connected()
        {
            return Ok(c.clone());
        }
        let config = Config::from_url(self.config.url.expose_secret())
            .map_err(|e| self.scrub(&format!("invalid connection URL: {e}")))?;
        let timeout = self.connect_timeout;
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = timeout;
                c.internal_command_timeout = timeout;
                c.max_command_attempts = 1;
            })
            .with_performance_config(|p| {
                p.default_command_timeout = self.statement_timeout;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build()
            .map_err(|e| self.scrub(&e.to_string()))?;
        // fred gives up by itself after connection_timeout; the outer bound is a
        // backstop for a handshake that hangs after the TCP connect.
        match bounded(timeout * 2, client.init()).await {
            Ok(_task) => {
                *slot = Some(client.clone());
                Ok(client)
            }
            Err(e) => {
                // Stop any reconnecting in the background, without waiting for it.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), client.quit())
                        .await;
                });
                Err(describe_redis_error(&self.scrub(&e)))
            }
        }
    }

    /// Reachability and basic facts, within the connect timeout.
    #[tracing::instrument(skip(self), fields(target = %self.config.name))]
    pub async fn redis_status(&self) -> Health<RedisStatus> {
        let client = match self.redis().await {
            Ok(c) => c,
            Err(e) => return Health::Down(e),
        };
        match bounded(self.connect_timeout * 2, client.info::<String>(None)).await {
            Ok(text) => {
                let info = parse_info(&text);
                let num = |k: &str| info.get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
                Health::Up(RedisStatus {
                    version: info.get("redis_version").cloned().unwrap_or_default(),
                    role: info.get("role").cloned().unwrap_or_default(),
                    used_memory: num("used_memory"),
                    maxmemory: num("maxmemory"),
                    clients: num("connected_clients"),
                    keys: total_keys(&info),
                })
            }
            Err(e) => Health::Down(describe_redis_error(&self.scrub(&e))),
        }
    }
}

fn describe_redis_error(message: &str) -> String {
    let lower = message.to_lowercase();
    if lower.contains("connection refused") {
        "connection refused: is Redis running and listening on that address?".into()
    } else if lower.contains("timed out") || lower.contains("timeout") {
        "no answer within the connect timeout: the server or network is not responding".into()
    } else if lower.contains("wrongpass") || lower.contains("noauth") {
        "authentication failed: check the password of the target's URL".into()
    } else {
        message.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_is_parsed_and_keys_summed() {
        let info = parse_info(
            "# Server\r\nredis_version:7.0.15\r\n# Keyspace\r\ndb0:keys=10,expires=2,avg_ttl=0\r\ndb3:keys=5,expires=0,avg_ttl=0\r\n",
        );
        assert_eq!(info["redis_version"], "7.0.15");
        assert_eq!(total_keys(&info), 15);
    }
}
