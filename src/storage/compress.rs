//! Compression of artifacts by dbops itself (issue #23): the tool (`pg_dump -Z0`,
//! the Redis export) writes uncompressed, and dbops compresses with zstd on
//! threads of its own, at a lower CPU priority than the web server, as the bytes
//! flow to storage. The stored file is one zstd frame (with zstd's content
//! checksum) around exactly what the tool wrote, so by hand it is
//! `zstd -d < FILE | pg_restore …`.
//!
//! Reading back ([`Unpacked`]) decompresses on the fly and hashes the *stored*
//! bytes on the way, so one read both feeds the tool and re-checks the recorded
//! SHA-256. Memory stays flat: a few 256 KiB chunks in flight and zstd's own
//! buffers (bounded by the job size set here).

use std::{
    io::{self, Write as _},
    pin::Pin,
    task::{Context, Poll},
};

use super::hashing::HashingReader;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

/// The value of `backups.compression` for a zstd artifact written by dbops.
pub const ZSTD: &str = "zstd";

/// Bytes handed between the tool, the compressor and the storage at a time.
const CHUNK: usize = 256 * 1024;

/// Chunks waiting in each direction (so at most about 2 MiB in flight).
const IN_FLIGHT: usize = 4;

/// The size of one zstd worker job: small enough to keep memory flat with two
/// workers (zstd would pick 4× the window, 8 MiB at level 3), large enough that
/// splitting costs no ratio worth mentioning.
const JOB_SIZE: u32 = 2 * 1024 * 1024;

/// The nice value of the compressor's threads (and of the tools dbops runs for a
/// backup): the web server's threads keep the default 0 and go first.
pub const BACKGROUND_NICE: i32 = 10;

/// How dbops compresses an artifact: zstd at `level` on `threads` threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Zstd {
    pub level: i32,
    pub threads: u32,
}

impl Zstd {
    /// Level 3 (zstd's default) on at most 2 threads (fewer on a 1-core machine).
    pub fn default_threads() -> u32 {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
            .clamp(1, 2)
    }

    /// What a backup's options say (`{"compression": {"method": "zstd", "level":
    /// 3, "threads": 2}}`); `None` for the tool's own compression.
    pub fn from_options(options: &serde_json::Value) -> Option<Zstd> {
        let c = options.get("compression")?;
        if c.get("method")?.as_str()? != ZSTD {
            return None;
        }
        Some(Zstd {
            level: c.get("level")?.as_i64()? as i32,
            threads: c.get("threads")?.as_u64()? as u32,
        })
    }

    /// The part of a backup's options that names this compression.
    pub fn to_options(self) -> serde_json::Value {
        serde_json::json!({ "method": ZSTD, "level": self.level, "threads": self.threads })
    }
}

/// What [`copy_compressed`] moved.
#[derive(Debug, Clone)]
pub struct Compressed {
    /// Bytes read from the tool (uncompressed).
    pub raw_bytes: u64,
    /// Bytes written to storage, and their SHA-256 (hex).
    pub bytes: u64,
    pub sha256: String,
}

enum Msg {
    Data(Vec<u8>),
    End,
}

/// Lowers the calling thread's CPU priority (Linux: the nice value is per
/// thread, and threads it starts inherit it).
fn lower_this_thread() {
    // SAFETY: setpriority on the calling thread's own id; no memory is involved.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE);
    }
}

/// The compressor's output: chunks sent to the async side.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the storage stopped"))
    }
}

impl io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// The compressor thread's body: everything it is sent, compressed, until
/// [`Msg::End`]; a closed channel without it is an abort (no frame end).
fn compress_thread(
    z: Zstd,
    mut rx: tokio::sync::mpsc::Receiver<Msg>,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> io::Result<()> {
    lower_this_thread();
    let sink = ChannelWriter {
        tx,
        buf: Vec::with_capacity(CHUNK),
    };
    let mut enc = zstd::stream::write::Encoder::new(sink, z.level)?;
    enc.include_checksum(true)?;
    if z.threads > 1 {
        enc.multithread(z.threads)?;
        enc.set_parameter(zstd::stream::raw::CParameter::JobSize(JOB_SIZE))?;
    }
    loop {
        match rx.blocking_recv() {
            Some(Msg::Data(chunk)) => enc.write_all(&chunk)?,
            Some(Msg::End) => break,
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "the compression was stopped",
                ));
            }
        }
    }
    let mut sink = enc.finish()?;
    sink.flush()
}

