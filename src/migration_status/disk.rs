//! Local migrations directories: reading them the way each tool does, recomputing
//! the checksum the tool records, and comparing with what a database says is
//! applied (pending, applied-but-missing, checksum drift).
//!
//! How each tool names its files and checksums them (verified against the tools'
//! own sources):
//! - **sqlx** (`launchbadge/sqlx`, `sqlx-core/src/migrate/source.rs` and
//!   `migration.rs`, 0.8.6): files `<VERSION>_<DESCRIPTION>.sql` in one directory,
//!   reversible ones `<VERSION>_<DESCRIPTION>.up.sql` / `.down.sql` (only `up` is
//!   recorded); the version is an `i64`; the checksum is SHA-384 of the file's text
//!   as read, no line-ending normalisation (`Sha384::digest(sql)`), stored as `bytea`.
//! - **Prisma** (`prisma/prisma-engines`,
//!   `schema-engine/connectors/schema-connector/src/checksum.rs`): one directory per
//!   migration holding `migration.sql`; the checksum is the lowercase hex SHA-256 of
//!   the script, and Prisma accepts the script with LF or CRLF line endings (it tries
//!   the text as is, with CRLF → LF and with LF → CRLF) and old checksums without
//!   zero padding. We accept the same.
//! - **Drizzle** (`drizzle-team/drizzle-orm`, `drizzle-orm/src/migrator.ts`):
//!   `meta/_journal.json` lists `entries: [{idx, when, tag, breakpoints}]`; each
//!   migration is `<tag>.sql`; its hash is the hex SHA-256 of the file text with
//!   CRLF normalised to LF, and `__drizzle_migrations.created_at` holds the entry's
//!   `when` (the journal's milliseconds), which is how an applied row is matched to
//!   its file (the table stores no names).
//! - **Flyway** (`flyway/flyway`, `flyway-core/.../internal/resolver/ChecksumCalculator.java`,
//!   `calculateChecksumForResource`): `V<version>__<description>.sql` (versioned;
//!   `_` in the version means `.`) and `R__<description>.sql` (repeatable), found
//!   recursively; the checksum is `java.util.zip.CRC32` (IEEE) updated with the UTF-8
//!   bytes of every line *without* its line terminator (`BufferedReader.readLine`
//!   splits on `\n`, `\r` and `\r\n`; a byte order mark at the start of the first line
//!   is removed), stored as a signed 32-bit `int`. Versions compare numerically part by
//!   part, trailing zero parts ignored (`1.0` = `1`).
//! - **Alembic** (`sqlalchemy/alembic`, `script/revision.py`): every `*.py` in
//!   `versions/` (the directory given, or its `versions/` folder) assigns `revision`
//!   and `down_revision` (a string, `None`, or a tuple for a merge), optionally typed
//!   (`revision: str = "…"`) and `branch_labels`. The heads are the revisions no other
//!   names as its down revision; `alembic_version` holds the current revision of each
//!   branch, and everything it descends from counts as applied. No checksums.
//! - **Django** (`django/db/migrations/loader.py`): each app's `migrations/` package
//!   (a folder with `__init__.py`) holds modules whose names do not start with `_`
//!   or `~`; the app label is the app folder's name (an `AppConfig.label` that
//!   differs is not seen). `dependencies` and `replaces` (squashed migrations) are
//!   read; a squashed migration counts as applied when all it replaces are, and the
//!   ones it replaces are left out once it is used. Apps whose migrations are not in
//!   the directory (django.contrib…) are not compared. No checksums.
//! - **Knex** (`lib/migrations/migrate/sources/fs-migrations.js`): files with
//!   Knex's loadable extensions (`.js`, `.cjs`, `.mjs`, `.ts`, `.coffee`…), sorted by
//!   name; `knex_migrations.name` is the file name. No checksums.
//! - **Sequelize** (sequelize-cli with umzug): `.js`, `.cjs`, `.mjs` and `.ts`
//!   (not `.d.ts`) files; `"SequelizeMeta".name` is the file name. No checksums.
//! - **TypeORM** (`src/migration/MigrationExecutor.ts`): each migration class's name
//!   (or its `name` property) ends in the 13-digit timestamp, and that name is what
//!   `migrations.name` records; the files' classes are read from `.ts`/`.js` text.
//! - **dbmate** (`pkg/dbmate/migration.go`): `*.sql` files whose name starts with
//!   digits and `_`; the digits are the version. No checksums.
//! - **node-pg-migrate** (`src/migration.ts`): every file in the directory (dot
//!   files ignored); `pgmigrations.name` is the file name without its extension,
//!   and migrations run in name order. No checksums.
//! - **goose** (`pressly/goose`, `migration.go`): `<version>_<name>.sql` or `.go`
//!   (not `_test.go`); the version is the number.
//! - **golang-migrate** (`source/parse.go`): `<version>_<title>.up.<ext>`; it
//!   records only the current version, so everything numbered up to it counts as
//!   applied and everything above it is pending.
//!
//! Over 600 lines: one reader per migration tool's directory layout and checksum
//! (twelve tools), each small; about 170 lines are tests on fixtures.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256, Sha384};

