//! `torusctl volume import` and `volume export`: a whole volume to or from a
//! file or a pipe, sparse-aware.
//!
//! - Import creates the volume, then writes only what holds data: a file's
//!   holes (SEEK_DATA/SEEK_HOLE) are skipped unread, and 4 KiB blocks of
//!   zeroes are neither sent nor stored. If it fails, the volume it created
//!   is deleted: nothing half-imported stays behind.
//! - Export asks the volume which ranges hold data (the store's block
//!   tables, `BlockDevice::allocation`) and reads only those. A file gets
//!   holes where the volume has none and is written as `FILE.partial`,
//!   renamed when complete; a pipe gets zeroes for them.
//!
//! Both show a progress bar when stderr is a terminal.

use anyhow::{bail, Context};
use bytes::Bytes;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use torus_meta::cluster::Cluster;
use torus_types::format_size;
use torus_volume::device::Run;
use torus_volume::{BlockDevice, ManagerOptions, Volume, VolumeManager};

/// Bytes read or written in one piece.
const CHUNK: u64 = 1 << 20;
/// Pieces in flight at once.
const IN_FLIGHT: usize = 8;
const BLOCK: usize = 4096;

fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

/// The runs of `data` (which starts at `offset`) that are not all zeroes, 4 KiB-block by block.
fn nonzero_runs(offset: u64, data: &[u8]) -> Vec<(u64, std::ops::Range<usize>)> {
    let mut out: Vec<(u64, std::ops::Range<usize>)> = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let end = (at + BLOCK).min(data.len());
        if data[at..end].iter().any(|&b| b != 0) {
            match out.last_mut() {
                Some((_, r)) if r.end == at => r.end = end,
                _ => out.push((offset + at as u64, at..end)),
            }
        }
        at = end;
    }
    out
}

/// Where the data of a file is: `(offset, len)` ranges (SEEK_DATA/SEEK_HOLE;
/// the whole file where the filesystem cannot tell).
fn data_ranges(f: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on an open descriptor; offsets are in range.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past pos
            }
            return vec![(0, len)];
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (data, hole) = (data as u64, if hole < 0 { len } else { (hole as u64).min(len) });
        if hole > data {
            out.push((data, hole - data));
        }
        pos = hole.max(data + 1);
    }
    out
}

/// Pieces of the source to write: `(offset, bytes)`; sent by the reading thread.
type Piece = (u64, Bytes);

/// What an import reads.
enum Source {
    /// A regular file of this length: read at offsets, its holes skipped unread.
    File(File, u64),
    /// Standard input: read in order.
    Stdin,
}

impl Source {
    /// The bytes to read, when known.
    fn len(&self) -> Option<u64> {
        match self {
            Source::File(_, len) => Some(*len),
            Source::Stdin => None,
        }
    }
}

/// Reads the source on a thread of its own, sending its non-zero pieces; the
/// progress bar counts every byte covered, holes included. Returns the bytes sent.
fn read_source(
    source: Source,
    size: u64,
    tx: tokio::sync::mpsc::Sender<anyhow::Result<Piece>>,
    bar: ProgressBar,
) -> anyhow::Result<u64> {
    let send = |p: anyhow::Result<Piece>| tx.blocking_send(p).map_err(|_| anyhow::anyhow!("import stopped"));
    let mut stored = 0u64;
    let mut piece = |offset: u64, buf: &[u8]| -> anyhow::Result<()> {
        for (at, r) in nonzero_runs(offset, buf) {
            stored += r.len() as u64;
            send(Ok((at, Bytes::copy_from_slice(&buf[r]))))?;
        }
        bar.inc(buf.len() as u64);
        Ok(())
    };
    let mut buf = vec![0u8; CHUNK as usize];
    match source {
        Source::File(f, len) => {
            let ranges = data_ranges(&f, len);
            bar.inc(len - ranges.iter().map(|r| r.1).sum::<u64>());
            for (start, n) in ranges {
                let mut pos = start;
                while pos < start + n {
                    let k = (CHUNK - pos % CHUNK).min(start + n - pos) as usize;
                    f.read_exact_at(&mut buf[..k], pos).with_context(|| format!("reading at byte {pos}"))?;
                    piece(pos, &buf[..k])?;
                    pos += k as u64;
                }
            }
        }
        Source::Stdin => {
            let mut stdin = std::io::stdin();
            let mut pos = 0u64;
            loop {
                let mut k = 0;
                while k < buf.len() {
                    match stdin.read(&mut buf[k..]) {
                        Ok(0) => break,
                        Ok(n) => k += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e).context("reading standard input"),
                    }
                }
                if k == 0 {
                    break;
                }
                if pos + k as u64 > size {
                    bail!("the input is longer than the volume's {} (--size)", format_size(size));
                }
                piece(pos, &buf[..k])?;
                pos += k as u64;
                if k < buf.len() {
                    break;
                }
            }
        }
    }
    Ok(stored)
}

