//! Bounded JSON numbers: a JSON-mode answer must parse in the strict parsers people use
//! (serde_json, Python's `json` into finite floats, Go's `encoding/json` into float64). A JSON
//! schema (and llguidance's grammar for it) lets a number have any count of digits and any
//! exponent, so a sampled answer can hold `39361.57651e757432894347365196`, which serde_json
//! refuses ("number out of range") and Python reads as `inf`.
//!
//! The bound is applied on top of the grammar's mask: a small lexer follows the JSON text
//! written so far, and a token that would give a number more than [`MAX_INT_DIGITS`] integer
//! digits, [`MAX_FRAC_DIGITS`] fraction digits or [`MAX_EXP_DIGITS`] exponent digits is taken
//! out of the mask. So every number is at most ~10^114 in magnitude: finite in an f64. When
//! the grammar allows nothing else (a schema that itself asks for a longer number, such as an
//! integer with `minimum: 1e17`), the grammar wins.
//!
//! Only tokens that hold an ASCII digit can lengthen a number, so only those are checked:
//! a few percent of a vocabulary.

/// Most digits before the decimal point (integers up to 10^15 - 1 are exact in an f64).
pub const MAX_INT_DIGITS: u8 = 15;
/// Most digits after the decimal point.
pub const MAX_FRAC_DIGITS: u8 = 15;
/// Most exponent digits (|exponent| <= 99).
pub const MAX_EXP_DIGITS: u8 = 2;

/// Where the text written so far ends, as far as numbers are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lex {
    /// Between values (or in text around the JSON).
    #[default]
    Outside,
    /// Inside a string.
    Str,
    /// Right after a backslash in a string.
    Escape,
    /// Inside a number: which part, and how many digits that part has.
    Num(Part, u8),
}

/// A part of a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Before the decimal point.
    Int,
    /// After it.
    Frac,
    /// After `e` / `E`.
    Exp,
}

impl Part {
    fn max(self) -> u8 {
        match self {
            Part::Int => MAX_INT_DIGITS,
            Part::Frac => MAX_FRAC_DIGITS,
            Part::Exp => MAX_EXP_DIGITS,
        }
    }
}

impl Lex {
    /// The state after `byte`, or None when `byte` makes a number longer than the bound.
    pub fn step(self, byte: u8) -> Option<Lex> {
        Some(match self {
            Lex::Str => match byte {
                b'\\' => Lex::Escape,
                b'"' => Lex::Outside,
                _ => Lex::Str,
            },
            Lex::Escape => Lex::Str,
            Lex::Num(part, n) => match byte {
                b'0'..=b'9' if n >= part.max() => return None,
                b'0'..=b'9' => Lex::Num(part, n + 1),
                b'.' if part == Part::Int => Lex::Num(Part::Frac, 0),
                b'e' | b'E' if part != Part::Exp => Lex::Num(Part::Exp, 0),
                b'+' | b'-' if part == Part::Exp && n == 0 => self,
                _ => Lex::Outside.step(byte)?,
            },
            Lex::Outside => match byte {
                b'"' => Lex::Str,
                b'-' => Lex::Num(Part::Int, 0),
                b'0'..=b'9' => Lex::Num(Part::Int, 1),
                _ => Lex::Outside,
            },
        })
    }

    /// The state after `bytes`, or None when they break the bound.
    pub fn run(self, bytes: &[u8]) -> Option<Lex> {
        bytes.iter().try_fold(self, |s, &b| s.step(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> bool {
        Lex::Outside.run(text.as_bytes()).is_some()
    }

    #[test]
    fn numbers_are_bounded_strings_are_not() {
        assert!(ok(
            r#"{"a": -123456789012345.123456789012345e-99, "b": [1, 2.5E+10]}"#
        ));
        assert!(!ok("1234567890123456"));
        assert!(!ok("0.1234567890123456"));
        assert!(!ok("39361.57651e757"));
        assert!(!ok(r#"{"a": 1e100}"#));
        // Digits in strings, escaped quotes included, are text.
        assert!(ok(
            r#"{"12345678901234567890": "\"12345678901234567890e999"}"#
        ));
        // A number ends at any other byte; the next one starts afresh.
        assert!(ok("[123456789012345,123456789012345]"));
        // Parsed as f64 at the bound: finite.
        let widest = "-999999999999999.999999999999999e99";
        assert!(ok(widest));
        let v: f64 = serde_json::from_str(widest).unwrap();
        assert!(v.is_finite());
    }
}
