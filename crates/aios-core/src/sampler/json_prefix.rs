//! "Valid JSON so far": an incremental JSON syntax checker over bytes, the
//! state behind the `ValidJson` text energy (`constraints.rs`). It accepts
//! exactly the prefixes of RFC 8259 JSON texts (one value, optional
//! whitespace around it); `complete` says whether what was fed is a whole
//! value.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Sign,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

impl Num {
    /// Whether the number may end here.
    fn can_end(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }

    fn next(self, b: u8) -> Option<Num> {
        Some(match (self, b) {
            (Num::Sign, b'0') => Num::Zero,
            (Num::Sign, b'1'..=b'9') => Num::Int,
            (Num::Int, b'0'..=b'9') => Num::Int,
            (Num::Zero | Num::Int, b'.') => Num::Dot,
            (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::Exp,
            (Num::Exp, b'+' | b'-') => Num::ExpSign,
            (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Num::ExpDigits,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// A value must come (start of text, after ':' or ',' in an array, after '[').
    Value,
    /// After '[': a value or ']'.
    ArrayStart,
    /// After '{': a key or '}'.
    ObjectStart,
    /// After ',' in an object: a key.
    Key,
    /// After a key: ':'.
    Colon,
    /// After a value: ',' or the closing bracket (or the end at top level).
    After,
    /// Inside a string; `key` if it is an object key.
    Str {
        key: bool,
        escape: bool,
        hex: u8,
    },
    Number(Num),
    /// Inside `true` / `false` / `null`: the literal and how much of it is read.
    Literal(&'static [u8], usize),
}

/// Incremental JSON checker.
#[derive(Clone, Debug)]
pub struct JsonPrefix {
    stack: Vec<u8>,
    mode: Mode,
    /// A whole top-level value has been read.
    done: bool,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        JsonPrefix { stack: vec![], mode: Mode::Value, done: false }
    }
}

impl JsonPrefix {
    /// Feeds `bytes`; false (and the state is undefined) when they cannot continue a JSON text.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.byte(b))
    }

    /// Whether what was fed is one whole JSON value (plus whitespace).
    pub fn complete(&self) -> bool {
        self.done || (self.stack.is_empty() && matches!(self.mode, Mode::Number(n) if n.can_end()))
    }

    fn value_ended(&mut self) {
        self.mode = Mode::After;
        if self.stack.is_empty() {
            self.done = true;
        }
    }

    fn start_value(&mut self, b: u8) -> bool {
        self.mode = match b {
            b'{' => {
                self.stack.push(b'{');
                Mode::ObjectStart
            }
            b'[' => {
                self.stack.push(b'[');
                Mode::ArrayStart
            }
            b'"' => Mode::Str { key: false, escape: false, hex: 0 },
            b'-' => Mode::Number(Num::Sign),
            b'0' => Mode::Number(Num::Zero),
            b'1'..=b'9' => Mode::Number(Num::Int),
            b't' => Mode::Literal(b"true", 1),
            b'f' => Mode::Literal(b"false", 1),
            b'n' => Mode::Literal(b"null", 1),
            _ => return false,
        };
        true
    }

    fn close(&mut self, b: u8) -> bool {
        let want = if b == b'}' { b'{' } else { b'[' };
        if self.stack.pop() != Some(want) {
            return false;
        }
        self.value_ended();
        true
    }

    fn byte(&mut self, b: u8) -> bool {
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        match self.mode {
            Mode::Str { key, escape, hex } => {
                self.mode = if hex > 0 {
                    if !b.is_ascii_hexdigit() {
                        return false;
                    }
                    Mode::Str { key, escape: false, hex: hex - 1 }
                } else if escape {
                    match b {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                            Mode::Str { key, escape: false, hex: 0 }
                        }
                        b'u' => Mode::Str { key, escape: false, hex: 4 },
                        _ => return false,
                    }
                } else if b == b'\\' {
                    Mode::Str { key, escape: true, hex: 0 }
                } else if b == b'"' {
                    if key {
                        Mode::Colon
                    } else {
                        self.value_ended();
                        return true;
                    }
                } else if b < 0x20 {
                    return false;
                } else {
                    Mode::Str { key, escape: false, hex: 0 }
                };
                true
            }
            Mode::Number(n) => match n.next(b) {
                Some(m) => {
                    self.mode = Mode::Number(m);
                    true
                }
                None if n.can_end() => {
                    self.value_ended();
                    self.byte(b)
                }
                None => false,
            },
            Mode::Literal(lit, i) => {
                if lit[i] != b {
                    return false;
                }
                if i + 1 == lit.len() {
                    self.value_ended();
                } else {
                    self.mode = Mode::Literal(lit, i + 1);
                }
                true
            }
            _ if ws => true,
            Mode::Value => !self.done && self.start_value(b),
            Mode::ArrayStart => b == b']' && self.close(b) || b != b']' && self.start_value(b),
            Mode::ObjectStart | Mode::Key => {
                if b == b'}' && self.mode == Mode::ObjectStart {
                    return self.close(b);
                }
                if b != b'"' {
                    return false;
                }
                self.mode = Mode::Str { key: true, escape: false, hex: 0 };
                true
            }
            Mode::Colon => {
                if b != b':' {
                    return false;
                }
                self.mode = Mode::Value;
                true
            }
            Mode::After => match (b, self.stack.last()) {
                (b',', Some(b'{')) => {
                    self.mode = Mode::Key;
                    true
                }
                (b',', Some(b'[')) => {
                    self.mode = Mode::Value;
                    true
                }
                (b'}' | b']', Some(_)) => self.close(b),
                _ => false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::JsonPrefix;

    fn prefix_ok(s: &str) -> bool {
        JsonPrefix::default().feed(s.as_bytes())
    }

    fn complete(s: &str) -> bool {
        let mut j = JsonPrefix::default();
        j.feed(s.as_bytes()) && j.complete()
    }

    #[test]
    fn accepts_prefixes_of_json_and_only_those() {
        let whole = r#"{"name": "Anna \"A\" \u00e9", "age": 31, "tags": [1, -2.5e+3, true, null, {}], "x": []}"#;
        for i in 0..=whole.len() {
            assert!(prefix_ok(&whole[..i]), "prefix {:?}", &whole[..i]);
        }
        assert!(complete(whole) && complete("  3 ") && complete("-0.5") && complete("\"s\"") && complete("[]"));
        assert!(!complete(r#"{"a": 1"#) && !complete("-") && !complete("1."));
        for bad in [
            r#"{"a" 1}"#,
            r#"{"a": 1,}"#,
            r#"{1: 2}"#,
            r#"{"a": 444"}"#,
            "[1 2]",
            "01",
            "tru3",
            "{}}",
            "{]",
            "\"a\\x\"",
            "1 2",
            "{} {",
            "[1,]",
        ] {
            assert!(!prefix_ok(bad), "{bad:?} must be refused");
        }
    }
}
