//! `shrink-repo`: publishes the chunks of a site's repository images (qcow2 base images) in the
//! site's index Redis, so that VMMs can use the local base image as a content source. See the
//! "Image repository index" section of indexd/README.md and the `indexd::repo` module.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate};
use indexd::hash::{hex, Algo};
use indexd::redis::{Redis, RedisError, Target};
use indexd::repo::{self, FileStamp, RepoError, RepoIndex, CHUNK_SIZES};
use thiserror::Error;

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

#[derive(Parser, Debug)]
#[command(name = "shrink-repo", version, about = "Index the images of a site's image repository into its index Redis")]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), on standard error.
    #[arg(long, global = true, value_name = "FILTER", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Index qcow2 images (their guest-visible content, through the backing chain) and publish
    /// their chunks and file stamps.
    Index {
        /// The site's index Redis: redis://HOST:PORT, or a comma-separated list of cluster nodes.
        #[arg(long, value_name = "URL")]
        index: String,
        /// Chunk digest algorithm (sha256 or sha1); repeat for several. Default: sha256.
        #[arg(long = "digest", value_name = "ALGO")]
        digests: Vec<Algo>,
        /// Chunk size in bytes (512, 1024, 2048 or 4096); repeat for several. Default: 4096.
        #[arg(long = "chunk", value_name = "BYTES")]
        chunks: Vec<usize>,
        /// The qcow2 images.
        #[arg(value_name = "IMAGE", required = true)]
        images: Vec<PathBuf>,
    },
    /// Print the content digest an image was indexed with, and whether the file is unchanged
    /// since (exit status 1 when it is not indexed or was modified).
    Show {
        /// The site's index Redis: redis://HOST:PORT, or a comma-separated list of cluster nodes.
        #[arg(long, value_name = "URL")]
        index: String,
        /// The qcow2 image.
        #[arg(value_name = "IMAGE")]
        image: PathBuf,
    },
}

/// Errors of the tool.
#[derive(Debug, Error)]
enum CliError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("{}: {source}", path.display())]
    Image { path: PathBuf, source: RepoError },
    #[error("{}: cannot open as qcow2: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{} is not a qcow2 image (only qcow2 images are indexed)", .0.display())]
    NotQcow2(PathBuf),
    #[error("{} changed while it was being indexed: run `shrink-repo index` again", .0.display())]
    Changed(PathBuf),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let url = match &cli.cmd {
        Cmd::Index { index, .. } | Cmd::Show { index, .. } => index.clone(),
    };
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shrink-repo: error: {}", indexd::redis::redact(&e.to_string(), &url));
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<(), CliError> {
    match cmd {
        Cmd::Index { index, digests, chunks, images } => {
            let digests = dedup(if digests.is_empty() { vec![Algo::Sha256] } else { digests });
            let chunks = dedup(if chunks.is_empty() { vec![4096] } else { chunks });
            if let Some(&c) = chunks.iter().find(|c| !CHUNK_SIZES.contains(c)) {
                return Err(RepoError::BadChunk(c).into());
            }
            let specs: Vec<(Algo, usize)> = digests.iter().flat_map(|&a| chunks.iter().map(move |&c| (a, c))).collect();
            let mut redis = Redis::connect(&Target::parse(&index)?)?;
            for image in &images {
                index_image(&mut redis, image, &specs)?;
            }
            Ok(())
        }
        Cmd::Show { index, image } => {
            let mut redis = Redis::connect(&Target::parse(&index)?)?;
            let stamp =
                repo::stamp_of(&mut redis, &image)?.ok_or_else(|| RepoError::NotIndexed { path: image.clone() })?;
            let current = stamp.is_current(&image)?;
            let state = if current { "current" } else { "stale (modified since it was indexed)" };
            println!("{}: image sha256 {}, {state}", image.display(), hex(&stamp.image));
            if !current {
                return Err(RepoError::Stale { path: image }.into());
            }
            Ok(())
        }
    }
}

fn dedup<T: PartialEq>(v: Vec<T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(v.len());
    for x in v {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

fn check_qcow2(path: &Path) -> Result<(), CliError> {
    let mut f = std::fs::File::open(path).map_err(|source| RepoError::Io { path: path.to_owned(), source })?;
    let mut magic = [0u8; 4];
    match f.read_exact(&mut magic) {
        Ok(()) if &magic == QCOW2_MAGIC => Ok(()),
        _ => Err(CliError::NotQcow2(path.to_owned())),
    }
}

/// Builds every index of `specs` for `image` in one pass, publishes them, prints one line each.
fn index_image(redis: &mut Redis, image: &Path, specs: &[(Algo, usize)]) -> Result<(), CliError> {
    let canon = std::fs::canonicalize(image).map_err(|source| RepoError::Io { path: image.to_owned(), source })?;
    check_qcow2(&canon)?;
    let before = FileStamp::of_file(&canon, [0; 32])?;
    let open_err = |source| CliError::Open { path: image.to_owned(), source };
    let img = Qcow2::<ImagoFile>::builder_path(&canon)
        .write(false)
        .open(PermissiveImplicitOpenGate::default())
        .map_err(open_err)?;
    let disk = FormatAccess::new(img);
    let size = disk.size();
    let t0 = Instant::now();
    let mut read_at = |offset: u64, buf: &mut [u8]| disk.read(buf, offset);
    let indexes = RepoIndex::build_all(size, specs, &mut read_at)
        .map_err(|source| CliError::Image { path: image.to_owned(), source })?;
    if FileStamp::of_file(&canon, [0; 32])? != before {
        return Err(CliError::Changed(image.to_owned()));
    }
    for idx in &indexes {
        repo::publish(redis, &canon, idx)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    for idx in &indexes {
        println!(
            "{}: image sha256 {}, {} distinct chunks ({}, {} B), {} bytes, indexed in {secs:.2} s",
            image.display(),
            hex(&idx.image),
            idx.len(),
            idx.algo,
            idx.chunk,
            idx.size
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keeps_order() {
        assert_eq!(dedup(vec![4096, 512, 4096, 1024, 512]), vec![4096, 512, 1024]);
    }
}
