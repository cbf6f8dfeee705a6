//! Backup schedules and retention: when a target's backups run, and which good backups
//! a grandfather-father-son (GFS) policy keeps.
//!
//! Everything here is pure logic on timestamps; the scheduler loop, the SQL and the
//! deletion of artifacts live with their callers.
//!
//! # Schedules
//!
//! A [`Schedule`] is a 5-field cron expression (`minute hour day-of-month month
//! day-of-week`, or `@hourly`/`@daily`/`@weekly`/`@monthly`/`@yearly`) evaluated in a
//! [`Zone`]. [`Schedule::due_between`] gives the scheduled instant a scheduler tick
//! covers; that instant is also the idempotency key of the run, so replicas that tick
//! at the same time insert one row (unique constraint) and the run happens once.
//!
//! # Time zones and daylight saving time
//!
//! [`Zone`] is `UTC`, a fixed offset (`+02:00`) or an IANA name (`Europe/Berlin`, from
//! the tz database bundled by `chrono-tz`). Cron evaluation is written against
//! [`chrono::TimeZone`], and named zones get croner's DST rules (tested for
//! Europe/Berlin, and with a hand-written zone that follows the EU rules):
//! - skipped hour (spring forward): a job with a fixed minute and hour inside the gap
//!   (`30 2 * * *` in Berlin on the last Sunday of March) runs once, at the first
//!   valid time after the gap (03:00 CEST); wildcard/step jobs (`30 * * * *`) skip the
//!   runs that fall inside the gap.
//! - repeated hour (fall back): a fixed-time job runs once, at the first (summer
//!   time) occurrence; wildcard/step jobs run at each occurrence, i.e. twice in the
//!   repeated hour. Each occurrence is a different UTC instant, so run keys stay unique.
//!
//! # Retention
//!
//! See [`plan`] for the exact rules, including when retention pauses itself.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Days, FixedOffset, NaiveDate, NaiveDateTime, TimeZone, Utc};
use croner::Cron;
use croner::errors::CronError;
use croner::parser::{CronParser, Seconds, Year};

// ---------------------------------------------------------------------------------
// Time zones
// ---------------------------------------------------------------------------------

/// The time zone a schedule is evaluated in and retention periods are counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// Coordinated Universal Time.
    Utc,
    /// A fixed offset from UTC, without daylight saving time.
    Fixed(FixedOffset),
    /// A named IANA zone such as `Europe/Berlin`, with its daylight saving rules.
    Named(chrono_tz::Tz),
}

/// Runs `$body` with `$tz` bound to a `&impl chrono::TimeZone` for the given [`Zone`],
/// so the cron and calendar code is written once, generically.
macro_rules! in_zone {
    ($zone:expr, |$tz:ident| $body:expr) => {
        match $zone {
            Zone::Utc => {
                let $tz = &Utc;
                $body
            }
            Zone::Fixed(offset) => {
                let $tz = &offset;
                $body
            }
            Zone::Named(named) => {
                let $tz = &named;
                $body
            }
        }
    };
}

/// The largest offset in use anywhere (Kiribati is +14:00).
const MAX_OFFSET_MINUTES: i32 = 14 * 60;

impl Zone {
    /// Parses `UTC` (also `Etc/UTC`, `GMT`, `Z`) or a fixed offset such as `+02:00`,
    /// `-0530` or `+02`.
    pub fn parse(name: &str) -> Result<Zone, String> {
        let name = name.trim();
        if ["UTC", "ETC/UTC", "GMT", "ETC/GMT", "Z", "UCT"]
            .iter()
            .any(|alias| name.eq_ignore_ascii_case(alias))
        {
            return Ok(Zone::Utc);
        }
        if name.starts_with(['+', '-']) {
            let seconds = parse_offset_seconds(name).ok_or_else(|| {
                format!(
                    "time zone `{name}`: write a fixed offset as +HH:MM or -HH:MM, \
                     between -14:00 and +14:00"
                )
            })?;
            return Ok(match FixedOffset::east_opt(seconds) {
                Some(offset) if seconds != 0 => Zone::Fixed(offset),
                _ => Zone::Utc,
            });
        }
        if name.is_empty() {
            return Err("time zone is empty; use `UTC` or an offset such as `+02:00`".into());
        }
        name.parse::<chrono_tz::Tz>().map(Zone::Named).map_err(|_| {
            format!(
                "time zone `{name}` is not known; use an IANA name such as `Europe/Berlin`, \
                 `UTC`, or a fixed offset such as `+01:00`"
            )
        })
    }

    /// The local wall clock time of `t` in this zone.
    pub fn local(&self, t: DateTime<Utc>) -> NaiveDateTime {
        in_zone!(*self, |tz| t.with_timezone(tz).naive_local())
    }
}

/// `+HH:MM`, `+HHMM` or `+HH` (either sign) → seconds east of UTC.
fn parse_offset_seconds(text: &str) -> Option<i32> {
    let (sign, digits) = match text.split_at_checked(1)? {
        ("+", rest) => (1, rest),
        ("-", rest) => (-1, rest),
        _ => return None,
    };
    let (hours, minutes) = match (digits.len(), digits.split_once(':')) {
        (_, Some((h, m))) if h.len() == 2 && m.len() == 2 => (h, m),
        // Not `split_at`: the text may hold multi-byte characters (found by fuzzing).
        (4, None) => digits.split_at_checked(2)?,
        (2, None) => (digits, "00"),
        _ => return None,
    };
    if !(hours.bytes().chain(minutes.bytes())).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (hours, minutes): (i32, i32) = (hours.parse().ok()?, minutes.parse().ok()?);
    let total = hours * 60 + minutes;
    (minutes < 60 && total <= MAX_OFFSET_MINUTES).then_some(sign * total * 60)
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Zone::Utc => f.write_str("UTC"),
            Zone::Fixed(offset) => write!(f, "{offset}"),
            Zone::Named(named) => f.write_str(named.name()),
        }
    }
}

impl FromStr for Zone {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Zone::parse(s)
    }
}

// ---------------------------------------------------------------------------------
// Schedules
// ---------------------------------------------------------------------------------

/// A parsed cron schedule together with the time zone it is evaluated in.
#[derive(Debug, Clone)]
pub struct Schedule {
    expr: String,
    tz: Zone,
    cron: Cron,
}

/// One of the five cron fields, for range checks and error messages.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    allowed: &'static str,
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        allowed: "0-59",
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        allowed: "0-23",
    },
    Field {
        name: "day-of-month",
        min: 1,
        max: 31,
        allowed: "1-31",
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        allowed: "1-12 or JAN-DEC",
    },
    Field {
        name: "day-of-week",
        min: 0,
        max: 7,
        allowed: "0-7 or SUN-SAT",
    },
];

const ALIASES: [(&str, &str); 6] = [
    ("@hourly", "0 * * * *"),
    ("@daily", "0 0 * * *"),
    ("@weekly", "0 0 * * SUN"),
    ("@monthly", "0 0 1 * *"),
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
];

/// Five fields only: no seconds (backups are not that precise) and no years.
fn cron_parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
}

