//! sd-scripts' image augmentations: `color_aug` and `face_crop_aug_range`.
//!
//! `color_aug` (sd-scripts' `AugHelper.color_aug`): with probability 0.33 an image is changed,
//! half of those times by a hue shift of up to ±8 (on OpenCV's 0–180 hue scale, through its
//! exact 8-bit HSV conversions, reproduced here), the other half by raising each 0–255 channel
//! value to a power in [0.95, 1.05] (on the raw values, as sd-scripts does: it brightens or
//! darkens, clipped at 255).
//!
//! `face_crop_aug_range` (sd-scripts' `crop_target`): for images whose file names end in the
//! face box `_cx_cy_w_h` (sd-scripts' face-detection tool writes them), the image is scaled so
//! the face's larger side is between `size / max` and `size / min` of the target side, then
//! the target is cut around the face. As in sd-scripts it applies without buckets only.

use std::path::Path;

use rand::Rng;

use super::BucketChoice;

/// OpenCV's `COLOR_BGR2HSV` for 8-bit pixels (`cv::RGB2HSV_b`, fixed point with 12 fraction
/// bits): hue 0–179, saturation and value 0–255. `px` is in the channel order sd-scripts hands
/// it (RGB bytes read as BGR), so `px[0]` plays blue.
fn bgr_to_hsv(px: [u8; 3]) -> [u8; 3] {
    const SHIFT: i32 = 12;
    let round_div = |num: f64, den: f64| (num / den).round_ties_even() as i32;
    let (b, g, r) = (px[0] as i32, px[1] as i32, px[2] as i32);
    let v = b.max(g).max(r);
    let vmin = b.min(g).min(r);
    let diff = v - vmin;
    let vr = if v == r { -1 } else { 0 };
    let vg = if v == g { -1 } else { 0 };
    let sdiv = if v == 0 { 0 } else { round_div((255 << SHIFT) as f64, v as f64) };
    let s = (diff * sdiv + (1 << (SHIFT - 1))) >> SHIFT;
    let mut h = (vr & (g - b)) + (!vr & ((vg & (b - r + 2 * diff)) + (!vg & (r - g + 4 * diff))));
    let hdiv = if diff == 0 { 0 } else { round_div((180 << SHIFT) as f64, 6.0 * diff as f64) };
    h = (h * hdiv + (1 << (SHIFT - 1))) >> SHIFT;
    if h < 0 {
        h += 180;
    }
    [h as u8, s as u8, v as u8]
}

/// OpenCV's `COLOR_HSV2BGR` for 8-bit pixels (`cv::HSV2RGB_b`: float arithmetic, rounded).
fn hsv_to_bgr(hsv: [u8; 3]) -> [u8; 3] {
    let mut h = hsv[0] as f32;
    let s = hsv[1] as f32 * (1.0 / 255.0);
    let v = hsv[2] as f32 * (1.0 / 255.0);
    let (b, g, r) = if s == 0.0 {
        (v, v, v)
    } else {
        const SECTORS: [[usize; 3]; 6] = [[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]];
        h *= 6.0 / 180.0;
        while h < 0.0 {
            h += 6.0;
        }
        while h >= 6.0 {
            h -= 6.0;
        }
        let mut sector = h.floor() as i32;
        h -= sector as f32;
        if !(0..6).contains(&sector) {
            sector = 0;
            h = 0.0;
        }
        let tab = [v, v * (1.0 - s), v * (1.0 - s * h), v * (1.0 - s * (1.0 - h))];
        let idx = SECTORS[sector as usize];
        (tab[idx[0]], tab[idx[1]], tab[idx[2]])
    };
    let to_u8 = |x: f32| (x * 255.0).round_ties_even().clamp(0.0, 255.0) as u8;
    [to_u8(b), to_u8(g), to_u8(r)]
}

/// The hue branch: each pixel's hue moved by `shift` (−8…8; negative shifts wrap as
/// `180 + shift`), the sum taken modulo 180 and truncated, as numpy stores it.
pub fn hue_shift(img: &mut image::RgbImage, shift: f64) {
    let shift = if shift < 0.0 { 180.0 + shift } else { shift };
    for px in img.pixels_mut() {
        let mut hsv = bgr_to_hsv(px.0);
        hsv[0] = ((hsv[0] as f64 + shift) % 180.0) as u8;
        px.0 = hsv_to_bgr(hsv);
    }
}

/// The gamma branch: `clip(value ** gamma, 0, 255)`, truncated to a byte.
pub fn gamma(img: &mut image::RgbImage, gamma: f64) {
    for v in img.iter_mut() {
        *v = (*v as f64).powf(gamma).clamp(0.0, 255.0) as u8;
    }
}

/// sd-scripts' `color_aug`: nothing two times in three, else a hue shift or a gamma.
pub fn color_aug(img: &mut image::RgbImage, rng: &mut impl Rng) {
    if rng.random::<f64>() > 0.33 {
        return;
    }
    if rng.random::<f64>() > 0.5 {
        hue_shift(img, rng.random_range(-8.0..8.0));
    } else {
        gamma(img, rng.random_range(0.95..1.05));
    }
}

