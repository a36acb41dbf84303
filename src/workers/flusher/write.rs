//! Writing a batch: decode each entry, insert the rows in one transaction
//! with the aggregates and balances of exactly the rows newly inserted, and
//! isolate the entries Postgres refuses.

use std::{borrow::Cow, collections::HashSet, net::IpAddr};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::value::RawValue;
use sqlx::types::ipnetwork::IpNetwork;
use uuid::Uuid;

use super::{Batch, Flusher, Written};
use crate::{
    domain::usage::{summarize, Identity},
    ledger::{
        alerts, partitions,
        usage::{self, Crossing, UsageRow},
    },
};

impl Flusher {
    /// Writes a batch to Postgres. A batch refused for its data is split
    /// until the rows at fault are isolated, and each is stored with its
    /// details set aside; any other error (Postgres unreachable, a
    /// deadlock) fails the whole call. Only an entry that cannot be decoded
    /// at all (or a row refused even bare) is left failed.
    #[tracing::instrument(name = "flusher write", level = "debug", skip_all, fields(entries = batch.len()))]
    pub async fn write(&mut self, batch: &Batch) -> anyhow::Result<Written> {
        let mut written = Written::default();
        let mut rows: Vec<(usize, UsageRow)> = Vec::with_capacity(batch.len());
        let mut seen = HashSet::with_capacity(batch.len());
        for (index, entry) in batch.entries.iter().enumerate() {
            let Some(fields) = &entry.fields else {
                // Deleted while pending: nothing left to persist.
                continue;
            };
            match decode(fields) {
                Ok(row) if seen.insert(row.id) => rows.push((index, row)),
                Ok(_) => written.duplicates += 1,
                Err(reason) => written.failed.push((index, reason)),
            }
        }
        for (_, row) in &rows {
            let month = partitions::month_of(row.created_at.date_naive());
            if !self.partitions.contains(&month) {
                partitions::ensure_month(&self.db, month).await?;
                self.partitions.insert(month);
            }
        }

        let mut parts = vec![&rows[..]];
        while let Some(part) = parts.pop() {
            if part.is_empty() {
                continue;
            }
            match self.write_rows(part).await {
                Ok(inserted) => {
                    written.inserted += inserted;
                    written.duplicates += part.len() - inserted;
                }
                Err(e) if is_data_error(&e) => match part {
                    [(index, row)] => {
                        self.write_set_aside(batch, *index, row, &e, &mut written)
                            .await?
                    }
                    _ => {
                        let (left, right) = part.split_at(part.len() / 2);
                        parts.push(right);
                        parts.push(left);
                    }
                },
                Err(e) => return Err(e.into()),
            }
        }
        Ok(written)
    }

