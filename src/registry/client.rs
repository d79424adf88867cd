//! A blocking client of one repository on one registry endpoint (ureq + rustls): every
//! request goes through [`Client::request`], which authenticates on a 401 (Basic, or the
//! Bearer token flow) and retries connection errors, 5xx and 429 with exponential backoff.

use std::fs::File;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use tracing::{debug, debug_span, warn};
use ureq::http::{Request, Response};
use ureq::Body;

use super::auth::{parse_challenge, Challenge, Credentials};
use super::reference::is_loopback_host;
use super::retry::{retryable_status, RetryPolicy};
use super::RegistryError;
use crate::digest::Digest;
use crate::image::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};

pub type Result<T> = std::result::Result<T, RegistryError>;

/// Every manifest form we read, as `Accept`.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Manifests and indexes larger than this are refused.
pub const MAX_MANIFEST: u64 = 8 << 20;

/// Where a registry answers: `scheme://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub base: String,
    pub host: String,
}

impl Endpoint {
    /// `host[:port]` or `http(s)://host[:port]`. Without a scheme: HTTPS, except plain HTTP
    /// for loopback hosts (docker's default insecure registries) that have no CA in
    /// `certs.d` (see `tls.rs`), or when `insecure`.
    pub fn new(spec: &str, insecure: bool) -> Result<Self> {
        let spec = spec.trim_end_matches('/');
        let (scheme, host) = if let Some(h) = spec.strip_prefix("https://") {
            ("https", h)
        } else if let Some(h) = spec.strip_prefix("http://") {
            ("http", h)
        } else if insecure || (is_loopback_host(spec) && !has_ca(spec)) {
            ("http", spec)
        } else {
            ("https", spec)
        };
        if host.is_empty() || host.contains(['/', '@', '?', '#']) {
            return Err(RegistryError::Invalid(format!(
                "bad registry host {spec:?}: expected HOST[:PORT] or http(s)://HOST[:PORT]"
            )));
        }
        Ok(Self {
            base: format!("{scheme}://{host}"),
            host: host.to_string(),
        })
    }
}

fn has_ca(host: &str) -> bool {
    matches!(super::tls::ca_certs_for(host), Ok(Some(_)))
}

/// What a request sends.
#[derive(Clone, Copy)]
pub enum Payload<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// A file, reopened for each attempt.
    File(&'a Path),
}

/// A fetched manifest or index, verified.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

pub struct Client {
    agent: ureq::Agent,
    pub endpoint: Endpoint,
    pub repository: String,
    creds: Option<Credentials>,
    /// The `Authorization` value in use (Basic, or the last Bearer token).
    auth: Mutex<Option<String>>,
    pub retry: RetryPolicy,
}