impl Schedule {
    /// Parses a 5-field cron expression or an `@` alias, evaluated in time zone `tz`
    /// (see [`Zone::parse`]). Errors are sentences naming the bad part, e.g.
    /// "`61 2 * * *`: minute 61 is out of range (0-59)".
    pub fn parse(expr: &str, tz: &str) -> Result<Schedule, String> {
        let expr = expr.trim();
        let tz = Zone::parse(tz)?;
        if expr.is_empty() {
            return Err(
                "the schedule is empty; write a cron expression such as `0 2 * * *`".into(),
            );
        }
        let pattern = if expr.starts_with('@') {
            ALIASES
                .iter()
                .find(|(alias, _)| expr.eq_ignore_ascii_case(alias))
                .map(|(_, pattern)| *pattern)
                .ok_or_else(|| {
                    format!(
                        "`{expr}` is not a known alias; use @hourly, @daily, @weekly, \
                         @monthly or @yearly"
                    )
                })?
        } else {
            expr
        };

        let fields: Vec<&str> = pattern.split_whitespace().collect();
        if fields.len() != 5 {
            let hint = if fields.len() == 6 {
                " (a seconds field is not supported)"
            } else {
                ""
            };
            return Err(format!(
                "`{expr}`: expected 5 fields (minute hour day-of-month month day-of-week), \
                 found {}{hint}",
                fields.len()
            ));
        }
        for (index, (text, field)) in fields.iter().zip(&FIELDS).enumerate() {
            check_field_ranges(expr, text, field)?;
            // Parse the field on its own so croner's complaint can name it.
            let mut probe = ["*"; 5];
            probe[index] = text;
            cron_parser().parse(&probe.join(" ")).map_err(|e| {
                format!(
                    "`{expr}`: {} field `{text}` is invalid ({}); allowed: {}",
                    field.name,
                    croner_reason(e),
                    field.allowed
                )
            })?;
        }
        let cron = cron_parser()
            .parse(pattern)
            .map_err(|e| format!("`{expr}`: {e}"))?;

        let schedule = Schedule {
            expr: expr.to_owned(),
            tz,
            cron,
        };
        // `0 0 30 2 *` parses but never fires; a schedule that silently never runs
        // is worse than an error. Any valid pattern fires within 28 years of 2000.
        let probe_start = DateTime::<Utc>::from_naive_utc_and_offset(
            NaiveDate::from_ymd_opt(2000, 1, 1)
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .unwrap_or_default(),
            Utc,
        );
        if schedule.next_after(probe_start).is_none() {
            return Err(format!("`{expr}` never matches a real date"));
        }
        Ok(schedule)
    }

    /// The expression as the operator wrote it (trimmed).
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The time zone the schedule is evaluated in.
    pub fn zone(&self) -> Zone {
        self.tz
    }

    /// The first scheduled instant strictly after `t`, or `None` if there is none
    /// before the year 5000.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        in_zone!(self.tz, |tz| next_after_in(&self.cron, tz, t))
    }

    /// The next `n` scheduled instants strictly after `t`, in order (for showing the
    /// upcoming runs on a page).
    pub fn next_n(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        in_zone!(self.tz, |tz| next_n_in(&self.cron, tz, t, n))
    }

    /// The latest scheduled instant in `(from, to]`, or `None` if the interval holds
    /// none.
    ///
    /// A scheduler tick calls this with its previous and current tick time; `Some(at)`
    /// means a run is due and `at` is its idempotency key. Consecutive ticks
    /// `(t0, t1]`, `(t1, t2]` cover every instant exactly once. If a tick spans several
    /// instants (the console was down), only the latest one runs: missed runs are
    /// coalesced, not replayed.
    pub fn due_between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Option<DateTime<Utc>> {
        in_zone!(self.tz, |tz| due_between_in(&self.cron, tz, from, to))
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.expr, self.tz)
    }
}

/// Refuses numbers outside a field's range with a message naming field and value.
/// Syntax errors are left to croner (reported by the caller, also naming the field).
fn check_field_ranges(expr: &str, text: &str, field: &Field) -> Result<(), String> {
    for item in text.split(',') {
        // `a-b/step`, `5#2` (nth weekday), `15W`, `5L`, `+MON`: only the values count.
        let values = item.split('/').next().unwrap_or_default();
        let values = values.trim_start_matches('+');
        let values = values.split('#').next().unwrap_or_default();
        let values = values.trim_end_matches(['L', 'l', 'W', 'w']);
        for value in values.split('-') {
            if let Ok(n) = value.parse::<u64>()
                && !(u64::from(field.min)..=u64::from(field.max)).contains(&n)
            {
                return Err(format!(
                    "`{expr}`: {} {n} is out of range ({})",
                    field.name, field.allowed
                ));
            }
        }
    }
    Ok(())
}

/// croner's message without its type prefix, e.g. "Step cannot be zero".
fn croner_reason(error: CronError) -> String {
    match error {
        CronError::IllegalCharacters(message)
        | CronError::ComponentError(message)
        | CronError::InvalidPattern(message) => message
            .replace("CronPattern contains ", "")
            .trim_end_matches('.')
            .to_owned(),
        other => other.to_string(),
    }
}

fn next_after_in<Tz: TimeZone>(cron: &Cron, tz: &Tz, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&t.with_timezone(tz), false)
        .ok()
        .map(|next| next.with_timezone(&Utc))
}

fn next_n_in<Tz: TimeZone>(cron: &Cron, tz: &Tz, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
    // Each search starts from the exact instant the previous one returned, as croner
    // asks, so both passes of a repeated hour are walked correctly.
    std::iter::successors(next_after_in(cron, tz, t), |&prev| {
        next_after_in(cron, tz, prev)
    })
    .take(n)
    .collect()
}

fn due_between_in<Tz: TimeZone>(
    cron: &Cron,
    tz: &Tz,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    if to <= from {
        return None;
    }
    let latest = cron
        .find_previous_occurrence(&to.with_timezone(tz), true)
        .ok()?
        .with_timezone(&Utc);
    (latest > from && latest <= to).then_some(latest)
}

// ---------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------

/// Why a backup is kept; the strings are shown on the backups page.
pub mod reason {
    /// The newest good backup, which retention never deletes.
    pub const NEWEST_GOOD: &str = "newest good";
    /// One of the newest `keep_last` good backups.
    pub const LAST: &str = "last";
    /// The newest good backup of one of the `daily` most recent days with a backup.
    pub const DAILY: &str = "daily";
    /// The newest good backup of one of the `weekly` most recent ISO weeks with a backup.
    pub const WEEKLY: &str = "weekly";
    /// The newest good backup of one of the `monthly` most recent months with a backup.
    pub const MONTHLY: &str = "monthly";
    /// Not covered by the policy, but kept because retention is paused
    /// (see [`super::Plan::held_back`]).
    pub const PAUSED: &str = "retention paused";
    /// Something still needs it: a person's pin, an open request, a running
    /// restore, a kept previous database (see [`crate::backups::pins`]).
    pub const PINNED: &str = "pinned";
}

/// A grandfather-father-son retention policy. See [`plan`] for the semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policy {
    /// Keep the newest this many good backups.
    pub keep_last: u32,
    /// Keep the newest good backup of each of this many most recent days.
    pub daily: u32,
    /// Keep the newest good backup of each of this many most recent ISO weeks.
    pub weekly: u32,
    /// Keep the newest good backup of each of this many most recent months.
    pub monthly: u32,
}

impl Policy {
    /// Refuses a policy that keeps nothing: with every count at zero it would delete
    /// every backup but the newest.
    pub fn validate(&self) -> Result<(), String> {
        if self.keeps_nothing() {
            return Err(
                "a retention policy must keep something: set at least one of \
                        keep last, daily, weekly or monthly above 0"
                    .into(),
            );
        }
        Ok(())
    }

    fn keeps_nothing(&self) -> bool {
        self.keep_last == 0 && self.daily == 0 && self.weekly == 0 && self.monthly == 0
    }

    /// The shortest calendar period the policy counts in, if any.
    fn finest_period(&self) -> Option<Period> {
        [
            (self.daily, Period::Day),
            (self.weekly, Period::Week),
            (self.monthly, Period::Month),
        ]
        .into_iter()
        .find(|(count, _)| *count > 0)
        .map(|(_, period)| period)
    }
}

