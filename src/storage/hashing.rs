//! Hashing and copying streams: the one place a stream's SHA-256 and size are
//! counted ([`HashingWriter`] on the way out, [`HashingReader`] on the way in)
//! and the one copy loop ([`copy`]) every backup, restore, archive and recovery
//! uses.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Hashes and counts what passes through to the inner writer.
pub struct HashingWriter<'a> {
    inner: &'a mut (dyn tokio::io::AsyncWrite + Send + Unpin),
    hasher: sha2::Sha256,
    bytes: u64,
}

impl<'a> HashingWriter<'a> {
    pub fn new(inner: &'a mut (dyn tokio::io::AsyncWrite + Send + Unpin)) -> Self {
        HashingWriter {
            inner,
            hasher: sha2::Sha256::new(),
            bytes: 0,
        }
    }

    /// The bytes written and their sha256, in hex.
    pub fn finish(self) -> (u64, String) {
        (self.bytes, hex::encode(self.hasher.finalize()))
    }
}

impl tokio::io::AsyncWrite for HashingWriter<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            this.hasher.update(&buf[..n]);
            this.bytes += n as u64;
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// A reader that hashes and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: AsyncRead + Unpin> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Reads the rest, then returns everything's size and SHA-256 (hex).
    pub async fn finish(mut self) -> io::Result<(u64, String)> {
        let mut buf = vec![0u8; 64 * 1024];
        while self.read(&mut buf).await? > 0 {}
        Ok((self.bytes, hex::encode(self.hasher.finalize())))
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for HashingReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let new = &buf.filled()[before..];
            this.hasher.update(new);
            this.bytes += new.len() as u64;
        }
        r
    }
}

/// What [`copy`] does when writing fails.
#[derive(Debug, Clone, Copy)]
pub struct CopyRules {
    /// The start of the message when writing fails ("writing the backup failed").
    pub writing: &'static str,
    /// The reader of the output may stop early (a tool that closed its stdin):
    /// the rest of the input is still read (so it is hashed to its end), just
    /// not written.
    pub reader_may_stop: bool,
}

impl CopyRules {
    pub const fn strict(writing: &'static str) -> CopyRules {
        CopyRules {
            writing,
            reader_may_stop: false,
        }
    }
}

/// Copies `input` into `out` in 256 KiB reads, telling `on_bytes` how much
/// passed, until the input ends; stops when cancelled. Returns the bytes read.
/// To hash, wrap `out` in a [`HashingWriter`] (what was written) or `input` in a
/// [`HashingReader`] (what was read, written or not).
pub async fn copy(
    input: &mut (dyn AsyncRead + Send + Unpin),
    out: &mut (dyn AsyncWrite + Send + Unpin),
    on_bytes: &(dyn Fn(u64) + Send + Sync),
    cancel: &CancellationToken,
    rules: CopyRules,
) -> Result<u64, String> {
    let mut bytes = 0u64;
    let mut open = true;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = tokio::select! {
            r = input.read(&mut buf) => r.map_err(|e| format!("reading failed: {e}"))?,
            _ = cancel.cancelled() => return Err("cancelled".to_string()),
        };
        if n == 0 {
            break;
        }
        if open {
            match out.write_all(&buf[..n]).await {
                Ok(()) => {}
                Err(e) if rules.reader_may_stop && e.kind() == io::ErrorKind::BrokenPipe => {
                    open = false
                }
                Err(e) => return Err(format!("{}: {e}", rules.writing)),
            }
        }
        bytes += n as u64;
        on_bytes(n as u64);
    }
    if open {
        let flushed = out.flush().await;
        if !rules.reader_may_stop {
            flushed.map_err(|e| format!("{}: {e}", rules.writing))?;
        }
    }
    Ok(bytes)
}
