//! The `fulcrum` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// mimalloc: per-thread free lists and no lock on the way (5–6% fewer
/// instructions per request than glibc's malloc on new connections, HTTP/2
/// and gRPC; musl's, the image's, takes a global lock on every call).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (whose option numbers never change:
/// retired ones stay as `deprecated`); the bindings leave it out.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Memory freed after a burst goes back to the system 10 ms after its pages
/// empty (100 ms for whole arenas) rather than mimalloc 3's default second
/// (ten for arenas): idle connections then cost what they hold, 7–9 KiB,
/// instead of the burst's 30. `MIMALLOC_PURGE_DELAY` still decides when set.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of the allocator's integer options; mimalloc
        // reads options atomically and allows changing them at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10) };
    }
}

use clap::{Parser, Subcommand};
use fulcrum::balance::Algorithm;
use fulcrum::demo::DemoOptions;
use fulcrum::discovery::file::{DEFAULT_POLL, FileSource};
use fulcrum::discovery::kubernetes::{KubernetesSource, Watched};
use fulcrum::discovery::{ReloadResult, Snapshot, SourceMetrics};
use fulcrum::proxy::Proxy;
use tokio::signal::unix::{SignalKind, signal};

/// Fulcrum: a Kubernetes operator and Rust proxy that keep an application up
/// and spread its load well.
#[derive(Debug, Parser)]
#[command(name = "fulcrum", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the load-balancing proxy.
    ///
    /// Standalone (`--config FILE`): in front of the endpoints the file lists.
    /// The file is watched: a valid change applies within a second without
    /// dropping connections; an invalid one is logged and ignored. SIGHUP
    /// reloads at once.
    ///
    /// In Kubernetes (`--kubernetes APP`): the configuration comes from the
    /// ConfigMap APP-proxy and the endpoints from the EndpointSlices of the
    /// Services APP-backends and APP-canary-backends, watched with in-cluster
    /// credentials or the current kubeconfig context.
    ///
    /// SIGTERM drains and exits.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["config", "kubernetes"])))]
    Proxy {
        /// The YAML configuration file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
        /// Check the configuration file and exit (0 valid, 2 invalid).
        #[arg(long, requires = "config")]
        check: bool,
        /// Follow the LoadBalancedApp APP through the Kubernetes API.
        #[arg(long, value_name = "APP")]
        kubernetes: Option<String>,
        /// Namespace of the app (Kubernetes mode); default: the kubeconfig's.
        #[arg(long, env = "POD_NAMESPACE", requires = "kubernetes")]
        namespace: Option<String>,
        /// Client listener (Kubernetes mode; the ConfigMap's `listen` is ignored).
        #[arg(long, default_value = "0.0.0.0:15080", requires = "kubernetes")]
        listen: std::net::SocketAddr,
        /// Admin listener (Kubernetes mode; the ConfigMap's `admin` is ignored).
        #[arg(long, default_value = "0.0.0.0:15090", requires = "kubernetes")]
        admin: std::net::SocketAddr,
        /// After SIGTERM, keep serving (but answer /readyz with 503) for this
        /// long before closing the listener, so that Service endpoints and load
        /// balancers stop sending new connections first. Default: 5s with
        /// --kubernetes, 0s with --config.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        shutdown_delay: Option<std::time::Duration>,
    },
    /// Run the operator: reconcile every LoadBalancedApp in the cluster.
    ///
    /// Uses in-cluster credentials, or the current kubeconfig context outside a cluster.
    Operator {
        /// Proxy image for apps that do not name one.
        #[arg(long, env = "FULCRUM_PROXY_IMAGE", default_value = concat!("ghcr.io/fulcrum-dev/fulcrum:", env!("CARGO_PKG_VERSION")))]
        proxy_image: String,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, default_value = "0.0.0.0:8080")]
        health_addr: std::net::SocketAddr,
        /// Serve only the LoadBalancedApps of these namespaces (comma-separated),
        /// watching nothing elsewhere; all namespaces when unset.
        #[arg(long, env = "FULCRUM_NAMESPACES", value_delimiter = ',')]
        namespaces: Vec<String>,
    },
    /// Print the LoadBalancedApp CustomResourceDefinition (YAML) generated from the types.
    Crd,
    /// Print the objects the operator creates for a LoadBalancedApp file, without a cluster.
    ///
    /// The file is read as the API server would store it (defaults applied);
    /// the owner references carry a placeholder uid. Exit status 2, with the
    /// reason, when the operator could not reconcile it.
    Render {
        /// The LoadBalancedApp YAML file.
        #[arg(long, short = 'f', value_name = "FILE")]
        file: PathBuf,
        /// Namespace when the file names none.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Proxy image for apps that do not name one.
        #[arg(long, env = "FULCRUM_PROXY_IMAGE", default_value = concat!("ghcr.io/fulcrum-dev/fulcrum:", env!("CARGO_PKG_VERSION")))]
        proxy_image: String,
    },
    /// Show the proxy at work in about ten seconds, on this machine alone.
    ///
    /// Starts four backends on 127.0.0.2-5 (one ten times slower, one killed
    /// half-way), a proxy per algorithm and a load generator, then prints each
    /// backend's share, latency percentiles and errors per algorithm.
    Demo {
        /// Load time per algorithm.
        #[arg(long, default_value = "1200ms", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Concurrent clients.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
        concurrency: u16,
        /// Run only these algorithms (repeat the flag for several).
        #[arg(long = "algorithm", value_name = "NAME")]
        algorithms: Vec<Algorithm>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

/// Exit status for unusable input (a configuration error).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    match cli.command {
        Command::Proxy { config: Some(config), check, shutdown_delay, .. } => {
            init_tracing("info");
            proxy(config, check, shutdown_delay.unwrap_or(std::time::Duration::ZERO))
        }
        Command::Proxy { kubernetes: Some(app), namespace, listen, admin, shutdown_delay, .. } => {
            init_tracing("info");
            let delay = shutdown_delay.unwrap_or(std::time::Duration::from_secs(5));
            proxy_kubernetes(&app, namespace, listen, admin, delay)
        }
        Command::Proxy { .. } => {
            eprintln!("fulcrum proxy: give --config FILE or --kubernetes APP");
            ExitCode::from(EXIT_CONFIG)
        }
        Command::Operator { proxy_image, health_addr, namespaces } => {
            init_tracing("info");
            operator(proxy_image, health_addr, namespaces)
        }
        Command::Render { file, namespace, proxy_image } => render(&file, &namespace, proxy_image),
        Command::Crd => {
            print!("{}", fulcrum::api::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Demo { duration, concurrency, algorithms, quiet } => {
            // The demo's own output is the table; the proxies it runs log only errors.
            init_tracing("error");
            let opts = DemoOptions {
                algorithms: if algorithms.is_empty() { Algorithm::ALL.to_vec() } else { algorithms },
                duration,
                concurrency: usize::from(concurrency),
                progress: !quiet,
                ..DemoOptions::default()
            };
            demo(&opts)
        }
    }
}

fn render(file: &std::path::Path, namespace: &str, proxy_image: String) -> ExitCode {
    let invalid = |why: String| {
        eprintln!("fulcrum render: {}: {why}", file.display());
        ExitCode::from(EXIT_CONFIG)
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => return invalid(e.to_string()),
    };
    let first_line = |e: &dyn std::fmt::Display| e.to_string().lines().next().unwrap_or_default().to_owned();
    // Every LoadBalancedApp of the file; other objects beside them (an
    // autoscaler, a namespace) are not the operator's to render.
    let docs: Vec<serde_json::Value> = match serde_saphyr::from_multiple(&text) {
        Ok(d) => d,
        Err(e) => return invalid(format!("not YAML: {}", first_line(&e))),
    };
    let apps: Vec<_> = docs.into_iter().filter(|d| d["kind"] == "LoadBalancedApp").collect();
    if apps.is_empty() {
        return invalid("no LoadBalancedApp in the file".into());
    }
    let settings = fulcrum::operator::desired::Settings { proxy_image };
    for doc in apps {
        let mut app: fulcrum::api::LoadBalancedApp = match serde_json::from_value(doc) {
            Ok(a) => a,
            Err(e) => return invalid(format!("not a valid LoadBalancedApp: {}", first_line(&e))),
        };
        app.metadata.namespace.get_or_insert_with(|| namespace.to_owned());
        app.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
        let d = match fulcrum::operator::desired::desired(&app, &settings) {
            Ok(d) => d,
            Err(e) => return invalid(e.to_string()),
        };
        for o in d.objects() {
            match serde_saphyr::to_string(&o) {
                Ok(y) => print!("---\n{y}"),
                Err(e) => return invalid(e.to_string()),
            }
        }
    }
    ExitCode::SUCCESS
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .init();
}

/// The multi-threaded runtime for the background work of each command (the
/// proxy's workers run their own event loops).
fn async_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("fulcrum: cannot start the async runtime: {e}");
            None
        }
    }
}

