//! Per-position statistics of one logit row under SUBS parameterisation
//! (the mask token can never be predicted).

use super::rng::Stream;
use crate::model::ops::{exp_f32, max_by_lanes};

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
}

/// Scores one row of logits. Returns `None` if the row has no finite logit
/// (a broken model), which the caller reports as an error.
///
/// This runs for every masked position at every step (64 x 4096 entries per
/// step on the tiny model), so every pass is written to vectorise: the
/// exponentials are f32 (relative error 2e-7, below the f32 statistics we
/// return) and every sum is accumulated in f64 in a fixed order.
pub fn score_row(row: &[f32], mask_id: u32, temperature: f64, rng: &mut Stream) -> Option<PositionScore> {
    let mask = mask_id as usize;
    if row.iter().any(|x| x.is_nan()) {
        return None;
    }
    // Shifted logits d = x - max over valid entries: <= 0, the mask at -inf.
    let mut d = row.to_vec();
    if let Some(m) = d.get_mut(mask) {
        *m = f32::NEG_INFINITY;
    }
    let max = max_by_lanes(&d);
    if !max.is_finite() {
        return None;
    }
    d.iter_mut().for_each(|v| *v -= max);
    // exp_f32 clamps its input at -87, so -inf (the mask, -inf logits) is
    // mapped to 0 here: such entries must never be sampled.
    let exp0 = |v: f32| if v == f32::NEG_INFINITY { 0.0 } else { exp_f32(v) };
    let exps: Vec<f32> = d.iter().map(|&v| exp0(v)).collect();
    let sum = sum_fixed_order(exps.iter().map(|&e| e as f64));
    // Entropy = -sum p (d - ln Z) = ln Z - sum(e d) / Z, with 0 * (-inf) = 0.
    let e_d = sum_fixed_order(exps.iter().zip(&d).map(|(&e, &v)| if e > 0.0 { e as f64 * v as f64 } else { 0.0 }));
    let entropy = sum.ln() - e_d / sum;
    // Top two by logit (exp is monotone): the first maximum, then the first
    // maximum of the rest (a tie gives a margin of 0).
    let i1 = d.iter().position(|&v| v == 0.0).expect("the maximum is in the row");
    let second = {
        let keep = std::mem::replace(&mut d[i1], f32::NEG_INFINITY);
        let m = max_by_lanes(&d);
        d[i1] = keep;
        m
    };
    let i2 = if second.is_finite() {
        (0..d.len()).find(|&i| i != i1 && d[i] == second)
    } else {
        None // a single valid entry, or every other one has probability 0
    };
    let prob_of = |i: Option<usize>| i.map_or(0.0, |i| exps[i] as f64 / sum);
    let best = if temperature > 0.0 {
        // One uniform per row, inverted through the cumulative distribution
        // of softmax(logits / T): the same distribution as Gumbel-max, but
        // without two logarithms per vocabulary entry (which were two thirds
        // of a temperature-1 generation's time).
        let u = rng.uniform();
        if temperature == 1.0 {
            sample_index(&exps, u * sum)
        } else {
            let t = temperature as f32;
            let weights: Vec<f32> = d.iter().map(|&v| exp0(v / t)).collect();
            let z = sum_fixed_order(weights.iter().map(|&w| w as f64));
            sample_index(&weights, u * z)
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
    })
}

/// The first index at which the running sum of `weights` (all >= 0) reaches
/// `target` (in `(0, Σ weights)`). Sums whole chunks first (vectorised), then
/// walks the chunk that crosses. Rounding can leave `target` just above the
/// total; then the last index with positive weight is returned.
fn sample_index(weights: &[f32], target: f64) -> usize {
    const CHUNK: usize = 64;
    let mut acc = 0.0;
    for (c, chunk) in weights.chunks(CHUNK).enumerate() {
        let total = sum_fixed_order(chunk.iter().map(|&w| w as f64));
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

/// Sum in eight interleaved partial sums, combined in a fixed order: the
/// compiler can vectorise it and the result never depends on anything but the input.
#[inline]
fn sum_fixed_order(values: impl Iterator<Item = f64>) -> f64 {
    let mut acc = [0f64; 8];
    for (i, v) in values.enumerate() {
        acc[i % 8] += v;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_at_zero_temperature_skips_mask() {
        let row = [0.0, 5.0, 1.0, 9.0];
        let s = score_row(&row, 3, 0.0, &mut Stream::new(0, 0, 0)).unwrap();
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
            let s = score_row(&row, 2, 1.0, &mut Stream::new(1, 0, pos)).unwrap();
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
                counts[score_row(&row, 7, t, &mut Stream::new(3, 1, pos)).unwrap().token as usize] += 1;
            }
            assert_eq!(counts[7], 0);
            // Total variation distance between empirical and exact: ~0.03 at this n.
            let tv: f64 = counts.iter().zip(&w).map(|(&c, &w)| (c as f64 / n as f64 - w / z).abs()).sum::<f64>() / 2.0;
            assert!(tv < 0.05, "T = {t}: total variation {tv}");
        }
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
        let s = score_row(&row, 3, 0.0, &mut Stream::new(0, 0, 0)).unwrap();
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
        assert!(score_row(&[f32::NAN, 1.0, 0.0], 2, 1.0, &mut rng).is_none());
        assert!(score_row(&[f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0], 2, 1.0, &mut rng).is_none());
    }
}
