//! `indexd::repo` (and `Redis::set_many`/`get_many`) against a real `redis-server` started by the
//! tests on a free loopback port, and the `shrink-repo` tool on qcow2 images made by `qemu-img`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, UNIX_EPOCH};

use indexd::hash::{hex, Algo};
use indexd::redis::{Redis, Target};
use indexd::repo::{self, chunks_key, RepoError, RepoIndex};
use shrink_testutil::fs::TempDir;
use shrink_testutil::ports::free_port;
use shrink_testutil::redis::RedisServer;
use shrink_testutil::util::XorShift;

fn server() -> RedisServer {
    RedisServer::start().unwrap_or_else(|e| panic!("cannot start redis-server for the test: {e}"))
}

fn connect(s: &RedisServer) -> Redis {
    Redis::connect(&Target::parse(&s.url()).unwrap()).unwrap()
}

fn tmp(tag: &str) -> TempDir {
    TempDir::new(tag).expect("temporary directory")
}

/// `n` chunks of 4096 bytes: zero chunks, copies of chunk 1, and random ones.
fn content(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    let one = rng.bytes(4096);
    let mut out = Vec::with_capacity(n * 4096);
    for i in 0..n {
        if i % 4 == 0 {
            out.extend_from_slice(&[0u8; 4096]);
        } else if i == 1 || i % 7 == 3 {
            out.extend_from_slice(&one);
        } else {
            out.extend(rng.bytes(4096));
        }
    }
    out
}

fn build(data: &[u8], algo: Algo, chunk: usize) -> RepoIndex {
    let mut read = |off: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
        Ok(())
    };
    RepoIndex::build(data.len() as u64, algo, chunk, &mut read).unwrap()
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (package qemu-utils) for the test: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A qcow2 image whose guest-visible content is `data`.
fn qcow2(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    std::fs::write(&raw, data).unwrap();
    let img = dir.join(name);
    run("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap(), img.to_str().unwrap()]);
    std::fs::remove_file(&raw).unwrap();
    img
}

fn shrink_repo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shrink-repo")).args(args).output().expect("run shrink-repo")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Sets the file's mtime to `secs` after the epoch.
fn set_mtime(path: &Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(secs)).unwrap();
}

#[test]
fn set_many_get_many_round_trip() {
    let s = server();
    let mut r = connect(&s);
    let mut rng = XorShift::new(7);
    let keys: Vec<Vec<u8>> = (0..500u32)
        .map(|i| {
            let mut k = b"shrink:test:kv:".to_vec();
            k.extend(i.to_le_bytes());
            k.extend_from_slice(b"\0{x}\xff");
            k
        })
        .collect();
    let mut entries: Vec<(Vec<u8>, Vec<u8>)> = keys.iter().map(|k| (k.clone(), rng.bytes(37))).collect();
    entries[0].1 = Vec::new(); // an empty value
    entries[1].1 = rng.bytes(3 << 20); // a large one
    r.set_many(&entries[..400]).unwrap();
    let got = r.get_many(&keys).unwrap();
    assert_eq!(got.len(), 500);
    for (i, g) in got.iter().enumerate() {
        if i < 400 {
            assert_eq!(g.as_deref(), Some(&entries[i].1[..]), "key {i}");
        } else {
            assert_eq!(*g, None, "key {i} was never set");
        }
    }
    // Overwrite, with no expiry.
    r.set_many(&[(keys[2].clone(), b"new".to_vec())]).unwrap();
    assert_eq!(r.get_many(&keys[2..3]).unwrap(), vec![Some(b"new".to_vec())]);
    let mut c = redis::Client::open(s.url()).and_then(|c| c.get_connection()).unwrap();
    let ttl: i64 = redis::cmd("TTL").arg(&keys[2]).query(&mut c).unwrap();
    assert_eq!(ttl, -1, "SET without expiry");
    r.set_many(&[]).unwrap();
    assert_eq!(r.get_many(&[]).unwrap(), Vec::<Option<Vec<u8>>>::new());
    // GET of a set is a WRONGTYPE error, and the connection stays usable.
    r.sadd_many(&[(b"shrink:test:set".to_vec(), "h:1".into())]).unwrap();
    let e = r.get_many(&[keys[0].clone(), b"shrink:test:set".to_vec()]).unwrap_err();
    assert!(e.to_string().contains("WRONGTYPE"), "{e}");
    assert_eq!(r.get_many(&keys[..1]).unwrap(), vec![Some(Vec::new())]);
}

