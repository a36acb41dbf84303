//! The Redis key layout, in one place.
//!
//! Every key is `<prefix>:v1:{s<shard>}:…`. The `{s<shard>}` hash tag puts
//! all keys that one consume touches (the customer's account, its
//! idempotency records and the usage stream its events go to) in one
//! Redis Cluster slot, which a Lua script requires. Customers are spread
//! over `USAGE_STREAM_SHARDS` shards by their id, so no single slot, and no
//! single stream, carries all the traffic. The shard count is fixed for the
//! life of a deployment: changing it moves customers to other slots.
//! `v1` versions the layout; a new layout gets a new version, not a
//! migration in place.
//!
//! | key | type | holds | TTL |
//! | --- | --- | --- | --- |
//! | `…:{s<n>}:c:<customer>:acct` | hash | the customer's hot state: allowance, usage this period, purchased tokens, subscription status, active apps, live embed keys, and the consume rate limiters (fields in `lua/consume.lua`) | none: it is the live balance; rebuilt from Postgres when missing |
//! | `…:{s<n>}:c:<customer>:idem:<sha256>` | string | the first answer to a consume sent with an `Idempotency-Key` (hashed, so any 255 characters make a short, safe key), or the fences settles left for attempts under the key that were given up on | `IDEMPOTENCY_TTL_SECS`, 24 h |
//! | `…:{s<n>}:charges:<second>` | hash | per event id, the outcome of a consume sent without `Idempotency-Key` whose id was minted in that second (UUIDv7's time), read only when its reply was late; or the fence a settle left in its place (`lua/settle.lua`, see `hot/charge.rs`). One hash per second rather than a key per consume: a field costs Redis far less to write and to expire than a key. Shard 0's for every customer on one Redis server (one hash for a whole batch, read and written once per call), each customer's own shard's in a cluster (`Keys::shared_copy`) | from its first write, past the last settle of its second: 10 s, or `REDIS_TIMEOUT_MS` + 2 s when longer (`hot/charge.rs`); 1 h once it holds a fence |
//! | `…:{s<n>}:c:<customer>:once:<sha256>` | string | a change to the balance done once (a purchase credited, a refund's take, a grant; the value is the tokens a take took), so a retry after a crash or a lost reply before the ledger's commit does not do it again (`lua/account_update.lua`, `lua/account_take.lua`) | 7 days (Stripe retries a webhook for 3) |
//! | `…:{s<n>}:usage` | stream | usage events waiting for the flusher (consumer group `flusher`) | none: trimmed by the flusher once persisted |
//! | `…:{s<n>}:apps:disabled` | set | slugs of apps an operator disabled, one copy per shard so the consume script reads it in its own slot in a cluster (on one Redis server it reads shard 0's for every charge: `Keys::shared_copy`) | none: written by `PATCH /api/v1/admin/apps/{id}` |
//! | `<prefix>:v1:rl:<group>:<customer>` | string | a route group's rate limiter (`apps`, `activate`, `billing`): its GCRA theoretical arrival time in µs (`lua/gcra.lua`), in `API_RATE_LIMIT_REDIS_URL`; no hash tag, the script reads one key (`hot/rate_limit.rs`). The consume limiters are fields of the account hash | until the limiter is rested (at most a burst's worth of intervals) |
//! | `…:{s<n>}:usage:dead` | stream | entries the flusher could not decode or write after `FLUSH_MAX_DELIVERIES` attempts, with `source_id`, `reason`, `deliveries` and the original fields, for an operator to inspect and replay | none: an operator deletes what they have dealt with |

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Builds key names. Cheap to clone; one per [`super::HotStore`].
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
    shards: u16,
    /// The stream names, built once: every consume names one.
    streams: Vec<String>,
    /// The disabled-apps sets, built once for the same reason.
    disabled_apps: Vec<String>,
}

impl Keys {
    pub fn new(prefix: &str, shards: u16) -> Self {
        assert!(shards > 0, "at least one shard");
        let root = format!("{prefix}:v1");
        let streams = (0..shards)
            .map(|s| format!("{root}:{{s{s}}}:usage"))
            .collect();
        let disabled_apps = (0..shards)
            .map(|s| format!("{root}:{{s{s}}}:apps:disabled"))
            .collect();
        Self {
            root,
            shards,
            streams,
            disabled_apps,
        }
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }

    /// Whose copy of a key kept alike in every shard (the disabled-apps
    /// set, the charge records of a second) a charge of `shard` names: its
    /// own in a cluster, where a script call reads one slot; shard 0's on
    /// one Redis server, so a call of many shards' charges reads and writes
    /// one key once.
    pub fn shared_copy(shard: u16, clustered: bool) -> u16 {
        if clustered {
            shard
        } else {
            0
        }
    }

