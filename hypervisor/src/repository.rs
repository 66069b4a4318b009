//! A host's view of its site's image repository: the digest and content index of a base image,
//! from the site's repository index in Redis (`shrink-repo index`) when it has them, else by
//! reading the image (slow, so it says so), and reads of the image by offset for content the
//! migration stream sends as digests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use indexd::hash::Algo;
use indexd::redis::{Redis, Target};
use indexd::repo::{RepoError, RepoIndex};
use migrate::shrinker::{ChunkMemory, ChunkMemoryError};

use crate::devices::virtio::block::{self, Disk, DiskError};

/// Why a base image's digest or content index cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    /// The image cannot be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Reading it failed.
    #[error("base image {path}: {source}")]
    Read {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Indexing it failed.
    #[error("base image {path}: {source}")]
    Index {
        /// The image.
        path: PathBuf,
        /// Cause.
        source: RepoError,
    },
}

/// A base image as a source of content: reads by byte offset (the "address" of
/// [`ChunkMemory`]).
pub struct ImageReader(Disk);

impl ImageReader {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<ImageReader, RepositoryError> {
        Ok(ImageReader(block::open_read_only(path)?))
    }
}

impl ChunkMemory for ImageReader {
    fn read_chunk(&self, offset: u64, buf: &mut [u8]) -> Result<(), ChunkMemoryError> {
        self.0.read(&mut *buf, offset).map_err(|e| ChunkMemoryError::Unreadable {
            gpa: offset,
            len: buf.len(),
            source: Box::new(e),
        })
    }
}

/// The SHA-256 of the guest-visible content of the image at `path` (what [`RepoIndex::image`]
/// holds), without indexing its chunks.
fn digest_only(path: &Path) -> Result<[u8; 32], RepositoryError> {
    let img = block::open_read_only(path)?;
    let mut h = openssl::sha::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < img.size() {
        let n = (img.size() - off).min(buf.len() as u64) as usize;
        img.read(&mut buf[..n], off).map_err(|source| RepositoryError::Read { path: path.to_owned(), source })?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finish())
}

/// Indexes the image at `path` by reading all of it.
fn build(path: &Path, algo: Algo, chunk: usize) -> Result<RepoIndex, RepositoryError> {
    let img = block::open_read_only(path)?;
    let err = |source| RepositoryError::Index { path: path.to_owned(), source };
    RepoIndex::build(img.size(), algo, chunk, &mut |off, buf| img.read(buf, off)).map_err(err)
}

/// What the site's repository index says of the image at `path`: its digest, and with `chunks`
/// its content index. `None` (with the reason) when the index cannot tell.
fn from_index(url: &str, path: &Path, chunks: Option<(Algo, usize)>) -> Result<([u8; 32], Option<RepoIndex>), String> {
    let mut r = Target::parse(url).and_then(|t| Redis::connect(&t)).map_err(|e| e.to_string())?;
    let image = indexd::repo::image_of(&mut r, path).map_err(|e| e.to_string())?;
    let idx = match chunks {
        Some((algo, chunk)) => Some(indexd::repo::load(&mut r, &image, algo, chunk).map_err(|e| e.to_string())?),
        None => None,
    };
    Ok((image, idx))
}

/// What is known of a base image.
pub struct BaseImage {
    /// SHA-256 of its guest-visible content.
    pub image: [u8; 32],
    /// Where each content is in it, when asked for.
    pub content: Option<Arc<RepoIndex>>,
    /// Why the repository index could not be used, when it could not.
    pub warning: Option<String>,
}

/// The digest of the base image at `path` and, with `chunks` (algorithm, chunk size), its
/// content index: from the repository index at `url` when it has them, else by reading the
/// image (with a warning).
pub fn base_image(url: Option<&str>, path: &Path, chunks: Option<(Algo, usize)>) -> Result<BaseImage, RepositoryError> {
    let why = match url {
        Some(u) => match from_index(u, path, chunks) {
            Ok((image, idx)) => return Ok(BaseImage { image, content: idx.map(Arc::new), warning: None }),
            // (Never a password in a log: the URL's userinfo is masked.)
            Err(e) => indexd::redis::redact(&e, u),
        },
        None => "no repository index given".to_owned(),
    };
    let t = std::time::Instant::now();
    let Some((algo, chunk)) = chunks else {
        // Only the digest is wanted: no chunk is hashed or indexed.
        let image = digest_only(path)?;
        let warning = format!(
            "base image {}: {why}; read the whole image for its digest instead ({:.1} s; `shrink-repo index` saves this)",
            path.display(),
            t.elapsed().as_secs_f64()
        );
        tracing::warn!("{warning}");
        return Ok(BaseImage { image, content: None, warning: Some(warning) });
    };
    let idx = build(path, algo, chunk)?;
    let warning = format!(
        "base image {}: {why}; read the whole image to index it instead ({:.1} s; `shrink-repo index` saves this)",
        path.display(),
        t.elapsed().as_secs_f64()
    );
    tracing::warn!("{warning}");
    Ok(BaseImage { image: idx.image, content: Some(Arc::new(idx)), warning: Some(warning) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::{create_overlay, DiskConfig};

    #[test]
    fn the_digest_alone_is_the_digest_of_the_index() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let cfg =
            DiskConfig { base: dir.as_path().join("none"), overlay: dir.as_path().join("img.qcow2"), standalone: true };
        let img = create_overlay(&cfg, 3 << 20).unwrap();
        img.write(&(0..8192u32).map(|i| (i % 251) as u8).collect::<Vec<_>>()[..], 1 << 20).unwrap();
        img.flush().unwrap();
        drop(img);
        let (alone, indexed) = (digest_only(&cfg.overlay).unwrap(), build(&cfg.overlay, Algo::Sha256, 4096).unwrap());
        assert_eq!(alone, indexed.image);
        assert!(!indexed.is_empty());
    }
}