fn demo(opts: &DemoOptions) -> ExitCode {
    let Some(runtime) = async_runtime() else { return ExitCode::FAILURE };
    println!(
        "fulcrum demo: 4 backends on 127.0.0.2-5, {} clients, {:?} per algorithm; b3 is 10x slower, b4 dies half-way.\n",
        opts.concurrency, opts.duration
    );
    match runtime.block_on(fulcrum::demo::run(opts)) {
        Ok(reports) => {
            print!("{}", fulcrum::demo::render(&reports));
            println!("\nShares are of the requests the backends answered; errors are requests the clients saw fail.");
        }
        Err(e) => {
            eprintln!("fulcrum demo: {e}");
            return ExitCode::FAILURE;
        }
    }
    const CALLS: usize = 600;
    println!("\ngRPC: one client channel (one HTTP/2 connection), {CALLS} unary calls, 3 backends on 127.0.0.2-4.\n");
    match runtime.block_on(fulcrum::demo::grpc::run(&opts.algorithms, CALLS)) {
        Ok(reports) => {
            print!("{}", fulcrum::demo::grpc::render(&reports));
            println!("\nA per-connection balancer sends the whole channel to one backend; Fulcrum balances each call.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fulcrum demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A client with in-cluster credentials, or the current kubeconfig context.
async fn kube_client(command: &str) -> Option<kube::Client> {
    match kube::Client::try_default().await {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("fulcrum {command}: no Kubernetes credentials (in-cluster or kubeconfig): {e}");
            None
        }
    }
}

fn operator(proxy_image: String, health_addr: std::net::SocketAddr, namespaces: Vec<String>) -> ExitCode {
    let Some(runtime) = async_runtime() else { return ExitCode::FAILURE };
    runtime.block_on(async move {
        let Some(client) = kube_client("operator").await else { return ExitCode::FAILURE };
        let health = match tokio::net::TcpListener::bind(health_addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("fulcrum operator: cannot listen on {health_addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let ctx = std::sync::Arc::new(
            fulcrum::operator::controller::Context::new(client, fulcrum::operator::desired::Settings { proxy_image })
                .confined_to(namespaces),
        );
        tokio::spawn(fulcrum::operator::health::serve(health, ctx.metrics.clone()));
        let namespace = ctx.client.default_namespace().to_owned();
        let identity = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| format!("fulcrum-operator-{}", std::process::id()));
        let lease = fulcrum::operator::leader::LeaseSettings {
            name: "fulcrum-operator".into(),
            namespace,
            identity,
            duration: 15,
            grace: 5,
        };
        tracing::info!(identity = %lease.identity, namespace = %lease.namespace, "operator started; waiting for the lease");
        let leader = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        match fulcrum::operator::leader::run_elected(ctx, lease, leader).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fulcrum operator: leader election failed: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn proxy(path: PathBuf, check: bool, shutdown_delay: std::time::Duration) -> ExitCode {
    let mut source = FileSource::new(&path, DEFAULT_POLL);
    let snapshot = match source.load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fulcrum: invalid configuration {}: {e}", path.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The certificate, key and CA files must load too.
    if let Err(e) = fulcrum::proxy::tls::check(&snapshot.config) {
        eprintln!("fulcrum: invalid configuration {}: {e}", path.display());
        return ExitCode::from(EXIT_CONFIG);
    }
    if check {
        println!("{}: valid", path.display());
        return ExitCode::SUCCESS;
    }
    let Some(runtime) = async_runtime() else { return ExitCode::FAILURE };
    runtime.block_on(async move {
        let proxy = match Proxy::bind(&snapshot).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("fulcrum: {e}");
                return ExitCode::FAILURE;
            }
        };
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(snapshot));
        let shared = proxy.shared();
        let trigger = source.trigger();
        tokio::spawn(source.watch(tx, move |r| shared.metrics.reload(r == ReloadResult::Applied)));
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            eprintln!("fulcrum: cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the configuration");
                trigger.notify_one();
            }
        });
        serve(proxy, rx, shutdown_delay).await
    })
}