    /// The shard a customer's keys and events live in. UUIDs (v4 and v7)
    /// end in random bits, so the low bits spread customers evenly.
    pub fn shard_of(&self, customer: Uuid) -> u16 {
        (customer.as_u128() % u128::from(self.shards)) as u16
    }

    pub fn account(&self, customer: Uuid) -> String {
        format!(
            "{}:{{s{}}}:c:{}:acct",
            self.root,
            self.shard_of(customer),
            customer
        )
    }

    pub fn idempotency(&self, customer: Uuid, idempotency_key: &str) -> String {
        self.hashed(customer, "idem", idempotency_key)
    }

    /// The marker of a change done once; the id is hashed, as it may hold
    /// a webhook's strings.
    pub fn once(&self, customer: Uuid, id: &str) -> String {
        self.hashed(customer, "once", id)
    }

    /// A customer's key named by the SHA-256 of `id`: any string makes a
    /// short, safe key.
    fn hashed(&self, customer: Uuid, kind: &str, id: &str) -> String {
        let digest = Sha256::digest(id.as_bytes());
        format!(
            "{}:{{s{}}}:c:{}:{kind}:{}",
            self.root,
            self.shard_of(customer),
            customer,
            hex::encode(digest)
        )
    }

    /// The hash in `shard` holding the outcome of `event`, a consume sent
    /// without `Idempotency-Key`, as the field named by the event id. Named
    /// by the second in the event id (a UUIDv7), so both the consume script
    /// and a settle find it from the id alone. Which shard's hash a
    /// customer's consumes use is `HotStore::charge_records`'s choice.
    pub fn charge_records(&self, shard: u16, event: Uuid) -> String {
        let second = event.get_timestamp().map_or(0, |t| t.to_unix().0);
        format!("{}:{{s{shard}}}:charges:{second}", self.root)
    }

    pub fn usage_stream(&self, shard: u16) -> &str {
        &self.streams[usize::from(shard)]
    }

    pub fn usage_streams(&self) -> &[String] {
        &self.streams
    }

    /// The shard's copy of the set of disabled apps.
    pub fn disabled_apps(&self, shard: u16) -> &str {
        &self.disabled_apps[usize::from(shard)]
    }

    /// The dead-letter stream beside a shard's usage stream.
    pub fn dead_letter_stream(&self, shard: u16) -> String {
        format!("{}:dead", self.streams[usize::from(shard)])
    }

    /// Every key of this layout, for SCAN-based clean-up in tests and tools.
    pub fn pattern(&self) -> String {
        format!("{}:*", self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(key: &str) -> &str {
        let start = key.find('{').unwrap();
        let end = key[start..].find('}').unwrap() + start;
        &key[start + 1..end]
    }

    #[test]
    fn every_key_of_one_consume_shares_one_hash_tag() {
        let keys = Keys::new("ca", 16);
        let customer = Uuid::new_v4();
        let shard = keys.shard_of(customer);
        let account = keys.account(customer);
        let idem = keys.idempotency(customer, "retry-1");
        let stream = keys.usage_stream(shard);
        assert_eq!(tag(&account), tag(&idem));
        assert_eq!(tag(&account), tag(stream));
        assert_eq!(tag(&account), tag(keys.disabled_apps(shard)));
        let records = keys.charge_records(shard, Uuid::now_v7());
        assert_eq!(tag(&account), tag(&records));
    }

    #[test]
    fn a_charge_record_is_found_from_its_event_id_alone() {
        let keys = Keys::new("ca", 16);
        let shard = 3;
        let at = |secs: u64, nanos: u32| {
            Uuid::new_v7(uuid::Timestamp::from_unix(
                uuid::NoContext,
                1_790_000_000 + secs,
                nanos,
            ))
        };
        assert_eq!(
            keys.charge_records(shard, at(0, 1_000)),
            keys.charge_records(shard, at(0, 999_000_000))
        );
        assert_ne!(
            keys.charge_records(shard, at(0, 0)),
            keys.charge_records(shard, at(1, 0))
        );
        assert!(keys
            .charge_records(shard, at(0, 0))
            .ends_with(":charges:1790000000"));
    }

    #[test]
    fn customers_spread_over_all_shards() {
        let keys = Keys::new("ca", 8);
        let mut seen = [0u32; 8];
        for _ in 0..800 {
            seen[keys.shard_of(Uuid::now_v7()) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn idempotency_keys_are_hashed_to_a_fixed_length() {
        let keys = Keys::new("ca", 4);
        let c = Uuid::nil();
        assert_eq!(
            keys.idempotency(c, "a").len(),
            keys.idempotency(c, &"x".repeat(255)).len()
        );
    }
}
