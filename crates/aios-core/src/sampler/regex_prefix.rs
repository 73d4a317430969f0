//! "Matches the pattern so far": the state behind the `Regex` text energy
//! (`constraints.rs`). The pattern is compiled once into a dense DFA
//! (regex-automata) that is anchored at the start and reports every match
//! (`MatchKind::All`); the end-of-input transition says whether the bytes
//! fed are a whole match. The DFA reports matches one byte late, so its
//! dead state can come a byte after the text stopped being viable; instead
//! the states from which a whole match is still reachable ("live") are
//! found once, by a backward search over the transition graph, and a prefix
//! is viable exactly when its state is live. This is the
//! token-mask construction of guided decoding (Willard & Louf 2023,
//! arXiv:2307.09702, as in outlines), applied one canvas position at a time.

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};
use std::collections::{HashMap, HashSet};

use crate::error::Result;

/// Upper bound on the compiled automaton (and on the work to build it): a
/// pattern that needs more is refused rather than eating the device's memory.
pub const MAX_DFA_BYTES: usize = 8 << 20;

/// A compiled pattern; compare by pattern text.
#[derive(Debug)]
pub struct RegexPrefix {
    pattern: String,
    dfa: dense::DFA<Vec<u32>>,
    start: StateID,
    /// States from which some continuation reaches a whole match.
    live: HashSet<StateID>,
}

impl PartialEq for RegexPrefix {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }
}

impl RegexPrefix {
    /// Compiles `pattern` (Rust `regex` syntax, matched against the whole text).
    pub fn new(pattern: &str) -> Result<Self> {
        let config = dense::Config::new()
            .match_kind(MatchKind::All)
            .start_kind(StartKind::Anchored)
            .dfa_size_limit(Some(MAX_DFA_BYTES))
            .determinize_size_limit(Some(MAX_DFA_BYTES));
        let dfa = match dense::Builder::new().configure(config).build(pattern) {
            Ok(d) => d,
            Err(e) => return crate::input_err!("regex {pattern:?} cannot be used: {e}"),
        };
        let start = match dfa.start_state(&start::Config::new().anchored(Anchored::Yes)) {
            Ok(s) => s,
            Err(e) => return crate::input_err!("regex {pattern:?} has no start state: {e}"),
        };
        let live = live_states(&dfa, start);
        if !live.contains(&start) {
            return crate::input_err!("regex {pattern:?} matches nothing");
        }
        Ok(RegexPrefix { pattern: pattern.to_string(), dfa, start, live })
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The state before any byte.
    pub fn start(&self) -> StateID {
        self.start
    }

    /// Feeds `bytes` from `state`; false when no continuation can match.
    pub fn feed(&self, state: &mut StateID, bytes: &[u8]) -> bool {
        for &b in bytes {
            *state = self.dfa.next_state(*state, b);
            if !self.live.contains(state) {
                return false;
            }
        }
        true
    }

    /// Whether the bytes that led to `state` are a whole match.
    pub fn complete(&self, state: StateID) -> bool {
        self.dfa.is_match_state(self.dfa.next_eoi_state(state))
    }
}

/// The states reachable from `start` from which a whole match is reachable.
/// Quit states (look-around the DFA cannot decide, e.g. a Unicode `\b` on
/// non-ASCII bytes) lead nowhere: the energy never promises a match there.
fn live_states(dfa: &dense::DFA<Vec<u32>>, start: StateID) -> HashSet<StateID> {
    let mut preds: HashMap<StateID, Vec<StateID>> = HashMap::new();
    let (mut seen, mut todo, mut accepting) = (HashSet::from([start]), vec![start], vec![]);
    while let Some(s) = todo.pop() {
        if dfa.is_match_state(dfa.next_eoi_state(s)) {
            accepting.push(s);
        }
        for b in 0..=255u8 {
            let n = dfa.next_state(s, b);
            if dfa.is_dead_state(n) || dfa.is_quit_state(n) {
                continue;
            }
            preds.entry(n).or_default().push(s);
            if seen.insert(n) {
                todo.push(n);
            }
        }
    }
    let mut live: HashSet<StateID> = accepting.iter().copied().collect();
    while let Some(s) = accepting.pop() {
        for &p in preds.get(&s).map_or(&[][..], Vec::as_slice) {
            if live.insert(p) {
                accepting.push(p);
            }
        }
    }
    live
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(r: &RegexPrefix, text: &str) -> Option<bool> {
        let mut s = r.start();
        r.feed(&mut s, text.as_bytes()).then(|| r.complete(s))
    }

    #[test]
    fn prefixes_and_whole_matches() {
        let r = RegexPrefix::new(r"[a-z]+@[a-z]+\.com").unwrap();
        assert_eq!(run(&r, ""), Some(false));
        assert_eq!(run(&r, "ann@"), Some(false));
        assert_eq!(run(&r, "ann@mail.com"), Some(true));
        assert_eq!(run(&r, "ann@mail.comx"), None);
        assert_eq!(run(&r, "Ann"), None, "anchored at the start");
        // Leftmost-first would stop at the first alternative; All keeps every continuation alive.
        let r = RegexPrefix::new("a|ab").unwrap();
        assert_eq!(run(&r, "ab"), Some(true));
        // Non-ASCII: the DFA runs on UTF-8 bytes; a split character is a live prefix.
        let r = RegexPrefix::new("caf[éè]").unwrap();
        let bytes = "café".as_bytes();
        let mut s = r.start();
        assert!(r.feed(&mut s, &bytes[..4]) && !r.complete(s));
        assert!(r.feed(&mut s, &bytes[4..]) && r.complete(s));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["(", "a{5000}{5000}", "[z-a]"] {
            assert!(RegexPrefix::new(bad).is_err(), "{bad}");
        }
        assert!(RegexPrefix::new(r"[^\x00-\x{10FFFF}]").is_err(), "matches nothing");
        // Over the size limit: refused with the reason, not built.
        let e = RegexPrefix::new(r"\w{1000}").unwrap_err().to_string();
        assert!(e.contains("cannot be used"), "{e}");
    }
}
