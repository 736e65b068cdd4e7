//! Command-line arguments. Flags override `KVINFER_*` environment variables.

use clap::{Args, Parser, Subcommand};
use kvinfer_cache::simulate::SimPolicy;
use std::path::PathBuf;

/// kvinfer: a LLaMA-family inference engine built around its KV cache.
#[derive(Parser)]
#[command(name = "kvinfer", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Generate text from a raw prompt (no chat template).
    #[command(allow_negative_numbers = true)]
    Generate(GenerateArgs),
    /// Interactive multi-turn chat with the model's chat template; streams tokens.
    #[command(allow_negative_numbers = true)]
    Chat(ChatArgs),
    /// Measure prompt processing and generation speed (like llama-bench); `bench prefix` measures
    /// a prefix-cache hit.
    #[command(allow_negative_numbers = true, args_conflicts_with_subcommands = true)]
    Bench(BenchArgs),
    /// Serve the OpenAI-compatible HTTP API (continuous batching, shared KV cache).
    Serve(ServeArgs),
    /// The KV cache offline: eviction-policy simulation over request traces.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// What each KV dtype costs against f16 on a real text: perplexity at each context, KL
    /// divergence of next-token distributions (mean, 99.9th percentile), top-1 agreement. JSON.
    Accuracy(AccuracyArgs),
}

#[derive(Args)]
pub struct AccuracyArgs {
    /// Models to measure (paths or aliases), in turn.
    #[arg(
        long = "models",
        value_delimiter = ',',
        default_value = "smollm2,gemma3"
    )]
    pub models: Vec<String>,
    /// Context sizes: windows of this many tokens, the second half of each scored.
    #[arg(long, value_delimiter = ',', default_value = "512,4096")]
    pub ctx: Vec<usize>,
    /// KV dtypes to compare (f16 is the reference and must be among them).
    #[arg(long, value_delimiter = ',', default_value = "f16,q8_0,q4_0,q4")]
    pub dtypes: Vec<kvinfer_cache::KvDtype>,
    /// Text files (default: every licence text of Debian's base-files, /usr/share/common-licenses).
    #[arg(long)]
    pub text: Vec<std::path::PathBuf>,
    /// At most this many windows per context (default: all the text gives).
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Threads and the rest (`--model` is ignored: see `--models`).
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Which model, and how to run it.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A .gguf path, or an alias: smollm2 (default), gemma3.
    #[arg(long, short, env = "KVINFER_MODEL", default_value = "smollm2")]
    pub model: String,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't', env = "KVINFER_THREADS")]
    pub threads: Option<usize>,
    /// Context size in tokens (default: 4096, capped at the model's).
    #[arg(long, env = "KVINFER_CTX_SIZE", default_value_t = 4096)]
    pub ctx_size: usize,
    /// Memory for the KV cache in MiB; the block pool never grows past it (default: a quarter of
    /// available memory, at most 2048).
    #[arg(long, env = "KVINFER_KV_CACHE_MB")]
    pub kv_cache_mb: Option<usize>,
    /// Tokens per KV block.
    #[arg(long, env = "KVINFER_BLOCK_SIZE", default_value_t = kvinfer_engine::DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,
    /// Eviction policy of the prefix cache: lru, lfu, fifo, random, s3fifo.
    #[arg(long, env = "KVINFER_EVICT", default_value = "lru")]
    pub evict: kvinfer_cache::PolicyKind,
    /// How K and V are stored: f16, q8_0 (half the bytes), q4_0 (a quarter and a bit), q4
    /// (q4_0 after a Hadamard rotation of each head: less accuracy lost). A block is only ever
    /// reused, from the pool or a tier, under the dtype it was written with.
    #[arg(long, env = "KVINFER_KV_DTYPE", default_value = "f16")]
    pub kv_dtype: kvinfer_cache::KvDtype,
    /// Keep every position of sliding-window layers (as llama.cpp's --swa-full). By default
    /// Gemma 3's 15 sliding-window layers keep only the blocks of their 512-token window (the
    /// older ones stay cached, evictable, for prefix hits): ~4.5x less KV at 8k tokens, same
    /// output. No effect on models without sliding windows.
    #[arg(long, env = "KVINFER_SWA_FULL")]
    pub swa_full: bool,
    #[command(flatten)]
    pub tiers: TierArgs,
}

