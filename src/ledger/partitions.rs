//! Monthly partitions of `token_usage` and `usage_daily_distinct`.
//!
//! A row whose month has no partition cannot be inserted, so partitions are
//! created ahead: `USAGE_PARTITIONS_AHEAD_MONTHS` beyond the current month,
//! at migration, at every start and daily by the scheduler. The flusher
//! also makes sure the months of each batch exist before it writes, so a
//! backlog of old events, or a scheduler that did not run, never blocks it.
//!
//! Retention drops whole partitions whose month ended before the cutoff
//! (`USAGE_RETENTION_DAYS`); the daily aggregates are never dropped.

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use sqlx::PgPool;

/// A partitioned table and the type of its partition key.
struct Parent {
    table: &'static str,
    /// How a bound is written: `token_usage` is partitioned by a timestamp,
    /// `usage_daily_distinct` by a date.
    bound: fn(NaiveDate) -> String,
}

const PARENTS: [Parent; 2] = [
    Parent {
        table: "token_usage",
        bound: |day| format!("{day} 00:00:00+00"),
    },
    Parent {
        table: "usage_daily_distinct",
        bound: |day| day.to_string(),
    },
];

/// The partition of `table` holding `month` (any day of it), e.g.
/// `token_usage_y2026m11`.
pub fn partition_name(table: &str, month: NaiveDate) -> String {
    format!("{table}_y{:04}m{:02}", month.year(), month.month())
}

/// The month a partition name stands for, if it is one of ours.
fn month_of_partition(table: &str, name: &str) -> Option<NaiveDate> {
    let rest = name.strip_prefix(table)?.strip_prefix("_y")?;
    let (year, month) = rest.split_once('m')?;
    NaiveDate::from_ymd_opt(year.parse().ok()?, month.parse().ok()?, 1)
}

/// The first day of the month of `date`.
pub fn month_of(date: NaiveDate) -> NaiveDate {
    NaiveDate::from_ymd_opt(date.year(), date.month(), 1).expect("valid first of month")
}

fn next_month(date: NaiveDate) -> NaiveDate {
    let first = month_of(date);
    if first.month() == 12 {
        NaiveDate::from_ymd_opt(first.year() + 1, 1, 1).expect("valid date")
    } else {
        NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1).expect("valid date")
    }
}

/// Creates the partitions for the month of `day` if they are missing.
#[tracing::instrument(name = "postgres partitions.ensure_month", level = "debug", skip_all)]
pub async fn ensure_month(pool: &PgPool, day: NaiveDate) -> sqlx::Result<()> {
    let from = month_of(day);
    let to = next_month(day);
    for parent in &PARENTS {
        // Bounds are dates the code formats itself, never input; DDL cannot
        // take bind parameters.
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ('{}') TO ('{}')",
            partition_name(parent.table, from),
            parent.table,
            (parent.bound)(from),
            (parent.bound)(to),
        );
        match sqlx::query(&ddl).execute(pool).await {
            Ok(_) => {}
            // Two processes creating the same partition at once: the loser
            // sees a duplicate, which is what it wanted anyway.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P07" | "23505")) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Ensures the current month and `months_ahead` after it.
#[tracing::instrument(
    name = "postgres partitions.ensure_months_ahead",
    level = "debug",
    skip_all
)]
pub async fn ensure_months_ahead(
    pool: &PgPool,
    now: DateTime<Utc>,
    months_ahead: u32,
) -> sqlx::Result<()> {
    let mut month = month_of(now.date_naive());
    for _ in 0..=months_ahead {
        ensure_month(pool, month).await?;
        month = next_month(month);
    }
    Ok(())
}

/// Drops every partition whose whole month lies before `cutoff`, and
/// returns their names. Idempotent, so replicas may run it at once.
#[tracing::instrument(name = "postgres partitions.drop_before", level = "debug", skip_all)]
pub async fn drop_before(pool: &PgPool, cutoff: NaiveDate) -> sqlx::Result<Vec<String>> {
    let mut dropped = Vec::new();
    for parent in &PARENTS {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = $1::regclass ORDER BY 1",
        )
        .bind(parent.table)
        .fetch_all(pool)
        .await?;
        for name in names {
            let Some(month) = month_of_partition(parent.table, &name) else {
                continue;
            };
            if next_month(month) <= cutoff {
                sqlx::query(&format!("DROP TABLE IF EXISTS {name}"))
                    .execute(pool)
                    .await?;
                dropped.push(name);
            }
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    #[test]
    fn partitions_are_named_by_year_and_month() {
        let d = day(2026, 12, 31);
        assert_eq!(partition_name("token_usage", d), "token_usage_y2026m12");
        assert_eq!(next_month(d), day(2027, 1, 1));
    }

    #[test]
    fn a_partition_name_gives_back_its_month() {
        assert_eq!(
            month_of_partition("token_usage", "token_usage_y2025m03"),
            Some(day(2025, 3, 1))
        );
        assert_eq!(
            month_of_partition("token_usage", "token_usage_default"),
            None
        );
        assert_eq!(
            month_of_partition("token_usage", "usage_daily_distinct_y2025m03"),
            None
        );
    }
}
