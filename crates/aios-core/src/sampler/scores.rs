//! Per-position statistics of one logit row under SUBS parameterisation
//! (the mask token can never be predicted).

use super::rng::Stream;
use crate::kernels::{exp_f32, lanes8, max_and_nan, sum_f64, tree8};

/// What a sampler needs to know about one masked position at one step.
#[derive(Clone, Copy, Debug)]
pub struct PositionScore {
    /// Sampled (or argmax at temperature 0) token.
    pub token: u32,
    /// Probability of `token` under the model (temperature 1).
    pub prob: f32,
    /// Entropy of the model's distribution, nats.
    pub entropy: f32,
    /// Top-1 minus top-2 probability.
    pub margin: f32,
    /// The most probable token (the model's current prediction, whatever was drawn).
    pub top: u32,
}

/// Scores one row of logits. Returns `None` if the row has no finite logit
/// (a broken model), which the caller reports as an error.
///
/// This runs for every masked position at every step (64 x 4096 entries per
/// step on the tiny model), so every pass is written to vectorise: the
/// exponentials are f32 (relative error 2e-7, below the f32 statistics we
/// return) and every sum is accumulated in f64 in a fixed order.
///
/// At `temperature` > 0 the token is drawn from softmax(logits / T); with
/// `top_p` < 1 only from its nucleus, the most probable tokens holding at
/// least `top_p` of the (tempered) mass (Holtzman et al. 2020; temperature
/// first, as Hugging Face's warpers do). `prob` stays the untempered model
/// probability of the drawn token.
pub fn score_row(row: &[f32], mask_id: u32, temperature: f64, top_p: f64, rng: &mut Stream) -> Option<PositionScore> {
    let mask = mask_id as usize;
    // Logits with the mask at -inf: it can never be predicted.
    let mut d = row.to_vec();
    if let Some(m) = d.get_mut(mask) {
        *m = f32::NEG_INFINITY;
    }
    let (max, nan) = max_and_nan(&d);
    if nan || !max.is_finite() {
        return None;
    }
    // One pass: d <- d - max (<= 0), e = exp(d) (exp_f32 clamps at -87, so
    // -inf maps to 0 explicitly), Z = Σ e and Σ e d in f64 lanes. Entropy =
    // -Σ p (d - ln Z) = ln Z - Σ e d / Z, with 0 * (-inf) taken as 0.
    // (Separate simple passes: the compiler vectorises each; fused, it did not.)
    let exp0 = |v: f32| {
        let e = exp_f32(v); // computed unconditionally, then selected: vectorises
        if v == f32::NEG_INFINITY {
            0.0
        } else {
            e
        }
    };
    d.iter_mut().for_each(|v| *v -= max);
    let exps: Vec<f32> = d.iter().map(|&v| exp0(v)).collect();
    let z = lanes8(&exps, &d, |e, _| e as f64);
    let ed = lanes8(&exps, &d, |e, v| {
        let p = e as f64 * v as f64;
        if e > 0.0 {
            p
        } else {
            0.0
        }
    });
    let (sum, e_d) = (tree8(z), tree8(ed));
    let entropy = sum.ln() - e_d / sum;
    // Top two by logit (exp is monotone): the first maximum, then the first
    // maximum of the rest (a tie gives a margin of 0).
    let i1 = first_index_of(&d, 0.0).expect("the maximum is in the row");
    let keep = std::mem::replace(&mut d[i1], f32::NEG_INFINITY);
    let (second, _) = max_and_nan(&d);
    // None: a single valid entry, or every other one has probability 0.
    let i2 = if second.is_finite() { first_index_of(&d, second) } else { None };
    d[i1] = keep;
    let prob_of = |i: Option<usize>| i.map_or(0.0, |i| exps[i] as f64 / sum);
    let best = if temperature > 0.0 {
        // One uniform per row, inverted through the cumulative distribution
        // of softmax(logits / T): the same distribution as Gumbel-max, but
        // without two logarithms per vocabulary entry (which were two thirds
        // of a temperature-1 generation's time).
        let u = rng.uniform();
        let tempered;
        let (weights, total) = if temperature == 1.0 {
            (&exps, sum)
        } else {
            let t = temperature as f32;
            tempered = d.iter().map(|&v| exp0(v / t)).collect::<Vec<f32>>();
            (&tempered, sum_f64(&tempered))
        };
        if top_p < 1.0 {
            // The largest weight is exp(0) = 1 at any temperature.
            let cut = nucleus_threshold(weights, 1.0, top_p * total);
            let nucleus: Vec<f32> = weights.iter().map(|&w| if w >= cut { w } else { 0.0 }).collect();
            sample_index(&nucleus, u * sum_f64(&nucleus))
        } else {
            sample_index(weights, u * total)
        }
    } else {
        i1
    };
    let (p1, p2) = (prob_of(Some(i1)), prob_of(i2));
    Some(PositionScore {
        token: best as u32,
        prob: (exps[best] as f64 / sum) as f32,
        entropy: entropy.max(0.0) as f32,
        margin: (p1 - p2) as f32,
        top: i1 as u32,
    })
}

