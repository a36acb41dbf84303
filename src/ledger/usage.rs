//! Usage rows: the flusher's writes, and the sums a rebuild reads.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{types::ipnetwork::IpNetwork, PgConnection};
use uuid::Uuid;

/// One usage event, as decoded from the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub app_id: Uuid,
    pub tokens: i32,
    pub purchased_tokens: i32,
    pub session_id: Option<String>,
    pub metadata: serde_json::Value,
    pub ip_address: Option<IpNetwork>,
    pub user_agent: Option<String>,
    pub embed_key_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

/// A row that this call inserted (not one already there).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InsertedRow {
    pub customer_id: Uuid,
    pub app_id: Uuid,
    pub tokens_consumed: i32,
    pub purchased_tokens_consumed: i32,
    pub created_at: DateTime<Utc>,
}

/// Inserts the rows in one statement; rows already present (a redelivered
/// event) are skipped. Returns exactly the rows newly inserted, so the
/// caller adds to balances and aggregates only once per event.
pub async fn insert_batch(
    conn: &mut PgConnection,
    rows: &[UsageRow],
) -> sqlx::Result<Vec<InsertedRow>> {
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let mut customers = Vec::with_capacity(n);
    let mut apps = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut purchased = Vec::with_capacity(n);
    let mut sessions = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    let mut ips = Vec::with_capacity(n);
    let mut agents = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    for r in rows {
        ids.push(r.id);
        customers.push(r.customer_id);
        apps.push(r.app_id);
        tokens.push(r.tokens);
        purchased.push(r.purchased_tokens);
        sessions.push(r.session_id.clone());
        metadata.push(r.metadata.clone());
        ips.push(r.ip_address);
        agents.push(r.user_agent.clone());
        keys.push(r.embed_key_id);
        times.push(r.created_at);
    }
    sqlx::query_as(
        r#"
        INSERT INTO token_usage (id, customer_id, app_id, tokens_consumed, purchased_tokens_consumed,
                                 session_id, metadata, ip_address, user_agent, embed_key_id, created_at)
        SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::int4[],
                             $6::text[], $7::jsonb[], $8::inet[], $9::text[], $10::uuid[], $11::timestamptz[])
        ON CONFLICT (id, created_at) DO NOTHING
        RETURNING customer_id, app_id, tokens_consumed, purchased_tokens_consumed, created_at
        "#,
    )
    .bind(ids)
    .bind(customers)
    .bind(apps)
    .bind(tokens)
    .bind(purchased)
    .bind(sessions)
    .bind(metadata)
    .bind(ips)
    .bind(agents)
    .bind(keys)
    .bind(times)
    .fetch_all(conn)
    .await
}

/// Keeps the balances in Postgres in step with newly inserted rows:
/// `customers.purchased_tokens_used`, `customer_billing.tokens_used` (the
/// allowance drawn in the current period) and `customer_apps.last_used_at`.
/// Should two flushers deadlock on these rows, Postgres aborts one
/// transaction; its entries stay pending and the next pass retries them.
pub async fn apply_to_balances(
    conn: &mut PgConnection,
    inserted: &[InsertedRow],
) -> sqlx::Result<()> {
    let mut purchased: BTreeMap<Uuid, i64> = BTreeMap::new();
    let mut last_used: BTreeMap<(Uuid, Uuid), DateTime<Utc>> = BTreeMap::new();
    // The allowance part of each row, with its time: only rows inside the
    // customer's current period count towards `tokens_used`.
    let (mut ids, mut amounts, mut times) = (Vec::new(), Vec::new(), Vec::new());
    for row in inserted {
        *purchased.entry(row.customer_id).or_default() += i64::from(row.purchased_tokens_consumed);
        let from_allowance = i64::from(row.tokens_consumed - row.purchased_tokens_consumed);
        if from_allowance > 0 {
            ids.push(row.customer_id);
            amounts.push(from_allowance);
            times.push(row.created_at);
        }
        let seen = last_used
            .entry((row.customer_id, row.app_id))
            .or_insert(row.created_at);
        *seen = (*seen).max(row.created_at);
    }

    let (customers, totals): (Vec<Uuid>, Vec<i64>) =
        purchased.into_iter().filter(|(_, p)| *p > 0).unzip();
    if !customers.is_empty() {
        sqlx::query(
            "UPDATE customers c SET purchased_tokens_used = c.purchased_tokens_used + d.amount \
             FROM UNNEST($1::uuid[], $2::int8[]) AS d(id, amount) WHERE c.id = d.id",
        )
        .bind(customers)
        .bind(totals)
        .execute(&mut *conn)
        .await?;
    }

    if !ids.is_empty() {
        sqlx::query(
            "UPDATE customer_billing b SET tokens_used = b.tokens_used + d.amount, \
               tokens_remaining = CASE WHEN p.tokens_per_month < 0 THEN NULL \
                                       ELSE GREATEST(p.tokens_per_month - (b.tokens_used + d.amount), 0) END, \
               updated_at = NOW() \
             FROM (SELECT u.id, SUM(u.amount)::int4 AS amount FROM UNNEST($1::uuid[], $2::int8[], $3::timestamptz[]) AS u(id, amount, at) \
                   JOIN customer_billing cb ON cb.customer_id = u.id \
                   WHERE u.at >= cb.billing_cycle_start AND u.at < cb.billing_cycle_end \
                   GROUP BY u.id ORDER BY u.id) AS d, billing_plans p \
             WHERE b.customer_id = d.id AND p.id = b.plan_id",
        )
        .bind(ids)
        .bind(amounts)
        .bind(times)
        .execute(&mut *conn)
        .await?;
    }

    if !last_used.is_empty() {
        let mut customers = Vec::with_capacity(last_used.len());
        let mut apps = Vec::with_capacity(last_used.len());
        let mut times = Vec::with_capacity(last_used.len());
        for ((c, a), t) in last_used {
            customers.push(c);
            apps.push(a);
            times.push(t);
        }
        sqlx::query(
            "UPDATE customer_apps ca SET last_used_at = GREATEST(COALESCE(ca.last_used_at, d.at), d.at) \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[]) AS d(customer_id, app_id, at) \
             WHERE ca.customer_id = d.customer_id AND ca.app_id = d.app_id",
        )
        .bind(customers)
        .bind(apps)
        .bind(times)
        .execute(conn)
        .await?;
    }
    Ok(())
}
