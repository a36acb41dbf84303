//! Against a Redis Cluster (`scripts/test.sh` runs the suite a second time
//! on one): a shard's slot moving to another master while consumes run
//! loses and doubles nothing, and the flusher follows the stream to its
//! new master. Against a single Redis there is no slot to move, and the
//! test says so and ends.

use std::time::Duration;

use fred::{cmd, prelude::*, types::cluster::ClusterRouting};

use crate::helpers::spawn_app_with;

/// A standalone connection to one master, for the `CLUSTER` commands
/// that must reach that node and no other.
struct Master {
    id: String,
    host: String,
    port: u16,
    client: Client,
}

impl Master {
    async fn connect(host: &str, port: u16) -> Self {
        let client = Builder::from_config(
            Config::from_url(&format!("redis://{host}:{port}")).expect("a node's URL"),
        )
        .build()
        .unwrap();
        client.init().await.expect("the master answers");
        let id: String = client.custom(cmd!("CLUSTER"), vec!["MYID"]).await.unwrap();
        Self {
            id,
            host: host.to_owned(),
            port,
            client,
        }
    }

    async fn cluster(&self, args: Vec<Value>) -> Value {
        self.client
            .custom(cmd!("CLUSTER"), args)
            .await
            .expect("a CLUSTER command")
    }
}

/// Moves `slot` from `from` to `to` as `redis-cli --cluster reshard`
/// does: marked importing and migrating, its keys moved a few at a time
/// (so consumes run between the steps, redirected with ASK or told to try
/// again), then given to `to` on every master.
async fn move_slot(slot: u16, from: &Master, to: &Master, everyone: &[Master]) {
    let slot = Value::from(i64::from(slot));
    to.cluster(vec![
        "SETSLOT".into(),
        slot.clone(),
        "IMPORTING".into(),
        from.id.as_str().into(),
    ])
    .await;
    from.cluster(vec![
        "SETSLOT".into(),
        slot.clone(),
        "MIGRATING".into(),
        to.id.as_str().into(),
    ])
    .await;
    loop {
        let keys: Vec<String> = from
            .client
            .custom(
                cmd!("CLUSTER"),
                vec!["GETKEYSINSLOT".into(), slot.clone(), 5.into()],
            )
            .await
            .unwrap();
        if keys.is_empty() {
            break;
        }
        let mut args: Vec<Value> = vec![
            to.host.as_str().into(),
            i64::from(to.port).into(),
            "".into(),
            0.into(),
            5000.into(),
            "KEYS".into(),
        ];
        args.extend(keys.into_iter().map(Value::from));
        let _: Value = from.client.custom(cmd!("MIGRATE"), args).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for master in std::iter::once(to).chain(everyone.iter().filter(|m| m.id != to.id)) {
        master
            .cluster(vec![
                "SETSLOT".into(),
                slot.clone(),
                "NODE".into(),
                to.id.as_str().into(),
            ])
            .await;
    }
}

#[tokio::test]
async fn a_shard_moving_to_another_master_under_load_loses_and_doubles_nothing() {
    // Seven shards: the other tests use four, so the slot of `{s6}` is
    // this test's alone while it moves.
    let app = spawn_app_with(&[("USAGE_STREAM_SHARDS", "7")]).await;
    if !app.redis.is_clustered() {
        eprintln!("not a Redis Cluster (TEST_REDIS_URL): no slot to move");
        return;
    }
    let mut shop = app.customer_with_apps("professional", &["vto-001"]).await;
    while app.state.hot.keys().shard_of(shop.id) != 6 {
        shop = app.customer_with_apps("professional", &["vto-001"]).await;
    }
    // Some events already in the stream before the move, unflushed.
    let mut charged = app.consume_many(&shop, "vto-001", 100, 8).await;
    assert_eq!(charged.len(), 100);

    let stream = app.state.hot.keys().usage_stream(6).to_owned();
    let slot = ClusterRouting::hash_key(stream.as_bytes());
    let routing = app
        .redis
        .cached_cluster_state()
        .expect("the cluster's slots");
    let owner = routing
        .get_server(slot)
        .expect("the slot has a master")
        .clone();
    let mut masters = Vec::new();
    for server in routing.unique_primary_nodes() {
        masters.push(Master::connect(&server.host, server.port).await);
    }
    let from = masters.iter().find(|m| m.port == owner.port).unwrap();
    let to = masters.iter().find(|m| m.port != owner.port).unwrap();

    let (during, ()) = tokio::join!(
        app.consume_many(&shop, "vto-001", 400, 8),
        move_slot(slot, from, to, &masters),
    );
    // Consumes that met the move half-done were refused with a 503 and
    // charged nothing; most went through.
    eprintln!("{} of 400 consumes charged during the move", during.len());
    assert!(during.len() > 200, "{} of 400 charged", during.len());
    charged.extend(during);
    charged.extend(app.consume_many(&shop, "vto-001", 100, 8).await);

    // The flusher reads the stream on its new master, entries from before
    // the move and after alike, and the ledger holds each charge once.
    app.drain_usage().await;
    assert_eq!(app.pending_entries().await, 0);
    app.assert_ledger_exact(&charged).await;
    // The account moved with its slot: its usage is the ledger's, every
    // token of every charge and none of a refused one.
    let (rows, tokens) = app.usage_rows(shop.id).await;
    assert_eq!(rows as usize, charged.len());
    let (used, _) = app.hot_balance(shop.id).await.expect("the account moved");
    assert_eq!(used, tokens);
}