/// The first index holding exactly `v`, checking 16 entries at a time.
fn first_index_of(x: &[f32], v: f32) -> Option<usize> {
    for (c, chunk) in x.chunks(16).enumerate() {
        if chunk.iter().fold(false, |hit, &e| hit | (e == v)) {
            return chunk.iter().position(|&e| e == v).map(|i| c * 16 + i);
        }
    }
    None
}

/// The largest `cut` such that the weights `>= cut` sum to at least `target`
/// (`0 < target <= Σ weights`; `max` is the largest weight): the nucleus is
/// every weight `>= cut`. Bisection over the bit patterns of non-negative
/// f32s, which order like the numbers: 31 vectorised passes, no sort.
fn nucleus_threshold(weights: &[f32], max: f32, target: f64) -> f32 {
    let mass = |cut: f32| {
        let mut lanes = [0f32; 16];
        let chunks = weights.chunks_exact(16);
        let tail: f32 = chunks.remainder().iter().filter(|&&w| w >= cut).sum();
        for c in chunks {
            for l in 0..16 {
                lanes[l] += if c[l] >= cut { c[l] } else { 0.0 };
            }
        }
        lanes.iter().map(|&v| v as f64).sum::<f64>() + tail as f64
    };
    // mass(0) is the total >= target; find the largest bit pattern that keeps it.
    let (mut lo, mut hi) = (0u32, max.to_bits());
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if mass(f32::from_bits(mid)) >= target {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    f32::from_bits(lo)
}

/// The first index at which the running sum of `weights` (all >= 0) reaches
/// `target` (in `(0, Σ weights)`). Sums whole chunks first (vectorised), then
/// walks the chunk that crosses. Rounding can leave `target` just above the
/// total; then the last index with positive weight is returned.
fn sample_index(weights: &[f32], target: f64) -> usize {
    const CHUNK: usize = 64;
    let mut acc = 0.0;
    for (c, chunk) in weights.chunks(CHUNK).enumerate() {
        let total = sum_f64(chunk);
        if acc + total >= target {
            for (i, &w) in chunk.iter().enumerate() {
                acc += w as f64;
                if acc >= target && w > 0.0 {
                    return c * CHUNK + i;
                }
            }
        }
        acc += total;
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_at_zero_temperature_skips_mask() {
        let row = [0.0, 5.0, 1.0, 9.0];
        let s = score_row(&row, 3, 0.0, 1.0, &mut Stream::new(0, 0, 0)).unwrap();
        assert_eq!(s.token, 1);
        let z: f64 = [0.0f64, 5.0, 1.0].iter().map(|x| x.exp()).sum();
        assert!((s.prob as f64 - 5f64.exp() / z).abs() < 1e-6);
        assert!(s.margin > 0.0 && s.entropy > 0.0);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let row = [0.0f32, (3.0f32).ln(), 0.0];
        let mut counts = [0usize; 3];
        for pos in 0..20_000 {
            let s = score_row(&row, 2, 1.0, 1.0, &mut Stream::new(1, 0, pos)).unwrap();
            counts[s.token as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        let frac = counts[1] as f64 / 20_000.0;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }

    #[test]
    fn sampling_follows_the_tempered_distribution_over_a_large_vocabulary() {
        // 200 tokens (several 64-wide chunks); the mask (7) must never come out.
        let row: Vec<f32> = (0..200).map(|i| ((i * 37 % 19) as f32) * 0.3 - 2.0).collect();
        for t in [1.0f64, 0.5, 2.0] {
            let w: Vec<f64> =
                row.iter().enumerate().map(|(i, &x)| if i == 7 { 0.0 } else { (x as f64 / t).exp() }).collect();
            let z: f64 = w.iter().sum();
            let n = 40_000;
            let mut counts = vec![0usize; row.len()];
            for pos in 0..n {
                counts[score_row(&row, 7, t, 1.0, &mut Stream::new(3, 1, pos)).unwrap().token as usize] += 1;
            }
            assert_eq!(counts[7], 0);
            // Total variation distance between empirical and exact: ~0.03 at this n.
            let tv: f64 = counts.iter().zip(&w).map(|(&c, &w)| (c as f64 / n as f64 - w / z).abs()).sum::<f64>() / 2.0;
            assert!(tv < 0.05, "T = {t}: total variation {tv}");
        }
    }

    #[test]
    fn nucleus_sampling_draws_from_the_renormalised_nucleus() {
        // 200 tokens with distinct logits; the mask (7) never comes out.
        let row: Vec<f32> = (0..200).map(|i| ((i * 37 % 199) as f32) * 0.02 - 2.0).collect();
        for (t, top_p) in [(1.0f64, 0.5f64), (0.7, 0.9), (2.0, 0.3)] {
            let w: Vec<f64> =
                row.iter().enumerate().map(|(i, &x)| if i == 7 { 0.0 } else { (x as f64 / t).exp() }).collect();
            let z: f64 = w.iter().sum();
            // The nucleus from a sort: most probable first, until top_p of the mass.
            let mut order: Vec<usize> = (0..row.len()).filter(|&i| i != 7).collect();
            order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
            let (mut kept, mut acc) = (vec![false; row.len()], 0.0);
            for &i in &order {
                kept[i] = true;
                acc += w[i] / z;
                if acc >= top_p {
                    break;
                }
            }
            let zk: f64 = (0..row.len()).filter(|&i| kept[i]).map(|i| w[i]).sum();
            let n = 40_000;
            let mut counts = vec![0usize; row.len()];
            for pos in 0..n {
                counts[score_row(&row, 7, t, top_p, &mut Stream::new(5, 2, pos)).unwrap().token as usize] += 1;
            }
            for i in 0..row.len() {
                assert!(kept[i] || counts[i] == 0, "T = {t}, top_p = {top_p}: token {i} is outside the nucleus");
            }
            let tv: f64 = (0..row.len())
                .map(|i| (counts[i] as f64 / n as f64 - if kept[i] { w[i] / zk } else { 0.0 }).abs())
                .sum::<f64>()
                / 2.0;
            assert!(tv < 0.05, "T = {t}, top_p = {top_p}: total variation {tv}");
        }
    }

    #[test]
    fn a_tiny_nucleus_is_greedy_and_ties_stay_in() {
        let row = [0.5f32, 2.0, -1.0, 2.0, 1.9];
        for pos in 0..200 {
            let s = score_row(&row, 2, 1.0, 1e-6, &mut Stream::new(9, 0, pos)).unwrap();
            assert!(s.token == 1 || s.token == 3, "{}", s.token);
        }
        let mut no_tail = [0f32; 64];
        no_tail[10] = 1.0;
        assert_eq!(nucleus_threshold(&no_tail, 1.0, 1.0), 1.0);
        // A target just above the mass (rounding at top_p ~ 1): everything is kept.
        assert_eq!(nucleus_threshold(&no_tail, 1.0, 1.0 + 1e-3), 0.0);
    }

    #[test]
    fn lane_helpers_handle_tails_ties_and_nan() {
        for n in [1usize, 15, 16, 17, 40] {
            let mut x: Vec<f32> = (0..n).map(|i| (i * 7 % 11) as f32).collect();
            let want = x.iter().cloned().fold(f32::MIN, f32::max);
            assert_eq!(max_and_nan(&x), (want, false), "{n}");
            assert_eq!(first_index_of(&x, want), x.iter().position(|&v| v == want));
            x[n - 1] = f32::NAN;
            assert!(max_and_nan(&x).1, "NaN at the end of {n}");
        }
        // Two equal maxima: the first is the token, the margin is 0.
        let row = [0.0f32, 3.0, 1.0, 3.0, -1.0];
        let s = score_row(&row, 4, 0.0, 1.0, &mut Stream::new(0, 0, 0)).unwrap();
        assert_eq!((s.token, s.margin), (1, 0.0));
    }

    #[test]
    fn inverse_cdf_picks_the_crossing_index() {
        let w = [0.0f32, 1.0, 0.0, 2.0, 1.0];
        assert_eq!(sample_index(&w, 0.5), 1);
        assert_eq!(sample_index(&w, 1.0), 1);
        assert_eq!(sample_index(&w, 1.5), 3);
        assert_eq!(sample_index(&w, 3.9), 4);
        assert_eq!(sample_index(&w, 4.0 + 1e-12), 4); // rounding past the total
        let long: Vec<f32> = (0..300).map(|i| if i == 250 { 1.0 } else { 0.0 }).collect();
        assert_eq!(sample_index(&long, 0.3), 250);
    }

    #[test]
    fn statistics_match_a_direct_computation() {
        let row: Vec<f32> = (0..4096).map(|i| ((i * 7919 % 1000) as f32 / 100.0) - 5.0).collect();
        let s = score_row(&row, 3, 0.0, 1.0, &mut Stream::new(0, 0, 0)).unwrap();
        let valid: Vec<f64> = row.iter().enumerate().filter(|&(i, _)| i != 3).map(|(_, &x)| x as f64).collect();
        let z: f64 = valid.iter().map(|x| x.exp()).sum();
        let p: Vec<f64> = valid.iter().map(|x| x.exp() / z).collect();
        let entropy: f64 = -p.iter().map(|p| p * p.ln()).sum::<f64>();
        let mut sorted = p.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        assert!((s.entropy as f64 - entropy).abs() < 1e-5, "{} vs {entropy}", s.entropy);
        assert!((s.prob as f64 - sorted[0]).abs() < 1e-7);
        assert!((s.margin as f64 - (sorted[0] - sorted[1])).abs() < 1e-7);
        assert_eq!(
            row[s.token as usize],
            row.iter().enumerate().filter(|&(i, _)| i != 3).map(|(_, &x)| x).fold(f32::MIN, f32::max)
        );
    }

    #[test]
    fn non_finite_rows_are_rejected() {
        let mut rng = Stream::new(0, 0, 0);
        assert!(score_row(&[f32::NAN, 1.0, 0.0], 2, 1.0, 1.0, &mut rng).is_none());
        assert!(score_row(&[f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0], 2, 1.0, 1.0, &mut rng).is_none());
    }
}
