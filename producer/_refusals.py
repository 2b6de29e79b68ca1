"""What a refused connection means, and which setting fixes it (docs/security.md).

A broker that is reached but refuses the client (bad credentials, a certificate the client
does not trust, a certificate for another host name) will refuse it again on every retry:
`BrokerRefused` names the setting to fix instead of retrying until the connect timeout.
The texts come from the client libraries and the broker; none holds a secret.
"""

from __future__ import annotations

import ssl

__all__ = ["file_refused", "tls_refusal"]


def tls_refusal(error: BaseException, ca_setting: str, address_setting: str) -> str | None:
    """The one-line reason and fix for a TLS certificate check that failed, or None when
    `error` is no such failure. `ca_setting` / `address_setting` are the dotted names of the
    CA file and the address settings (`kafka.ssl_cafile`, `kafka.bootstrap_servers`)."""
    if not isinstance(error, ssl.SSLCertVerificationError):
        return None
    reason = error.verify_message or str(error)
    if "Hostname mismatch" in reason or "IP address mismatch" in reason:
        return (
            f"the server's certificate does not name the host connected to ({reason}); "
            f"connect by a name or address the certificate holds ({address_setting})"
        )
    return (
        f"the server's certificate is not trusted ({reason}); set {ca_setting} to the CA "
        "that signed it"
    )


def file_refused(error: BaseException, setting: str, path: object) -> ValueError:
    """The `ValueError` for a certificate, key or seed file that cannot be read or parsed:
    one line naming `setting` (a bad file fails every connect alike, so it is a bad setting,
    not a broker that is down). Never holds the file's content."""
    if isinstance(error, ssl.SSLError):  # read, but not PEM (or not the right PEM)
        reason, fix = error.reason or str(error), "point it at a PEM file"
    else:
        reason = (error.strerror if isinstance(error, OSError) else None) or str(error)
        fix = "point it at a readable file"
    return ValueError(f"cannot load {setting} {path}: {reason}; {fix}")
