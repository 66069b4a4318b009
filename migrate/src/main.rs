//! `shrink-migrate`: drives live migrations.
//!
//! `shrink-migrate --vm SOCKET --to tcp:HOST:PORT` migrates one VM (whose destination VMM runs
//! `shrink-vmm --incoming tcp:HOST:PORT`), showing progress, and prints QEMU-style statistics.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use migrate::client::{ApiClient, QueryError, QUERY_MIGRATE};
use migrate::progress::{describe, Lines, Mode, Snapshot, Stall};
use migrate::stats::{SourceQuery, Status};
use serde_json::json;

/// Live-migrates a VM to another shrink-vmm, or a whole virtual cluster to another site.
///
/// One VM: `shrink-migrate --vm SOCKET --to tcp:HOST:PORT`.
/// A cluster: `shrink-migrate --cluster vc.toml --dest SITE` (see the README for vc.toml).
#[derive(Parser, Debug)]
#[command(name = "shrink-migrate", version, about)]
struct Args {
    /// The source VM's API socket.
    #[arg(long, value_name = "SOCKET", required_unless_present_any = ["cluster", "new_cluster_key"], requires = "to")]
    vm: Option<PathBuf>,

    /// Where the destination VMM listens (`shrink-vmm --incoming tcp:HOST:PORT`).
    #[arg(long, value_name = "tcp:HOST:PORT", requires = "vm")]
    to: Option<String>,

    /// Writes a new random cluster key to FILE (mode 0600; never overwrites) and exits. Copy it
    /// to the same path on every host, and name it in vc.toml (`cluster_key`) and to every VMM
    /// (`shrink-vmm --cluster-key`).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["vm", "cluster"])]
    new_cluster_key: Option<PathBuf>,

    /// The virtual cluster's description (sites, hosts, VMs).
    #[arg(long, value_name = "vc.toml", conflicts_with = "vm", requires = "dest")]
    cluster: Option<PathBuf>,

    /// The site to move the cluster to.
    #[arg(long, value_name = "SITE", requires = "cluster")]
    dest: Option<String>,

    /// Cluster: plain pre-copy, no deduplication (the baseline).
    #[arg(long)]
    no_dedup: bool,

    /// Cluster: do not send content equal to the base image's as digests read from the
    /// destination's repository (disks still carry only their own blocks): to measure what the
    /// repository adds.
    #[arg(long, requires = "cluster")]
    no_repository: bool,

    /// Cluster: deduplication granularity in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 4096, value_parser = parse_chunk)]
    chunk: u32,

    /// With --vm: the source site's repository index (`shrink-repo index`): the disk's base
    /// image is recognised there, and content the destination's repository holds (memory pages
    /// and disk blocks equal to the base image's) travels as digests. (A cluster move finds it
    /// in vc.toml: each site's `index`.)
    #[arg(long, value_name = "redis://HOST:PORT", requires = "vm")]
    repository: Option<String>,

    /// Cluster: digest of deduplicated chunks.
    #[arg(long, value_name = "ALGO", default_value = "sha256", value_parser = ["sha256", "sha1"])]
    digest: String,

    /// Cluster: first TCP port of the destination VMMs (one per VM; peer servers use +100)
    /// [default: a random base between 20000 and 59000, so that VMMs of earlier migrations,
    /// still serving their peers, are not in the way].
    #[arg(long, value_name = "PORT")]
    port_base: Option<u16>,

    /// Longest acceptable pause of the guest, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    downtime_limit_ms: u64,

    /// Upper bound of the migration traffic, bytes per second.
    #[arg(long, value_name = "BYTES_PER_S")]
    max_bandwidth: Option<u64>,

    /// Give up after this many passes without converging.
    #[arg(long, value_name = "N")]
    max_iterations: Option<u32>,

    /// Throttle a guest that dirties memory faster than the link carries it.
    #[arg(long)]
    auto_converge: bool,

    /// With --vm: send full chunks compressed with zstd when it pays (a cluster move always
    /// does, unless --no-dedup).
    #[arg(long, requires = "vm")]
    compress: bool,