/// Tiers below the block pool: where evicted and registered KV blocks go, and where a prefix
/// the pool lacks is looked up (RAM, then disk, then Redis).
#[derive(Args, Clone, Default)]
pub struct TierArgs {
    /// RAM tier budget in MiB (compressed blocks the pool evicted); 0 turns it off.
    #[arg(long, env = "KVINFER_RAM_TIER_MB", default_value_t = 0)]
    pub ram_tier_mb: usize,
    /// Disk tier directory: blocks survive restart and are shared by processes on this machine.
    #[arg(long, env = "KVINFER_DISK_TIER")]
    pub disk_tier: Option<PathBuf>,
    /// Disk tier size cap in MiB (least recently used blocks are deleted past it).
    #[arg(long, env = "KVINFER_DISK_TIER_MB", default_value_t = 4096)]
    pub disk_tier_mb: usize,
    /// Disk blocks older than this many seconds are expired (default: kept until the cap).
    #[arg(long, env = "KVINFER_DISK_TIER_TTL")]
    pub disk_tier_ttl: Option<u64>,
    /// Redis tier on one server, shared by every instance using it: redis://HOST:PORT[/DB].
    #[arg(long, env = "KVINFER_REDIS", conflicts_with = "redis_cluster")]
    pub redis: Option<String>,
    /// Redis tier on a Redis Cluster: HOST:PORT[,HOST:PORT...] (some of its nodes).
    #[arg(long, env = "KVINFER_REDIS_CLUSTER", value_delimiter = ',')]
    pub redis_cluster: Vec<String>,
    /// Lifetime of a block in Redis, in seconds (each block gets +-10% jitter).
    #[arg(long, env = "KVINFER_REDIS_TTL", default_value_t = 86400)]
    pub redis_ttl: u64,
    /// Deadline of one Redis read in milliseconds: a slower Redis is a miss.
    #[arg(long, env = "KVINFER_REDIS_TIMEOUT_MS", default_value_t = 100)]
    pub redis_timeout_ms: u64,
    /// When each tier takes blocks: back (when the pool evicts), through (when registered),
    /// off (read-only).
    #[arg(
        long,
        env = "KVINFER_TIER_WRITE",
        default_value = "ram=back,disk=through,redis=through"
    )]
    pub tier_write: kvinfer_engine::TierWrite,
    /// Compression of tier blocks: none, lz4, shuffle-lz4, zstd, shuffle-zstd (default
    /// shuffle-zstd, the one that gains on f16 KV: docs/BENCHMARKS.md).
    #[arg(long, env = "KVINFER_TIER_CODEC")]
    pub tier_codec: Option<kvinfer_engine::Codec>,
}

impl TierArgs {
    /// The engine's options.
    pub fn options(&self) -> kvinfer_engine::TierOptions {
        kvinfer_engine::TierOptions {
            ram_tier_mb: self.ram_tier_mb,
            codec: self.tier_codec,
            disk_dir: self.disk_tier.clone(),
            disk_tier_mb: self.disk_tier_mb,
            disk_ttl: self.disk_tier_ttl.map(std::time::Duration::from_secs),
            redis_url: self.redis.clone(),
            redis_cluster: self.redis_cluster.clone(),
            redis_ttl: std::time::Duration::from_secs(self.redis_ttl),
            redis_timeout: std::time::Duration::from_millis(self.redis_timeout_ms.max(1)),
            write: self.tier_write,
        }
    }
}