/// The face box `(cx, cy, w, h)` at the end of an image's file name (`name_cx_cy_w_h.png`), as
/// sd-scripts reads it; `None` without one.
pub fn face_box(path: &Path) -> Option<(i64, i64, i64, i64)> {
    let stem = path.file_stem()?.to_string_lossy();
    let tokens: Vec<&str> = stem.split('_').collect();
    if tokens.len() < 5 {
        return None;
    }
    let n = tokens.len();
    let num = |s: &str| s.parse::<i64>().ok();
    Some((num(tokens[n - 4])?, num(tokens[n - 3])?, num(tokens[n - 2])?, num(tokens[n - 1])?))
}

/// sd-scripts' `crop_target` for an image of `size` with a face box: the size to resize to and
/// where to cut the `target` (as a [`BucketChoice`] and the crop's top-left). `None` when the
/// image already has the target size (sd-scripts leaves it) or is smaller than it.
pub fn face_crop(
    size: (u32, u32),
    face: (i64, i64, i64, i64),
    range: (f64, f64),
    target: (u32, u32),
    random_crop: bool,
    rng: &mut impl Rng,
) -> Option<(BucketChoice, (u32, u32))> {
    let (width, height) = (size.0 as f64, size.1 as f64);
    let (tw, th) = target;
    if size == target {
        return None;
    }
    let (cx, cy, fw, fh) = face;
    let face_size = fw.max(fh) as f64;
    let short = tw.min(th) as f64;
    let fit_scale = (th as f64 / height).max(tw as f64 / width);
    let min_scale = 1f64.min(fit_scale.max(short / (face_size * range.1)));
    let max_scale = 1f64.min(min_scale.max(short / (face_size * range.0)));
    let scale = if min_scale >= max_scale { min_scale } else { rng.random_range(min_scale..max_scale) };
    let nh = (height * scale + 0.5) as i64;
    let nw = (width * scale + 0.5) as i64;
    if nw < tw as i64 || nh < th as i64 {
        // Smaller than the target even unscaled (sd-scripts stops here): the caller fits the
        // image to the target as it does any other.
        return None;
    }
    let face_x = (cx as f64 * scale + 0.5) as i64;
    let face_y = (cy as f64 * scale + 0.5) as i64;
    let mut origin = [0i64; 2];
    // Height first, then width, as sd-scripts walks the axes (its random draws come in that order).
    for (axis, (target_len, length, face_p)) in [(th as i64, nh, face_y), (tw as i64, nw, face_x)].into_iter().enumerate() {
        let mut p1 = face_p - target_len / 2;
        if random_crop {
            let reach = (length - face_p).max(face_p);
            p1 += rng.random_range(0..=reach) + rng.random_range(0..=reach) - reach;
        } else if range.0 != range.1 && face_size > (short as i64 / 10) as f64 && face_size >= 40.0 {
            let jitter = face_size as i64 / 20;
            p1 += rng.random_range(-jitter..=jitter);
        }
        origin[axis] = p1.min(length - target_len).max(0);
    }
    let choice = BucketChoice { bucket: target, resized: (nw as u32, nh as u32), aspect_error: 0.0 };
    Some((choice, (origin[1] as u32, origin[0] as u32)))
}

/// Parses `face_crop_aug_range` ("2.0,4.0"): two positive numbers, the first not above the second.
pub fn parse_face_range(text: &str) -> Result<(f64, f64), String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let nums: Vec<f64> = parts.iter().filter_map(|p| p.parse::<f64>().ok()).collect();
    match nums.as_slice() {
        [lo, hi] if parts.len() == 2 && *lo > 0.0 && lo <= hi => Ok((*lo, *hi)),
        _ => Err(format!("{text:?}: expected two positive numbers \"min,max\" with min ≤ max, e.g. \"2.0,4.0\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn reads_face_boxes_and_ranges() {
        assert_eq!(face_box(Path::new("/d/img_0001_120_80_40_44.png")), Some((120, 80, 40, 44)));
        assert_eq!(face_box(Path::new("/d/img_1_2_3.png")), None);
        assert_eq!(face_box(Path::new("/d/a_b_c_d_e.png")), None);
        assert_eq!(parse_face_range("2.0, 4"), Ok((2.0, 4.0)));
        assert!(parse_face_range("4,2").is_err() && parse_face_range("2").is_err() && parse_face_range("0,1").is_err());
        // An image smaller than the target is left to the ordinary fit.
        assert!(face_crop((20, 40), (10, 10, 8, 8), (1.0, 2.0), (32, 32), false, &mut rand::rngs::StdRng::seed_from_u64(0)).is_none());
    }

    #[test]
    fn hsv_round_trips_greys_and_primaries() {
        for px in [[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0], [0, 0, 255]] {
            assert_eq!(hsv_to_bgr(bgr_to_hsv(px)), px, "{px:?}");
        }
        // OpenCV: blue (BGR 255,0,0) has hue 120, green 60, red 0.
        assert_eq!(bgr_to_hsv([255, 0, 0]), [120, 255, 255]);
        assert_eq!(bgr_to_hsv([0, 255, 0]), [60, 255, 255]);
    }
}
