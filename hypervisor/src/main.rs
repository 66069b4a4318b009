//! `shrink-vmm`: boot or restore a VM and serve its control API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hypervisor::api::ApiServer;
use hypervisor::config::{parse_cpus, parse_mem_size, SerialOutput, VmConfig};
use hypervisor::control::{self, Controller, Exit};
use hypervisor::devices::virtio::block::DiskConfig;
use hypervisor::devices::virtio::net::NetConfig;
use hypervisor::loader::KernelConfig;
use hypervisor::migration::{self, IncomingOptions};
use hypervisor::vmm::DeviceConfig;
use hypervisor::vmm::Vmm;
use migrate::shrinker::SiteOptions;

/// A KVM virtual machine monitor with snapshot/restore and live-migration support.
///
/// Boot: `shrink-vmm --kernel images/out/shrink-guest --mem 256M --cmdline "workload=idle"
/// --api /run/shrink/vm1.sock --name vm1`. Restore: `shrink-vmm --restore DIR --api SOCK`.
#[derive(Parser, Debug)]
#[command(name = "shrink-vmm", version, about, long_about = None)]
struct Args {
    /// Kernel to boot: an ELF (the project's guest, a Linux vmlinux) or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["restore", "incoming"])]
    kernel: Option<PathBuf>,

    /// Initial ramdisk for a Linux kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = "")]
    cmdline: String,

    /// Guest memory size (e.g. 256M, 1G; at least 32M).
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    mem: String,

    /// vCPUs (1 to 32), listed in the MP table and the ACPI MADT; vCPU 0 boots, the guest
    /// starts the others with INIT and start-up IPIs.
    #[arg(long, value_name = "N", default_value = "1")]
    cpus: String,

    /// Control API socket (JSON, one object per line; see the README).
    #[arg(long, value_name = "PATH")]
    api: Option<PathBuf>,

    /// VM name, reported by `status`.
    #[arg(long, value_name = "NAME", default_value = "vm")]
    name: String,

    /// Write the guest's serial console to FILE instead of standard output.
    #[arg(long, value_name = "FILE")]
    serial: Option<PathBuf>,

    /// A NIC backed by a tap device, created if absent and attached to BR when given
    /// (repeatable).
    #[arg(long, value_name = "tap=NAME,mac=MAC[,bridge=BR]")]
    net: Vec<String>,

    /// Base disk image (qcow2) shared by VMs; the VM writes to its own overlay (--disk).
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,

    /// The VM's qcow2 overlay of --image: reused when it exists, created otherwise
    /// [default: NAME.qcow2 beside the base image].
    #[arg(long, value_name = "PATH", requires = "image")]
    disk: Option<PathBuf>,

    /// Restore the VM from a snapshot directory written by the `snapshot` command.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "mem", "cpus", "net", "image"])]
    restore: Option<PathBuf>,

    /// Receive a live migration on tcp:ADDR:PORT instead of booting; --net, --image and --disk
    /// give this host's backends (default: the source's). A guest with a disk needs --image
    /// (this site's copy of its base image) and --disk (a new file: the migrated overlay).
    #[arg(long, value_name = "tcp:ADDR:PORT", conflicts_with_all = ["kernel", "initrd", "mem", "cpus", "restore", "paused"])]
    incoming: Option<String>,

    /// With --incoming: the destination site's index Redis (one URL, or several comma-separated
    /// for a Redis Cluster); enables content-based addressing of deduplicated chunks. `@FILE`
    /// reads it from FILE, which keeps a password out of the command line.
    #[arg(long, value_name = "redis://HOST:PORT", requires = "incoming")]
    index: Option<String>,

    /// With --incoming: where this site's image repository is indexed (`shrink-repo index`)
    /// [default: --index]. Without either, the base image is read to find its digest. `@FILE`
    /// reads it from FILE.
    #[arg(long, value_name = "redis://HOST:PORT", requires = "incoming")]
    repository: Option<String>,

    /// With --index: where this VMM serves chunks to the site's other hypervisors.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:0", requires = "incoming")]
    peer_listen: String,

    /// With --index: the address the site's other hypervisors use to reach this one
    /// [default: the listening address].
    #[arg(long, value_name = "HOST:PORT", requires = "incoming")]
    peer_advertise: Option<String>,

    /// With --incoming: how long content the site does not hold yet may stop arriving (other
    /// VMs' streams bring it) before it is pulled from the source, while the guest still runs
    /// there. Once the source has paused the guest, what is missing is pulled at once.
    #[arg(long, value_name = "MS", default_value_t = migrate::precopy::DEFAULT_PULL_WAIT_MS, requires = "incoming")]
    pull_wait_ms: u64,

    /// The cluster key (a file made by `shrink-migrate --new-cluster-key`, mode 0600): migration
    /// streams and peer fetches use TLS 1.3 with mutual authentication on it, and only hosts
    /// holding the same key are accepted. Migrating needs this or --plain-tcp.
    #[arg(long, value_name = "FILE", conflicts_with = "plain_tcp")]
    cluster_key: Option<PathBuf>,

    /// Migrate (and serve peers) over plain TCP, in clear text and unauthenticated: only for a
    /// network that is trusted end to end.
    #[arg(long)]
    plain_tcp: bool,

