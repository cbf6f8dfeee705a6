//! The report pages of a PostgreSQL target: the list of reports with when each
//! was taken, one report (its facts and sections: filtered, sorted and paged on
//! the server, CSV export), the refresh buttons (background jobs), the operator
//! maintenance buttons (ANALYZE / VACUUM as jobs) and the exact-bloat button.
//! Destructive maintenance links to the approval form of its action.
//!
//! Over 600 lines: the report pages render every report kind through one generic
//! table view (cells, row buttons, sorting, paging, CSV) that would otherwise be
//! split across near-identical handlers.

use std::sync::Arc;

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Form,
    extract::{Path, Query, State},
    http::header,
    response::{IntoResponse, Redirect, Response},
};
use serde::Deserialize;
use serde_json::{Value, json};
use tower_sessions::Session;

use super::{Layout, chart, flash, fmt};
use crate::{
    app::AppState,
    audit::{self, AuditCtx, Entry},
    auth::CurrentUser,
    config::TargetKind,
    error::{AppError, AppResult},
    jobs,
    reports::{
        Kind, Report, RowActions, Section, bloat,
        maintenance::{Command, Params},
        snapshot::{self, Snapshot, View},
    },
    targets::Target,
};

/// Rows per page of a section.
pub const PER_PAGE: i64 = 50;

fn pg_target(state: &AppState, name: &str) -> AppResult<Arc<Target>> {
    let target = state.targets.get(name).ok_or(AppError::NotFound)?;
    if target.kind() != TargetKind::Postgres {
        return Err(AppError::bad_request(format!(
            "{name} is a Redis server; reports are about PostgreSQL targets."
        )));
    }
    Ok(target)
}

fn report_of(name: &str) -> AppResult<Report> {
    Report::parse(name).ok_or(AppError::NotFound)
}

fn enc(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

fn parse_time(v: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// A value as the page shows it.
fn cell(kind: Kind, v: Option<&Value>) -> (String, &'static str) {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return (String::new(), "");
    };
    let num = v.as_f64();
    match kind {
        Kind::Bytes => (num.map(|n| fmt::bytes(n as i64)).unwrap_or_default(), "num"),
        Kind::Count => (num.map(|n| fmt::count(n as i64)).unwrap_or_default(), "num"),
        Kind::Pct => (num.map(|n| format!("{n:.1}%")).unwrap_or_default(), "num"),
        Kind::Ms => (
            num.map(|n| {
                if n >= 1000.0 {
                    format!("{:.2} s", n / 1000.0)
                } else {
                    format!("{n:.2} ms")
                }
            })
            .unwrap_or_default(),
            "num",
        ),
        Kind::Secs => (num.map(|n| format!("{n:.2} s")).unwrap_or_default(), "num"),
        Kind::Time => (
            parse_time(v)
                .map(|t| fmt::time(&t))
                .unwrap_or_else(|| v.as_str().unwrap_or("").to_string()),
            "time",
        ),
        Kind::Bool => (
            if v.as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            }
            .into(),
            "",
        ),
        Kind::Code => (
            v.as_str().map(str::to_string).unwrap_or(v.to_string()),
            "code",
        ),
        Kind::Status => (
            v.as_str().map(str::to_string).unwrap_or(v.to_string()),
            "status",
        ),
        Kind::Text => (v.as_str().map(str::to_string).unwrap_or(v.to_string()), ""),
    }
}

/// The CSS class of a status word.
fn status_class(s: &str) -> &'static str {
    match s {
        "ok" | "fresh" | "active" => "ok",
        "warn" | "stale" | "being built" | "inactive" => "warn",
        "danger" | "invalid" | "inactive, retaining WAL" => "danger",
        _ => "unknown",
    }
}

/// One cell, ready for the template.
pub struct CellView {
    pub text: String,
    pub class: String,
    /// The whole text when `text` was cut (long SQL).
    pub full: Option<String>,
}

