//! The engine thread's state and its step: admit, schedule, run one batched forward, sample.
//!
//! Per step, within `max_batch_tokens`:
//! 1. every running sequence gets its next chunk: one token if decoding, a prefill chunk
//!    otherwise (chunked prefill: a long prompt never stalls running decodes for long);
//! 2. waiting sequences are admitted while budget, sequence slots and blocks last: prefix
//!    lookup, then blocks for their first chunk. Order: first come first served, except when
//!    the queue is long, where the longest cached prefix goes first (its blocks are hot and it
//!    needs the least compute) unless the head has been passed over too often (no starvation);
//! 3. when a running sequence needs a block and the pool (after evicting cached blocks) has
//!    none, the most recently admitted sequence is preempted: its blocks are released and it
//!    waits at the head of the queue, to be recomputed later (mostly from the prefix cache:
//!    its full blocks stay cached);
//! 4. one forward pass over all chunks; each sequence whose chunk reached its end samples.

use super::metrics::EngineStats;
use super::{Command, EngineConfig, EngineRequest, Event, Usage};
use crate::grammar::Constraint;
use crate::request::FinishCheck;
use crate::sampler::Sampler;
use crate::stop::TextStream;
use crate::tiers::{import_loaded, load_request};
use crate::FinishReason;
use kvinfer_cache::{BlockHash, PagedKv, SeqId};
use kvinfer_model::{Model, SeqBatch};
use kvinfer_tier::{LoadResult, TieredStore};
use std::collections::{HashMap, VecDeque};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// How long an idle loop waits for a tier load before looking at new commands again.
const LOAD_POLL: Duration = Duration::from_millis(2);

/// Below this queue length admission is first come, first served.
const PREFIX_ORDER_MIN_QUEUE: usize = 4;
/// A waiting sequence passed over this many times is admitted next regardless of prefixes.
const MAX_PASSED_OVER: u32 = 8;

/// One step's work as plain data: which running sequence computes which token range. Built by
/// `schedule` (blocks reserved), run by `execute` (one forward pass), applied by `apply`.
#[derive(Debug, Default)]
struct StepPlan {
    chunks: Vec<Chunk>,
}

/// `len` tokens of `running[choice]`, from its first uncomputed position.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    choice: usize,
    len: usize,
}

struct Request {
    events: UnboundedSender<Event>,
    params: EngineRequest,
    /// Choices finished.
    done: usize,
    usage: Usage,
    arrival: Instant,
    first_token: bool,
    /// Counted in the handle's queue of not-yet-admitted requests.
    queued: bool,
}

/// One sampled continuation of a request: a sequence in the cache when running.
struct Choice {
    req: u64,
    index: usize,
    /// Prompt, then generated tokens; the last one's K/V is computed next step.
    tokens: Vec<u32>,
    /// Hashes of the full blocks of `tokens` as far as known (the prompt's, computed once when
    /// the request was accepted; after a preemption, every full block computed).
    hashes: Vec<BlockHash>,
    generated: usize,
    seq: Option<SeqId>,
    /// Tokens whose K/V is in the cache.
    computed: usize,
    sampler: Sampler,
    text: TextStream,
    passed_over: u32,
    last_token_at: Option<Instant>,
    /// The tiers were asked for this choice's prefix (once per request).
    tier_checked: bool,
    /// The grammar its output must follow (each choice has its own state).
    grammar: Option<Constraint>,
}

/// A choice waiting for its blocks from a tier (between waiting and running): it holds no
/// pool block and does not hold up the running batch.
struct Loading {
    choice: Choice,
    /// The first block the load covers.
    from: usize,
}