/// The tools whose migrations directory dbops can read (the config's `tool`).
pub const DIRECTORY_TOOLS: &[&str] = &[
    "sqlx",
    "prisma",
    "flyway",
    "drizzle",
    "alembic",
    "django",
    "knex",
    "sequelize",
    "typeorm",
    "dbmate",
    "node-pg-migrate",
    "goose",
    "golang-migrate",
    "rails",
    "diesel",
    "refinery",
    "liquibase",
    "sqitch",
    "atlas",
    "graphile-migrate",
];

/// One migration found on disk (also one entry of a pipeline's manifest, which
/// is why it (de)serialises; empty fields are left out).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskMigration {
    /// What the tool's table records for it: sqlx version, Prisma migration name,
    /// Flyway normalised version (`R:<description>` for repeatables), Drizzle `when`.
    pub key: String,
    /// Human name (description / tag).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The file, relative to the directory.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub file: String,
    /// The checksum as the tool records it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub checksum: String,
    /// Other checksums the tool also accepts for the same file (line endings).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_accepted: Vec<String>,
    /// The unit it belongs to where the tool keeps several (Django's app); empty
    /// otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
    /// What it comes after: Alembic's down revisions, Django's dependencies
    /// (`app.name`), Django's `replaces` prefixed with `replaces:`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<String>,
}

/// A recorded checksum that does not match the file any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub key: String,
    pub file: String,
    pub recorded: String,
    pub computed: String,
}

/// The comparison of a directory with a database.
#[derive(Debug, Clone, Default)]
pub struct Drift {
    pub tool: String,
    pub directory: String,
    /// Migrations found on disk.
    pub on_disk: usize,
    /// On disk, not applied.
    pub pending: Vec<DiskMigration>,
    /// Applied (recorded), not on disk.
    pub missing: Vec<String>,
    /// Applied with a checksum that differs from the file's.
    pub mismatched: Vec<Mismatch>,
    /// The directory could not be read.
    pub error: Option<String>,
}

impl Drift {
    /// Nothing pending, missing or changed, and the directory was readable.
    pub fn is_clean(&self) -> bool {
        self.error.is_none()
            && self.pending.is_empty()
            && self.missing.is_empty()
            && self.mismatched.is_empty()
    }
}

/// What a database records for one migration, as far as comparing goes.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub key: String,
    pub checksum: Option<String>,
}

/// Reads `dir` as `tool` does. Errors are sentences naming the path.
pub fn read_dir(tool: &str, dir: &Path) -> Result<Vec<DiskMigration>, String> {
    if !dir.is_dir() {
        return Err(format!(
            "the migrations directory {} does not exist or is not a directory",
            dir.display()
        ));
    }
    let mut out = match tool {
        "sqlx" => read_sqlx(dir)?,
        "prisma" => read_prisma(dir)?,
        "flyway" => read_flyway(dir)?,
        "drizzle" => read_drizzle(dir)?,
        "alembic" => read_alembic(dir)?,
        "django" => read_django(dir)?,
        "knex" => read_named(
            dir,
            &[
                ".js",
                ".cjs",
                ".mjs",
                ".ts",
                ".cts",
                ".mts",
                ".coffee",
                ".litcoffee",
                ".ls",
                ".eg",
                ".iced",
                ".co",
            ],
            true,
        )?,
        "sequelize" => read_named(dir, &[".js", ".cjs", ".mjs", ".ts"], true)?,
        "node-pg-migrate" => read_named(dir, &[], false)?,
        "typeorm" => read_typeorm(dir)?,
        "dbmate" => read_numbered(dir, |f| f.strip_suffix(".sql"))?,
        "goose" => read_numbered(dir, |f| {
            f.strip_suffix(".sql")
                .or_else(|| f.strip_suffix(".go").filter(|s| !s.ends_with("_test")))
        })?,
        "golang-migrate" => read_numbered(dir, |f| f.rsplit_once(".up.").map(|(stem, _)| stem))?,
        "rails" => read_numbered(dir, |f| f.strip_suffix(".rb"))?,
        "diesel" => super::disk_more::read_diesel(dir)?,
        "refinery" => super::disk_more::read_refinery(dir)?,
        "liquibase" => super::disk_more::read_liquibase(dir)?,
        "sqitch" => super::disk_more::read_sqitch(dir)?,
        "atlas" => super::disk_more::read_atlas(dir)?,
        "graphile-migrate" => super::disk_more::read_graphile(dir)?,
        other => return Err(format!("dbops cannot read {other} migrations directories")),
    };
    if !matches!(
        tool,
        "drizzle" | "alembic" | "django" | "liquibase" | "sqitch"
    ) {
        out.sort_by_key(|m| sort_key(tool, &m.key));
    }
    Ok(out)
}