/// A backup attempt as retention sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: i64,
    pub started_at: DateTime<Utc>,
    /// Finished, verified and listed as good. Failed and interrupted attempts hold no
    /// artifact; pass them anyway so retention can see that backups are failing, but
    /// leave out an attempt that is still running (it would count as a failure).
    pub good: bool,
    /// Something still needs it (see [`crate::backups::pins`]): never deleted.
    pub pinned: bool,
}

/// What retention would do with a set of backups.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Good backups to keep, newest first, each with why (see [`reason`]).
    pub keep: Vec<(i64, Vec<&'static str>)>,
    /// Good backups to delete, newest first. Always empty when `held_back` is set.
    pub delete: Vec<i64>,
    /// Why retention deletes nothing this time, as a sentence for the page
    /// ("retention paused: the last 3 backups failed; …").
    pub held_back: Option<String>,
}

impl Plan {
    /// The reasons a backup is kept, or `None` if it is deleted or was not good.
    pub fn reasons(&self, id: i64) -> Option<&[&'static str]> {
        self.keep
            .iter()
            .find(|(kept, _)| *kept == id)
            .map(|(_, reasons)| reasons.as_slice())
    }
}

/// A calendar period, identified by the local date it starts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Period {
    Day,
    /// ISO week, Monday to Sunday; its start date identifies (ISO year, week).
    Week,
    Month,
}

impl Period {
    fn start(self, date: NaiveDate) -> NaiveDate {
        let back = match self {
            Period::Day => 0,
            Period::Week => date.weekday().num_days_from_monday(),
            Period::Month => date.day0(),
        };
        date.checked_sub_days(Days::new(back.into()))
            .unwrap_or(date)
    }

    /// The start of the period before the one `date` lies in.
    fn previous_start(self, date: NaiveDate) -> NaiveDate {
        let start = self.start(date);
        start.pred_opt().map_or(start, |day| self.start(day))
    }

    fn previous_name(self) -> &'static str {
        match self {
            Period::Day => "yesterday",
            Period::Week => "last week",
            Period::Month => "last month",
        }
    }
}

/// Decides which good backups a policy keeps and which it deletes.
///
/// Rules, in the order they apply:
/// - Only `good` backups are planned. Failed or interrupted attempts appear in neither
///   `keep` nor `delete` (they hold no artifact; cleaning their rows is the caller's
///   business), but they do count as evidence that backups are failing.
/// - The newest good backup is always kept ([`reason::NEWEST_GOOD`]).
/// - The newest `keep_last` good backups are kept ([`reason::LAST`]).
/// - `daily`/`weekly`/`monthly` = N keeps the newest good backup of each of the N most
///   recent days / ISO weeks (Monday–Sunday) / calendar months **that contain a good
///   backup**, periods taken in `tz` (the borg/restic meaning: a gap in the history
///   does not use up a slot, so old backups are not pushed out by days without
///   backups; `now` plays no part in the counting, only in the pause check below).
///   A backup kept for several rules lists every reason.
/// - Everything else good is deleted, unless retention is paused; then every good
///   backup is kept (the otherwise-deleted ones with [`reason::PAUSED`]), `delete` is
///   empty and `held_back` says why. Retention pauses when:
///   - one or more attempts newer than the newest good backup failed (recent backups
///     are failing: never thin out the old ones meanwhile); this includes having no
///     good backup at all;
///   - the newest good backup is older than the previous period of the policy's
///     finest non-zero GFS rule (daily: it is from before yesterday, in `tz`; weekly:
///     before last ISO week; monthly: before last month), which catches backups that
///     stopped running without leaving failed rows. A `keep_last`-only policy has no
///     period, so only the first check applies;
///   - the policy keeps nothing (all zeros; [`Policy::validate`] refuses it anyway).
pub fn plan(policy: &Policy, backups: &[Candidate], now: DateTime<Utc>, tz: &Zone) -> Plan {
    plan_with(policy, backups, now, |t| tz.local(t), &tz.to_string())
}

/// [`plan`] with the time zone as a function to local time, so tests can use zones
/// this build cannot name.
fn plan_with(
    policy: &Policy,
    backups: &[Candidate],
    now: DateTime<Utc>,
    local: impl Fn(DateTime<Utc>) -> NaiveDateTime,
    zone_name: &str,
) -> Plan {
    let mut good: Vec<&Candidate> = backups.iter().filter(|b| b.good).collect();
    // Newest first; the higher id wins a tie so the order is total.
    good.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
    let dates: Vec<NaiveDate> = good.iter().map(|b| local(b.started_at).date()).collect();

    let mut reasons: Vec<Vec<&'static str>> = vec![Vec::new(); good.len()];
    if let Some(newest) = reasons.first_mut() {
        newest.push(reason::NEWEST_GOOD);
    }
    for kept in reasons.iter_mut().take(policy.keep_last as usize) {
        kept.push(reason::LAST);
    }
    for (count, period, why) in [
        (policy.daily, Period::Day, reason::DAILY),
        (policy.weekly, Period::Week, reason::WEEKLY),
        (policy.monthly, Period::Month, reason::MONTHLY),
    ] {
        // Walking newest first, the first backup met in a period is its newest.
        // A set rather than "differs from the previous" because a zone that falls
        // back across midnight can make local dates go backwards for an hour.
        let mut seen = HashSet::new();
        for (kept, date) in reasons.iter_mut().zip(&dates) {
            if seen.len() >= count as usize {
                break;
            }
            if seen.insert(period.start(*date)) {
                kept.push(why);
            }
        }
    }

    let held_back = hold_reason(
        policy,
        backups,
        good.first().copied(),
        now,
        &local,
        zone_name,
    );
    let mut result = Plan {
        held_back,
        ..Plan::default()
    };
    for (backup, mut why) in good.iter().zip(reasons) {
        if backup.pinned {
            why.push(reason::PINNED);
        }
        if why.is_empty() {
            if result.held_back.is_none() {
                result.delete.push(backup.id);
                continue;
            }
            why.push(reason::PAUSED);
        }
        result.keep.push((backup.id, why));
    }
    result
}

