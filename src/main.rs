//! The `baton` command: the server and its command-line clients.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use baton::client::{DEFAULT_SERVER, Remote};

/// The load generator (`baton bench`): part of the command, not of the server's library.
mod bench;
use baton::config::{Config, Overrides};

#[derive(Parser)]
#[command(
    name = "baton",
    version,
    about = "A session server for conversational agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the server is and how to reach it: the options of every remote command.
#[derive(clap::Args)]
struct RemoteArgs {
    /// URL of the Baton server.
    #[arg(long, env = "BATON_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    /// API key or session token (access control on); BATON_KEY by default.
    #[arg(long, env = "BATON_KEY", hide_env_values = true)]
    key: Option<String>,
    /// With an admin key: the tenant to act on (sent as Baton-Tenant).
    #[arg(long, env = "BATON_TENANT")]
    tenant: Option<String>,
    /// PEM file of CA certificates to trust besides the usual public ones (a private CA of an
    /// https:// server).
    #[arg(long, value_name = "FILE", env = "SSL_CERT_FILE")]
    cacert: Option<PathBuf>,
}

impl From<RemoteArgs> for Remote {
    fn from(args: RemoteArgs) -> Self {
        Remote {
            server: args.server,
            key: args.key,
            tenant: args.tenant,
            cacert: args.cacert,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (SQLite at ./baton.db, 127.0.0.1:7420, echo agent by default).
    Serve {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// HOST:PORT to listen on (overrides the file and BATON_LISTEN).
        #[arg(long)]
        listen: Option<String>,
        /// Database URL, e.g. sqlite://baton.db (overrides the file and BATON_DATABASE).
        #[arg(long)]
        database: Option<String>,
    },
    /// Send a message, stream the reply to stdout; non-zero exit unless it completed.
    Send {
        /// Session id (created with the default agent if it does not exist).
        session: String,
        /// The message to send.
        text: String,
        /// What to do if the session is busy: reject, enqueue (wait its turn) or interrupt
        /// (cancel what runs and what waits).
        #[arg(long, default_value = "reject", value_parser = policy_parser())]
        policy: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Chat with a session's agent interactively (/clear, /cancel, /help, /quit).
    Chat {
        /// Session id (created with the default agent if it does not exist).
        session: String,
        /// Switch the session to this agent first.
        #[arg(long)]
        agent: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Print the session's events as JSON lines, following live.
    Watch {
        /// Session id (an existing one: watching creates nothing).
        session: String,
        /// Start after this event seq (replays the stored ones after it).
        #[arg(long)]
        after: Option<i64>,
        /// Replay every retained event first.
        #[arg(long)]
        replay: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Load-test this build (and, optionally, the reference Python server side by side) and
    /// print the figures.
    Bench {
        /// Measure a running server at this URL instead of starting one.
        #[arg(long)]
        server: Option<String>,
        /// Folder of the reference Python server (with server.py), to measure it too, side by
        /// side in the same run: a FastAPI server with locks and one JSON file per session,
        /// used as a baseline. It is not part of Baton; give the path to your copy.
        #[arg(long)]
        peer: Option<PathBuf>,
        /// Python with the reference server's requirements installed (for --peer).
        #[arg(long, default_value = "python3")]
        peer_python: PathBuf,
        /// Seconds of the throughput measurement.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Sessions (concurrent workers) of the throughput scenario.
        #[arg(long, default_value_t = 64)]
        sessions: usize,
        /// Requests of the accept-latency scenario.
        #[arg(long, default_value_t = 2000)]
        accept_requests: usize,
        /// Sessions of the memory scenario (0 skips it).
        #[arg(long, default_value_t = 10_000)]
        memory_sessions: usize,
        /// Interactions per session of the memory scenario.
        #[arg(long, default_value_t = 10)]
        memory_interactions: usize,
        /// WebSocket subscribers of the fan-out scenario (0 skips it).
        #[arg(long, default_value_t = 1000)]
        fanout_subscribers: usize,
        /// Idle WebSocket connections of the idle-memory scenario (0 skips it).
        #[arg(long, default_value_t = 10_000)]
        idle_connections: usize,
        /// Cancels per agent kind in the cancel scenario (0 skips it).
        #[arg(long, default_value_t = 200)]
        cancel_rounds: usize,
        /// Ask/answer round trips of the ask scenario (0 skips it).
        #[arg(long, default_value_t = 200)]
        ask_rounds: usize,
        /// Sessions of the streams scenario, one WebSocket subscriber each, all streaming from
        /// a paced echo agent at once (0 skips it).
        #[arg(long, default_value_t = 1000)]
        streams: usize,
        /// Messages sent to each stream session, one after another.
        #[arg(long, default_value_t = 3)]
        stream_messages: usize,
        /// Words per message of the streams scenario (the agent streams one delta per word).
        #[arg(long, default_value_t = 50)]
        stream_words: usize,
        /// The paced agent's pause before each word, in ms (20: 50 words/s).
        #[arg(long, default_value_t = 20)]
        stream_delay_ms: u64,
        /// WebSocket subscribers of the fanout-burst and noisy scenarios.
        #[arg(long, default_value_t = 50)]
        burst_subscribers: usize,
        /// Words of the message echoed in the fanout-burst and noisy scenarios.
        #[arg(long, default_value_t = 50_000)]
        burst_words: usize,
        /// PostgreSQL URL of a role that may create databases, e.g.
        /// postgres://postgres@127.0.0.1:5432/postgres: enables the cluster scenario (a fresh
        /// database per configuration, dropped afterwards).
        #[arg(long, value_name = "ADMIN_URL")]
        postgres: Option<String>,
        /// Node counts of the cluster scenario.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        nodes: Vec<usize>,
        /// Run only these scenarios: throughput, accept, memory, fanout, idle, cancel, streams,
        /// ask, auth, fanout-burst, noisy, http, cluster (repeatable; all but auth,
        /// fanout-burst, noisy, http and cluster by default, cluster too with --postgres).
        #[arg(long)]
        only: Vec<String>,
    },
    /// List the sessions (of the key's tenant), by id; all of them unless --limit.
    Sessions {
        /// Print one page of this many sessions (the next page's cursor goes to stderr).
        #[arg(long)]
        limit: Option<u32>,
        /// Start after this cursor (printed by a previous page).
        #[arg(long)]
        after: Option<String>,
        /// Print one JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Delete a session: its running reply is cancelled, everything it holds is deleted.
    Delete {
        /// Session id.
        session: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Cancel the session's running (or waiting) reply; the queued messages then run.
    Cancel {
        /// Session id.
        session: String,
        /// Cancel this interaction (a queued one, say) instead of the running one.
        #[arg(long, value_name = "ID")]
        interaction: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Answer what a waiting interaction's agent asked; the reply then goes on.
    Answer {
        /// Session id.
        session: String,
        /// The waiting interaction's id.
        interaction: String,
        /// The answer: JSON if it parses as JSON (true, {"approved": true}), else the text.
        answer: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Manage API keys (access control).
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Print the interactions of a session, oldest first.
    History {
        /// Session id.
        session: String,
        /// Print one JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

/// The policies, as clap lists and checks them (the server's list, never a type name).
fn policy_parser() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(baton::model::Policy::ALL.iter().map(|p| p.as_str()))
}

#[derive(Subcommand)]
enum KeyAction {
    /// Print a new random API key (once: it is stored nowhere) and the [[auth.keys]] block,
    /// with the key's SHA-256, to paste into the configuration.
    New {
        /// The tenant the key acts on (1-64 characters of [a-z0-9_-]).
        #[arg(long)]
        tenant: String,
        /// tenant (its own sessions) or admin (any tenant with Baton-Tenant, and /metrics).
        #[arg(long, default_value = "tenant")]
        role: String,
        /// A name for the key in logs and metrics (default: the tenant and a random suffix).
        #[arg(long)]
        id: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match log_filter() {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only where a person reads them, never in a file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        .finish()
        .with(baton::logs::payload_caps())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli.command));
    // `chat`'s read of stdin runs on a blocking thread that cannot be cancelled: the runtime
    // does not wait for it (nothing else is left running once `run` has returned).
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    baton::cli::exit_code(outcome)
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve {
            config,
            listen,
            database,
        } => {
            let config = Config::load(&Overrides {
                config_file: config,
                listen,
                database,
            })?;
            let listener = tokio::net::TcpListener::bind(&config.listen)
                .await
                .with_context(|| format!("binding {}", config.listen))?;
            let addr = listener.local_addr()?;
            let database = config.database.clone();
            let scheme = if config.tls_cert.is_some() {
                "https"
            } else {
                "http"
            };
            baton::server::serve(config, listener, shutdown_signal(), || {
                tracing::info!(listen = %addr, database = %database, "baton serving");
                // A plain line on stdout, once requests are served, so that scripts and
                // tests can wait for it and find an ephemeral port.
                // A closed stdout must not stop the server: nobody is waiting for the line.
                let _ = baton::cli::out(&format!(
                    "baton listening on {scheme}://{addr}\nconsole: {scheme}://{}/console/\n",
                    baton::cli::reachable(addr)
                ));
            })
            .await?;
            tracing::info!("baton stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Send {
            session,
            text,
            policy,
            remote,
        } => baton::cli::send(&remote.into(), &session, &text, &policy).await,
        Command::Chat {
            session,
            agent,
            remote,
        } => baton::cli::chat(&remote.into(), &session, agent.as_deref()).await,
        Command::Watch {
            session,
            after,
            replay,
            remote,
        } => baton::cli::watch(&remote.into(), &session, after, replay).await,
        Command::Bench {
            server,
            peer,
            peer_python,
            duration,
            sessions,
            accept_requests,
            memory_sessions,
            memory_interactions,
            fanout_subscribers,
            idle_connections,
            cancel_rounds,
            ask_rounds,
            streams,
            stream_messages,
            stream_words,
            stream_delay_ms,
            burst_subscribers,
            burst_words,
            postgres,
            nodes,
            only,
        } => {
            bench::run(bench::BenchOptions {
                server,
                peer_dir: peer,
                peer_python,
                duration_s: duration,
                sessions,
                accept_requests,
                memory_sessions,
                memory_interactions,
                fanout_subscribers,
                idle_connections,
                cancel_rounds,
                ask_rounds,
                streams,
                stream_messages,
                stream_words,
                stream_delay_ms,
                burst_subscribers,
                burst_words,
                postgres,
                nodes,
                only,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::History {
            session,
            json,
            remote,
        } => baton::cli::history(&remote.into(), &session, json).await,
        Command::Sessions {
            limit,
            after,
            json,
            remote,
        } => baton::cli::sessions(&remote.into(), limit, after, json).await,
        Command::Delete { session, remote } => baton::cli::delete(&remote.into(), &session).await,
        Command::Cancel {
            session,
            interaction,
            remote,
        } => baton::cli::cancel(&remote.into(), &session, interaction.as_deref()).await,
        Command::Answer {
            session,
            interaction,
            answer,
            remote,
        } => baton::cli::answer(&remote.into(), &session, &interaction, &answer).await,
        Command::Key {
            action: KeyAction::New { tenant, role, id },
        } => {
            baton::cli::out(&baton::cli::new_key_block(&tenant, &role, id.as_deref())?)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `BATON_LOG` (tracing's `EnvFilter` syntax), `info` when unset; an invalid filter is an
/// error, never a silent fallback.
fn log_filter() -> anyhow::Result<EnvFilter> {
    match std::env::var("BATON_LOG") {
        Ok(value) => EnvFilter::builder()
            .parse(&value)
            .map_err(|e| anyhow::anyhow!("BATON_LOG={value:?} is not a valid log filter: {e}")),
        Err(std::env::VarError::NotPresent) => Ok(EnvFilter::new("info")),
        Err(std::env::VarError::NotUnicode(_)) => anyhow::bail!("BATON_LOG is not valid UTF-8"),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown requested");
}