/// Orders keys the way the tool applies them.
pub(crate) fn sort_key(tool: &str, key: &str) -> (u8, Vec<u128>, String) {
    match tool {
        "sqlx" | "dbmate" | "goose" | "golang-migrate" | "rails" | "refinery" | "atlas" => {
            (0, vec![key.parse::<u128>().unwrap_or(0)], key.to_string())
        }
        "flyway" => match key.strip_prefix("R:") {
            Some(d) => (1, vec![], d.to_string()),
            None => (
                0,
                key.split('.').map(|p| p.parse().unwrap_or(0)).collect(),
                String::new(),
            ),
        },
        _ => (0, vec![], key.to_string()),
    }
}

pub(super) fn io_err(path: &Path, e: std::io::Error) -> String {
    format!("cannot read {}: {e}", path.display())
}

pub(super) fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| io_err(path, e))
}

pub(super) fn files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

fn sha384_hex(text: &str) -> String {
    hex::encode(Sha384::digest(text.as_bytes()))
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn read_sqlx(dir: &Path) -> Result<Vec<DiskMigration>, String> {
    let mut out = vec![];
    for path in files(dir)? {
        if !path.is_file() {
            continue;
        }
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some((version, rest)) = file.split_once('_') else {
            continue;
        };
        if !rest.ends_with(".sql") || rest.ends_with(".down.sql") {
            continue;
        }
        let Ok(version) = version.parse::<i64>() else {
            continue;
        };
        let description = rest
            .strip_suffix(".up.sql")
            .or_else(|| rest.strip_suffix(".sql"))
            .unwrap_or(rest)
            .replace('_', " ");
        let sql = read_text(&path)?;
        out.push(DiskMigration {
            key: version.to_string(),
            name: description,
            file,
            checksum: sha384_hex(&sql),
            also_accepted: vec![],
            unit: String::new(),
            parents: vec![],
        });
    }
    Ok(out)
}

/// Prisma's checksum of a script, and the variants it also accepts.
pub fn prisma_checksums(script: &str) -> (String, Vec<String>) {
    let main = sha256_hex(script);
    let lf = sha256_hex(&script.replace("\r\n", "\n"));
    let crlf = sha256_hex(&script.replace('\n', "\r\n"));
    let mut also: Vec<String> = vec![lf, crlf];
    // Old Prisma versions wrote the hex without zero padding.
    let unpadded: String = Sha256::digest(script.as_bytes())
        .iter()
        .map(|b| format!("{b:x}"))
        .collect();
    also.push(unpadded);
    also.retain(|c| *c != main);
    also.dedup();
    (main, also)
}

fn read_prisma(dir: &Path) -> Result<Vec<DiskMigration>, String> {
    let mut out = vec![];
    for path in files(dir)? {
        let script = path.join("migration.sql");
        if !path.is_dir() || !script.is_file() {
            continue;
        }
        let name = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (checksum, also_accepted) = prisma_checksums(&read_text(&script)?);
        out.push(DiskMigration {
            key: name.clone(),
            name: String::new(),
            file: format!("{name}/migration.sql"),
            checksum,
            also_accepted,
            unit: String::new(),
            parents: vec![],
        });
    }
    Ok(out)
}

#[derive(serde::Deserialize)]
struct Journal {
    entries: Vec<JournalEntry>,
}

#[derive(serde::Deserialize)]
struct JournalEntry {
    when: i64,
    tag: String,
}

fn read_drizzle(dir: &Path) -> Result<Vec<DiskMigration>, String> {
    let journal_path = dir.join("meta").join("_journal.json");
    let journal: Journal = serde_json::from_str(&read_text(&journal_path)?)
        .map_err(|e| format!("{} is not a Drizzle journal: {e}", journal_path.display()))?;
    let mut out = vec![];
    for e in journal.entries {
        if e.tag.contains('/') || e.tag.contains("..") {
            return Err(format!(
                "{}: tag `{}` is not a file name",
                journal_path.display(),
                e.tag
            ));
        }
        let file = format!("{}.sql", e.tag);
        let raw = read_text(&dir.join(&file))?;
        let normalised = raw.replace("\r\n", "\n");
        let checksum = sha256_hex(&normalised);
        let raw_hash = sha256_hex(&raw);
        out.push(DiskMigration {
            key: e.when.to_string(),
            name: e.tag,
            file,
            also_accepted: if raw_hash != checksum {
                vec![raw_hash]
            } else {
                vec![]
            },
            checksum,
            unit: String::new(),
            parents: vec![],
        });
    }
    Ok(out)
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as `java.util.zip.CRC32`.
#[derive(Clone, Copy)]
struct Crc32(u32);

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

impl Crc32 {
    fn new() -> Crc32 {
        Crc32(0xFFFF_FFFF)
    }
    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = CRC_TABLE[((self.0 ^ *b as u32) & 0xFF) as usize] ^ (self.0 >> 8);
        }
    }
    fn value(self) -> u32 {
        self.0 ^ 0xFFFF_FFFF
    }
}

