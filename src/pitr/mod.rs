//! Point-in-time recovery: continuous WAL archiving ([`archive`]), the stored WAL
//! ([`segments`]), named restore points ([`restore_points`]), base backups and
//! recoveries to a chosen second.
//!
//! The pieces, for a target with `[postgres.archive]`:
//! - [`archive`] keeps one `pg_receivewal` per target running in exactly one dbops
//!   replica (a lease in `wal_streams`), over a physical replication slot, and
//!   stores every completed WAL segment (and a snapshot of the one being written)
//!   through SHA-256 in the target's storage, recording each in `wal_segments`.
//! - [`segments`] reads what is stored: the recoverable window, gaps, and one
//!   file fetched back whole and checked (what a recovery's `restore_command` uses).
//! - [`restore_points`] names positions in the WAL: dbops creates one just before
//!   every approved destructive action it runs on an archived target.
//! - [`base_backups`] and [`recover`]: `pg_basebackup` into storage, and a
//!   scratch server recovered to a chosen second; [`replace`] swaps a recovered
//!   database in for a live one (gated, all or nothing).

pub mod archive;
pub mod base_backups;
pub mod recover;
pub mod replace;
pub mod restore_points;
pub mod scratch;
pub mod segments;

use std::fmt;

/// A WAL position (a PostgreSQL `pg_lsn`), kept as a 64-bit number; shown and
/// parsed as PostgreSQL writes it (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses `X/Y` (hexadecimal halves).
    pub fn parse(s: &str) -> Option<Lsn> {
        let (hi, lo) = s.trim().split_once('/')?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return None;
        }
        let hi = u32::from_str_radix(hi, 16).ok()?;
        let lo = u32::from_str_radix(lo, 16).ok()?;
        Some(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }

    /// As stored in the console database (`bigint`).
    pub fn as_i64(self) -> i64 {
        self.0 as i64
    }

    pub fn from_i64(v: i64) -> Lsn {
        Lsn(v as u64)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// A WAL file name as PostgreSQL writes it in `pg_wal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalFile {
    /// `TTTTTTTTXXXXXXXXYYYYYYYY`: timeline, then the segment number split in two.
    Segment { timeline: u32, segno: u64 },
    /// `TTTTTTTT.history`: how a timeline branched off its parent.
    History { timeline: u32 },
}

impl WalFile {
    /// Parses a completed WAL file's name; `None` for anything else (`.partial`
    /// files, temporary files, other names).
    pub fn parse(name: &str, segment_size: u64) -> Option<WalFile> {
        let hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F'));
        if let Some(tli) = name.strip_suffix(".history") {
            if tli.len() == 8 && hex(tli) {
                return Some(WalFile::History {
                    timeline: u32::from_str_radix(tli, 16).ok()?,
                });
            }
            return None;
        }
        if name.len() != 24 || !hex(name) || segment_size == 0 {
            return None;
        }
        let timeline = u32::from_str_radix(&name[0..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
        let per_log = segments_per_log(segment_size);
        if seg >= per_log {
            return None;
        }
        Some(WalFile::Segment {
            timeline,
            segno: log * per_log + seg,
        })
    }

    /// The segment holding `lsn` on `timeline`.
    pub fn containing(timeline: u32, lsn: Lsn, segment_size: u64) -> WalFile {
        WalFile::Segment {
            timeline,
            segno: lsn.0 / segment_size,
        }
    }

    /// The file's name.
    pub fn name(&self, segment_size: u64) -> String {
        match *self {
            WalFile::Segment { timeline, segno } => {
                let per_log = segments_per_log(segment_size);
                format!(
                    "{timeline:08X}{:08X}{:08X}",
                    segno / per_log,
                    segno % per_log
                )
            }
            WalFile::History { timeline } => format!("{timeline:08X}.history"),
        }
    }

    pub fn timeline(&self) -> u32 {
        match *self {
            WalFile::Segment { timeline, .. } | WalFile::History { timeline } => timeline,
        }
    }

    /// For a segment: the positions `[start, end)` it holds.
    pub fn range(&self, segment_size: u64) -> Option<(Lsn, Lsn)> {
        match *self {
            WalFile::Segment { segno, .. } => {
                Some((Lsn(segno * segment_size), Lsn((segno + 1) * segment_size)))
            }
            WalFile::History { .. } => None,
        }
    }
}

/// Segments per 4 GiB "log" (the middle 8 hex digits of a segment's name).
fn segments_per_log(segment_size: u64) -> u64 {
    0x1_0000_0000 / segment_size.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB16: u64 = 16 * 1024 * 1024;

    #[test]
    fn lsn_round_trips_as_postgres_writes_it() {
        let l = Lsn::parse("16/B374D848").unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!(Lsn::parse("0/0"), Some(Lsn(0)));
        assert_eq!(Lsn::parse("x/1"), None);
        assert_eq!(Lsn::parse("1"), None);
        assert_eq!(Lsn::parse("123456789/0"), None);
    }

    #[test]
    fn segment_names_match_postgres() {
        // pg_walfile_name('0/3000028') on timeline 1 with 16 MB segments.
        let f = WalFile::containing(1, Lsn::parse("0/3000028").unwrap(), MB16);
        assert_eq!(f.name(MB16), "000000010000000000000003");
        // pg_walfile_name('1/0') = 000000010000000100000000
        let f = WalFile::containing(1, Lsn::parse("1/0").unwrap(), MB16);
        assert_eq!(f.name(MB16), "000000010000000100000000");
        assert_eq!(WalFile::parse("000000010000000100000000", MB16), Some(f));
        let (start, end) = f.range(MB16).unwrap();
        assert_eq!(start.to_string(), "1/0");
        assert_eq!(end.to_string(), "1/1000000");
        assert_eq!(
            WalFile::parse("00000002.history", MB16),
            Some(WalFile::History { timeline: 2 })
        );
        assert_eq!(
            WalFile::parse("000000010000000000000003.partial", MB16),
            None
        );
        assert_eq!(
            WalFile::parse("0000000100000000000000FF", MB16),
            Some(WalFile::Segment {
                timeline: 1,
                segno: 255
            })
        );
        // Only 256 segments of 16 MB in a log: …00000100 does not exist.
        assert_eq!(WalFile::parse("000000010000000000000100", MB16), None);
        assert_eq!(WalFile::parse("00000001000000000000000g", MB16), None);
    }
}