pub(super) struct Scheduler {
    model: Arc<Model>,
    kv: PagedKv,
    config: EngineConfig,
    ctx: usize,
    shared: Arc<Mutex<EngineStats>>,
    stats: EngineStats,
    requests: HashMap<u64, Request>,
    next_req: u64,
    /// In admission order (the last is preempted first).
    running: Vec<Choice>,
    waiting: VecDeque<Choice>,
    tiers: Option<Arc<TieredStore>>,
    loading: HashMap<u64, Loading>,
    next_load: u64,
    loads_tx: mpsc::Sender<(u64, LoadResult)>,
    loads_rx: mpsc::Receiver<(u64, LoadResult)>,
    /// The handle's count of requests accepted and not yet admitted.
    queue_counter: Arc<std::sync::atomic::AtomicUsize>,
}

impl Scheduler {
    pub(super) fn new(
        model: Arc<Model>,
        kv: PagedKv,
        config: EngineConfig,
        ctx: usize,
        shared: Arc<Mutex<EngineStats>>,
        tiers: Option<Arc<TieredStore>>,
    ) -> Self {
        let (loads_tx, loads_rx) = mpsc::channel();
        let stats = EngineStats {
            model: model.name.clone(),
            policy: kv.policy().to_string(),
            block_size: kv.block_size(),
            kv_dtype: kv.layout().dtype.name().to_string(),
            kv_bytes_per_token: kv.layout().token_bytes() * kv.num_groups(),
            kv_groups: kv.num_groups(),
            ..EngineStats::default()
        };
        let mut s = Self {
            model,
            kv,
            config,
            ctx,
            shared,
            stats,
            requests: HashMap::new(),
            next_req: 0,
            running: Vec::new(),
            waiting: VecDeque::new(),
            tiers,
            loading: HashMap::new(),
            next_load: 0,
            loads_tx,
            loads_rx,
            queue_counter: Arc::default(),
        };
        s.publish();
        s
    }

    fn idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub(super) fn set_queue_counter(&mut self, c: Arc<std::sync::atomic::AtomicUsize>) {
        self.queue_counter = c;
    }