pub async fn import(
    cluster: &Cluster,
    key: &torus_cli::KeyArgs,
    source: &str,
    name: &str,
    size: Option<u64>,
    replication: Option<u32>,
    encryption: Option<torus_meta::cluster::Encryption>,
) -> anyhow::Result<()> {
    if cluster.volume(name).await.is_ok() {
        bail!("volume {name} exists already: import creates the volume (delete it, or pick another name)");
    }
    let input = if source == "-" {
        Source::Stdin
    } else {
        let f = File::open(source).with_context(|| format!("opening {source}"))?;
        let meta = f.metadata().with_context(|| format!("reading the size of {source}"))?;
        if !meta.is_file() {
            bail!("{source} is not a regular file (use - and --size to read a device or a pipe from stdin)");
        }
        Source::File(f, meta.len())
    };
    let len = input.len();
    let size = match (size, len) {
        (Some(s), Some(l)) if s < l => {
            bail!("{source} holds {} bytes, more than --size {}", l, format_size(s))
        }
        (Some(s), _) => s,
        (None, Some(0)) => bail!("{source} is empty: nothing to import"),
        (None, Some(l)) => l.div_ceil(512) * 512,
        (None, None) => bail!("importing from standard input needs --size (the volume's size)"),
    };
    let key = key.load()?;
    let info = cluster.create_volume_with(name, size, replication, encryption).await.context("creating the volume")?;
    let started = Instant::now();
    let result = import_into(cluster, key, name, size, input).await;
    match result {
        Ok(stored) => {
            println!(
                "imported {source} into volume {name} ({}, replication {}): {} stored, {} of holes and zeroes \
                 skipped, in {:.1} s",
                format_size(size),
                info.replication,
                format_size(stored),
                format_size(len.unwrap_or(size).saturating_sub(stored)),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(e) => {
            let cleanup = match crate::volume::delete(cluster, name).await {
                Ok(_) => "the volume it created was deleted".to_string(),
                Err(d) => format!("deleting the volume it created failed too ({d:#}): delete {name} by hand"),
            };
            Err(e.context(format!("import into {name} failed; {cleanup}")))
        }
    }
}

async fn import_into(
    cluster: &Cluster,
    key: Option<std::sync::Arc<torus_volume::crypt::ClusterKey>>,
    name: &str,
    size: u64,
    input: Source,
) -> anyhow::Result<u64> {
    let opts =
        ManagerOptions { holder: format!("torusctl import (pid {})", std::process::id()), key, ..Default::default() };
    let manager = VolumeManager::new(cluster.clone(), opts);
    let vol = manager.open(name, true).await.context("opening the new volume")?;
    let bar = progress(input.len().unwrap_or(size), "import");
    let (tx, rx) = tokio::sync::mpsc::channel::<anyhow::Result<Piece>>(IN_FLIGHT);
    let reading = {
        let bar = bar.clone();
        tokio::task::spawn_blocking(move || read_source(input, size, tx, bar))
    };
    let written = ReceiverStream::new(rx)
        .map(|piece| {
            let vol = vol.clone();
            async move {
                let (at, data) = piece?;
                vol.write(at, data, false).await.with_context(|| format!("writing at byte {at}"))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await;
    // A failed write ends the stream, and with it the reader (its send fails):
    // the write's error comes first.
    let stored = reading.await.context("the reading thread died")?;
    written?;
    let stored = stored?;
    vol.flush().await.context("flushing the volume")?;
    bar.finish_and_clear();
    vol.release().await;
    drop(vol);
    manager.close_all().await;
    Ok(stored)
}

/// Where an export goes.
enum Sink {
    /// A file, written at offsets (holes stay holes), renamed from `partial` at the end.
    File { f: File, partial: std::path::PathBuf, path: String },
    /// Standard output: every byte in order, zeroes for holes.
    Stdout(std::io::Stdout),
}

pub async fn export(
    cluster: &Cluster,
    key: &torus_cli::KeyArgs,
    spec: &str,
    dest: &str,
    force: bool,
) -> anyhow::Result<()> {
    if spec.contains('@') {
        torus_meta::cluster::parse_snapshot_ref(spec)?;
    }
    let name = spec;
    let manager = VolumeManager::new(cluster.clone(), ManagerOptions { key: key.load()?, ..Default::default() });
    let vol = manager.open(name, false).await.with_context(|| format!("opening volume {name} to read it"))?;
    let size = vol.size();
    let mut sink = if dest == "-" {
        Sink::Stdout(std::io::stdout())
    } else {
        let path = std::path::Path::new(dest);
        if path.exists() && !force {
            bail!("{dest} exists: refusing to overwrite it without --force");
        }
        let partial = std::path::PathBuf::from(format!("{dest}.partial"));
        let f = File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
        f.set_len(size).with_context(|| format!("sizing {}", partial.display()))?;
        Sink::File { f, partial, path: dest.to_string() }
    };
    let started = Instant::now();
    let result = export_into(&vol, size, &mut sink).await;
    drop(vol);
    manager.close_all().await;
    let read = match (result, sink) {
        (Ok(read), Sink::File { f, partial, path }) => {
            f.sync_all().with_context(|| format!("syncing {}", partial.display()))?;
            std::fs::rename(&partial, &path).with_context(|| format!("renaming {} to {path}", partial.display()))?;
            read
        }
        (Ok(read), Sink::Stdout(mut out)) => {
            out.flush().context("writing to standard output")?;
            read
        }
        (Err(e), Sink::File { partial, .. }) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e.context(format!("export of {name} failed; nothing was left at {dest}")));
        }
        (Err(e), Sink::Stdout(_)) => return Err(e.context(format!("export of {name} failed part way"))),
    };
    eprintln!(
        "exported volume {name} ({}) to {dest}: {} read, {} of holes skipped, in {:.1} s",
        format_size(size),
        format_size(read),
        format_size(size - read),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Copies the volume into the sink; returns the bytes of data read.
async fn export_into(vol: &Arc<Volume>, size: u64, sink: &mut Sink) -> anyhow::Result<u64> {
    let bar = progress(size, "export");
    let mut read = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let runs = vol.allocation(pos, size - pos).await.with_context(|| format!("asking where data is at {pos}"))?;
        for Run { len, data } in runs {
            let end = pos + len;
            if !data {
                if let Sink::Stdout(out) = sink {
                    let zeroes = vec![0u8; CHUNK.min(len) as usize];
                    let mut at = pos;
                    while at < end {
                        let n = CHUNK.min(end - at) as usize;
                        out.write_all(&zeroes[..n]).context("writing to standard output")?;
                        at += n as u64;
                    }
                }
                bar.inc(len);
                pos = end;
                continue;
            }
            // Pieces read concurrently, written in order.
            let pieces: Vec<(u64, u32)> =
                (pos..end).step_by(CHUNK as usize).map(|at| (at, CHUNK.min(end - at) as u32)).collect();
            let mut reads = stream::iter(pieces)
                .map(|(at, n)| async move {
                    vol.read(at, n).await.map(|d| (at, d)).with_context(|| format!("reading at byte {at}"))
                })
                .buffered(IN_FLIGHT);
            while let Some(r) = reads.next().await {
                let (at, d) = r?;
                match sink {
                    Sink::File { f, partial, .. } => {
                        for (off, r) in nonzero_runs(at, &d) {
                            f.write_all_at(&d[r], off).with_context(|| format!("writing {}", partial.display()))?;
                        }
                    }
                    Sink::Stdout(out) => out.write_all(&d).context("writing to standard output")?,
                }
                read += d.len() as u64;
                bar.inc(d.len() as u64);
            }
            pos = end;
        }
    }
    bar.finish_and_clear();
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_are_left_out() {
        let mut d = vec![0u8; 5 * BLOCK];
        d[BLOCK + 7] = 1;
        d[2 * BLOCK] = 2;
        d[4 * BLOCK + 100] = 3;
        let runs = nonzero_runs(1 << 20, &d);
        assert_eq!(
            runs,
            vec![((1 << 20) + BLOCK as u64, BLOCK..3 * BLOCK), ((1 << 20) + 4 * BLOCK as u64, 4 * BLOCK..5 * BLOCK)]
        );
        assert!(nonzero_runs(0, &[0u8; 3000]).is_empty());
        assert_eq!(nonzero_runs(0, &[9u8; 3000]), vec![(0, 0..3000)]);
    }

    #[test]
    fn a_sparse_file_s_data_ranges_are_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s");
        let f = File::create(&p).expect("create");
        f.set_len(64 << 20).expect("size");
        f.write_all_at(&[1u8; 4096], 8 << 20).expect("write");
        f.write_all_at(&[1u8; 4096], 40 << 20).expect("write");
        let f = File::open(&p).expect("open");
        let ranges = data_ranges(&f, 64 << 20);
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert!(total < 4 << 20, "holes skipped: {ranges:?}");
        assert!(ranges.iter().any(|r| r.0 <= 8 << 20 && r.0 + r.1 >= (8 << 20) + 4096), "{ranges:?}");
        assert!(ranges.iter().any(|r| r.0 <= 40 << 20 && r.0 + r.1 >= (40 << 20) + 4096), "{ranges:?}");
    }
}