/// Flyway's checksum of a script: CRC-32 over each line's UTF-8 bytes without line
/// terminators (`\n`, `\r\n` or a lone `\r`), the BOM removed from the first line,
/// as a signed 32-bit integer.
pub fn flyway_checksum(script: &str) -> i32 {
    let text = script.strip_prefix('\u{feff}').unwrap_or(script);
    let mut crc = Crc32::new();
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                crc.update(&bytes[start..i]);
                i += 1;
                start = i;
            }
            b'\r' => {
                crc.update(&bytes[start..i]);
                i += if bytes.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                start = i;
            }
            _ => i += 1,
        }
    }
    // A last line without a terminator (readLine returns it too; an empty rest is
    // no line, and its bytes would add nothing anyway).
    crc.update(&bytes[start..]);
    crc.value() as i32
}

/// Flyway's version as compared: numeric parts without leading zeros, trailing
/// zero parts dropped (`1.0` = `1`, `001` = `1`). Non-numeric versions stay as they are.
pub fn flyway_version_key(version: &str) -> String {
    let parts: Option<Vec<u128>> = version
        .replace('_', ".")
        .split('.')
        .map(|p| p.parse::<u128>().ok())
        .collect();
    match parts {
        Some(mut parts) => {
            while parts.len() > 1 && parts.last() == Some(&0) {
                parts.pop();
            }
            parts
                .iter()
                .map(u128::to_string)
                .collect::<Vec<_>>()
                .join(".")
        }
        None => version.to_string(),
    }
}

fn read_flyway(dir: &Path) -> Result<Vec<DiskMigration>, String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for path in files(&d)? {
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let file = path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            let Some(stem) = file.strip_suffix(".sql") else {
                continue;
            };
            let (key, description) = if let Some(rest) = stem.strip_prefix("R__") {
                (
                    format!("R:{}", rest.replace('_', " ")),
                    rest.replace('_', " "),
                )
            } else if let Some(rest) = stem.strip_prefix('V')
                && let Some((version, desc)) = rest.split_once("__")
                && !version.is_empty()
            {
                (flyway_version_key(version), desc.replace('_', " "))
            } else {
                continue;
            };
            let relative = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            out.push(DiskMigration {
                key,
                name: description,
                file: relative,
                checksum: flyway_checksum(&read_text(&path)?).to_string(),
                also_accepted: vec![],
                unit: String::new(),
                parents: vec![],
            });
        }
    }
    Ok(out)
}

pub(super) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A migration of a tool that keeps no checksum.
pub(super) fn unsummed(key: String, name: String, file: String) -> DiskMigration {
    DiskMigration {
        key,
        name,
        file,
        checksum: String::new(),
        also_accepted: vec![],
        unit: String::new(),
        parents: vec![],
    }
}

/// Tools that record the file name (Knex, Sequelize: with its extension;
/// node-pg-migrate: without). `extensions` empty = every file but dot files.
fn read_named(
    dir: &Path,
    extensions: &[&str],
    keep_extension: bool,
) -> Result<Vec<DiskMigration>, String> {
    let mut out = vec![];
    for path in files(dir)? {
        let file = file_name(&path);
        if !path.is_file() || file.starts_with('.') || file.ends_with(".d.ts") {
            continue;
        }
        if !extensions.is_empty() && !extensions.iter().any(|e| file.ends_with(e)) {
            continue;
        }
        let stem = match file.rsplit_once('.') {
            Some((stem, _)) if !stem.is_empty() => stem.to_string(),
            _ => file.clone(),
        };
        let key = if keep_extension { file.clone() } else { stem };
        out.push(unsummed(key, String::new(), file));
    }
    Ok(out)
}

/// Tools whose files start with a version number and `_` (dbmate, goose,
/// golang-migrate); `stem` takes the part before the extension or says the file is
/// not a migration.
fn read_numbered(
    dir: &Path,
    stem: impl Fn(&str) -> Option<&str>,
) -> Result<Vec<DiskMigration>, String> {
    let mut out = vec![];
    for path in files(dir)? {
        let file = file_name(&path);
        if !path.is_file() {
            continue;
        }
        let Some(stem) = stem(&file) else { continue };
        let Some((version, name)) = stem.split_once('_') else {
            continue;
        };
        if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let key = version.trim_start_matches('0');
        let key = if key.is_empty() { "0" } else { key };
        out.push(unsummed(
            key.to_string(),
            name.replace('_', " "),
            file.clone(),
        ));
    }
    Ok(out)
}

/// The quoted strings in a Python or JavaScript value (`'a'`, `("a", "b")`).
fn quoted_strings(value: &str) -> Vec<String> {
    let mut out = vec![];
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\'' || c == '"' {
            let s: String = chars.by_ref().take_while(|x| *x != c).collect();
            out.push(s);
        }
    }
    out
}