/// Buttons of a row.
pub struct RowButtons {
    pub schema: String,
    pub name: String,
    /// Link to the approval form of VACUUM FULL / REINDEX / DROP INDEX.
    pub vacuum_full: Option<String>,
    pub reindex: Option<String>,
    pub drop: Option<String>,
    /// Operator forms (ANALYZE / VACUUM / VACUUM ANALYZE) for tables.
    pub table: bool,
    /// `table`, `approx` or `index` when pgstattuple can measure it.
    pub exact: Vec<(&'static str, &'static str)>,
}

pub struct RowView {
    pub cells: Vec<CellView>,
    pub buttons: Option<RowButtons>,
}

pub struct ColumnView {
    pub label: &'static str,
    pub href: String,
    /// `▲` / `▼` on the sorted column.
    pub arrow: &'static str,
    pub num: bool,
}

pub struct SectionView {
    pub key: &'static str,
    pub title: &'static str,
    pub meaning: &'static str,
    pub columns: Vec<ColumnView>,
    pub rows: Vec<RowView>,
    pub total: i64,
    pub matching: i64,
    pub page: i64,
    pub pages: i64,
    pub prev: Option<String>,
    pub next: Option<String>,
    pub filter: String,
    pub sort: String,
    pub dir: String,
    pub csv: String,
    pub error: Option<String>,
    /// Whether the rows have buttons.
    pub actions: bool,
}

/// The query string of a report page: which section the parameters apply to,
/// its filter, order and page.
#[derive(Debug, Default, Deserialize)]
pub struct ReportQuery {
    #[serde(default)]
    pub s: String,
    #[serde(default)]
    pub q: String,
    #[serde(default)]
    pub sort: String,
    #[serde(default)]
    pub dir: String,
    #[serde(default)]
    pub page: Option<i64>,
    /// A finished exact-bloat job to show.
    #[serde(default)]
    pub exact: Option<i64>,
}

impl ReportQuery {
    fn view_for(&self, section: &Section) -> View {
        let mine = self.s == section.key;
        View {
            filter: if mine {
                self.q.chars().take(200).collect()
            } else {
                String::new()
            },
            sort: if mine {
                self.sort.clone()
            } else {
                String::new()
            },
            asc: mine && self.dir == "asc",
            page: if mine {
                self.page.unwrap_or(1).max(1)
            } else {
                1
            },
            per_page: PER_PAGE,
        }
    }
}

const SHORT: usize = 140;

