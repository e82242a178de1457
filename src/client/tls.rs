//! TLS of the clients: the roots they trust (Mozilla's, and a private CA's from `--cacert` or
//! `SSL_CERT_FILE`), and what a refused certificate means, in words rather than rustls's
//! variant names.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// The certificates of a PEM file given to trust, each a root.
pub fn read_roots(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("reading the CA certificates of {}", path.display()))?;
    let roots = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{}: not a PEM file of certificates: {e}", path.display()))?;
    if roots.is_empty() {
        bail!(
            "{}: no certificate in it (expected PEM, -----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(roots)
}

/// The rustls configuration of `wss://`: Mozilla's roots and `extra`.
pub fn client_config(
    extra: &[CertificateDer<'static>],
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra {
        roots
            .add(cert.clone())
            .context("a --cacert certificate cannot be used as a root")?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("the TLS protocol versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The TLS error somewhere in `error`'s chain, looking inside I/O errors too (whose
/// `source()` skips the payload they carry).
fn find_tls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let payload = error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        if let Some(tls) = payload.and_then(find_tls_error) {
            return Some(tls);
        }
        next = error.source();
    }
    None
}

/// The certificate fault a message of rustls names, for an error whose type was lost on the
/// way (wrapped as text by a layer in between).
fn fault_in_text(error: &(dyn std::error::Error + 'static)) -> Option<rustls::Error> {
    use rustls::CertificateError as Cert;
    let mut next = Some(error);
    while let Some(error) = next {
        let text = format!("{error} {error:?}");
        if text.contains("invalid peer certificate") {
            let fault = if text.contains("UnknownIssuer") {
                Cert::UnknownIssuer
            } else if text.contains("NotValidForName") || text.contains("not valid for name") {
                Cert::NotValidForName
            } else if text.contains("Expired") || text.contains("expired") {
                Cert::Expired
            } else if text.contains("NotValidYet") || text.contains("not valid yet") {
                Cert::NotValidYet
            } else if text.contains("BadSignature") {
                Cert::BadSignature
            } else {
                let name = ["CaUsedAsEndEntity", "EndEntityUsedAsCa"]
                    .into_iter()
                    .find(|name| text.contains(name))
                    .unwrap_or("unknown");
                Cert::Other(rustls::OtherError(std::sync::Arc::new(Named(name))))
            };
            return Some(rustls::Error::InvalidCertificate(fault));
        }
        next = error.source();
    }
    None
}

/// A webpki fault known only by its name.
#[derive(Debug)]
struct Named(&'static str);

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Named {}

/// A TLS refusal in `error`'s chain said in words; `None` if the failure was not TLS's.
pub fn describe(error: &(dyn std::error::Error + 'static), host: &str) -> Option<String> {
    use rustls::CertificateError as Cert;
    const TRUST: &str = "if a private CA issued it, trust that CA with --cacert FILE \
                         (or SSL_CERT_FILE=FILE)";
    let from_text;
    let tls = match find_tls_error(error) {
        Some(tls) => tls,
        None => {
            from_text = fault_in_text(error)?;
            &from_text
        }
    };
    let said = match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            Cert::UnknownIssuer => format!(
                "its certificate is not issued by a certificate authority this client trusts; \
                 {TRUST}"
            ),
            Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                let names = match cert {
                    Cert::NotValidForNameContext { presented, .. } if !presented.is_empty() => {
                        format!(" (it names {})", presented.join(", "))
                    }
                    _ => String::new(),
                };
                format!(
                    "its certificate is not valid for the name {host}{names}: use a name the \
                     certificate holds in --server"
                )
            }
            Cert::Expired | Cert::ExpiredContext { .. } => {
                "its certificate has expired".to_string()
            }
            Cert::NotValidYet | Cert::NotValidYetContext { .. } => {
                "its certificate is not valid yet (check the clocks)".to_string()
            }
            Cert::Revoked => "its certificate has been revoked".to_string(),
            Cert::BadSignature => {
                "its certificate's signature does not verify: it was not signed by the CA it \
                 names"
                    .to_string()
            }
            Cert::BadEncoding => "its certificate is not a valid X.509 certificate".to_string(),
            Cert::InvalidPurpose | Cert::InvalidPurposeContext { .. } => {
                "its certificate is not for a TLS server (extended key usage)".to_string()
            }
            Cert::Other(other) => {
                let what = format!("{other:?}");
                if what.contains("CaUsedAsEndEntity") {
                    "its certificate is a CA certificate, not a server certificate: the server \
                     must present a certificate that the CA issued, not the CA's own"
                        .to_string()
                } else if what.contains("EndEntityUsedAsCa") {
                    "its certificate was issued by a certificate that is not a CA".to_string()
                } else if what.contains("UnknownIssuer") {
                    format!(
                        "its certificate is not issued by a certificate authority this client \
                         trusts; {TRUST}"
                    )
                } else {
                    format!("its certificate is refused ({other})")
                }
            }
            other => format!("its certificate is refused ({other})"),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "it does not answer in TLS (is it serving http:// rather than https://?)".to_string()
        }
        other => format!("the TLS handshake failed: {other}"),
    };
    Some(said)
}

/// A server whose certificate this client refuses.
#[derive(Debug, thiserror::Error)]
#[error("cannot trust the server at {server}: {reason}")]
pub struct Untrusted {
    pub server: String,
    pub reason: String,
}

/// The host of a URL (`https://host:port/…`), as the certificate must name it.
pub fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.split(':').next().unwrap_or(authority)
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn the_host_of_a_url() {
        assert_eq!(host_of("https://localhost:7420"), "localhost");
        assert_eq!(host_of("https://a.example/x"), "a.example");
        assert_eq!(host_of("wss://[::1]:80/ws"), "::1");
    }
}
