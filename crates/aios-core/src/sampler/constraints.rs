//! Energy-based constraints on text: the discrete analogue of the design's
//! `score - eta * grad E`. A masked-diffusion step scores every masked
//! position with logits; a constraint adds `-eta * E_i(v)` to the logit of
//! token `v` at position `i`, where `E_i` is the energy the canvas would
//! gain by committing `v` there given what is already committed.
//!
//! - [`Kind::Banned`]: energy 1 for a token that would complete a spelling
//!   of a banned word (all its other tokens already committed in place; for
//!   a one-token spelling, always). With a large `eta` the word cannot be
//!   completed one token at a time; it can still appear when two of its
//!   tokens commit in the same step, so the result reports whether the
//!   constraint held (`met`) rather than promising it.
//! - [`Kind::Required`]: while no spelling of the word is on the canvas,
//!   energy `-(1 + matched) / len * (1 + ln(positions / masked))` for the
//!   token a spelling needs at a position whose window has no conflicting
//!   committed token (`matched` = how many of the spelling's other tokens are
//!   already in place): the word's first tokens are favoured everywhere, more
//!   as the masked positions (the chances left) run out, and once one is
//!   committed its continuation is favoured strongly. Best effort, reported
//!   in `met`.
//!
//! - [`Kind::ValidJson`]: "valid JSON so far". The text from its start
//!   must stay a prefix of a JSON text ([`JsonPrefix`]): a token that cannot
//!   continue the committed text, or an end token before the value is
//!   whole, gets energy 1, and after an end token only end tokens fit. A
//!   grammar can judge a token only once everything left of it is
//!   committed, so while one is active the sampler commits left to right
//!   ([`commit_left_to_right`]: each step's tokens at the leftmost masked
//!   positions, each steered given the ones before it). Reported in `met`:
//!   the text is one whole JSON value.
//! - [`Kind::Regex`]: "matches the pattern so far", the same rule with a
//!   regular expression ([`RegexPrefix`], a DFA) in place of the JSON
//!   grammar: the text from the same start must stay a prefix of a whole
//!   match, and `met` says it is one.
//!
//! Spellings are token sequences (the engine encodes each word with and
//! without a leading space); several constraints combine by adding energies.

use std::sync::Arc;

use regex_automata::util::primitives::StateID;

use super::json_prefix::JsonPrefix;
use super::regex_prefix::RegexPrefix;
use crate::error::Result;

/// Energy weight when none is given: strong enough that a banned word's
/// completing token drops by e^8 ~ 3000x in probability.
pub const DEFAULT_WEIGHT: f64 = 8.0;

/// Energy weight of the grammars (ValidJson, Regex) when none is given: a
/// structure is wanted whole, and the tokens it needs (an end token above
/// all) can be ones the model finds e^10 less likely than its favourite, so
/// a token that breaks it drops by e^30 ~ 1e13 (a mask in all but name).
pub const GRAMMAR_WEIGHT: f64 = 30.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Banned,
    Required,
    ValidJson,
    Regex,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Banned => "banned",
            Kind::Required => "required",
            Kind::ValidJson => "valid_json",
            Kind::Regex => "regex",
        }
    }

    /// Whether the constraint reads the canvas as text from a start position
    /// (a grammar) rather than matching token spellings of words.
    pub fn reads_text(self) -> bool {
        matches!(self, Kind::ValidJson | Kind::Regex)
    }
}

/// One constraint: words, how they are spelled in tokens, and `eta`.
#[derive(Clone, Debug, PartialEq)]
pub struct Constraint {
    pub kind: Kind,
    pub words: Vec<String>,
    /// Token sequences spelling the words (filled by the engine from
    /// `words`; token-level callers fill them directly).
    pub spellings: Vec<Vec<u32>>,
    /// `eta`: logits move by `weight` per unit of energy.
    pub weight: f64,
    /// ValidJson / Regex: where the text starts and what each token spells
    /// (filled by the engine from its tokenizer).
    pub text: Option<Arc<TextTokens>>,
    /// Regex: the compiled pattern (`words` holds its source).
    pub regex: Option<Arc<RegexPrefix>>,
}

