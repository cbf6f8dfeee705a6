//! Backups as objects in an S3 (or S3-compatible) bucket ([`S3Storage`]).

use super::*;

// ---------------------------------------------------------------------------
// S3

/// How to reach an S3 (or S3-compatible: MinIO, Ceph, …) bucket.
///
/// Credentials: give `access_key_id` and `secret_access_key` (from the config
/// file or the environment, kept as a [`SecretString`]); leave both empty to use
/// the ambient AWS credentials instead (`AWS_*` environment variables, web
/// identity, or the instance/container role).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct S3Settings {
    /// The bucket; it must exist already.
    pub bucket: String,
    /// Keys are stored under `prefix/`; empty for the bucket's root.
    #[serde(default)]
    pub prefix: String,
    /// For example `eu-west-1`; empty means `us-east-1`.
    #[serde(default)]
    pub region: String,
    /// An S3-compatible service's URL (`https://minio.internal:9000`), or none for AWS.
    /// Requests use path style (`endpoint/bucket/key`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Empty, with an empty secret, to use the ambient AWS credentials.
    #[serde(default)]
    pub access_key_id: String,
    /// The secret matching `access_key_id`.
    #[serde(default = "empty_secret")]
    pub secret_access_key: SecretString,
    /// Allows an `http://` endpoint (credentials and backups then travel unencrypted).
    #[serde(default)]
    pub allow_http: bool,
}

fn empty_secret() -> SecretString {
    SecretString::from(String::new())
}

/// Backups as objects in an S3 bucket, under a prefix. An upload is a multipart
/// upload sent part by part (16 MiB, at most [`S3_PARTS_IN_FLIGHT`] in flight) that
/// becomes visible only when completed by [`Upload::commit`]; uploads under one
/// part are sent as a single PUT at commit.
///
/// Abandoned multipart uploads (a crash of dbops mid-upload) stay invisible but
/// are billed until aborted: give the bucket a lifecycle rule
/// `AbortIncompleteMultipartUpload` (for example after one day).
pub struct S3Storage {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
    scrub: Arc<Scrubber>,
}

/// Removes credentials from error texts (S3 error bodies may echo the key id).
pub(super) struct Scrubber(pub(super) Vec<String>);

impl Scrubber {
    /// The message without credentials, an S3 XML error body reduced to its gist.
    pub(super) fn clean(&self, message: &str) -> String {
        let message = self.scrub(message);
        condense_s3_error(&message).unwrap_or(message)
    }

    fn scrub(&self, message: &str) -> String {
        let mut out = message.to_string();
        for s in &self.0 {
            if !s.is_empty() {
                out = out.replace(s.as_str(), "[redacted]");
            }
        }
        out
    }
}

