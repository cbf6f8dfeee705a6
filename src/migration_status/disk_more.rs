//! Directory readers for Rails, Diesel, refinery, Liquibase, Sqitch, Atlas and
//! Graphile Migrate (the others live in [`super::disk`]). How each tool names its
//! migrations and what its table records (from the tools' sources and docs):
//! - **Rails** (`activerecord/lib/active_record/migration.rb`): `db/migrate/<version>_<name>.rb`;
//!   `schema_migrations.version` is the number as text. No checksums.
//! - **Diesel** (`diesel_migrations/src/file_based_migrations.rs`): one folder per
//!   migration holding `up.sql`; the version is the folder name up to the first
//!   `_` with its `-` removed (`2024-01-01-120000_users` → `20240101120000`), as
//!   `__diesel_schema_migrations.version` records it. No checksums.
//! - **refinery** (`refinery_core/src/runner.rs`): `V<n>__<name>.sql` (and `U<n>__`
//!   unversioned ones); the checksum is SipHash-1-3 with zero keys over the name,
//!   the version (an `i32`) and the SQL, written with Rust's `Hash` (a string's
//!   bytes then `0xff`; the integer's little-endian bytes), stored in decimal.
//! - **Liquibase**: change sets of XML (`<changeSet id=… author=…>`), YAML
//!   (`- changeSet:` with `id:` and `author:`) and formatted SQL (`--changeset
//!   author:id`) changelogs in the directory and below; `databasechangelog.id` is
//!   the change set's id. Liquibase's `md5sum` normalises each change's content in
//!   its own version-dependent way and is not recomputed; a change set counts as
//!   applied by its id (the author and file are shown).
//! - **Sqitch** (`App::Sqitch::Plan`): `sqitch.plan` lists changes in order (lines
//!   `name [deps] time planner <email> # note`; `%pragmas`, `@tags` and comments
//!   skipped); `sqitch.changes.change` is the name; `script_hash` is the SHA-1 of
//!   the deploy script `deploy/<name>.sql` as bytes.
//! - **Atlas** (`sql/migrate/dir.go`): `<version>[_<description>].sql` files and
//!   `atlas.sum`, whose lines `<file> h1:<base64>` hold each file's hash as Atlas
//!   records it in `atlas_schema_revisions.hash` (chained over the files before it,
//!   so it is read from the sum file, not recomputed).
//! - **Graphile Migrate**: `committed/<nnnnnn>[-<message>].sql`, each starting with
//!   `--! Previous:` and `--! Hash: sha1:…` headers; `graphile_migrate.migrations`
//!   records `<nnnnnn>.sql` (without the message, as `graphile-migrate status`
//!   names it too) and that hash.

use std::{
    hash::{Hash, Hasher},
    path::Path,
};

use sha1::{Digest, Sha1};

use super::disk::{DiskMigration, file_name, files, read_text, unsummed};

