//! Lossless compression of a block's payload. f16 K/V values compress poorly as they are (the
//! low byte of a half is noise); a byte shuffle (blosc's trick: all low bytes, then all high
//! bytes) groups the sign/exponent bytes, which are skewed but rarely repeat in runs.
//! `kvinfer bench tiers` measures every option on real blocks (docs/BENCHMARKS.md): LZ4 finds
//! nothing to match, shuffled or not (ratio 0.996); zstd's entropy coder gains 7%, and 12% after
//! the shuffle, at ~700 MB/s encode and ~1.5 GB/s decode: a block is a fraction of a millisecond
//! either way, against tens of milliseconds to recompute it. So shuffle-zstd is the default.

use std::str::FromStr;

/// How a payload is stored. The header records it, so readers need no configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Codec {
    /// As is.
    #[default]
    None,
    /// LZ4 (lz4_flex block format).
    Lz4,
    /// Byte shuffle of the f16 halves, then LZ4.
    ShuffleLz4,
    /// Zstandard level 1.
    Zstd,
    /// Byte shuffle, then Zstandard level 1.
    ShuffleZstd,
}

impl Codec {
    /// Every codec, for measurement.
    pub const ALL: [Codec; 5] = [
        Codec::None,
        Codec::Lz4,
        Codec::ShuffleLz4,
        Codec::Zstd,
        Codec::ShuffleZstd,
    ];

    /// The header byte.
    pub fn id(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::ShuffleLz4 => 2,
            Codec::Zstd => 3,
            Codec::ShuffleZstd => 4,
        }
    }

    /// The codec of a header byte.
    pub fn from_id(id: u8) -> Option<Self> {
        Codec::ALL.into_iter().find(|c| c.id() == id)
    }

    fn shuffled(self) -> bool {
        matches!(self, Codec::ShuffleLz4 | Codec::ShuffleZstd)
    }

    /// Compresses `raw`.
    pub fn encode(self, raw: &[u8]) -> Vec<u8> {
        let shuffled;
        let src = if self.shuffled() {
            shuffled = shuffle2(raw);
            &shuffled[..]
        } else {
            raw
        };
        match self {
            Codec::None => raw.to_vec(),
            Codec::Lz4 | Codec::ShuffleLz4 => lz4_flex::block::compress(src),
            Codec::Zstd | Codec::ShuffleZstd => {
                zstd::bulk::compress(src, 1).unwrap_or_else(|_| src.to_vec())
            }
        }
    }

    /// Decompresses `stored` into exactly `raw_len` bytes; `None` if it does not.
    pub fn decode(self, stored: &[u8], raw_len: usize) -> Option<Vec<u8>> {
        let out = match self {
            Codec::None => stored.to_vec(),
            Codec::Lz4 | Codec::ShuffleLz4 => lz4_flex::block::decompress(stored, raw_len).ok()?,
            Codec::Zstd | Codec::ShuffleZstd => zstd::bulk::decompress(stored, raw_len).ok()?,
        };
        if out.len() != raw_len {
            return None;
        }
        Some(if self.shuffled() {
            unshuffle2(&out)
        } else {
            out
        })
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::ShuffleLz4 => "shuffle-lz4",
            Codec::Zstd => "zstd",
            Codec::ShuffleZstd => "shuffle-zstd",
        })
    }
}

impl FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Codec::ALL
            .into_iter()
            .find(|c| c.to_string() == s)
            .ok_or_else(|| {
                format!("unknown codec {s:?}; use none, lz4, shuffle-lz4, zstd or shuffle-zstd")
            })
    }
}

/// Splits 2-byte values into all first bytes, then all second bytes. An odd tail byte stays last.
fn shuffle2(raw: &[u8]) -> Vec<u8> {
    let n = raw.len() / 2;
    let mut out = vec![0u8; raw.len()];
    let (lo, rest) = out.split_at_mut(n);
    for ((pair, l), h) in raw.chunks_exact(2).zip(lo.iter_mut()).zip(rest.iter_mut()) {
        *l = pair[0];
        *h = pair[1];
    }
    if raw.len() % 2 == 1 {
        out[2 * n] = raw[2 * n];
    }
    out
}

fn unshuffle2(s: &[u8]) -> Vec<u8> {
    let n = s.len() / 2;
    let mut out = vec![0u8; s.len()];
    let (lo, hi) = (&s[..n], &s[n..2 * n]);
    for ((pair, &l), &h) in out.chunks_exact_mut(2).zip(lo).zip(hi) {
        pair[0] = l;
        pair[1] = h;
    }
    if s.len() % 2 == 1 {
        out[2 * n] = s[2 * n];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips_and_refuses_a_wrong_length() {
        let raw: Vec<u8> = (0..4099u32).map(|i| (i * 7 % 13) as u8).collect();
        for c in Codec::ALL {
            let enc = c.encode(&raw);
            assert_eq!(c.decode(&enc, raw.len()).as_deref(), Some(&raw[..]), "{c}");
            assert_eq!(c.decode(&enc, raw.len() + 1), None, "{c}");
            assert_eq!(Codec::from_id(c.id()), Some(c));
            assert_eq!(c.to_string().parse::<Codec>(), Ok(c));
        }
        assert_eq!(unshuffle2(&shuffle2(&raw)), raw);
        assert!(Codec::Lz4.decode(&[0xff, 0xff, 0xff], 10).is_none());
    }
}
