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
    let mut sum = 0f64;
    for (i, &x) in row.iter().enumerate() {
        if valid(i) {
            sum += ((x - max) as f64).exp();
        }
    }
    let log_z = max as f64 + sum.ln();
    let (mut entropy, mut p1, mut p2) = (0f64, 0f64, 0f64);
    let (mut best, mut best_key) = (0usize, f64::NEG_INFINITY);
    for (i, &x) in row.iter().enumerate() {
        if !valid(i) {
            continue;
        }
        let lp = x as f64 - log_z;
        let p = lp.exp();
        if p > 0.0 {
            entropy -= p * lp;
        }
        if p > p1 {
            p2 = p1;
            p1 = p;
        } else if p > p2 {
            p2 = p;
        }
        // Gumbel-max sampling at temperature T: argmax(logit/T + G).
        let key = if temperature > 0.0 { x as f64 / temperature + rng.gumbel() } else { x as f64 };
        if key > best_key {
            best_key = key;
            best = i;
        }
    }
    let prob = (row[best] as f64 - log_z).exp();
    Some(PositionScore { token: best as u32, prob: prob as f32, entropy: entropy as f32, margin: (p1 - p2) as f32 })
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
    fn non_finite_rows_are_rejected() {
        let mut rng = Stream::new(0, 0, 0);
        assert!(score_row(&[f32::NAN, 1.0, 0.0], 2, 1.0, &mut rng).is_none());
        assert!(score_row(&[f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0], 2, 1.0, &mut rng).is_none());
    }
}
