//! Cron schedules in a time zone: when a target's backups run.
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

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeZone, Utc};
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
    pub(super) cron: Cron,
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
pub(super) fn cron_parser() -> CronParser {
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

pub(super) fn next_after_in<Tz: TimeZone>(
    cron: &Cron,
    tz: &Tz,
    t: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&t.with_timezone(tz), false)
        .ok()
        .map(|next| next.with_timezone(&Utc))
}

pub(super) fn next_n_in<Tz: TimeZone>(
    cron: &Cron,
    tz: &Tz,
    t: DateTime<Utc>,
    n: usize,
) -> Vec<DateTime<Utc>> {
    // Each search starts from the exact instant the previous one returned, as croner
    // asks, so both passes of a repeated hour are walked correctly.
    std::iter::successors(next_after_in(cron, tz, t), |&prev| {
        next_after_in(cron, tz, prev)
    })
    .take(n)
    .collect()
}

pub(super) fn due_between_in<Tz: TimeZone>(
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
