//! The `connected-apps` binary: `serve`, `migrate` and `token`.

use std::time::Duration;

use clap::{Parser, Subcommand};
use connected_apps::{
    auth::JwtKeys,
    config::{Roles, Settings},
    ledger,
    startup::{shutdown_signal, Application},
    telemetry,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

// mimalloc: the request path allocates many small, short-lived buffers,
// which glibc's malloc serves markedly slower under load (measured in
// benches/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "connected-apps",
    version,
    about = "Meters and bills embedded eyewear apps"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API and run the background roles.
    Serve {
        /// Roles to run: api, flusher, scheduler (comma-separated) or all.
        #[arg(long, env = "ROLES", default_value = "all")]
        roles: Roles,
    },
    /// Create the database if missing, apply migrations and seed the catalog.
    Migrate,
    /// Re-seal every secret at rest not sealed under the first key of
    /// `DATA_ENCRYPTION_KEYS` (after putting a new key first).
    Reseal,
    /// Exit 0 when this machine's service answers `GET /health/live` on
    /// `PORT` (for a container's HEALTHCHECK: the image has no curl).
    Healthcheck,
    /// Print a JWT signed with the configured secret, issuer and audience.
    Token {
        /// The customer (or operator) id; a new one when omitted.
        #[arg(long)]
        sub: Option<Uuid>,
        /// Space-separated scopes.
        #[arg(
            long,
            default_value = "apps:read apps:activate tokens:consume tokens:read billing:manage"
        )]
        scope: String,
        /// Add the `admin` scope.
        #[arg(long)]
        admin: bool,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    // One TLS crypto provider for every client of the process (Redis,
    // Postgres, Stripe, Sentry, OTLP, alert deliveries).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let telemetry = telemetry::init(&settings);
    // The cause chain on one line: a failed start is read by an operator,
    // and `Debug` would add a backtrace when RUST_BACKTRACE is set.
    let result = run(cli.command, settings).await;
    if let Err(e) = &result {
        tracing::error!(error = %telemetry::chain(&**e), "stopped");
        eprintln!("error: {}", telemetry::chain(&**e));
    }
    telemetry.shutdown();
    if result.is_err() {
        std::process::exit(1);
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve { roles } => {
            let shutdown = CancellationToken::new();
            let app = Application::build(settings, roles).await?;
            let signal = shutdown.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                signal.cancel();
            });
            app.run_until_stopped(shutdown).await
        }
        Command::Migrate => {
            ledger::create_database_if_missing(settings.database.url.expose()).await?;
            let pool = ledger::pool(&settings.database)?;
            ledger::migrate(&pool, settings.database.partitions_ahead_months).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Healthcheck => {
            let port = settings.bind.port();
            connected_apps::http::health::probe(port, std::time::Duration::from_secs(2)).await
        }
        Command::Reseal => {
            let pool = ledger::pool(&settings.database)?;
            let sealer = ledger::sealed::Sealer::from_ring(settings.data_encryption_keys.expose())?;
            let resealed = ledger::billing::reseal_stripe_customers(&pool, &sealer).await?;
            tracing::info!(resealed, "secrets re-sealed under the current key");
            Ok(())
        }
        Command::Token {
            sub,
            scope,
            admin,
            ttl,
        } => {
            let mut scopes: Vec<&str> = scope.split_whitespace().collect();
            if admin {
                scopes.push("admin");
            }
            let keys = JwtKeys::new(&settings.auth);
            println!(
                "{}",
                keys.mint(
                    sub.unwrap_or_else(Uuid::now_v7),
                    &scopes,
                    Duration::from_secs(ttl)
                )
            );
            Ok(())
        }
    }
}
