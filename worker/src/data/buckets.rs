//! Aspect-ratio buckets, as sd-scripts' `BucketManager` makes and picks them, so a dataset lands in
//! the same buckets in Loft as in kohya.

/// Where one image goes: its bucket, the size it is resized to before cropping to the bucket, and
/// how far the bucket's aspect ratio is from the image's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketChoice {
    pub bucket: (u32, u32),
    pub resized: (u32, u32),
    pub aspect_error: f64,
}

#[derive(Debug, Clone)]
pub struct BucketManager {
    /// The training resolution (width, height); its area bounds every bucket.
    pub max_reso: (u32, u32),
    pub min_size: u32,
    pub max_size: u32,
    pub reso_steps: u32,
    /// Never upscale: buckets come from each image's own size, cropped down to a multiple of the step.
    pub no_upscale: bool,
    predefined: Vec<(u32, u32)>,
}

impl BucketManager {
    pub fn new(max_reso: (u32, u32), min_size: u32, max_size: u32, reso_steps: u32, no_upscale: bool) -> BucketManager {
        let predefined = if no_upscale { Vec::new() } else { make_bucket_resolutions(max_reso, min_size, max_size, reso_steps) };
        BucketManager { max_reso, min_size, max_size, reso_steps, no_upscale, predefined }
    }

    /// The buckets an upscaling manager chooses from (sorted by width, then height).
    pub fn predefined(&self) -> &[(u32, u32)] {
        &self.predefined
    }

    fn max_area(&self) -> u64 {
        self.max_reso.0 as u64 * self.max_reso.1 as u64
    }

    fn round_to_steps(&self, x: f64) -> u32 {
        let x = (x + 0.5) as u32;
        x - x % self.reso_steps
    }

    /// sd-scripts' `select_bucket`.
    pub fn select(&self, width: u32, height: u32) -> BucketChoice {
        let aspect = width as f64 / height as f64;
        let (bucket, resized) = if !self.no_upscale {
            let reso = if self.predefined.contains(&(width, height)) {
                (width, height)
            } else {
                // The predefined bucket whose aspect ratio is closest (first one on a tie, like argmin).
                let mut best = self.predefined[0];
                let mut best_err = f64::INFINITY;
                for &(w, h) in &self.predefined {
                    let err = (w as f64 / h as f64 - aspect).abs();
                    if err < best_err {
                        best = (w, h);
                        best_err = err;
                    }
                }
                best
            };
            let reso_aspect = reso.0 as f64 / reso.1 as f64;
            // Wider than the bucket: match heights; otherwise match widths. The other side overhangs
            // and is cropped.
            let scale = if aspect > reso_aspect { reso.1 as f64 / height as f64 } else { reso.0 as f64 / width as f64 };
            (reso, ((width as f64 * scale + 0.5) as u32, (height as f64 * scale + 0.5) as u32))
        } else {
            let resized = if width as u64 * height as u64 > self.max_area() {
                // Too large: shrink to the maximum area, keeping the aspect ratio, rounding whichever
                // side keeps the aspect ratio closer.
                let resized_width = (self.max_area() as f64 * aspect).sqrt();
                let resized_height = self.max_area() as f64 / resized_width;
                let w_rounded = self.round_to_steps(resized_width);
                let h_in_w = self.round_to_steps(w_rounded as f64 / aspect);
                let ar_w = w_rounded as f64 / h_in_w as f64;
                let h_rounded = self.round_to_steps(resized_height);
                let w_in_h = self.round_to_steps(h_rounded as f64 * aspect);
                let ar_h = w_in_h as f64 / h_rounded as f64;
                if (ar_w - aspect).abs() < (ar_h - aspect).abs() {
                    (w_rounded, (w_rounded as f64 / aspect + 0.5) as u32)
                } else {
                    ((h_rounded as f64 * aspect + 0.5) as u32, h_rounded)
                }
            } else {
                (width, height)
            };
            let bucket = (resized.0 - resized.0 % self.reso_steps, resized.1 - resized.1 % self.reso_steps);
            (bucket, resized)
        };
        BucketChoice { bucket, resized, aspect_error: bucket.0 as f64 / bucket.1 as f64 - aspect }
    }
}

/// sd-scripts' `make_bucket_resolutions`: the square bucket of the training area, then every width
/// from `min_size` to `max_size` in steps with the tallest height that keeps within the area.
pub fn make_bucket_resolutions(max_reso: (u32, u32), min_size: u32, max_size: u32, divisible: u32) -> Vec<(u32, u32)> {
    let max_area = max_reso.0 as u64 * max_reso.1 as u64;
    let mut resos = std::collections::BTreeSet::new();
    let side = ((max_area as f64).sqrt() as u64 / divisible as u64) as u32 * divisible;
    resos.insert((side, side));
    let mut width = min_size;
    while width <= max_size {
        let height = max_size.min(((max_area / width as u64) / divisible as u64) as u32 * divisible);
        if height >= min_size {
            resos.insert((width, height));
            resos.insert((height, width));
        }
        width += divisible;
    }
    resos.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_buckets_match_sd_scripts() {
        // sd-scripts at 512×512, 256–1024, step 64 (values from its make_bucket_resolutions).
        let resos = make_bucket_resolutions((512, 512), 256, 1024, 64);
        assert_eq!(
            resos,
            vec![
                (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
                (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)
            ]
        );
        for (w, h) in &resos {
            assert!(*w as u64 * *h as u64 <= 512 * 512);
        }
    }

    #[test]
    fn images_pick_the_nearest_aspect_and_cover_it() {
        let m = BucketManager::new((512, 512), 256, 1024, 64, false);
        // A 3:2 landscape photo goes to 640×384 (aspect 1.667 is closer to 1.5 than 576×448's 1.286).
        let c = m.select(1500, 1000);
        assert_eq!(c.bucket, (640, 384));
        // Wider than the bucket? No (1.5 < 1.667): widths are matched, the height overhangs.
        assert_eq!(c.resized, (640, 427));
        assert!(c.resized.0 >= c.bucket.0 && c.resized.1 >= c.bucket.1);
        // A square image goes to the square bucket at exactly its size.
        assert_eq!(m.select(1024, 1024), BucketChoice { bucket: (512, 512), resized: (512, 512), aspect_error: 0.0 });
        // An image already at a bucket size stays as it is.
        assert_eq!(m.select(448, 576).resized, (448, 576));
    }

    #[test]
    fn no_upscale_keeps_small_images_and_shrinks_large_ones() {
        let m = BucketManager::new((512, 512), 256, 1024, 64, true);
        // Smaller than the area: no resize, the bucket is the size cropped to multiples of 64.
        let c = m.select(300, 500);
        assert_eq!(c, BucketChoice { bucket: (256, 448), resized: (300, 500), aspect_error: 256.0 / 448.0 - 0.6 });
        // Larger: shrunk to the area first.
        // Larger: shrunk to the area first (2:1 → 640×320, rounding the height side keeps 2:1 exact).
        assert_eq!(m.select(2000, 1000), BucketChoice { bucket: (640, 320), resized: (640, 320), aspect_error: 0.0 });
    }
}