/// Why retention must delete nothing now, if it must (see [`plan`]).
fn hold_reason(
    policy: &Policy,
    backups: &[Candidate],
    newest_good: Option<&Candidate>,
    now: DateTime<Utc>,
    local: impl Fn(DateTime<Utc>) -> NaiveDateTime,
    zone_name: &str,
) -> Option<String> {
    const KEEPING: &str = "every good backup is kept until a new backup succeeds";
    if policy.keeps_nothing() {
        return Some(
            "retention paused: the policy keeps nothing (every count is 0); \
             every good backup is kept"
                .into(),
        );
    }
    let failed_since = backups
        .iter()
        .filter(|b| !b.good && newest_good.is_none_or(|good| b.started_at > good.started_at))
        .count();
    match (failed_since, newest_good) {
        (0, _) => {}
        (1, None) => return Some("retention paused: the only backup attempt failed".into()),
        (n, None) => {
            return Some(format!(
                "retention paused: none of the {n} backup attempts succeeded"
            ));
        }
        (1, Some(_)) => {
            return Some(format!(
                "retention paused: the last backup failed; {KEEPING}"
            ));
        }
        (n, Some(_)) => {
            return Some(format!(
                "retention paused: the last {n} backups failed; {KEEPING}"
            ));
        }
    }
    let (newest, period) = (newest_good?, policy.finest_period()?);
    let newest_local = local(newest.started_at);
    if period.start(newest_local.date()) < period.previous_start(local(now).date()) {
        return Some(format!(
            "retention paused: the newest good backup ({} {zone_name}) is from before {}; \
             backups may not be running; {KEEPING}",
            newest_local.format("%Y-%m-%d %H:%M"),
            period.previous_name(),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{MappedLocalTime, Weekday};

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn date(y: i32, mo: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, mo, d).unwrap()
    }

    fn good(id: i64, started_at: DateTime<Utc>) -> Candidate {
        Candidate {
            id,
            started_at,
            good: true,
            pinned: false,
        }
    }

    fn failed(id: i64, started_at: DateTime<Utc>) -> Candidate {
        Candidate {
            id,
            started_at,
            good: false,
            pinned: false,
        }
    }

    fn schedule(expr: &str) -> Schedule {
        Schedule::parse(expr, "UTC").unwrap()
    }

    // --- A zone with daylight saving time, for the DST tests ---------------------

    /// Central European Time with the EU rules in force since 1996 (the rules of
    /// Europe/Berlin): CEST (+02:00) from the last Sunday of March 01:00 UTC to the
    /// last Sunday of October 01:00 UTC, CET (+01:00) otherwise.
    #[derive(Debug, Clone, Copy)]
    struct EuCentral;

    fn last_sunday_0100_utc(year: i32, month: u32) -> NaiveDateTime {
        let last = NaiveDate::from_ymd_opt(year, month, 31).unwrap();
        let back = last.weekday().num_days_from_sunday();
        (last - Days::new(back.into()))
            .and_hms_opt(1, 0, 0)
            .unwrap()
    }

    impl TimeZone for EuCentral {
        type Offset = FixedOffset;

        fn from_offset(_: &FixedOffset) -> Self {
            EuCentral
        }

        fn offset_from_local_date(&self, local: &NaiveDate) -> MappedLocalTime<FixedOffset> {
            self.offset_from_local_datetime(&local.and_hms_opt(0, 0, 0).unwrap())
        }

        fn offset_from_local_datetime(
            &self,
            local: &NaiveDateTime,
        ) -> MappedLocalTime<FixedOffset> {
            // Summer time first: the earlier instant of a repeated local time.
            let valid: Vec<FixedOffset> = [2, 1]
                .into_iter()
                .map(|h| FixedOffset::east_opt(h * 3600).unwrap())
                .filter(|off| {
                    let utc = *local - chrono::TimeDelta::seconds(off.local_minus_utc().into());
                    self.offset_from_utc_datetime(&utc) == *off
                })
                .collect();
            match valid[..] {
                [] => MappedLocalTime::None,
                [one] => MappedLocalTime::Single(one),
                [earlier, later] => MappedLocalTime::Ambiguous(earlier, later),
                _ => unreachable!(),
            }
        }

        fn offset_from_utc_date(&self, utc: &NaiveDate) -> FixedOffset {
            self.offset_from_utc_datetime(&utc.and_hms_opt(0, 0, 0).unwrap())
        }

        fn offset_from_utc_datetime(&self, utc: &NaiveDateTime) -> FixedOffset {
            let summer = last_sunday_0100_utc(utc.year(), 3) <= *utc
                && *utc < last_sunday_0100_utc(utc.year(), 10);
            FixedOffset::east_opt(if summer { 7200 } else { 3600 }).unwrap()
        }
    }

    fn cron(expr: &str) -> Cron {
        // Through Schedule::parse so the same validation applies.
        schedule(expr).cron
    }

    #[test]
    fn the_test_zone_follows_the_eu_rules_of_2024() {
        assert_eq!(
            last_sunday_0100_utc(2024, 3),
            utc(2024, 3, 31, 1, 0).naive_utc()
        );
        assert_eq!(
            last_sunday_0100_utc(2024, 10),
            utc(2024, 10, 27, 1, 0).naive_utc()
        );
        let local = |t: DateTime<Utc>| t.with_timezone(&EuCentral).naive_local();
        assert_eq!(
            local(utc(2024, 1, 15, 12, 0)).to_string(),
            "2024-01-15 13:00:00"
        );
        assert_eq!(
            local(utc(2024, 7, 15, 12, 0)).to_string(),
            "2024-07-15 14:00:00"
        );
    }

    // --- Zones --------------------------------------------------------------------

    #[test]
    fn utc_and_fixed_offsets_are_accepted() {
        assert_eq!(Zone::parse("UTC"), Ok(Zone::Utc));
        assert_eq!(Zone::parse("Etc/UTC"), Ok(Zone::Utc));
        assert_eq!(Zone::parse("+00:00"), Ok(Zone::Utc));
        for (text, minutes, shown) in [
            ("+02:00", 120, "+02:00"),
            ("-0530", -330, "-05:30"),
            ("+01", 60, "+01:00"),
            ("+14:00", 840, "+14:00"),
        ] {
            let zone = Zone::parse(text).unwrap();
            assert_eq!(
                zone,
                Zone::Fixed(FixedOffset::east_opt(minutes * 60).unwrap())
            );
            assert_eq!(zone.to_string(), shown);
        }
    }

    #[test]
    fn malformed_offsets_and_unknown_zones_are_refused_with_the_name() {
        for bad in [
            "+15:00",
            "+02:60",
            "+2",
            "+02:0",
            "-ab:cd",
            "+",
            "+Gǡ\u{1a}",
            "-é12",
        ] {
            let err = Zone::parse(bad).unwrap_err();
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
        let err = Zone::parse("Mars/Olympus").unwrap_err();
        assert!(
            err.starts_with("time zone `Mars/Olympus` is not known"),
            "{err}"
        );
    }

    // --- Schedule parsing -----------------------------------------------------------

    #[test]
    fn an_out_of_range_value_is_named_with_its_field() {
        for (expr, message) in [
            (
                "61 2 * * *",
                "`61 2 * * *`: minute 61 is out of range (0-59)",
            ),
            ("0 24 * * *", "`0 24 * * *`: hour 24 is out of range (0-23)"),
            (
                "0 2 32 * *",
                "`0 2 32 * *`: day-of-month 32 is out of range (1-31)",
            ),
            (
                "0 2 0 * *",
                "`0 2 0 * *`: day-of-month 0 is out of range (1-31)",
            ),
            (
                "0 2 * 13 *",
                "`0 2 * 13 *`: month 13 is out of range (1-12 or JAN-DEC)",
            ),
            (
                "0 2 * * 1-8",
                "`0 2 * * 1-8`: day-of-week 8 is out of range (0-7 or SUN-SAT)",
            ),
            (
                "0,75 2 * * *",
                "`0,75 2 * * *`: minute 75 is out of range (0-59)",
            ),
        ] {
            assert_eq!(Schedule::parse(expr, "UTC").unwrap_err(), message);
        }
    }

    #[test]
    fn a_syntax_error_is_reported_with_its_field() {
        let err = Schedule::parse("*/x 2 * * *", "UTC").unwrap_err();
        assert!(
            err.starts_with("`*/x 2 * * *`: minute field `*/x` is invalid"),
            "{err}"
        );
        let err = Schedule::parse("0 2 * * FUNDAY", "UTC").unwrap_err();
        assert!(
            err.contains("day-of-week field `FUNDAY` is invalid"),
            "{err}"
        );
    }

    #[test]
    fn the_wrong_number_of_fields_is_refused() {
        assert_eq!(
            Schedule::parse("0 2 * *", "UTC").unwrap_err(),
            "`0 2 * *`: expected 5 fields (minute hour day-of-month month day-of-week), found 4"
        );
        let err = Schedule::parse("0 0 2 * * *", "UTC").unwrap_err();
        assert!(
            err.ends_with("found 6 (a seconds field is not supported)"),
            "{err}"
        );
        assert!(Schedule::parse("  ", "UTC").unwrap_err().contains("empty"));
    }

    #[test]
    fn a_pattern_that_never_fires_is_refused() {
        assert_eq!(
            Schedule::parse("0 0 30 2 *", "UTC").unwrap_err(),
            "`0 0 30 2 *` never matches a real date"
        );
        // February 29 does exist.
        assert!(Schedule::parse("0 0 29 2 *", "UTC").is_ok());
    }

    #[test]
    fn aliases_expand_to_their_usual_meaning() {
        let t = utc(2024, 5, 15, 10, 20); // a Wednesday
        assert_eq!(
            schedule("@hourly").next_after(t),
            Some(utc(2024, 5, 15, 11, 0))
        );
        assert_eq!(
            schedule("@daily").next_after(t),
            Some(utc(2024, 5, 16, 0, 0))
        );
        assert_eq!(
            schedule("@WEEKLY").next_after(t),
            Some(utc(2024, 5, 19, 0, 0))
        );
        assert_eq!(
            schedule("@monthly").next_after(t),
            Some(utc(2024, 6, 1, 0, 0))
        );
        assert_eq!(
            schedule("@yearly").next_after(t),
            Some(utc(2025, 1, 1, 0, 0))
        );
        assert_eq!(schedule("@daily").expr(), "@daily");
        let err = Schedule::parse("@fortnightly", "UTC").unwrap_err();
        assert!(
            err.starts_with("`@fortnightly` is not a known alias"),
            "{err}"
        );
    }

    #[test]
    fn names_steps_and_lists_are_understood() {
        let s = schedule("15 1-5/2 * * MON-FRI");
        let t = utc(2024, 5, 17, 4, 0); // Friday
        assert_eq!(
            s.next_n(t, 3),
            vec![
                utc(2024, 5, 17, 5, 15),
                utc(2024, 5, 20, 1, 15),
                utc(2024, 5, 20, 3, 15)
            ]
        );
    }

    // --- Schedule evaluation --------------------------------------------------------

    #[test]
    fn next_after_is_strictly_after_the_given_instant() {
        let s = schedule("0 2 * * *");
        assert_eq!(
            s.next_after(utc(2024, 5, 1, 1, 59)),
            Some(utc(2024, 5, 1, 2, 0))
        );
        assert_eq!(
            s.next_after(utc(2024, 5, 1, 2, 0)),
            Some(utc(2024, 5, 2, 2, 0))
        );
        let just_after = utc(2024, 5, 1, 2, 0) + chrono::TimeDelta::milliseconds(500);
        assert_eq!(s.next_after(just_after), Some(utc(2024, 5, 2, 2, 0)));
        let just_before = utc(2024, 5, 1, 2, 0) - chrono::TimeDelta::milliseconds(500);
        assert_eq!(s.next_after(just_before), Some(utc(2024, 5, 1, 2, 0)));
    }

    #[test]
    fn a_schedule_is_evaluated_in_its_zone() {
        let s = Schedule::parse("0 2 * * *", "+02:00").unwrap();
        assert_eq!(
            s.next_after(utc(2024, 5, 1, 12, 0)),
            Some(utc(2024, 5, 2, 0, 0))
        );
        assert_eq!(s.to_string(), "0 2 * * * (+02:00)");
        // Day-of-week is the local day too: Monday 00:30 at +02:00 is Sunday in UTC.
        let monday = Schedule::parse("30 0 * * MON", "+02:00").unwrap();
        assert_eq!(
            monday.next_after(utc(2024, 5, 15, 0, 0)),
            Some(utc(2024, 5, 19, 22, 30))
        );
    }

    #[test]
    fn next_n_lists_the_upcoming_runs_in_order() {
        let s = schedule("0 */6 * * *");
        assert_eq!(
            s.next_n(utc(2024, 5, 1, 5, 0), 4),
            vec![
                utc(2024, 5, 1, 6, 0),
                utc(2024, 5, 1, 12, 0),
                utc(2024, 5, 1, 18, 0),
                utc(2024, 5, 2, 0, 0)
            ]
        );
        assert!(s.next_n(utc(2024, 5, 1, 5, 0), 0).is_empty());
    }

    #[test]
    fn a_tick_that_spans_a_scheduled_instant_makes_it_due() {
        let s = schedule("0 2 * * *");
        let at = utc(2024, 5, 1, 2, 0);
        assert_eq!(
            s.due_between(utc(2024, 5, 1, 1, 59), utc(2024, 5, 1, 2, 0)),
            Some(at)
        );
        assert_eq!(
            s.due_between(utc(2024, 5, 1, 1, 59), utc(2024, 5, 1, 2, 1)),
            Some(at)
        );
        // Ticking replicas with different boundaries agree on the key.
        assert_eq!(
            s.due_between(
                utc(2024, 5, 1, 1, 59,),
                utc(2024, 5, 1, 2, 0) + chrono::TimeDelta::seconds(7)
            ),
            Some(at)
        );
    }

    #[test]
    fn a_tick_that_spans_no_scheduled_instant_runs_nothing() {
        let s = schedule("0 2 * * *");
        assert_eq!(
            s.due_between(utc(2024, 5, 1, 2, 0), utc(2024, 5, 1, 2, 1)),
            None
        );
        assert_eq!(
            s.due_between(utc(2024, 5, 1, 2, 1), utc(2024, 5, 2, 1, 59)),
            None
        );
        // An empty or reversed interval is never due.
        assert_eq!(
            s.due_between(utc(2024, 5, 1, 2, 0), utc(2024, 5, 1, 2, 0)),
            None
        );
        assert_eq!(
            s.due_between(utc(2024, 5, 1, 3, 0), utc(2024, 5, 1, 1, 0)),
            None
        );
    }

    #[test]
    fn consecutive_ticks_make_each_instant_due_exactly_once() {
        let s = schedule("*/5 * * * *");
        let start = utc(2024, 5, 1, 0, 0);
        let ticks: Vec<_> = (0..=60)
            .map(|i| start + chrono::TimeDelta::seconds(i * 37))
            .collect();
        let due: Vec<_> = ticks
            .windows(2)
            .filter_map(|w| s.due_between(w[0], w[1]))
            .collect();
        let expected: Vec<_> = (1..=7)
            .map(|i| start + chrono::TimeDelta::minutes(i * 5))
            .collect();
        assert_eq!(due, expected); // 60 ticks × 37 s = 37 min: 00:05 … 00:35
    }

    #[test]
    fn a_tick_after_downtime_runs_only_the_latest_missed_instant() {
        let s = schedule("0 * * * *");
        assert_eq!(
            s.due_between(utc(2024, 5, 1, 0, 30), utc(2024, 5, 1, 5, 10)),
            Some(utc(2024, 5, 1, 5, 0))
        );
    }

    // --- Daylight saving time (EU rules, as Europe/Berlin) ---------------------------

    #[test]
    fn a_daily_time_in_the_skipped_hour_runs_right_after_the_gap() {
        // 2024-03-31: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that day.
        let runs = next_n_in(&cron("30 2 * * *"), &EuCentral, utc(2024, 3, 29, 12, 0), 3);
        assert_eq!(
            runs,
            vec![
                utc(2024, 3, 30, 1, 30), // 02:30 CET
                utc(2024, 3, 31, 1, 0),  // 03:00 CEST, first valid time after the gap
                utc(2024, 4, 1, 0, 30),  // 02:30 CEST
            ]
        );
    }

    #[test]
    fn hourly_runs_inside_the_skipped_hour_are_dropped() {
        let runs = next_n_in(&cron("30 * * * *"), &EuCentral, utc(2024, 3, 31, 0, 0), 2);
        // 01:30 CET, then 03:30 CEST; 02:30 local never happens.
        assert_eq!(runs, vec![utc(2024, 3, 31, 0, 30), utc(2024, 3, 31, 1, 30)]);
    }

    #[test]
    fn a_daily_time_in_the_repeated_hour_runs_once() {
        // 2024-10-27: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
        let runs = next_n_in(&cron("30 2 * * *"), &EuCentral, utc(2024, 10, 26, 12, 0), 2);
        assert_eq!(
            runs,
            vec![
                utc(2024, 10, 27, 0, 30), // 02:30 CEST, the first occurrence only
                utc(2024, 10, 28, 1, 30), // 02:30 CET
            ]
        );
    }

    #[test]
    fn hourly_runs_in_the_repeated_hour_run_at_each_occurrence() {
        let c = cron("30 * * * *");
        let runs = next_n_in(&c, &EuCentral, utc(2024, 10, 26, 23, 0), 4);
        assert_eq!(
            runs,
            vec![
                utc(2024, 10, 26, 23, 30), // 01:30 CEST
                utc(2024, 10, 27, 0, 30),  // 02:30 CEST
                utc(2024, 10, 27, 1, 30),  // 02:30 CET
                utc(2024, 10, 27, 2, 30),  // 03:30 CET
            ]
        );
        // Each occurrence is its own due instant, so run keys stay unique.
        let due = |from, to| due_between_in(&c, &EuCentral, from, to);
        assert_eq!(
            due(utc(2024, 10, 27, 0, 0), utc(2024, 10, 27, 1, 0)),
            Some(runs[1])
        );
        assert_eq!(
            due(utc(2024, 10, 27, 1, 0), utc(2024, 10, 27, 2, 0)),
            Some(runs[2])
        );
    }

    // --- Policy ---------------------------------------------------------------------

    #[test]
    fn a_policy_that_keeps_nothing_is_refused() {
        assert!(
            Policy::default()
                .validate()
                .unwrap_err()
                .contains("must keep something")
        );
        for policy in [
            Policy {
                keep_last: 1,
                ..Policy::default()
            },
            Policy {
                daily: 1,
                ..Policy::default()
            },
            Policy {
                weekly: 1,
                ..Policy::default()
            },
            Policy {
                monthly: 1,
                ..Policy::default()
            },
        ] {
            assert_eq!(policy.validate(), Ok(()));
        }
    }

    #[test]
    fn a_pinned_backup_is_kept_whatever_the_policy_says() {
        let now = utc(2024, 5, 10, 12, 0);
        let mut backups: Vec<_> = (1..=5)
            .map(|d| good(d, utc(2024, 5, d as u32 + 4, 1, 0)))
            .collect();
        backups[0].pinned = true;
        let policy = Policy {
            keep_last: 2,
            ..Policy::default()
        };
        let p = plan(&policy, &backups, now, &Zone::Utc);
        assert_eq!(p.delete, vec![3, 2]);
        assert_eq!(p.reasons(1), Some(&[reason::PINNED][..]));
    }

    #[test]
    fn planning_with_a_policy_that_keeps_nothing_deletes_nothing() {
        let now = utc(2024, 5, 10, 12, 0);
        let backups: Vec<_> = (1..=5)
            .map(|d| good(d, utc(2024, 5, d as u32 + 5, 1, 0)))
            .collect();
        let p = plan(&Policy::default(), &backups, now, &Zone::Utc);
        assert!(p.delete.is_empty());
        assert_eq!(p.keep.len(), 5);
        assert!(p.held_back.unwrap().contains("the policy keeps nothing"));
    }

    // --- Retention plans ------------------------------------------------------------

    /// One good backup a day at 01:00 UTC through 2024 (a leap year): id 1 is
    /// 2024-01-01, id 366 is 2024-12-31.
    fn year_of_daily_backups() -> Vec<Candidate> {
        (1..=366)
            .map(|id| good(id, utc(2024, 1, 1, 1, 0) + Days::new(id as u64 - 1)))
            .collect()
    }

    fn id_on(backups: &[Candidate], day: NaiveDate) -> i64 {
        let mut on_day = backups.iter().filter(|b| b.started_at.date_naive() == day);
        let found = on_day.next().unwrap().id;
        assert!(on_day.next().is_none());
        found
    }

    const GFS: Policy = Policy {
        keep_last: 3,
        daily: 7,
        weekly: 4,
        monthly: 6,
    };

    #[test]
    fn a_year_of_daily_backups_keeps_the_expected_generations() {
        let backups = year_of_daily_backups();
        let now = utc(2024, 12, 31, 12, 0); // a Tuesday
        let p = plan(&GFS, &backups, now, &Zone::Utc);
        assert_eq!(p.held_back, None);

        // Worked out on a calendar:
        // last 3:  Dec 31, 30, 29
        // daily 7: Dec 31 … Dec 25
        // weekly 4 (ISO weeks, Monday–Sunday): 2025-W01 (Dec 30–Jan 5) → Dec 31,
        //   W52 (Dec 23–29) → Dec 29, W51 (Dec 16–22) → Dec 22, W50 (Dec 9–15) → Dec 15
        // monthly 6: Dec 31, Nov 30, Oct 31, Sep 30, Aug 31, Jul 31
        use reason::*;
        let expected: Vec<(NaiveDate, Vec<&str>)> = vec![
            (
                date(2024, 12, 31),
                vec![NEWEST_GOOD, LAST, DAILY, WEEKLY, MONTHLY],
            ),
            (date(2024, 12, 30), vec![LAST, DAILY]),
            (date(2024, 12, 29), vec![LAST, DAILY, WEEKLY]),
            (date(2024, 12, 28), vec![DAILY]),
            (date(2024, 12, 27), vec![DAILY]),
            (date(2024, 12, 26), vec![DAILY]),
            (date(2024, 12, 25), vec![DAILY]),
            (date(2024, 12, 22), vec![WEEKLY]),
            (date(2024, 12, 15), vec![WEEKLY]),
            (date(2024, 11, 30), vec![MONTHLY]),
            (date(2024, 10, 31), vec![MONTHLY]),
            (date(2024, 9, 30), vec![MONTHLY]),
            (date(2024, 8, 31), vec![MONTHLY]),
            (date(2024, 7, 31), vec![MONTHLY]),
        ];
        let expected: Vec<(i64, Vec<&str>)> = expected
            .into_iter()
            .map(|(day, why)| (id_on(&backups, day), why))
            .collect();
        assert_eq!(p.keep, expected);
        // Spot-check the id arithmetic independently: Dec 31 is day 366, Jul 31 day 213.
        assert_eq!(p.keep.first().map(|k| k.0), Some(366));
        assert_eq!(p.keep.last().map(|k| k.0), Some(213));

        // Everything else is deleted, newest first, and nothing is in both lists.
        assert_eq!(p.delete.len(), 366 - 14);
        let kept: HashSet<i64> = p.keep.iter().map(|k| k.0).collect();
        let deleted: Vec<i64> = (1..=366).rev().filter(|id| !kept.contains(id)).collect();
        assert_eq!(p.delete, deleted);
    }

    #[test]
    fn the_last_five_attempts_failing_pauses_retention() {
        let mut backups: Vec<_> = year_of_daily_backups().into_iter().take(361).collect();
        // Dec 27 … Dec 31 failed.
        backups.extend(
            (362..=366).map(|id| failed(id, utc(2024, 1, 1, 1, 0) + Days::new(id as u64 - 1))),
        );
        let p = plan(&GFS, &backups, utc(2024, 12, 31, 12, 0), &Zone::Utc);

        assert_eq!(
            p.held_back.as_deref(),
            Some(
                "retention paused: the last 5 backups failed; every good backup is kept \
                 until a new backup succeeds"
            )
        );
        assert!(p.delete.is_empty());
        assert_eq!(p.keep.len(), 361);
        // Failed attempts are in neither list.
        assert!((362..=366).all(|id| p.reasons(id).is_none()));
        // Kept backups still show their GFS reasons; the rest say why they survive.
        assert_eq!(
            p.reasons(361),
            Some(
                &[
                    reason::NEWEST_GOOD,
                    reason::LAST,
                    reason::DAILY,
                    reason::WEEKLY,
                    reason::MONTHLY
                ][..]
            )
        );
        assert_eq!(p.reasons(1), Some(&[reason::PAUSED][..]));
    }

    #[test]
    fn a_single_failure_pauses_retention_until_the_next_success() {
        let d = |day| utc(2024, 5, day, 1, 0);
        let policy = Policy {
            keep_last: 1,
            ..Policy::default()
        };
        let mut backups = vec![good(1, d(1)), good(2, d(2)), failed(3, d(3))];
        let p = plan(&policy, &backups, d(3), &Zone::Utc);
        assert_eq!(
            p.held_back.as_deref(),
            Some(
                "retention paused: the last backup failed; every good backup is kept until a new backup succeeds"
            )
        );
        assert!(p.delete.is_empty());

        backups.push(good(4, d(4)));
        let p = plan(&policy, &backups, d(4), &Zone::Utc);
        assert_eq!(p.held_back, None);
        assert_eq!(p.delete, vec![2, 1]);
        assert_eq!(p.keep, vec![(4, vec![reason::NEWEST_GOOD, reason::LAST])]);
    }

    #[test]
    fn backups_that_stopped_running_pause_retention() {
        // No failed rows at all, but the newest good backup is three days old.
        let backups: Vec<_> = (1..=10)
            .map(|d| good(d, utc(2024, 5, d as u32, 1, 0)))
            .collect();
        let p = plan(
            &Policy {
                daily: 3,
                ..Policy::default()
            },
            &backups,
            utc(2024, 5, 13, 9, 0),
            &Zone::Utc,
        );
        assert_eq!(
            p.held_back.as_deref(),
            Some(
                "retention paused: the newest good backup (2024-05-10 01:00 UTC) is from before \
                 yesterday; backups may not be running; every good backup is kept until a new \
                 backup succeeds"
            )
        );
        assert!(p.delete.is_empty());

        // Yesterday's backup is recent enough (today's may not have run yet).
        let p = plan(
            &Policy {
                daily: 3,
                ..Policy::default()
            },
            &backups,
            utc(2024, 5, 11, 0, 30),
            &Zone::Utc,
        );
        assert_eq!(p.held_back, None);
        assert_eq!(p.delete, vec![7, 6, 5, 4, 3, 2, 1]);

        // A weekly policy only wants a backup from this or last ISO week.
        let p = plan(
            &Policy {
                weekly: 1,
                ..Policy::default()
            },
            &backups,
            utc(2024, 5, 19, 9, 0),
            &Zone::Utc,
        );
        assert_eq!(
            p.held_back, None,
            "Sunday May 19 is in the week after May 10"
        );
        let p = plan(
            &Policy {
                weekly: 1,
                ..Policy::default()
            },
            &backups,
            utc(2024, 5, 20, 9, 0),
            &Zone::Utc,
        );
        assert!(p.held_back.unwrap().contains("is from before last week"));

        // keep_last alone has no period, so only failures pause it.
        let p = plan(
            &Policy {
                keep_last: 2,
                ..Policy::default()
            },
            &backups,
            utc(2025, 1, 1, 0, 0),
            &Zone::Utc,
        );
        assert_eq!(p.held_back, None);
        assert_eq!(p.delete.len(), 8);
    }

    #[test]
    fn no_good_backup_at_all_says_so_and_deletes_nothing() {
        let backups = vec![
            failed(1, utc(2024, 5, 1, 1, 0)),
            failed(2, utc(2024, 5, 2, 1, 0)),
        ];
        let p = plan(&GFS, &backups, utc(2024, 5, 2, 2, 0), &Zone::Utc);
        assert_eq!(
            p.held_back.as_deref(),
            Some("retention paused: none of the 2 backup attempts succeeded")
        );
        assert!(p.keep.is_empty() && p.delete.is_empty());
        let p = plan(&GFS, &backups[..1], utc(2024, 5, 2, 2, 0), &Zone::Utc);
        assert_eq!(
            p.held_back.as_deref(),
            Some("retention paused: the only backup attempt failed")
        );
        assert_eq!(
            plan(&GFS, &[], utc(2024, 5, 2, 2, 0), &Zone::Utc),
            Plan::default()
        );
    }

    #[test]
    fn a_single_backup_is_never_deleted() {
        let only = [good(7, utc(2024, 5, 1, 1, 0))];
        for policy in [
            Policy {
                keep_last: 1,
                ..Policy::default()
            },
            Policy {
                monthly: 1,
                ..Policy::default()
            },
            GFS,
            Policy::default(),
        ] {
            for now in [utc(2024, 5, 1, 2, 0), utc(2026, 1, 1, 0, 0)] {
                let p = plan(&policy, &only, now, &Zone::Utc);
                assert!(p.delete.is_empty(), "{policy:?} at {now}");
                assert_eq!(p.keep.first().map(|k| k.0), Some(7));
                assert!(p.reasons(7).unwrap().contains(&reason::NEWEST_GOOD));
            }
        }
    }

    #[test]
    fn the_newest_good_backup_survives_even_a_weekly_only_policy_on_a_busy_day() {
        // Several backups in one week: weekly keeps only the newest, which is also
        // the newest good one.
        let backups: Vec<_> = (0..4)
            .map(|h| good(h + 1, utc(2024, 5, 14, 6 * h as u32, 0)))
            .collect();
        let p = plan(
            &Policy {
                weekly: 1,
                ..Policy::default()
            },
            &backups,
            utc(2024, 5, 14, 20, 0),
            &Zone::Utc,
        );
        assert_eq!(p.keep, vec![(4, vec![reason::NEWEST_GOOD, reason::WEEKLY])]);
        assert_eq!(p.delete, vec![3, 2, 1]);
    }

    #[test]
    fn two_backups_on_the_same_day_keep_the_newer_one() {
        let backups = [
            good(1, utc(2024, 5, 1, 1, 0)),
            good(2, utc(2024, 5, 2, 1, 0)),
            good(3, utc(2024, 5, 2, 13, 0)),
        ];
        let p = plan(
            &Policy {
                daily: 2,
                ..Policy::default()
            },
            &backups,
            utc(2024, 5, 2, 14, 0),
            &Zone::Utc,
        );
        assert_eq!(
            p.keep,
            vec![
                (3, vec![reason::NEWEST_GOOD, reason::DAILY]),
                (1, vec![reason::DAILY])
            ]
        );
        assert_eq!(p.delete, vec![2]);
    }

    #[test]
    fn daily_counts_days_that_have_a_backup_not_calendar_days() {
        // Backups on May 1, 5 and 9 only: daily 2 keeps the two newest days with a
        // backup (9 and 5), not "May 8 and 9".
        let backups = [1, 5, 9].map(|d| good(d.into(), utc(2024, 5, d, 1, 0)));
        let p = plan(
            &Policy {
                daily: 2,
                ..Policy::default()
            },
            &backups,
            utc(2024, 5, 9, 12, 0),
            &Zone::Utc,
        );
        assert_eq!(p.keep.iter().map(|k| k.0).collect::<Vec<_>>(), vec![9, 5]);
        assert_eq!(p.delete, vec![1]);
    }

    #[test]
    fn iso_weeks_start_on_monday() {
        // Sunday May 12 and Monday May 13 are in different ISO weeks (19 and 20).
        assert_eq!(date(2024, 5, 12).weekday(), Weekday::Sun);
        let backups = [
            good(1, utc(2024, 5, 11, 1, 0)),
            good(2, utc(2024, 5, 12, 1, 0)),
            good(3, utc(2024, 5, 13, 1, 0)),
        ];
        let p = plan(
            &Policy {
                weekly: 2,
                ..Policy::default()
            },
            &backups,
            utc(2024, 5, 13, 2, 0),
            &Zone::Utc,
        );
        assert_eq!(p.keep.iter().map(|k| k.0).collect::<Vec<_>>(), vec![3, 2]);
        assert_eq!(p.delete, vec![1]);
    }

    #[test]
    fn a_backup_at_23_30_utc_belongs_to_the_next_day_east_of_utc() {
        let backups = [
            good(1, utc(2024, 3, 9, 12, 0)),
            good(2, utc(2024, 3, 10, 12, 0)),
            good(3, utc(2024, 3, 10, 23, 30)), // 00:30 on March 11 at +01:00
        ];
        let policy = Policy {
            daily: 2,
            ..Policy::default()
        };
        let now = utc(2024, 3, 11, 8, 0);

        // In UTC, 2 and 3 share March 10: keep 3 and March 9's backup.
        let p = plan(&policy, &backups, now, &Zone::Utc);
        assert_eq!(p.keep.iter().map(|k| k.0).collect::<Vec<_>>(), vec![3, 1]);
        assert_eq!(p.delete, vec![2]);

        // At +01:00 (Berlin in winter), 3 is March 11 and 2 is the newest of March 10.
        let p = plan(&policy, &backups, now, &Zone::parse("+01:00").unwrap());
        assert_eq!(p.keep.iter().map(|k| k.0).collect::<Vec<_>>(), vec![3, 2]);
        assert_eq!(p.delete, vec![1]);

        // Same with a zone that has DST: in summer Berlin is +02:00, so 22:30 UTC is
        // already the next day.
        let summer = [
            good(1, utc(2024, 7, 9, 12, 0)),
            good(2, utc(2024, 7, 10, 12, 0)),
            good(3, utc(2024, 7, 10, 22, 30)),
        ];
        let local = |t: DateTime<Utc>| t.with_timezone(&EuCentral).naive_local();
        let p = plan_with(
            &policy,
            &summer,
            utc(2024, 7, 11, 8, 0),
            local,
            "Europe/Berlin",
        );
        assert_eq!(p.keep.iter().map(|k| k.0).collect::<Vec<_>>(), vec![3, 2]);
        assert_eq!(p.delete, vec![1]);
    }

    #[test]
    fn months_are_counted_in_the_zone_too() {
        // 23:30 UTC on April 30 is May 1 at +02:00.
        let backups = [
            good(1, utc(2024, 4, 29, 12, 0)),
            good(2, utc(2024, 4, 30, 23, 30)),
        ];
        let policy = Policy {
            monthly: 2,
            ..Policy::default()
        };
        let now = utc(2024, 5, 1, 8, 0);
        assert_eq!(plan(&policy, &backups, now, &Zone::Utc).delete, vec![1]);
        let p = plan(&policy, &backups, now, &Zone::parse("+02:00").unwrap());
        assert!(p.delete.is_empty());
        assert_eq!(p.reasons(1), Some(&[reason::MONTHLY][..]));
    }

    #[test]
    fn input_order_and_failed_rows_do_not_change_the_plan() {
        let mut backups = year_of_daily_backups();
        let expected = plan(&GFS, &backups, utc(2024, 12, 31, 12, 0), &Zone::Utc);
        backups.reverse();
        // An old failure, before the newest good backup, does not pause anything.
        backups.push(failed(1000, utc(2024, 6, 1, 2, 0)));
        assert_eq!(
            plan(&GFS, &backups, utc(2024, 12, 31, 12, 0), &Zone::Utc),
            expected
        );
    }

    #[test]
    fn scheduler_ticks_across_dst_changes_run_exactly_the_listed_instants() {
        // What the page lists (next_n) is what a ticking scheduler runs (due_between),
        // on both DST change days, for fixed-time and wildcard jobs.
        for (start, end) in [
            (utc(2024, 3, 30, 22, 0), utc(2024, 3, 31, 4, 0)),
            (utc(2024, 10, 26, 22, 0), utc(2024, 10, 27, 4, 0)),
        ] {
            for expr in [
                "30 2 * * *",
                "0 2 * * *",
                "0 3 * * *",
                "30 * * * *",
                "*/20 1-3 * * *",
            ] {
                let c = cron(expr);
                let listed: Vec<_> = next_n_in(&c, &EuCentral, start, 200)
                    .into_iter()
                    .take_while(|t| *t <= end)
                    .collect();
                let ticks: Vec<_> = std::iter::successors(Some(start), |t| {
                    Some(*t + chrono::TimeDelta::seconds(170)).filter(|t| *t <= end)
                })
                .collect();
                let due: Vec<_> = ticks
                    .windows(2)
                    .filter_map(|w| due_between_in(&c, &EuCentral, w[0], w[1]))
                    .collect();
                assert_eq!(due, listed, "{expr} from {start}");
                assert!(!listed.is_empty());
            }
        }
    }

    // --- Named zones (chrono-tz) -----------------------------------------------------

    fn berlin(expr: &str) -> Schedule {
        Schedule::parse(expr, "Europe/Berlin").unwrap()
    }

    #[test]
    fn named_zones_parse_and_show_their_name() {
        let s = berlin("0 2 * * *");
        assert_eq!(s.zone().to_string(), "Europe/Berlin");
        assert_eq!(s.to_string(), "0 2 * * * (Europe/Berlin)");
    }

    #[test]
    fn berlin_follows_the_eu_rules_across_both_dst_changes() {
        for (start, end) in [
            (utc(2024, 3, 29, 0, 0), utc(2024, 4, 2, 0, 0)),
            (utc(2024, 10, 25, 0, 0), utc(2024, 10, 29, 0, 0)),
        ] {
            for expr in [
                "30 2 * * *",
                "0 2 * * *",
                "0 3 * * *",
                "30 * * * *",
                "*/20 1-3 * * *",
            ] {
                let s = berlin(expr);
                let named: Vec<_> = s
                    .next_n(start, 500)
                    .into_iter()
                    .take_while(|t| *t <= end)
                    .collect();
                let rules: Vec<_> = next_n_in(&cron(expr), &EuCentral, start, 500)
                    .into_iter()
                    .take_while(|t| *t <= end)
                    .collect();
                assert_eq!(named, rules, "{expr}");
                for w in named.windows(2) {
                    let mid = w[0] + (w[1] - w[0]) / 2;
                    assert_eq!(s.due_between(w[0], mid), None, "{expr}");
                    assert_eq!(s.due_between(mid, w[1]), Some(w[1]), "{expr}");
                }
            }
        }
    }

    #[test]
    fn next_n_in_berlin_across_spring_forward() {
        assert_eq!(
            berlin("30 2 * * *").next_n(utc(2024, 3, 29, 12, 0), 3),
            vec![
                utc(2024, 3, 30, 1, 30),
                utc(2024, 3, 31, 1, 0),
                utc(2024, 4, 1, 0, 30)
            ]
        );
    }

    #[test]
    fn a_backup_at_23_30_utc_is_tomorrow_in_berlin() {
        let zone = Zone::parse("Europe/Berlin").unwrap();
        let backups = [
            good(1, utc(2024, 3, 9, 12, 0)),
            good(2, utc(2024, 3, 10, 12, 0)),
            good(3, utc(2024, 3, 10, 23, 30)),
        ];
        let policy = Policy {
            daily: 2,
            ..Policy::default()
        };
        let p = plan(&policy, &backups, utc(2024, 3, 11, 8, 0), &zone);
        assert_eq!(p.keep.iter().map(|k| k.0).collect::<Vec<_>>(), vec![3, 2]);
        assert_eq!(p.delete, vec![1]);
    }
}