/// The value of a top-level assignment `name = …` / `name: T = …` in Python
/// source, up to the end of its brackets.
fn py_assignment(source: &str, name: &str) -> Option<String> {
    let lines: Vec<&str> = source.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = rest.trim_start();
        let rest = if let Some(typed) = rest.strip_prefix(':') {
            match typed.find('=') {
                Some(eq) => &typed[eq..],
                None => continue,
            }
        } else {
            rest
        };
        let Some(value) = rest.strip_prefix('=').filter(|v| !v.starts_with('=')) else {
            continue;
        };
        let mut value = value.trim().to_string();
        let depth = |v: &str| {
            v.chars().filter(|c| matches!(c, '(' | '[')).count() as i64
                - v.chars().filter(|c| matches!(c, ')' | ']')).count() as i64
        };
        let mut j = i + 1;
        while depth(&value) > 0 && j < lines.len() {
            value.push(' ');
            value.push_str(lines[j].trim());
            j += 1;
        }
        return Some(value);
    }
    None
}

fn read_alembic(dir: &Path) -> Result<Vec<DiskMigration>, String> {
    let versions = dir.join("versions");
    let root = if versions.is_dir() {
        versions
    } else {
        dir.to_path_buf()
    };
    let mut out = vec![];
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for path in files(&d)? {
            let file = file_name(&path);
            if path.is_dir() {
                if file != "__pycache__" && !file.starts_with('.') {
                    stack.push(path);
                }
                continue;
            }
            if !file.ends_with(".py") || file.starts_with('_') {
                continue;
            }
            let source = read_text(&path)?;
            let Some(revision) = py_assignment(&source, "revision")
                .and_then(|v| quoted_strings(&v).into_iter().next())
            else {
                continue;
            };
            let parents = py_assignment(&source, "down_revision")
                .map(|v| quoted_strings(&v))
                .unwrap_or_default();
            let labels = py_assignment(&source, "branch_labels")
                .map(|v| quoted_strings(&v))
                .unwrap_or_default();
            let stem = file.trim_end_matches(".py");
            let name = stem
                .strip_prefix(&format!("{revision}_"))
                .unwrap_or(stem)
                .replace('_', " ");
            let mut m = unsummed(
                revision,
                name,
                path.strip_prefix(dir)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned(),
            );
            m.parents = parents;
            // Branch labels ride in `unit` (named branches).
            m.unit = labels.join(", ");
            out.push(m);
        }
    }
    Ok(alembic_order(out))
}

/// Alembic revisions from the base to the heads (each after its down revisions).
fn alembic_order(mut revs: Vec<DiskMigration>) -> Vec<DiskMigration> {
    revs.sort_by(|a, b| a.key.cmp(&b.key));
    let index: HashMap<String, usize> = revs
        .iter()
        .enumerate()
        .map(|(i, m)| (m.key.clone(), i))
        .collect();
    let mut depth: HashMap<usize, usize> = HashMap::new();
    fn depth_of(
        i: usize,
        revs: &[DiskMigration],
        index: &HashMap<String, usize>,
        depth: &mut HashMap<usize, usize>,
        seen: &mut HashSet<usize>,
    ) -> usize {
        if let Some(d) = depth.get(&i) {
            return *d;
        }
        if !seen.insert(i) {
            return 0; // a cycle: the tool refuses it; do not loop
        }
        let d = revs[i]
            .parents
            .iter()
            .filter_map(|p| index.get(p))
            .map(|&p| depth_of(p, revs, index, depth, seen) + 1)
            .max()
            .unwrap_or(0);
        depth.insert(i, d);
        d
    }
    for i in 0..revs.len() {
        depth_of(i, &revs, &index, &mut depth, &mut HashSet::new());
    }
    let mut order: Vec<usize> = (0..revs.len()).collect();
    order.sort_by_key(|i| (depth.get(i).copied().unwrap_or(0), revs[*i].key.clone()));
    let mut slots: Vec<Option<DiskMigration>> = revs.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// Folders not searched for Django apps: virtual environments, packages, VCS.
const DJANGO_SKIP: &[&str] = &[
    "node_modules",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "venv",
    "env",
    "static",
    "media",
];

fn read_django(dir: &Path) -> Result<Vec<DiskMigration>, String> {
    let mut out = vec![];
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth)) = stack.pop() {
        for path in files(&d)? {
            let name = file_name(&path);
            if !path.is_dir() || name.starts_with('.') || DJANGO_SKIP.contains(&name.as_str()) {
                continue;
            }
            if name == "migrations" && path.join("__init__.py").is_file() {
                let app = file_name(&d);
                out.extend(read_django_app(dir, &app, &path)?);
            } else if depth < 6 {
                stack.push((path, depth + 1));
            }
        }
    }
    out.sort_by(|a, b| (&a.unit, &a.key).cmp(&(&b.unit, &b.key)));
    Ok(out)
}

