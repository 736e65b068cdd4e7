//! Token sampling: logit bias and banned tokens, then the penalties (repetition, presence,
//! frequency), then top-k, top-p, min-p, temperature, and a seeded draw (the order llama.cpp's
//! default chain applies them). Temperature 0 is greedy argmax.

use crate::grammar::Mask;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p; 1.0 disables.
    pub top_p: f32,
    /// Drop tokens with probability below min_p * p(max); 0 disables.
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recent tokens; 1.0 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every token among the recent ones (OpenAI's
    /// `presence_penalty`, -2..=2); 0 disables.
    pub presence_penalty: f32,
    /// Subtracted per occurrence among the recent tokens (`frequency_penalty`, -2..=2).
    pub frequency_penalty: f32,
    /// Added to a token's logit before anything else (`logit_bias`, -100..=100; -100 bans it).
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed of the random draw.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks ranges, with a message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(format!(
                "repeat_penalty must be > 0, got {}",
                self.repeat_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be between -2 and 2, got {v}"));
            }
        }
        if let Some((t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(format!(
                "logit_bias of token {t} must be between -100 and 100, got {b}"
            ));
        }
        Ok(())
    }
}

/// A sampler with its own random state.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// Index of the largest value (first one on ties, as llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    /// A sampler for `params`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` given the tokens so far (`history`, for the penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.sample_masked(logits, history, &[])
    }

    /// As [`Self::sample`], never choosing a token of `banned` (unless every token is banned).
    pub fn sample_masked(&mut self, logits: &[f32], history: &[u32], banned: &[u32]) -> u32 {
        self.sample_constrained(logits, history, banned, None)
    }

    /// As [`Self::sample_masked`], choosing only among the tokens `allow` allows (a grammar's
    /// mask). The grammar is never broken: if bias and `banned` leave nothing it allows, they
    /// are dropped.
    pub fn sample_constrained(
        &mut self,
        raw: &[f32],
        history: &[u32],
        banned: &[u32],
        allow: Option<&Mask>,
    ) -> u32 {
        let p = &self.params;
        let only_allowed = |logits: &mut [f32]| {
            if let Some(m) = allow {
                for (i, l) in logits.iter_mut().enumerate() {
                    if !m.allows(i as u32) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        };
        let mut logits = raw.to_vec();
        only_allowed(&mut logits);
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                // OpenAI: -100 or 100 should ban or force the token.
                *l = if b <= -100.0 {
                    f32::NEG_INFINITY
                } else {
                    *l + b
                };
            }
        }
        for &t in banned {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        // Only a mask or bias can remove every token; skip the scan on the common path.
        let masked = !banned.is_empty() || !p.logit_bias.is_empty() || allow.is_some();
        if masked && logits.iter().all(|l| *l == f32::NEG_INFINITY) {
            if allow.is_some() {
                // Bias and bans left no token the grammar allows: the grammar wins.
                logits = raw.to_vec();
                only_allowed(&mut logits);
            } else {
                logits = vec![0.0; logits.len()]; // nothing allowed: fall back to any token
            }
        }
        let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts: std::collections::HashMap<u32, u32> = Default::default();
            for &t in recent {
                *counts.entry(t).or_default() += 1;
            }
            for (t, n) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        if p.repeat_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in recent {
                if let Some(l) = logits.get_mut(t as usize) {
                    if seen.insert(t) {
                        *l = if *l > 0.0 {
                            *l / p.repeat_penalty
                        } else {
                            *l * p.repeat_penalty
                        };
                    }
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(&logits);
        }
        // Candidates sorted by logit, descending.
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let k = if p.top_k == 0 {
            cand.len()
        } else {
            p.top_k.min(cand.len())
        };
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            cand.truncate(k);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let probs = softmax(&cand);
        // top-p: keep the smallest prefix reaching p (at least one).
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, &pr) in probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        // min-p: drop tokens far less likely than the best.
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|&&pr| pr >= floor).count().max(1));
        }
        cand.truncate(keep);
        for c in cand.iter_mut() {
            c.1 /= p.temperature;
        }
        let probs = softmax(&cand);
        let r: f32 = self.rng.random();
        let mut cum = 0.0;
        for (c, pr) in cand.iter().zip(&probs) {
            cum += pr;
            if r < cum {
                return c.0;
            }
        }
        cand.last().map_or(0, |c| c.0)
    }
}

fn softmax(cand: &[(u32, f32)]) -> Vec<f32> {
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_changes_the_winner() {
        let p = SamplingParams {
            repeat_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&[1.0, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_is_reproducible() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(p);
        let logits = [0.0, 0.5, 0.2, 0.4];
        assert!((0..50).all(|_| s.sample(&logits, &[]) == 1));
        let p = SamplingParams {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
            ..SamplingParams::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..64).map(|_| s.sample(&logits, &[])).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..64).map(|_| s.sample(&logits, &[])).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != 1),
            "temperature 1.5 over close logits must vary"
        );
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // p = softmax([10, 0, 0, ...]) puts ~all mass on token 0: top_p 0.5 keeps only it.
        let mut logits = vec![0.0f32; 100];
        logits[3] = 10.0;
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(p);
        assert!((0..100).all(|_| s.sample(&logits, &[]) == 3));
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.01,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(p);
        assert!((0..100).all(|_| s.sample(&logits, &[]) == 3));
    }

    #[test]
    fn logit_bias_bans_and_favours_and_penalties_count_occurrences() {
        let logits = [1.0, 3.0, 2.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(1, -100.0)],
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[]), 2, "-100 bans the greedy token");
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(3, 5.0)],
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[]), 3);
        // Presence: 1.5 off token 1 once (3 -> 1.5 < 2).
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 1.5,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[1]), 2);
        // Frequency: 0.4 per occurrence; 3 occurrences take token 1 to 1.8 < 2.
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.4,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits, &[1, 1]), 1);
        assert_eq!(s.sample(&logits, &[1, 1, 1]), 2);
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample_masked(&logits, &[], &[1, 2]), 0);
        assert_eq!(
            s.sample_masked(&logits, &[], &[0, 1, 2, 3]),
            0,
            "all banned: any token"
        );
    }

    #[test]
    fn validate_names_the_field() {
        for (p, field) in [
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..SamplingParams::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..SamplingParams::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    logit_bias: vec![(5, 101.0)],
                    ..SamplingParams::default()
                },
                "logit_bias",
            ),
        ] {
            assert!(p.validate().unwrap_err().contains(field));
        }
        let p = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        };
        assert!(p.validate().unwrap_err().contains("top_p"));
        let p = SamplingParams {
            temperature: -1.0,
            ..SamplingParams::default()
        };
        assert!(p.validate().unwrap_err().contains("temperature"));
    }
}
