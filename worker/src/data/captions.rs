//! Caption processing, as sd-scripts does it per sample: prefix/suffix, caption dropout (by rate and
//! every N epochs), keep tokens (a count, or everything before the keep-tokens separator, and after
//! a second one), token warm-up, shuffling, tag dropout, and the secondary separator.

use rand::seq::SliceRandom;
use rand::Rng;

#[derive(Debug, Clone)]
pub struct CaptionOptions {
    pub caption_prefix: String,
    pub caption_suffix: String,
    pub caption_separator: String,
    pub secondary_separator: String,
    pub shuffle_caption: bool,
    pub keep_tokens: usize,
    pub keep_tokens_separator: String,
    pub caption_dropout_rate: f64,
    pub caption_dropout_every_n_epochs: u32,
    pub caption_tag_dropout_rate: f64,
    pub token_warmup_min: usize,
    /// Steps over which the number of flexible tags grows from `token_warmup_min`; 0 = off.
    pub token_warmup_step: u64,
    /// sd-scripts' `enable_wildcard`: a multi-line caption gives one of its lines at random,
    /// and `{a|b|c}` one of its choices (`{{` and `}}` are literal braces).
    pub enable_wildcard: bool,
}

impl Default for CaptionOptions {
    fn default() -> Self {
        CaptionOptions {
            caption_prefix: String::new(),
            caption_suffix: String::new(),
            caption_separator: ",".into(),
            secondary_separator: String::new(),
            shuffle_caption: false,
            keep_tokens: 0,
            keep_tokens_separator: String::new(),
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            caption_tag_dropout_rate: 0.0,
            token_warmup_min: 1,
            token_warmup_step: 0,
            enable_wildcard: false,
        }
    }
}

fn split_tags(text: &str, separator: &str) -> Vec<String> {
    text.split(separator).map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect()
}