/// Pairs `("app", "name")` in a Django list, as `app.name`.
fn django_pairs(value: &str) -> Vec<String> {
    let s = quoted_strings(value);
    s.chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| format!("{}.{}", c[0], c[1]))
        .collect()
}

fn read_django_app(root: &Path, app: &str, dir: &Path) -> Result<Vec<DiskMigration>, String> {
    let mut out = vec![];
    for path in files(dir)? {
        let file = file_name(&path);
        let Some(stem) = file.strip_suffix(".py") else {
            continue;
        };
        if !path.is_file() || stem.starts_with('_') || stem.starts_with('~') {
            continue;
        }
        let source = read_text(&path)?;
        let mut m = unsummed(
            format!("{app}.{stem}"),
            stem.to_string(),
            path.strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned(),
        );
        m.unit = app.to_string();
        // Only the class body's assignments count; they are indented.
        let body: String = source
            .lines()
            .map(str::trim_start)
            .collect::<Vec<_>>()
            .join("\n");
        m.parents = py_assignment(&body, "dependencies")
            .map(|v| django_pairs(&v))
            .unwrap_or_default();
        if let Some(replaces) = py_assignment(&body, "replaces") {
            m.parents.extend(
                django_pairs(&replaces)
                    .into_iter()
                    .map(|r| format!("replaces:{r}")),
            );
        }
        out.push(m);
    }
    Ok(out)
}

/// Django's handling of squashed migrations against what is recorded: a squashed
/// migration whose replaced ones are all applied counts as applied; one whose
/// replaced ones are partly applied is not used (its replaced ones are); otherwise
/// it is used and the replaced ones are left out.
pub fn django_resolve_squashes(
    disk: &[DiskMigration],
    recorded: &HashSet<String>,
) -> (Vec<DiskMigration>, HashSet<String>) {
    let mut recorded = recorded.clone();
    let mut drop: HashSet<String> = HashSet::new();
    for m in disk {
        let replaced: Vec<&str> = m
            .parents
            .iter()
            .filter_map(|p| p.strip_prefix("replaces:"))
            .collect();
        if replaced.is_empty() {
            continue;
        }
        let applied = replaced.iter().filter(|r| recorded.contains(**r)).count();
        if applied == replaced.len() {
            recorded.insert(m.key.clone());
            drop.extend(replaced.iter().map(|r| r.to_string()));
        } else if applied == 0 || recorded.contains(&m.key) {
            if recorded.contains(&m.key) {
                recorded.extend(replaced.iter().map(|r| r.to_string()));
            }
            drop.extend(replaced.iter().map(|r| r.to_string()));
        } else {
            drop.insert(m.key.clone());
        }
    }
    let kept = disk
        .iter()
        .filter(|m| !drop.contains(&m.key))
        .cloned()
        .collect();
    (kept, recorded)
}

fn read_typeorm(dir: &Path) -> Result<Vec<DiskMigration>, String> {
    let mut out = vec![];
    for path in files(dir)? {
        let file = file_name(&path);
        if !path.is_file()
            || file.ends_with(".d.ts")
            || ![".ts", ".js", ".cjs", ".mjs", ".mts", ".cts"]
                .iter()
                .any(|e| file.ends_with(e))
        {
            continue;
        }
        let source = read_text(&path)?;
        let mut found = None;
        for line in source.lines() {
            let t = line.trim_start();
            // `name = "…"` inside the class wins over the class name.
            if let Some(rest) = t.strip_prefix("name")
                && let Some(v) = rest.trim_start().strip_prefix('=')
                && let Some(n) = quoted_strings(v).into_iter().next()
            {
                found = Some(n);
                break;
            }
            if let Some(i) = t.find("class ") {
                let ident: String = t[i + 6..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '$')
                    .collect();
                if found.is_none()
                    && ident.len() > 13
                    && ident
                        .get(ident.len() - 13..)
                        .is_some_and(|t| t.bytes().all(|b| b.is_ascii_digit()))
                {
                    found = Some(ident);
                }
            }
        }
        if let Some(name) = found {
            out.push(unsummed(name, String::new(), file));
        }
    }
    out.sort_by_key(|m| {
        let ts = m.key.len().saturating_sub(13);
        // `get`: a name may end in multi-byte characters.
        let stamp = m.key.get(ts..).and_then(|t| t.parse::<u64>().ok());
        (stamp.unwrap_or(0), m.key.clone())
    });
    Ok(out)
}

