-- Issue #23: dbops compresses artifacts itself (zstd, on threads of its own)
-- while they stream to storage. Expand-only: rows written before this (and by
-- a dbops of the previous version during a rolling upgrade) leave both NULL
-- and are read exactly as before (pg_dump's own compression, or none).
--
-- compression: how the stored file is compressed by dbops ('zstd': one zstd
--   frame around what the tool wrote; NULL: stored as the tool wrote it).
-- raw_bytes: what the tool wrote, before dbops compressed it.
ALTER TABLE backups ADD COLUMN compression text
    CHECK (compression IS NULL OR compression IN ('zstd'));
ALTER TABLE backups ADD COLUMN raw_bytes bigint CHECK (raw_bytes IS NULL OR raw_bytes >= 0);
