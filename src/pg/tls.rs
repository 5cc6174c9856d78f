//! TLS for every connection (pool and listener), with rustls, set the way libpq is set:
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey` in the URL, the key=value string or the
//! `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT` and `PGSSLKEY` variables.
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | - |
//! | `allow`, `prefer` (default) | when the server offers it | no |
//! | `require` | yes | against the root certificate when there is one, else no |
//! | `verify-ca` | yes | chain to the root certificate |
//! | `verify-full` | yes | chain to the root certificate, and the host name |
//!
//! The root certificate is `sslrootcert` (a PEM file, or `system` for the operating
//! system's store, with `verify-full` only), else `~/.postgresql/root.crt` when it exists,
//! as libpq does.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::Error;

/// What makes TLS connections for the pipe's connections.
pub(crate) type Connector = MakeRustlsConnect;

/// The stream of a connection made with [`Connector`].
pub(crate) type TlsStream =
    <Connector as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream;

/// How a connection uses TLS, as libpq's `sslmode` says it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SslMode {
    /// Never.
    Disable,
    /// When the server offers it (as `prefer`: the server is asked for TLS first).
    Allow,
    /// When the server offers it, without checking its certificate (the default).
    #[default]
    Prefer,
    /// Always; the certificate is checked only against a root certificate, when there is one.
    Require,
    /// Always, with a certificate that chains to the root certificate.
    VerifyCa,
    /// Always, with a certificate that chains to the root certificate and names the host.
    VerifyFull,
}

impl SslMode {
    /// The name libpq gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether to ask for TLS and whether to insist.
    pub(crate) fn pg(self) -> PgSslMode {
        match self {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Allow | SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::Config(format!(
                    "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, \
                     verify-full"
                )));
            }
        })
    }
}

/// Where the root certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Roots {
    /// A PEM file.
    File(PathBuf),
    /// The operating system's store (`sslrootcert=system`).
    System,
}

/// The TLS settings of a [`Config`](crate::Config).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsOptions {
    pub(crate) mode: SslMode,
    roots: Option<Roots>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

impl TlsOptions {
    /// Sets one of the TLS keys of a connection string (`sslmode`, `sslrootcert`, `sslcert`,
    /// `sslkey`).
    pub(crate) fn set(&mut self, key: &str, value: &str) -> Result<(), Error> {
        match key {
            "sslmode" => self.mode = value.parse()?,
            "sslrootcert" => self.set_root_cert(value),
            "sslcert" => self.client_cert = Some(value.into()),
            "sslkey" => self.client_key = Some(value.into()),
            other => {
                return Err(Error::Config(format!(
                    "{other:?} is not a TLS setting (sslmode, sslrootcert, sslcert, sslkey)"
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn set_root_cert(&mut self, value: impl AsRef<Path>) {
        let value = value.as_ref();
        self.roots = Some(if value == Path::new("system") {
            Roots::System
        } else {
            Roots::File(value.to_owned())
        });
    }

    pub(crate) fn set_client_cert(&mut self, cert: PathBuf, key: PathBuf) {
        self.client_cert = Some(cert);
        self.client_key = Some(key);
    }

    /// Builds the connector, reading the certificate files now (so a rotated root
    /// certificate is picked up by the next connection that is built with a new one).
    pub(crate) fn connector(&self) -> Result<Connector, Error> {
        if self.roots == Some(Roots::System) && self.mode != SslMode::VerifyFull {
            // Any publicly trusted certificate, for any host, would do: libpq refuses it too.
            return Err(Error::Config(format!(
                "sslrootcert=system needs sslmode=verify-full (not {})",
                self.mode
            )));
        }
        let provider = Arc::new(ring_provider());
        // Root certificates matter only to the modes that check the server.
        let checks = matches!(
            self.mode,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        );
        let roots = if checks { self.roots()? } else { None };
        let webpki = match (self.mode, roots) {
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(Error::Config(format!(
                    "sslmode={} needs a root certificate: set sslrootcert (a PEM file, or \
                     system), or put it in ~/.postgresql/root.crt",
                    self.mode
                )));
            }
            (SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull, Some(roots)) => Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| Error::Config(format!("TLS root certificates: {e}")))?,
            ),
            _ => None,
        };
        let verifier = Arc::new(Verifier {
            provider: provider.clone(),
            webpki,
            names: self.mode == SslMode::VerifyFull,
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.client_cert, &self.client_key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert)?;
                let pem = read_pem_file(key)?;
                let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                    Error::Config(format!(
                        "cannot read a private key from sslkey {}: {e}",
                        key.display()
                    ))
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    Error::Config(format!(
                        "sslcert and sslkey do not make a client identity: {e}"
                    ))
                })?
            }
            _ => {
                return Err(Error::Config(
                    "a client certificate needs both sslcert and sslkey".into(),
                ));
            }
        };
        Ok(MakeRustlsConnect::new(config))
    }

    /// The root certificates, if any: `sslrootcert`, else `~/.postgresql/root.crt` when it
    /// exists.
    fn roots(&self) -> Result<Option<RootCertStore>, Error> {
        let mut store = RootCertStore::empty();
        let add_file = |store: &mut RootCertStore, path: &Path| {
            let (added, _) = store.add_parsable_certificates(read_certs(path)?);
            if added == 0 {
                return Err(Error::Config(format!(
                    "root certificate file {} holds no usable certificate",
                    path.display()
                )));
            }
            Ok(())
        };
        match &self.roots {
            Some(Roots::File(path)) => add_file(&mut store, path)?,
            Some(Roots::System) => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(Error::Config(
                        "sslrootcert=system: the operating system's store holds no usable \
                         certificate"
                            .into(),
                    ));
                }
            }
            None => {
                let Some(default) = std::env::var_os("HOME")
                    .map(|home| Path::new(&home).join(".postgresql/root.crt"))
                    .filter(|path| path.exists())
                else {
                    return Ok(None);
                };
                add_file(&mut store, &default)?;
            }
        }
        Ok(Some(store))
    }
}

/// rustls with *ring*. rustls 0.23.48 deprecated `ring::default_provider` (*ring* offers
/// no post-quantum key exchange) in favour of aws-lc-rs, whose C build the crate does not
/// take on; the provider is the same, and the deprecation is acknowledged here, once.
#[allow(deprecated)]
fn ring_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The most a certificate or key file may hold.
const MAX_PEM_FILE: u64 = 1 << 20;

/// A certificate or key file's bytes: a regular file (after links) of at most
/// [`MAX_PEM_FILE`] bytes.
fn read_pem_file(path: &Path) -> Result<Vec<u8>, Error> {
    super::files::read_regular(path, MAX_PEM_FILE)
        .map_err(Error::Config)?
        .ok_or_else(|| Error::Config(format!("cannot read {}: it does not exist", path.display())))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let unreadable =
        |e: &dyn fmt::Display| Error::Config(format!("cannot read {}: {e}", path.display()));
    let pem = read_pem_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(&e))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// Checks a server's certificate as far as the mode asks: not at all (`prefer`, `require`
/// without a root: the connection is encrypted, but nothing proves who is at the other
/// end), its chain to the root (`verify-ca`, `require` with a root), or its chain and the
/// host name (`verify-full`). The handshake's signatures are always checked, so the
/// certificate's key is the server's.
#[derive(Debug)]
struct Verifier {
    provider: Arc<CryptoProvider>,
    /// The chain check, when there is one.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// Whether the certificate must name the host.
    names: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        // The chain is checked before the name: a name error means the chain is good.
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.names => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_map() {
        for mode in [
            SslMode::Disable,
            SslMode::Allow,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert_eq!(mode.as_str().parse::<SslMode>().unwrap(), mode);
        }
        assert!("sometimes".parse::<SslMode>().is_err());
        assert_eq!(SslMode::VerifyFull.pg(), PgSslMode::Require);
        assert_eq!(SslMode::Allow.pg(), PgSslMode::Prefer);
    }

    #[test]
    fn verification_needs_a_root() {
        let mut tls = TlsOptions::default();
        tls.set("sslmode", "verify-full").unwrap();
        tls.set_root_cert("/nonexistent/ca.pem");
        let err = tls.connector().err().expect("no such file").to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let mut tls = TlsOptions::default();
        tls.set("sslcert", "/c.pem").unwrap();
        assert!(tls.connector().is_err(), "a certificate without its key");
        let mut tls = TlsOptions::default();
        tls.set("sslrootcert", "system").unwrap();
        tls.set("sslmode", "verify-ca").unwrap();
        let err = tls
            .connector()
            .err()
            .expect("system roots need verify-full");
        assert!(err.to_string().contains("verify-full"), "{err}");
        assert!(TlsOptions::default().connector().is_ok());
        // Modes that do not check the server do not read root certificates.
        let mut tls = TlsOptions::default();
        tls.set_root_cert("/nonexistent/ca.pem");
        assert!(tls.connector().is_ok());
    }
}