/// Alembic's view of a directory against `alembic_version`: what is applied (every
/// revision a current one descends from), what is pending, and each head with the
/// current revision on its branch.
pub fn alembic_heads(
    disk: &[DiskMigration],
    current: &[String],
) -> (HashSet<String>, Vec<AlembicHead>) {
    let parents: HashMap<&str, &[String]> = disk
        .iter()
        .map(|m| (m.key.as_str(), m.parents.as_slice()))
        .collect();
    let ancestors = |start: &str| {
        let mut seen: HashSet<String> = HashSet::new();
        let mut stack = vec![start.to_string()];
        while let Some(r) = stack.pop() {
            if !seen.insert(r.clone()) {
                continue;
            }
            if let Some(ps) = parents.get(r.as_str()) {
                stack.extend(ps.iter().cloned());
            }
        }
        seen
    };
    let mut applied = HashSet::new();
    for c in current {
        applied.extend(ancestors(c));
    }
    let referenced: HashSet<&str> = disk
        .iter()
        .flat_map(|m| m.parents.iter().map(String::as_str))
        .collect();
    let mut heads = vec![];
    for m in disk.iter().filter(|m| !referenced.contains(m.key.as_str())) {
        let line = ancestors(&m.key);
        let on_branch = current.iter().find(|c| line.contains(*c)).cloned();
        let labels: Vec<String> = disk
            .iter()
            .filter(|d| line.contains(&d.key) && !d.unit.is_empty())
            .map(|d| d.unit.clone())
            .collect();
        heads.push(AlembicHead {
            head: m.key.clone(),
            labels: labels.join(", "),
            current: on_branch,
            pending: line.iter().filter(|r| !applied.contains(*r)).count(),
        });
    }
    (applied, heads)
}

/// One Alembic head and where its branch is.
#[derive(Debug, Clone)]
pub struct AlembicHead {
    pub head: String,
    /// Branch labels along the branch.
    pub labels: String,
    /// The `alembic_version` row on this branch.
    pub current: Option<String>,
    /// Revisions up to this head not applied.
    pub pending: usize,
}