#[allow(clippy::too_many_arguments)]
async fn section_view(
    state: &AppState,
    target: &str,
    report: Report,
    snap: &Snapshot,
    section: &'static Section,
    q: &ReportQuery,
    pgstattuple: bool,
) -> AppResult<SectionView> {
    let view = q.view_for(section);
    let (rows, matching) = snapshot::rows(&state.db, snap.id, section, &view).await?;
    let base = format!("/targets/{target}/reports/{}", report.as_str());
    let sorted = view.sort_key(section);
    let link = |sort: &str, dir: &str, page: i64| {
        format!(
            "{base}?{}#{}",
            enc(&[
                ("s", section.key),
                ("q", &view.filter),
                ("sort", sort),
                ("dir", dir),
                ("page", &page.to_string()),
            ]),
            section.key
        )
    };
    let columns = section
        .columns
        .iter()
        .map(|c| {
            let current = sorted == Some(c.key);
            let default = sorted.is_none() && c.key == section.default_sort;
            let now_asc = if current {
                view.asc
            } else {
                default && section.default_asc
            };
            // Clicking the sorted column turns it around; another starts descending
            // for numbers, ascending for names.
            let dir = if current || default {
                if now_asc { "desc" } else { "asc" }
            } else if matches!(c.kind, Kind::Code | Kind::Text | Kind::Status) {
                "asc"
            } else {
                "desc"
            };
            ColumnView {
                label: c.label,
                href: link(c.key, dir, 1),
                arrow: match (current || default, now_asc) {
                    (false, _) => "",
                    (true, true) => "▲",
                    (true, false) => "▼",
                },
                num: matches!(
                    c.kind,
                    Kind::Bytes | Kind::Count | Kind::Pct | Kind::Ms | Kind::Secs
                ),
            }
        })
        .collect();
    let sort_param = sorted.unwrap_or("");
    let dir_param = if view.asc { "asc" } else { "desc" };
    let pages = ((matching + PER_PAGE - 1) / PER_PAGE).max(1);
    let rows = rows
        .iter()
        .map(|r| RowView {
            cells: section
                .columns
                .iter()
                .map(|c| {
                    let (text, class) = cell(c.kind, r.get(c.key));
                    let class = if c.kind == Kind::Status {
                        format!("status {}", status_class(&text))
                    } else {
                        class.to_string()
                    };
                    let cut = text.chars().count() > SHORT;
                    CellView {
                        full: cut.then(|| text.clone()),
                        text: if cut {
                            format!("{}…", text.chars().take(SHORT).collect::<String>())
                        } else {
                            text
                        },
                        class,
                    }
                })
                .collect(),
            buttons: buttons(target, report, section, r, pgstattuple),
        })
        .collect();
    Ok(SectionView {
        key: section.key,
        title: section.title,
        meaning: section.meaning,
        columns,
        rows,
        total: snap.count(section.key),
        matching,
        page: view.page,
        pages,
        prev: (view.page > 1).then(|| link(sort_param, dir_param, view.page - 1)),
        next: (view.page < pages).then(|| link(sort_param, dir_param, view.page + 1)),
        csv: format!(
            "{base}/export.csv?{}",
            enc(&[
                ("s", section.key),
                ("q", &view.filter),
                ("sort", sort_param),
                ("dir", dir_param)
            ])
        ),
        filter: view.filter,
        sort: sort_param.to_string(),
        dir: dir_param.to_string(),
        error: snap.error(section.key),
        actions: section.actions != RowActions::None,
    })
}

fn buttons(
    target: &str,
    report: Report,
    section: &Section,
    r: &Value,
    pgstattuple: bool,
) -> Option<RowButtons> {
    let schema = r.get("schema")?.as_str()?.to_string();
    let name = r.get("name")?.as_str()?.to_string();
    let action = |kind: &str, field: &str| {
        format!(
            "/targets/{target}/actions/{kind}?{}",
            enc(&[("schema", &schema), (field, &name)])
        )
    };
    let bloat = report == Report::Bloat && pgstattuple;
    match section.actions {
        RowActions::None => None,
        RowActions::Table => Some(RowButtons {
            vacuum_full: Some(action(Command::VacuumFull.kind(), "table")),
            reindex: None,
            drop: None,
            table: true,
            exact: if bloat {
                vec![
                    ("approx", "Measure (pgstattuple_approx)"),
                    (
                        "table",
                        "Measure exactly (pgstattuple, reads the whole table)",
                    ),
                ]
            } else {
                vec![]
            },
            schema,
            name,
        }),
        RowActions::Index | RowActions::IndexDrop => Some(RowButtons {
            vacuum_full: None,
            reindex: Some(action(Command::Reindex.kind(), "index")),
            drop: Some(action(Command::DropIndex.kind(), "index")),
            table: false,
            exact: if bloat {
                vec![("index", "Measure exactly (pgstatindex)")]
            } else {
                vec![]
            },
            schema,
            name,
        }),
    }
}

/// A fact line: label, value, and a class (`problem` for bad news).
pub struct Fact {
    pub label: String,
    pub value: String,
    pub class: &'static str,
}

fn fact(label: &str, value: impl Into<String>) -> Fact {
    Fact {
        label: label.into(),
        value: value.into(),
        class: "",
    }
}

