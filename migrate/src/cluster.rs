//! The description of a virtual cluster and its sites (`vc.toml`), as `shrink-migrate
//! --cluster vc.toml --dest SITE` reads it.
//!
//! ```toml
//! migration_id = "demo"          # optional: default is made from the time; each run
//!                                # coordinates under it plus a nonce of its own (`run_id`)
//! vmm = "/usr/local/bin/shrink-vmm"   # optional: the VMM started on destination hosts
//! workdir = "/var/tmp/shrink"    # optional: logs and sockets of destination VMMs
//! cluster_key = "/etc/shrink/cluster.key"   # TLS between the hosts: the key file, same path on
//!                                # every host (`shrink-migrate --new-cluster-key FILE`);
//!                                # or `plain_tcp = true` for clear text on a trusted network
//!
//! [[sites]]
//! name = "siteA"
//! coordination = "redis://10.10.0.100:6379"   # SET NX of pages sent from this site
//! index = "redis://10.10.0.100:6380"          # SADD/SRANDMEMBER of pages held at this site
//! launch = "ip netns exec {host} {cmd}"       # how to run a command on a host of the site
//! gateway = "gwA"                             # informational (vnetd runs there)
//! repository = "/srv/siteA/repo/base.qcow2"   # this site's copy of the base image (`shrink-repo index`ed)
//! storage = "/srv/siteA/disks"                # where VMs moved here get their disks
//!
//! [[sites.hosts]]
//! name = "hostA1"
//! address = "10.10.0.11"                      # migration and peer traffic
//!
//! [[vms]]
//! name = "vm1"
//! host = "hostA1"                             # where it runs now
//! api = "/run/shrink/vm1.sock"                # its VMM's control socket
//! dest_host = "hostB1"                        # optional: else spread over the site's hosts
//! ```
//!
//! Redis URLs may list several nodes, comma-separated, for a Redis Cluster. Errors name the
//! line and the field.

use std::collections::HashMap;
use std::ops::Range;

use serde::Deserialize;

/// Errors in a cluster description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClusterError {
    /// Not TOML, or a field of the wrong type, or a missing field.
    #[error("{file}: {msg}")]
    Syntax {
        /// The file.
        file: String,
        /// toml's message (line and column included).
        msg: String,
    },
    /// A destination that is not a site of the file.
    #[error("--dest {site}: no such site (sites: {sites})")]
    NoSuchSite {
        /// The name asked for.
        site: String,
        /// The sites there are.
        sites: String,
    },
    /// A field whose value makes no sense.
    #[error("{file}:{line}: {field}: {why}")]
    Field {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// `vms[2].host` and the like.
        field: String,
        /// What is wrong.
        why: String,
    },
}

/// A value with where it stands in the file.
pub type Spanned<T> = toml::Spanned<T>;

/// A host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// Its name (what `{host}` becomes in the launch template).
    pub name: Spanned<String>,
    /// Its address for migration and peer traffic.
    pub address: Spanned<String>,
}

/// A site.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Its name.
    pub name: Spanned<String>,
    /// Coordination Redis (source side of a migration).
    pub coordination: Spanned<String>,
    /// Index Redis (destination side).
    pub index: Spanned<String>,
    /// Command template with `{host}` and `{cmd}`.
    pub launch: Spanned<String>,
    /// The gateway's name.
    #[serde(default)]
    pub gateway: Option<String>,
    /// This site's copy of the VMs' base image (its image repository), as its hosts see it.
    #[serde(default)]
    pub repository: Option<Spanned<String>>,
    /// The directory of this site's hosts where migrated VMs' disks (overlays) go.
    #[serde(default)]
    pub storage: Option<Spanned<String>>,
    /// Its hosts.
    pub hosts: Vec<Host>,
}

/// A VM of the cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Its name.
    pub name: Spanned<String>,
    /// The host it runs on.
    pub host: Spanned<String>,
    /// Its VMM's API socket.
    pub api: Spanned<String>,
    /// Where it should go (optional).
    #[serde(default)]
    pub dest_host: Option<Spanned<String>>,
}