/// Compares what is on disk with what is recorded (in applied order; for a key
/// recorded several times the last record counts, as for Flyway repeatables).
pub fn compare(
    tool: &str,
    directory: &str,
    disk: &[DiskMigration],
    recorded: &[Recorded],
) -> Drift {
    let mut last: HashMap<&str, Option<&str>> = HashMap::new();
    let mut order: Vec<&str> = vec![];
    for r in recorded {
        if last.insert(&r.key, r.checksum.as_deref()).is_none() {
            order.push(&r.key);
        }
    }
    let on_disk: BTreeMap<&str, &DiskMigration> =
        disk.iter().map(|m| (m.key.as_str(), m)).collect();
    let mut drift = Drift {
        tool: tool.to_string(),
        directory: directory.to_string(),
        on_disk: disk.len(),
        ..Drift::default()
    };
    let mut seen = HashSet::new();
    for m in disk {
        if !seen.insert(m.key.as_str()) {
            continue;
        }
        match last.get(m.key.as_str()) {
            None => drift.pending.push(m.clone()),
            Some(Some(rec)) => {
                let rec = rec.trim().to_ascii_lowercase();
                if !rec.is_empty()
                    && !m.checksum.is_empty()
                    && rec != m.checksum
                    && !m.also_accepted.contains(&rec)
                {
                    drift.mismatched.push(Mismatch {
                        key: m.key.clone(),
                        file: m.file.clone(),
                        recorded: rec,
                        computed: m.checksum.clone(),
                    });
                }
            }
            Some(None) => {}
        }
    }
    for key in order {
        if !on_disk.contains_key(key) {
            drift.missing.push(key.to_string());
        }
    }
    drift
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typeorm_class_names_with_multibyte_characters_do_not_panic() {
        let dir = std::env::temp_dir().join(format!("dbops-typeorm-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.ts"), "export class aéééééééé {}\n").unwrap();
        std::fs::write(dir.join("b.ts"), "export class Ärger1700000000000 {}\n").unwrap();
        std::fs::write(dir.join("c.ts"), "export class Ünïcödé1234567890123 {}\n").unwrap();
        let found = read_typeorm(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let keys: Vec<&str> = found.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, ["Ünïcödé1234567890123", "Ärger1700000000000"]);
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        let mut c = Crc32::new();
        c.update(b"123456789");
        assert_eq!(c.value(), 0xCBF4_3926);
    }

    #[test]
    fn flyway_checksums_ignore_line_endings_and_the_bom() {
        let lf = flyway_checksum("CREATE TABLE a (id int);\nSELECT 1;\n");
        assert_eq!(
            lf,
            flyway_checksum("CREATE TABLE a (id int);\r\nSELECT 1;\r\n")
        );
        assert_eq!(lf, flyway_checksum("CREATE TABLE a (id int);\rSELECT 1;"));
        assert_eq!(
            lf,
            flyway_checksum("\u{feff}CREATE TABLE a (id int);\nSELECT 1;")
        );
        // Line by line, without terminators: the same as the CRC of the joined lines.
        let mut c = Crc32::new();
        c.update(b"CREATE TABLE a (id int);SELECT 1;");
        assert_eq!(lf, c.value() as i32);
        assert_ne!(lf, flyway_checksum("CREATE TABLE a (id int);\nSELECT 2;\n"));
        assert_eq!(flyway_checksum(""), 0);
    }

    #[test]
    fn flyway_versions_compare_numerically() {
        assert_eq!(flyway_version_key("1_1"), "1.1");
        assert_eq!(flyway_version_key("1.0"), "1");
        assert_eq!(flyway_version_key("001.002"), "1.2");
        assert_eq!(flyway_version_key("2024.01.15.1"), "2024.1.15.1");
    }

    #[test]
    fn prisma_accepts_either_line_ending() {
        let (lf, also) = prisma_checksums("SELECT 1;\nSELECT 2;\n");
        let (crlf, _) = prisma_checksums("SELECT 1;\r\nSELECT 2;\r\n");
        assert!(also.contains(&crlf));
        assert_eq!(lf.len(), 64);
        assert_eq!(
            prisma_checksums("hello").0,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }

    #[test]
    fn compare_finds_pending_missing_and_changed() {
        let m = |k: &str, c: &str| DiskMigration {
            key: k.into(),
            name: String::new(),
            file: format!("{k}.sql"),
            checksum: c.into(),
            also_accepted: vec![],
            unit: String::new(),
            parents: vec![],
        };
        let disk = vec![m("1", "aa"), m("2", "bb"), m("4", "dd")];
        let rec = |k: &str, c: Option<&str>| Recorded {
            key: k.into(),
            checksum: c.map(str::to_string),
        };
        let d = compare(
            "sqlx",
            "x",
            &disk,
            &[rec("1", Some("AA")), rec("2", Some("zz")), rec("3", None)],
        );
        assert_eq!(
            d.pending.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(),
            ["4"]
        );
        assert_eq!(d.missing, ["3"]);
        assert_eq!(d.mismatched.len(), 1);
        assert_eq!(d.mismatched[0].key, "2");
        assert!(!d.is_clean());
    }

    #[test]
    fn python_assignments_are_read_typed_multiline_and_as_tuples() {
        let src = "revision: str = \"ab12\"\ndown_revision: Union[str, Sequence[str], None] = (\n    \"x1\",\n    'y2',\n)\nbranch_labels = None\n";
        assert_eq!(
            quoted_strings(&py_assignment(src, "revision").unwrap()),
            ["ab12"]
        );
        assert_eq!(
            quoted_strings(&py_assignment(src, "down_revision").unwrap()),
            ["x1", "y2"]
        );
        assert!(quoted_strings(&py_assignment(src, "branch_labels").unwrap()).is_empty());
        assert_eq!(py_assignment(src, "depends_on"), None);
    }

    fn rev(key: &str, parents: &[&str]) -> DiskMigration {
        DiskMigration {
            key: key.into(),
            name: String::new(),
            file: format!("{key}.py"),
            checksum: String::new(),
            also_accepted: vec![],
            unit: String::new(),
            parents: parents.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn alembic_merges_leave_one_head_and_count_both_branches() {
        // a ← b ← m, a ← c ← m (merge), current c: b and m are pending.
        let disk = alembic_order(vec![
            rev("m", &["b", "c"]),
            rev("b", &["a"]),
            rev("c", &["a"]),
            rev("a", &[]),
        ]);
        assert_eq!(
            disk.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c", "m"]
        );
        let (applied, heads) = alembic_heads(&disk, &["c".to_string()]);
        assert_eq!(heads.len(), 1);
        assert_eq!(heads[0].head, "m");
        assert_eq!(heads[0].current.as_deref(), Some("c"));
        assert_eq!(heads[0].pending, 2);
        assert!(applied.contains("a") && applied.contains("c") && !applied.contains("b"));
    }

    #[test]
    fn django_squashed_migrations_stand_for_what_they_replace() {
        let mut squash = rev("shop.0001_squashed_0002", &[]);
        squash.parents = vec![
            "replaces:shop.0001_initial".into(),
            "replaces:shop.0002_price".into(),
        ];
        let disk = vec![
            rev("shop.0001_initial", &[]),
            rev("shop.0002_price", &[]),
            squash,
        ];
        let keys = |v: &[DiskMigration]| v.iter().map(|m| m.key.clone()).collect::<Vec<_>>();
        // All replaced applied: the squash counts as applied.
        let rec: HashSet<String> = ["shop.0001_initial", "shop.0002_price"]
            .map(String::from)
            .into();
        let (kept, applied) = django_resolve_squashes(&disk, &rec);
        assert_eq!(keys(&kept), ["shop.0001_squashed_0002"]);
        assert!(applied.contains("shop.0001_squashed_0002"));
        // Partly applied: the squash is not used.
        let rec: HashSet<String> = ["shop.0001_initial"].map(String::from).into();
        let (kept, _) = django_resolve_squashes(&disk, &rec);
        assert_eq!(keys(&kept), ["shop.0001_initial", "shop.0002_price"]);
        // Nothing applied: only the squash is pending.
        let (kept, _) = django_resolve_squashes(&disk, &HashSet::new());
        assert_eq!(keys(&kept), ["shop.0001_squashed_0002"]);
    }
}