fn facts_of(report: Report, snap: &Snapshot) -> Vec<Fact> {
    let mut out = vec![];
    let f = |k: &str| snap.fact(k);
    if f("in_recovery").and_then(Value::as_bool) == Some(true) {
        out.push(fact(
            "Server",
            "a standby (replica): statistics are the replica's own",
        ));
    }
    let since = |out: &mut Vec<Fact>| {
        let started = f("server_started").and_then(parse_time);
        match f("stats_reset").and_then(parse_time) {
            Some(t) => out.push(fact(
                "Statistics since",
                format!("{} ({}, last reset)", fmt::time(&t), fmt::ago(&t)),
            )),
            None => out.push(fact(
                "Statistics since",
                format!(
                    "never reset — counting since the database's statistics began{}",
                    started
                        .map(|s| format!(
                            " (server running since {}, {})",
                            fmt::time(&s),
                            fmt::ago(&s)
                        ))
                        .unwrap_or_default()
                ),
            )),
        }
    };
    match report {
        Report::Space => {
            if let Some(b) = f("database_bytes").and_then(Value::as_i64) {
                out.push(fact(
                    &format!("Database {}", snap.database.clone().unwrap_or_default()),
                    fmt::bytes(b),
                ));
            }
            if let Some(n) = f("relations").and_then(Value::as_i64) {
                out.push(fact(
                    "Tables measured",
                    format!(
                        "{} ({} in all)",
                        fmt::count(n),
                        fmt::bytes(f("relations_bytes").and_then(Value::as_i64).unwrap_or(0))
                    ),
                ));
            }
        }
        Report::Bloat => {
            if let Some(n) = f("tables_unknown")
                .and_then(Value::as_i64)
                .filter(|n| *n > 0)
            {
                out.push(Fact {
                    label: "Estimate unknown".into(),
                    value: format!(
                        "{} table{} — run ANALYZE on them (statistics missing or stale), then refresh",
                        fmt::count(n),
                        if n == 1 { "" } else { "s" }
                    ),
                    class: "warn",
                });
            }
            out.push(match f("pgstattuple").and_then(Value::as_str) {
                Some(s) => fact(
                    "Exact figures",
                    format!("pgstattuple is installed (schema {s}): use Measure on a row"),
                ),
                None => fact(
                    "Exact figures",
                    "pgstattuple is not installed in this database (CREATE EXTENSION pgstattuple; to measure one relation exactly)",
                ),
            });
        }
        Report::Indexes => since(&mut out),
        Report::Health => {
            let pct = |k: &str| {
                f(k).and_then(Value::as_f64)
                    .map(|p| format!("{p:.2}%"))
                    .unwrap_or_else(|| "no reads yet".into())
            };
            let low = |k: &str| {
                if f(k).and_then(Value::as_f64).is_some_and(|p| p < 99.0) {
                    "warn"
                } else {
                    ""
                }
            };
            out.push(Fact {
                label: "Cache hit ratio, tables".into(),
                value: pct("cache_hit_tables"),
                class: low("cache_hit_tables"),
            });
            out.push(Fact {
                label: "Cache hit ratio, indexes".into(),
                value: pct("cache_hit_indexes"),
                class: low("cache_hit_indexes"),
            });
            out.push(fact(
                "What the ratio means",
                "the share of reads served from shared buffers; below about 99% on a busy OLTP database, the working set may not fit in memory (shared_buffers, RAM) or queries read more than they need",
            ));
            if let Some(n) = f("sequences_checked").and_then(Value::as_i64) {
                out.push(fact("Sequences checked", fmt::count(n)));
            }
            if let Some(l) = f("replay_delay_s").and_then(Value::as_f64) {
                out.push(fact(
                    "Replica delay",
                    format!("{l:.1} s since the last replayed transaction"),
                ));
            }
            since(&mut out);
        }
        Report::Statements => {
            if f("installed").and_then(Value::as_bool) == Some(true)
                && let Some(t) = f("stats_reset").and_then(parse_time)
            {
                out.push(fact(
                    "Counting since",
                    format!("{} ({})", fmt::time(&t), fmt::ago(&t)),
                ));
            }
        }
    }
    if let Some(note) = f("note").and_then(Value::as_str) {
        out.push(Fact {
            label: "Note".into(),
            value: note.to_string(),
            class: "warn",
        });
    }
    out
}

