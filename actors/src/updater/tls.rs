//! TLS for `https://` release URLs: rustls with the ring provider and the host's CA store
//! (`rustls-native-certs`: `/etc/ssl/certs` on Debian, `SSL_CERT_FILE`/`SSL_CERT_DIR`
//! honoured).
//!
//! Why this and not `ureq` or `hyper-rustls`: the daemon and CLI already carry hyper's
//! HTTP/1 client; tokio-rustls slots under it with three small crates, and rustls on
//! ring avoids aws-lc-rs (cmake + a large C build) and OpenSSL. Trust in a release does
//! not rest on TLS anyway — the signature on `SHA256SUMS` does — so TLS here only keeps
//! the transfer private and the manifest fresh.

use std::sync::{Arc, OnceLock};

use super::http::HttpError;

fn config() -> Result<Arc<rustls::ClientConfig>, std::io::Error> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(
                    "no CA certificates found on this host (install ca-certificates)".into(),
                );
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(std::io::Error::other)
}

/// Wrap `tcp` in a TLS client session for `host`.
pub(super) async fn connect(
    url: &url::Url,
    host: &str,
    tcp: tokio::net::TcpStream,
) -> Result<Box<dyn super::http::IoStream>, HttpError> {
    let tls_err = |source| HttpError::Tls {
        url: url.to_string(),
        source,
    };
    let config = config().map_err(tls_err)?;
    let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
        .map_err(|e| tls_err(std::io::Error::other(e)))?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(tls_err)?;
    Ok(Box::new(stream))
}