    /// Check end to end: the source sends a digest of all guest memory at pause and the
    /// destination refuses a copy that differs (costs downtime: memory is hashed twice).
    #[arg(long)]
    verify: bool,

    /// Print the final statistics as JSON on standard output (progress, if any, goes to
    /// standard error as lines, not bars).
    #[arg(long)]
    json: bool,

    /// No progress display. (By default: bars when standard error is a terminal, otherwise a
    /// line per VM every 5 s and one when it ends; a stream that sent nothing for 10 s is
    /// shown as stalled.)
    #[arg(long)]
    quiet: bool,

    /// Log level or filter of shrink-migrate's own messages on standard error (`error`,
    /// `warn`, `info`, `debug`, `trace`, or a filter such as `migrate=debug`).
    #[arg(long, value_name = "LEVEL", default_value = "warn", value_parser = parse_log)]
    log: String,

    /// Also write the final statistics (or the cluster report) as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    report: Option<std::path::PathBuf>,

    /// With --cluster: how long a destination waits without progress for content that other
    /// VMs' streams bring before pulling it from its source (default: 250 ms per VM moving,
    /// 500 to 3000 ms).
    #[arg(long, value_name = "MS", requires = "cluster")]
    pull_wait_ms: Option<u64>,

    /// With --cluster: coordinate in an earlier run's namespace (the `run_id` of its report)
    /// instead of a fresh one, for a later wave of the same move: its chunks registered then
    /// travel as digests. Only while the VMs that run moved still run at the destination, or
    /// their content looks sent and is pulled from the source.
    #[arg(long, value_name = "RUN_ID", requires = "cluster")]
    join_run: Option<String>,

    /// With --cluster: leave the cluster file as it is (by default the moved VMs' `host` and
    /// `api` are rewritten to where they run now, comments and layout kept).
    #[arg(long, requires = "cluster")]
    keep_cluster_file: bool,
}

/// Writes `v` to `--report FILE` if asked; a failure is reported, not fatal.
fn write_report(path: &Option<std::path::PathBuf>, v: &impl serde::Serialize) {
    if let Some(p) = path {
        if let Err(e) = std::fs::write(p, serde_json::to_string_pretty(v).unwrap_or_default()) {
            eprintln!("shrink-migrate: warning: --report {}: {e}", p.display());
        }
    }
}

fn parse_chunk(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(c) if migrate::protocol::CHUNK_SIZES.contains(&(c as usize)) => Ok(c),
        _ => Err(format!("'{s}': the chunk size is one of {:?}", migrate::protocol::CHUNK_SIZES)),
    }
}

fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", U[i])
}

/// How the migration of one VM ended: the source's last `query-migrate` answer.
struct Outcome {
    /// The source's last answer.
    last: SourceQuery,
    /// The source VMM went away while its last answer said the migration was going on (`setup`
    /// or `active`): it may have completed or died. Shown with the status `unknown`.
    vanished: bool,
}

impl Outcome {
    /// The status as shown: QEMU's, or `unknown`.
    fn status(&self) -> &'static str {
        if self.vanished {
            "unknown"
        } else {
            self.last.info.status.as_str()
        }
    }

    fn completed(&self) -> bool {
        !self.vanished && self.last.info.status == Status::Completed
    }
}

/// The answer as the source gave it, but for the status of one that vanished.
impl serde::Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut v = serde_json::to_value(&self.last).map_err(serde::ser::Error::custom)?;
        if self.vanished {
            v["status"] = json!(self.status());
        }
        v.serialize(s)
    }
}

