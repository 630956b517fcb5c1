"""X.509 certificate fields for the TLS attributes of reassembly_handler (docs.trisul.org/docs/lua/reassembly: TLS:O, TLS:CA:ROOT,
TLS:CA:INTER), parsed with the maintained `cryptography` library (RFC 5280 DER), never by hand.

Called from Lua (engine/streams/stage.lua) once per certificate of a TLS Certificate message.  ``cryptography`` is
imported at the first certificate, not with this module: every `luaprobe run` imports this module (through
engine/fastpath/run.py), and cryptography.x509 was ~20-50 ms of its start-up (issue 10 "honest accounting").
"""
from __future__ import annotations


def _first(name: x509.Name, oid) -> str:
    attrs = name.get_attributes_for_oid(oid)
    if not attrs:
        return ""
    v = attrs[0].value
    return (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)).replace("\t", " ")


def parse_cert(der: bytes) -> bytes | None:
    """One DER certificate -> b"subjectO\\tsubjectCN\\tissuerO\\tissuerCN\\tS" where S is 1 when the
    certificate is self-issued (subject == issuer, i.e. a root), else 0.  None when it does not parse."""
    from cryptography import x509                  # outside the try: a missing library is an error, not a bad cert
    from cryptography.x509.oid import NameOID
    try:
        cert = x509.load_der_x509_certificate(bytes(der))
        subject, issuer = cert.subject, cert.issuer
        fields = [_first(subject, NameOID.ORGANIZATION_NAME), _first(subject, NameOID.COMMON_NAME),
                  _first(issuer, NameOID.ORGANIZATION_NAME), _first(issuer, NameOID.COMMON_NAME),
                  "1" if subject == issuer else "0"]
    except Exception:  # noqa: BLE001 - a malformed certificate from the wire is counted, not raised
        return None
    return "\t".join(fields).encode()
