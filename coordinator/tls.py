"""The coordinator's TLS: its own certificate authority and the server certificate it signs, all files owner-only."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.client.credentials import CertificateError, load_certificate
from fedtune.privacy.at_rest import write_atomic


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _builder(subject: str, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew between hosts
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def make_ca(out_dir: Path, name: str = "fedtune coordinator CA", days: int = 3650) -> tuple[Path, Path]:
    """A self-signed CA: (ca.pem, ca.key). Data holders receive only ca.pem; the operator hands it out, so even
    the public certificate is written owner-only, like every file fedtune keeps (privacy/at_rest.py)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        write_atomic(out_dir / "ca.pem", _pem_cert(cert)),
        write_atomic(out_dir / "ca.key", _pem_key(key)),
    )


def make_server_cert(ca_cert: Path, ca_key: Path, hosts: Sequence[str], out_dir: Path, days: int = 825) -> tuple[Path, Path]:
    """A server certificate for `hosts` (DNS names or IP addresses, all put in the SAN): (server.pem, server.key)."""
    if not hosts:
        raise CertificateError("the server certificate needs at least one host name or IP address")
    ca = load_certificate(ca_cert)
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(hosts[0], ca.subject, key.public_key(), days)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys(hosts)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
        .sign(signer, hashes.SHA256())
    )
    return (
        write_atomic(out_dir / "server.pem", _pem_cert(cert)),
        write_atomic(out_dir / "server.key", _pem_key(key)),
    )
