"""What a data holder connects with: its SuperNode key pair and the coordinator's CA certificate."""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.privacy.at_rest import write_atomic

# Flower's SuperNode authentication reads an EC key in OpenSSH format on a NIST curve (it uses SECP384R1).
NODE_CURVE = ec.SECP384R1()


class CertificateError(ValueError):
    """A certificate or key file is missing, malformed, expired or of the wrong kind; the message says which."""


def make_node_keys(out_dir: Path) -> tuple[Path, Path]:
    """This node's authentication key pair in OpenSSH format: (node.key, node.pub); both owner-only, like every
    file fedtune keeps (the data holder hands node.pub to the operator)."""
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return write_atomic(out_dir / "node.key", private), write_atomic(out_dir / "node.pub", public + b"\n")


def read_credential(path: Path, what: str) -> bytes:
    """The bytes of a certificate or key file, or a CertificateError saying it is missing or empty."""
    if not path.is_file():
        raise CertificateError(f"{what} {path} does not exist")
    data = path.read_bytes()
    if not data.strip():
        raise CertificateError(f"{what} {path} is empty")
    return data


def load_certificate(path: Path) -> x509.Certificate:
    """A PEM certificate that is currently valid, or a CertificateError naming the file."""
    data = read_credential(path, "certificate")
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
    data = read_credential(path, "node key")
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
    data = read_credential(path, "node public key").strip()
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