#[test]
fn publish_image_of_load_round_trip() {
    let s = server();
    let mut r = connect(&s);
    let dir = tmp("repo-publish");
    let data = content(300, 1);
    let file = dir.path().join("base.img");
    std::fs::write(&file, &data).unwrap();
    let idx = build(&data, Algo::Sha256, 4096);
    let idx1 = build(&data, Algo::Sha1, 512);
    assert_eq!(idx.image, openssl::sha::sha256(&data));
    assert!(idx.len() > 100);
    repo::publish(&mut r, &file, &idx).unwrap();
    repo::publish(&mut r, &file, &idx1).unwrap();

    assert_eq!(repo::image_of(&mut r, &file).unwrap(), idx.image);
    // Through a symlink and a relative-looking path: the same canonical file.
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    assert_eq!(repo::image_of(&mut r, &link).unwrap(), idx.image);
    assert_eq!(repo::image_of(&mut r, &dir.path().join(".").join("base.img")).unwrap(), idx.image);

    let back = repo::load(&mut r, &idx.image, Algo::Sha256, 4096).unwrap();
    assert_eq!(back, idx);
    assert_eq!(repo::load(&mut r, &idx.image, Algo::Sha1, 512).unwrap(), idx1);
    let first = &data[4096..8192];
    assert_eq!(back.offset(&indexd::digest(Algo::Sha256, first)), Some(4096));

    let e = repo::load(&mut r, &idx.image, Algo::Sha1, 4096).unwrap_err();
    assert!(matches!(e, RepoError::NoChunks { chunk: 4096, algo: Algo::Sha1, .. }), "{e}");
    assert!(e.to_string().contains(&hex(&idx.image)), "{e}");
    let e = repo::load(&mut r, &[9; 32], Algo::Sha256, 4096).unwrap_err();
    assert!(matches!(e, RepoError::NoChunks { .. }), "{e}");
    let e = repo::load(&mut r, &idx.image, Algo::Sha256, 100).unwrap_err();
    assert!(matches!(e, RepoError::BadChunk(100)), "{e}");

    // A value that does not decode, and another image's index under this image's key.
    r.set_many(&[(chunks_key(&[1; 32], Algo::Sha256, 4096), b"garbage".to_vec())]).unwrap();
    let e = repo::load(&mut r, &[1; 32], Algo::Sha256, 4096).unwrap_err();
    assert!(matches!(e, RepoError::Corrupt(_)) && e.to_string().contains("truncated"), "{e}");
    r.set_many(&[(chunks_key(&[2; 32], Algo::Sha256, 4096), idx.encode())]).unwrap();
    let e = repo::load(&mut r, &[2; 32], Algo::Sha256, 4096).unwrap_err();
    assert!(matches!(e, RepoError::Corrupt(_)) && e.to_string().contains(&hex(&idx.image)), "{e}");
}

#[test]
fn image_of_notices_modified_replaced_and_unknown_files() {
    let s = server();
    let mut r = connect(&s);
    let dir = tmp("repo-stale");
    let data = content(20, 2);
    let file = dir.path().join("base.img");
    std::fs::write(&file, &data).unwrap();
    let idx = build(&data, Algo::Sha256, 4096);

    let e = repo::image_of(&mut r, &file).unwrap_err();
    assert!(matches!(&e, RepoError::NotIndexed { path } if path == &file), "{e}");
    assert!(e.to_string().contains("base.img") && e.to_string().contains("shrink-repo index"), "{e}");
    let e = repo::image_of(&mut r, &dir.path().join("absent.img")).unwrap_err();
    assert!(matches!(e, RepoError::Io { .. }) && e.to_string().contains("absent.img"), "{e}");

    repo::publish(&mut r, &file, &idx).unwrap();
    assert_eq!(repo::image_of(&mut r, &file).unwrap(), idx.image);

    // Another mtime.
    set_mtime(&file, 1_000_000);
    let e = repo::image_of(&mut r, &file).unwrap_err();
    assert!(matches!(&e, RepoError::Stale { path } if path == &file), "{e}");
    assert!(e.to_string().contains("modified since it was indexed"), "{e}");
    repo::publish(&mut r, &file, &idx).unwrap();
    assert_eq!(repo::image_of(&mut r, &file).unwrap(), idx.image);

    // Appended to, with the mtime put back.
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::File::options().append(true).open(&file).unwrap();
        f.write_all(b"x").unwrap();
        f.set_modified(mtime).unwrap();
    }
    assert!(matches!(repo::image_of(&mut r, &file), Err(RepoError::Stale { .. })));
    repo::publish(&mut r, &file, &idx).unwrap();

    // Replaced by another file (same size and mtime, another inode).
    let copy = dir.path().join("copy.img");
    std::fs::copy(&file, &copy).unwrap();
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    std::fs::File::options().write(true).open(&copy).unwrap().set_modified(mtime).unwrap();
    std::fs::rename(&copy, &file).unwrap();
    assert!(matches!(repo::image_of(&mut r, &file), Err(RepoError::Stale { .. })));
}