/// Sampling flags shared by generate and chat.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Top-k (0 disables).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Top-p (1 disables).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Min-p (0 disables).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Repetition penalty (1 disables).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The prompt, fed as raw text (BOS added only where the model file says so).
    #[arg(
        long,
        short,
        required_unless_present = "prompt_ids",
        default_value = ""
    )]
    pub prompt: String,
    /// Token ids to use as the prompt instead of --prompt, comma-separated (debugging).
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    pub max_tokens: usize,
    /// Recompute the whole prefix at every step instead of using the KV cache (baseline).
    #[arg(long)]
    pub no_kv_cache: bool,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object (ids, text, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, short = 'n', default_value_t = 512)]
    pub max_tokens: usize,
    /// Print cache reuse and timing after each reply.
    #[arg(long)]
    pub stats: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub sub: Option<BenchCommand>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens for the prompt-processing test (pp).
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens for the generation test (tg).
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Tokens already in the KV cache before each test (llama-bench's `-d`): pp and tg then
    /// run at that depth. Filling it is not timed.
    #[arg(long, short = 'd', default_value_t = 0)]
    pub depth: usize,
    /// Repetitions of each test (the mean is reported).
    #[arg(long, short = 'r', default_value_t = 3)]
    pub repetitions: usize,
    /// Seconds of CPU warm-up before timing (this machine runs slow after idle).
    #[arg(long, default_value_t = 0.0)]
    pub warmup_s: f64,
    /// After the timed runs, one more pp and tg run with each operation of the forward pass
    /// timed: where the time goes (its own runs, so the timed ones are not perturbed).
    #[arg(long)]
    pub profile: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time to first token of a prompt cold, then of the same prompt plus a new suffix with its
    /// prefix cached, in one process; checks the warm output equals a run without the cache.
    Prefix(PrefixBenchArgs),
    /// Decode step time for B sequences in one batched forward vs one sequence: what continuous
    /// batching saves (the weights are read once per step).
    Batch(BatchBenchArgs),
    /// Time to first token of a long prompt plus a new suffix: cold, pool hit, and a hit from
    /// each tier (RAM, disk, Redis, Redis Cluster; Redis servers are started unless given);
    /// tier I/O rates and the codecs on real KV blocks.
    Tiers(TierBenchArgs),
    /// A multi-turn chat workload with a pool too small for it, with and without RAM + disk
    /// tiers, against an unlimited pool: prefix hit rate and throughput.
    SmallPool(SmallPoolBenchArgs),
    /// Each KV dtype side by side: KV bytes per token, how many sequences of `--seq-tokens` fit
    /// in a `--budget-mb` pool (found by running them), decode speed at `--context` tokens and
    /// prefill speed over `--prompt-tokens`.
    Kv(KvBenchArgs),
    /// What this machine can do, for a roofline: memory read bandwidth and the int8 and f32
    /// multiply-add peaks of the instructions the kernels use, on `--threads` threads.
    Peak(PeakBenchArgs),
}

#[derive(Args)]
pub struct PeakBenchArgs {
    /// Worker threads (default: all cores).
    #[arg(long, short = 't', env = "KVINFER_THREADS")]
    pub threads: Option<usize>,
    /// MiB of memory read by the bandwidth test (larger than every cache).
    #[arg(long, default_value_t = 1024)]
    pub buffer_mb: usize,
    /// Seconds of CPU warm-up before timing (this machine runs slow after idle).
    #[arg(long, default_value_t = 0.0)]
    pub warmup_s: f64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct KvBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// KV dtypes to compare (the ratios are against the first).
    #[arg(long, value_delimiter = ',', default_value = "f16,q8_0,q4_0,q4")]
    pub dtypes: Vec<kvinfer_cache::KvDtype>,
    /// Cached tokens before the timed decode steps.
    #[arg(long, default_value_t = 2048)]
    pub context: usize,
    /// Decode steps timed at that context.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Tokens of the timed prefill.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// The pool of the capacity test, in MiB (0 skips the capacity test).
    #[arg(long, default_value_t = 64)]
    pub budget_mb: usize,
    /// Tokens per sequence of the capacity test.
    #[arg(long, default_value_t = 2048)]
    pub seq_tokens: usize,
    /// Models with sliding windows: the sequence length of the window-savings measurement
    /// (KV bytes held per token with and without --swa-full, and whether the logits agree);
    /// 0 skips it.
    #[arg(long, default_value_t = 8192)]
    pub window_context: usize,
    /// Rounds; each runs every dtype once, in turn (the median is reported).
    #[arg(long, short = 'r', default_value_t = 3)]
    pub repetitions: usize,
    /// Seconds of CPU warm-up before timing.
    #[arg(long, default_value_t = 30.0)]
    pub warmup_s: f64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct TierBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tokens of the cached prompt.
    #[arg(long, default_value_t = 1500)]
    pub prompt_tokens: usize,
    /// New tokens after it.
    #[arg(long, default_value_t = 16)]
    pub suffix_tokens: usize,
    /// Tokens generated per request (greedy), compared with the cold run.
    #[arg(long, default_value_t = 8)]
    pub gen_tokens: usize,
    /// Repetitions of each case (the median is reported).
    #[arg(long, short = 'r', default_value_t = 3)]
    pub repetitions: usize,
    /// Seconds of CPU warm-up before timing.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_s: f64,
    /// Skip the Redis and Redis Cluster cases.
    #[arg(long)]
    pub no_redis: bool,
    /// Draw the TTFT of each case into this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct SmallPoolBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Conversations, taken turn by turn round robin (all turn 1s, then all turn 2s...).
    #[arg(long, default_value_t = 24)]
    pub conversations: usize,
    /// Turns per conversation.
    #[arg(long, default_value_t = 3)]
    pub turns: usize,
    /// New user tokens per turn.
    #[arg(long, default_value_t = 96)]
    pub turn_tokens: usize,
    /// Tokens generated per turn (greedy; they join the next turn's prompt).
    #[arg(long, default_value_t = 8)]
    pub gen_tokens: usize,
    /// The small pool as a fraction of the working set (all conversations' final prompts).
    #[arg(long, default_value_t = 0.1)]
    pub pool_fraction: f64,
    /// RAM tier of the tiered run, in MiB.
    #[arg(long, default_value_t = 64)]
    pub ram_mb: usize,
    /// Seconds of CPU warm-up before timing.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_s: f64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BatchBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub batch_sizes: Vec<usize>,
    /// Cached tokens per sequence before decoding.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Seconds of CPU warm-up before timing.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_s: f64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct PrefixBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tokens of the shared prompt.
    #[arg(long, default_value_t = 1500)]
    pub prompt_tokens: usize,
    /// New tokens after it in the warm request.
    #[arg(long, default_value_t = 16)]
    pub suffix_tokens: usize,
    /// Tokens generated per request (greedy), compared between the warm and reference runs.
    #[arg(long, default_value_t = 16)]
    pub gen_tokens: usize,
    /// Seconds of CPU warm-up before timing.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_s: f64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Replay a request trace against eviction policies at several capacities; report hit rates.
    Simulate(SimulateArgs),
    /// What a disk tier directory or a Redis holds: blocks and bytes per model.
    Stats(CacheStoreArgs),
    /// Delete every kvinfer block from a disk tier directory or a Redis.
    Clear(CacheStoreArgs),
}

