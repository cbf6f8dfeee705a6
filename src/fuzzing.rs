//! What the fuzz targets in `fuzz/` call: the parsers of untrusted input, re-exported
//! in one place so that the targets need nothing else of the crate. Not an API.

pub use crate::audit::csv_cell;
pub use crate::backups::redis_dump::{EXPORT_MAGIC, ExportStats, verify_export};
pub use crate::migration_status::disk::{flyway_checksum, flyway_version_key, prisma_checksums};
pub use crate::schedules::{Schedule, Zone};

/// How a migration tool orders its migration keys (see `migration_status::disk`).
pub fn migration_sort_key(tool: &str, key: &str) -> (u8, Vec<u128>, String) {
    crate::migration_status::disk::sort_key(tool, key)
}