/// A report's line on the index page.
pub struct ReportLine {
    pub key: &'static str,
    pub title: &'static str,
    pub summary: &'static str,
    pub taken: String,
    pub ago: String,
    pub took: String,
    pub running: Option<i64>,
    pub problems: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "reports/index.html")]
pub struct ReportsIndexPage {
    layout: Layout,
    target: String,
    policy: &'static str,
    flash: Option<flash::Flash>,
    lines: Vec<ReportLine>,
}

/// A job of this kind still queued or running on this target.
async fn running(state: &AppState, kind: &str, target: &str) -> AppResult<Option<i64>> {
    Ok(jobs::latest(&state.db, kind, target)
        .await?
        .filter(|j| j.is_active())
        .map(|j| j.id))
}

/// `GET /targets/{target}/reports`
#[tracing::instrument(skip(state, user, session))]
pub async fn list_reports(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    Path(name): Path<String>,
) -> AppResult<ReportsIndexPage> {
    let target = pg_target(&state, &name)?;
    let snaps = snapshot::latest_all(&state.db, &name).await?;
    let mut lines = vec![];
    for r in Report::ALL {
        let snap = snaps.iter().find(|s| s.report == r.as_str());
        let mut problems = vec![];
        if let Some(s) = snap {
            for sec in r.sections() {
                let n = s.count(sec.key);
                if n > 0 && matches!(sec.key, "unused" | "duplicate" | "invalid" | "sequences") {
                    problems.push(format!("{}: {}", sec.title, fmt::count(n)));
                }
            }
            let skipped = s.skipped().len();
            if skipped > 0 {
                problems.push(if skipped == 1 {
                    "1 relation skipped".to_string()
                } else {
                    format!("{skipped} relations skipped")
                });
            }
        }
        lines.push(ReportLine {
            key: r.as_str(),
            title: r.title(),
            summary: r.summary(),
            taken: snap.map(|s| fmt::time(&s.taken_at)).unwrap_or_default(),
            ago: snap.map(|s| fmt::ago(&s.taken_at)).unwrap_or_default(),
            took: snap
                .map(|s| format!("{:.1} s", s.duration_ms as f64 / 1000.0))
                .unwrap_or_default(),
            running: running(&state, r.job_kind(), &name).await?,
            problems: problems.join(", "),
        });
    }
    Ok(ReportsIndexPage {
        flash: flash::take(&session).await,
        policy: target.policy().as_str(),
        layout: Layout::load(&state, user, "overview").await?,
        target: name,
        lines,
    })
}

/// A finished exact measurement, shown on the bloat page.
pub struct ExactView {
    pub job_id: i64,
    pub relation: String,
    pub status: String,
    pub error: String,
    pub lines: Vec<(String, String)>,
}

#[derive(Template, WebTemplate)]
#[template(path = "reports/show.html")]
pub struct ReportPage {
    layout: Layout,
    target: String,
    policy: &'static str,
    report: &'static str,
    title: &'static str,
    summary: &'static str,
    flash: Option<flash::Flash>,
    snapshot: Option<Snapshot>,
    taken: String,
    taken_ago: String,
    took: String,
    running: Option<i64>,
    facts: Vec<Fact>,
    skipped: Vec<crate::reports::Skipped>,
    sections: Vec<SectionView>,
    chart: String,
    exact: Option<ExactView>,
    reset_href: String,
}

