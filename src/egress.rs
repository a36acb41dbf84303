//! Requests to merchants' own servers (usage alert webhooks), which must
//! never reach ours: no server-side request forgery.
//!
//! A merchant names the URL, so a careless check would let them make the
//! service post to `https://10.0.0.5/`, to the cloud's metadata service or
//! to `kubernetes.default.svc`, and read from the delivery's outcome
//! whether it answered. Two checks close it:
//!
//! - **at save** ([`Egress::check_url`]): the scheme, the host's name (no
//!   single-label or cluster-internal names, no metadata names) and every
//!   address it resolves to now;
//! - **at send** ([`Egress::post`]): the name is resolved again by
//!   [`Vetted`], the client's only resolver, which refuses when any
//!   address is disallowed and hands the client the addresses it vetted,
//!   so the connection goes to an address that was checked (a second
//!   resolution, DNS rebinding, cannot slip another in). Literal addresses
//!   are checked before the request.
//!
//! No proxy (the proxy would resolve), no redirects (a 3xx to an internal
//! address would be followed), a connect and a total timeout, and at most
//! [`EXCERPT_BYTES`] of the answer read.
//!
//! Outside production, loopback is allowed (a merchant's local receiver,
//! API.md "Usage alerts"); `ALERT_WEBHOOK_ALLOW_CIDRS` lets an operator
//! allow ranges for on-premises receivers.

use std::{
    fmt,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};

use crate::auth::stripe_signature;

/// A connection is made within this, or the attempt failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A receiver answers within this, or the attempt failed.
const TOTAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of a receiver's answer is read and kept (attempt history).
pub const EXCERPT_BYTES: usize = 1024;
/// How long a resolution at save may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Names a host's addresses; the system's resolver in production, a stub
/// in tests.
pub trait Resolve: Send + Sync + 'static {
    fn lookup(&self, host: &str) -> BoxFuture<std::io::Result<Vec<IpAddr>>>;
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The operating system's resolver (getaddrinfo, through tokio).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup(&self, host: &str) -> BoxFuture<std::io::Result<Vec<IpAddr>>> {
        let host = host.to_owned();
        Box::pin(async move {
            let addresses = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addresses.map(|a| a.ip()).collect())
        })
    }
}

/// Which addresses a webhook may reach.
#[derive(Debug, Clone)]
pub struct AddressPolicy {
    /// Outside production: loopback too.
    pub allow_loopback: bool,
    /// `ALERT_WEBHOOK_ALLOW_CIDRS`: allowed whatever range they are in.
    pub allow: Vec<IpNet>,
}

/// Why an address or a name is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl AddressPolicy {
    /// `Err` naming the range `ip` falls in when it may not be reached.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        if self.allow.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match internal_range(ip) {
            Some("loopback") if self.allow_loopback => Ok(()),
            Some(range) => Err(Refused(format!("{ip} is {range}"))),
            None => Ok(()),
        }
    }
}

/// The kind of non-public range `ip` is in, if any. IPv6 forms that carry
/// an IPv4 address (mapped, compatible, NAT64, 6to4) are judged by it.
pub fn internal_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => internal_v4(v4).map(|_| "an IPv6 form of an internal IPv4 address"),
            None => internal_v6(v6),
        },
    }
}

fn internal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() || a == 0 => "unspecified (0.0.0.0/8)",
        _ if ip.is_private() => "private (RFC 1918)",
        _ if ip.is_link_local() => "link-local (169.254.0.0/16, cloud metadata)",
        (100, 64..=127, _) => "shared address space (CGNAT, 100.64.0.0/10)",
        _ if ip.is_broadcast() => "broadcast",
        _ if ip.is_multicast() => "multicast",
        (240..=255, _, _) => "reserved (240.0.0.0/4)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        _ => return None,
    })
}

