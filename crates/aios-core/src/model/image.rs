//! The image head (`image_head.*` in `aios_train.heads.ImageHead`): square
//! patches of `channels x patch x patch` pixels, row-major over the patch
//! grid, values ordered (channel, row, column) inside a patch; 2D position
//! information as a learned embedding per patch.

use super::config::ModelConfig;
use super::heads::Projection;
use crate::error::Result;
use crate::format::WeightFile;
use crate::quant::MatmulMode;

#[derive(Clone, Debug)]
pub struct ImageHead {
    pub proj: Projection,
    channels: usize,
    size: usize,
    patch: usize,
}

impl ImageHead {
    pub fn load(file: &WeightFile, cfg: &ModelConfig, mode: MatmulMode) -> Result<Self> {
        Ok(ImageHead {
            proj: Projection::load(
                file,
                "image_head",
                cfg.hidden_size,
                cfg.image_patch_dim(),
                cfg.image_tokens(),
                mode,
            )?,
            channels: cfg.image_channels,
            size: cfg.image_size,
            patch: cfg.image_patch,
        })
    }

    /// `[C, H, W]` pixels -> `[patches, C p p]`.
    pub fn patchify(&self, img: &[f32]) -> Vec<f32> {
        let (c, s, p) = (self.channels, self.size, self.patch);
        let g = s / p;
        let mut out = Vec::with_capacity(img.len());
        for gy in 0..g {
            for gx in 0..g {
                for ch in 0..c {
                    for py in 0..p {
                        let row = &img[ch * s * s + (gy * p + py) * s + gx * p..][..p];
                        out.extend_from_slice(row);
                    }
                }
            }
        }
        out
    }

    /// Inverse of [`ImageHead::patchify`].
    pub fn unpatchify(&self, patches: &[f32]) -> Vec<f32> {
        let (c, s, p) = (self.channels, self.size, self.patch);
        let g = s / p;
        let mut img = vec![0f32; c * s * s];
        let mut it = patches.iter();
        for gy in 0..g {
            for gx in 0..g {
                for ch in 0..c {
                    for py in 0..p {
                        for px in 0..p {
                            img[ch * s * s + (gy * p + py) * s + gx * p + px] = *it.next().expect("patch count");
                        }
                    }
                }
            }
        }
        img
    }

    /// Model-width rows for a batch of images (`[B, C*H*W]`, flat).
    pub fn embed(&self, images: &[f32], batch: usize, modality: &[f32]) -> Result<Vec<f32>> {
        let values = images.len() / batch;
        let patches: Vec<f32> = images.chunks_exact(values).flat_map(|img| self.patchify(img)).collect();
        self.proj.embed(&patches, batch, modality)
    }

    /// The v-prediction as images `[B, C*H*W]` from final hidden rows.
    pub fn out(&self, hidden: &[f32], batch: usize) -> Result<Vec<f32>> {
        let patches = self.proj.out(hidden, batch * self.proj.positions)?;
        let per = self.proj.positions * self.proj.width;
        Ok(patches.chunks_exact(per).flat_map(|p| self.unpatchify(p)).collect())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn patchify_round_trips_and_orders_like_pytorch() {
        // 1 channel, 4x4 image, 2x2 patches: patch 0 holds pixels (0,0) (0,1) (1,0) (1,1).
        let head = super::ImageHead {
            proj: super::Projection {
                proj_in: crate::quant::Linear::from_dense(
                    &candle_core::Tensor::zeros((1, 4), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
                    None,
                )
                .unwrap(),
                pos_embed: vec![],
                proj_out: crate::quant::Linear::from_dense(
                    &candle_core::Tensor::zeros((4, 1), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
                    None,
                )
                .unwrap(),
                positions: 4,
                width: 4,
            },
            channels: 1,
            size: 4,
            patch: 2,
        };
        let img: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let p = head.patchify(&img);
        assert_eq!(&p[..8], &[0., 1., 4., 5., 2., 3., 6., 7.]);
        assert_eq!(head.unpatchify(&p), img);
    }
}