/// Which tier stores `cache stats` / `cache clear` look at (at least one).
#[derive(Args)]
pub struct CacheStoreArgs {
    /// A disk tier directory.
    #[arg(long, env = "KVINFER_DISK_TIER")]
    pub disk_tier: Option<PathBuf>,
    /// A Redis server: redis://HOST:PORT[/DB].
    #[arg(long, env = "KVINFER_REDIS", conflicts_with = "redis_cluster")]
    pub redis: Option<String>,
    /// A Redis Cluster: HOST:PORT[,HOST:PORT...].
    #[arg(long, env = "KVINFER_REDIS_CLUSTER", value_delimiter = ',')]
    pub redis_cluster: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct SimulateArgs {
    /// Trace: Mooncake JSONL, one request a line with its block ids in `hash_ids`.
    #[arg(long)]
    pub trace: PathBuf,
    /// Cache capacities in blocks, comma-separated (e.g. 1000,4000,16000).
    #[arg(long, value_delimiter = ',', required = true)]
    pub capacity_blocks: Vec<usize>,
    /// Policies, comma-separated: lru, lfu, fifo, random, s3fifo, belady (the offline optimum).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lru,lfu,fifo,random,s3fifo,belady"
    )]
    pub policy: Vec<SimPolicy>,
    /// Print a JSON array of results instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also draw hit rate against capacity into this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Seed of the random policy.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to bind; 127.0.0.1 keeps the server local to this machine.
    #[arg(long, env = "KVINFER_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port.
    #[arg(long, env = "KVINFER_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long, env = "KVINFER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, env = "KVINFER_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Most tokens per forward pass (decodes plus prefill chunks).
    #[arg(long, env = "KVINFER_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Most sequences in the running batch.
    #[arg(long, env = "KVINFER_MAX_RUNNING", default_value_t = 64)]
    pub max_running: usize,
    /// Origins allowed to call the API from a browser, comma-separated (`*`: any). Off by
    /// default: cross-origin requests are refused.
    #[arg(long, env = "KVINFER_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Longest a request may take in seconds (queue, prefill, output); past it: 504, or an
    /// error event and [DONE] on a stream. 0: no limit.
    #[arg(long, env = "KVINFER_REQUEST_TIMEOUT", default_value_t = 0)]
    pub request_timeout: u64,
    /// Seconds requests in flight may run after SIGINT/SIGTERM; then they are cut (streams end
    /// with an error event and [DONE], JSON requests get a 503).
    #[arg(long, env = "KVINFER_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace: u64,
    /// Most requests waiting for admission; past it the server answers 503 with Retry-After.
    #[arg(long, env = "KVINFER_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// A TOML file of serve options (`port = 8081`, `kv_cache_mb = 512`, `redis = "redis://..."`,
    /// any option's long name); flags and KVINFER_* variables override it.
    #[arg(long, env = "KVINFER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the merged configuration (defaults < file < env < flags) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}