impl S3Storage {
    /// Builds the client (no request is made: a wrong bucket or credentials show
    /// at the first operation).
    pub fn new(cfg: &S3Settings) -> Result<Self, StorageError> {
        // object_store and other crates bring rustls; pick aws-lc-rs so none panics.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

        let bucket = cfg.bucket.trim();
        if bucket.is_empty() {
            return Err(StorageError::Config("no S3 bucket is configured".into()));
        }
        let prefix = cfg.prefix.trim_matches('/');
        if !prefix.is_empty() {
            validate_key(prefix).map_err(|e| {
                StorageError::Config(format!("the S3 prefix {prefix:?} is not usable: {e}"))
            })?;
        }
        let region = match cfg.region.trim() {
            "" => "us-east-1",
            r => r,
        };
        let secret = cfg.secret_access_key.expose_secret();
        let builder = match (cfg.access_key_id.is_empty(), secret.is_empty()) {
            (false, false) => AmazonS3Builder::new()
                .with_access_key_id(&cfg.access_key_id)
                .with_secret_access_key(secret),
            (true, true) => AmazonS3Builder::from_env(),
            _ => {
                return Err(StorageError::Config(
                    "give both the S3 access key id and its secret, or neither (to use the \
                     ambient AWS credentials)"
                        .into(),
                ));
            }
        };
        let mut builder = builder
            .with_bucket_name(bucket)
            .with_region(region)
            .with_allow_http(cfg.allow_http)
            .with_virtual_hosted_style_request(false)
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(cfg.allow_http)
                    .with_connect_timeout(Duration::from_secs(10))
                    // No limit on a whole request (a download of a big backup may take
                    // hours); instead every request must get an answer, and every
                    // read some bytes, within 5 minutes (a 16 MiB part at ≥ 55 kB/s).
                    .with_timeout_disabled()
                    .with_read_timeout(Duration::from_secs(300)),
            );
        let mut endpoint_shown = None;
        if let Some(endpoint) = cfg
            .endpoint
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let url = url::Url::parse(endpoint)
                .map_err(|e| StorageError::Config(format!("the S3 endpoint is not a URL ({e})")))?;
            if !url.username().is_empty() || url.password().is_some() {
                return Err(StorageError::Config(
                    "the S3 endpoint URL must not contain credentials; use access_key_id and \
                     secret_access_key"
                        .into(),
                ));
            }
            match url.scheme() {
                "https" => {}
                "http" if cfg.allow_http => {}
                "http" => {
                    return Err(StorageError::Config(format!(
                        "the S3 endpoint {url} uses plain http; set allow_http to allow it \
                         (credentials and backups would travel unencrypted)"
                    )));
                }
                other => {
                    return Err(StorageError::Config(format!(
                        "the S3 endpoint must be an http(s) URL, not {other}:"
                    )));
                }
            }
            endpoint_shown = Some(endpoint.trim_end_matches('/').to_string());
            builder = builder.with_endpoint(endpoint.trim_end_matches('/'));
        }
        let scrub = Arc::new(Scrubber(vec![
            secret.to_string(),
            cfg.access_key_id.clone(),
        ]));
        let store = builder.build().map_err(|e| {
            StorageError::Config(format!(
                "the S3 settings are not usable: {}",
                scrub.clean(&e.to_string())
            ))
        })?;
        Ok(S3Storage {
            store: Arc::new(store),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: endpoint_shown,
            scrub,
        })
    }

    fn location(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn url(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}/{key}", self.bucket)
        } else {
            format!("s3://{}/{}/{key}", self.bucket, self.prefix)
        }
    }

    fn error(&self, e: object_store::Error, doing: &str, key: &str) -> StorageError {
        s3_error(&self.scrub, &self.bucket, e, doing, &self.url(key))
    }
}

/// Turns an object_store error into a sentence (without credentials).
fn s3_error(
    scrub: &Scrubber,
    bucket: &str,
    e: object_store::Error,
    doing: &str,
    url: &str,
) -> StorageError {
    let raw = e.to_string();
    tracing::debug!(error = %scrub.scrub(&raw), "S3 request failed");
    let detail = scrub.clean(&raw);
    if raw.contains("<Code>NoSuchBucket</Code>") {
        return StorageError::Config(format!(
            "the S3 bucket {bucket} does not exist ({doing} {url})"
        ));
    }
    match e {
        object_store::Error::NotFound { .. } => StorageError::NotFound(url.to_string()),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => StorageError::Io(format!(
            "the S3 service refused {doing} {url}: check the credentials and the bucket \
                 policy ({detail})"
        )),
        _ => StorageError::Io(format!("{doing} {url} failed: {detail}")),
    }
}

/// Shortens an S3 error that carries an XML body to its status, message and code
/// (`HTTP 404 Not Found: The specified bucket does not exist (NoSuchBucket)`).
pub(super) fn condense_s3_error(detail: &str) -> Option<String> {
    let tag = |t: &str| -> Option<&str> {
        let open = format!("<{t}>");
        let start = detail.find(&open)? + open.len();
        let end = start + detail[start..].find(&format!("</{t}>"))?;
        Some(&detail[start..end])
    };
    let code = tag("Code")?;
    let message = tag("Message").unwrap_or("no message");
    let status = detail
        .split_once("status code: ")
        .and_then(|(_, rest)| rest.split(':').next())
        .map(str::trim)
        .filter(|s| !s.is_empty());
    Some(match status {
        Some(status) => format!("HTTP {status}: {message} ({code})"),
        None => format!("{message} ({code})"),
    })
}