fn internal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(match first {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if first & 0xfe00 == 0xfc00 => "unique-local (fc00::/7)",
        _ if first & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
        _ if first & 0xffc0 == 0xfec0 => "site-local (fec0::/10)",
        _ if ip.is_multicast() => "multicast",
        0x2001 if ip.segments()[1] == 0x0db8 => "documentation (2001:db8::/32)",
        0x0100 if ip.segments()[1..4] == [0, 0, 0] => "discard (100::/64)",
        _ => return None,
    })
}

/// The IPv4 address an IPv6 one stands for: IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) and 6to4
/// (`2002:AABB:CCDD::`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail()),
        // `::` and `::1` are IPv6's own unspecified and loopback.
        [0, 0, 0, 0, 0, 0, _, _] if !ip.is_loopback() && !ip.is_unspecified() => Some(tail()),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail()),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        _ => None,
    }
}

/// Names that mean the cluster, the host or the cloud's metadata service
/// whatever they resolve to: single labels (completed by the search
/// domains: `redis`, `postgres`), cluster and private suffixes, and the
/// metadata services' names.
fn internal_name(host: &str) -> Option<&'static str> {
    const METADATA: [&str; 4] = [
        "metadata.google.internal",
        "metadata.goog",
        "instance-data.ec2.internal",
        "metadata.azure.com",
    ];
    const SUFFIXES: [&str; 7] = [
        ".localhost",
        ".local",
        ".internal",
        ".svc",
        ".cluster.local",
        ".home.arpa",
        ".lan",
    ];
    if METADATA.contains(&host) {
        Some("a cloud metadata service")
    } else if host == "localhost" {
        Some("loopback")
    } else if !host.contains('.') {
        Some("a single-label name (resolved inside the network)")
    } else if SUFFIXES.iter().any(|s| host.ends_with(s)) || host.contains(".svc.") {
        Some("an internal name")
    } else {
        None
    }
}

/// What one request to a merchant's server came to.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The answer's status, when there was one.
    pub status: Option<u16>,
    /// Why it did not land: a refused address, a network error, a non-2xx.
    pub error: Option<String>,
    pub latency: Duration,
    /// The start of the answer's body, lossily decoded.
    pub excerpt: Option<String>,
}

impl Sent {
    pub fn delivered(&self) -> bool {
        self.error.is_none()
    }
}

/// The one way out to merchants' servers: checks URLs when they are saved
/// and posts to them with every address vetted.
pub struct Egress {
    policy: AddressPolicy,
    resolver: Arc<dyn Resolve>,
    http: reqwest::Client,
}