/// What a ValidJson or Regex constraint needs to read a canvas as text.
#[derive(Debug, PartialEq)]
pub struct TextTokens {
    /// Canvas position where the text starts.
    pub start: usize,
    /// The bytes of each token id (empty for special tokens).
    pub bytes: Vec<Vec<u8>>,
    /// Tokens that end the text (EOS, PAD): allowed once the value is whole.
    pub stop: Vec<u32>,
}

/// A grammar's checker state: JSON's pushdown state or a DFA state.
#[derive(Clone)]
enum Prefix<'a> {
    Json(JsonPrefix),
    Regex(&'a RegexPrefix, StateID),
}

impl Prefix<'_> {
    fn feed(&mut self, bytes: &[u8]) -> bool {
        match self {
            Prefix::Json(j) => j.feed(bytes),
            Prefix::Regex(r, s) => r.feed(s, bytes),
        }
    }

    fn complete(&self) -> bool {
        match self {
            Prefix::Json(j) => j.complete(),
            Prefix::Regex(r, s) => r.complete(*s),
        }
    }
}

impl TextTokens {
    /// How `grammar` reads the committed tokens `tokens[start..end]`.
    fn read_to<'a>(&self, grammar: Prefix<'a>, tokens: &[u32], end: usize) -> Reading<'a> {
        let mut reading = Reading::Live(grammar);
        for &t in &tokens[self.start.min(end)..end] {
            read(self, &mut reading, t);
        }
        reading
    }
}

impl Constraint {
    pub fn new(kind: Kind, words: Vec<String>, weight: f64) -> Self {
        Constraint { kind, words, spellings: vec![], weight, text: None, regex: None }
    }

    /// A Regex constraint on a compiled pattern.
    pub fn regex(pattern: Arc<RegexPrefix>, weight: f64) -> Self {
        Constraint {
            regex: Some(pattern.clone()),
            ..Constraint::new(Kind::Regex, vec![pattern.pattern().into()], weight)
        }
    }

    /// The grammar's state before any text (None for word constraints).
    fn grammar(&self) -> Option<Prefix<'_>> {
        match (self.kind, &self.regex) {
            (Kind::ValidJson, _) => Some(Prefix::Json(JsonPrefix::default())),
            (Kind::Regex, Some(r)) => Some(Prefix::Regex(r, r.start())),
            _ => None,
        }
    }
}

/// How one constraint fared in a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub kind: Kind,
    pub words: Vec<String>,
    pub met: bool,
}

/// Checks one set of constraints: weights finite and >= 0, words given, no
/// word (or, once spelled, spelling) both banned and required (unsatisfiable).
pub fn validate(constraints: &[Constraint]) -> Result<()> {
    for c in constraints {
        if !(c.weight.is_finite() && c.weight >= 0.0) {
            return crate::input_err!("constraint weight (eta) must be finite and >= 0, got {}", c.weight);
        }
        if c.kind == Kind::ValidJson {
            if !c.words.is_empty() {
                return crate::input_err!("a valid_json constraint takes no words");
            }
            continue;
        }
        if c.kind == Kind::Regex {
            match &c.regex {
                Some(r) if c.words.len() == 1 && c.words[0] == r.pattern() => continue,
                _ => return crate::input_err!("a regex constraint needs its compiled pattern (Constraint::regex)"),
            }
        }
        if c.words.is_empty() || c.words.iter().any(|w| w.trim().is_empty()) {
            return crate::input_err!("a {} constraint needs non-empty words", c.kind.name());
        }
    }
    for b in constraints.iter().filter(|c| c.kind == Kind::Banned) {
        for r in constraints.iter().filter(|c| c.kind == Kind::Required) {
            if let Some(w) = r.words.iter().find(|w| b.words.contains(w)) {
                return crate::input_err!("unsatisfiable constraints: {w:?} is both banned and required");
            }
            if let Some(s) = r.spellings.iter().find(|s| b.spellings.contains(s)) {
                return crate::input_err!(
                    "unsatisfiable constraints: the banned words {:?} and the required words {:?} share the spelling {s:?}",
                    b.words,
                    r.words
                );
            }
        }
    }
    Ok(())
}

