//! The media stage: a request's images, audio and video checked against its model before
//! anything is reserved or forwarded. A part of a kind the model does not take is refused;
//! a URL the replica would fetch must pass the model's `media_urls` policy.
//!
//! Engines such as vLLM fetch media URLs themselves, from the GPU host, so a URL is a request
//! the client makes from inside the operator's network. `public_only` lets through only
//! http(s) URLs whose host is a public address, or a name that resolves only to public
//! addresses, looked up here with a short deadline. The replica looks the name up again
//! when it fetches, so a name whose answer changes in between (DNS rebinding) cannot be
//! stopped here: conf/tollgate.toml recommends `none` and an egress firewall where that
//! matters.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use tokio::time::{timeout_at, Instant};
use url::{Host, Url};

use crate::config::{MediaUrls, Model};
use crate::translate::media::MediaPart;
use crate::vocab::echo;

/// How long all of a request's host names may take to resolve.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Names that always mean the cloud metadata service, whatever they resolve to here.
const METADATA_NAMES: &[&str] = &[
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaError {
    /// The model does not list the part's modality in its `input_modalities`.
    Modality {
        at: String,
        part_type: &'static str,
        modality: &'static str,
        model: String,
        accepted: Vec<&'static str>,
    },
    /// A URL the model's `media_urls` policy refuses; `reason` says why.
    Url {
        at: String,
        part_type: &'static str,
        reason: String,
    },
}

/// Checks `parts` against `model`: every part's modality, then every URL a replica would
/// fetch. Nothing is looked up for a request without media URLs.
pub async fn vet(model: &Model, parts: &[MediaPart]) -> Result<(), MediaError> {
    let mut urls = Vec::new();
    for part in parts {
        let modality = part.modality.name();
        if !model.input_modalities.contains(&modality) {
            if part.optional {
                continue;
            }
            return Err(MediaError::Modality {
                at: part.at.clone(),
                part_type: part.part_type,
                modality,
                model: model.slug.to_string(),
                accepted: model.input_modalities.clone(),
            });
        }
        if let Some(url) = &part.url {
            urls.push((part, url));
        }
    }
    if urls.is_empty() {
        return Ok(());
    }
    let refuse = |part: &MediaPart, reason: String| MediaError::Url {
        at: part.at.clone(),
        part_type: part.part_type,
        reason,
    };
    let deadline = Instant::now() + RESOLVE_TIMEOUT;
    let mut resolved: Vec<String> = Vec::new();
    for (part, url) in urls {
        match model.media_urls {
            MediaUrls::Any => {}
            MediaUrls::None => {
                let parsed = Url::parse(url).ok();
                if parsed.is_none_or(|u| u.scheme() != "data") {
                    return Err(refuse(
                        part,
                        "this model takes media inline only (its media_urls is \"none\")".into(),
                    ));
                }
            }
            MediaUrls::PublicOnly => {
                if let Some(host) = public_url(url).map_err(|r| refuse(part, r))? {
                    if !resolved.contains(&host.0) {
                        resolves_public(&host.0, host.1, deadline)
                            .await
                            .map_err(|r| refuse(part, r))?;
                        resolved.push(host.0);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether `url` may be fetched under `public_only`, as far as it shows: `Err(reason)` if
/// not, else the host name and port still to resolve (`None` for a literal address or
/// inline data).
fn public_url(url: &str) -> Result<Option<(String, u16)>, String> {
    // Parsers disagree on a backslash (`http://a\@b/` is host `a` to a browser's parser, `b`
    // to Python's), on blanks and control characters, and on credentials before an `@`: the
    // replica's fetcher must see the host checked here, so none of them is taken.
    if url
        .chars()
        .any(|c| c == '\\' || c.is_whitespace() || c.is_control())
    {
        return Err("it holds a backslash, a blank or a control character".into());
    }
    let parsed = Url::parse(url).map_err(|e| format!("it is not an absolute URL ({e})"))?;
    match parsed.scheme() {
        "data" => return Ok(None),
        "http" | "https" => {}
        other => return Err(format!("its scheme is {}; use http or https", echo(other))),
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("it carries credentials before an @".into());
    }
    let port = parsed.port_or_known_default().unwrap_or(80);
    // The url crate reads every IPv4 spelling (decimal, octal, hex, short forms) as the
    // address it means, so those cannot pass as names.
    match parsed.host() {
        Some(Host::Ipv4(a)) => literal(IpAddr::V4(a)),
        Some(Host::Ipv6(a)) => literal(IpAddr::V6(a)),
        Some(Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name == "localhost" || name.ends_with(".localhost") {
                return Err("it names localhost".into());
            }
            if METADATA_NAMES.contains(&name.as_str()) {
                return Err("it names a cloud metadata service".into());
            }
            Ok(Some((name, port)))
        }
        None => Err("it names no host".into()),
    }
}

/// A literal address in a URL: nothing to resolve, refused unless public.
fn literal(ip: IpAddr) -> Result<Option<(String, u16)>, String> {
    refuse_ip(ip)
        .map(|()| None)
        .map_err(|kind| format!("it names {kind}"))
}

/// Resolves `name`: refused unless every address it has is public.
async fn resolves_public(name: &str, port: u16, deadline: Instant) -> Result<(), String> {
    let shown = echo(name);
    let addrs = match timeout_at(deadline, tokio::net::lookup_host((name, port))).await {
        Err(_) => return Err(format!("its host {shown} did not resolve in time")),
        Ok(Err(_)) => return Err(format!("its host {shown} does not resolve")),
        Ok(Ok(addrs)) => addrs,
    };
    let mut any = false;
    for addr in addrs {
        any = true;
        refuse_ip(addr.ip()).map_err(|r| format!("its host {shown} resolves to {r}"))?;
    }
    if !any {
        return Err(format!("its host {shown} has no address"));
    }
    Ok(())
}

/// What `ip` is when it is not a public unicast address (`None`: public).
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => v4_kind(a),
        IpAddr::V6(a) => v6_kind(a),
    }
}

/// `Err` with what `ip` is when it is not a public unicast address.
fn refuse_ip(ip: IpAddr) -> Result<(), String> {
    let kind = match ip {
        IpAddr::V4(a) => v4_kind(a),
        IpAddr::V6(a) => v6_kind(a),
    };
    match kind {
        Some(kind) => Err(kind.to_string()),
        None => Ok(()),
    }
}

fn v4_kind(a: Ipv4Addr) -> Option<&'static str> {
    let [o0, o1, o2, _] = a.octets();
    Some(match () {
        _ if a == Ipv4Addr::new(169, 254, 169, 254) => "a cloud metadata address",
        _ if o0 == 0 => "an unspecified address (0.0.0.0/8)",
        _ if a.is_loopback() => "a loopback address",
        _ if a.is_private() => "a private address (RFC 1918)",
        _ if o0 == 100 && (o1 & 0xc0) == 64 => "a shared (CGNAT) address (100.64.0.0/10)",
        _ if a.is_link_local() => "a link-local address",
        _ if a.is_broadcast() => "the broadcast address",
        _ if a.is_multicast() => "a multicast address",
        _ if o0 >= 240 => "a reserved address (240.0.0.0/4)",
        _ if o0 == 192 && o1 == 0 && o2 == 0 => "an IETF protocol address (192.0.0.0/24)",
        _ if o0 == 198 && (o1 & 0xfe) == 18 => "a benchmarking address (198.18.0.0/15)",
        _ if a.is_documentation() => "a documentation address",
        _ => return None,
    })
}

fn v6_kind(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    let embedded = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = a.to_ipv4_mapped() {
        return v4_kind(v4);
    }
    Some(match () {
        _ if a == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) => "a cloud metadata address",
        _ if a.is_unspecified() => "an unspecified address",
        _ if a.is_loopback() => "a loopback address",
        // ::a.b.c.d, deprecated: no host should be reached that way.
        _ if s[..6] == [0; 6] => "an IPv4-compatible address (::/96)",
        // NAT64 reaches the IPv4 address inside.
        _ if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] => return v4_kind(embedded()),
        _ if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 => "a local-use NAT64 address",
        _ if (s[0] & 0xfe00) == 0xfc00 => "a unique local address (fc00::/7)",
        _ if (s[0] & 0xffc0) == 0xfe80 => "a link-local address (fe80::/10)",
        _ if (s[0] & 0xffc0) == 0xfec0 => "a site-local address (fec0::/10)",
        _ if (s[0] & 0xff00) == 0xff00 => "a multicast address",
        _ if s[0] == 0x2001 && s[1] == 0xdb8 => "a documentation address",
        _ if s[..4] == [0x100, 0, 0, 0] => "a discard address (100::/64)",
        // 6to4 reaches the IPv4 address in its prefix.
        _ if s[0] == 0x2002 => {
            let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
            return v4_kind(v4);
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(url: &str) -> bool {
        public_url(url).is_err()
    }

    #[test]
    fn internal_addresses_are_refused_however_spelled() {
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://2852039166/",          // 169.254.169.254 in decimal
            "http://0xa9.0xfe.0xa9.0xfe/", // in hex
            "http://0251.0376.0251.0376/", // in octal
            "http://127.1/",
            "http://0/",
            "http://10.0.0.7:8000/x.png",
            "http://172.16.3.4/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://[::1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[::ffff:a9fe:a9fe]/",
            "http://[fd00:ec2::254]/",
            "http://[fe80::1]/",
            "http://[fc00::1]/",
            "http://[64:ff9b::a00:1]/",
            "http://[2002:7f00:1::]/",
            "http://255.255.255.255/",
            "http://224.0.0.1/",
            "http://localhost:8080/",
            "http://LOCALHOST./",
            "http://a.localhost/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "file:///etc/passwd",
            "gopher://1.1.1.1/",
            "ftp://1.1.1.1/",
            "http://1.1.1.1\\@127.0.0.1/",
            "http://user:pw@1.1.1.1/",
            " http://1.1.1.1/",
            "http://1.1.1.1/a\nb",
            "//1.1.1.1/x.png",
            "1.1.1.1/x.png",
        ] {
            assert!(refused(url), "{url} passed");
        }
    }

    #[test]
    fn public_addresses_and_names_pass() {
        assert_eq!(public_url("https://93.184.215.14/cat.png"), Ok(None));
        assert_eq!(public_url("http://[2606:4700::1111]/a.jpg"), Ok(None));
        assert_eq!(public_url("http://[64:ff9b::808:808]/"), Ok(None));
        assert_eq!(public_url("data:image/png;base64,AAAA"), Ok(None));
        assert_eq!(
            public_url("https://Upload.Wikimedia.org/a.jpg"),
            Ok(Some(("upload.wikimedia.org".into(), 443)))
        );
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused() {
        let deadline = Instant::now() + RESOLVE_TIMEOUT;
        let e = resolves_public("localhost", 80, deadline)
            .await
            .unwrap_err();
        assert!(e.contains("loopback"), "{e}");
    }
}