impl S3Storage {
    /// The storage `[backups.s3]` describes.
    pub fn from_config(s3: &crate::config::S3Config) -> Result<S3Storage, StorageError> {
        S3Storage::new(&S3Settings {
            bucket: s3.bucket.clone(),
            prefix: s3.prefix.clone(),
            region: s3.region.clone(),
            endpoint: s3.endpoint.clone(),
            access_key_id: s3.access_key_id.clone(),
            secret_access_key: s3.secret_access_key.clone(),
            allow_http: s3.allow_http,
        })
    }
}

/// Checkpoints of the operations log kept in the same bucket
/// (`audit-checkpoints/…`; see [`crate::audit::checkpoint`]).
impl crate::audit::checkpoint::ObjectWitness for S3Storage {
    fn put<'a>(&'a self, key: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt;
            let mut up = self.create(key).await.map_err(|e| e.to_string())?;
            up.write_all(&bytes).await.map_err(|e| e.to_string())?;
            up.commit().await.map_err(|e| e.to_string())
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move { Storage::list(self, prefix).await.map_err(|e| e.to_string()) })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            use tokio::io::AsyncReadExt;
            let mut r = self.open(key).await.map_err(|e| e.to_string())?;
            let mut out = vec![];
            r.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
            Ok(out)
        })
    }
}

impl Storage for S3Storage {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn describe(&self) -> String {
        let mut out = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            out.push('/');
            out.push_str(&self.prefix);
        }
        if let Some(e) = &self.endpoint {
            out.push_str(" at ");
            out.push_str(e);
        }
        out
    }

    fn create<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn Upload>, StorageError>> {
        Box::pin(async move {
            validate_key(key)?;
            let writer =
                BufWriter::with_capacity(Arc::clone(&self.store), self.location(key), S3_PART_SIZE)
                    .with_max_concurrency(S3_PARTS_IN_FLIGHT);
            Ok(Box::new(S3Upload {
                writer: Some(writer),
                failed: None,
                url: self.url(key),
                scrub: Arc::clone(&self.scrub),
            }) as Box<dyn Upload>)
        })
    }

    fn open<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Pin<Box<dyn AsyncRead + Send>>, StorageError>> {
        Box::pin(
            async move {
                validate_key(key)?;
                let got = self
                    .store
                    .get(&self.location(key))
                    .await
                    .map_err(|e| self.error(e, "reading", key))?;
                let scrub = Arc::clone(&self.scrub);
                let url = self.url(key);
                let stream = got.into_stream().map_err(move |e| {
                    let kind = match e {
                        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
                        _ => io::ErrorKind::Other,
                    };
                    io::Error::new(
                        kind,
                        format!("reading {url} failed: {}", scrub.clean(&e.to_string())),
                    )
                });
                Ok(Box::pin(tokio_util::io::StreamReader::new(stream))
                    as Pin<Box<dyn AsyncRead + Send>>)
            }
            .instrument(tracing::debug_span!("storage_open", kind = "s3", key)),
        )
    }

    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64, StorageError>> {
        Box::pin(
            async move {
                validate_key(key)?;
                let meta = self
                    .store
                    .head(&self.location(key))
                    .await
                    .map_err(|e| self.error(e, "reading the size of", key))?;
                Ok(meta.size)
            }
            .instrument(tracing::debug_span!("storage_size", kind = "s3", key)),
        )
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(
            async move {
                validate_key(key)?;
                match self.store.delete(&self.location(key)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(self.error(e, "deleting", key)),
                }
            }
            .instrument(tracing::debug_span!("storage_delete", kind = "s3", key)),
        )
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StorageError>> {
        Box::pin(
            async move {
                let prefix = validate_prefix(prefix)?;
                let full = match (self.prefix.is_empty(), prefix.is_empty()) {
                    (true, true) => None,
                    (false, true) => Some(ObjectPath::from(self.prefix.as_str())),
                    (true, false) => Some(ObjectPath::from(prefix)),
                    (false, false) => Some(ObjectPath::from(format!("{}/{prefix}", self.prefix))),
                };
                let strip = if self.prefix.is_empty() {
                    String::new()
                } else {
                    format!("{}/", self.prefix)
                };
                let mut stream = self.store.list(full.as_ref());
                let mut keys = Vec::new();
                while let Some(meta) = stream.next().await {
                    let meta = meta.map_err(|e| {
                        let url = match prefix {
                            "" => self.describe(),
                            p => self.url(p),
                        };
                        s3_error(&self.scrub, &self.bucket, e, "listing", &url)
                    })?;
                    if let Some(key) = meta.location.as_ref().strip_prefix(&strip)
                        && validate_key(key).is_ok()
                    {
                        keys.push(key.to_string());
                    }
                }
                keys.sort();
                Ok(keys)
            }
            .instrument(tracing::debug_span!("storage_list", kind = "s3", prefix)),
        )
    }

    /// object_store 0.14 cannot list a bucket's unfinished multipart uploads, so
    /// this removes nothing and returns `Ok(0)`. Uploads are aborted when
    /// [`Upload::abort`] is called, when a commit fails, and (in the background)
    /// when an upload is dropped; for a crash, rely on the bucket's
    /// `AbortIncompleteMultipartUpload` lifecycle rule.
    fn remove_partials<'a>(&'a self) -> BoxFuture<'a, Result<u64, StorageError>> {
        Box::pin(async { Ok(0) })
    }
}

