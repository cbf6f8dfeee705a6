//! Hashing what is written: the one place a stream's sha256 and size are
//! counted on the way to storage.

/// Hashes and counts what passes through to the inner writer.
pub struct HashingWriter<'a> {
    inner: &'a mut (dyn tokio::io::AsyncWrite + Send + Unpin),
    hasher: sha2::Sha256,
    bytes: u64,
}

impl<'a> HashingWriter<'a> {
    pub fn new(inner: &'a mut (dyn tokio::io::AsyncWrite + Send + Unpin)) -> Self {
        use sha2::Digest;
        HashingWriter {
            inner,
            hasher: sha2::Sha256::new(),
            bytes: 0,
        }
    }

    /// The bytes written and their sha256, in hex.
    pub fn finish(self) -> (u64, String) {
        use sha2::Digest;
        (self.bytes, hex::encode(self.hasher.finalize()))
    }
}

impl tokio::io::AsyncWrite for HashingWriter<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use sha2::Digest;
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
