//! Wiring: opens the store, recovers, serves the API until shutdown, then stops the tasks.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::agent::AgentRegistry;
use crate::api::auth::Auth;
use crate::api::connections::Connections;
use crate::api::listener::{HttpSettings, serve_http};
use crate::api::ws::WsSettings;
use crate::api::{AppState, router};
use crate::bus::Bus;
use crate::config::{Config, DEFAULT_AGENT, check_default_agent};
use crate::engine::{Engine, EngineSettings};
use crate::store::{PgOptions, SqliteOptions, Store};

/// The database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Builds the engine on the configured store with these agents and finishes what a crash
/// left behind.
pub async fn build_engine(config: &Config, agents: AgentRegistry) -> anyhow::Result<Engine> {
    let bus = Arc::new(Bus::default());
    let location = config.database_location()?;
    let options = SqliteOptions {
        synchronous: config.sqlite_synchronous,
        limits: config.store_limits(),
        ..SqliteOptions::default()
    };
    let postgres = PgOptions {
        url: String::new(),
        pool_size: config.pg_pool_size,
        lease: Duration::from_secs_f64(config.node_lease_s),
        limits: config.store_limits(),
    };
    let store = Store::connect(&location, options, postgres, bus.clone())
        .await
        .with_context(|| format!("opening the database {}", redact(&config.database)))?;
    let engine = Engine::new(
        store,
        bus,
        agents,
        EngineSettings {
            queue_limit: config.queue_limit,
            history_limit: config.history_limit,
            default_agent: DEFAULT_AGENT.to_string(),
            retention: Duration::from_secs_f64(config.retention_hours * 3600.0),
            compact_deltas_after: Duration::from_secs_f64(config.compact_deltas_after_s),
        },
    );
    let resumed = engine
        .recover()
        .await
        .context("recovering after a restart")?;
    if resumed > 0 {
        tracing::info!(resumed, "started queued work left from the last run");
    }
    engine.start_background_duties();
    Ok(engine)
}

/// Serves on `listener` until `shutdown` resolves, then shuts down gracefully: new requests
/// are refused, running tasks are cancelled with reason `shutdown`, and the call returns
/// once they have recorded it (or the grace period ran out). `ready` is called once the
/// store is open, recovery is done and connections are being accepted.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(),
) -> anyhow::Result<()> {
    let agents = AgentRegistry::from_config(&config.agents)?;
    serve_with_agents(config, agents, listener, shutdown, ready).await
}

/// [`serve`] with an agent registry of the caller's (to embed agents written in Rust).
pub async fn serve_with_agents(
    config: Config,
    agents: AgentRegistry,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(),
) -> anyhow::Result<()> {
    check_default_agent(agents.iter().map(|(name, _)| name))?;
    agents.withhold_env(&config.secret_env_names());
    let auth = Auth::from_config(config.auth.as_ref(), |name| std::env::var(name).ok())?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(crate::api::tls::acceptor(cert, key)?),
        _ => None,
    };
    let engine = build_engine(&config, agents).await?;
    let cors_origins = config
        .auth
        .as_ref()
        .map(|a| a.cors_origins.clone())
        .unwrap_or_default();
    let app = router(
        AppState {
            engine: engine.clone(),
            max_body_bytes: config.max_body_bytes,
            body_timeout: Duration::from_secs_f64(config.http_body_timeout_s),
            connections: Arc::new(Connections::new(
                config.max_connections,
                config.connections_per_tenant(),
                config.max_connections_per_session,
            )),
            ws: WsSettings {
                max_frame_bytes: config.max_body_bytes,
                ping_interval: Duration::from_secs_f64(config.ws_ping_interval_s),
                ops_per_second: config.ws_ops_per_second,
            },
            auth: Arc::new(auth),
        },
        &cors_origins,
    );
    let stopping = engine.clone();
    let http = HttpSettings {
        header_timeout: Duration::from_secs_f64(config.http_header_timeout_s),
        max_connections: config.max_http_connections,
        tls,
    };
    ready();
    serve_http(listener, app, http, async move {
        shutdown.await;
        stopping.begin_shutdown();
    })
    .await;
    engine
        .shutdown(Duration::from_millis(config.shutdown_grace_ms))
        .await;
    Ok(())
}

/// A server running in this process, for tests and the benchmark.
pub struct ServerHandle {
    pub addr: SocketAddr,
    /// Served over TLS (`https://`).
    pub tls: bool,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ServerHandle {
    /// Binds `config.listen` (use port 0 for an ephemeral port) and serves in the background.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let agents = AgentRegistry::from_config(&config.agents)?;
        Self::start_with_agents(config, agents).await
    }

    /// [`ServerHandle::start`] with an agent registry of the caller's.
    pub async fn start_with_agents(config: Config, agents: AgentRegistry) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        // What would stop the server at once is reported here, not by a task that ended.
        if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
            crate::api::tls::acceptor(cert, key)?;
        }
        Auth::from_config(config.auth.as_ref(), |name| std::env::var(name).ok())?;
        let tls = config.tls_cert.is_some();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_with_agents(
            config,
            agents,
            listener,
            async move {
                let _ = stopped.await;
            },
            || {},
        ));
        Ok(Self {
            addr,
            tls,
            stop: Some(stop),
            task,
        })
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Shuts down gracefully and waits for the server to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.context("server task")?
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