impl Client {
    pub fn new(
        endpoint: Endpoint,
        repository: &str,
        creds: Option<Credentials>,
        retry: RetryPolicy,
    ) -> Self {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Credentials follow a redirect on the same host, never to another (blob stores
            // behind a registry take signed URLs and refuse extra auth).
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .timeout_per_read(Some(Duration::from_secs(120)))
            .user_agent(concat!("lazysnap/", env!("CARGO_PKG_VERSION")));
        if is_loopback_host(&endpoint.host) {
            config = config.proxy(None);
        }
        match super::tls::ca_certs_for(&endpoint.host) {
            Ok(Some(certs)) => {
                config = config.tls_config(
                    ureq::tls::TlsConfig::builder()
                        .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                        .build(),
                );
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "ignoring the registry's CA certificates"),
        }
        Self {
            agent: ureq::Agent::new_with_config(config.build()),
            endpoint,
            repository: repository.to_string(),
            creds,
            auth: Mutex::new(None),
            retry,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/v2/{}/{path}", self.endpoint.base, self.repository)
    }

    fn current_auth(&self) -> Option<String> {
        self.auth.lock().ok().and_then(|a| a.clone())
    }

    fn set_auth(&self, value: String) {
        if let Ok(mut a) = self.auth.lock() {
            *a = Some(value);
        }
    }

    /// One request with auth and retries. Returns any final response (callers check the
    /// status); errors are transport failures after the last retry, and auth failures.
    pub fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        payload: Payload<'_>,
    ) -> Result<Response<Body>> {
        let _span = debug_span!("registry_request", method, url).entered();
        let what = || format!("{method} {url}");
        let mut attempt = 0u32;
        let mut authenticated = false;
        loop {
            let mut b = Request::builder().method(method).uri(url);
            for (k, v) in headers {
                b = b.header(*k, v.as_str());
            }
            if let Some(a) = self.current_auth() {
                b = b.header("Authorization", a);
            }
            let bad = |e: ureq::http::Error| RegistryError::Invalid(format!("{}: {e}", what()));
            let result = match payload {
                Payload::Empty => self.agent.run(b.body(()).map_err(bad)?),
                Payload::Bytes(d) => self.agent.run(b.body(d).map_err(bad)?),
                Payload::File(p) => {
                    let f = File::open(p).map_err(|e| RegistryError::Io {
                        context: format!("opening {}", p.display()),
                        source: e,
                    })?;
                    self.agent.run(b.body(f).map_err(bad)?)
                }
            };
            let wait = match result {
                Ok(resp) if resp.status() == 401 => {
                    if authenticated {
                        return Err(self.auth_failed(&resp));
                    }
                    authenticated = true;
                    self.authenticate(&resp)?;
                    continue;
                }
                Ok(resp)
                    if retryable_status(resp.status().as_u16()) && attempt < self.retry.retries =>
                {
                    let retry_after = header(&resp, "retry-after")
                        .and_then(|s| s.parse::<u64>().ok())
                        .map(Duration::from_secs);
                    warn!(
                        status = resp.status().as_u16(),
                        attempt,
                        "retrying {}",
                        what()
                    );
                    retry_after
                }
                Ok(resp) => {
                    debug!(status = resp.status().as_u16(), "response");
                    return Ok(resp);
                }
                Err(e) if transient(&e) && attempt < self.retry.retries => {
                    warn!(error = %e, attempt, "retrying {}", what());
                    None
                }
                Err(e) => {
                    return Err(RegistryError::Http {
                        what: what(),
                        source: e,
                    })
                }
            };
            attempt += 1;
            std::thread::sleep(self.retry.delay(attempt, wait));
        }
    }

    fn auth_failed(&self, resp: &Response<Body>) -> RegistryError {
        match &self.creds {
            None => RegistryError::AuthRequired {
                registry: self.endpoint.host.clone(),
            },
            Some(c) => RegistryError::AuthFailed {
                registry: self.endpoint.host.clone(),
                user: Some(c.username.clone()),
                detail: format!(
                    "the registry answered 401 ({}): wrong user name or password?",
                    header(resp, "www-authenticate").unwrap_or_default()
                ),
            },
        }
    }

    /// Answers a 401: Basic with our credentials, or a token from the Bearer realm.
    fn authenticate(&self, resp: &Response<Body>) -> Result<()> {
        let challenge = header(resp, "www-authenticate")
            .and_then(|h| parse_challenge(&h))
            .ok_or_else(|| RegistryError::AuthFailed {
                registry: self.endpoint.host.clone(),
                user: self.creds.as_ref().map(|c| c.username.clone()),
                detail: "401 without a Basic or Bearer challenge".into(),
            })?;
        match challenge {
            Challenge::Basic => {
                let c = self
                    .creds
                    .as_ref()
                    .ok_or_else(|| RegistryError::AuthRequired {
                        registry: self.endpoint.host.clone(),
                    })?;
                self.set_auth(c.basic_header());
            }
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let token = self.fetch_token(&realm, service.as_deref(), scope.as_deref())?;
                self.set_auth(format!("Bearer {token}"));
            }
        }
        Ok(())
    }

