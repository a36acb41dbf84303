//! The stand-in's test clock, as Stripe's test clocks offer: short
//! periods that renew as time passes, the events Stripe would send for
//! everything that happens (kept in an outbox for the test to deliver
//! late, twice, out of order or never), payments for token purchases with
//! their refunds and disputes, and calls that fail.
//!
//! With no clock on (`StandIn::start` alone), none of this runs: the
//! stand-in answers calls and sends no event, as before.
//!
//! The billing simulation (`tests/simulation.rs`) drives all of it; the
//! API suite shares the stand-in and uses a part.
#![allow(dead_code)]

use std::collections::VecDeque;

use chrono::Utc;
use serde_json::{json, Value};

use crate::stripe_standin::{fixture, sequence, StandIn, World};

/// How a call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Stripe answers 500 and does nothing.
    Refuse,
    /// Stripe does the work and the reply is lost: the caller sees a 500.
    LoseReply,
}

pub(crate) struct Clock {
    /// Every new subscription's period, in seconds.
    period_secs: i64,
    /// Events not delivered yet, oldest first.
    outbox: Vec<Value>,
    /// How the next writing calls fail, in order.
    failures: VecDeque<Failure>,
}

fn now() -> i64 {
    Utc::now().timestamp()
}

/// Queues the event Stripe sends for `object`, created now.
pub(crate) fn emit(world: &mut World, kind: &str, object: &Value) {
    emit_at(world, kind, object, now());
}

fn emit_at(world: &mut World, kind: &str, object: &Value, created: i64) {
    if world.clock.is_none() {
        return;
    }
    let id = world.id("evt");
    let event = json!({"id": id, "object": "event", "type": kind, "created": created,
                       "data": {"object": object}});
    if let Some(clock) = world.clock.as_mut() {
        clock.outbox.push(event);
    }
}

/// A subscription just made: on the clock's period, its creation and its
/// first invoice's payment queued as events.
pub(crate) fn created(world: &mut World, mut sub: Value) -> Value {
    let Some(period) = world.clock.as_ref().map(|c| c.period_secs) else {
        return sub;
    };
    let start = sub["items"]["data"][0]["current_period_start"]
        .as_i64()
        .unwrap_or_else(now);
    sub["items"]["data"][0]["current_period_end"] = json!(start + period);
    emit(world, "customer.subscription.created", &sub);
    let invoice = invoice(world, &sub, start, start + period);
    emit(world, "invoice.paid", &invoice);
    sub
}

/// Whether the next writing call is refused outright.
pub(crate) fn fails_before(world: &mut World) -> bool {
    let Some(clock) = world.clock.as_mut() else {
        return false;
    };
    if clock.failures.front() == Some(&Failure::Refuse) {
        clock.failures.pop_front();
        return true;
    }
    false
}

/// The reply to a writing call, lost when a failure says so.
pub(crate) fn after(world: &mut World, method: &str, status: u16, reply: Value) -> (u16, Value) {
    let Some(clock) = world.clock.as_mut() else {
        return (status, reply);
    };
    if method != "GET" && clock.failures.front() == Some(&Failure::LoseReply) {
        clock.failures.pop_front();
        return (
            500,
            json!({"error": {"type": "api_error", "message": "an error occurred"}}),
        );
    }
    (status, reply)
}

fn card_error(code: &str, message: &str) -> (u16, Value) {
    (
        402,
        json!({"error": {"type": "card_error", "code": code, "decline_code": "generic_decline",
                          "message": message}}),
    )
}