impl Egress {
    pub fn new(policy: AddressPolicy, resolver: Arc<dyn Resolve>) -> Self {
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(Vetted {
                policy: policy.clone(),
                resolver: resolver.clone(),
            }))
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(TOTAL_TIMEOUT)
            .user_agent("connected-apps-webhooks")
            .build()
            .expect("the HTTP client's settings are valid");
        Self {
            policy,
            resolver,
            http,
        }
    }

    /// The URL, normalised, when a merchant may save it: https (plain http
    /// to loopback outside production), a public name or address, and,
    /// for a name, every address it resolves to now allowed.
    pub async fn check_url(&self, raw: &str) -> Result<String, String> {
        if raw.len() > 2048 {
            return Err("must be at most 2048 characters".into());
        }
        let url = url::Url::parse(raw).map_err(|_| "must be an absolute URL".to_owned())?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err("must be https".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not carry credentials".into());
        }
        let addresses = match Target::of(&url).map_err(|r| r.0)? {
            Target::Address(ip) => self.policy.check(ip).map(|()| vec![ip]),
            Target::Name(name) => tokio::time::timeout(RESOLVE_TIMEOUT, self.vetted(&name))
                .await
                .unwrap_or_else(|_| Err(Refused(format!("{name} did not resolve in time")))),
        }
        .map_err(|why| format!("must reach a public address: {why}"))?;
        let loopback = addresses
            .iter()
            .all(|ip| internal_range(*ip) == Some("loopback"));
        match url.scheme() {
            // Loopback is allowed exactly outside production.
            "http" if loopback && !self.policy.allow_loopback => {
                Err("must be https (plain http to loopback only outside production)".into())
            }
            "http" if !loopback => Err("must be https".into()),
            _ => Ok(url.into()),
        }
    }

    /// The addresses `name` resolves to, when every one is allowed.
    async fn vetted(&self, name: &str) -> Result<Vec<IpAddr>, Refused> {
        vet(&self.policy, &*self.resolver, name).await
    }

    /// Posts a webhook's `body` signed with each of `secrets` as Stripe
    /// signs its own (`Connected-Apps-Signature: t=…,v1=…`, one `v1` a
    /// secret: two during a rotation's overlap), continuing the trace.
    pub async fn post_signed(&self, url: &str, secrets: &[&str], body: String) -> Sent {
        let signature =
            stripe_signature::sign(secrets, body.as_bytes(), chrono::Utc::now().timestamp());
        let mut headers = HeaderMap::new();
        crate::telemetry::inject_trace(&mut headers);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(value) = HeaderValue::from_str(&signature) {
            headers.insert("connected-apps-signature", value);
        }
        let sent = self.post(url, headers, body).await;
        metrics::histogram!("usage_alert_attempt_duration_seconds")
            .record(sent.latency.as_secs_f64());
        sent
    }

    /// Posts `body` to `url` with `headers`, checking where it goes again
    /// (the URL was checked when saved; its name may resolve elsewhere
    /// now). Never fails: what went wrong is in [`Sent::error`].
    pub async fn post(&self, url: &str, headers: HeaderMap, body: String) -> Sent {
        let started = Instant::now();
        let refused = |why: Refused| Sent {
            status: None,
            error: Some(format!("refused: {why}")),
            latency: started.elapsed(),
            excerpt: None,
        };
        let parsed = match url::Url::parse(url) {
            Ok(parsed) => parsed,
            Err(e) => return refused(Refused(format!("not a URL ({e})"))),
        };
        match Target::of(&parsed) {
            Err(why) => return refused(why),
            Ok(Target::Address(ip)) => {
                if let Err(why) = self.policy.check(ip) {
                    return refused(why);
                }
            }
            // Vetted by the client's resolver as it connects.
            Ok(Target::Name(_)) => {}
        }
        let answer = self
            .http
            .post(parsed)
            .headers(headers)
            .body(body)
            .send()
            .await;
        let mut answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                let error = match refusal_in(&e) {
                    Some(why) => format!("refused: {why}"),
                    None => crate::telemetry::chain(&e),
                };
                return Sent {
                    status: None,
                    error: Some(error),
                    latency: started.elapsed(),
                    excerpt: None,
                };
            }
        };
        let status = answer.status();
        let mut excerpt = Vec::new();
        // At most EXCERPT_BYTES are read, whatever the receiver sends; a
        // body that breaks off is kept as far as it came.
        while excerpt.len() < EXCERPT_BYTES {
            match answer.chunk().await {
                Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        excerpt.truncate(EXCERPT_BYTES);
        Sent {
            status: Some(status.as_u16()),
            error: (!status.is_success()).then(|| format!("answered {status}")),
            latency: started.elapsed(),
            excerpt: (!excerpt.is_empty()).then(|| String::from_utf8_lossy(&excerpt).into_owned()),
        }
    }
}