    /// Start with the vCPUs paused (resume through the API).
    #[arg(long)]
    paused: bool,

    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, value_name = "FILTER", default_value = "warn")]
    log: String,
}

/// A value given as `@FILE` is read from FILE (trimmed): how secrets such as Redis passwords
/// reach the VMM without appearing in its command line.
fn from_file(v: &Option<String>) -> Result<Option<String>, String> {
    match v.as_deref().and_then(|v| v.strip_prefix('@')) {
        Some(path) => {
            std::fs::read_to_string(path).map(|s| Some(s.trim().to_owned())).map_err(|e| format!("{path}: {e}"))
        }
        None => Ok(v.clone()),
    }
}

fn run(args: Args) -> Result<Exit, String> {
    let serial = match &args.serial {
        Some(p) => SerialOutput::File(p.clone()),
        None => SerialOutput::Stdout,
    };
    // A key that cannot be used is reported before anything starts.
    let transport =
        indexd::tls::Transport::configured(args.cluster_key.as_deref(), args.plain_tcp).map_err(|e| e.to_string())?;
    if args.incoming.is_some() && transport.is_none() {
        return Err(migration::NO_TRANSPORT.into());
    }
    let net = args.net.iter().map(|n| NetConfig::parse(n).map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?;
    // Absolute paths: `status` reports them, and an orchestrator acts on them from elsewhere.
    let absolute = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let disk = args.image.as_ref().map(|base| DiskConfig {
        base: absolute(base),
        overlay: absolute(&args.disk.clone().unwrap_or_else(|| {
            base.parent().unwrap_or(std::path::Path::new(".")).join(format!("{}.qcow2", args.name))
        })),
        standalone: false,
    });
    // An incoming migration's port is bound before the API socket appears: whoever waits for
    // the socket (shrink-migrate) may start the source at once.
    let listener = args.incoming.as_deref().map(migration::listen).transpose().map_err(|e| e.to_string())?;
    // The API listens before any guest runs, so a socket that is in use is reported first;
    // its requests wait in the channel until the VM exists (or, for an incoming migration, are
    // served meanwhile by `WaitingApi`).
    let (tx, mut rx) = std::sync::mpsc::channel();
    let _server = match &args.api {
        Some(p) => Some(ApiServer::start(p, tx.clone()).map_err(|e| e.to_string())?),
        None => None,
    };
    control::install_signal_handlers();
    let name = (args.name != "vm").then(|| args.name.clone());
    let mut incoming_stats = None;
    let vmm = if let Some(dir) = &args.restore {
        Vmm::restore(dir, name, &serial, args.paused).map_err(|e| e.to_string())?
    } else if let Some(listener) = listener {
        let mut devices: Vec<DeviceConfig> = disk.iter().map(|d| DeviceConfig::Block(d.clone())).collect();
        devices.extend(net.iter().map(|n| DeviceConfig::Net(n.clone())));
        let site = Some(SiteOptions {
            index: from_file(&args.index)?,
            peer_listen: args.peer_listen.clone(),
            peer_advertise: args.peer_advertise.clone(),
            wait: std::time::Duration::from_millis(args.pull_wait_ms),
            transport: transport.clone().expect("checked above"),
        });
        let opts = IncomingOptions {
            name,
            serial,
            devices: (!devices.is_empty()).then_some(devices),
            site,
            repository: from_file(&args.repository)?,
        };
        // No VM yet: the API answers status, query-migrate and quit meanwhile (only quit once a
        // source has connected; the rest then waits for the VM).
        let waiting =
            control::WaitingApi::start(rx, tx.clone()).map_err(|e| format!("cannot start the API thread: {e}"))?;
        let t = transport.as_ref().expect("checked above");
        let r = migration::incoming(listener, opts, t, || waiting.connected());
        rx = waiting.finish();
        let (vmm, stats, site) = r.map_err(|e| e.to_string())?;
        tracing::info!("incoming migration done: {stats:?}");
        incoming_stats = Some((stats, site));
        vmm
    } else {
        let mem_size = parse_mem_size(&args.mem).map_err(|e| e.to_string())?;
        let vcpus = parse_cpus(&args.cpus).map_err(|e| e.to_string())?;
        let cfg = VmConfig {
            name: args.name.clone(),
            mem_size,
            vcpus,
            kernel: KernelConfig {
                kernel: args.kernel.clone().expect("clap requires --kernel without --restore"),
                initrd: args.initrd.clone(),
                cmdline: args.cmdline.clone(),
            },
            serial,
            start_paused: args.paused,
            net,
            disk,
        };
        Vmm::boot(&cfg).map_err(|e| e.to_string())?
    };
    let mut controller = Controller::with_channel(vmm, tx, rx);
    controller.set_transport(transport);
    if let Some((stats, site)) = incoming_stats {
        controller.set_incoming(stats, site);
    }
    let exit = controller.run();
    controller.shutdown();
    Ok(exit)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(args) {
        Ok(Exit::Quit) | Ok(Exit::Signal) => ExitCode::SUCCESS,
        Ok(Exit::Migrated) => {
            eprintln!("shrink-vmm: the guest was migrated and runs at the destination");
            ExitCode::SUCCESS
        }
        Ok(Exit::GuestStopped(reason)) => {
            eprintln!("shrink-vmm: {reason}");
            if reason.contains("reset") {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("shrink-vmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}
