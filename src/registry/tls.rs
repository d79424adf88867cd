//! Per-registry certificate authorities, where docker keeps them:
//! `/etc/docker/certs.d/<host[:port]>/*.crt` (`$LAZYSNAP_CERTS_D` instead of
//! `/etc/docker/certs.d`, for tests and unprivileged users). A registry with a CA there is
//! verified against those certificates only (instead of the built-in Mozilla roots) and is
//! spoken to over HTTPS even on loopback.

use std::path::PathBuf;

use ureq::tls::Certificate;

use super::RegistryError;

pub fn certs_d() -> PathBuf {
    std::env::var_os("LAZYSNAP_CERTS_D")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/docker/certs.d"))
}

/// The CA certificates configured for `host[:port]`, if any.
pub fn ca_certs_for(host: &str) -> Result<Option<Vec<Certificate<'static>>>, RegistryError> {
    if host.contains(['/', '\0']) || host.starts_with('.') {
        return Ok(None);
    }
    let dir = certs_d().join(host);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(_) => return Ok(None),
    };
    let mut certs = Vec::new();
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    paths.sort();
    for p in paths {
        let pem = std::fs::read(&p).map_err(|e| RegistryError::Io {
            context: format!("reading {}", p.display()),
            source: e,
        })?;
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
                Ok(_) => {}
                Err(e) => {
                    return Err(RegistryError::Config(format!(
                        "{}: not a PEM certificate: {e}",
                        p.display()
                    )))
                }
            }
        }
    }
    Ok((!certs.is_empty()).then_some(certs))
}
