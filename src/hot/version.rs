//! The oldest Redis the scripts run on, checked when the service starts.
//!
//! The scripts use commands and options of Redis 7.0 and were tested on
//! it; on an older server a command can fail after a script's first write,
//! and Lua does not roll back. A Redis that answers at start with an older
//! version (on any master, for a Redis Cluster) stops the process with a
//! message naming the version needed, rather than charging wrongly. A Redis
//! that does not answer at start is checked once it does (the readiness
//! probe stays red meanwhile), see [`super::HotStore::connect`].

use fred::{prelude::*, types::InfoKind};

/// Major and minor version of the oldest Redis the service accepts.
pub const NEEDED: (u32, u32) = (7, 0);

/// `redis_version` from the `INFO server` text, as (major, minor, patch).
pub fn parse(info: &str) -> Option<(u32, u32, u32)> {
    let version = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))?;
    let mut parts = version.trim().split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// Whether a server of version `found` is older than [`NEEDED`].
pub fn too_old(found: (u32, u32, u32)) -> bool {
    (found.0, found.1) < NEEDED
}

/// Fails when the server (or any master of a cluster) is older than
/// [`NEEDED`], or does not say its version.
pub async fn check(client: &Client) -> anyhow::Result<()> {
    let masters = if client.is_clustered() {
        client
            .cached_cluster_state()
            .map(|state| state.unique_primary_nodes())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    if masters.is_empty() {
        return new_enough(
            "redis",
            &client.info::<String>(Some(InfoKind::Server)).await?,
        );
    }
    for master in masters {
        let info: String = client
            .with_cluster_node(&master)
            .info(Some(InfoKind::Server))
            .await?;
        new_enough(&master.to_string(), &info)?;
    }
    Ok(())
}

/// Fails when `info` (one server's `INFO server`) names a version older
/// than [`NEEDED`], or none.
fn new_enough(server: &str, info: &str) -> anyhow::Result<()> {
    let found = parse(info)
        .ok_or_else(|| anyhow::anyhow!("{server} did not say its version (INFO server)"))?;
    if too_old(found) {
        anyhow::bail!(
            "{server} runs Redis {}.{}.{}; the service needs Redis {}.{} or newer",
            found.0,
            found.1,
            found.2,
            NEEDED.0,
            NEEDED.1
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_read_from_info_server() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(parse(info), Some((7, 0, 15)));
        assert_eq!(parse("redis_version:6.2.14\r\n"), Some((6, 2, 14)));
        assert_eq!(parse("redis_version:8.0\r\n"), Some((8, 0, 0)));
        assert_eq!(parse("# Server\r\nredis_mode:standalone\r\n"), None);
    }

    #[test]
    fn redis_6_2_is_too_old_and_7_0_and_later_are_not() {
        assert!(too_old((6, 2, 14)));
        assert!(too_old((5, 0, 0)));
        assert!(!too_old((7, 0, 0)));
        assert!(!too_old((7, 2, 4)));
        assert!(!too_old((8, 0, 0)));
    }
}