/// A cluster description.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// Migration id.
    #[serde(default)]
    pub migration_id: Option<String>,
    /// VMM binary on destination hosts.
    #[serde(default)]
    pub vmm: Option<String>,
    /// Working directory of destination VMMs.
    #[serde(default)]
    pub workdir: Option<String>,
    /// The cluster key's path on the hosts: migrations and peer fetches use TLS on it.
    #[serde(default)]
    pub cluster_key: Option<Spanned<String>>,
    /// Migrate in clear text instead (explicitly).
    #[serde(default)]
    pub plain_tcp: Option<Spanned<bool>>,
    /// Sites.
    pub sites: Vec<Site>,
    /// VMs.
    pub vms: Vec<Vm>,
}

/// One VM's move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// VM name.
    pub vm: String,
    /// Its source VMM's API socket.
    pub api: String,
    /// Source site.
    pub from_site: String,
    /// Source host.
    pub from_host: String,
    /// Destination host.
    pub to_host: String,
    /// Destination host's address.
    pub to_address: String,
}

/// A checked description.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// What the file says.
    pub file: ClusterFile,
}

fn line_of(text: &str, span: Range<usize>) -> usize {
    text[..span.start.min(text.len())].matches('\n').count() + 1
}

/// The one rule for Redis URLs is indexd's ([`indexd::redis::Target::parse`]).
fn check_redis(url: &str) -> Result<(), indexd::redis::RedisError> {
    indexd::redis::Target::parse(url).map(|_| ())
}

