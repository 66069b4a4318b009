//! QEMU, the baseline shrink is measured against: the one CPU model every QEMU the project
//! starts uses, the command line of a `-M microvm` KVM guest, and a QMP client that reports a
//! QEMU that died as exactly that (its exit status and last output), not as a socket error.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The CPU model of every QEMU the project starts, on the command line as `-cpu CPU_MODEL`.
///
/// `host` gives the guest what KVM supports on this host, as shrink-vmm does (it passes
/// `KVM_GET_SUPPORTED_CPUID` through), so the two VMMs run the guest on the same features.
///
/// `-arch-capabilities` drops IA32_ARCH_CAPABILITIES (MSR 0x10a). With the feature on, QEMU
/// writes that MSR when it creates the vCPU. The nested (PVM) KVM of the development machines
/// advertises the feature on AMD EPYC hosts but refuses the write, and QEMU then aborts at start
/// (`failed to set MSR 0x10a to 0x69`, an assertion in `kvm_buf_set_msrs`); `-cpu max` does the
/// same. On Intel hosts and on bare-metal KVM the MSR only enumerates speculation mitigations,
/// which neither the project's guest nor Linux's early boot read, so turning it off changes
/// nothing there. `qemu64` would start everywhere too, but hides features shrink-vmm's guest
/// gets, and the comparison would no longer be like for like.
pub const CPU_MODEL: &str = "host,-arch-capabilities";

/// How many lines of QEMU's output an error quotes.
const TAIL_LINES: usize = 8;

/// How long a QEMU whose QMP connection broke is given to finish exiting.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// How long QEMU is given to create its QMP socket.
const SOCKET_WAIT: Duration = Duration::from_secs(30);

/// How long one QMP command may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong with a QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU is not installed.
    #[error("qemu-system-x86_64 is not installed: apt-get install qemu-system-x86 (or `make deps`)")]
    NotInstalled,
    /// QEMU could not be started (or its log created).
    #[error("QEMU ({tag}) cannot start: {source}")]
    Spawn {
        /// Which QEMU.
        tag: String,
        /// Cause.
        source: std::io::Error,
    },
    /// QEMU exited while it was expected to run.
    #[error("QEMU ({tag}) exited with {status} {during}; its last output ({log}):\n{tail}")]
    Exited {
        /// Which QEMU.
        tag: String,
        /// Its exit status.
        status: ExitStatus,
        /// What the project was doing with it.
        during: String,
        /// Its log file.
        log: String,
        /// The log's last lines.
        tail: String,
    },
    /// QEMU runs but never created its QMP socket.
    #[error("QEMU ({tag}) runs but created no QMP socket at {sock} in {secs} s; its last output:\n{tail}")]
    NoSocket {
        /// Which QEMU.
        tag: String,
        /// The socket's path.
        sock: String,
        /// How long it was given.
        secs: u64,
        /// The log's last lines.
        tail: String,
    },
    /// The QMP connection failed while QEMU still runs.
    #[error("QEMU ({tag}): QMP {command}: {source}")]
    Qmp {
        /// Which QEMU.
        tag: String,
        /// The command.
        command: String,
        /// Cause.
        source: std::io::Error,
    },
    /// QEMU answered a command with an error.
    #[error("QEMU ({tag}): QMP {command} failed: {error}")]
    Refused {
        /// Which QEMU.
        tag: String,
        /// The command.
        command: String,
        /// QEMU's error object.
        error: Value,
    },
}

/// QEMU's binary, if installed.
pub fn binary() -> Option<PathBuf> {
    ["/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64"].iter().map(PathBuf::from).find(|p| p.is_file())
}

/// The machine every QEMU the project starts emulates: `microvm`, set up for the project's
/// guest (`images/guest`, booted by PVH from `-kernel`):
/// - `acpi=off`: QEMU then names its virtio-mmio transports on the kernel command line
///   (`virtio_mmio.device=512@0xfeb00e00:12`), as shrink-vmm does; with ACPI it describes them
///   only in the DSDT, which the guest does not read;
/// - `ioapic2=off`: the transports' interrupts stay on the first IOAPIC (0xfec00000, GSIs 5 and
///   up), the one the guest programs.
pub const MACHINE: &str = "microvm,acpi=off,ioapic2=off";