fn relative(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

pub(super) fn read_diesel(dir: &Path) -> Result<Vec<DiskMigration>, String> {
    let mut out = vec![];
    for path in files(dir)? {
        let folder = file_name(&path);
        if !path.is_dir() || folder.starts_with('.') || !path.join("up.sql").is_file() {
            continue;
        }
        let (version, name) = folder.split_once('_').unwrap_or((&folder, ""));
        let version = version.replace('-', "");
        if version.is_empty() {
            continue;
        }
        out.push(unsummed(
            version,
            name.replace('_', " "),
            format!("{folder}/up.sql"),
        ));
    }
    Ok(out)
}

/// refinery's checksum of one migration.
pub fn refinery_checksum(name: &str, version: i32, sql: &str) -> u64 {
    let mut h = siphasher::sip::SipHasher13::new();
    name.hash(&mut h);
    version.hash(&mut h);
    sql.hash(&mut h);
    h.finish()
}

pub(super) fn read_refinery(dir: &Path) -> Result<Vec<DiskMigration>, String> {
    let mut out = vec![];
    for path in files(dir)? {
        let file = file_name(&path);
        if !path.is_file() {
            continue;
        }
        let Some(stem) = file.strip_suffix(".sql") else {
            continue;
        };
        let Some(rest) = stem.strip_prefix('V').or_else(|| stem.strip_prefix('U')) else {
            continue;
        };
        let Some((version, name)) = rest.split_once("__") else {
            continue;
        };
        let Ok(v) = version.parse::<i32>() else {
            continue;
        };
        let sql = read_text(&path)?;
        let mut m = unsummed(v.to_string(), name.to_string(), file.clone());
        m.checksum = refinery_checksum(name, v, &sql).to_string();
        out.push(m);
    }
    Ok(out)
}

/// The value of `attr="…"` (or `'…'`) in an XML start tag.
fn xml_attr(tag: &str, attr: &str) -> Option<String> {
    let mut rest = tag;
    while let Some(i) = rest.find(attr) {
        let before = rest[..i].chars().last();
        let after = rest[i + attr.len()..].trim_start();
        rest = &rest[i + attr.len()..];
        if before.is_some_and(|c| !c.is_whitespace()) {
            continue;
        }
        let Some(after) = after.strip_prefix('=') else {
            continue;
        };
        let after = after.trim_start();
        let quote = after.chars().next()?;
        if quote != '"' && quote != '\'' {
            continue;
        }
        let value: String = after[1..].chars().take_while(|c| *c != quote).collect();
        return Some(
            value
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&"),
        );
    }
    None
}

fn liquibase_set(id: String, author: &str, file: &str) -> DiskMigration {
    unsummed(id, format!("by {author}"), file.to_string())
}

fn liquibase_xml(text: &str, file: &str, out: &mut Vec<DiskMigration>) {
    let mut rest = text;
    while let Some(i) = rest.find("<changeSet") {
        rest = &rest[i + "<changeSet".len()..];
        if !rest.starts_with(|c: char| c.is_whitespace()) {
            continue;
        }
        let tag = &rest[..rest.find('>').unwrap_or(rest.len())];
        if let Some(id) = xml_attr(tag, "id") {
            let author = xml_attr(tag, "author").unwrap_or_default();
            out.push(liquibase_set(id, &author, file));
        }
    }
}

/// A YAML scalar as written after `key:` (quotes removed).
fn yaml_scalar(v: &str) -> String {
    let v = v.trim();
    let v = match v.find(" #") {
        Some(i) if !v.starts_with(['"', '\'']) => &v[..i],
        _ => v,
    };
    v.trim().trim_matches(|c| c == '"' || c == '\'').to_string()
}

fn liquibase_yaml(text: &str, file: &str, out: &mut Vec<DiskMigration>) {
    // Each `changeSet:` mapping: its `id:` and `author:` are the first such keys
    // indented deeper than it.
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start().trim_start_matches("- ").trim_start();
        if trimmed.starts_with("changeSet:") {
            let indent = line.len() - line.trim_start().len();
            let (mut id, mut author) = (None, None);
            let mut j = i + 1;
            while j < lines.len() {
                let l = lines[j];
                let t = l.trim_start();
                if !t.is_empty() && !t.starts_with('#') {
                    let ind = l.len() - t.len();
                    if ind <= indent {
                        break;
                    }
                    let t = t.trim_start_matches("- ").trim_start();
                    if id.is_none()
                        && let Some(v) = t.strip_prefix("id:")
                    {
                        id = Some(yaml_scalar(v));
                    } else if author.is_none()
                        && let Some(v) = t.strip_prefix("author:")
                    {
                        author = Some(yaml_scalar(v));
                    }
                }
                j += 1;
            }
            if let Some(id) = id.filter(|s| !s.is_empty()) {
                out.push(liquibase_set(id, &author.unwrap_or_default(), file));
            }
            i = j;
        } else {
            i += 1;
        }
    }
}

fn liquibase_sql(text: &str, file: &str, out: &mut Vec<DiskMigration>) {
    let mut lines = text.lines();
    let formatted = lines
        .by_ref()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .is_some_and(|l| {
            l.to_ascii_lowercase()
                .replace(' ', "")
                .starts_with("--liquibaseformattedsql")
        });
    if !formatted {
        return;
    }
    for line in text.lines() {
        let l = line.trim();
        let lower = l.to_ascii_lowercase();
        let Some(rest) = lower.strip_prefix("--").map(str::trim_start) else {
            continue;
        };
        if !rest.starts_with("changeset ") {
            continue;
        }
        // The original text after "--changeset ": `author:id [attributes]`.
        let start = l.len() - rest.len() + "changeset ".len();
        let spec = l[start..].split_whitespace().next().unwrap_or("");
        if let Some((author, id)) = spec.split_once(':') {
            out.push(liquibase_set(
                id.trim_matches('"').to_string(),
                author.trim_matches('"'),
                file,
            ));
        }
    }
}

pub(super) fn read_liquibase(dir: &Path) -> Result<Vec<DiskMigration>, String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    let mut found = vec![];
    while let Some(d) = stack.pop() {
        for path in files(&d)? {
            let name = file_name(&path);
            if name.starts_with('.') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    for path in found {
        let file = relative(dir, &path);
        let lower = file.to_ascii_lowercase();
        if lower.ends_with(".xml") {
            liquibase_xml(&read_text(&path)?, &file, &mut out);
        } else if lower.ends_with(".yaml") || lower.ends_with(".yml") {
            liquibase_yaml(&read_text(&path)?, &file, &mut out);
        } else if lower.ends_with(".sql") {
            liquibase_sql(&read_text(&path)?, &file, &mut out);
        }
    }
    Ok(out)
}

pub(super) fn read_sqitch(dir: &Path) -> Result<Vec<DiskMigration>, String> {
    let plan = dir.join("sqitch.plan");
    let text = read_text(&plan)?;
    let mut out: Vec<DiskMigration> = vec![];
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with(['#', '%', '@']) {
            continue;
        }
        let name = l.split_whitespace().next().unwrap_or("");
        if name.is_empty() || name.starts_with('[') {
            continue;
        }
        // A reworked change appears again; the newest deploy script is deploy/name.sql.
        if out.iter().any(|m| m.key == name) {
            continue;
        }
        let script = dir.join("deploy").join(format!("{name}.sql"));
        let mut m = unsummed(
            name.to_string(),
            String::new(),
            format!("deploy/{name}.sql"),
        );
        if let Ok(bytes) = std::fs::read(&script) {
            m.checksum = hex::encode(Sha1::digest(&bytes));
        }
        out.push(m);
    }
    Ok(out)
}