impl Cluster {
    /// Parses and checks `text` (from `file`, for messages).
    pub fn parse(file: &str, text: &str) -> Result<Cluster, ClusterError> {
        let parsed: ClusterFile = toml::from_str(text).map_err(|e| ClusterError::Syntax {
            file: file.to_owned(),
            msg: e.to_string().trim().replace('\n', " "),
        })?;
        let err = |span: Range<usize>, field: String, why: String| ClusterError::Field {
            file: file.to_owned(),
            line: line_of(text, span),
            field,
            why,
        };
        let plain = parsed.plain_tcp.as_ref().is_some_and(|p| *p.get_ref());
        match (&parsed.cluster_key, &parsed.plain_tcp) {
            (None, p) if !plain => {
                return Err(ClusterError::Field {
                    file: file.to_owned(),
                    line: p.as_ref().map_or(1, |p| line_of(text, p.span())),
                    field: "cluster_key".into(),
                    why: "missing: the path of the cluster key on the hosts (`shrink-migrate --new-cluster-key \
                          FILE` makes one), for TLS between them; or plain_tcp = true for clear text on a \
                          trusted network"
                        .into(),
                })
            }
            (Some(k), _) if plain => {
                return Err(err(k.span(), "cluster_key".into(), "and plain_tcp = true: choose one".into()))
            }
            (Some(k), _) if !k.get_ref().starts_with('/') => {
                return Err(err(k.span(), "cluster_key".into(), "an absolute path on the hosts".into()))
            }
            _ => {}
        }
        if parsed.sites.len() < 2 {
            return Err(ClusterError::Field {
                file: file.to_owned(),
                line: 1,
                field: "sites".into(),
                why: format!("{} site(s) described; a migration needs two", parsed.sites.len()),
            });
        }
        let mut hosts: HashMap<&str, &str> = HashMap::new();
        let mut site_names = Vec::new();
        for (si, s) in parsed.sites.iter().enumerate() {
            if site_names.contains(&s.name.get_ref().as_str()) {
                return Err(err(
                    s.name.span(),
                    format!("sites[{si}].name"),
                    format!("site '{}' is described twice", s.name.get_ref()),
                ));
            }
            site_names.push(s.name.get_ref().as_str());
            for (f, v) in [("coordination", &s.coordination), ("index", &s.index)] {
                check_redis(v.get_ref()).map_err(|why| err(v.span(), format!("sites[{si}].{f}"), why.to_string()))?;
            }
            let l = s.launch.get_ref();
            if !l.split_whitespace().any(|w| w == "{cmd}") {
                return Err(err(
                    s.launch.span(),
                    format!("sites[{si}].launch"),
                    "the launch template has no {cmd} (a word of its own)".into(),
                ));
            }
            match (&s.repository, &s.storage) {
                (Some(v), None) | (None, Some(v)) => {
                    return Err(err(
                        v.span(),
                        format!("sites[{si}].{}", if s.storage.is_none() { "storage" } else { "repository" }),
                        "repository and storage go together (the base image, and where disks moved here go)".into(),
                    ))
                }
                _ => {}
            }
            if let Some(st) = &s.storage {
                let earlier = parsed.sites[..si].iter().filter_map(|o| o.storage.as_ref());
                if earlier.into_iter().any(|o| o.get_ref().trim_end_matches('/') == st.get_ref().trim_end_matches('/'))
                {
                    return Err(err(
                        st.span(),
                        format!("sites[{si}].storage"),
                        "another site has the same storage: the sites share no storage".into(),
                    ));
                }
            }
            for (f, v) in [("repository", &s.repository), ("storage", &s.storage)] {
                if let Some(v) = v.as_ref().filter(|v| !v.get_ref().starts_with('/')) {
                    return Err(err(
                        v.span(),
                        format!("sites[{si}].{f}"),
                        "an absolute path on the site's hosts".into(),
                    ));
                }
            }
            if s.hosts.is_empty() {
                return Err(err(
                    s.name.span(),
                    format!("sites[{si}].hosts"),
                    format!("site '{}' has no hosts", s.name.get_ref()),
                ));
            }
            for (hi, h) in s.hosts.iter().enumerate() {
                if hosts.insert(h.name.get_ref(), s.name.get_ref()).is_some() {
                    return Err(err(
                        h.name.span(),
                        format!("sites[{si}].hosts[{hi}].name"),
                        format!("host '{}' is described twice", h.name.get_ref()),
                    ));
                }
                if h.address.get_ref().parse::<std::net::IpAddr>().is_err() && h.address.get_ref().contains(' ') {
                    return Err(err(
                        h.address.span(),
                        format!("sites[{si}].hosts[{hi}].address"),
                        "not an address".into(),
                    ));
                }
            }
        }
        let mut names = Vec::new();
        for (vi, v) in parsed.vms.iter().enumerate() {
            if names.contains(&v.name.get_ref().as_str()) {
                return Err(err(
                    v.name.span(),
                    format!("vms[{vi}].name"),
                    format!("VM '{}' is described twice", v.name.get_ref()),
                ));
            }
            names.push(v.name.get_ref().as_str());
            if !hosts.contains_key(v.host.get_ref().as_str()) {
                return Err(err(
                    v.host.span(),
                    format!("vms[{vi}].host"),
                    format!("unknown host '{}'", v.host.get_ref()),
                ));
            }
            if let Some(d) = &v.dest_host {
                if !hosts.contains_key(d.get_ref().as_str()) {
                    return Err(err(
                        d.span(),
                        format!("vms[{vi}].dest_host"),
                        format!("unknown host '{}'", d.get_ref()),
                    ));
                }
            }
        }
        if parsed.vms.is_empty() {
            return Err(ClusterError::Field {
                file: file.to_owned(),
                line: 1,
                field: "vms".into(),
                why: "no VMs described".into(),
            });
        }
        Ok(Cluster { file: parsed })
    }

    /// The site called `name`.
    pub fn site(&self, name: &str) -> Option<&Site> {
        self.file.sites.iter().find(|s| s.name.get_ref() == name)
    }

    /// The site a host belongs to.
    pub fn site_of_host(&self, host: &str) -> Option<&Site> {
        self.file.sites.iter().find(|s| s.hosts.iter().any(|h| h.name.get_ref() == host))
    }

    /// Where every VM not already at `dest` goes: its `dest_host`, else the destination site's
    /// hosts in turn.
    pub fn plan(&self, dest: &str) -> Result<Vec<Move>, ClusterError> {
        let site = self.site(dest).ok_or_else(|| ClusterError::NoSuchSite {
            site: dest.to_owned(),
            sites: self.file.sites.iter().map(|s| s.name.get_ref().clone()).collect::<Vec<_>>().join(", "),
        })?;
        let mut moves = Vec::new();
        let mut next = 0usize;
        for v in &self.file.vms {
            let from = self.site_of_host(v.host.get_ref()).expect("checked at parse");
            if from.name.get_ref() == dest {
                continue;
            }
            // A dest_host at another site is where the VM goes when it moves there.
            let wanted = v.dest_host.as_ref().and_then(|h| site.hosts.iter().find(|x| x.name.get_ref() == h.get_ref()));
            let to = match wanted {
                Some(h) => h,
                None => {
                    let h = &site.hosts[next % site.hosts.len()];
                    next += 1;
                    h
                }
            };
            moves.push(Move {
                vm: v.name.get_ref().clone(),
                api: v.api.get_ref().clone(),
                from_site: from.name.get_ref().clone(),
                from_host: v.host.get_ref().clone(),
                to_host: to.name.get_ref().clone(),
                to_address: to.address.get_ref().clone(),
            });
        }
        Ok(moves)
    }
}

