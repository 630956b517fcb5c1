"""TLS certificate chains -> the SSL Certs resource and FTS document (docs/plugins.md).

The DER bytes come from the TLS analyser (engine/analysers/run.lua, the server's Certificate
handshake message); they are parsed with `cryptography` (a maintained X.509 library), never by
hand.  The text follows `openssl x509 -text -fingerprint` closely enough for the patterns real
Trisul scripts use (`X509v3 Subject Key Identifier:`, `OCSP - URI:`, `Signature Algorithm:`,
`-----BEGIN CERTIFICATE-----` blocks); see docs/plugins.md for the exact layout.
"""
from __future__ import annotations

import base64
import datetime
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtensionOID

#: OpenSSL's short names where they differ from RFC 4514's (or RFC 4514 has none)
_OPENSSL_SN = {"2.5.4.9": "street", "2.5.4.17": "postalCode", "1.2.840.113549.1.9.1": "emailAddress",
               "2.5.4.5": "serialNumber", "2.5.4.15": "businessCategory", "1.3.6.1.4.1.311.60.2.1.3": "jurisdictionC",
               "1.3.6.1.4.1.311.60.2.1.2": "jurisdictionST", "1.3.6.1.4.1.311.60.2.1.1": "jurisdictionL",
               "2.5.4.4": "SN", "2.5.4.42": "GN", "2.5.4.12": "title", "2.5.4.46": "dnQualifier"}


def name_text(name: x509.Name) -> str:
    """An X.509 Name as `openssl x509 -subject` prints it by default: `C = US, O = Org, CN = host`
    (RDNs in certificate order, multi-valued RDNs joined with ` + `, OpenSSL's short names)."""
    parts = []
    for rdn in name.rdns:
        parts.append(" + ".join(f"{_OPENSSL_SN.get(a.oid.dotted_string, a.rfc4514_attribute_name)} = {a.value}"
                                for a in rdn))
    return ", ".join(parts)


def fingerprint(der: bytes, algo: str) -> str:
    """Upper-case hex digest of the DER bytes (no separators)."""
    return hashlib.new(algo, der).hexdigest().upper()


def _colons(hexstr: str) -> str:
    return ":".join(hexstr[i:i + 2] for i in range(0, len(hexstr), 2))


def _time(t: datetime.datetime) -> str:
    return t.strftime("%b %e %H:%M:%S %Y GMT")


def _sig_name(cert: x509.Certificate) -> str:
    try:
        return cert.signature_algorithm_oid._name  # noqa: SLF001 - openssl-style long name
    except Exception:  # noqa: BLE001
        return cert.signature_algorithm_oid.dotted_string