/// An S3 multipart upload in progress.
struct S3Upload {
    /// `None` once committed or aborted.
    writer: Option<BufWriter>,
    /// The first write error: the writer must not be polled again after one.
    failed: Option<(io::ErrorKind, String)>,
    url: String,
    scrub: Arc<Scrubber>,
}

impl S3Upload {
    fn closed() -> io::Error {
        io::Error::other("this backup upload was already committed or aborted")
    }

    /// Polls the writer unless an earlier call failed, remembering a failure.
    fn guarded<T>(
        &mut self,
        poll: impl FnOnce(Pin<&mut BufWriter>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if let Some((kind, msg)) = &self.failed {
            return Poll::Ready(Err(io::Error::new(*kind, msg.clone())));
        }
        let Some(w) = self.writer.as_mut() else {
            return Poll::Ready(Err(Self::closed()));
        };
        match poll(Pin::new(w)) {
            Poll::Ready(Err(e)) => {
                let msg = format!(
                    "uploading {} failed: {}",
                    self.url,
                    self.scrub.clean(&e.to_string())
                );
                self.failed = Some((e.kind(), msg.clone()));
                Poll::Ready(Err(io::Error::new(e.kind(), msg)))
            }
            other => other,
        }
    }

    async fn abort_writer(&mut self) -> Result<(), StorageError> {
        let Some(mut w) = self.writer.take() else {
            return Ok(());
        };
        w.abort().await.map_err(|e| {
            StorageError::Io(format!(
                "aborting the upload of {} failed: {}",
                self.url,
                self.scrub.clean(&e.to_string())
            ))
        })
    }
}

impl AsyncWrite for S3Upload {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.guarded(|w| w.poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.guarded(|w| w.poll_flush(cx))
    }

    /// Only flushes: completing the upload is [`Upload::commit`].
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

impl Upload for S3Upload {
    fn commit(mut self: Box<Self>) -> BoxFuture<'static, Result<(), StorageError>> {
        let span = tracing::debug_span!("storage_commit", kind = "s3", url = %self.url);
        Box::pin(
            async move {
                if let Some((_, msg)) = self.failed.clone() {
                    let _ = self.abort_writer().await;
                    return Err(StorageError::Io(msg));
                }
                let mut w = self.writer.take().ok_or_else(Self::closed)?;
                // Completes the multipart upload (or sends the single PUT); on failure
                // object_store aborts the multipart upload itself.
                w.shutdown().await.map_err(|e| {
                    StorageError::Io(format!(
                        "uploading {} failed: {}",
                        self.url,
                        self.scrub.clean(&e.to_string())
                    ))
                })
            }
            .instrument(span),
        )
    }

    fn abort(mut self: Box<Self>) -> BoxFuture<'static, Result<(), StorageError>> {
        let span = tracing::debug_span!("storage_abort", kind = "s3", url = %self.url);
        Box::pin(async move { self.abort_writer().await }.instrument(span))
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        // Cancelled without commit or abort: abort the multipart upload in the
        // background so that its parts are not kept (and billed).
        if let Some(mut w) = self.writer.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let url = self.url.clone();
            rt.spawn(async move {
                if let Err(e) = w.abort().await {
                    tracing::warn!(%url, "could not abort a dropped upload: {e}");
                }
            });
        }
    }
}