/// Runs `proxy` with the snapshots of `updates` until SIGTERM or SIGINT, then
/// for `delay` more while not ready, then drains.
async fn serve(
    proxy: Proxy,
    updates: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    delay: std::time::Duration,
) -> ExitCode {
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        eprintln!("fulcrum: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let shared = proxy.shared();
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        if !delay.is_zero() {
            shared.start_draining();
            tracing::info!(
                delay_seconds = delay.as_secs_f64(),
                "not ready; still serving while load balancers stop sending new connections"
            );
            tokio::time::sleep(delay).await;
        }
    };
    proxy.run(updates, shutdown).await;
    ExitCode::SUCCESS
}

fn proxy_kubernetes(
    app: &str,
    namespace: Option<String>,
    listen: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    shutdown_delay: std::time::Duration,
) -> ExitCode {
    let Some(runtime) = async_runtime() else { return ExitCode::FAILURE };
    runtime.block_on(async move {
        let Some(client) = kube_client("proxy").await else { return ExitCode::FAILURE };
        let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
        let admin_listener = match tokio::net::TcpListener::bind(admin).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("fulcrum proxy: cannot listen on {admin} (--admin): {e}");
                return ExitCode::FAILURE;
            }
        };
        let metrics = SourceMetrics::default();
        let watched = Watched::for_app(&namespace, app, listen, admin);
        let (tx, mut found) = tokio::sync::watch::channel(None);
        tokio::spawn(KubernetesSource::new(client, watched, metrics.clone()).run(tx));
        // Alive but not ready until the first configuration and endpoint list.
        let mut first = found.clone();
        let admin_listener = fulcrum::proxy::serve_admin_until(admin_listener, async move {
            let _ = first.wait_for(Option::is_some).await;
        })
        .await;
        let Some(snapshot) = found.borrow_and_update().clone() else {
            eprintln!("fulcrum proxy: the discovery source stopped before the first configuration");
            return ExitCode::FAILURE;
        };
        let proxy = match Proxy::bind_with(&snapshot, Some(admin_listener), metrics).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("fulcrum proxy: {e}");
                return ExitCode::FAILURE;
            }
        };
        let (tx, rx) = tokio::sync::watch::channel(snapshot);
        tokio::spawn(async move {
            while found.changed().await.is_ok() {
                let next = found.borrow_and_update().clone();
                if let Some(next) = next {
                    tx.send_replace(next);
                }
            }
        });
        serve(proxy, rx, shutdown_delay).await
    })
}
