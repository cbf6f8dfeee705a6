//! Backups (PRODUCT C4): PostgreSQL with `pg_dump`, Redis as an RDB snapshot or a
//! portable logical export; streamed to storage while hashed, verified, and only
//! then listed as good.

pub mod pgdump;
pub mod progress;
pub mod redis_dump;
pub mod retention;
pub mod storage;