fn exact_view(job: &jobs::Job) -> ExactView {
    let p = &job.params;
    let relation = format!(
        "{}.{}",
        p["schema"].as_str().unwrap_or(""),
        p["name"].as_str().unwrap_or("")
    );
    let mut lines = vec![];
    if let Some(Value::Object(m)) = &job.result {
        for (k, v) in m {
            if k == "schema" || k == "name" {
                continue;
            }
            let text = match (k.as_str(), v) {
                (k, Value::Number(n))
                    if k.ends_with("_len")
                        || k.ends_with("_space")
                        || k.ends_with("_size")
                        || k == "bloat_bytes" =>
                {
                    fmt::bytes(n.as_f64().unwrap_or(0.0) as i64)
                }
                (k, Value::Number(n))
                    if k.ends_with("percent")
                        || k.ends_with("_pct")
                        || k.ends_with("density")
                        || k.ends_with("fragmentation") =>
                {
                    format!("{:.2}%", n.as_f64().unwrap_or(0.0))
                }
                (_, Value::String(s)) => s.clone(),
                (_, other) => other.to_string(),
            };
            lines.push((k.clone(), text));
        }
    }
    ExactView {
        job_id: job.id,
        relation,
        status: job.status.clone(),
        error: job.error.clone().unwrap_or_default(),
        lines,
    }
}

/// `GET /targets/{target}/reports/{report}`
#[tracing::instrument(skip(state, user, session, q))]
pub async fn show_report(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    Path((name, report)): Path<(String, String)>,
    Query(q): Query<ReportQuery>,
) -> AppResult<ReportPage> {
    let target = pg_target(&state, &name)?;
    let report = report_of(&report)?;
    let snap = snapshot::latest(&state.db, &name, report).await?;
    let mut sections = vec![];
    let mut facts = vec![];
    if let Some(s) = &snap {
        let pgstattuple = s.fact("pgstattuple").is_some();
        for sec in report.sections() {
            sections.push(section_view(&state, &name, report, s, sec, &q, pgstattuple).await?);
        }
        facts = facts_of(report, s);
    }
    let chart = if report == Report::Space {
        let points: Vec<(String, f64)> = snapshot::size_history(&state.db, &name)
            .await?
            .into_iter()
            .map(|(t, b)| (t.format("%m-%d %H:%M").to_string(), b as f64))
            .collect();
        chart::line("Database size", &points, |v| fmt::bytes(v as i64))
    } else {
        String::new()
    };
    let exact = match q.exact {
        Some(id) if report == Report::Bloat => jobs::find(&state.db, id)
            .await?
            .filter(|j| j.kind == "pg.report.exact" && j.target == name)
            .map(|j| exact_view(&j)),
        _ => None,
    };
    Ok(ReportPage {
        policy: target.policy().as_str(),
        report: report.as_str(),
        title: report.title(),
        summary: report.summary(),
        flash: flash::take(&session).await,
        taken: snap
            .as_ref()
            .map(|s| fmt::time(&s.taken_at))
            .unwrap_or_default(),
        taken_ago: snap
            .as_ref()
            .map(|s| fmt::ago(&s.taken_at))
            .unwrap_or_default(),
        took: snap
            .as_ref()
            .map(|s| format!("{:.1} s", s.duration_ms as f64 / 1000.0))
            .unwrap_or_default(),
        running: running(&state, report.job_kind(), &name).await?,
        skipped: snap.as_ref().map(Snapshot::skipped).unwrap_or_default(),
        snapshot: snap,
        facts,
        sections,
        chart,
        exact,
        reset_href: format!("/targets/{name}/actions/pg.stat_statements.reset"),
        layout: Layout::load(&state, user, "overview").await?,
        target: name,
    })
}

