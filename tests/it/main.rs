//! dbops' integration tests: one binary, each test with a fresh console database on
//! the real PostgreSQL and Redis (the machine's, or throwaway ones started from its
//! binaries when none answer).

mod activity;
mod approvals;
mod approvals_seen;
mod audit_log;
mod audit_tamper;
mod auth;
mod backups;
mod browser;
mod child_env;
mod cli;
mod compression;
mod deploy;
mod faults;
mod health;
mod helpers;
mod hostile;
mod job_runtime;
mod layers;
mod migration_status;
mod migration_tools;
mod operations_page;
mod pitr;
mod pitr_archive;
mod redis_backup;
mod redis_restore;
mod redis_tools;
mod reports;
mod restore_safety;
mod restores;
mod routes;
mod sso;
pub mod storage;
mod target_roles;
mod targets;
mod two_factor;
mod users_admin;
mod windows;