/// The addresses `name` resolves to, when every one is allowed by
/// `policy` and the name itself is not internal.
async fn vet(
    policy: &AddressPolicy,
    resolver: &dyn Resolve,
    name: &str,
) -> Result<Vec<IpAddr>, Refused> {
    if let Some(kind) = internal_name(name) {
        if !(kind == "loopback" && policy.allow_loopback) {
            return Err(Refused(format!("{name} is {kind}")));
        }
    }
    let addresses = resolver
        .lookup(name)
        .await
        .map_err(|e| Refused(format!("{name} does not resolve ({e})")))?;
    if addresses.is_empty() {
        return Err(Refused(format!("{name} has no address")));
    }
    for ip in &addresses {
        policy
            .check(*ip)
            .map_err(|why| Refused(format!("{name} resolves to {why}")))?;
    }
    Ok(addresses)
}

/// A URL's host: a literal address or a name (lowercase, without a
/// trailing dot).
enum Target {
    Address(IpAddr),
    Name(String),
}

impl Target {
    fn of(url: &url::Url) -> Result<Self, Refused> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => Ok(Self::Address(IpAddr::V4(ip))),
            Some(url::Host::Ipv6(ip)) => Ok(Self::Address(IpAddr::V6(ip))),
            Some(url::Host::Domain(name)) => {
                Ok(Self::Name(name.trim_end_matches('.').to_ascii_lowercase()))
            }
            None => Err(Refused("the URL names no host".into())),
        }
    }
}

/// The HTTP client's resolver: resolves with the service's resolver and
/// hands over only addresses the policy allows, or refuses the name.
struct Vetted {
    policy: AddressPolicy,
    resolver: Arc<dyn Resolve>,
}

impl reqwest::dns::Resolve for Vetted {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (policy, resolver) = (self.policy.clone(), self.resolver.clone());
        let name = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        Box::pin(async move {
            let addresses = vet(&policy, &*resolver, &name).await?;
            // The port is the URL's: the client sets it on each address.
            let addrs: reqwest::dns::Addrs =
                Box::new(addresses.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// The policy's refusal, when that is what stopped a request.
fn refusal_in<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e Refused> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return Some(refused);
        }
        source = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn production() -> AddressPolicy {
        AddressPolicy {
            allow_loopback: false,
            allow: Vec::new(),
        }
    }

    #[test]
    fn every_internal_range_is_refused_and_public_addresses_pass() {
        for internal in [
            "127.0.0.1",
            "127.255.0.7",
            "10.0.0.5",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "192.0.0.170",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.5",
            "::ffff:169.254.169.254",
            "::10.0.0.5",
            "64:ff9b::a00:5",
            "2002:a00:5::1",
            "2001:db8::1",
        ] {
            let ip: IpAddr = internal.parse().unwrap();
            assert!(production().check(ip).is_err(), "{internal} passed");
        }
        for public in [
            "93.184.216.34",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::6810:85e5",
            "::ffff:93.184.216.34",
        ] {
            let ip: IpAddr = public.parse().unwrap();
            assert_eq!(production().check(ip), Ok(()), "{public}");
        }
    }

    #[test]
    fn outside_production_loopback_passes_and_nothing_else_does() {
        let development = AddressPolicy {
            allow_loopback: true,
            allow: Vec::new(),
        };
        assert!(development.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(development.check("::1".parse().unwrap()).is_ok());
        assert!(development.check("10.0.0.5".parse().unwrap()).is_err());
    }

    #[test]
    fn the_operators_allow_list_opens_its_ranges_only() {
        let on_premises = AddressPolicy {
            allow_loopback: false,
            allow: vec!["10.20.0.0/16".parse().unwrap()],
        };
        assert!(on_premises.check("10.20.3.4".parse().unwrap()).is_ok());
        assert!(on_premises.check("10.21.3.4".parse().unwrap()).is_err());
    }

    #[test]
    fn internal_names_are_refused_whatever_they_resolve_to() {
        for name in [
            "metadata.google.internal",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "redis",
            "postgres.db.svc.cluster.local",
            "printer.local",
            "localhost",
            "app.localhost",
        ] {
            assert!(internal_name(name).is_some(), "{name}");
        }
        assert_eq!(internal_name("hooks.shop.example"), None);
    }
}