/// sd-scripts' wildcard step: one line of a multi-line caption at random, then every
/// `{a|b|c}` replaced by one of its choices at random (as `re.sub(r"\{([^}]+)\}", …)`), with
/// `{{` / `}}` kept as literal braces.
pub fn expand_wildcards(caption: &str, rng: &mut impl Rng) -> String {
    let line = if caption.contains('\n') {
        let lines: Vec<&str> = caption.split('\n').collect();
        lines[rng.random_range(0..lines.len())]
    } else {
        caption
    };
    // Escaped braces stand aside as characters the caption does not contain.
    let (mut open, mut close) = ("⦅".to_string(), "⦆".to_string());
    while line.contains(&open) || line.contains(&close) {
        open.push('⦅');
        close.push('⦆');
    }
    let escaped = line.replace("{{", &open).replace("}}", &close);
    let mut out = String::with_capacity(escaped.len());
    let mut rest = escaped.as_str();
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('}') {
            // `{` + at least one character that is not `}` + `}`.
            Some(end) if end > 0 => {
                let choices: Vec<&str> = after[..end].split('|').collect();
                out.push_str(choices[rng.random_range(0..choices.len())]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace(&open, "{").replace(&close, "}")
}

/// The caption a sample is trained with at this epoch and step. `rng` decides dropout and order;
/// a seeded rng makes it reproducible.
pub fn process_caption(opts: &CaptionOptions, caption: &str, epoch: u32, step: u64, rng: &mut impl Rng) -> String {
    let mut caption = caption.to_string();
    if !opts.caption_prefix.is_empty() {
        caption = format!("{} {}", opts.caption_prefix, caption);
    }
    if !opts.caption_suffix.is_empty() {
        caption = format!("{} {}", caption, opts.caption_suffix);
    }
    let dropped = (opts.caption_dropout_rate > 0.0 && rng.random::<f64>() < opts.caption_dropout_rate)
        || (opts.caption_dropout_every_n_epochs > 0 && epoch % opts.caption_dropout_every_n_epochs == 0);
    if dropped {
        return String::new();
    }
    caption = if opts.enable_wildcard {
        expand_wildcards(&caption, rng)
    } else {
        // sd-scripts trains on the first line of a caption.
        caption.split('\n').next().unwrap_or("").to_string()
    };
    let reorders = opts.shuffle_caption || opts.token_warmup_step > 0 || opts.caption_tag_dropout_rate > 0.0;
    if reorders {
        let sep = opts.caption_separator.as_str();
        let (fixed, mut flex, fixed_suffix) =
            if !opts.keep_tokens_separator.is_empty() && caption.contains(&opts.keep_tokens_separator) {
                // "fixed ||| flexible ||| fixed suffix"
                let (fixed_part, rest) = caption.split_once(&opts.keep_tokens_separator).expect("contains it");
                let (flex_part, suffix_part) = rest.split_once(&opts.keep_tokens_separator).unwrap_or((rest, ""));
                (split_tags(fixed_part, sep), split_tags(flex_part, sep), split_tags(suffix_part, sep))
            } else {
                // sd-scripts keeps empty pieces here (it strips but does not filter).
                let tags: Vec<String> = caption.trim().split(sep).map(|t| t.trim().to_string()).collect();
                let keep = opts.keep_tokens.min(tags.len());
                (tags[..keep].to_vec(), tags[keep..].to_vec(), Vec::new())
            };
        if opts.token_warmup_step > 0 && step < opts.token_warmup_step {
            let grow = (flex.len() as f64 - opts.token_warmup_min as f64) / opts.token_warmup_step as f64;
            let count = ((step as f64 * grow).floor() as i64 + opts.token_warmup_min as i64).max(0) as usize;
            flex.truncate(count);
        }
        if opts.shuffle_caption {
            flex.shuffle(rng);
        }
        if opts.caption_tag_dropout_rate > 0.0 {
            flex.retain(|_| rng.random::<f64>() >= opts.caption_tag_dropout_rate);
        }
        caption = fixed.into_iter().chain(flex).chain(fixed_suffix).collect::<Vec<_>>().join(", ");
    }
    if !opts.secondary_separator.is_empty() {
        caption = caption.replace(&opts.secondary_separator, &opts.caption_separator);
    }
    caption
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn plain_caption_passes_through_with_prefix_and_suffix() {
        let opts = CaptionOptions { caption_prefix: "sks".into(), caption_suffix: "masterpiece".into(), ..Default::default() };
        assert_eq!(process_caption(&opts, "a dog, grass", 1, 0, &mut rng()), "sks a dog, grass masterpiece");
    }

    #[test]
    fn shuffle_keeps_the_first_tokens_and_every_tag() {
        let opts = CaptionOptions { shuffle_caption: true, keep_tokens: 2, ..Default::default() };
        let caption = "sks, dog, a, b, c, d, e, f";
        let mut seen_other_order = false;
        let mut r = rng();
        for _ in 0..20 {
            let out = process_caption(&opts, caption, 1, 0, &mut r);
            assert!(out.starts_with("sks, dog, "), "{out}");
            let mut tags: Vec<&str> = out.split(", ").collect();
            seen_other_order |= out != "sks, dog, a, b, c, d, e, f";
            tags.sort();
            assert_eq!(tags, ["a", "b", "c", "d", "dog", "e", "f", "sks"]);
        }
        assert!(seen_other_order, "shuffling changes the order");
    }

    #[test]
    fn keep_tokens_separator_fixes_head_and_tail() {
        let opts = CaptionOptions { shuffle_caption: true, keep_tokens_separator: "|||".into(), ..Default::default() };
        let mut r = rng();
        for _ in 0..10 {
            let out = process_caption(&opts, "sks, style ||| a, b, c, d ||| best quality", 1, 0, &mut r);
            assert!(out.starts_with("sks, style, ") && out.ends_with(", best quality"), "{out}");
        }
    }

    #[test]
    fn dropout_by_rate_and_by_epoch() {
        let every_other = CaptionOptions { caption_dropout_every_n_epochs: 2, ..Default::default() };
        assert_eq!(process_caption(&every_other, "a, b", 2, 0, &mut rng()), "");
        assert_eq!(process_caption(&every_other, "a, b", 3, 0, &mut rng()), "a, b");
        let half = CaptionOptions { caption_dropout_rate: 0.5, ..Default::default() };
        let mut r = rng();
        let dropped = (0..1000).filter(|_| process_caption(&half, "a", 1, 0, &mut r).is_empty()).count();
        assert!((400..600).contains(&dropped), "{dropped} of 1000 dropped at rate 0.5");
    }

    #[test]
    fn tag_dropout_never_drops_kept_tokens() {
        let opts = CaptionOptions { caption_tag_dropout_rate: 0.5, keep_tokens: 1, ..Default::default() };
        let mut r = rng();
        let mut lengths = Vec::new();
        for _ in 0..50 {
            let out = process_caption(&opts, "sks, a, b, c, d, e, f, g, h", 1, 0, &mut r);
            assert!(out.starts_with("sks"));
            lengths.push(out.split(", ").count());
        }
        assert!(lengths.iter().any(|&n| n < 9) && lengths.iter().all(|&n| n >= 1));
    }

    #[test]
    fn token_warmup_grows_the_caption_and_secondary_separator_joins() {
        let opts = CaptionOptions { token_warmup_min: 1, token_warmup_step: 10, ..Default::default() };
        assert_eq!(process_caption(&opts, "a, b, c, d, e", 1, 0, &mut rng()), "a");
        assert_eq!(process_caption(&opts, "a, b, c, d, e", 1, 5, &mut rng()), "a, b, c");
        assert_eq!(process_caption(&opts, "a, b, c, d, e", 1, 10, &mut rng()), "a, b, c, d, e");
        let sec = CaptionOptions { secondary_separator: ";;;".into(), ..Default::default() };
        assert_eq!(process_caption(&sec, "a;;;b", 1, 0, &mut rng()), "a,b");
    }
}