    /// The Bearer token flow (distribution's token spec): GET realm?service=…&scope=…, with
    /// Basic credentials when we have some, anonymous otherwise.
    fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Result<String> {
        let _span = debug_span!("registry_token", realm, scope).entered();
        let mut url = realm.to_string();
        let mut sep = if realm.contains('?') { '&' } else { '?' };
        for (k, v) in [("service", service), ("scope", scope)] {
            if let Some(v) = v {
                url.push(sep);
                url.push_str(k);
                url.push('=');
                url.push_str(&percent_encode(v));
                sep = '&';
            }
        }
        let what = format!("token from {realm}");
        let mut attempt = 0;
        let resp = loop {
            let mut req = self.agent.get(&url);
            if let Some(c) = &self.creds {
                req = req.header("Authorization", c.basic_header());
            }
            match req.call() {
                Ok(r) if retryable_status(r.status().as_u16()) && attempt < self.retry.retries => {}
                Ok(r) => break r,
                Err(e) if transient(&e) && attempt < self.retry.retries => {}
                Err(e) => return Err(RegistryError::Http { what, source: e }),
            }
            attempt += 1;
            std::thread::sleep(self.retry.delay(attempt, None));
        };
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            return Err(match &self.creds {
                None => RegistryError::AuthRequired {
                    registry: self.endpoint.host.clone(),
                },
                Some(c) => RegistryError::AuthFailed {
                    registry: self.endpoint.host.clone(),
                    user: Some(c.username.clone()),
                    detail: format!(
                        "the token server {realm} refused the credentials (HTTP {status})"
                    ),
                },
            });
        }
        let body = read_small(resp, 1 << 20, &what)?;
        if status != 200 {
            return Err(status_error(what, status, &body));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body)
            .map_err(|e| RegistryError::Invalid(format!("{what}: malformed JSON: {e}")))?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Invalid(format!("{what}: no token in the answer")))
    }

    /// GET a manifest or index by tag or digest; its digest is checked against the digest
    /// asked for, else against `Docker-Content-Digest` when the registry sends one.
    pub fn get_manifest(&self, reference: &str) -> Result<Fetched> {
        let url = self.url(&format!("manifests/{reference}"));
        let what = format!(
            "manifest {}:{reference} on {}",
            self.repository, self.endpoint.host
        );
        let resp = self.request(
            "GET",
            &url,
            &[("Accept", MANIFEST_ACCEPT.to_string())],
            Payload::Empty,
        )?;
        let status = resp.status().as_u16();
        let content_type = header(&resp, "content-type");
        let header_digest = header(&resp, "docker-content-digest");
        let bytes = read_small(resp, MAX_MANIFEST, &what)?;
        match status {
            200 => {}
            404 => return Err(RegistryError::NotFound(what)),
            s => return Err(status_error(what, s, &bytes)),
        }
        let digest = Digest::sha256_of(&bytes);
        let expected = match Digest::parse(reference) {
            Ok(d) => Some(d),
            Err(_) => header_digest.and_then(|h| Digest::parse(h.trim()).ok()),
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(RegistryError::DigestMismatch {
                    what,
                    expected,
                    actual: digest,
                });
            }
        }
        let media_type = manifest_media_type(content_type.as_deref(), &bytes);
        Ok(Fetched {
            bytes,
            media_type,
            digest,
        })
    }

    /// The OCI referrers API (`GET /v2/<name>/referrers/<digest>`): the index of manifests
    /// whose subject is `digest`, or `None` when the registry does not implement it (404:
    /// clients then read the `sha256-<hex>` tag, the spec's fallback).
    pub fn get_referrers(&self, digest: &Digest, artifact_type: &str) -> Result<Option<Vec<u8>>> {
        let url = self.url(&format!(
            "referrers/{digest}?artifactType={}",
            percent_encode(artifact_type)
        ));
        let what = format!("referrers of {digest} on {}", self.endpoint.host);
        let resp = self.request(
            "GET",
            &url,
            &[(
                "Accept",
                "application/vnd.oci.image.index.v1+json".to_string(),
            )],
            Payload::Empty,
        )?;
        let status = resp.status().as_u16();
        let content_type = header(&resp, "content-type").unwrap_or_default();
        let bytes = read_small(resp, MAX_MANIFEST, &what)?;
        match status {
            200 if content_type.starts_with("application/vnd.oci.image.index.v1+json") => {
                Ok(Some(bytes))
            }
            // Registries without the API answer 404, or route the path elsewhere.
            200 | 404 | 405 => Ok(None),
            s => Err(status_error(what, s, &bytes)),
        }
    }

    /// A whole blob of at most `limit` bytes, digest checked.
    pub fn get_small_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>> {
        let what = format!("blob {digest} on {}", self.endpoint.host);
        let (mut body, size) = self.get_blob_from(digest, 0)?;
        if size.is_some_and(|s| s > limit) {
            return Err(RegistryError::Invalid(format!(
                "{what} is over the {limit}-byte limit"
            )));
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut body, limit + 1), &mut bytes)
            .map_err(|e| RegistryError::Io {
                context: format!("reading {what}"),
                source: e,
            })?;
        if bytes.len() as u64 > limit {
            return Err(RegistryError::Invalid(format!(
                "{what} is over the {limit}-byte limit"
            )));
        }
        let actual = Digest::sha256_of(&bytes);
        if &actual != digest {
            return Err(RegistryError::DigestMismatch {
                what,
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// HEAD a blob: its size when the registry has it.
    pub fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self.request("HEAD", &url, &[], Payload::Empty)?;
        match resp.status().as_u16() {
            200 => Ok(Some(
                header(&resp, "content-length")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
            )),
            404 => Ok(None),
            s => Err(status_error(format!("HEAD {url}"), s, &[])),
        }
    }

    /// GET a blob from byte `offset` on (`Range: bytes=offset-`). Returns the body positioned
    /// at `offset` and the blob's total size when the registry tells it.
    pub fn get_blob_from(
        &self,
        digest: &Digest,
        offset: u64,
    ) -> Result<(ureq::BodyReader<'static>, Option<u64>)> {
        let url = self.url(&format!("blobs/{digest}"));
        let what = format!("blob {digest} on {}", self.endpoint.host);
        let headers: Vec<(&str, String)> = if offset > 0 {
            vec![("Range", format!("bytes={offset}-"))]
        } else {
            vec![]
        };
        let resp = self.request("GET", &url, &headers, Payload::Empty)?;
        let status = resp.status().as_u16();
        match status {
            200 => {
                let total = header(&resp, "content-length").and_then(|s| s.parse().ok());
                let mut body = resp.into_body().into_reader();
                if offset > 0 {
                    // The registry ignored the range: skip to the offset.
                    warn!(offset, "registry ignored Range; skipping");
                    let skipped = std::io::copy(
                        &mut std::io::Read::take(&mut body, offset),
                        &mut std::io::sink(),
                    )
                    .map_err(|e| RegistryError::Io {
                        context: format!("skipping to byte {offset} of {what}"),
                        source: e,
                    })?;
                    if skipped != offset {
                        return Err(RegistryError::Invalid(format!(
                            "{what}: ended at byte {skipped} while skipping to {offset}"
                        )));
                    }
                }
                Ok((body, total))
            }
            206 => {
                let range = header(&resp, "content-range").unwrap_or_default();
                let (start, total) = parse_content_range(&range).ok_or_else(|| {
                    RegistryError::Invalid(format!("{what}: bad Content-Range {range:?}"))
                })?;
                if start != offset {
                    return Err(RegistryError::Invalid(format!(
                        "{what}: asked for bytes from {offset}, got {range:?}"
                    )));
                }
                Ok((resp.into_body().into_reader(), total))
            }
            404 => Err(RegistryError::NotFound(what)),
            s => {
                let body = read_small(resp, 4096, &what).unwrap_or_default();
                Err(status_error(what, s, &body))
            }
        }
    }

    /// `len` bytes of a blob from `offset` (one Range request; what the lazy read path will
    /// use). The bytes cannot be checked against the blob digest here: the caller checks them
    /// against what it knows of the blob (span hashes, the index).
    pub fn read_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let url = self.url(&format!("blobs/{digest}"));
        let what = format!(
            "bytes {offset}+{len} of blob {digest} on {}",
            self.endpoint.host
        );
        let last = offset
            .checked_add(len - 1)
            .ok_or_else(|| RegistryError::Invalid(format!("{what}: the range overflows")))?;
        let range = format!("bytes={offset}-{last}");
        let mut attempt = 0;
        loop {
            let resp = self.request("GET", &url, &[("Range", range.clone())], Payload::Empty)?;
            let status = resp.status().as_u16();
            if status == 200 {
                return Err(RegistryError::Invalid(format!(
                    "{what}: the registry does not serve byte ranges (answered 200 to a Range request)"
                )));
            }
            if status != 206 {
                let body = read_small(resp, 4096, &what).unwrap_or_default();
                return Err(match status {
                    404 => RegistryError::NotFound(what),
                    s => status_error(what, s, &body),
                });
            }
            let got = header(&resp, "content-range").and_then(|r| parse_content_range(&r));
            if got.map(|g| g.0) != Some(offset) {
                return Err(RegistryError::Invalid(format!(
                    "{what}: wrong Content-Range"
                )));
            }
            match read_small(resp, len, &what) {
                Ok(b) if b.len() as u64 == len => return Ok(b),
                Ok(b) if attempt >= self.retry.retries => {
                    return Err(RegistryError::Invalid(format!(
                        "{what}: got {} bytes",
                        b.len()
                    )))
                }
                Err(e) if attempt >= self.retry.retries => return Err(e),
                _ => {}
            }
            attempt += 1;
            std::thread::sleep(self.retry.delay(attempt, None));
        }
    }

    /// Uploads a blob from a file unless the registry has it (HEAD); POST then one monolithic
    /// PUT. Returns whether bytes were sent.
    pub fn upload_blob(&self, digest: &Digest, path: &Path) -> Result<bool> {
        if self.blob_size(digest)?.is_some() {
            return Ok(false);
        }
        let what = format!("uploading blob {digest} to {}", self.endpoint.host);
        let url = self.url("blobs/uploads/");
        let resp = self.request(
            "POST",
            &url,
            &[("Content-Length", "0".into())],
            Payload::Empty,
        )?;
        let status = resp.status().as_u16();
        let location = header(&resp, "location");
        if status != 202 {
            let body = read_small(resp, 4096, &what).unwrap_or_default();
            return Err(status_error(what, status, &body));
        }
        let location = location.ok_or_else(|| {
            RegistryError::Invalid(format!("{what}: no Location in the upload answer"))
        })?;
        let mut put = self.absolute(&location);
        put.push(if put.contains('?') { '&' } else { '?' });
        put.push_str(&format!("digest={}", percent_encode(digest.as_str())));
        let resp = self.request(
            "PUT",
            &put,
            &[("Content-Type", "application/octet-stream".into())],
            Payload::File(path),
        )?;
        let status = resp.status().as_u16();
        if status != 201 {
            let body = read_small(resp, 4096, &what).unwrap_or_default();
            return Err(status_error(what, status, &body));
        }
        Ok(true)
    }

    /// PUT a manifest under a tag or digest; the registry's digest must be ours.
    pub fn put_manifest(&self, reference: &str, bytes: &[u8], media_type: &str) -> Result<Digest> {
        let url = self.url(&format!("manifests/{reference}"));
        let what = format!(
            "pushing manifest {}:{reference} to {}",
            self.repository, self.endpoint.host
        );
        let resp = self.request(
            "PUT",
            &url,
            &[("Content-Type", media_type.to_string())],
            Payload::Bytes(bytes),
        )?;
        let status = resp.status().as_u16();
        let header_digest = header(&resp, "docker-content-digest");
        if status != 201 && status != 200 {
            let body = read_small(resp, 4096, &what).unwrap_or_default();
            return Err(status_error(what, status, &body));
        }
        let digest = Digest::sha256_of(bytes);
        if let Some(h) = header_digest.and_then(|h| Digest::parse(h.trim()).ok()) {
            if h != digest {
                return Err(RegistryError::DigestMismatch {
                    what,
                    expected: digest,
                    actual: h,
                });
            }
        }
        Ok(digest)
    }

    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else if location.starts_with('/') {
            format!("{}{location}", self.endpoint.base)
        } else {
            format!("{}/{location}", self.endpoint.base)
        }
    }
}

