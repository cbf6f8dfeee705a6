//! dbops: a web console for the people who keep a team's PostgreSQL and Redis
//! running. Every operation is a button with the right safety around it (roles,
//! CSRF, approvals for destructive actions) and is written into an append-only,
//! hash-chained operations log in the console's own PostgreSQL.
//!
//! - [`config`]: the TOML config file and its targets;
//! - [`app`]: building and serving the web application;
//! - [`auth`]: users, roles, sessions, CSRF and the per-route authorization check;
//! - [`audit`]: the operations log;
//! - [`approvals`]: requests, decisions and the single execution of destructive actions;
//!   [`actions`] lists the action kinds and the job kinds;
//! - [`jobs`]: the one runtime for long-running work (backups, restores, reports,
//!   bulk deletes, maintenance) with progress, a Stop button and a lease, and the
//!   one scheduler of periodic ticks;
//! - [`backups`]: taking PostgreSQL and Redis backups; [`restores`]: putting them
//!   back (PostgreSQL and Redis, into a new database or over a live one);
//!   [`schedules`]: when backups run and which are kept (cron, retention);
//!   [`storage`]: where artifacts live (local, S3, the hashing upload);
//!   [`pg_tools`]: finding and running `pg_dump`, `pg_restore`, `psql`;
//! - [`migration_status`]: migration tools' bookkeeping tables, pending migrations and drift;
//! - [`reports`]: index, bloat and health reports of PostgreSQL targets, and the
//!   maintenance actions they lead to;
//! - [`targets`]: connections to the PostgreSQL and Redis servers dbops operates;
//! - [`activity`]: a PostgreSQL target's sessions, long-running and blocked queries,
//!   and the cancel/terminate actions;
//! - [`windows`]: maintenance windows: templates of automatic and manual steps, run
//!   and recorded, with approval, rollback and a report;
//! - [`web`]: the route table and the pages;
//! - [`cli`]: the command-line subcommands;
//! - [`process`]: how dbops starts other programs (`pg_dump`, `redis-cli`, …): with a
//!   cleared environment and an allowlist;
//! - [`demo`] and [`devcluster`]: `dbops demo` and the throwaway servers it (and the tests) use.

pub mod actions;
pub mod activity;
pub mod app;
pub mod approvals;
pub mod audit;
pub mod auth;
pub mod backups;
pub mod cli;
pub mod config;
pub mod demo;
pub mod devcluster;
pub mod error;
pub mod fmt;
#[doc(hidden)]
pub mod fuzzing;
pub mod jobs;
pub mod migration_status;
pub mod notify;
pub mod pg_tools;
pub mod pitr;
pub mod process;
pub mod redis_tools;
pub mod reports;
pub mod restores;
pub mod schedules;
pub mod state;
pub mod storage;
pub mod targets;
pub mod web;
pub mod windows;
