//! The upload check: every image is decoded in full under size limits, its bytes must be the
//! format its name says, and a truncated file is refused — the image crate decodes a cut JPEG
//! "at best effort" without an error (zune-jpeg's strict mode is off), so the file's end marker
//! is checked too: JPEG's EOI, PNG's IEND chunk, WebP's RIFF length.

use std::path::{Path, PathBuf};

use image::ImageFormat;

use super::store::{UploadLimits, IMAGE_EXTENSIONS};

/// A checked image.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedImage {
    pub width: u32,
    pub height: u32,
    pub format: &'static str,
    /// What the user should know about an accepted image (EXIF rotation, alpha).
    pub notes: Vec<String>,
}

/// An uploaded file's name reduced to its last component and checked: `(stem, lower-case
/// extension)`. The reason names what is wrong.
pub fn upload_name(raw: &str) -> Result<(String, String), String> {
    let last = raw.rsplit(['/', '\\']).next().unwrap_or("").trim();
    if last.is_empty() || last.starts_with('.') || last.contains('%') || last.chars().any(|c| c.is_control() || matches!(c, ':' | '*' | '?' | '"' | '<' | '>' | '|')) {
        return Err("not a usable file name (empty, hidden, or with a character a file name cannot hold)".into());
    }
    let Some((stem, ext)) = last.rsplit_once('.') else {
        return Err("has no extension: images are .png, .jpg, .jpeg or .webp, captions .txt".into());
    };
    let ext = ext.to_ascii_lowercase();
    if stem.is_empty() {
        return Err("the name has nothing before its extension".into());
    }
    if ext != "txt" && !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
        return Err(format!(".{ext} is not accepted: images are .png, .jpg, .jpeg or .webp, captions .txt"));
    }
    // The name it is stored under must be one every other route accepts (with room for the
    // `_N` a taken name gets).
    if stem.chars().count() > 90 || super::store::check_name("file", last).is_err() {
        return Err("the name is longer than 90 characters or has '..' in it: rename the file".into());
    }
    Ok((stem.to_string(), ext))
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        _ => "another format",
    }
}

/// Checks an uploaded image's bytes against its extension and the limits, decoding it in full.
pub fn check_image(bytes: &[u8], ext: &str, limits: &UploadLimits) -> Result<CheckedImage, String> {
    let format = image::guess_format(bytes).map_err(|_| "is not an image (its first bytes match no image format)".to_string())?;
    let expected = match ext {
        "png" => ImageFormat::Png,
        "jpg" | "jpeg" => ImageFormat::Jpeg,
        "webp" => ImageFormat::WebP,
        other => return Err(format!(".{other} is not an image extension")),
    };
    if format != expected {
        return Err(format!("is a {} file named .{ext}", format_name(format)));
    }
    if !loft_worker::data::images::is_complete(format, bytes) {
        return Err(format!("is a truncated or damaged {} (its end marker is missing)", format_name(format)));
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    l.max_alloc = Some(1 << 30);
    reader.limits(l);
    let decode_error = |e: image::ImageError| match e {
        image::ImageError::Limits(_) => format!("is larger than {0}×{0} pixels", limits.max_side),
        other => format!("cannot be decoded as {}: {other}", format_name(format)),
    };
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let orientation = image::ImageDecoder::orientation(&mut decoder).unwrap_or(image::metadata::Orientation::NoTransforms);
    let image = image::DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    // Accepted, but trained otherwise than a viewer shows them (sd-scripts, and Loft with it,
    // ignores EXIF rotation and drops alpha).
    let mut notes = vec![];
    if orientation != image::metadata::Orientation::NoTransforms {
        notes.push(format!("has an EXIF orientation ({orientation:?}) that viewers apply and training does not: it trains as stored"));
    }
    if image.color().has_alpha() {
        notes.push("has an alpha channel: transparent pixels train as their stored colour (or as the loss mask with alpha_mask)".to_string());
    }
    let (width, height) = (image.width(), image.height());
    if width.min(height) < limits.min_side {
        return Err(format!("is {width}×{height}: its shorter side is below the smallest training bucket ({} pixels)", limits.min_side));
    }
    Ok(CheckedImage { width, height, format: format_name(format), notes })
}

/// The first free name `STEM.EXT`, `STEM_1.EXT`, … in `dir`, where no image of another extension
/// has the same stem either (it would share the caption file).
pub fn free_name(dir: &Path, stem: &str, ext: &str) -> PathBuf {
    let taken = |s: &str| IMAGE_EXTENSIONS.iter().any(|e| dir.join(format!("{s}.{e}")).exists());
    if !taken(stem) {
        return dir.join(format!("{stem}.{ext}"));
    }
    (1..).map(|i| format!("{stem}_{i}")).find(|s| !taken(s)).map(|s| dir.join(format!("{s}.{ext}"))).expect("a free name")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = std::io::Cursor::new(vec![]);
        image::RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30])).write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let mut out = std::io::Cursor::new(vec![]);
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 3) as u8, 90])).write_to(&mut out, ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn names_are_reduced_and_checked() {
        assert_eq!(upload_name("C:\\photos\\cat.JPG").unwrap(), ("cat".into(), "jpg".into()));
        assert_eq!(upload_name("../../etc/dog.png").unwrap(), ("dog".into(), "png".into()));
        let long = format!("{}.png", "x".repeat(91));
        for bad in ["", ".hidden.png", "noext", "x.exe", "a%2e.png", "a\0.png", ".png", "photo..png", long.as_str()] {
            assert!(upload_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn images_are_decoded_and_truncation_is_caught() {
        let limits = UploadLimits { min_side: 64, ..UploadLimits::default() };
        assert_eq!(check_image(&png(80, 64), "png", &limits).unwrap(), CheckedImage { width: 80, height: 64, format: "PNG", notes: vec![] });
        let mut rgba = std::io::Cursor::new(vec![]);
        image::RgbaImage::from_pixel(64, 64, image::Rgba([1, 2, 3, 0])).write_to(&mut rgba, ImageFormat::Png).unwrap();
        let notes = check_image(&rgba.into_inner(), "png", &limits).unwrap().notes;
        assert!(notes.len() == 1 && notes[0].contains("alpha"), "{notes:?}");
        let j = jpeg(96, 96);
        assert!(check_image(&j, "jpeg", &limits).is_ok());
        // The image crate alone decodes a cut JPEG without an error: that is why the end marker
        // is checked (this assertion fails if a later version starts refusing it by itself).
        let cut = &j[..j.len() * 2 / 3];
        assert!(image::load_from_memory(cut).is_ok(), "the image crate now refuses truncated JPEGs by itself");
        let e = check_image(cut, "jpg", &limits).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        let p = png(80, 80);
        let e = check_image(&p[..p.len() - 30], "png", &limits).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        let e = check_image(&p, "jpg", &limits).unwrap_err();
        assert!(e.contains("PNG file named .jpg"), "{e}");
        let e = check_image(b"hello, not an image at all", "png", &limits).unwrap_err();
        assert!(e.contains("not an image"), "{e}");
        let e = check_image(&png(40, 100), "png", &limits).unwrap_err();
        assert!(e.contains("40×100") && e.contains("64"), "{e}");
        let small = UploadLimits { max_side: 50, min_side: 1, ..UploadLimits::default() };
        let e = check_image(&png(80, 20), "png", &small).unwrap_err();
        assert!(e.contains("larger than 50×50"), "{e}");
    }
}
