//! Monthly partitions of `token_usage`.
//!
//! A row whose month has no partition cannot be inserted, so partitions are
//! created ahead: `USAGE_PARTITIONS_AHEAD_MONTHS` beyond the current month,
//! at migration, at every start and daily by the scheduler. The flusher
//! also makes sure the months of each batch exist before it writes, so a
//! backlog of old events, or a scheduler that did not run, never blocks it.

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use sqlx::PgPool;

/// The partition holding `month` (any day of it), e.g. `token_usage_y2026m11`.
pub fn partition_name(month: NaiveDate) -> String {
    format!("token_usage_y{:04}m{:02}", month.year(), month.month())
}

/// The first day of the month of `date`.
pub fn month_of(date: NaiveDate) -> NaiveDate {
    first_of_month(date)
}

fn first_of_month(date: NaiveDate) -> NaiveDate {
    NaiveDate::from_ymd_opt(date.year(), date.month(), 1).expect("valid first of month")
}

fn next_month(date: NaiveDate) -> NaiveDate {
    let first = first_of_month(date);
    if first.month() == 12 {
        NaiveDate::from_ymd_opt(first.year() + 1, 1, 1).expect("valid date")
    } else {
        NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1).expect("valid date")
    }
}

/// Creates the partition for the month of `day` if it is missing.
pub async fn ensure_month(pool: &PgPool, day: NaiveDate) -> sqlx::Result<()> {
    let from = first_of_month(day);
    let to = next_month(day);
    // Bounds are dates the code formats itself, never input; DDL cannot
    // take bind parameters.
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {} PARTITION OF token_usage \
         FOR VALUES FROM ('{from} 00:00:00+00') TO ('{to} 00:00:00+00')",
        partition_name(from)
    );
    match sqlx::query(&ddl).execute(pool).await {
        Ok(_) => Ok(()),
        // Two processes creating the same partition at once: the loser sees
        // a duplicate, which is what it wanted anyway.
        Err(sqlx::Error::Database(e)) if matches!(e.code().as_deref(), Some("42P07" | "23505")) => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Ensures the current month and `months_ahead` after it.
pub async fn ensure_months_ahead(
    pool: &PgPool,
    now: DateTime<Utc>,
    months_ahead: u32,
) -> sqlx::Result<()> {
    let mut month = first_of_month(now.date_naive());
    for _ in 0..=months_ahead {
        ensure_month(pool, month).await?;
        month = next_month(month);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_named_by_year_and_month() {
        let d = NaiveDate::from_ymd_opt(2026, 12, 31).unwrap();
        assert_eq!(partition_name(d), "token_usage_y2026m12");
        assert_eq!(next_month(d), NaiveDate::from_ymd_opt(2027, 1, 1).unwrap());
    }
}