/// Copies `input` into `out` compressed with zstd (on a thread of its own at a
/// lower priority, with `z.threads` workers), hashing what is written;
/// `on_read` is told how many uncompressed bytes came in. Stops when cancelled.
pub async fn copy_compressed(
    input: &mut (dyn AsyncRead + Send + Unpin),
    out: &mut (dyn AsyncWrite + Send + Unpin),
    z: Zstd,
    on_read: &(dyn Fn(u64) + Send + Sync),
    cancel: &CancellationToken,
) -> Result<Compressed, String> {
    let (raw_tx, raw_rx) = tokio::sync::mpsc::channel::<Msg>(IN_FLIGHT);
    let (z_tx, mut z_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(IN_FLIGHT);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("dbops-zstd".into())
        .spawn(move || {
            let _ = done_tx.send(compress_thread(z, raw_rx, z_tx));
        })
        .map_err(|e| format!("cannot start the compressor: {e}"))?;
    let reading = async {
        let mut raw = 0u64;
        loop {
            let mut chunk = vec![0u8; CHUNK];
            let n = input
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading failed: {e}"))?;
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            raw += n as u64;
            on_read(n as u64);
            if raw_tx.send(Msg::Data(chunk)).await.is_err() {
                // The compressor stopped: its own error says why.
                return Ok(raw);
            }
        }
        let _ = raw_tx.send(Msg::End).await;
        Ok::<_, String>(raw)
    };
    let writing = async {
        let mut hashing = super::HashingWriter::new(out);
        while let Some(chunk) = z_rx.recv().await {
            hashing
                .write_all(&chunk)
                .await
                .map_err(|e| format!("writing the backup failed: {e}"))?;
        }
        hashing
            .flush()
            .await
            .map_err(|e| format!("writing the backup failed: {e}"))?;
        Ok::<_, String>(hashing.finish())
    };
    let moved = tokio::select! {
        r = async { tokio::try_join!(reading, writing) } => r,
        _ = cancel.cancelled() => Err("cancelled".to_string()),
    };
    // Closing both channels ends the thread whatever state it is in: finished
    // after `End`, or (an error, a cancel) stopped without a frame end.
    drop(raw_tx);
    drop(z_rx);
    let compressed = done_rx
        .await
        .unwrap_or_else(|_| Err(io::Error::other("the compressor stopped unexpectedly")));
    let (raw_bytes, (bytes, sha256)) = moved?;
    compressed.map_err(|e| format!("compressing failed: {e}"))?;
    Ok(Compressed {
        raw_bytes,
        bytes,
        sha256,
    })
}

type Stored = Pin<Box<dyn AsyncRead + Send>>;

/// A stored zstd artifact read back as what the tool wrote: decompressed on the
/// fly, with the stored bytes hashed on the way. A flipped byte or a cut-off
/// file fails the read (zstd's frame checksum and end); [`Unpacked::finish`]
/// gives the stored size and SHA-256 to compare with the recorded ones.
pub struct Unpacked {
    decoder:
        async_compression::tokio::bufread::ZstdDecoder<tokio::io::BufReader<HashingReader<Stored>>>,
}

impl Unpacked {
    pub fn new(stored: Stored) -> Unpacked {
        Unpacked {
            decoder: async_compression::tokio::bufread::ZstdDecoder::new(
                tokio::io::BufReader::with_capacity(CHUNK, HashingReader::new(stored)),
            ),
        }
    }

    /// Reads what is left of the stored file (bytes after the frame count too),
    /// and returns the stored size and SHA-256.
    pub async fn finish(self) -> io::Result<(u64, String)> {
        let mut buffered = self.decoder.into_inner();
        // What the buffer still holds was hashed when it was read.
        let pending = buffered.buffer().len();
        Pin::new(&mut buffered).consume(pending);
        buffered.into_inner().finish().await
    }
}

impl AsyncRead for Unpacked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.decoder).poll_read(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the backup file is damaged: it does not decompress (zstd: {e})"),
            ))),
            r => r,
        }
    }
}

/// What a stored artifact holds, for a tool to read: `compression` is the
/// backup's (`None`: stored as the tool wrote it, as before dbops compressed).
pub fn reader_for(
    stored: Stored,
    compression: Option<&str>,
) -> Result<Pin<Box<dyn AsyncRead + Send>>, String> {
    match compression {
        None => Ok(stored),
        Some(ZSTD) => Ok(Box::pin(Unpacked::new(stored))),
        Some(other) => Err(format!(
            "the backup is compressed with {other}, which this dbops cannot read"
        )),
    }
}