/// Quotes a CSV field when needed.
fn csv_field(s: &str) -> String {
    // A leading = + - @ would make a spreadsheet evaluate the cell.
    let s = if s.starts_with(['=', '+', '-', '@']) && s.parse::<f64>().is_err() {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// `GET /targets/{target}/reports/{report}/export.csv?s=section`: every row of
/// the section (filtered and ordered as on the page), raw values.
#[tracing::instrument(skip(state, q))]
pub async fn export_report(
    State(state): State<AppState>,
    Path((name, report)): Path<(String, String)>,
    Query(q): Query<ReportQuery>,
) -> AppResult<Response> {
    pg_target(&state, &name)?;
    let report = report_of(&report)?;
    let section = report
        .section(&q.s)
        .or_else(|| report.sections().first())
        .ok_or(AppError::NotFound)?;
    let snap = snapshot::latest(&state.db, &name, report)
        .await?
        .ok_or_else(|| {
            AppError::bad_request("This report has not been computed yet: refresh it first.")
        })?;
    let mut q = q;
    q.s = section.key.to_string();
    let rows = snapshot::all_rows(&state.db, snap.id, section, &q.view_for(section)).await?;
    let mut out = String::new();
    out.push_str(
        &section
            .columns
            .iter()
            .map(|c| csv_field(c.key))
            .collect::<Vec<_>>()
            .join(","),
    );
    out.push_str("\r\n");
    for r in rows {
        let line: Vec<String> = section
            .columns
            .iter()
            .map(|c| match r.get(c.key) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => csv_field(s),
                Some(other) => csv_field(&other.to_string()),
            })
            .collect();
        out.push_str(&line.join(","));
        out.push_str("\r\n");
    }
    let file = format!(
        "dbops-{name}-{}-{}-{}.csv",
        report.as_str(),
        section.key,
        snap.taken_at.format("%Y%m%d-%H%M%S")
    );
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file}\""),
            ),
        ],
        out,
    )
        .into_response())
}

/// `POST /targets/{target}/reports/{report}/refresh`: computes it in the
/// background; the job page shows progress and links back here.
#[tracing::instrument(skip(state, ctx, session))]
pub async fn refresh_report(
    State(state): State<AppState>,
    ctx: AuditCtx,
    session: Session,
    Path((name, report)): Path<(String, String)>,
) -> AppResult<Redirect> {
    pg_target(&state, &name)?;
    let report = report_of(&report)?;
    if let Some(id) = running(&state, report.job_kind(), &name).await? {
        flash::ok(
            &session,
            format!("This report is already being computed (job #{id})."),
        )
        .await;
        return Ok(Redirect::to(&format!("/jobs/{id}")));
    }
    let id = jobs::submit(&state, &ctx, report.job_kind(), &name, json!({})).await?;
    Ok(Redirect::to(&format!("/jobs/{id}")))
}

/// `POST /targets/{target}/reports`: refreshes every report.
#[tracing::instrument(skip(state, ctx, session))]
pub async fn refresh_all_reports(
    State(state): State<AppState>,
    ctx: AuditCtx,
    session: Session,
    Path(name): Path<String>,
) -> AppResult<Redirect> {
    pg_target(&state, &name)?;
    let mut started = vec![];
    for r in Report::ALL {
        if running(&state, r.job_kind(), &name).await?.is_none() {
            started.push(jobs::submit(&state, &ctx, r.job_kind(), &name, json!({})).await?);
        }
    }
    flash::ok(
        &session,
        if started.is_empty() {
            "Every report is already being computed.".to_string()
        } else {
            format!(
                "Computing {} report{} in the background (jobs {}). This page shows each one when it is done.",
                started.len(),
                if started.len() == 1 { "" } else { "s" },
                started.iter().map(|i| format!("#{i}")).collect::<Vec<_>>().join(", ")
            )
        },
    )
    .await;
    Ok(Redirect::to(&format!("/targets/{name}/reports")))
}

/// The form of the maintenance buttons.
#[derive(Debug, Deserialize)]
pub struct RelationForm {
    #[serde(default)]
    schema: String,
    #[serde(default)]
    table: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    what: String,
}

