//! Per-position statistics of one logit row under SUBS parameterisation
//! (the mask token can never be predicted).

use super::rng::Stream;

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
/// Statistics are in f64, like the PyTorch reference. The exponentials are
/// the sampler's main cost (64 rows x 4096 entries per step on the tiny
/// model), so they are computed once, with a branch-free exp that the
/// compiler vectorises, and every sum uses a fixed order of partial sums.
pub fn score_row(row: &[f32], mask_id: u32, temperature: f64, rng: &mut Stream) -> Option<PositionScore> {
    let mask = mask_id as usize;
    let valid = |i: usize| i != mask;
    let mut max = f32::NEG_INFINITY;
    for (i, &x) in row.iter().enumerate() {
        if valid(i) && x > max {
            max = x;
        }
    }
    if !max.is_finite() || row.iter().any(|x| x.is_nan()) {
        return None;
    }
    // Shifted logits: <= 0 at every valid entry; the mask's entry is excluded.
    let shifted: Vec<f64> = row.iter().map(|&x| (x - max) as f64).collect();
    let mut exps: Vec<f64> = shifted.iter().map(|&d| exp_nonpositive(d)).collect();
    if mask < exps.len() {
        exps[mask] = 0.0;
    }
    let sum = sum_fixed_order(exps.iter().copied());
    // Entropy = -sum p (d - ln Z) = ln Z - sum(e d) / Z, with Z = sum e and
    // 0 * (-inf) taken as 0.
    let e_d = sum_fixed_order(exps.iter().zip(&shifted).map(|(&e, &d)| if e > 0.0 { e * d } else { 0.0 }));
    let log_sum = sum.ln();
    let entropy = log_sum - e_d / sum;
    // Top two probabilities: exp is monotone, so rank by the logits.
    let (mut i1, mut i2) = (None::<usize>, None::<usize>);
    for (i, &x) in row.iter().enumerate() {
        if !valid(i) {
            continue;
        }
        if i1.is_none_or(|j| x > row[j]) {
            i2 = i1;
            i1 = Some(i);
        } else if i2.is_none_or(|j| x > row[j]) {
            i2 = Some(i);
        }
    }
    let prob_of = |i: Option<usize>| i.map_or(0.0, |i| exps[i] / sum);
    let best = if temperature > 0.0 {
        // One uniform per row, inverted through the cumulative distribution
        // of softmax(logits / T): the same distribution as Gumbel-max, but
        // without two logarithms per vocabulary entry (which were two thirds
        // of a temperature-1 generation's time).
        let u = rng.uniform();
        if temperature == 1.0 {
            sample_index(&exps, u * sum)
        } else {
            let weights: Vec<f64> = shifted
                .iter()
                .enumerate()
                .map(|(i, &d)| if valid(i) { exp_nonpositive(d / temperature) } else { 0.0 })
                .collect();
            let z = sum_fixed_order(weights.iter().copied());
            sample_index(&weights, u * z)
        }
    } else {
        i1.unwrap_or(0)
    };
    let (p1, p2) = (prob_of(i1), prob_of(i2));
    Some(PositionScore {
        token: best as u32,
        prob: (exps[best] / sum) as f32,
        entropy: entropy.max(0.0) as f32,
        margin: (p1 - p2) as f32,
    })
}

/// The first index at which the running sum of `weights` (all >= 0) reaches
/// `target` (in `(0, Σ weights)`). Sums whole chunks first (vectorised), then
/// walks the chunk that crosses. Rounding can leave `target` just above the
/// total; then the last index with positive weight is returned.
fn sample_index(weights: &[f64], target: f64) -> usize {
    const CHUNK: usize = 64;
    let mut acc = 0.0;
    for (c, chunk) in weights.chunks(CHUNK).enumerate() {
        let total = sum_fixed_order(chunk.iter().copied());
        if acc + total >= target {
            for (i, &w) in chunk.iter().enumerate() {
                acc += w;
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

/// `exp(d)` for `d <= 0` (and -inf), within 2 ulp of libm, without branches
/// so that a loop over it vectorises. Results below 2^-1022 are flushed to 0:
/// they cannot change a sum that contains exp(0) = 1.
#[inline(always)]
fn exp_nonpositive(d: f64) -> f64 {
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // Adding 1.5 * 2^52 rounds to the nearest integer n and leaves n in the
    // low mantissa bits, with no float-to-int conversion (which AVX2 lacks).
    const SHIFT: f64 = 6755399441055744.0;
    let x = d.max(-708.0);
    let kd = x.mul_add(std::f64::consts::LOG2_E, SHIFT);
    let bits = kd.to_bits();
    let n = kd - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO; // |r| <= ln2 / 2 (+ rounding)
                                         // Taylor series to r^13 / 13!: truncation error < 1e-17 on |r| <= 0.347.
    let mut p: f64 = 1.0 / 6227020800.0;
    for c in [
        1.0 / 479001600.0,
        1.0 / 39916800.0,
        1.0 / 3628800.0,
        1.0 / 362880.0,
        1.0 / 40320.0,
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    // 2^n from its exponent field; n is in [-1022, 0] here.
    let scale = f64::from_bits(bits.wrapping_add(1023) << 52);
    if d < -708.0 {
        0.0
    } else {
        p * scale
    }
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
        let w = [0.0, 1.0, 0.0, 2.0, 1.0];
        assert_eq!(sample_index(&w, 0.5), 1);
        assert_eq!(sample_index(&w, 1.0), 1);
        assert_eq!(sample_index(&w, 1.5), 3);
        assert_eq!(sample_index(&w, 3.9), 4);
        assert_eq!(sample_index(&w, 4.0 + 1e-12), 4); // rounding past the total
        let long: Vec<f64> = (0..300).map(|i| if i == 250 { 1.0 } else { 0.0 }).collect();
        assert_eq!(sample_index(&long, 0.3), 250);
    }

    #[test]
    fn fast_exp_tracks_libm() {
        for i in 0..200_000 {
            let d = -(i as f64) * 0.0037;
            let (got, want) = (exp_nonpositive(d), d.exp());
            if d < -708.0 {
                assert_eq!(got, 0.0);
            } else {
                assert!((got - want).abs() <= 4.0 * f64::EPSILON * want, "{d}: {got} vs {want}");
            }
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(f64::NEG_INFINITY), 0.0);
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
