//! Streaming text out of tokens: whole UTF-8 characters only, and stop strings that may span
//! several tokens (text that could still become a stop string is held back until it cannot).

/// Turns token bytes into text, holding back an incomplete UTF-8 sequence until it completes.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Appends `bytes`; returns the text that is now complete (invalid bytes become U+FFFD).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Truncated sequence at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left at the end of generation (lossy).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

/// Finds stop strings in streamed text.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not yet released because it may begin a stop string.
    held: String,
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub struct StopStep {
    /// Text safe to show now.
    pub emit: String,
    /// True when a stop string was found: generation ends, the stop string is not shown.
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Feeds new text.
    pub fn push(&mut self, text: &str) -> StopStep {
        self.held.push_str(text);
        let first_hit = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first_hit {
            let emit = self.held[..at].to_string();
            self.held.clear();
            return StopStep {
                emit,
                stopped: true,
            };
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let mut keep_from = self.held.len();
        for s in &self.stops {
            for (i, _) in self.held.char_indices() {
                if i < keep_from && s.starts_with(&self.held[i..]) {
                    keep_from = i;
                    break;
                }
            }
        }
        let emit = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopStep {
            emit,
            stopped: false,
        }
    }

    /// Releases held text at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// A sequence's text output: token bytes -> UTF-8 -> stop-string matching.
#[derive(Debug, Default)]
pub struct TextStream {
    utf8: Utf8Stream,
    stop: StopMatcher,
}

impl TextStream {
    /// A stream cutting at any of `stops`.
    pub fn new(stops: &[String]) -> Self {
        Self {
            utf8: Utf8Stream::default(),
            stop: StopMatcher::new(stops),
        }
    }

    /// Feeds one token's bytes: the text now safe to show, and whether a stop string ended it.
    pub fn push_token(&mut self, bytes: &[u8]) -> StopStep {
        let piece = self.utf8.push(bytes);
        self.stop.push(&piece)
    }

    /// At the end of a generation that no stop string ended: the text still held back.
    pub fn finish(&mut self) -> String {
        let tail = self.utf8.finish();
        let step = self.stop.push(&tail);
        if step.stopped {
            step.emit
        } else {
            step.emit + &self.stop.finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_tokens() {
        let mut u = Utf8Stream::default();
        let bytes = "é🙂".as_bytes();
        assert_eq!(u.push(&bytes[..1]), "");
        assert_eq!(u.push(&bytes[1..3]), "é");
        assert_eq!(u.push(&bytes[3..]), "🙂");
        assert_eq!(u.push(&[0xff, b'a']), "\u{fffd}a");
        assert_eq!(u.push(&[0xe2]), "");
        assert_eq!(u.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_across_pieces_is_held_then_cut() {
        let mut m = StopMatcher::new(&["\nUser:".to_string()]);
        assert_eq!(
            m.push("Hello"),
            StopStep {
                emit: "Hello".into(),
                stopped: false
            }
        );
        assert_eq!(
            m.push(" there\nUs"),
            StopStep {
                emit: " there".into(),
                stopped: false
            }
        );
        assert_eq!(
            m.push("er: hi"),
            StopStep {
                emit: "".into(),
                stopped: true
            }
        );
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(&["STOP".to_string()]);
        assert_eq!(m.push("ST").emit, "");
        assert_eq!(m.push("ART").emit, "START");
        assert_eq!(m.push("ST").emit, "");
        assert_eq!(m.finish(), "ST");
    }
}