/// The file name ending dbops adds to an artifact it compressed.
pub fn extension(compression: Option<&str>) -> &'static str {
    match compression {
        Some(ZSTD) => ".zst",
        _ => "",
    }
}

/// One line saying how to restore a downloaded artifact by hand, for the page.
pub fn by_hand(format: &str, compression: Option<&str>, file: &str) -> Option<String> {
    let z = compression == Some(ZSTD);
    Some(match (format, z) {
        ("custom", true) => format!("zstd -d < {file} | pg_restore --no-owner -d DBNAME"),
        ("custom", false) => format!("pg_restore --no-owner -d DBNAME {file}"),
        ("directory", true) => format!(
            "mkdir dump && zstd -d < {file} | tar -C dump -xf - && pg_restore --no-owner -j 2 -d DBNAME dump"
        ),
        ("directory", false) => format!(
            "mkdir dump && tar -C dump -xf {file} && pg_restore --no-owner -j 2 -d DBNAME dump"
        ),
        ("plain", true) => format!("zstd -d < {file} | psql -v ON_ERROR_STOP=1 -d DBNAME"),
        ("plain", false) => format!("psql -v ON_ERROR_STOP=1 -d DBNAME -f {file}"),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn what_is_compressed_reads_back_the_same_and_damage_is_refused() {
        let mut data = Vec::new();
        for i in 0..200_000u32 {
            data.extend_from_slice(format!("{i:08x} row of text\n").as_bytes());
        }
        for threads in [1, 2] {
            let mut stored = Vec::new();
            let c = copy_compressed(
                &mut &data[..],
                &mut stored,
                Zstd { level: 3, threads },
                &|_| {},
                &CancellationToken::new(),
            )
            .await
            .unwrap();
            assert_eq!(c.raw_bytes, data.len() as u64);
            assert_eq!(c.bytes, stored.len() as u64);
            assert!(stored.len() < data.len() / 3, "{}", stored.len());
            let mut back = Unpacked::new(Box::pin(std::io::Cursor::new(stored.clone())));
            let mut out = Vec::new();
            back.read_to_end(&mut out).await.unwrap();
            assert!(out == data);
            let (n, sha) = back.finish().await.unwrap();
            assert_eq!((n, sha), (c.bytes, c.sha256.clone()));
            // One flipped byte, or a cut-off file: the read fails.
            let mut flipped = stored.clone();
            let at = flipped.len() / 2;
            flipped[at] ^= 0x01;
            let mut back = Unpacked::new(Box::pin(std::io::Cursor::new(flipped)));
            assert!(back.read_to_end(&mut Vec::new()).await.is_err());
            let cut = stored[..stored.len() - 10].to_vec();
            let mut back = Unpacked::new(Box::pin(std::io::Cursor::new(cut)));
            assert!(back.read_to_end(&mut Vec::new()).await.is_err());
        }
    }

    /// A writer that fails once it has taken `left` bytes.
    struct Full {
        left: usize,
    }

    impl AsyncWrite for Full {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.left < data.len() {
                return Poll::Ready(Err(io::Error::other("no space left")));
            }
            self.left -= data.len();
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_storage_that_fails_or_a_cancel_ends_the_copy_and_its_thread() {
        // Random bytes do not compress: the output outgrows the writer soon.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..8_000_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let e = copy_compressed(
            &mut &data[..],
            &mut Full { left: 300_000 },
            Zstd {
                level: 1,
                threads: 2,
            },
            &|_| {},
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(e.contains("no space left"), "{e}");
        let cancel = CancellationToken::new();
        cancel.cancel();
        let e = copy_compressed(
            &mut &data[..],
            &mut Vec::new(),
            Zstd {
                level: 1,
                threads: 2,
            },
            &|_| {},
            &cancel,
        )
        .await
        .unwrap_err();
        assert_eq!(e, "cancelled");
    }

    #[test]
    fn options_name_the_compression() {
        let z = Zstd {
            level: 5,
            threads: 2,
        };
        let o = serde_json::json!({ "format": "custom", "compression": z.to_options() });
        assert_eq!(Zstd::from_options(&o), Some(z));
        assert_eq!(Zstd::from_options(&serde_json::json!({})), None);
        assert!(reader_for(Box::pin(tokio::io::empty()), Some("lz9")).is_err());
    }
}