/// Prints the statistics the way `info migrate` does.
fn print_stats(o: &Outcome) {
    let (info, ram) = (&o.last.info, &o.last.info.ram);
    println!("status: {}", o.status());
    if let Some(e) = &info.error {
        println!("error: {e}");
    }
    println!("total time: {} ms", info.total_time);
    println!("setup time: {} ms", info.setup_time);
    match info.downtime {
        Some(d) => println!("downtime: {d} ms"),
        None => println!("expected downtime: {} ms", info.expected_downtime),
    }
    println!("transferred ram: {} ({} bytes)", human_bytes(ram.transferred), ram.transferred);
    println!("total ram: {}", human_bytes(ram.total));
    println!("remaining ram: {} bytes", ram.remaining);
    println!("duplicate: {} pages", ram.duplicate);
    println!("normal: {} pages", ram.normal);
    println!("normal bytes: {} kbytes", ram.normal_bytes / 1024);
    println!("dirty sync count: {}", ram.dirty_sync_count);
    println!("pages-per-second: {}", ram.pages_per_second);
    println!("mbps: {:.2}", ram.mbps);
    println!("dirty pages rate: {} pages/s", ram.dirty_pages_rate);
    println!("cpu throttle percentage: {}", info.cpu_throttle_percentage);
    if let Some(d) = &info.disk {
        println!("transferred disk: {} ({} bytes)", human_bytes(d.transferred), d.transferred);
        println!("total disk: {}", human_bytes(d.total));
        println!("disk blocks: {} full, {} uniform, {} as digests", d.normal, d.duplicate, d.deduplicated);
        if let Some(w) = &d.warning {
            println!("disk warning: {w}");
        }
    }
    if let Some(s) = &o.last.dedup {
        println!("from the destination's repository: {} chunks", s.repository);
    }
}

fn run(args: &Args) -> Result<Outcome, String> {
    let vm = args.vm.clone().expect("clap requires --vm");
    let to = args.to.clone().expect("clap requires --to");
    let connect = || ApiClient::connect(&vm).map_err(|e| format!("cannot connect to {}: {e}", vm.display()));
    let mut api = connect()?;
    let margs = migrate::args::MigrateArgs {
        uri: to,
        downtime_limit_ms: Some(args.downtime_limit_ms),
        max_bandwidth: args.max_bandwidth,
        max_iterations: args.max_iterations,
        auto_converge: args.auto_converge,
        verify: args.verify,
        compress: args.compress,
        repository: args.repository.clone(),
        // One VM alone: no coordination, only the repository's content as digests.
        dedup: args.repository.as_ref().map(|_| migrate::args::DedupArgs {
            coordination: String::new(),
            migration_id: "single".into(),
            dest_site: "destination".into(),
            digest: args.digest.clone(),
            chunk: args.chunk,
            ttl_s: migrate::args::DEFAULT_TTL_S,
        }),
        ..Default::default()
    }
    .to_json();
    api.execute("migrate", margs)
        .map_err(|e| format!("{}: {e}", vm.display()))?
        .map_err(|e| format!("migrate: {e}"))?;
    let mode = progress_mode(args);
    let bar = if mode != Mode::Bars {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    };
    let mut last = SourceQuery::default();
    let (mut stall, mut lines) = (Stall::new(Instant::now()), Lines::new(Instant::now()));
    loop {
        std::thread::sleep(Duration::from_millis(100));
        // Once the destination confirms, the source VMM exits: its last answer is final, and a
        // vanished socket after an active migration means it completed.
        let q = match api.query_migrate::<SourceQuery>() {
            Ok(q) => q,
            Err(QueryError::Refused(e)) => return Err(format!("{QUERY_MIGRATE}: {e}")),
            Err(QueryError::Answer(e)) => return Err(format!("unexpected {QUERY_MIGRATE} answer: {e}")),
            Err(QueryError::Io(_)) => {
                bar.finish_and_clear();
                // The source VMM lingers a second after a completion to answer this; gone
                // without saying so, it may have completed or died: check the destination.
                let vanished = matches!(last.info.status, Status::Active | Status::Setup);
                if vanished {
                    last.info.error =
                        Some("the source VMM exited before reporting the end: check the destination".into());
                }
                return Ok(Outcome { last, vanished });
            }
        };
        let (info, ram) = (&q.info, &q.info.ram);
        let snapshot = Snapshot::of(info);
        let stalled = stall.observe(snapshot.sent, Instant::now());
        bar.set_length(ram.total);
        bar.set_position(ram.total.saturating_sub(ram.remaining));
        bar.set_message(format!("{:.0} Mbit/s, {}", ram.mbps, describe(&snapshot, stalled)));
        let ended = matches!(info.status, Status::Completed | Status::Failed | Status::Cancelled);
        if mode == Mode::Lines && !ended && lines.due(Instant::now()) {
            eprintln!("shrink-migrate: {}: {:.0} Mbit/s, {}", vm.display(), ram.mbps, describe(&snapshot, stalled));
        }
        last = q;
        if ended {
            bar.finish_and_clear();
            return Ok(Outcome { last, vanished: false });
        }
    }
}

