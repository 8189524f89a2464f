"""TLS certificates and SuperNode authentication keys (cryptography), written with owner-only private keys."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Flower's SuperNode authentication reads an EC key in OpenSSH format on a NIST curve (it uses SECP384R1).
NODE_CURVE = ec.SECP384R1()


class CertificateError(ValueError):
    """A certificate or key file is missing, malformed, expired or of the wrong kind; the message says which."""


def _write(path: Path, data: bytes, private: bool) -> Path:
    """Write atomically; private keys are created 0600 so they are never readable by others, even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


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
    """A self-signed CA: (ca.pem, ca.key). Data holders receive only ca.pem."""
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
        _write(out_dir / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), private=False),
        _write(out_dir / "ca.key", _pem_key(key), private=True),
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
        _write(out_dir / "server.pem", cert.public_bytes(serialization.Encoding.PEM), private=False),
        _write(out_dir / "server.key", _pem_key(key), private=True),
    )


def make_node_keys(out_dir: Path) -> tuple[Path, Path]:
    """This node's authentication key pair in OpenSSH format: (node.key, node.pub)."""
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return (
        _write(out_dir / "node.key", private, private=True),
        _write(out_dir / "node.pub", public + b"\n", private=False),
    )


def _read(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise CertificateError(f"{what} {path} does not exist")
    data = path.read_bytes()
    if not data.strip():
        raise CertificateError(f"{what} {path} is empty")
    return data


def load_certificate(path: Path) -> x509.Certificate:
    """A PEM certificate that is currently valid, or a CertificateError naming the file."""
    data = _read(path, "certificate")
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError(f"{path} is not a PEM certificate (expected '-----BEGIN CERTIFICATE-----')") from None
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateError(
            f"certificate {path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}"
        )
    return cert


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """This node's OpenSSH EC private key, checked the way Flower's SuperNode will read it."""
    data = _read(path, "node key")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"{path} is not an OpenSSH private key; create one with `fedtune-client keygen`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path} is not an elliptic-curve key; create one with `fedtune-client keygen`")
    if path.stat().st_mode & 0o077:
        raise CertificateError(f"node key {path} is readable by other users; run `chmod 600 {path}`")
    return key


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A node's OpenSSH EC public key (what the operator registers)."""
    data = _read(path, "node public key").strip()
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"{path} is not an OpenSSH public key (expected 'ecdsa-sha2-nistp384 AAAA...')") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError(f"{path} is not an elliptic-curve public key")
    return key


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """A short, stable name for a public key (SHA-256 of its OpenSSH encoding), shown to operators."""
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return "SHA256:" + hashlib.sha256(raw).hexdigest()[:16]