    /// Writes a row Postgres refused with its details set aside (see
    /// [`UsageRow::with_details_set_aside`]): the charge reaches the ledger
    /// whatever came with it. Only a row refused even so is left failed.
    async fn write_set_aside(
        &self,
        batch: &Batch,
        index: usize,
        row: &UsageRow,
        refused: &sqlx::Error,
        written: &mut Written,
    ) -> sqlx::Result<()> {
        let details = batch.entries[index]
            .fields
            .iter()
            .flatten()
            .find(|(name, _)| name == "d")
            .map_or("", |(_, value)| value.as_str());
        let bare = [(
            index,
            row.with_details_set_aside(details, &refused.to_string()),
        )];
        match self.write_rows(&bare).await {
            Ok(inserted) => {
                tracing::warn!(event = %row.id, reason = %refused, "usage event stored with its details set aside");
                metrics::counter!("flusher_details_set_aside_total").increment(inserted as u64);
                written.inserted += inserted;
                written.duplicates += 1 - inserted;
                Ok(())
            }
            Err(e) if is_data_error(&e) => {
                written.failed.push((index, e.to_string()));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// One transaction: the rows, then the aggregates and balances of the
    /// rows it newly inserted. Returns how many it inserted.
    async fn write_rows(&self, rows: &[(usize, UsageRow)]) -> sqlx::Result<usize> {
        let all: Vec<&UsageRow> = rows.iter().map(|(_, row)| row).collect();
        let mut tx = self.db.begin().await?;
        let inserted_ids = usage::insert_batch(&mut tx, &all).await?;
        let inserted: Vec<&UsageRow> = all
            .into_iter()
            .filter(|row| inserted_ids.contains(&row.id))
            .collect();
        let (mut days, sightings) = summarize(inserted.iter().copied());
        for ((day, kind), firsts) in usage::record_sightings(&mut tx, &sightings).await? {
            if let Some(totals) = days.get_mut(&day) {
                match kind {
                    Identity::Session => totals.sessions += firsts,
                    Identity::Visitor => totals.visitors += firsts,
                }
            }
        }
        usage::add_to_daily(&mut tx, &days).await?;
        let firsts = usage::apply_to_balances(&mut tx, &inserted).await?;
        usage::record_set_aside(&mut tx, &inserted).await?;
        let crossed = if self.settings.record_alerts {
            alerts::record_crossings(&mut tx, &inserted).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        // Counted once committed: a batch retried after a failure counts
        // nothing twice.
        for threshold in crossed {
            metrics::counter!("usage_alerts_total", "threshold" => threshold.to_string())
                .increment(1);
        }
        for wait in firsts {
            metrics::histogram!("time_to_first_consume_seconds").record(wait);
        }
        Ok(inserted.len())
    }
}

/// Postgres refused the data itself (SQLSTATE classes 22, data exception,
/// and 23, integrity constraint violation): retrying the same rows gives
/// the same answer. Anything else may pass on a retry.
fn is_data_error(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23")))
}

/// The `d` field of an event, as [`crate::hot::charge::EventDetails`] writes it.
#[derive(serde::Deserialize)]
struct Details {
    e: Uuid,
    c: Uuid,
    a: Uuid,
    s: Option<String>,
    k: Option<Uuid>,
    m: Option<Box<RawValue>>,
}

/// The metadata fields the ledger reads (the API checked their types).
#[derive(serde::Deserialize)]
struct KnownMetadata<'a> {
    #[serde(default, borrow)]
    ip_address: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    user_agent: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    visitor_id: Option<Cow<'a, str>>,
    #[serde(default)]
    processing_time_ms: Option<f64>,
}

/// Decodes one event as `lua/consume.lua` writes it.
pub fn decode(fields: &[(String, String)]) -> Result<UsageRow, String> {
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let int = |name: &str| -> Result<i64, String> {
        get(name)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("field `{name}` is not an integer"))
    };
    let details: Details = serde_json::from_str(get("d").ok_or("field `d` is missing")?)
        .map_err(|e| format!("field `d` is not an event: {e}"))?;
    let tokens = int("t")?;
    let purchased = int("p")?;
    if tokens < 1 || tokens > i64::from(i32::MAX) || purchased < 0 || purchased > tokens {
        return Err("token counts out of range".into());
    }
    let created_at: DateTime<Utc> = Utc
        .timestamp_millis_opt(int("ts")?)
        .single()
        .ok_or("field `ts` is not a time")?;
    let metadata = details.m.unwrap_or_else(usage::empty_object);
    let known: KnownMetadata = match serde_json::from_str(metadata.get()) {
        Ok(known) => known,
        Err(e) => {
            // A charge whose metadata is not what the API accepts (an
            // older or foreign writer): stored, its details set aside.
            let row = UsageRow {
                id: details.e,
                customer_id: details.c,
                app_id: details.a,
                tokens: tokens as i32,
                purchased_tokens: purchased as i32,
                session_id: None,
                metadata: usage::empty_object(),
                ip_address: None,
                user_agent: None,
                visitor_id: None,
                processing_time_ms: None,
                embed_key_id: details.k,
                created_at,
                set_aside: None,
                crossing: get("x").and_then(crossing),
            };
            let reason = format!("metadata is not an object of the expected types: {e}");
            return Ok(row.with_details_set_aside(get("d").unwrap_or_default(), &reason));
        }
    };
    let ip_address = known
        .ip_address
        .and_then(|s| s.parse::<IpAddr>().ok())
        .map(IpNetwork::from);
    let user_agent = known.user_agent.map(Cow::into_owned);
    let visitor_id = known.visitor_id.map(Cow::into_owned);
    let processing_time_ms = known.processing_time_ms;
    Ok(UsageRow {
        id: details.e,
        customer_id: details.c,
        app_id: details.a,
        tokens: tokens as i32,
        purchased_tokens: purchased as i32,
        session_id: details.s,
        metadata,
        ip_address,
        user_agent,
        visitor_id,
        processing_time_ms,
        embed_key_id: details.k,
        created_at,
        set_aside: None,
        crossing: get("x").and_then(crossing),
    })
}

/// The `x` field, `<thresholds>|<used>|<allowance>|<start ms>|<end ms>`.
/// One that does not read is dropped: the charge is what matters.
fn crossing(x: &str) -> Option<Crossing> {
    let mut parts = x.split('|');
    let thresholds = parts
        .next()?
        .split(',')
        .map(|t| t.parse::<i16>().ok().filter(|t| (1..=100).contains(t)))
        .collect::<Option<Vec<_>>>()?;
    let mut number = || parts.next()?.parse::<i64>().ok();
    let (tokens_used, tokens_total, start, end) = (number()?, number()?, number()?, number()?);
    Some(Crossing {
        thresholds,
        tokens_used,
        tokens_total,
        period_start: Utc.timestamp_millis_opt(start).single()?,
        period_end: Utc.timestamp_millis_opt(end).single()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_event_decodes_into_a_usage_row() {
        let id = Uuid::now_v7();
        let details = format!(
            r#"{{"e":"{id}","c":"0193a000-0000-7000-8000-000000000001","a":"0193a000-0000-7000-8000-000000000002","s":"sess-1","k":null,"m":{{"ip_address":"10.0.0.1","user_agent":"UA"}}}}"#
        );
        let row = decode(&fields(&[
            ("d", &details),
            ("t", "5"),
            ("p", "2"),
            ("ts", "1764150000000"),
        ]))
        .unwrap();
        assert_eq!(row.id, id);
        assert_eq!((row.tokens, row.purchased_tokens), (5, 2));
        assert_eq!(row.session_id.as_deref(), Some("sess-1"));
        assert_eq!(row.user_agent.as_deref(), Some("UA"));
        assert!(row.ip_address.is_some());
        assert_eq!(row.embed_key_id, None);
    }

    #[test]
    fn a_malformed_event_is_refused_with_a_reason() {
        let err = decode(&fields(&[("d", "{}"), ("t", "1")])).unwrap_err();
        assert!(err.contains("`d`"), "{err}");
    }
}