/// `POST /v1/payment_intents`: a token purchase confirmed at once with
/// the card. A decline is Stripe's 402; a card that needs 3-D Secure
/// leaves the intent waiting for the customer ([`StandIn::confirm`]).
pub(crate) fn pay(
    world: &mut World,
    params: &std::collections::HashMap<String, String>,
) -> (u16, Value) {
    let card = params.get("payment_method").cloned().unwrap_or_default();
    if card == "pm_card_chargeDeclined" {
        return card_error("card_declined", "Your card was declined.");
    }
    let Some(amount) = params.get("amount").and_then(|a| a.parse::<i64>().ok()) else {
        return (
            400,
            json!({"error": {"type": "invalid_request_error", "message": "Invalid integer: amount"}}),
        );
    };
    let waits = card == "pm_card_authenticationRequired";
    let id = world.id("pi");
    let metadata: serde_json::Map<String, Value> = params
        .iter()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("metadata[")?.strip_suffix(']')?;
            Some((key.to_owned(), json!(v)))
        })
        .collect();
    let mut pi = fixture("payment_intent");
    pi["id"] = json!(id);
    pi["client_secret"] = json!(format!("{id}_secret_1"));
    pi["status"] = json!(if waits {
        "requires_action"
    } else {
        "succeeded"
    });
    pi["amount"] = json!(amount);
    pi["amount_received"] = json!(if waits { 0 } else { amount });
    pi["customer"] = json!(params.get("customer"));
    pi["payment_method"] = json!(card);
    pi["metadata"] = Value::Object(metadata);
    pi["last_payment_error"] = Value::Null;
    pi["next_action"] = if waits {
        json!({"type": "use_stripe_sdk", "use_stripe_sdk": {}})
    } else {
        Value::Null
    };
    world.payment_intents.insert(id, pi.clone());
    if !waits {
        emit(world, "payment_intent.succeeded", &pi);
    }
    (200, pi)
}

/// An invoice of `sub` for `[start, end)`, shaped as API versions since
/// 2025 shape it.
fn invoice(world: &mut World, sub: &Value, start: i64, end: i64) -> Value {
    let id = world.id("in");
    json!({"id": id, "object": "invoice",
           "parent": {"type": "subscription_details",
                      "subscription_details": {"subscription": sub["id"],
                                               "metadata": sub["metadata"]}},
           "lines": {"data": [{"period": {"start": start, "end": end}}]}})
}

/// The charge behind a payment intent, as its refund events carry it.
fn charge_of(pi: &Value, refunded: i64) -> Value {
    json!({"id": format!("ch_{}", pi["id"].as_str().unwrap_or_default()), "object": "charge",
           "payment_intent": pi["id"], "amount": pi["amount"], "amount_refunded": refunded,
           "metadata": pi["metadata"]})
}

fn dispute_of(pi: &Value, amount: i64, status: &str) -> Value {
    let id = pi["id"].as_str().unwrap_or_default();
    json!({"id": format!("dp_{id}"), "object": "dispute", "amount": amount,
           "charge": format!("ch_{id}"), "payment_intent": id, "status": status,
           "metadata": pi["metadata"]})
}

impl StandIn {
    /// Turns the test clock on: subscriptions made from now on last
    /// `period_secs` a period, and events are queued for delivery.
    pub fn with_clock(&self, period_secs: i64) {
        self.world.lock().unwrap().clock = Some(Clock {
            period_secs,
            outbox: Vec::new(),
            failures: VecDeque::new(),
        });
    }

    /// How the next writing call fails.
    pub fn fail_next(&self, failure: Failure) {
        if let Some(clock) = self.world.lock().unwrap().clock.as_mut() {
            clock.failures.push_back(failure);
        }
    }

    /// Whether a failure is still waiting for a call.
    pub fn failures_pending(&self) -> bool {
        self.world
            .lock()
            .unwrap()
            .clock
            .as_ref()
            .is_some_and(|c| !c.failures.is_empty())
    }

    /// The events queued so far, taken out of the outbox.
    pub fn take_events(&self) -> Vec<Value> {
        self.world
            .lock()
            .unwrap()
            .clock
            .as_mut()
            .map(|c| std::mem::take(&mut c.outbox))
            .unwrap_or_default()
    }

