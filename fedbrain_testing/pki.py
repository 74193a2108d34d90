"""A throw-away consortium PKI for tests and benchmarks of secure aggregation: a root CA and one identity
(RSA key, certificate issued to its name) per site, as a provisioned kit's startup/ holds them."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from fedbrain.secagg.protocol import Identity


def certificate(name: str, key, issuer_name: str, issuer_key, ca: bool = False, days: int = 30) -> bytes:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def new_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def consortium(names, ca_name: str = "fedbrain-test-ca") -> dict[str, Identity]:
    """One :class:`Identity` per name, all issued by one fresh root CA."""
    ca_key = new_key()
    root = certificate(ca_name, ca_key, ca_name, ca_key, ca=True)
    out = {}
    for name in names:
        key = new_key()
        out[name] = Identity(name, key, certificate(name, key, ca_name, ca_key), root)
    return out