    /// Takes request `r` off the handle's waiting count (once).
    fn dequeue(counter: &std::sync::atomic::AtomicUsize, r: &mut Request) {
        if std::mem::replace(&mut r.queued, false) {
            counter.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The loop: runs until every handle is gone and the work in flight is done.
    pub(super) fn run(&mut self, rx: &mpsc::Receiver<Command>) {
        let mut open = true;
        loop {
            if self.idle() {
                if self.loading.is_empty() {
                    if !open {
                        break;
                    }
                    match rx.recv() {
                        Ok(c) => self.accept(c),
                        Err(_) => break,
                    }
                } else if let Ok(r) = self.loads_rx.recv_timeout(LOAD_POLL) {
                    self.on_loaded(r);
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(c) => self.accept(c),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            while let Ok(r) = self.loads_rx.try_recv() {
                self.on_loaded(r);
            }
            self.reap_cancelled();
            self.step();
            self.publish();
        }
        self.publish();
    }

    /// A tier load came back: its verified blocks go into the pool (registered, cached) and the
    /// choice waits at the head of the queue, to be admitted with them as a prefix hit.
    fn on_loaded(&mut self, (id, result): (u64, LoadResult)) {
        let Some(Loading { choice, from }) = self.loading.remove(&id) else {
            return; // its request was cancelled meanwhile
        };
        let n = import_loaded(&mut self.kv, &choice.hashes, &choice.tokens, from, &result);
        self.stats.tier_loads_total += 1;
        self.stats.tier_hit_tokens_total += (n * self.kv.block_size()) as u64;
        self.waiting.push_front(choice);
    }

    /// Sends waiting choice `w` to the tiers when they may hold more of its prefix than the
    /// pool does. True when it left the queue for `loading`.
    fn start_load(&mut self, w: usize) -> bool {
        let Some(tiers) = &self.tiers else {
            return false;
        };
        let c = &mut self.waiting[w];
        if std::mem::replace(&mut c.tier_checked, true) {
            return false;
        }
        let Some((from, lr)) = load_request(&self.kv, &c.hashes, &c.tokens) else {
            return false;
        };
        let id = self.next_load;
        let tx = self.loads_tx.clone();
        let reply = Box::new(move |r: LoadResult| {
            let _ = tx.send((id, r));
        });
        if tiers.request_load(lr, reply).is_err() {
            return false; // the load queue is full: compute instead
        }
        self.next_load += 1;
        let choice = self.waiting.remove(w).expect("picked");
        self.loading.insert(id, Loading { choice, from });
        true
    }

    /// Empties the prefix cache: the pool's cached blocks now, the tiers' blocks of this model
    /// on a thread of their own (the loop never waits on I/O); `reply` gets the report.
    fn clear_cache(&mut self, reply: tokio::sync::oneshot::Sender<super::ClearReport>) {
        let pool_blocks = self.kv.clear_cached();
        self.publish(); // the snapshot shows the clear before the caller hears of it
        let tiers = self.tiers.clone();
        let _ = std::thread::Builder::new()
            .name("kvinfer-cache-clear".into())
            .spawn(move || {
                let tiers = tiers
                    .map(|t| {
                        t.clear()
                            .into_iter()
                            .map(|(name, r)| super::TierCleared {
                                tier: name,
                                deleted: r.as_ref().ok().copied(),
                                error: r.err(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let _ = reply.send(super::ClearReport { pool_blocks, tiers });
            });
    }

    fn accept(&mut self, c: Command) {
        let (params, events) = match c {
            Command::Submit(params, events) => (params, events),
            Command::ClearCache(reply) => return self.clear_cache(reply),
        };
        let id = self.next_req;
        self.next_req += 1;
        self.stats.requests_total += 1;
        self.stats.prompt_tokens_total += params.prompt_ids.len() as u64;
        let choice = Choice {
            req: id,
            index: 0,
            hashes: self.kv.hash_blocks(&params.prompt_ids),
            tokens: params.prompt_ids.clone(),
            generated: 0,
            seq: None,
            computed: 0,
            sampler: Sampler::new(params.sampling.clone()),
            text: TextStream::new(&params.stop),
            passed_over: 0,
            last_token_at: None,
            tier_checked: false,
            grammar: params.grammar.clone(),
        };
        let usage = Usage {
            prompt_tokens: params.prompt_ids.len(),
            ..Usage::default()
        };
        self.requests.insert(
            id,
            Request {
                events,
                params,
                done: 0,
                usage,
                arrival: Instant::now(),
                first_token: false,
                queued: true,
            },
        );
        self.waiting.push_back(choice);
    }

    /// Drops requests whose client went away (the event channel closed), freeing their blocks.
    fn reap_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.abort(id, None);
        }
    }

    /// Ends request `id` early: frees every choice's blocks, sends `error` if given.
    fn abort(&mut self, id: u64, error: Option<String>) {
        let kv = &mut self.kv;
        let mut drop_choice = |c: &Choice| {
            if c.req != id {
                return true;
            }
            if let Some(seq) = c.seq {
                kv.release(seq);
            }
            false
        };
        self.running.retain(&mut drop_choice);
        self.waiting.retain(drop_choice);
        self.loading.retain(|_, l| l.choice.req != id);
        if let Some(mut r) = self.requests.remove(&id) {
            Self::dequeue(&self.queue_counter, &mut r);
            if let Some(e) = error {
                let _ = r.events.send(Event::Error(e));
            }
            self.stats.requests_aborted += 1;
        }
    }

    fn preempt(&mut self, i: usize) {
        let mut c = self.running.remove(i);
        if let Some(seq) = c.seq.take() {
            let hashes = self.kv.sequence_hashes(seq);
            if hashes.len() > c.hashes.len() {
                c.hashes = hashes.to_vec();
            }
            self.kv.release(seq);
        }
        c.computed = 0;
        self.stats.preemptions_total += 1;
        self.waiting.push_front(c);
    }

    /// Which waiting sequence to admit next (see the module docs).
    fn pick_waiting(&mut self) -> usize {
        if self.waiting.len() < PREFIX_ORDER_MIN_QUEUE
            || self.waiting[0].passed_over >= MAX_PASSED_OVER
        {
            return 0;
        }
        let mut best = (0, 0);
        for (i, c) in self.waiting.iter().enumerate() {
            let cached = self.kv.lookup_hashed(&c.hashes, c.tokens.len()).num_tokens;
            if cached > best.1 {
                best = (i, cached);
            }
        }
        for c in self.waiting.iter_mut().take(best.0) {
            c.passed_over += 1;
        }
        best.0
    }

    /// Plans the step (blocks are reserved for every chunk).
    fn schedule(&mut self) -> StepPlan {
        let mut budget = self.config.max_batch_tokens;
        let mut plan = StepPlan::default();
        let mut i = 0;
        while i < self.running.len() {
            let c = &self.running[i];
            let n = (c.tokens.len() - c.computed).min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            let seq = c.seq.expect("running choices hold a sequence");
            if self.kv.reserve(seq, n).is_ok() {
                plan.chunks.push(Chunk { choice: i, len: n });
                budget -= n;
                i += 1;
            } else if self.running.len() == 1 {
                // Alone and still no room: the pool is smaller than this sequence.
                let c = self.running.remove(0);
                self.finish(c, FinishReason::ContextFull, true);
            } else {
                // Preempt the newest; it may be this one.
                self.preempt(self.running.len() - 1);
            }
        }
        while budget > 0 && self.running.len() < self.config.max_running && !self.waiting.is_empty()
        {
            let w = self.pick_waiting();
            if self.start_load(w) {
                continue;
            }
            let c = &self.waiting[w];
            let (seq, cached) = self
                .kv
                .add_sequence_hashed(&c.tokens, c.hashes.clone(), true);
            let n = (c.tokens.len() - cached).min(budget);
            if self.kv.reserve(seq, n).is_err() {
                self.kv.release(seq);
                if self.running.is_empty() {
                    let c = self.waiting.remove(w).expect("picked");
                    let msg = format!(
                        "the KV cache ({} blocks of {} tokens) cannot hold this request's {} \
                         tokens; raise --kv-cache-mb",
                        self.kv.num_blocks(),
                        self.kv.block_size(),
                        c.tokens.len()
                    );
                    self.abort(c.req, Some(msg));
                }
                break;
            }
            let mut c = self.waiting.remove(w).expect("picked");
            if let Some(r) = self.requests.get_mut(&c.req) {
                Self::dequeue(&self.queue_counter, r);
            }
            if c.index == 0 && c.generated == 0 {
                if let Some(r) = self.requests.get_mut(&c.req) {
                    if r.usage.cached_tokens == 0 {
                        r.usage.cached_tokens = cached;
                        self.stats.cached_prompt_tokens_total += cached as u64;
                    }
                }
            }
            c.seq = Some(seq);
            c.computed = cached;
            c.passed_over = 0;
            self.running.push(c);
            plan.chunks.push(Chunk {
                choice: self.running.len() - 1,
                len: n,
            });
            budget -= n;
        }
        plan
    }

    /// One step: plan, run the plan's forward pass, apply its results.
    fn step(&mut self) {
        let plan = self.schedule();
        if plan.chunks.is_empty() {
            return;
        }
        match self.execute(&plan) {
            Ok(logits) => self.apply(&plan, logits),
            Err(e) => {
                let ids: Vec<u64> = plan
                    .chunks
                    .iter()
                    .map(|ch| self.running[ch.choice].req)
                    .collect();
                for id in ids {
                    self.abort(id, Some(format!("the model failed: {e}")));
                }
            }
        }
    }

    /// One forward pass over every chunk of the plan; each chunk's last-token logits.
    fn execute(&mut self, plan: &StepPlan) -> Result<Vec<Vec<f32>>, kvinfer_model::ModelError> {
        let (tables, storage) = self.kv.tables_and_storage();
        let batch: Vec<SeqBatch> = plan
            .chunks
            .iter()
            .map(|ch| {
                let c = &self.running[ch.choice];
                SeqBatch {
                    tokens: &c.tokens[c.computed..c.computed + ch.len],
                    start: c.computed,
                    tables: tables.block_tables(c.seq.expect("planned")),
                }
            })
            .collect();
        let n_tokens: usize = plan.chunks.iter().map(|ch| ch.len).sum();
        self.stats.steps_total += 1;
        self.stats.batch_tokens_total += n_tokens as u64;
        self.model.forward(storage, &batch)
    }

    /// Applies a step's results: commits the computed tokens (full blocks registered), samples
    /// where a chunk reached its sequence's end, forks `n > 1` choices after prefill, finishes
    /// the sequences that ended.
    fn apply(&mut self, plan: &StepPlan, logits: Vec<Vec<f32>>) {
        let mut finished: Vec<(usize, FinishReason)> = Vec::new();
        let mut forks: Vec<(Choice, Option<FinishReason>)> = Vec::new();
        let mut failed: Vec<(u64, String)> = Vec::new();
        for (ch, logits) in plan.chunks.iter().zip(logits) {
            let c = &mut self.running[ch.choice];
            let seq = c.seq.expect("planned");
            self.kv
                .commit(seq, &c.tokens[c.computed..c.computed + ch.len]);
            c.computed += ch.len;
            if c.computed < c.tokens.len() {
                continue; // mid-prefill: these logits are not needed
            }
            let Some(req) = self.requests.get_mut(&c.req) else {
                continue;
            };
            if c.index == 0 && c.generated == 0 {
                // The other choices share the prompt's blocks and sample from the same logits.
                for j in 1..req.params.n {
                    let mut sampling = req.params.sampling.clone();
                    sampling.seed = sampling.seed.wrapping_add(j as u64);
                    let mut f = Choice {
                        req: c.req,
                        index: j,
                        tokens: c.tokens.clone(),
                        hashes: c.hashes.clone(),
                        generated: 0,
                        seq: Some(self.kv.fork(seq)),
                        computed: c.computed,
                        sampler: Sampler::new(sampling),
                        text: TextStream::new(&req.params.stop),
                        passed_over: 0,
                        last_token_at: None,
                        tier_checked: true,
                        grammar: req.params.grammar.clone(),
                    };
                    match advance(&mut f, req, &logits, &self.model, self.ctx, &mut self.stats) {
                        Ok(end) => forks.push((f, end)),
                        Err(e) => failed.push((f.req, e)),
                    }
                }
            }
            match advance(c, req, &logits, &self.model, self.ctx, &mut self.stats) {
                Ok(Some(reason)) => finished.push((ch.choice, reason)),
                Ok(None) => {}
                Err(e) => failed.push((c.req, e)),
            }
        }
        // Highest index first, so the earlier indices stay valid.
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (i, reason) in finished {
            let c = self.running.remove(i);
            self.finish(c, reason, false);
        }
        for (f, end) in forks {
            match end {
                Some(reason) => self.finish(f, reason, false),
                None => self.running.push(f),
            }
        }
        for (id, e) in failed {
            self.abort(id, Some(e));
        }
    }

    /// Ends a choice: frees its sequence, flushes held text unless a stop string ended it, and
    /// closes the request when it was the last choice.
    fn finish(&mut self, mut c: Choice, reason: FinishReason, flush: bool) {
        if let Some(seq) = c.seq.take() {
            self.kv.release(seq);
        }
        let Some(req) = self.requests.get_mut(&c.req) else {
            return;
        };
        if flush {
            let rest = c.text.finish();
            if !rest.is_empty() {
                let _ = req.events.send(Event::Text {
                    index: c.index,
                    text: rest,
                });
            }
        }
        let _ = req.events.send(Event::Done {
            index: c.index,
            finish_reason: reason,
        });
        req.done += 1;
        req.usage.completion_tokens += c.generated;
        if req.done == req.params.n {
            let usage = req.usage;
            self.stats.requests_finished += 1;
            // The snapshot shows this request's blocks released before its client hears it
            // is done (a client reading /v1/stats right after sees the pool as it is).
            self.publish();
            let Some(req) = self.requests.get_mut(&c.req) else {
                return;
            };
            let _ = req.events.send(Event::Usage(usage));
            self.requests.remove(&c.req);
        }
    }

    fn publish(&mut self) {
        self.stats.running = self.running.len();
        self.stats.waiting = self.waiting.len();
        self.stats.loading = self.loading.len();
        self.stats.blocks = self.kv.usage();
        self.stats.prefix = self.kv.stats();

        if let Ok(mut s) = self.shared.lock() {
            s.clone_from(&self.stats);
        }
        debug_assert!(
            !self.idle() || self.stats.blocks.in_use == 0,
            "blocks in use with nothing running"
        );
    }
}

/// Samples choice `c`'s next token from `logits`, streams its text, and says whether it ended
/// (with its reason; the text was flushed where it should be). An error: its grammar failed.
fn advance(
    c: &mut Choice,
    req: &mut Request,
    logits: &[f32],
    model: &Model,
    ctx: usize,
    stats: &mut EngineStats,
) -> Result<Option<FinishReason>, String> {
    let tok = &model.tokenizer;
    let banned = if c.generated < req.params.min_tokens && !req.params.ignore_eos {
        tok.eog_ids()
    } else {
        &[]
    };
    let mask = match c.grammar.as_mut() {
        Some(g) => {
            let t0 = Instant::now();
            let m = g.mask()?;
            stats.grammar.observe(t0.elapsed().as_secs_f64());
            Some(m)
        }
        None => None,
    };
    let next = c
        .sampler
        .sample_constrained(logits, &c.tokens, banned, mask.as_ref());
    let grammar_done = match c.grammar.as_mut() {
        // An end-of-generation token the grammar allowed ends the output as usual.
        Some(g) if !tok.is_eog(next) => {
            g.consume(next)?;
            g.is_stopped()
        }
        _ => false,
    };
    if let Some(k) = req.params.logprobs {
        let ends_on_eog = !req.params.ignore_eos && tok.is_eog(next);
        if !ends_on_eog {
            let (token, top) = logprobs(tok, logits, next, k);
            let _ = req.events.send(Event::Logprob {
                index: c.index,
                token,
                top,
            });
        }
    }
    c.tokens.push(next);
    c.generated += 1;
    stats.generation_tokens_total += 1;
    let now = Instant::now();
    if !req.first_token {
        req.first_token = true;
        stats.ttft.observe((now - req.arrival).as_secs_f64());
    }
    if let Some(t) = c.last_token_at {
        stats.tpot.observe((now - t).as_secs_f64());
    }
    c.last_token_at = Some(now);
    let check = FinishCheck {
        // The grammar's end is an end of generation, ignore_eos or not.
        ignore_eos: req.params.ignore_eos && c.grammar.is_none(),
        max_tokens: req.params.max_tokens,
        ctx,
    };
    let mut step = check.after_token(tok, &mut c.text, next, c.generated, c.tokens.len());
    if grammar_done && step.end.is_none() {
        // The grammar is complete and can take nothing more: the output ends here.
        step.emit.push_str(&c.text.finish());
        step.end = Some(FinishReason::Stop);
    }
    if !step.emit.is_empty() {
        let _ = req.events.send(Event::Text {
            index: c.index,
            text: step.emit,
        });
    }
    Ok(step.end)
}

/// The log-probability of `chosen` and the `k` most likely tokens under `logits` (log-softmax
/// of the model's raw output, before any sampling parameter).
fn logprobs(
    tok: &kvinfer_model::tokenizer::Tokenizer,
    logits: &[f32],
    chosen: u32,
    k: usize,
) -> (super::TokenLogprob, Vec<super::TokenLogprob>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let entry = |id: u32| {
        let bytes = tok.token_bytes(id).to_vec();
        super::TokenLogprob {
            id,
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob: logits[id as usize] - lse,
        }
    };
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(ids.len());
    if k > 0 && k < ids.len() {
        ids.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
    }
    ids.truncate(k);
    // Best first; ties by id, as argmax (the first on ties) picks.
    ids.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    (entry(chosen), ids.into_iter().map(entry).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{new_paged_kv, CacheOptions};
    use crate::sampler::SamplingParams;
    use kvinfer_model::testing::{write_tiny_model, TinyArch};
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    fn scheduler(max_running: usize) -> Scheduler {
        let dir = std::env::temp_dir().join(format!("kvinfer-sched-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // One file per call: tests run in parallel and a mapped file must not be rewritten.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("tiny-{max_running}-{k}.gguf"));
        write_tiny_model(&path, TinyArch::Llama, 9).unwrap();
        let model = Model::load(&path).unwrap();
        let cache = CacheOptions {
            num_blocks: Some(64),
            block_size: 4,
            ..CacheOptions::default()
        };
        let kv = new_paged_kv(&model, &cache).unwrap();
        let config = EngineConfig {
            cache,
            max_batch_tokens: 64,
            max_running,
            ctx_size: 0,
            max_waiting: 256,
        };
        let ctx = model.config.context_length;
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        Scheduler::new(Arc::new(model), kv, config, ctx, stats, None)
    }

    fn submit(s: &mut Scheduler, prompt: Vec<u32>, max_tokens: usize) -> UnboundedReceiver<Event> {
        let (tx, rx) = unbounded_channel();
        let req = EngineRequest {
            prompt_ids: prompt,
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop: vec![],
            n: 1,
            ignore_eos: true,
            min_tokens: 0,
            logprobs: None,
            grammar: None,
        };
        s.accept(Command::Submit(req, tx));
        rx
    }

    fn run_until_idle(s: &mut Scheduler) {
        for _ in 0..10_000 {
            if s.idle() {
                return;
            }
            s.step();
        }
        panic!("never idle");
    }

    #[test]
    fn a_long_queue_admits_the_longest_cached_prefix_first_but_never_starves_the_head() {
        let mut s = scheduler(1);
        let stem: Vec<u32> = (10..34).collect(); // 24 tokens: 6 blocks of 4
        let _p = submit(&mut s, [stem.clone(), vec![200]].concat(), 2);
        run_until_idle(&mut s);
        // Four strangers, then one sharing the cached stem.
        let _rx: Vec<_> = (0..4)
            .map(|i| submit(&mut s, (0..20).map(|t| 100 + t + 20 * i).collect(), 2))
            .collect();
        let _f = submit(&mut s, [stem.clone(), vec![201, 202]].concat(), 2);
        s.schedule();
        assert_eq!(s.running.len(), 1);
        assert_eq!(
            s.running[0].tokens[..24],
            stem[..],
            "the cached prefix went first"
        );
        assert!(
            s.waiting.iter().all(|c| c.passed_over == 1),
            "the four were passed over once"
        );
        run_until_idle(&mut s);

        // A head passed over MAX_PASSED_OVER times is admitted next, prefixes or not.
        let _rx: Vec<_> = (0..4)
            .map(|i| submit(&mut s, (0..20).map(|t| 300 + t + 20 * i).collect(), 2))
            .collect();
        let _f = submit(&mut s, [stem.clone(), vec![203]].concat(), 2);
        s.waiting[0].passed_over = MAX_PASSED_OVER;
        let head = s.waiting[0].tokens.clone();
        s.schedule();
        assert_eq!(s.running[0].tokens, head);
        run_until_idle(&mut s);
        assert_eq!(s.kv.usage().in_use, 0);
    }

    #[test]
    fn a_short_queue_is_first_come_first_served() {
        let mut s = scheduler(1);
        let stem: Vec<u32> = (10..34).collect();
        let _p = submit(&mut s, [stem.clone(), vec![200]].concat(), 2);
        run_until_idle(&mut s);
        let first: Vec<u32> = (100..120).collect();
        let _a = submit(&mut s, first.clone(), 2);
        let _b = submit(&mut s, [stem, vec![201]].concat(), 2);
        s.schedule();
        assert_eq!(s.running[0].tokens, first);
    }
}
