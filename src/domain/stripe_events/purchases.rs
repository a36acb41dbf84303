//! Token purchases: credited once per payment intent; a refund or a
//! dispute takes back the purchase's tokens as far as they are unspent,
//! decided in Redis atomically with the consumes spending them; a dispute
//! the merchant wins gives back what it took.
//!
//! Stripe's events for one payment come in any order: a refund or a
//! dispute may come while our purchase still waits for its success (the
//! success's delivery failing and retried for hours). It is recorded on
//! the pending purchase, which then credits only what was neither
//! refunded nor held by an open dispute, so each event counts once
//! whatever the order.

use serde_json::Value;
use uuid::Uuid;

use super::{ignored, int_at, missing, str_at, Applied, Outcome};
use crate::{
    hot::{
        account::{AccountChange, Once},
        HotStore,
    },
    ledger::{billing, customers},
};

/// `payment_intent.payment_failed`: the purchase is `failed` until an
/// attempt on the same intent succeeds.
pub(super) async fn failed(tx: &mut sqlx::PgConnection, object: &Value) -> Applied {
    let pi = str_at(object, &["id"]).ok_or_else(|| missing("id"))?;
    Ok(if billing::fail_purchase(tx, pi).await? {
        (Outcome::Applied, Vec::new())
    } else {
        (Outcome::Ignored, Vec::new())
    })
}

/// `payment_intent.succeeded`: a token purchase, credited once.
pub(super) async fn succeeded(
    tx: &mut sqlx::PgConnection,
    customer: Uuid,
    object: &Value,
) -> Applied {
    let pi = str_at(object, &["id"]).ok_or_else(|| missing("id"))?;
    let tokens = str_at(object, &["metadata", "tokens"])
        .and_then(|t| t.parse::<i32>().ok())
        .filter(|t| *t > 0);
    let amount = int_at(object, &["amount_received"])
        .or_else(|| int_at(object, &["amount"]))
        .and_then(|a| i32::try_from(a).ok())
        .filter(|a| *a > 0)
        .ok_or_else(|| missing("amount"))?;
    let Some(tokens) = tokens else {
        // Not a token purchase of ours.
        return ignored();
    };
    let purchase =
        str_at(object, &["metadata", "purchase_id"]).and_then(|p| Uuid::parse_str(p).ok());
    Ok(
        match billing::complete_purchase(tx, customer, purchase, pi, tokens, amount).await? {
            Some(credited) => (
                Outcome::Applied,
                vec![AccountChange::CreditPurchased {
                    tokens: i64::from(credited),
                    once: Once::purchase(pi),
                }],
            ),
            None => (Outcome::Duplicate, Vec::new()),
        },
    )
}

/// `charge.refunded`: the refunded share of a purchase's tokens is taken
/// back, as far as it is unspent.
pub(super) async fn refunded(
    tx: &mut sqlx::PgConnection,
    hot: &HotStore,
    customer: Uuid,
    object: &Value,
) -> Applied {
    let pi = str_at(object, &["payment_intent"]).ok_or_else(|| missing("payment_intent"))?;
    let amount = int_at(object, &["amount"])
        .filter(|a| *a > 0)
        .ok_or_else(|| missing("amount"))?;
    let refunded = int_at(object, &["amount_refunded"])
        .unwrap_or(0)
        .clamp(0, amount);
    let Some(purchase) = billing::lock_purchase(tx, pi).await? else {
        return ignored();
    };
    if purchase.customer_id != customer {
        return ignored();
    }
    let share = (i64::from(purchase.tokens_purchased) * refunded / amount) as i32;
    let more = i64::from(share - purchase.tokens_refunded);
    if more <= 0 {
        return Ok((Outcome::Duplicate, Vec::new()));
    }
    if !purchase.is_credited() {
        // Its success is still to come (a delivery failing and retried
        // for hours): nothing to take back now, and the success credits
        // only what was not refunded (`complete_purchase`).
        billing::record_refund(tx, pi, share, refunded >= amount, customer, 0).await?;
        return Ok((Outcome::Applied, Vec::new()));
    }
    // The live balance decides what is unspent, atomically with the
    // consumes spending it; the ledger records exactly what was taken.
    let once = Once::refund(pi, share);
    let taken = take_unspent(tx, hot, customer, &once, more).await?;
    billing::record_refund(tx, pi, share, refunded >= amount, customer, taken).await?;
    Ok((
        Outcome::Applied,
        vec![AccountChange::TookPurchased {
            tokens: taken,
            once,
        }],
    ))
}

