//! The PostgreSQL databases and Redis servers dbops operates, declared in the
//! config file. Connections are made lazily, the first time a page needs a target,
//! and every call is bounded by the connect timeout, so an unreachable target shows
//! as down and never blocks other pages. Error texts are scrubbed of the target's
//! secrets before anyone sees them.

pub mod postgres;
pub mod redis;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use secrecy::ExposeSecret;

use crate::config::{Config, Policy, TargetConfig, TargetKind};

/// One configured target and its (lazily made) connections.
pub struct Target {
    pub config: TargetConfig,
    pg: tokio::sync::OnceCell<sqlx::PgPool>,
    redis: tokio::sync::Mutex<Option<fred::prelude::Client>>,
    secrets: Vec<String>,
    connect_timeout: Duration,
    statement_timeout: Duration,
}

impl Target {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn kind(&self) -> TargetKind {
        self.config.kind
    }

    pub fn policy(&self) -> Policy {
        self.config.policy
    }

    /// Removes the target's password and whole URL from a message (driver errors
    /// sometimes echo what they were given).
    pub fn scrub(&self, message: &str) -> String {
        let mut out = message.to_string();
        for s in &self.secrets {
            if !s.is_empty() {
                out = out.replace(s.as_str(), "[redacted]");
            }
        }
        out
    }
}

/// All targets, by name.
pub struct Registry {
    targets: BTreeMap<String, Arc<Target>>,
}

/// A target's state as the overview shows it.
#[derive(Debug, Clone)]
pub enum Health<T> {
    Up(T),
    Down(String),
}

impl Registry {
    pub fn new(config: &Config) -> Registry {
        let targets = config
            .targets
            .iter()
            .map(|t| {
                let url = t.url.expose_secret().to_string();
                let mut secrets = vec![url.clone()];
                if let Ok(u) = url::Url::parse(&url)
                    && let Some(p) = u.password()
                {
                    secrets.push(p.to_string());
                    if let Ok(decoded) = urlencoding_decode(p) {
                        secrets.push(decoded);
                    }
                }
                (
                    t.name.clone(),
                    Arc::new(Target {
                        config: t.clone(),
                        pg: tokio::sync::OnceCell::new(),
                        redis: tokio::sync::Mutex::new(None),
                        secrets,
                        connect_timeout: config.connect_timeout,
                        statement_timeout: config.statement_timeout,
                    }),
                )
            })
            .collect();
        Registry { targets }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Target>> {
        self.targets.get(name).cloned()
    }

    /// Targets in name order.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Target>> {
        self.targets.values()
    }
}

fn urlencoding_decode(s: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len() + 1
            && let Some(h) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(h);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out)
}

/// Runs `fut` for at most `limit`, turning a timeout into a readable error.
pub async fn bounded<T, E: std::fmt::Display>(
    limit: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no answer within {} s (timed out)",
            limit.as_secs_f64()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::urlencoding_decode;

    #[test]
    fn percent_encoded_passwords_are_decoded_for_scrubbing() {
        assert_eq!(urlencoding_decode("p%40ss%2F1").unwrap(), "p@ss/1");
        assert_eq!(urlencoding_decode("plain").unwrap(), "plain");
    }
}