fn run_cluster(args: &Args) -> ExitCode {
    let opts = migrate::orchestrate::ClusterOptions {
        file: args.cluster.clone().expect("clap requires --cluster"),
        dest: args.dest.clone().expect("clap requires --dest"),
        no_dedup: args.no_dedup,
        no_repository: args.no_repository,
        chunk: args.chunk,
        digest: args.digest.clone(),
        verify: args.verify,
        downtime_limit_ms: args.downtime_limit_ms,
        port_base: args.port_base.unwrap_or_else(|| {
            let r = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            20000 + (r % 390) as u16 * 100
        }),
        progress: progress_mode(args),
        update_file: !args.keep_cluster_file,
        pull_wait_ms: args.pull_wait_ms,
        join_run: args.join_run.clone(),
    };
    conclude(
        migrate::orchestrate::run(&opts).map_err(|e| e.to_string()),
        args,
        migrate::orchestrate::print_report,
        |r| r.failed == 0,
    )
}

/// Writes `--report`, prints the outcome (JSON or for a person) and turns it into the exit code.
fn conclude<T: serde::Serialize>(r: Result<T, String>, args: &Args, print: fn(&T), ok: fn(&T) -> bool) -> ExitCode {
    match r {
        Ok(out) => {
            write_report(&args.report, &out);
            if args.json {
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            } else {
                print(&out);
            }
            if ok(&out) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("shrink-migrate: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--log`: a filter `tracing_subscriber` accepts, or an error that names what is wrong.
fn parse_log(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("not a log level or filter: {e}"))
}

/// How progress is shown: bars on a terminal (unless `--json`), lines elsewhere, nothing with
/// `--quiet`.
fn progress_mode(args: &Args) -> Mode {
    use std::io::IsTerminal;
    Mode::choose(std::io::stderr().is_terminal() && !args.json, args.quiet)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if let Some(path) = &args.new_cluster_key {
        let made = indexd::tls::ClusterKey::generate().and_then(|k| k.write_new(path).map(|()| k));
        return match made {
            Ok(k) => {
                println!("{}: a new cluster key, fingerprint {}", path.display(), k.fingerprint());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("shrink-migrate: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.cluster.is_some() {
        return run_cluster(&args);
    }
    let r = run(&args);
    conclude(r, &args, print_stats, Outcome::completed)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    #[test]
    fn the_outcome_shows_the_sources_answer_as_it_came() {
        let mut q = SourceQuery::default();
        q.info.status = Status::Active;
        q.info.ram.transferred = 42;
        q.info.ram.mbps = 812.5;
        q.dedup = Some(Default::default());
        // What the VMM sends, as the client parses it.
        let wire: Value = serde_json::from_str(&serde_json::to_string(&q).unwrap()).unwrap();
        let back: SourceQuery = serde_json::from_value(wire.clone()).unwrap();
        let shown = |o: &Outcome| serde_json::to_string_pretty(o).unwrap();
        let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap();
        assert_eq!(shown(&Outcome { last: back.clone(), vanished: false }), pretty(&wire));
        // A source gone mid-migration: its last answer, the status `unknown` and why.
        let mut expected = wire;
        expected["status"] = json!("unknown");
        expected["error-desc"] = json!("gone");
        let mut last = back;
        last.info.error = Some("gone".into());
        let o = Outcome { last, vanished: true };
        assert_eq!((shown(&o), o.status(), o.completed()), (pretty(&expected), "unknown", false));
    }
}