def _key_lines(key) -> list[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return ["Public Key Algorithm: rsaEncryption", f"    Public-Key: ({key.key_size} bit)",
                f"    Exponent: {key.public_numbers().e}"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ["Public Key Algorithm: id-ecPublicKey", f"    Public-Key: ({key.key_size} bit)",
                f"    ASN1 OID: {key.curve.name}"]
    if isinstance(key, dsa.DSAPublicKey):
        return ["Public Key Algorithm: dsaEncryption", f"    Public-Key: ({key.key_size} bit)"]
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ["Public Key Algorithm: ED25519"]
    if isinstance(key, ed448.Ed448PublicKey):
        return ["Public Key Algorithm: ED448"]
    return ["Public Key Algorithm: unknown"]


def _ext_lines(cert: x509.Certificate) -> list[str]:
    out = []
    try:
        exts = list(cert.extensions)
    except Exception as e:  # noqa: BLE001 - a malformed extension is reported in the text, not raised
        return [f"(extensions not parsed: {e})"]
    for ext in exts:
        crit = " critical" if ext.critical else ""
        v = ext.value
        oid = ext.oid
        if oid == ExtensionOID.SUBJECT_KEY_IDENTIFIER:
            out += [f"X509v3 Subject Key Identifier:{crit}", "    " + _colons(v.digest.hex().upper())]
        elif oid == ExtensionOID.AUTHORITY_KEY_IDENTIFIER:
            kid = v.key_identifier.hex().upper() if v.key_identifier else ""
            out += [f"X509v3 Authority Key Identifier:{crit}", "    keyid:" + _colons(kid)]
        elif oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
            names = []
            for g in v:
                if isinstance(g, x509.DNSName):
                    names.append(f"DNS:{g.value}")
                elif isinstance(g, x509.IPAddress):
                    names.append(f"IP Address:{g.value}")
                elif isinstance(g, x509.RFC822Name):
                    names.append(f"email:{g.value}")
                elif isinstance(g, x509.UniformResourceIdentifier):
                    names.append(f"URI:{g.value}")
                else:
                    names.append(str(g))
            out += [f"X509v3 Subject Alternative Name:{crit}", "    " + ", ".join(names)]
        elif oid == ExtensionOID.AUTHORITY_INFORMATION_ACCESS:
            out.append(f"Authority Information Access:{crit}")
            for d in v:
                what = "OCSP" if d.access_method._name == "OCSP" else "CA Issuers"  # noqa: SLF001
                loc = d.access_location.value if hasattr(d.access_location, "value") else str(d.access_location)
                out.append(f"    {what} - URI:{loc}")
        elif oid == ExtensionOID.BASIC_CONSTRAINTS:
            s = "CA:TRUE" if v.ca else "CA:FALSE"
            if v.path_length is not None:
                s += f", pathlen:{v.path_length}"
            out += [f"X509v3 Basic Constraints:{crit}", "    " + s]
        elif oid == ExtensionOID.CRL_DISTRIBUTION_POINTS:
            out += [f"X509v3 CRL Distribution Points:{crit}"]
            for dp in v:
                for fn in dp.full_name or []:
                    out.append(f"    Full Name:\n      URI:{getattr(fn, 'value', fn)}")
        else:
            out += [f"{oid._name}:{crit}"]  # noqa: SLF001
    return out


def cert_text(der: bytes) -> tuple[dict, str]:
    """(summary, text) for one DER certificate.  summary: subject, issuer, sha1, sha256,
    not_before, not_after, serial (hex).  Raises ValueError for bytes that are not a certificate."""
    cert = x509.load_der_x509_certificate(der)
    subject, issuer = name_text(cert.subject), name_text(cert.issuer)
    sha1, sha256 = fingerprint(der, "sha1"), fingerprint(der, "sha256")
    serial = format(cert.serial_number, "x")
    serial = ("0" * (len(serial) % 2)) + serial
    nb = cert.not_valid_before_utc if hasattr(cert, "not_valid_before_utc") else cert.not_valid_before
    na = cert.not_valid_after_utc if hasattr(cert, "not_valid_after_utc") else cert.not_valid_after
    sig = _sig_name(cert)
    ver = cert.version.value
    lines = [f"NAME:{subject}", "Certificate:", "    Data:",
             f"        Version: {ver + 1} (0x{ver:x})",
             "        Serial Number:", "            " + _colons(serial),
             f"        Signature Algorithm: {sig}",
             f"        Issuer: {issuer}",
             "        Validity",
             f"            Not Before: {_time(nb)}",
             f"            Not After : {_time(na)}",
             f"        Subject: {subject}",
             "        Subject Public Key Info:"]
    try:
        lines += ["            " + x for x in _key_lines(cert.public_key())]
    except Exception:  # noqa: BLE001 - unsupported key types still get the rest of the text
        lines.append("            Public Key Algorithm: unsupported")
    ext = _ext_lines(cert)
    if ext:
        lines.append("        X509v3 extensions:")
        lines += ["            " + x for x in ext]
    lines += [f"    Signature Algorithm: {sig}",
              f"SHA1 Fingerprint={_colons(sha1)}", f"SHA256 Fingerprint={_colons(sha256)}",
              pem(der).rstrip("\n")]
    summary = {"subject": subject, "issuer": issuer, "sha1": sha1, "sha256": sha256, "serial": serial,
               "not_before": _time(nb), "not_after": _time(na)}
    return summary, "\n".join(lines) + "\n"


def pem(der: bytes) -> str:
    """PEM text of DER bytes (64-column base64 between BEGIN/END CERTIFICATE lines)."""
    b = base64.b64encode(der).decode()
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(b[i:i + 64] for i in range(0, len(b), 64)) + \
        "\n-----END CERTIFICATE-----\n"


def chain_outputs(row) -> tuple[tuple | None, tuple | None, str | None]:
    """A `certs` row (ts, usec, flowkey, sni, der...) -> (resource row, fts row, error).

    resource: uri = "<leaf subject> ISSUER:<leaf issuer> SHA1:<hex> SHA256:<hex>", label = the PEM chain.
    fts: every certificate's text (cert_text) in the order the server sent them.
    """
    ts, usec, flowkey, sni, *ders = row
    flowkey = flowkey.decode() if isinstance(flowkey, bytes) else flowkey
    sni = sni.decode("utf-8", "replace") if isinstance(sni, bytes) else sni
    ders = [d if isinstance(d, bytes) else d.encode("latin-1") for d in ders]
    texts, summaries = [], []
    for i, der in enumerate(ders):
        try:
            s, t = cert_text(der)
        except ValueError as e:
            return None, None, f"{flowkey}: certificate {i} of the chain is not valid X.509 ({e})"
        summaries.append(s)
        texts.append(t)
    if not summaries:
        return None, None, f"{flowkey}: empty certificate chain"
    leaf = summaries[0]
    uri = f"{leaf['subject']} ISSUER:{leaf['issuer']} SHA1:{leaf['sha1']} SHA256:{leaf['sha256']}"
    label = "".join(pem(d) for d in ders)
    header = f"TLS certificate chain: {len(ders)} certificate(s)" + (f", server name {sni}" if sni else "") + "\n"
    res = (ts, usec, "{5AEE3F0B-9304-44BE-BBD0-0467052CF468}", flowkey, uri, label, "luaprobe")
    fts = (ts, usec, "{9FEB8ADE-ADBB-49AD-BC68-C6A02F389C71}", flowkey, header + "\n".join(texts), "luaprobe")
    return res, fts, None


__all__ = ["cert_text", "chain_outputs", "fingerprint", "name_text", "pem"]