/// Atlas' hash of a file as `atlas_schema_revisions.hash` holds it (the base64
/// text after `h1:`); compared case-blind, as every checksum here is.
fn atlas_hash(h: &str) -> String {
    h.trim().trim_start_matches("h1:").to_ascii_lowercase()
}

pub(super) fn read_atlas(dir: &Path) -> Result<Vec<DiskMigration>, String> {
    let sums: Vec<(String, String)> = match std::fs::read_to_string(dir.join("atlas.sum")) {
        Ok(text) => text
            .lines()
            .skip(1)
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(f, h)| (f.to_string(), atlas_hash(h)))
            .collect(),
        Err(_) => vec![],
    };
    let mut out = vec![];
    for path in files(dir)? {
        let file = file_name(&path);
        if !path.is_file() {
            continue;
        }
        let Some(stem) = file.strip_suffix(".sql") else {
            continue;
        };
        let (version, name) = stem.split_once('_').unwrap_or((stem, ""));
        if version.is_empty() || version.starts_with('.') {
            continue;
        }
        let mut m = unsummed(version.to_string(), name.replace('_', " "), file.clone());
        if let Some((_, h)) = sums.iter().find(|(f, _)| *f == file) {
            m.checksum = h.clone();
        }
        out.push(m);
    }
    Ok(out)
}

pub(super) fn read_graphile(dir: &Path) -> Result<Vec<DiskMigration>, String> {
    let committed = dir.join("committed");
    let root = if committed.is_dir() {
        committed
    } else {
        dir.to_path_buf()
    };
    let mut out = vec![];
    for path in files(&root)? {
        let file = file_name(&path);
        if !path.is_file()
            || !file.ends_with(".sql")
            || !file.starts_with(|c: char| c.is_ascii_digit())
        {
            continue;
        }
        let text = read_text(&path)?;
        let hash = text
            .lines()
            .take_while(|l| l.starts_with("--!"))
            .find_map(|l| l.strip_prefix("--! Hash:"))
            .map(|h| h.trim().to_ascii_lowercase())
            .unwrap_or_default();
        // `000002-add-posts.sql` is recorded (and listed by `graphile-migrate
        // status`) as `000002.sql`.
        let stem = file.trim_end_matches(".sql");
        let (number, name) = stem.split_once('-').unwrap_or((stem, ""));
        let mut m = unsummed(
            format!("{number}.sql"),
            name.replace('-', " "),
            relative(dir, &path),
        );
        m.checksum = hash;
        out.push(m);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refinery_checksum_is_siphash13_over_name_version_and_sql() {
        // What refinery computes, written out by hand: Hash writes a str's bytes
        // then 0xff, and an i32's four little-endian bytes.
        let mut h = siphasher::sip::SipHasher13::new();
        h.write(b"init");
        h.write_u8(0xff);
        h.write(&1i32.to_le_bytes());
        h.write(b"SELECT 1;");
        h.write_u8(0xff);
        assert_eq!(refinery_checksum("init", 1, "SELECT 1;"), h.finish());
        assert_ne!(
            refinery_checksum("init", 1, "SELECT 1;"),
            refinery_checksum("init", 2, "SELECT 1;")
        );
    }

    #[test]
    fn liquibase_change_sets_are_read_from_xml_yaml_and_formatted_sql() {
        let mut out = vec![];
        liquibase_xml(
            r#"<databaseChangeLog><changeSet author="ann" id="1-create">x</changeSet>
               <changeSet  id='2' author="bob"/><changeSetX id="no"/></databaseChangeLog>"#,
            "a.xml",
            &mut out,
        );
        liquibase_yaml(
            "databaseChangeLog:\n  - changeSet:\n      id: 3\n      author: cy # who\n      changes:\n        - sql:\n            sql: select 1\n  - changeSet:\n      author: dee\n      id: \"4-x\"\n",
            "b.yaml",
            &mut out,
        );
        liquibase_sql(
            "-- liquibase formatted sql\n\n--changeset eve:5 runOnChange:true\nCREATE TABLE t (id int);\n-- changeset fay:6-y\nSELECT 1;\n",
            "c.sql",
            &mut out,
        );
        liquibase_sql("--changeset gus:7\nSELECT 1;\n", "plain.sql", &mut out);
        let got: Vec<(&str, &str)> = out
            .iter()
            .map(|m| (m.key.as_str(), m.name.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("1-create", "by ann"),
                ("2", "by bob"),
                ("3", "by cy"),
                ("4-x", "by dee"),
                ("5", "by eve"),
                ("6-y", "by fay"),
            ]
        );
    }
}
