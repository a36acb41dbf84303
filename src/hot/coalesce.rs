//! Concurrent consumes coalesced into one script call per Redis server.
//!
//! Redis pays a fixed cost for every script call (the call, the argument
//! conversion, the reply) that is larger than the charge itself. So while
//! one call is in Redis, the consumes that arrive wait in their lane's
//! queue, and when the call returns the next takes every one waiting, up
//! to [`MAX_BATCH`]; `lua/consume.lua` charges them one after the other,
//! each as if it came alone. There is no timer: a consume that finds its
//! lane idle goes at once, so at low load nothing waits for company, and
//! under load a batch is whatever gathered during one round trip.
//!
//! Lanes. On one Redis server every shard lives on the same server, and
//! one call may carry charges of any shards (each charge names its own
//! shard's stream and keys): there is one lane, and batches grow with the
//! whole service's concurrency, however many merchants share it. Queues per
//! shard would split the same traffic sixteen ways into batches of one or
//! two charges (benches/RESULTS.md, "Many merchants"). In a Redis Cluster a
//! call must stay within one slot, so there each shard is a lane of its
//! own, and lanes run side by side.
//!
//! What a caller is promised does not change (hot/charge.rs): it waits for
//! its own reply for 60 % of the timeout, and when that does not come, or
//! the call failed, it settles its own charge with `lua/settle.lua`, which
//! finds the charge's outcome record or fences it. A call that fails
//! mid-way leaves the charges before the failure made and the rest not;
//! each caller learns which from its own record.

use std::{sync::Arc, time::Duration};

use fred::{
    clients::Pool,
    interfaces::LuaInterface,
    prelude::{Error, ErrorKind},
    types::{scripts::Script, Key, MultipleKeys, MultipleValues, Value},
};
use tokio::sync::{mpsc, oneshot};

use super::Keys;

/// The most charges in one call: enough that the fixed cost is spread
/// thin, few enough that one call keeps Redis from other clients for well
/// under a millisecond.
pub const MAX_BATCH: usize = 64;

/// One charge as the script takes it: its shard, its two keys of its own and
/// twelve arguments (see `lua/consume.lua`).
pub(super) struct ChargeArgs {
    pub shard: u16,
    pub account: String,
    pub record: String,
    pub args: Vec<Value>,
}

/// A charge waiting for its lane's next call, and where its reply goes.
pub(super) struct Pending {
    pub charge: ChargeArgs,
    pub reply: oneshot::Sender<Result<Value, Error>>,
}

/// Each shard's stream and disabled-apps set as keys, built once: every
/// charge of a call names its shard's pair.
///
/// The disabled-apps set is the copy [`Keys::shared_copy`] names: on one
/// server shard 0's for every charge (`HotStore::set_app_disabled` writes
/// it first), so the script asks once per call and app, not once per shard
/// the call touches.
#[derive(Clone)]
pub(super) struct ShardKeys(Arc<[(Key, Key)]>);

impl ShardKeys {
    pub fn new(keys: &Keys, clustered: bool) -> Self {
        Self(
            (0..keys.shards())
                .map(|shard| {
                    (
                        Key::from(keys.usage_stream(shard)),
                        Key::from(keys.disabled_apps(Keys::shared_copy(shard, clustered))),
                    )
                })
                .collect(),
        )
    }
}

/// The lanes' queues, each drained by a task of its own: one lane on one
/// Redis server, a lane per shard in a cluster (see the module docs). The
/// tasks end when the last handle is dropped.
pub(super) struct Coalescer {
    queues: Vec<mpsc::UnboundedSender<Pending>>,
}

impl Coalescer {
    /// Starts one task per lane. Must be called inside the runtime.
    pub fn start(pool: &Pool, script: &Script, shard_keys: &ShardKeys, clustered: bool) -> Self {
        let batch_sizes = metrics::histogram!("consume_batch_charges");
        let lanes = if clustered { shard_keys.0.len() } else { 1 };
        let queues = (0..lanes)
            .map(|_| {
                let (queue, waiting) = mpsc::unbounded_channel();
                let lane = Lane {
                    pool: pool.clone(),
                    script: script.clone(),
                    keys: shard_keys.clone(),
                    batch_sizes: batch_sizes.clone(),
                };
                tokio::spawn(lane.drain(waiting));
                queue
            })
            .collect();
        Self { queues }
    }

