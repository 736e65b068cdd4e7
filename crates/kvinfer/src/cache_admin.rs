//! `kvinfer cache stats` and `kvinfer cache clear`: a disk tier directory or a Redis (single or
//! cluster) looked at and emptied from outside any server. `stats` changes nothing (a server
//! may be writing); `clear` deletes every kvinfer block there.

use crate::cli::CacheStoreArgs;
use anyhow::{bail, Result};
use kvinfer_tier::{DiskTier, DiskTierConfig, RedisTarget, RedisTier, RedisTierConfig, Tier};
use serde_json::json;
use std::io::Write;
use std::time::Duration;

fn redis(a: &CacheStoreArgs) -> Result<Option<RedisTier>> {
    let target = match (&a.redis, a.redis_cluster.is_empty()) {
        (Some(url), _) => RedisTarget::Single(url.clone()),
        (None, false) => RedisTarget::Cluster(a.redis_cluster.clone()),
        (None, true) => return Ok(None),
    };
    let t = RedisTier::new(RedisTierConfig {
        target,
        ttl: Duration::from_secs(1),
        read_timeout: Duration::from_secs(2),
        write_timeout: Duration::from_secs(5),
    })?;
    Ok(Some(t))
}

fn need_one(a: &CacheStoreArgs) -> Result<()> {
    if a.disk_tier.is_none() && a.redis.is_none() && a.redis_cluster.is_empty() {
        bail!("say which store: --disk-tier DIR, --redis URL or --redis-cluster HOST:PORT,...");
    }
    Ok(())
}

/// Prints `out` as JSON, or `lines` as text.
fn report(
    json: bool,
    out: &serde_json::Map<String, serde_json::Value>,
    lines: &[String],
) -> Result<()> {
    let mut stdout = std::io::stdout();
    if json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(out)?)?;
    } else {
        for l in lines {
            writeln!(stdout, "{l}")?;
        }
    }
    Ok(())
}

/// `kvinfer cache stats`.
pub fn stats(a: CacheStoreArgs) -> Result<()> {
    need_one(&a)?;
    let mut out = serde_json::Map::new();
    let mut lines = Vec::new();
    if let Some(dir) = &a.disk_tier {
        if !dir.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        let scan = DiskTier::scan(dir)?;
        let (n, bytes) = scan
            .models
            .iter()
            .fold((0, 0), |acc, m| (acc.0 + m.1, acc.1 + m.2));
        lines.push(format!(
            "disk {}: {n} blocks, {:.1} MiB, {} models, {} temp files",
            dir.display(),
            bytes as f64 / 1048576.0,
            scan.models.len(),
            scan.temp_files
        ));
        for (m, n, b) in &scan.models {
            lines.push(format!(
                "  model {m}: {n} blocks, {:.1} MiB",
                *b as f64 / 1048576.0
            ));
        }
        out.insert(
            "disk".into(),
            json!({
                "dir": dir.display().to_string(),
                "blocks": n,
                "bytes": bytes,
                "temp_files": scan.temp_files,
                "models": scan.models.iter().map(|(m, n, b)| json!({"model": m, "blocks": n, "bytes": b})).collect::<Vec<_>>(),
            }),
        );
    }
    if let Some(r) = redis(&a)? {
        let (n, bytes) = r.count()?;
        lines.push(format!(
            "{}: {n} blocks, {:.1} MiB",
            r.name(),
            bytes as f64 / 1048576.0
        ));
        out.insert(r.name().into(), json!({"blocks": n, "bytes": bytes}));
    }
    report(a.json, &out, &lines)
}

/// `kvinfer cache clear`.
pub fn clear(a: CacheStoreArgs) -> Result<()> {
    need_one(&a)?;
    let mut out = serde_json::Map::new();
    let mut lines = Vec::new();
    if let Some(dir) = &a.disk_tier {
        if !dir.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        let t = DiskTier::open(&DiskTierConfig {
            dir: dir.clone(),
            budget_bytes: u64::MAX,
            ttl: None,
        })?;
        let n = t.clear(None)?;
        lines.push(format!("disk {}: deleted {n} blocks", dir.display()));
        out.insert("disk".into(), json!({"deleted": n}));
    }
    if let Some(r) = redis(&a)? {
        let n = r.clear(None)?;
        lines.push(format!("{}: deleted {n} blocks", r.name()));
        out.insert(r.name().into(), json!({"deleted": n}));
    }
    report(a.json, &out, &lines)
}