/// Takes back up to `tokens` of the customer's purchased tokens, once per
/// `once`, as far as they are unspent: the live balance decides,
/// atomically with the consumes spending it; without hot state, the
/// ledger's unspent balance bounds it. Returns what was taken.
async fn take_unspent(
    tx: &mut sqlx::PgConnection,
    hot: &HotStore,
    customer: Uuid,
    once: &Once,
    tokens: i64,
) -> Result<i64, crate::error::ApiError> {
    Ok(match hot.take_purchased(customer, once, tokens).await? {
        Some(taken) => taken,
        None => tokens.min(customers::purchased_balance(tx, customer).await?.max(0)),
    })
}

/// `charge.dispute.created`: the disputed share of a purchase's tokens (not
/// refunded already) is taken back as far as it is unspent, and kept
/// aside until the dispute closes.
pub(super) async fn disputed(
    tx: &mut sqlx::PgConnection,
    hot: &HotStore,
    customer: Uuid,
    object: &Value,
) -> Applied {
    let dispute = str_at(object, &["id"]).ok_or_else(|| missing("id"))?;
    let pi = str_at(object, &["payment_intent"]).ok_or_else(|| missing("payment_intent"))?;
    let amount = int_at(object, &["amount"])
        .filter(|a| *a > 0)
        .ok_or_else(|| missing("amount"))?;
    let Some(purchase) = billing::lock_purchase(tx, pi).await? else {
        return ignored();
    };
    if purchase.customer_id != customer {
        return ignored();
    }
    let share = (i64::from(purchase.tokens_purchased)
        * amount.min(i64::from(purchase.price_cents))
        / i64::from(purchase.price_cents))
    .min(i64::from(
        purchase.tokens_purchased - purchase.tokens_refunded,
    ));
    if share <= 0 || purchase.tokens_disputed > 0 {
        return Ok((Outcome::Duplicate, Vec::new()));
    }
    if !purchase.is_credited() {
        // Held back from the credit its success will make, until the
        // dispute closes.
        billing::record_dispute(tx, pi, customer, share, 0).await?;
        return Ok((Outcome::Applied, Vec::new()));
    }
    let once = Once::dispute(dispute);
    let taken = take_unspent(tx, hot, customer, &once, share).await?;
    billing::record_dispute(tx, pi, customer, taken, taken).await?;
    Ok((
        Outcome::Applied,
        vec![AccountChange::TookPurchased {
            tokens: taken,
            once,
        }],
    ))
}

/// `charge.dispute.closed`: won by the merchant (or an inquiry closed),
/// the tokens the dispute took are given back, once; lost, they stay
/// taken.
pub(super) async fn dispute_closed(
    tx: &mut sqlx::PgConnection,
    customer: Uuid,
    object: &Value,
) -> Applied {
    let dispute = str_at(object, &["id"]).ok_or_else(|| missing("id"))?;
    let pi = str_at(object, &["payment_intent"]).ok_or_else(|| missing("payment_intent"))?;
    if !matches!(str_at(object, &["status"]), Some("won" | "warning_closed")) {
        return ignored();
    }
    let Some(purchase) = billing::lock_purchase(tx, pi).await? else {
        return ignored();
    };
    if purchase.customer_id != customer || purchase.tokens_disputed == 0 {
        return Ok((Outcome::Duplicate, Vec::new()));
    }
    // Won before its success was applied: nothing was credited, so nothing
    // is given back now; the success credits the whole purchase.
    let given_back = billing::settle_dispute_won(tx, pi, customer, purchase.is_credited()).await?;
    if given_back == 0 {
        return Ok((Outcome::Applied, Vec::new()));
    }
    Ok((
        Outcome::Applied,
        vec![AccountChange::CreditPurchased {
            tokens: given_back,
            once: Once::dispute_won(dispute),
        }],
    ))
}