/// Connection-level failures worth another attempt.
fn transient(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::Timeout(_)
            | ureq::Error::Protocol(_)
    )
}

pub fn header(resp: &Response<Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn read_small(resp: Response<Body>, limit: u64, what: &str) -> Result<Vec<u8>> {
    resp.into_body()
        .into_with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| RegistryError::Http {
            what: format!("reading {what}"),
            source: e,
        })
}

fn status_error(what: String, status: u16, body: &[u8]) -> RegistryError {
    let mut text: String = String::from_utf8_lossy(body).chars().take(300).collect();
    text = text.trim().to_string();
    if status == 404 {
        return RegistryError::NotFound(what);
    }
    if status == 400 && text.contains("HTTP request to an HTTPS server") {
        text.push_str(
            " (an HTTPS registry on loopback: put its CA in /etc/docker/certs.d/HOST:PORT/ca.crt \
             or $LAZYSNAP_CERTS_D/HOST:PORT/ca.crt)",
        );
    }
    RegistryError::Status {
        what,
        status,
        body: text,
    }
}

/// `bytes START-END/TOTAL` → (START, TOTAL if not `*`).
pub fn parse_content_range(s: &str) -> Option<(u64, Option<u64>)> {
    let rest = s.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.parse().ok()?, total.parse().ok()))
}

