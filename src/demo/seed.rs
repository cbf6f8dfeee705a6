//! Realistic sample data for the demo target: a small online shop in PostgreSQL and the
//! sessions, carts, caches, queues and rate limits that go with it in Redis.
//!
//! Both seeders refuse to touch a target that already holds data (PostgreSQL: any user
//! table; Redis: the seeder's own well-known keys), so running them twice fails loudly
//! instead of doubling or clobbering data.
//!
//! Over 600 lines: the demo's sample data for PostgreSQL and Redis is one script of
//! steps; about 150 lines are tests.

use anyhow::{Context as _, Result, bail};
use fred::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::json;
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

/// The shop schema and data; `-- step: <name>` lines split it into steps.
const SHOP_SQL: &str = include_str!("shop.sql");

/// Marker that starts a step in [`SHOP_SQL`].
const STEP_MARKER: &str = "-- step:";

/// The first step of [`SHOP_SQL`] that runs after the data transaction has been committed.
const AFTER_COMMIT_STEP: &str = "analyze";

/// Fills an empty PostgreSQL database with the demo shop: schemas `shop` and `analytics`
/// (2,000 customers, 500 products, 5,000 orders, 12,000 order items, 8,000 events, 300
/// coupons, a bloated `shop.inventory_reservations`), an unused and a duplicate index, a
/// `public._sqlx_migrations` table with applied migrations and an int4 sequence at ~95%,
/// then runs `ANALYZE` and a few index lookups (so only the planted indexes look unused).
///
/// All data is written in one transaction (nothing is left behind on failure); the
/// connecting user needs CREATE on the database. Fails if the database already contains
/// tables. Takes about a second on a local server.
pub async fn seed_postgres(url: &str) -> Result<()> {
    let started = std::time::Instant::now();
    let mut steps = split_steps(SHOP_SQL);
    let after_commit = steps
        .iter()
        .position(|(name, _)| name == AFTER_COMMIT_STEP)
        .context("shop.sql has no `analyze` step")?;
    let later_steps = steps.split_off(after_commit);

    let mut conn = connect(url).await?;
    ensure_postgres_empty(&mut conn).await?;
    let seeding_backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await?;
    let mut tx = conn.begin().await?;
    for (name, sql) in &steps {
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("seeding PostgreSQL failed in step `{name}`"))?;
    }
    tx.commit()
        .await
        .context("could not commit the demo data")?;
    conn.close().await.ok();

    // A backend flushes its table statistics when it exits; wait for that so the inserts
    // are not added on top of ANALYZE's row estimates afterwards.
    let mut conn = connect(url).await?;
    wait_for_backend_exit(&mut conn, seeding_backend).await?;
    for (name, sql) in &later_steps {
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .with_context(|| format!("seeding PostgreSQL failed in step `{name}`"))?;
    }
    conn.close().await.ok();
    tracing::info!(
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "seeded PostgreSQL demo data"
    );
    Ok(())
}

async fn connect(url: &str) -> Result<PgConnection> {
    PgConnection::connect(url)
        .await
        .context("could not connect to PostgreSQL to seed the demo data")
}