    /// Moves every live subscription through the boundaries passed by
    /// `now` (unix seconds), as Stripe renews: a subscription cancelled
    /// at its period's end ends; any other starts its next period and
    /// charges its customer's default card for it (`invoice.paid`, or
    /// `invoice.payment_failed` and `past_due`). A pending update does
    /// not outlive its period.
    pub fn advance(&self, now: i64) {
        let mut world = self.world.lock().unwrap();
        let Some(period) = world.clock.as_ref().map(|c| c.period_secs) else {
            return;
        };
        let mut ids: Vec<String> = world.subscriptions.keys().cloned().collect();
        ids.sort();
        for id in ids {
            loop {
                let sub = world.subscriptions[&id].clone();
                let end = sub["items"]["data"][0]["current_period_end"]
                    .as_i64()
                    .unwrap_or(i64::MAX);
                let live = matches!(sub["status"].as_str(), Some("active" | "past_due"));
                if !live || end > now {
                    break;
                }
                let mut next = sub.clone();
                if sub["cancel_at_period_end"] == json!(true) {
                    next["status"] = json!("canceled");
                    world.subscriptions.insert(id.clone(), next.clone());
                    emit_at(&mut world, "customer.subscription.deleted", &next, end);
                    break;
                }
                next["items"]["data"][0]["current_period_start"] = json!(end);
                next["items"]["data"][0]["current_period_end"] = json!(end + period);
                next["pending_update"] = Value::Null;
                let customer = sub["customer"].as_str().unwrap_or_default().to_owned();
                let card = world
                    .card_override
                    .clone()
                    .or_else(|| world.default_card.get(&customer).cloned())
                    .unwrap_or_default();
                let paid = !matches!(
                    card.as_str(),
                    "pm_card_chargeDeclined" | "pm_card_authenticationRequired"
                );
                let invoice = invoice(&mut world, &next, end, end + period);
                next["status"] = json!(if paid { "active" } else { "past_due" });
                world.subscriptions.insert(id.clone(), next.clone());
                let kind = if paid {
                    "invoice.paid"
                } else {
                    "invoice.payment_failed"
                };
                emit_at(&mut world, kind, &invoice, end);
                emit_at(&mut world, "customer.subscription.updated", &next, end);
            }
        }
    }

    /// The customer completes 3-D Secure: the payment succeeds.
    pub fn confirm(&self, payment_intent: &str) {
        let mut world = self.world.lock().unwrap();
        let Some(pi) = world.payment_intents.get_mut(payment_intent) else {
            return;
        };
        if pi["status"] != json!("requires_action") {
            return;
        }
        pi["status"] = json!("succeeded");
        pi["amount_received"] = pi["amount"].clone();
        pi["next_action"] = Value::Null;
        let pi = pi.clone();
        emit(&mut world, "payment_intent.succeeded", &pi);
    }

    /// Support refunds `cents` more of a payment.
    pub fn refund(&self, payment_intent: &str, cents: i64) {
        let mut world = self.world.lock().unwrap();
        let Some(pi) = world.payment_intents.get_mut(payment_intent) else {
            return;
        };
        let amount = pi["amount"].as_i64().unwrap_or(0);
        let refunded = (pi["amount_refunded"].as_i64().unwrap_or(0) + cents).min(amount);
        pi["amount_refunded"] = json!(refunded);
        let charge = charge_of(pi, refunded);
        emit(&mut world, "charge.refunded", &charge);
    }

    /// The card holder disputes `cents` of a payment.
    pub fn open_dispute(&self, payment_intent: &str, cents: i64) {
        let mut world = self.world.lock().unwrap();
        let Some(pi) = world.payment_intents.get(payment_intent).cloned() else {
            return;
        };
        emit(
            &mut world,
            "charge.dispute.created",
            &dispute_of(&pi, cents, "needs_response"),
        );
    }

    /// The dispute closes, won by the merchant or lost.
    pub fn close_dispute(&self, payment_intent: &str, cents: i64, won: bool) {
        let mut world = self.world.lock().unwrap();
        let Some(pi) = world.payment_intents.get(payment_intent).cloned() else {
            return;
        };
        let status = if won { "won" } else { "lost" };
        emit(
            &mut world,
            "charge.dispute.closed",
            &dispute_of(&pi, cents, status),
        );
    }

    /// Our customer's payment intents, oldest first: what Stripe was asked
    /// to charge, whether or not the service heard the answer.
    pub fn payment_intents_of(&self, ours: &str) -> Vec<Value> {
        let world = self.world.lock().unwrap();
        let mut intents: Vec<Value> = world
            .payment_intents
            .values()
            .filter(|pi| pi["metadata"]["customer_id"] == json!(ours))
            .cloned()
            .collect();
        intents.sort_by_key(|pi| sequence(&pi["id"]));
        intents
    }

    /// The customer's live subscription at Stripe (newest), if any: what
    /// the merchant pays for.
    pub fn live_subscription_of(&self, ours: &str) -> Option<Value> {
        let world = self.world.lock().unwrap();
        let mut live: Vec<&Value> = world
            .subscriptions
            .values()
            .filter(|s| s["metadata"]["customer_id"] == json!(ours))
            .filter(|s| matches!(s["status"].as_str(), Some("active" | "past_due")))
            .collect();
        live.sort_by_key(|s| sequence(&s["id"]));
        live.last().map(|s| (*s).clone())
    }
}