/// The media type of a manifest: `Content-Type`, else its `mediaType` field, else by shape.
fn manifest_media_type(content_type: Option<&str>, bytes: &[u8]) -> String {
    let known = [
        OCI_INDEX,
        OCI_MANIFEST,
        DOCKER_MANIFEST_LIST,
        DOCKER_MANIFEST,
    ];
    if let Some(ct) = content_type.map(|c| c.split(';').next().unwrap_or("").trim()) {
        if known.contains(&ct) {
            return ct.to_string();
        }
    }
    #[derive(serde::Deserialize)]
    struct Shape {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Shape>(bytes) {
        Ok(Shape {
            media_type: Some(m),
            ..
        }) => m,
        Ok(Shape {
            manifests: Some(_), ..
        }) => OCI_INDEX.to_string(),
        _ => OCI_MANIFEST.to_string(),
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::new("127.0.0.1:5000", false).unwrap().base,
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            Endpoint::new("localhost", false).unwrap().base,
            "http://localhost"
        );
        assert_eq!(
            Endpoint::new("ghcr.io", false).unwrap().base,
            "https://ghcr.io"
        );
        assert_eq!(
            Endpoint::new("reg:5000", true).unwrap().base,
            "http://reg:5000"
        );
        assert_eq!(
            Endpoint::new("https://127.0.0.1:1/", false).unwrap().base,
            "https://127.0.0.1:1"
        );
        assert!(Endpoint::new("a/b", false).is_err());
    }

    #[test]
    fn content_range_and_media_types() {
        assert_eq!(
            parse_content_range("bytes 10-19/100"),
            Some((10, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(
            manifest_media_type(
                Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
                b"{}"
            ),
            OCI_MANIFEST
        );
        assert_eq!(manifest_media_type(None, br#"{"manifests":[]}"#), OCI_INDEX);
        assert_eq!(
            manifest_media_type(Some("application/json"), br#"{"mediaType":"x"}"#),
            "x"
        );
        assert_eq!(
            percent_encode("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }
}