/// Waits (up to 5 s) until backend `pid` has left `pg_stat_activity`.
async fn wait_for_backend_exit(conn: &mut PgConnection, pid: i32) -> Result<()> {
    for _ in 0..100 {
        let alive: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                .bind(pid)
                .fetch_one(&mut *conn)
                .await?;
        if !alive {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tracing::debug!(
        pid,
        "seeding backend still listed after 5 s; analyzing anyway"
    );
    Ok(())
}

/// Errors unless the database has no user tables, views or sequences.
async fn ensure_postgres_empty(conn: &mut PgConnection) -> Result<()> {
    let already_seeded: bool =
        sqlx::query_scalar("SELECT to_regclass('shop.customers') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await
            .context("could not inspect the target database")?;
    if already_seeded {
        bail!(
            "the target database already contains the demo data (table shop.customers exists); \
             seed an empty database"
        );
    }
    let relations: Vec<String> = sqlx::query_scalar(
        r"SELECT format('%I.%I', n.nspname, c.relname)
          FROM pg_class AS c
          JOIN pg_namespace AS n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname NOT LIKE 'pg\_toast%'
            AND n.nspname NOT LIKE 'pg\_temp\_%'
          ORDER BY 1
          LIMIT 6",
    )
    .fetch_all(&mut *conn)
    .await
    .context("could not inspect the target database")?;
    if !relations.is_empty() {
        let more = if relations.len() > 5 { ", ..." } else { "" };
        let shown: Vec<&str> = relations.iter().take(5).map(String::as_str).collect();
        bail!(
            "refusing to seed demo data into a database that is not empty (found {}{more})",
            shown.join(", ")
        );
    }
    Ok(())
}

/// Splits a script into `(name, sql)` steps at `-- step: <name>` lines. Text before the first
/// marker is a step named `preamble` unless it is only comments and blank lines.
fn split_steps(script: &str) -> Vec<(String, String)> {
    let mut steps: Vec<(String, String)> = vec![("preamble".to_owned(), String::new())];
    for line in script.lines() {
        if let Some(name) = line.trim_start().strip_prefix(STEP_MARKER) {
            steps.push((name.trim().to_owned(), String::new()));
        } else if let Some((_, sql)) = steps.last_mut() {
            sql.push_str(line);
            sql.push('\n');
        }
    }
    steps.retain(|(_, sql)| {
        sql.lines()
            .map(str::trim)
            .any(|line| !line.is_empty() && !line.starts_with("--"))
    });
    steps
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// Session strings `shop:session:<uuid>` (TTL 15 min to 24 h).
const SESSIONS: usize = 1200;
/// Cart hashes `shop:cart:<customer id>` (TTL 7 days).
const CARTS: usize = 400;
/// Rate-limit counters `ratelimit:ip:<a.b.c.d>` (TTL 60 to 300 s).
const RATE_LIMITED_IPS: usize = 300;
/// Product cache JSON strings `cache:product:<id>` (80% with a 1 h TTL, 20% without).
const CACHED_PRODUCTS: usize = 500;
/// Jobs in the list `queue:emails`.
const EMAIL_JOBS: usize = 250;
/// Members of the set `shop:online`.
const ONLINE_CUSTOMERS: usize = 180;
/// Members of the sorted set `leaderboard:sellers`.
const SELLERS: usize = 100;
/// Entries in the stream `events:orders`.
const ORDER_EVENTS: usize = 1000;
/// Single keys besides the families above: the list, set, sorted set and stream, plus
/// `shop:stats:orders_today` and `shop:config:features`.
const SINGLE_KEYS: usize = 6;
/// Total number of keys written by [`seed_redis`].
#[cfg_attr(not(test), allow(dead_code))]
const REDIS_KEYS: usize = SESSIONS + CARTS + RATE_LIMITED_IPS + CACHED_PRODUCTS + SINGLE_KEYS;

/// Keys whose presence means the target was already seeded.
const REDIS_SENTINEL_KEYS: [&str; 4] = [
    "queue:emails",
    "shop:online",
    "leaderboard:sellers",
    "events:orders",
];

/// Writes about 2,400 demo keys to Redis with pipelines: `shop:session:<uuid>` strings with
/// TTLs, `shop:cart:<id>` hashes, `ratelimit:ip:<a.b.c.d>` counters with short TTLs (60–300 s,
/// so the key count drops by 300 within five minutes), `cache:product:<id>` JSON strings,
/// the list `queue:emails`, the set `shop:online`, the sorted set `leaderboard:sellers`, the
/// stream `events:orders` and two small config/stat keys.
///
/// Fails without writing if the list/set/sorted set/stream keys already exist. The data is
/// deterministic apart from timestamps.
pub async fn seed_redis(url: &str) -> Result<()> {
    let config = Config::from_url(url).context("invalid Redis URL for seeding")?;
    let client = Builder::from_config(config)
        .build()
        .context("could not build the Redis client")?;
    client
        .init()
        .await
        .context("could not connect to Redis to seed the demo data")?;
    let result = write_redis_demo_data(&client).await;
    client.quit().await.ok();
    result
}

async fn write_redis_demo_data(client: &Client) -> Result<()> {
    let existing: i64 = client.exists(REDIS_SENTINEL_KEYS.to_vec()).await?;
    if existing > 0 {
        bail!(
            "refusing to seed Redis: demo keys already exist (one of {})",
            REDIS_SENTINEL_KEYS.join(", ")
        );
    }

    let mut rng = StdRng::seed_from_u64(0x0db0_95ed);
    let now = chrono::Utc::now();
    let user_agents = [
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari/605.1.15",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
        "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
    ];

    // Sessions: JSON strings with TTLs between 15 minutes and a day.
    let pipe = client.pipeline();
    for _ in 0..SESSIONS {
        let id = uuid::Builder::from_random_bytes(rng.random()).into_uuid();
        let created = now - chrono::Duration::seconds(rng.random_range(0..86_400));
        let customer_id = rng.random_bool(0.7).then(|| rng.random_range(1..=2000u32));
        let csrf_token: [u8; 16] = rng.random();
        let locale = ["en-US", "de-DE", "fr-FR", "nl-NL"][rng.random_range(0..4)];
        let session = json!({
            "customer_id": customer_id,
            "created_at": created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "user_agent": user_agents[rng.random_range(0..user_agents.len())],
            "csrf_token": hex_string(&csrf_token),
            "locale": locale,
        });
        let ttl = rng.random_range(900..=86_400);
        let _: () = pipe
            .set(
                format!("shop:session:{id}"),
                session.to_string(),
                Some(Expiration::EX(ttl)),
                None,
                false,
            )
            .await?;
    }
    send(&pipe, "sessions").await?;

    // Carts: hashes product id -> quantity, plus metadata; kept for a week.
    let pipe = client.pipeline();
    let mut cart_owners: Vec<u32> = (1..=2000).collect();
    shuffle(&mut cart_owners, &mut rng);
    for &customer_id in cart_owners.iter().take(CARTS) {
        let key = format!("shop:cart:{customer_id}");
        let mut fields: Vec<(String, String)> = Vec::new();
        for _ in 0..rng.random_range(1..=5) {
            fields.push((
                format!("product:{}", rng.random_range(1..=500u32)),
                rng.random_range(1..=3u32).to_string(),
            ));
        }
        let updated = now - chrono::Duration::minutes(rng.random_range(0..7 * 24 * 60));
        fields.push(("currency".to_owned(), "EUR".to_owned()));
        fields.push((
            "updated_at".to_owned(),
            updated.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ));
        let _: () = pipe.hset(key.as_str(), fields).await?;
        let _: () = pipe.expire(key.as_str(), 7 * 24 * 3600, None).await?;
    }
    send(&pipe, "carts").await?;

    // Rate limits: per-IP request counters in short windows (documentation address ranges).
    let pipe = client.pipeline();
    let networks = ["192.0.2", "198.51.100", "203.0.113"];
    for i in 0..RATE_LIMITED_IPS {
        let key = format!("ratelimit:ip:{}.{}", networks[i % 3], 1 + i / 3);
        let hits = if rng.random_bool(0.05) {
            rng.random_range(100..=600) // a few noisy clients
        } else {
            rng.random_range(1..=40)
        };
        let _: () = pipe.incr_by(key.as_str(), hits).await?;
        let _: () = pipe
            .expire(key.as_str(), rng.random_range(60..=300), None)
            .await?;
    }
    send(&pipe, "rate limits").await?;

    // Product cache: JSON documents, most with a TTL, some forgotten without one.
    let pipe = client.pipeline();
    let categories = [
        "books",
        "electronics",
        "kitchen",
        "garden",
        "toys",
        "furniture",
        "outdoor",
        "office",
    ];
    let adjectives = [
        "Classic", "Compact", "Deluxe", "Eco", "Portable", "Smart", "Vintage",
    ];
    let nouns = [
        "Lamp", "Kettle", "Notebook", "Speaker", "Chair", "Backpack", "Planter", "Mug",
    ];
    for id in 1..=CACHED_PRODUCTS {
        let category = categories[id % categories.len()];
        let doc = json!({
            "id": id,
            "sku": format!("SKU-{}-{id:05}", category[..3].to_uppercase()),
            "name": format!(
                "{} {}",
                adjectives[rng.random_range(0..adjectives.len())],
                nouns[rng.random_range(0..nouns.len())]
            ),
            "category": category,
            "price_cents": rng.random_range(299..=49_999),
            "stock": rng.random_range(0..250),
            "cached_at": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        });
        let expire = rng.random_bool(0.8).then_some(Expiration::EX(3600));
        let _: () = pipe
            .set(
                format!("cache:product:{id}"),
                doc.to_string(),
                expire,
                None,
                false,
            )
            .await?;
    }
    send(&pipe, "product cache").await?;

    // Single keys: email queue, online set, sellers leaderboard, stats and feature flags.
    let pipe = client.pipeline();
    let templates = [
        "order_confirmation",
        "order_shipped",
        "password_reset",
        "newsletter",
    ];
    let jobs: Vec<String> = (0..EMAIL_JOBS)
        .map(|i| {
            json!({
                "job_id": format!("email-{:06}", 10_000 + i),
                "template": templates[rng.random_range(0..templates.len())],
                "customer_id": rng.random_range(1..=2000u32),
                "attempts": if rng.random_bool(0.1) { rng.random_range(1..=4) } else { 0 },
                "enqueued_at": (now - chrono::Duration::seconds(rng.random_range(0..3600)))
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            })
            .to_string()
        })
        .collect();
    let _: () = pipe.rpush("queue:emails", jobs).await?;

    let mut online: Vec<u32> = (1..=2000).collect();
    shuffle(&mut online, &mut rng);
    let online: Vec<String> = online
        .into_iter()
        .take(ONLINE_CUSTOMERS)
        .map(|id| format!("customer:{id}"))
        .collect();
    let _: () = pipe.sadd("shop:online", online).await?;

    let sellers: Vec<(f64, String)> = (1..=SELLERS)
        .map(|id| {
            let revenue_cents: f64 = rng.random_range(10_000.0..5_000_000.0);
            (revenue_cents.round(), format!("seller:{id}"))
        })
        .collect();
    let _: () = pipe
        .zadd("leaderboard:sellers", None, None, false, false, sellers)
        .await?;

    let _: () = pipe
        .set(
            "shop:stats:orders_today",
            rng.random_range(40..400u32),
            Some(Expiration::EX(24 * 3600)),
            None,
            false,
        )
        .await?;
    let _: () = pipe
        .hset(
            "shop:config:features",
            vec![
                ("new_checkout", "on"),
                ("recommendations", "off"),
                ("free_shipping_threshold_cents", "5000"),
            ],
        )
        .await?;
    send(&pipe, "queue, set, leaderboard and config").await?;

    // Order events stream: each order is placed, then paid or cancelled, over the last day.
    let pipe = client.pipeline();
    let start_ms = (now - chrono::Duration::hours(24)).timestamp_millis();
    let step_ms = 24 * 3600 * 1000 / ORDER_EVENTS as i64;
    let mut order = (0usize, 0u32, 0u32); // (order id, customer id, total)
    for i in 0..ORDER_EVENTS {
        let status = if i % 2 == 0 {
            order = (
                5001 + i / 2,
                rng.random_range(1..=2000u32),
                rng.random_range(500..=90_000u32),
            );
            "placed"
        } else if rng.random_bool(0.9) {
            "paid"
        } else {
            "cancelled"
        };
        let ms = start_ms + i as i64 * step_ms + rng.random_range(0..step_ms);
        let fields = vec![
            ("order_id", order.0.to_string()),
            ("customer_id", order.1.to_string()),
            ("status", status.to_owned()),
            ("total_cents", order.2.to_string()),
        ];
        let _: () = pipe
            .xadd(
                "events:orders",
                false,
                None::<()>,
                format!("{ms}-0"),
                fields,
            )
            .await?;
    }
    send(&pipe, "order events").await?;

    tracing::info!(keys = REDIS_KEYS, "seeded Redis demo data");
    Ok(())
}

/// Sends a pipeline and fails on the first command error.
async fn send(pipe: &fred::clients::Pipeline<Client>, what: &str) -> Result<()> {
    for result in pipe.try_all::<Value>().await {
        result.with_context(|| format!("seeding Redis failed while writing {what}"))?;
    }
    Ok(())
}

/// Fisher–Yates shuffle with our deterministic rng.
fn shuffle<T>(items: &mut [T], rng: &mut StdRng) {
    for i in (1..items.len()).rev() {
        items.swap(i, rng.random_range(0..=i));
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devcluster::tests::{TempBase, binaries_available};
    use crate::devcluster::{PgCluster, RedisServer};

    #[test]
    fn steps_are_split_at_markers() {
        let steps =
            split_steps("-- header\n\n-- step: one\nSELECT 1;\n-- step:two\n-- c\nSELECT 2;\n");
        let names: Vec<&str> = steps.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["one", "two"]);
        assert_eq!(steps[1].1, "-- c\nSELECT 2;\n");

        let shop: Vec<String> = split_steps(SHOP_SQL).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            shop,
            [
                "schemas",
                "customers",
                "products",
                "orders",
                "events",
                "coupons",
                "bloat",
                "migrations",
                "analyze",
                "workload"
            ]
        );
    }

    async fn count(conn: &mut PgConnection, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(conn)
            .await
            .unwrap_or_else(|err| panic!("count {table}: {err}"))
    }

    #[tokio::test]
    async fn seeds_postgres_and_redis() -> Result<()> {
        if !binaries_available() {
            return Ok(());
        }
        let base = TempBase::new("seedtest");
        let cluster = PgCluster::start(&base.0).await?;
        let mut redis = RedisServer::start(&base.0).await?;

        // PostgreSQL
        cluster.create_database("shop").await?;
        let url = cluster.url("shop");
        seed_postgres(&url).await?;
        let mut conn = PgConnection::connect(&url).await?;
        for (table, expected) in [
            ("shop.customers", 2000),
            ("shop.products", 500),
            ("shop.orders", 5000),
            ("shop.order_items", 12000),
            ("analytics.events", 8000),
            ("shop.coupons", 300),
            ("shop.inventory_reservations", 6000),
            ("public._sqlx_migrations", 5),
        ] {
            assert_eq!(count(&mut conn, table).await, expected, "rows in {table}");
        }
        let mismatched_totals: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM shop.orders o
             WHERE o.total_cents <> (SELECT sum(quantity * unit_price_cents)
                                      FROM shop.order_items i WHERE i.order_id = o.id)",
        )
        .fetch_one(&mut conn)
        .await?;
        assert_eq!(mismatched_totals, 0);
        let seq_used: f64 =
            sqlx::query_scalar("SELECT last_value::float8 / 2147483647 FROM shop.coupons_id_seq")
                .fetch_one(&mut conn)
                .await?;
        assert!((0.94..0.96).contains(&seq_used), "sequence at {seq_used}");
        let autovacuum_off: Vec<String> = sqlx::query_scalar(
            "SELECT unnest(reloptions) FROM pg_class WHERE oid = 'shop.inventory_reservations'::regclass",
        )
        .fetch_all(&mut conn)
        .await?;
        assert!(autovacuum_off.contains(&"autovacuum_enabled=false".to_owned()));
        // Statistics of the workload backend arrive asynchronously after it disconnects.
        let mut stats = (0i64, 0i64, -1i64, 0i64);
        for _ in 0..50 {
            stats = sqlx::query_as(
                "SELECT (SELECT n_live_tup FROM pg_stat_user_tables
                          WHERE relid = 'shop.orders'::regclass),
                        (SELECT n_dead_tup FROM pg_stat_user_tables
                          WHERE relid = 'shop.inventory_reservations'::regclass),
                        (SELECT idx_scan FROM pg_stat_user_indexes
                          WHERE indexrelid = 'shop.orders_shipped_at_idx'::regclass),
                        (SELECT idx_scan FROM pg_stat_user_indexes
                          WHERE indexrelid = 'shop.order_items_product_id_idx'::regclass)",
            )
            .fetch_one(&mut conn)
            .await?;
            if stats.3 > 0 {
                break;
            }
            sqlx::raw_sql("SELECT pg_stat_clear_snapshot()")
                .execute(&mut conn)
                .await?;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let (live_orders, dead_tuples, unused_scans, used_scans) = stats;
        assert_eq!(live_orders, 5000, "n_live_tup of shop.orders");
        assert!(dead_tuples >= 10_000, "dead tuples: {dead_tuples}");
        assert_eq!(unused_scans, 0, "orders_shipped_at_idx should be unused");
        assert!(
            used_scans > 0,
            "order_items_product_id_idx should have scans"
        );
        conn.close().await?;
        let again = seed_postgres(&url)
            .await
            .expect_err("second seed must fail");
        assert!(
            format!("{again:#}").contains("already contains"),
            "{again:#}"
        );

        // Redis
        seed_redis(&redis.url()).await?;
        let client = Builder::from_config(Config::from_url(&redis.url())?).build()?;
        client.init().await?;
        let keys: usize = client.dbsize().await?;
        assert_eq!(keys, REDIS_KEYS);
        let emails: usize = client.llen("queue:emails").await?;
        assert_eq!(emails, EMAIL_JOBS);
        let sellers: usize = client.zcard("leaderboard:sellers").await?;
        assert_eq!(sellers, SELLERS);
        let events: usize = client.xlen("events:orders").await?;
        assert_eq!(events, ORDER_EVENTS);
        let cache_ttl: i64 = client.ttl("cache:product:1").await?;
        assert!(cache_ttl == -1 || (1..=3600).contains(&cache_ttl));
        client.quit().await?;
        let again = seed_redis(&redis.url())
            .await
            .expect_err("second seed must fail");
        assert!(format!("{again:#}").contains("already exist"), "{again:#}");

        redis.stop().await?;
        cluster.stop().await?;
        Ok(())
    }
}