/// The arguments of a [`MACHINE`] KVM guest with `mem` of memory, no default devices, no
/// display, the project's [`CPU_MODEL`], and modern (virtio 1.0) virtio-mmio transports, the
/// version shrink-vmm offers, rather than QEMU's legacy default.
pub fn microvm_args(mem: &str) -> Vec<String> {
    [
        "-M",
        MACHINE,
        "-global",
        "virtio-mmio.force-legacy=false",
        "-accel",
        "kvm",
        "-cpu",
        CPU_MODEL,
        "-m",
        mem,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A guest for [`microvm_args`]: the project's guest `kernel` with `cmdline`, its serial
/// console written to `serial`, and optionally a NIC (`-netdev tap` on the existing tap
/// `tap`, MAC `mac`) and a disk (virtio-blk on the qcow2 `disk`, node `d0`), the devices
/// shrink-vmm gives it with `--net` and `--disk`.
pub fn guest_args(
    kernel: &Path,
    cmdline: &str,
    serial: &Path,
    net: Option<(&str, &str)>,
    disk: Option<&Path>,
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-kernel".into(),
        kernel.display().to_string(),
        "-append".into(),
        cmdline.into(),
        "-serial".into(),
        format!("file:{}", serial.display()),
    ];
    if let Some((tap, mac)) = net {
        a.extend([
            "-netdev".into(),
            format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            "-device".into(),
            format!("virtio-net-device,netdev=n0,mac={mac}"),
        ]);
    }
    if let Some(d) = disk {
        a.extend([
            "-blockdev".into(),
            format!("driver=qcow2,node-name=d0,file.driver=file,file.filename={}", d.display()),
            "-device".into(),
            "virtio-blk-device,drive=d0".into(),
        ]);
    }
    a
}

/// The QMP argument that serves QMP on the Unix socket `sock`.
pub fn qmp_arg(sock: &Path) -> [String; 2] {
    ["-qmp".into(), format!("unix:{},server=on,wait=off", sock.display())]
}

/// A running QEMU and its QMP connection. Dropping it kills QEMU.
pub struct Qemu {
    tag: String,
    log: PathBuf,
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qemu {
    /// Starts QEMU through `cmd` (QEMU's binary from [`binary`], or a launcher of it such as
    /// `ip netns exec NS qemu-system-x86_64`) on the project's machine ([`microvm_args`]`(mem)`)
    /// with QMP at `<dir>/<tag>.qmp`, its output in `<dir>/<tag>.log`, then `extra`; see
    /// [`Qemu::attach`].
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(
        tag: &str,
        mut cmd: Command,
        dir: &Path,
        mem: &str,
        extra: &[S],
    ) -> Result<Qemu, QemuError> {
        let (log, sock) = (dir.join(format!("{tag}.log")), dir.join(format!("{tag}.qmp")));
        let _ = std::fs::remove_file(&sock);
        let mut spawn = || -> std::io::Result<Child> {
            let f = std::fs::File::create(&log)?;
            cmd.args(microvm_args(mem))
                .args(qmp_arg(&sock))
                .args(extra)
                .stdin(Stdio::null())
                .stdout(f.try_clone()?)
                .stderr(f)
                .spawn()
        };
        let child = spawn().map_err(|source| QemuError::Spawn { tag: tag.to_owned(), source })?;
        Qemu::attach(tag, child, &log, &sock)
    }

    /// Takes over `child`, a QEMU started with [`qmp_arg`]`(sock)` whose output goes to `log`,
    /// and connects to its QMP socket. A QEMU that exits before it answers is reported as
    /// [`QemuError::Exited`].
    pub fn attach(tag: &str, mut child: Child, log: &Path, sock: &Path) -> Result<Qemu, QemuError> {
        let start = Instant::now();
        let stream = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(exited(tag, status, "before its QMP socket answered", log));
            }
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < SOCKET_WAIT => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(QemuError::NoSocket {
                        tag: tag.into(),
                        sock: sock.display().to_string(),
                        secs: SOCKET_WAIT.as_secs(),
                        tail: crate::util::tail_lines(log, TAIL_LINES),
                    });
                }
            }
        };
        let reader = stream.try_clone().and_then(|r| {
            stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
            Ok(BufReader::new(r))
        });
        let mut q = match reader {
            Ok(reader) => Qemu { tag: tag.into(), log: log.into(), child, reader, writer: stream },
            Err(e) => return Err(QemuError::Qmp { tag: tag.into(), command: "connect".into(), source: e }),
        };
        let mut greeting = String::new();
        match q.reader.read_line(&mut greeting) {
            Ok(0) => return Err(q.broken("greeting", std::io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(e) => return Err(q.broken("greeting", e)),
        }
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// Which QEMU this is.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Runs QMP `command` and returns its `return` value.
    pub fn cmd(&mut self, command: &str, args: Value) -> Result<Value, QemuError> {
        if let Err(e) = writeln!(self.writer, "{}", json!({"execute": command, "arguments": args})) {
            return Err(self.broken(command, e));
        }
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(self.broken(command, std::io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) => return Err(self.broken(command, e)),
            }
            // Events (`{"event": ...}`) may come before the reply.
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if let Some(error) = v.get("error") {
                return Err(QemuError::Refused {
                    tag: self.tag.clone(),
                    command: command.into(),
                    error: error.clone(),
                });
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
        }
    }

    /// The error for a QMP connection that broke during `command`: QEMU's exit if it is
    /// exiting, else the socket error.
    fn broken(&mut self, command: &str, source: std::io::Error) -> QemuError {
        let start = Instant::now();
        while start.elapsed() < EXIT_GRACE {
            if let Ok(Some(status)) = self.child.try_wait() {
                return exited(&self.tag, status, &format!("during QMP {command}"), &self.log);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuError::Qmp { tag: self.tag.clone(), command: command.into(), source }
    }
}

/// Sets `q` (a migration's source or destination) up for `multifd` with 2 channels and zstd
/// compression, the set-up KubeVirt offers. Both ends need it, before the migration starts.
pub fn enable_multifd_zstd(q: &mut Qemu) -> Result<(), QemuError> {
    q.cmd("migrate-set-capabilities", json!({"capabilities": [{"capability": "multifd", "state": true}]}))?;
    q.cmd("migrate-set-parameters", json!({"multifd-channels": 2, "multifd-compression": "zstd"}))?;
    Ok(())
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn exited(tag: &str, status: ExitStatus, during: &str, log: &Path) -> QemuError {
    QemuError::Exited {
        tag: tag.into(),
        status,
        during: during.into(),
        log: log.display().to_string(),
        tail: crate::util::tail_lines(log, TAIL_LINES),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::TempDir;

    fn start(dir: &TempDir, tag: &str, extra: &[&str]) -> Result<Qemu, QemuError> {
        let bin = binary().ok_or(QemuError::NotInstalled)?;
        Qemu::spawn(tag, Command::new(bin), dir.path(), "64M", extra)
    }

    /// The chosen CPU model starts on this host's KVM, whatever its vendor: this is the check
    /// that fails on AMD EPYC under nested KVM with plain `-cpu host`.
    #[test]
    fn the_cpu_model_starts_on_this_host() {
        let dir = TempDir::new("qemu-start").unwrap();
        let mut q = start(&dir, "paused", &["-S"]).unwrap_or_else(|e| panic!("{e}"));
        let st = q.cmd("query-status", json!({})).unwrap();
        assert_eq!(st["status"], "prelaunch", "{st}");
    }

    /// A QEMU that dies at start is reported as QEMU's exit with its status and its own words,
    /// not as a QMP socket error.
    #[test]
    fn a_qemu_that_exits_early_is_named_with_its_status_and_output() {
        let dir = TempDir::new("qemu-early").unwrap();
        // Memory QEMU cannot map: it creates its QMP socket, then exits with an error.
        let e = match start(
            &dir,
            "doomed",
            &["-S", "-object", "memory-backend-file,id=m,size=64M,mem-path=/nonexistent/x"],
        ) {
            Err(e) => e,
            Ok(_) => panic!("QEMU started with an impossible memory backend"),
        };
        let text = e.to_string();
        match e {
            QemuError::Exited { status, tail, .. } => {
                assert!(!status.success(), "{text}");
                assert!(tail.contains("qemu-system-x86_64"), "QEMU's own message is quoted: {text}");
            }
            other => panic!("not reported as QEMU's exit: {other}"),
        }
        assert!(text.starts_with("QEMU (doomed) exited with exit status"), "{text}");
    }
}