    /// Queues a charge for its lane's next call. `false` when the lane's
    /// task is gone (the runtime is shutting down): nothing was sent.
    pub fn submit(&self, pending: Pending) -> bool {
        let lane = usize::from(pending.charge.shard) % self.queues.len();
        self.queues[lane].send(pending).is_ok()
    }
}

/// What one lane's calls need.
struct Lane {
    pool: Pool,
    script: Script,
    keys: ShardKeys,
    batch_sizes: metrics::Histogram,
}

impl Lane {
    async fn drain(self, mut waiting: mpsc::UnboundedReceiver<Pending>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = waiting.recv().await {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match waiting.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            // A caller that stopped waiting has settled its charge (a fence
            // already refuses it) or its request is gone: it is not sent.
            batch.retain(|pending| !pending.reply.is_closed());
            if batch.is_empty() {
                continue;
            }
            self.batch_sizes.record(batch.len() as f64);
            let charges = batch.iter_mut().map(|pending| &mut pending.charge);
            let (keys, args) = command(&self.keys, charges);
            let reply = call(&self.pool, &self.script, keys, args).await;
            answer(reply, &mut batch);
        }
    }
}

/// The call's keys and arguments for `charges`, in their order (taken out
/// of them): four keys a charge (its shard's stream and disabled-apps set,
/// its account, its outcome record) and its twelve arguments.
pub(super) fn command<'a>(
    shards: &ShardKeys,
    charges: impl ExactSizeIterator<Item = &'a mut ChargeArgs>,
) -> (MultipleKeys, MultipleValues) {
    let mut keys = Vec::with_capacity(4 * charges.len());
    let mut args = Vec::with_capacity(12 * charges.len());
    for charge in charges {
        let (stream, disabled) = &shards.0[usize::from(charge.shard)];
        keys.push(stream.clone());
        keys.push(disabled.clone());
        keys.push(Key::from(std::mem::take(&mut charge.account)));
        keys.push(Key::from(std::mem::take(&mut charge.record)));
        args.append(&mut charge.args);
    }
    (keys.into(), Value::Array(args))
}

/// EVALSHA, and on NOSCRIPT (a restarted or flushed Redis, or a master
/// that joined a cluster) the script loaded and the call sent once more.
/// On TRYAGAIN (a cluster's slot half moved: some of the call's keys on
/// the old master, some on the new) the call did not run, and is sent
/// again shortly, a few times; the callers' own deadlines still bound the
/// wait (hot/charge.rs). The keys and arguments are reference-counted, so
/// keeping a copy for a retry costs no copying of their bytes.
pub(super) async fn call(
    pool: &Pool,
    script: &Script,
    keys: MultipleKeys,
    args: MultipleValues,
) -> Result<Value, Error> {
    const TRY_AGAIN: [Duration; 4] = [
        Duration::from_millis(5),
        Duration::from_millis(10),
        Duration::from_millis(20),
        Duration::from_millis(40),
    ];
    let client = pool.next();
    let mut pauses = TRY_AGAIN.iter();
    let mut loaded = false;
    loop {
        match client
            .evalsha(script.sha1().clone(), keys.clone(), args.clone())
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") && !loaded => {
                script.load(client).await?;
                loaded = true;
            }
            Err(e) if e.details().starts_with("TRYAGAIN") => match pauses.next() {
                Some(pause) => tokio::time::sleep(*pause).await,
                None => return Err(e),
            },
            reply => return reply,
        }
    }
}

/// Gives each charge of `batch` its own reply, or every one the call's
/// error (each then settles its own charge).
fn answer(reply: Result<Value, Error>, batch: &mut Vec<Pending>) {
    let replies = match reply {
        Ok(Value::Array(replies)) if replies.len() == batch.len() => Ok(replies),
        Ok(other) => Err(Error::new(
            ErrorKind::Parse,
            format!("a consume batch of {} got {other:?}", batch.len()),
        )),
        Err(e) => Err(e),
    };
    // A caller gone since the call was sent settles on its own: a failed
    // send is nobody's to handle.
    match replies {
        Ok(replies) => {
            for (pending, reply) in batch.drain(..).zip(replies) {
                let _ = pending.reply.send(Ok(reply));
            }
        }
        Err(e) => {
            for pending in batch.drain(..) {
                let _ = pending.reply.send(Err(e.clone()));
            }
        }
    }
}