/// Where a VM runs after a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relocation {
    /// The VM.
    pub vm: String,
    /// Its new host.
    pub host: String,
    /// Its new VMM's API socket.
    pub api: String,
}

/// `text` (a cluster description) with the `host` and `api` of the relocated VMs replaced,
/// everything else (comments, order, layout) kept as written.
pub fn relocate(file: &str, text: &str, moved: &[Relocation]) -> Result<String, ClusterError> {
    let c = Cluster::parse(file, text)?;
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    for (i, r) in moved.iter().enumerate() {
        if moved[..i].iter().any(|o| o.vm == r.vm) {
            return Err(ClusterError::Field {
                file: file.to_owned(),
                line: 1,
                field: "vms".into(),
                why: format!("VM '{}' relocated twice", r.vm),
            });
        }
        let v = c.file.vms.iter().find(|v| v.name.get_ref() == &r.vm).ok_or_else(|| ClusterError::Field {
            file: file.to_owned(),
            line: 1,
            field: "vms".into(),
            why: format!("VM '{}' is no longer described", r.vm),
        })?;
        edits.push((v.host.span(), toml_string(&r.host)));
        edits.push((v.api.span(), toml_string(&r.api)));
    }
    edits.sort_by_key(|(s, _)| std::cmp::Reverse(s.start));
    let mut out = text.to_owned();
    for (span, new) in edits {
        out.replace_range(span, &new);
    }
    Ok(out)
}

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => o.push_str(&format!("\\u{:04X}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Fills a launch template into the argv to run, without any local shell: the template is split
/// on white space, `{host}` is replaced inside its words, and the word `{cmd}` becomes the
/// words of `cmd`. When the launcher is `ssh`, whose remote end hands its words to a shell,
/// each word of `cmd` is single-quoted for that shell, so that no value is reinterpreted there.
pub fn launch_argv(template: &str, host: &str, cmd: &[String]) -> Vec<String> {
    let words: Vec<&str> = template.split_whitespace().collect();
    let remote_shell = words.first().is_some_and(|w| w.rsplit('/').next() == Some("ssh"));
    let mut argv = Vec::new();
    for w in words {
        if w == "{cmd}" {
            argv.extend(cmd.iter().map(|c| if remote_shell { shell_quote(c) } else { c.clone() }));
        } else {
            argv.push(w.replace("{host}", host));
        }
    }
    argv
}

/// `s` as one word for a POSIX shell: single-quoted, with embedded quotes closed and escaped.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
migration_id = "t"
cluster_key = "/etc/shrink/cluster.key"

[[sites]]
name = "siteA"
coordination = "redis://10.10.0.100:6379"
index = "redis://10.10.0.100:6380"
launch = "ip netns exec {host} {cmd}"

[[sites.hosts]]
name = "hostA1"
address = "10.10.0.11"

[[sites]]
name = "siteB"
coordination = "redis://10.20.0.100:6379"
index = "redis://10.20.0.100:6380,redis://10.20.0.100:6381"
launch = "ip netns exec {host} {cmd}"

[[sites.hosts]]
name = "hostB1"
address = "10.20.0.11"

[[sites.hosts]]
name = "hostB2"
address = "10.20.0.12"

[[vms]]
name = "vm1"
host = "hostA1"
api = "/run/shrink/vm1.sock"

[[vms]]
name = "vm2"
host = "hostA1"
api = "/run/shrink/vm2.sock"

[[vms]]
name = "vm3"
host = "hostA1"
api = "/run/shrink/vm3.sock"
dest_host = "hostB1"
"#;

    #[test]
    fn a_good_file_plans_moves() {
        let c = Cluster::parse("vc.toml", GOOD).unwrap();
        let m = c.plan("siteB").unwrap();
        assert_eq!(m.iter().map(|m| m.to_host.as_str()).collect::<Vec<_>>(), ["hostB1", "hostB2", "hostB1"]);
        assert_eq!(m[1].to_address, "10.20.0.12");
        assert!(c.plan("siteA").unwrap().is_empty(), "nothing to move to where it is");
        assert!(c.plan("siteC").unwrap_err().to_string().contains("no such site"));
        let cmd: Vec<String> = ["shrink-vmm", "--name", "it's; rm -rf /"].map(String::from).to_vec();
        assert_eq!(
            launch_argv("ip netns exec {host} {cmd}", "h1", &cmd),
            ["ip", "netns", "exec", "h1", "shrink-vmm", "--name", "it's; rm -rf /"]
        );
        assert_eq!(
            launch_argv("/usr/bin/ssh -o BatchMode=yes {host} {cmd}", "h1", &cmd),
            ["/usr/bin/ssh", "-o", "BatchMode=yes", "h1", "'shrink-vmm'", "'--name'", "'it'\\''s; rm -rf /'"]
        );
    }

    #[test]
    fn relocation_rewrites_only_host_and_api() {
        let moved = [Relocation { vm: "vm2".into(), host: "hostB2".into(), api: "/w/vm2 \"B\".sock".into() }];
        let text = GOOD.replace("[[vms]]\nname = \"vm2\"", "# vm2 is the database\n[[vms]]\nname = \"vm2\"");
        let out = relocate("vc.toml", &text, &moved).unwrap();
        assert!(out.contains("# vm2 is the database"), "comments stay");
        let c = Cluster::parse("vc.toml", &out).unwrap();
        let v = &c.file.vms[1];
        assert_eq!((v.host.get_ref().as_str(), v.api.get_ref().as_str()), ("hostB2", "/w/vm2 \"B\".sock"));
        assert_eq!(c.file.vms[0].host.get_ref(), "hostA1", "others stay");
        assert_eq!(out.lines().count(), text.lines().count());
        // vm2 is now at siteB: only vm1 and vm3 move there; back to siteA moves vm2, and vm3's
        // dest_host (at siteB) does not stop it from going back.
        let back = relocate(
            "vc.toml",
            &out,
            &[Relocation { vm: "vm3".into(), host: "hostB1".into(), api: "/w/vm3.sock".into() }],
        )
        .unwrap();
        let c = Cluster::parse("vc.toml", &back).unwrap();
        assert_eq!(c.plan("siteB").unwrap().iter().map(|m| m.vm.as_str()).collect::<Vec<_>>(), ["vm1"]);
        assert_eq!(
            c.plan("siteA").unwrap().iter().map(|m| (m.vm.as_str(), m.to_host.as_str())).collect::<Vec<_>>(),
            [("vm2", "hostA1"), ("vm3", "hostA1")]
        );
        let e = relocate("vc.toml", &out, &[Relocation { vm: "nope".into(), host: "h".into(), api: "a".into() }])
            .unwrap_err();
        assert!(e.to_string().contains("'nope'"), "{e}");
    }

    fn err_of(text: &str) -> String {
        Cluster::parse("vc.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn bad_files_name_the_line_and_the_field() {
        let e = err_of(&GOOD.replace(
            "host = \"hostA1\"\napi = \"/run/shrink/vm2.sock\"",
            "host = \"hostZ\"\napi = \"/run/shrink/vm2.sock\"",
        ));
        assert!(e.starts_with("vc.toml:36: vms[1].host: unknown host 'hostZ'"), "{e}");
        let e = err_of(&GOOD.replace("redis://10.20.0.100:6379", "http://10.20.0.100:6379"));
        assert!(e.contains("sites[1].coordination") && e.contains("redis://") && e.contains("vc.toml:17"), "{e}");
        let e = err_of(&GOOD.replace("redis://10.10.0.100:6380", "redis://10.10.0.100"));
        assert!(e.contains("sites[0].index") && e.contains("no :PORT"), "{e}");
        let text: String = GOOD.split("[[sites]]").take(2).collect::<Vec<_>>().join("[[sites]]");
        let e = err_of(&format!("{text}\n[[vms]]\nname = \"v\"\nhost = \"hostA1\"\napi = \"x\"\n"));
        assert!(e.contains("sites") && e.contains("a migration needs two"), "{e}");
        let e = err_of(&GOOD.replace("api = \"/run/shrink/vm1.sock\"\n", ""));
        assert!(e.contains("missing field `api`") && e.contains("line"), "{e}");
        let e = err_of(&GOOD.replace("dest_host = \"hostB1\"", "dest_host = \"nowhere\""));
        assert!(e.contains("vms[2].dest_host: unknown host 'nowhere'"), "{e}");
        let e = err_of(&GOOD.replace(
            "launch = \"ip netns exec {host} {cmd}\"\n\n[[sites.hosts]]\nname = \"hostA1\"",
            "launch = \"ip netns exec {host}\"\n\n[[sites.hosts]]\nname = \"hostA1\"",
        ));
        assert!(e.contains("sites[0].launch") && e.contains("{cmd}"), "{e}");
        let e = err_of("this is = not toml [");
        assert!(e.starts_with("vc.toml: "), "{e}");
    }

    #[test]
    fn tls_needs_a_key_path_and_clear_text_an_explicit_flag() {
        let key = "cluster_key = \"/etc/shrink/cluster.key\"\n";
        let c = Cluster::parse("vc.toml", GOOD).unwrap();
        assert_eq!(c.file.cluster_key.as_ref().map(|k| k.get_ref().as_str()), Some("/etc/shrink/cluster.key"));
        let e = err_of(&GOOD.replace(key, ""));
        assert!(e.starts_with("vc.toml:1: cluster_key: missing") && e.contains("plain_tcp = true"), "{e}");
        let e = err_of(&GOOD.replace(key, "plain_tcp = false\n"));
        assert!(e.starts_with("vc.toml:3: cluster_key: missing"), "{e}");
        let c = Cluster::parse("vc.toml", &GOOD.replace(key, "plain_tcp = true\n")).unwrap();
        assert!(c.file.cluster_key.is_none());
        let e = err_of(&GOOD.replace(key, &format!("{key}plain_tcp = true\n")));
        assert!(e.starts_with("vc.toml:3: cluster_key: and plain_tcp = true: choose one"), "{e}");
        let e = err_of(&GOOD.replace("/etc/shrink/cluster.key", "cluster.key"));
        assert!(e.contains("cluster_key: an absolute path"), "{e}");
        let e = err_of(&GOOD.replace(key, "plain_tcp = \"yes\"\n"));
        assert!(e.contains("plain_tcp") || e.contains("boolean"), "{e}");
    }

    #[test]
    fn a_sites_repository_and_storage_go_together_as_absolute_paths() {
        let b = "launch = \"ip netns exec {host} {cmd}\"\n\n[[sites.hosts]]\nname = \"hostB1\"";
        let with = |extra: &str| GOOD.replace(b, &b.replace("launch", &format!("{extra}\nlaunch")));
        let c =
            Cluster::parse("vc.toml", &with("repository = \"/srv/B/base.qcow2\"\nstorage = \"/srv/B/disks\"")).unwrap();
        let site = c.site("siteB").unwrap();
        assert_eq!(site.repository.as_ref().map(|r| r.get_ref().as_str()), Some("/srv/B/base.qcow2"));
        assert_eq!(site.storage.as_ref().map(|r| r.get_ref().as_str()), Some("/srv/B/disks"));
        let e = err_of(&with("repository = \"/srv/B/base.qcow2\""));
        assert!(e.contains("sites[1].storage") && e.contains("go together"), "{e}");
        let e = err_of(&with("repository = \"base.qcow2\"\nstorage = \"/srv/B/disks\""));
        assert!(e.contains("sites[1].repository") && e.contains("absolute path"), "{e}");
        let a = "launch = \"ip netns exec {host} {cmd}\"\n\n[[sites.hosts]]\nname = \"hostA1\"";
        let both = with("repository = \"/srv/B/base.qcow2\"\nstorage = \"/srv/disks\"")
            .replace(a, &a.replace("launch", "repository = \"/srv/A/base.qcow2\"\nstorage = \"/srv/disks/\"\nlaunch"));
        let e = err_of(&both);
        assert!(e.contains("sites[1].storage") && e.contains("same storage"), "{e}");
    }
}
