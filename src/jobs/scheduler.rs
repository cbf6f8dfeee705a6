//! The one scheduler: every periodic tick of a dbops process (backup schedules,
//! the sweepers, report refreshes and size samples, approval expiry, signed
//! checkpoints, expired sessions) is a [`Periodic`] registered in one list
//! ([`crate::actions::periodic`]) and run here, each on its own interval. A tick
//! that fails logs and waits for the next; a slow one delays only itself.

use std::{sync::Arc, time::Duration};

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// Work to run every `every`.
pub struct Periodic {
    /// A short name for the logs (`backups.schedule`).
    pub name: &'static str,
    pub every: Duration,
    pub tick: Arc<dyn Fn(AppState) -> BoxFuture<'static, Result<(), String>> + Send + Sync>,
}

impl Periodic {
    pub fn new<F, Fut>(name: &'static str, every: Duration, f: F) -> Periodic
    where
        F: Fn(AppState) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Periodic {
            name,
            every,
            tick: Arc::new(move |s| Box::pin(f(s))),
        }
    }
}

/// The running scheduler of this process.
pub struct Scheduler {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    token: CancellationToken,
}

impl Scheduler {
    /// Stops every tick (a tick in progress finishes, for at most 15 s).
    pub async fn stop(self) {
        self.token.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
    }
}

/// Starts every periodic task; each ticks at once, then every interval.
pub fn start(state: &AppState, periodic: Vec<Periodic>) -> Scheduler {
    let token = CancellationToken::new();
    let tasks = periodic
        .into_iter()
        .map(|p| {
            let state = state.clone();
            let token = token.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(p.every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = token.cancelled() => return,
                    }
                    if let Err(e) = (p.tick)(state.clone()).await {
                        tracing::warn!(task = p.name, error = %e, "a periodic task failed");
                    }
                }
            })
        })
        .collect();
    Scheduler { tasks, token }
}
