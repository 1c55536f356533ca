"""Which media URLs and addresses the server may fetch, and how much it may fetch: pure policy.

vLLM fetches any http(s) image URL a client sends, so a public endpoint could be made to read
loopback services, the private network or a cloud metadata endpoint (SSRF). These rules say what
is refused; `server.media_fetch` applies them to every hop and to every resolved address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MEBIBYTE = 1024 * 1024
DEFAULT_MAX_IMAGE_BYTES = 20 * MEBIBYTE
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # 50 MP: a 48 MP phone photo passes; ~150 MB as RGB
DEFAULT_FETCH_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3
FETCHABLE_SCHEMES = ("http", "https")

# Cloud metadata services. All but one lie in ranges refused anyway; they are listed so that a
# trusted (allow-listed) domain that resolves to one of them is still refused.
_METADATA = tuple(
    ipaddress.ip_network(n)
    for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "100.100.100.200/32")
)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class MediaRefused(ValueError):
    """A media URL the policy does not allow; vLLM turns ValueError into HTTP 400."""


@dataclass(frozen=True)
class MediaPolicy:
    # Fetch from any address, private and loopback included (trusted networks only).
    allow_private: bool = False
    # vLLM's --allowed-media-domains: when set, only these hosts; they may resolve privately.
    allowed_domains: tuple[str, ...] = ()
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    max_redirects: int = MAX_REDIRECTS

    def trusts(self, host: str) -> bool:
        return host.lower().rstrip(".") in {d.lower().rstrip(".") for d in self.allowed_domains}


def embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one tunnels to (mapped, 6to4, NAT64, Teredo), else itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
        if any(ip in net for net in _NAT64):
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def address_refusal(ip: IPAddress, *, trusted: bool = False) -> str | None:
    """Why the server must not connect to `ip` (None: it may).

    Only globally routable unicast addresses pass. A trusted (allow-listed) host may also use
    private and loopback addresses, but never link-local / metadata ones.
    """
    inner = embedded_ipv4(ip)
    for candidate in {ip, inner}:
        if any(candidate in net for net in _METADATA):
            return "a link-local or cloud metadata address"
    if trusted:
        return None
    if inner.is_loopback or ip.is_loopback:
        return "a loopback address"
    if inner.is_multicast or ip.is_multicast:
        return "a multicast address"
    if inner.is_unspecified or ip.is_unspecified:
        return "an unspecified address"
    if not (inner.is_global and ip.is_global):
        return "a private or reserved address"
    return None


def check_address(host: str, ip: IPAddress, policy: MediaPolicy) -> None:
    """Raise MediaRefused unless the policy lets the server connect to `ip` for `host`."""
    if policy.allow_private:
        return
    reason = address_refusal(ip, trusted=policy.trusts(host))
    if reason is not None:
        raise MediaRefused(
            f"image URL host {host!r} resolves to {ip}, {reason}; the server does not fetch "
            "media from such addresses"
        )


def check_url(url: str, policy: MediaPolicy) -> str:
    """Check scheme, host, allow-list and a literal IP of one fetch hop; return the host."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise MediaRefused(f"malformed image URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in FETCHABLE_SCHEMES:
        raise MediaRefused(
            f"image URL scheme {scheme or '(none)'!r} is not allowed; use https://, http:// or a "
            "data: URL"
        )
    if not host:
        raise MediaRefused("image URL has no host")
    if parts.username is not None or parts.password is not None:
        raise MediaRefused("image URLs must not carry credentials")
    if policy.allowed_domains and not policy.trusts(host):
        raise MediaRefused(
            f"image URL host {host!r} is not in the server's allowed media domains"
        )
    try:
        literal = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host  # a name: checked when it is resolved (server.media_fetch)
    check_address(host, literal, policy)
    return host