/// `POST /targets/{target}/maintenance/{command}`: ANALYZE, VACUUM or VACUUM
/// ANALYZE of one table, as a job (operator; logged). The gated commands are
/// refused here: they go through their approval form.
#[tracing::instrument(skip(state, ctx, form))]
pub async fn run_maintenance(
    State(state): State<AppState>,
    ctx: AuditCtx,
    Path((name, command)): Path<(String, String)>,
    Form(form): Form<RelationForm>,
) -> AppResult<Response> {
    pg_target(&state, &name)?;
    let cmd = match command.as_str() {
        "analyze" => Command::Analyze,
        "vacuum" => Command::Vacuum,
        "vacuum_analyze" => Command::VacuumAnalyze,
        "vacuum_full" | "reindex" | "drop_index" => {
            let kind = match command.as_str() {
                "vacuum_full" => Command::VacuumFull.kind(),
                "reindex" => Command::Reindex.kind(),
                _ => Command::DropIndex.kind(),
            };
            audit::record(
                &state.db,
                &ctx,
                Entry::new("pg.maintenance")
                    .target(name.clone())
                    .params(
                        json!({ "command": command, "schema": form.schema, "table": form.table }),
                    )
                    .denied("this command needs an approval request"),
            )
            .await?;
            return Err(AppError::Forbidden(format!(
                "{command} is a destructive action: ask for it through its approval form (/targets/{name}/actions/{kind})."
            )));
        }
        _ => return Err(AppError::NotFound),
    };
    let mut fields = std::collections::BTreeMap::new();
    fields.insert("schema".to_string(), form.schema.clone());
    fields.insert("table".to_string(), form.table.clone());
    let params = match Params::parse(cmd, &fields) {
        Ok(p) => p,
        Err(msg) => {
            audit::record(
                &state.db,
                &ctx,
                Entry::new(cmd.kind())
                    .target(name.clone())
                    .params(json!({ "schema": form.schema, "table": form.table }))
                    .failed(msg.clone()),
            )
            .await?;
            return Err(AppError::bad_request(msg));
        }
    };
    let id = jobs::submit(&state, &ctx, cmd.kind(), &name, params.to_json(cmd)).await?;
    Ok(Redirect::to(&format!("/jobs/{id}")).into_response())
}

/// `POST /targets/{target}/reports/{report}/exact`: measures one relation with
/// pgstattuple as a job; the bloat page shows the result.
#[tracing::instrument(skip(state, ctx, form))]
pub async fn measure_exact(
    State(state): State<AppState>,
    ctx: AuditCtx,
    Path((name, report)): Path<(String, String)>,
    Form(form): Form<RelationForm>,
) -> AppResult<Redirect> {
    pg_target(&state, &name)?;
    if report_of(&report)? != Report::Bloat {
        return Err(AppError::NotFound);
    }
    let what = bloat::Exact::parse(&form.what);
    let checked = what
        .ok_or_else(|| "“what” must be table, approx or index.".to_string())
        .and_then(|w| {
            let schema = crate::reports::check_name("schema", &form.schema)?;
            let rel = if form.name.is_empty() {
                &form.table
            } else {
                &form.name
            };
            let rel = crate::reports::check_name("name", rel)?;
            Ok((w, schema, rel))
        });
    let (what, schema, rel) = match checked {
        Ok(v) => v,
        Err(msg) => {
            audit::record(
                &state.db,
                &ctx,
                Entry::new("pg.report.exact")
                    .target(name.clone())
                    .params(json!({ "schema": form.schema, "name": form.name, "what": form.what }))
                    .failed(msg.clone()),
            )
            .await?;
            return Err(AppError::bad_request(msg));
        }
    };
    let id = jobs::submit(
        &state,
        &ctx,
        "pg.report.exact",
        &name,
        json!({ "what": what.as_str(), "schema": schema, "name": rel }),
    )
    .await?;
    Ok(Redirect::to(&format!("/jobs/{id}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("-12.5"), "-12.5");
    }

    #[test]
    fn cells_are_formatted_by_kind() {
        assert_eq!(cell(Kind::Bytes, Some(&json!(1536))).0, "1.5 KiB");
        assert_eq!(cell(Kind::Pct, Some(&json!(93.25))).0, "93.2%");
        assert_eq!(cell(Kind::Count, None).0, "");
        assert_eq!(cell(Kind::Ms, Some(&json!(2500.0))).0, "2.50 s");
    }
}
