//! `kvinfer serve --config FILE`: a TOML file below flags and `KVINFER_*` variables, as
//! ../shared/DESIGN.md orders them (flags > env > file > defaults).
//!
//! Every serve option reads an environment variable (`--kv-cache-mb` <- `KVINFER_KV_CACHE_MB`).
//! The file is applied before the command line is parsed by setting, for each of its keys, that
//! variable unless the environment already sets it; so clap's own precedence does the rest. A
//! key that names no serve option is an error (nothing is accepted and ignored).
//! `--print-config` prints the merged result.

use anyhow::{bail, Context, Result};
use clap::{ArgMatches, Command};
use std::path::Path;

/// The serve subcommand's options: (long name, env variable).
fn serve_options(cmd: &Command) -> Vec<(String, String)> {
    let Some(serve) = cmd.find_subcommand("serve") else {
        return Vec::new();
    };
    serve
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?.to_string();
            let env = a.get_env()?.to_string_lossy().into_owned();
            Some((long, env))
        })
        .filter(|(long, _)| long != "config")
        .collect()
}

fn value_string(v: &toml::Value) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(a) => a
            .iter()
            .map(value_string)
            .collect::<Result<Vec<_>>>()?
            .join(","),
        other => bail!("unsupported value {other}"),
    })
}

/// The config file named by `--config FILE` / `--config=FILE` in `args`, or by `KVINFER_CONFIG`.
fn config_path(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.to_string());
        }
    }
    std::env::var("KVINFER_CONFIG").ok()
}

/// Applies the config file of a `serve` command line (if any) to the environment.
pub fn apply(cmd: &Command, args: &[String]) -> Result<()> {
    if args.get(1).map(String::as_str) != Some("serve") {
        return Ok(());
    }
    let Some(path) = config_path(args) else {
        return Ok(());
    };
    let text = std::fs::read_to_string(Path::new(&path))
        .with_context(|| format!("reading --config {path}"))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("parsing --config {path} as TOML"))?;
    let options = serve_options(cmd);
    for (key, value) in table {
        let long = key.replace('_', "-");
        let Some((_, env)) = options.iter().find(|(l, _)| *l == long) else {
            bail!("--config {path}: {key:?} is not a serve option (see kvinfer serve --help)");
        };
        let v = value_string(&value).with_context(|| format!("--config {path}: {key}"))?;
        if std::env::var_os(env).is_none() {
            // Single-threaded here: nothing else reads the environment yet.
            unsafe { std::env::set_var(env, v) };
        }
    }
    Ok(())
}

/// The merged serve options as TOML (`--print-config`); the API key is masked.
pub fn print(cmd: &Command, serve: &ArgMatches) -> String {
    let mut out = String::new();
    for (long, _) in serve_options(cmd) {
        let id = long.replace('-', "_");
        if id == "print_config" {
            continue;
        }
        let Ok(Some(raw)) = serve.try_get_raw(&id) else {
            continue;
        };
        let vals: Vec<String> = raw.map(|v| v.to_string_lossy().into_owned()).collect();
        if vals.is_empty() {
            continue;
        }
        let quoted = |s: &str| {
            if s.parse::<i64>().is_ok() || s.parse::<f64>().is_ok() || s == "true" || s == "false" {
                s.to_string()
            } else {
                format!("{s:?}")
            }
        };
        let value = if id == "api_key" {
            "\"(set)\"".to_string()
        } else if vals.len() > 1 || matches!(id.as_str(), "cors_origins" | "redis_cluster") {
            format!(
                "[{}]",
                vals.iter()
                    .map(|v| format!("{v:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            quoted(&vals[0])
        };
        out.push_str(&format!("{id} = {value}\n"));
    }
    out
}