#[test]
fn tool_indexes_qcow2_images_through_the_backing_chain() {
    let s = server();
    let dir = tmp("repo-tool");
    let data = content(300, 3);
    let base = qcow2(dir.path(), "base.qcow2", &data);
    // An overlay on it whose chunk 1 differs (two patterns in its halves) and chunk 8 (zero in
    // the base) is uniform 0x33.
    let ov = dir.path().join("ov.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", ov.to_str().unwrap()]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 4096 2048",
            "-c",
            "write -P 0x22 6144 2048",
            "-c",
            "write -P 0x33 32768 4096",
            ov.to_str().unwrap(),
        ],
    );
    let mut ov_data = data.clone();
    ov_data[4096..6144].fill(0x11);
    ov_data[6144..8192].fill(0x22);
    ov_data[32768..36864].fill(0x33);

    let out = shrink_repo(&[
        "index",
        "--index",
        &s.url(),
        "--digest",
        "sha256",
        "--digest",
        "sha1",
        base.to_str().unwrap(),
        ov.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "shrink-repo index: {}{}", stdout, text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    let mut r = connect(&s);
    for (i, (path, bytes)) in [(&base, &data), (&ov, &ov_data)].into_iter().enumerate() {
        for (j, algo) in [Algo::Sha256, Algo::Sha1].into_iter().enumerate() {
            let want = build(bytes, algo, 4096);
            let line = lines[2 * i + j];
            let prefix = format!(
                "{}: image sha256 {}, {} distinct chunks ({algo}, 4096 B), {} bytes, indexed in ",
                path.display(),
                hex(&want.image),
                want.len(),
                bytes.len()
            );
            assert!(line.starts_with(&prefix) && line.ends_with(" s"), "{line}\nexpected {prefix}… s");
            let secs: f64 = line[prefix.len()..line.len() - 2].parse().unwrap();
            assert!(secs >= 0.0, "{line}");
            assert_eq!(repo::image_of(&mut r, path).unwrap(), want.image);
            assert_eq!(repo::load(&mut r, &want.image, algo, 4096).unwrap(), want, "{line}");
        }
    }
    let base_idx = repo::load(&mut r, &openssl::sha::sha256(&data), Algo::Sha256, 4096).unwrap();
    assert_eq!(base_idx.offset(&indexd::digest(Algo::Sha256, &data[4096..8192])), Some(4096));
    let ov_idx = repo::load(&mut r, &openssl::sha::sha256(&ov_data), Algo::Sha256, 4096).unwrap();
    assert_eq!(ov_idx.offset(&indexd::digest(Algo::Sha256, &ov_data[4096..8192])), Some(4096));
    assert!(!ov_idx.contains(&indexd::digest(Algo::Sha256, &[0x33; 4096])));

    // `show`: current, then stale once the file is touched.
    let out = shrink_repo(&["show", "--index", &s.url(), base.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim_end(),
        format!("{}: image sha256 {}, current", base.display(), hex(&openssl::sha::sha256(&data)))
    );
    set_mtime(&base, 2_000_000);
    let out = shrink_repo(&["show", "--index", &s.url(), base.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("stale"), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.starts_with("shrink-repo: error: ") && err.contains("modified since it was indexed"), "{err}");
    assert!(matches!(repo::image_of(&mut r, &base), Err(RepoError::Stale { .. })));

    // Indexing again makes it current.
    let out = shrink_repo(&["index", "--index", &s.url(), base.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 1);
    assert!(shrink_repo(&["show", "--index", &s.url(), base.to_str().unwrap()]).status.success());
}

#[test]
fn tool_errors() {
    let s = server();
    let dir = tmp("repo-tool-errors");
    let fail = |args: &[&str]| {
        let out = shrink_repo(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out.stdout));
        let err = text(&out.stderr);
        assert!(err.starts_with("shrink-repo: error: "), "{args:?}: {err}");
        err
    };
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, content(4, 4)).unwrap();
    let err = fail(&["index", "--index", &s.url(), raw.to_str().unwrap()]);
    assert!(err.contains("disk.raw is not a qcow2 image"), "{err}");

    let err = fail(&["show", "--index", &s.url(), raw.to_str().unwrap()]);
    assert!(err.contains("disk.raw is not in the repository index"), "{err}");

    let err = fail(&["index", "--index", &s.url(), dir.path().join("absent.qcow2").to_str().unwrap()]);
    assert!(err.contains("absent.qcow2"), "{err}");

    // 3 × 512 bytes: not a multiple of 4096 (but fine at 512).
    let small = dir.path().join("small.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", small.to_str().unwrap(), "1536"]);
    let err = fail(&["index", "--index", &s.url(), small.to_str().unwrap()]);
    assert!(err.contains("small.qcow2") && err.contains("not a multiple of the chunk size 4096"), "{err}");
    let out = shrink_repo(&["index", "--index", &s.url(), "--chunk", "512", small.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(", 0 distinct chunks (sha256, 512 B), 1536 bytes, "), "{}", text(&out.stdout));

    let err = fail(&["index", "--index", &s.url(), "--chunk", "8192", small.to_str().unwrap()]);
    assert!(err.contains("chunk size 8192"), "{err}");

    // Unreachable, with a password in the URL: named without it.
    let url = format!("redis://admin:hunter2secret@127.0.0.1:{}", free_port());
    let err = fail(&["index", "--index", &url, small.to_str().unwrap()]);
    assert!(err.contains("cannot connect") && !err.contains("hunter2secret"), "{err}");
    let err = fail(&["show", "--index", "redis://:hunter2secret@nohost", small.to_str().unwrap()]);
    assert!(err.contains("bad Redis URL") && !err.contains("hunter2secret"), "{err}");
}
