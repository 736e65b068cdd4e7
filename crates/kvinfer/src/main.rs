//! `kvinfer`: the command line of the kvinfer inference engine.

mod accuracy;
mod bench;
mod bench_kv;
mod bench_tiers;
mod cache_admin;
mod cache_cmd;
mod chat;
mod cli;
mod config;
mod generate;
mod load;
mod serve;

use clap::{CommandFactory, FromArgMatches};

fn main() {
    let cmd = cli::Cli::command();
    let argv: Vec<String> = std::env::args().collect();
    if let Err(e) = config::apply(&cmd, &argv) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
    // clap reads each option's environment variable when the command is built: build it again
    // now that the config file is in the environment.
    let cmd = cli::Cli::command();
    let matches = cmd.clone().get_matches();
    let args = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (cli::Command::Serve(s), Some(("serve", sm))) = (&args.command, matches.subcommand()) {
        if s.print_config {
            print!("{}", config::print(&cmd, sm));
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KVINFER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let threads = match &args.command {
        cli::Command::Generate(a) => a.model.threads,
        cli::Command::Chat(a) => a.model.threads,
        cli::Command::Bench(a) => match &a.sub {
            Some(cli::BenchCommand::Prefix(p)) => p.model.threads,
            Some(cli::BenchCommand::Batch(b)) => b.model.threads,
            Some(cli::BenchCommand::Tiers(b)) => b.model.threads,
            Some(cli::BenchCommand::SmallPool(b)) => b.model.threads,
            Some(cli::BenchCommand::Kv(b)) => b.model.threads,
            Some(cli::BenchCommand::Peak(b)) => b.threads,
            None => a.model.threads,
        },
        cli::Command::Cache(_) => None,
        cli::Command::Serve(_) => None,
        cli::Command::Accuracy(a) => a.model.threads,
    };
    if let cli::Command::Serve(a) = args.command {
        if let Err(e) = serve::run(a) {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let result = load::with_threads(threads, |n| match args.command {
        cli::Command::Generate(a) => generate::run(a, n),
        cli::Command::Chat(a) => chat::run(a),
        cli::Command::Bench(a) => match a.sub {
            Some(cli::BenchCommand::Prefix(p)) => bench::run_prefix(p, n),
            Some(cli::BenchCommand::Batch(b)) => bench::run_batch(b, n),
            Some(cli::BenchCommand::Tiers(b)) => bench_tiers::run(b, n),
            Some(cli::BenchCommand::SmallPool(b)) => bench_tiers::run_small_pool(b, n),
            Some(cli::BenchCommand::Kv(b)) => bench_kv::run(b, n),
            Some(cli::BenchCommand::Peak(b)) => bench::run_peak(b, n),
            None => bench::run(a, n),
        },
        cli::Command::Cache(c) => cache_cmd::run(c),
        cli::Command::Accuracy(a) => accuracy::run(a),
        cli::Command::Serve(_) => unreachable!("handled above"),
    })
    .and_then(|r| r);
    if let Err(e) = result {
        // Output piped into a reader that stopped (`| head`): not an error of ours.
        let broken_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if broken_pipe {
            return;
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