/// Checks that every constraint has token spellings (the sampler works on
/// tokens; text generation fills them from the words).
pub fn check_spelled(constraints: &[Constraint]) -> Result<()> {
    if let Some(c) = constraints.iter().find(|c| c.kind.reads_text() && c.text.is_none()) {
        return crate::input_err!("a {} constraint needs the token texts (text generation fills them)", c.kind.name());
    }
    let words = constraints.iter().filter(|c| !c.kind.reads_text());
    match words.into_iter().find(|c| c.spellings.is_empty() || c.spellings.iter().any(Vec::is_empty)) {
        Some(c) => crate::input_err!(
            "the {} words {:?} have no token spelling (text generation fills them from the words)",
            c.kind.name(),
            c.words
        ),
        None => Ok(()),
    }
}

/// Whether `s` occurs at `start` in `tokens`.
fn occurs_at(tokens: &[u32], s: &[u32], start: usize) -> bool {
    start + s.len() <= tokens.len() && tokens[start..start + s.len()] == *s
}

fn occurs(tokens: &[u32], s: &[u32]) -> bool {
    (0..tokens.len()).any(|i| occurs_at(tokens, s, i))
}

/// Adds `-eta * E` to `logits` (`[positions.len(), vocab]`, row j = position
/// `positions[j]`) for the canvas `tokens` (`mask` = not yet committed).
pub fn apply(
    constraints: &[Constraint],
    tokens: &[u32],
    mask: u32,
    positions: &[usize],
    logits: &mut [f32],
    vocab: usize,
) {
    let masked = tokens.iter().filter(|&&t| t == mask).count().max(1);
    let urgency = 1.0 + (tokens.len() as f32 / masked as f32).ln();
    for c in constraints {
        let w = c.weight as f32;
        if w == 0.0 {
            continue;
        }
        if c.kind == Kind::Required && c.spellings.iter().any(|s| occurs(tokens, s)) {
            continue; // already met: no energy left to lower
        }
        if c.kind.reads_text() {
            continue; // grammars steer while committing: `commit_left_to_right`
        }
        for s in &c.spellings {
            let m = s.len();
            for (j, &i) in positions.iter().enumerate() {
                let row = &mut logits[j * vocab..(j + 1) * vocab];
                // Offsets k at which position i could hold s[k].
                for k in 0..m {
                    let Some(start) = i.checked_sub(k) else { break };
                    if start + m > tokens.len() || (s[k] as usize) >= vocab {
                        continue;
                    }
                    let (mut matched, mut conflict, mut open) = (0usize, false, 0usize);
                    for (q, &want) in s.iter().enumerate().filter(|&(q, _)| q != k) {
                        let have = tokens[start + q];
                        if have == want {
                            matched += 1;
                        } else if have == mask {
                            open += 1;
                        } else {
                            conflict = true;
                        }
                    }
                    match c.kind {
                        Kind::Banned if !conflict && open == 0 => row[s[k] as usize] -= w,
                        Kind::Required if !conflict => {
                            row[s[k] as usize] += w * urgency * (1 + matched) as f32 / m as f32
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Whether any grammar constraint (ValidJson, Regex) is active: then the
/// sampler commits left to right through [`commit_left_to_right`].
pub fn has_grammar(constraints: &[Constraint]) -> bool {
    constraints.iter().any(|c| c.kind.reads_text() && c.weight > 0.0)
}

/// Where one grammar stands while a step commits.
enum Reading<'a> {
    /// The text so far is a prefix of the grammar, in this state.
    Live(Prefix<'a>),
    /// A stop token ended a whole value: only stop tokens may follow.
    Ended,
    /// The text already broke the grammar (e.g. the prompt does): nothing to steer.
    Broken,
}

/// A step's commits under grammar constraints. A grammar can only judge a
/// token once everything left of it is committed, so the step commits its
/// `k` tokens (the count the strategy chose) at the leftmost masked
/// positions, `eligible[..k]`, in order: each row of `logits` (row j =
/// position `eligible[j]`) gets energy 1 per grammar for every token that
/// cannot continue the text committed before it (this step's tokens
/// included) and for a stop token before the text is whole, and then
/// `draw(position, row)` picks the token (and what the caller keeps of it). After a stop token only stop
/// tokens fit, so the rest of the canvas is end padding.
pub fn commit_left_to_right<T>(
    constraints: &[Constraint],
    tokens: &[u32],
    eligible: &[usize],
    logits: &[f32],
    vocab: usize,
    k: usize,
    mut draw: impl FnMut(usize, &[f32]) -> Result<(u32, T)>,
) -> Result<Vec<(usize, T)>> {
    let Some(&first) = eligible.first() else { return Ok(vec![]) };
    let mut readings: Vec<(f32, &TextTokens, Reading)> = constraints
        .iter()
        .filter(|c| c.weight > 0.0)
        .filter_map(|c| Some((c.weight as f32, c.text.as_deref()?, c.grammar()?)))
        .map(|(w, spec, grammar)| (w, spec, spec.read_to(grammar, tokens, first)))
        .collect();
    let mut out = Vec::with_capacity(k);
    let mut fed = first; // every reading has read the canvas up to here
    let mut canvas = tokens.to_vec();
    for (j, &i) in eligible.iter().enumerate().take(k) {
        // Tokens between the previous position and this one are committed (not eligible).
        for (_, spec, r) in readings.iter_mut() {
            for &t in &canvas[fed..i] {
                read(spec, r, t);
            }
        }
        let mut row = logits[j * vocab..(j + 1) * vocab].to_vec();
        for (w, spec, r) in &readings {
            for (v, l) in row.iter_mut().enumerate() {
                let stop = spec.stop.contains(&(v as u32));
                let ok = match r {
                    Reading::Broken => true,
                    Reading::Ended => stop,
                    Reading::Live(st) if stop => st.complete(),
                    Reading::Live(st) => {
                        let b = spec.bytes.get(v).map_or(&[][..], Vec::as_slice);
                        !b.is_empty() && st.clone().feed(b)
                    }
                };
                if !ok {
                    *l -= w;
                }
            }
        }
        let (token, picked) = draw(i, &row)?;
        canvas[i] = token;
        for (_, spec, r) in readings.iter_mut() {
            read(spec, r, canvas[i]);
        }
        fed = i + 1;
        out.push((i, picked));
    }
    Ok(out)
}

/// Advances a reading by one committed token.
fn read(spec: &TextTokens, r: &mut Reading<'_>, t: u32) {
    let stop = spec.stop.contains(&t);
    *r = match std::mem::replace(r, Reading::Broken) {
        Reading::Live(st) if stop => {
            if st.complete() {
                Reading::Ended
            } else {
                Reading::Broken
            }
        }
        Reading::Live(mut st) => {
            let b = spec.bytes.get(t as usize).map_or(&[][..], Vec::as_slice);
            if !b.is_empty() && st.feed(b) {
                Reading::Live(st)
            } else {
                Reading::Broken
            }
        }
        Reading::Ended if stop => Reading::Ended,
        _ => Reading::Broken,
    };
}

/// Whether each constraint held on the finished canvas: a banned word
/// appears in no span that includes a generated position; a required word
/// appears somewhere.
pub fn met(constraints: &[Constraint], tokens: &[u32], given: &[bool]) -> Vec<bool> {
    constraints
        .iter()
        .map(|c| match c.kind {
            Kind::Required => c.spellings.iter().any(|s| occurs(tokens, s)),
            Kind::Banned => !c.spellings.iter().any(|s| {
                (0..tokens.len()).any(|i| occurs_at(tokens, s, i) && given[i..i + s.len()].iter().any(|g| !g))
            }),
            Kind::ValidJson | Kind::Regex => match (&c.text, c.grammar()) {
                (Some(spec), Some(grammar)) => {
                    let end =
                        (spec.start..tokens.len()).find(|&i| spec.stop.contains(&tokens[i])).unwrap_or(tokens.len());
                    matches!(spec.read_to(grammar, tokens, end), Reading::Live(st) if st.complete())
                }
                _ => false,
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 0;

    fn c(kind: Kind, spellings: Vec<Vec<u32>>) -> Constraint {
        Constraint { kind, words: vec![format!("{spellings:?}")], spellings, weight: 2.0, text: None, regex: None }
    }

    /// Commits `k` tokens with flat model logits, drawing the best token of
    /// each steered row (lowest id on ties); returns the commits and the rows.
    fn commit(
        cons: &[Constraint],
        tokens: &[u32],
        eligible: &[usize],
        vocab: usize,
        k: usize,
    ) -> (Vec<u32>, Vec<Vec<f32>>) {
        let logits = vec![0f32; eligible.len() * vocab];
        let mut rows = vec![];
        let picked = commit_left_to_right(cons, tokens, eligible, &logits, vocab, k, |_, row| {
            rows.push(row.to_vec());
            let best = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let t = row.iter().position(|&x| x == best).unwrap() as u32;
            Ok((t, t))
        })
        .unwrap();
        assert_eq!(picked.iter().map(|p| p.0).collect::<Vec<_>>(), eligible[..k].to_vec(), "leftmost, in order");
        (picked.into_iter().map(|p| p.1).collect(), rows)
    }

    #[test]
    fn valid_json_commits_left_to_right_and_reports_the_whole() {
        // Tokens: 0 mask, 1 "{", 2 "}", 3 "\"a\"", 4 ":", 5 "1", 6 EOS, 7 "x".
        let bytes: Vec<Vec<u8>> = vec![
            vec![],
            b"{".to_vec(),
            b"}".to_vec(),
            b"\"a\"".to_vec(),
            b":".to_vec(),
            b"1".to_vec(),
            vec![],
            b"x".to_vec(),
        ];
        let spec = Arc::new(TextTokens { start: 1, bytes, stop: vec![6] });
        let j = Constraint {
            kind: Kind::ValidJson,
            words: vec![],
            spellings: vec![],
            weight: 2.0,
            text: Some(spec),
            regex: None,
        };
        assert!(has_grammar(std::slice::from_ref(&j)));
        assert!(!has_grammar(&[Constraint { weight: 0.0, ..j.clone() }]));
        // Canvas [BOS=7 (before start), "{", "\"a\"", M x 5]: position 3 may only be ":".
        let tokens = [7, 1, 3, M, M, M, M, M];
        let (picked, rows) = commit(std::slice::from_ref(&j), &tokens, &[3, 4, 5, 6, 7], 8, 5);
        assert_eq!(rows[0][4], 0.0);
        assert!(rows[0].iter().enumerate().filter(|&(v, _)| v != 4).all(|(_, &x)| x == -2.0));
        // Each later row is steered given the tokens committed before it in the same step (the
        // draw takes the lowest allowed id): ":", "{", "}", "}", then the end, allowed once whole.
        assert_eq!(picked, vec![4, 1, 2, 2, 6], "{{\"a\":{{}}}} then the end");
        // Apply leaves grammars to the commit: its rows are untouched.
        let mut logits = vec![0f32; 8];
        apply(std::slice::from_ref(&j), &tokens, M, &[3], &mut logits, 8);
        assert!(logits.iter().all(|&x| x == 0.0));
        // After an end token, only end tokens fit.
        let (picked, rows) = commit(std::slice::from_ref(&j), &[7, 5, 6, M], &[3], 8, 1);
        assert_eq!((picked[0], rows[0][7]), (6, -2.0));
        assert_eq!(met(std::slice::from_ref(&j), &[7, 1, 3, 4, 5, 2, 6], &[false; 7]), vec![true]);
        assert_eq!(met(std::slice::from_ref(&j), &[7, 1, 3, 4, 5, 6, 6], &[false; 7]), vec![false]);
        assert!(validate(std::slice::from_ref(&j)).is_ok());
        assert!(check_spelled(&[Constraint { text: None, ..j.clone() }]).is_err());
        assert!(validate(&[Constraint { words: vec!["x".into()], ..j }]).is_err());
    }

    #[test]
    fn regex_steers_like_valid_json_with_its_own_grammar() {
        // Tokens: 0 mask, 1 "ab", 2 "c", 3 "x", 4 EOS.
        let bytes: Vec<Vec<u8>> = vec![vec![], b"ab".to_vec(), b"c".to_vec(), b"x".to_vec(), vec![]];
        let spec = Arc::new(TextTokens { start: 1, bytes, stop: vec![4] });
        let re = Arc::new(RegexPrefix::new("(ab)+c").unwrap());
        let r = Constraint { text: Some(spec), ..Constraint::regex(re.clone(), 2.0) };
        assert_eq!(r.words, vec!["(ab)+c".to_string()]);
        // Canvas [BOS=3 (before start), "ab", M, M, M]: "ab" or "c" may follow, "x" and the end may not;
        // after "c" only the end, and after the end only the end.
        let (picked, rows) = commit(std::slice::from_ref(&r), &[3, 1, M, M, M], &[2, 3, 4], 5, 3);
        assert_eq!(&rows[0], &[-2.0, 0.0, 0.0, -2.0, -2.0]);
        assert_eq!(picked, vec![1, 1, 1]);
        let (picked, rows) = commit(std::slice::from_ref(&r), &[3, 1, 2, M, M], &[3, 4], 5, 2);
        assert_eq!(&rows[0], &[-2.0, -2.0, -2.0, -2.0, 0.0]);
        assert_eq!(picked, vec![4, 4]);
        // A prompt that already breaks the pattern: nothing left to steer.
        let (_, rows) = commit(std::slice::from_ref(&r), &[3, 3, M], &[2], 5, 1);
        assert!(rows[0].iter().all(|&x| x == 0.0));
        assert_eq!(met(std::slice::from_ref(&r), &[3, 1, 1, 2, 4, 3], &[false; 6]), vec![true]);
        assert_eq!(met(std::slice::from_ref(&r), &[3, 1, 1, 4, 3, 3], &[false; 6]), vec![false]);
        assert!(validate(std::slice::from_ref(&r)).is_ok());
        assert!(check_spelled(&[Constraint { text: None, ..r.clone() }]).is_err());
        // The words must be the compiled pattern's source.
        assert!(validate(&[Constraint { words: vec!["c".into()], ..r.clone() }]).is_err());
        assert!(validate(&[Constraint { regex: None, ..r }]).is_err());
    }

    #[test]
    fn banned_penalises_only_the_completing_token() {
        let cons = [c(Kind::Banned, vec![vec![5, 6]])];
        // Canvas [5, M, M]: position 1 completing "5 6" is penalised, position 2 is not.
        let tokens = [5, M, M];
        let mut logits = vec![0f32; 2 * 8];
        apply(&cons, &tokens, M, &[1, 2], &mut logits, 8);
        assert_eq!(logits[6], -2.0);
        assert!(logits[8..].iter().all(|&x| x == 0.0));
        assert!(logits[..6].iter().chain(&logits[7..8]).all(|&x| x == 0.0));
        // One-token spellings are always penalised.
        let mut logits = vec![0f32; 8];
        apply(&[c(Kind::Banned, vec![vec![7]])], &[M], M, &[0], &mut logits, 8);
        assert_eq!(logits[7], -2.0);
    }

    #[test]
    fn required_favours_starts_then_completion_and_stops_when_met() {
        let cons = [c(Kind::Required, vec![vec![5, 6]])];
        let mut logits = vec![0f32; 3 * 8];
        apply(&cons, &[M, M, M], M, &[0, 1, 2], &mut logits, 8);
        assert_eq!(logits[5], 1.0); // start anywhere it fits
        assert_eq!(logits[2 * 8 + 5], 0.0); // no room after position 2
        let mut logits = vec![0f32; 2 * 8];
        apply(&cons, &[5, M, M], M, &[1, 2], &mut logits, 8);
        // Completes the started word: (1 + 1) / 2 * 2, times the urgency of 2 masked positions out of 3.
        assert!((logits[6] - 2.0 * (1.0 + 1.5f32.ln())).abs() < 1e-6);
        let mut logits = vec![0f32; 8];
        apply(&cons, &[5, 6, M], M, &[2], &mut logits, 8);
        assert!(logits.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn met_and_validation() {
        let b = c(Kind::Banned, vec![vec![5, 6]]);
        let r = c(Kind::Required, vec![vec![7]]);
        assert_eq!(met(&[b.clone(), r.clone()], &[5, 6, 7], &[false; 3]), vec![false, true]);
        // A banned word inside the given prompt is not the generation's doing.
        assert_eq!(met(std::slice::from_ref(&b), &[5, 6, 1], &[true, true, false]), vec![true]);
        assert!(validate(&[b.clone(), r.clone()]).is_ok());
        let clash = c(Kind::Required, vec![vec![5, 6]]);
        assert!(validate(&[b.clone(), clash]).unwrap_err().to_string().contains("unsatisfiable"));
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            assert!(validate(&[Constraint { weight: bad, ..b.clone() }]).is_err());
        }
        assert!(check_spelled(&[Constraint { spellings: vec![], ..b.clone() }]).is_err());
        assert!(check_spelled(&[b.clone(), r.clone()]).is_ok());
        assert!(validate(&[Constraint { words: vec![], ..b }]).is_err());
    }
}
