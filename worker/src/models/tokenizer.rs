//! CLIP's tokenizer, from the model's own files, with the `tokenizers` crate; and the
//! 75-token chunking sd-scripts uses for prompts longer than one CLIP window.
//!
//! A diffusers `tokenizer/` folder holds either a `tokenizer.json` (fast tokenizer, loaded as
//! is) or the slow tokenizer's `vocab.json` + `merges.txt`; for those Loft builds the same
//! pipeline transformers' `CLIPConverter` builds: NFC, whitespace runs → one space, lowercase;
//! split on CLIP's word pattern; byte-level; BPE with the `</w>` end-of-word suffix.
//! Special tokens (begin/end of text, padding) are added here, not by the tokenizer, so the
//! chunking below can place them.

use std::path::Path;

use candle_core::{bail, Result};
use serde_json::{json, Value};
use crate::data::weighted_captions::parse_prompt_attention;

/// CLIP's pre-tokenization pattern (transformers' `CLIPConverter`).
const CLIP_SPLIT_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Tokens one CLIP window holds, without its begin/end tokens.
pub const WINDOW_TOKENS: usize = 75;

/// A CLIP tokenizer and its special token ids.
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: u32,
    pub eos: u32,
    /// `<|endoftext|>` for SD1.x's CLIP-L; `!` (id 0) for OpenCLIP (SD2.x, SDXL's second).
    pub pad: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("bos", &self.bos).field("eos", &self.eos).field("pad", &self.pad).finish()
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| candle_core::Error::Msg(format!("{}: not valid JSON: {e}", path.display())))
}

/// A special token's text from `special_tokens_map.json` / `tokenizer_config.json`, where it is
/// either a string or `{"content": …}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` (or `tokenizer_2/`) folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        // The pad token decides SD1.x-style (pad = end of text) or OpenCLIP-style (pad = "!").
        let mut pad_text = None;
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let p = dir.join(name);
            if pad_text.is_none() && p.is_file() {
                pad_text = token_text(read_json(&p)?.get("pad_token"));
            }
        }
        let pad_text = pad_text.unwrap_or_else(|| "<|endoftext|>".to_string());
        let fast = dir.join("tokenizer.json");
        if fast.is_file() {
            let inner = tokenizers::Tokenizer::from_file(&fast)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", fast.display())))?;
            return Self::with_tokenizer(inner, &pad_text, &fast.display().to_string());
        }
        let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if !vocab_path.is_file() || !merges_path.is_file() {
            bail!("{}: no tokenizer.json, or vocab.json + merges.txt, in this tokenizer folder", dir.display());
        }
        let vocab = read_json(&vocab_path)?;
        let merges_text = std::fs::read_to_string(&merges_path)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", merges_path.display())))?;
        Self::from_vocab_merges(vocab, &merges_text, &pad_text, &dir.display().to_string())
    }

    /// Builds the tokenizer from a vocabulary (`{"token": id}`) and BPE merges (`a b` per line,
    /// after an optional `#version` line).
    pub fn from_vocab_merges(vocab: Value, merges_text: &str, pad_text: &str, source: &str) -> Result<Self> {
        let merges: Vec<&str> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .collect();
        let id_of = |t: &str| vocab.get(t).and_then(|v| v.as_u64());
        let mut added = vec![];
        for t in ["<|startoftext|>", "<|endoftext|>"] {
            let Some(id) = id_of(t) else { bail!("{source}: the vocabulary has no {t} token") };
            added.push(json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                              "normalized": true, "special": true}));
        }
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_SPLIT_PATTERN}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "",
                      "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": merges}
        });
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| candle_core::Error::Msg(format!("{source}: cannot build the CLIP tokenizer: {e}")))?;
        Self::with_tokenizer(inner, pad_text, source)
    }

    /// CLIP's own BPE (OpenAI CLIP / OpenCLIP share it), built into Loft for single-file
    /// checkpoints, which carry no tokenizer files. `openclip_padding` pads with `!` as
    /// SD 2.x and SDXL's second encoder do; otherwise with end-of-text (SD 1.x).
    pub fn embedded_clip(openclip_padding: bool) -> Result<Self> {
        // The first 48 894 merges of CLIP's `bpe_simple_vocab_16e6.txt` (MIT licence), the
        // ones its 49 408-token vocabulary uses.
        const MERGES: &str = include_str!("../../assets/clip-bpe-merges.txt");
        // The vocabulary is derived from the merges, as CLIP's `SimpleTokenizer` builds it:
        // the 256 byte symbols (GPT-2's byte-to-unicode order), the same with `</w>`, one
        // token per merge, then the two special tokens.
        let mut tokens: Vec<String> = byte_symbols().into_iter().map(|c| c.to_string()).collect();
        let with_end: Vec<String> = tokens.iter().map(|t| format!("{t}</w>")).collect();
        tokens.extend(with_end);
        tokens.extend(MERGES.lines().filter(|l| !l.is_empty()).map(|l| l.replace(' ', "")));
        tokens.push("<|startoftext|>".into());
        tokens.push("<|endoftext|>".into());
        let vocab: serde_json::Map<String, Value> = tokens.into_iter().enumerate().map(|(i, t)| (t, json!(i))).collect();
        let pad = if openclip_padding { "!" } else { "<|endoftext|>" };
        Self::from_vocab_merges(Value::Object(vocab), MERGES, pad, "Loft's built-in CLIP tokenizer")
    }

    fn with_tokenizer(inner: tokenizers::Tokenizer, pad_text: &str, source: &str) -> Result<Self> {
        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| candle_core::Error::Msg(format!("{source}: no {t:?} token")));
        Ok(Self { bos: id("<|startoftext|>")?, eos: id("<|endoftext|>")?, pad: id(pad_text)?, inner })
    }

    /// The token ids of `text`, without begin/end tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| candle_core::Error::Msg(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// One CLIP window: `<bos>` + up to 75 tokens + `<eos>`, padded to 77 (the pipelines'
    /// `padding="max_length", truncation=True`).
    pub fn encode_window(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_chunks(text, WINDOW_TOKENS)?.remove(0))
    }

    /// sd-scripts' long-prompt tokenization: the prompt is tokenized to `max_token_length`
    /// (75, 150 or 225) + 2 and cut into 77-token windows, each with its own begin token and an
    /// end token (for OpenCLIP-style padding the end token is only placed where the window is
    /// not already padding). The encoder runs each window; [`join_chunks`] stitches the states.
    pub fn encode_chunks(&self, text: &str, max_token_length: usize) -> Result<Vec<Vec<u32>>> {
        if max_token_length == 0 || max_token_length % WINDOW_TOKENS != 0 {
            bail!("max_token_length must be a multiple of {WINDOW_TOKENS}, got {max_token_length}");
        }
        self.chunks_of(self.encode(text)?, max_token_length)
    }

    /// sd-scripts' weighted tokenization (`weighted_captions`): each (text, weight) piece of
    /// [`parse_prompt_attention`] tokenized on its own, cut to `max_token_length` tokens and
    /// windowed as [`Self::encode_chunks`]; with the weight of every position of the joined
    /// states `(75·n + 2)`: 1 for the begin, end and padding, the piece's weight for its tokens.
    pub fn encode_weighted_chunks(&self, text: &str, max_token_length: usize) -> Result<(Vec<Vec<u32>>, Vec<f32>)> {
        let mut tokens = vec![];
        let mut weights = vec![];
        for (piece, weight) in parse_prompt_attention(text) {
            let ids = self.encode(&piece)?;
            weights.extend(std::iter::repeat_n(weight as f32, ids.len()));
            tokens.extend(ids);
            if tokens.len() > max_token_length {
                break;
            }
        }
        tokens.truncate(max_token_length);
        weights.truncate(max_token_length);
        let mut position_weights = Vec::with_capacity(max_token_length + 2);
        position_weights.push(1.0);
        position_weights.extend(weights);
        position_weights.resize(max_token_length + 2, 1.0);
        Ok((self.chunks_of(tokens, max_token_length)?, position_weights))
    }

    /// Token ids (no begin/end) → the 77-token windows of [`Self::encode_chunks`].
    fn chunks_of(&self, mut tokens: Vec<u32>, max_token_length: usize) -> Result<Vec<Vec<u32>>> {
        if max_token_length == 0 || max_token_length % WINDOW_TOKENS != 0 {
            bail!("max_token_length must be a multiple of {WINDOW_TOKENS}, got {max_token_length}");
        }
        tokens.truncate(max_token_length);
        // The whole sequence as the tokenizer pads it: bos, tokens, eos, pad…
        let total = max_token_length + 2;
        let mut ids = Vec::with_capacity(total);
        ids.push(self.bos);
        ids.extend_from_slice(&tokens);
        ids.push(self.eos);
        ids.resize(total, self.pad);
        let n_chunks = max_token_length / WINDOW_TOKENS;
        let mut chunks = Vec::with_capacity(n_chunks);
        for c in 0..n_chunks {
            let start = 1 + c * WINDOW_TOKENS;
            let mut chunk = Vec::with_capacity(WINDOW_TOKENS + 2);
            chunk.push(ids[0]);
            chunk.extend_from_slice(&ids[start..start + WINDOW_TOKENS]);
            chunk.push(ids[total - 1]);
            if n_chunks > 1 && self.pad != self.eos {
                // OpenCLIP padding: end the window unless it already ends in eos/pad, and
                // make an empty window `<bos> <eos> <pad>…`.
                let k = chunk.len();
                if chunk[k - 2] != self.eos && chunk[k - 2] != self.pad {
                    chunk[k - 1] = self.eos;
                }
                if chunk[1] == self.pad {
                    chunk[1] = self.eos;
                }
            }
            chunks.push(chunk);
        }
        Ok(chunks)
    }
}

/// GPT-2's reversible byte → printable character table, in its order: the printable
/// bytes keep their character, the rest map to U+0100 onwards.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut out: Vec<char> = (0..256u32).filter(|&b| printable(b)).map(|b| char::from_u32(b).expect("latin-1")).collect();
    let mut next = 256u32;
    for b in 0..256u32 {
        if !printable(b) {
            out.push(char::from_u32(next).expect("valid"));
            next += 1;
        }
    }
    out
}

/// Stitches the encoder states of `n` windows `(B·n, 77, D)` (window-major per sample) into
/// `(B, 75·n + 2, D)`: the first window's begin state, every window's 75 inner states, the
/// last window's end state — sd-scripts' `get_hidden_states`. One window passes through.
pub fn join_chunks(states: &candle_core::Tensor, n: usize) -> Result<candle_core::Tensor> {
    let (bn, len, d) = states.dims3()?;
    if n <= 1 {
        return Ok(states.clone());
    }
    if bn % n != 0 || len != WINDOW_TOKENS + 2 {
        bail!("join_chunks: {bn} rows of {len} states do not split into windows of {n}");
    }
    let b = bn / n;
    let flat = states.reshape((b, n * len, d))?;
    let mut parts = vec![flat.narrow(1, 0, 1)?];
    for c in 0..n {
        parts.push(flat.narrow(1, c * len + 1, WINDOW_TOKENS)?);
    }
    parts.push(flat.narrow(1, n * len - 1, 1)?);
    candle_core::Tensor::cat(&parts, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(name)
    }

    /// The ids transformers' CLIPTokenizer gave for the fixture prompts (saved by
    /// tests/parity/make_model_fixtures.py).
    #[test]
    fn ids_match_transformers() -> Result<()> {
        let refs = candle_core::safetensors::load(fixture("tiny-sd15-ref.safetensors"), &candle_core::Device::Cpu)?;
        let prompts = ["a photo of a cat", "the tiny dog at the sea, 4k"];
        for (dir, key) in [("tiny-sd15/tokenizer", "te.input_ids"), ("tiny-sdxl/tokenizer_2", "te2.input_ids")] {
            let tok = ClipTokenizer::from_dir(&fixture(dir))?;
            let want: Vec<Vec<i64>> = refs[key].to_dtype(candle_core::DType::I64)?.to_vec2()?;
            for (p, w) in prompts.iter().zip(want) {
                let got: Vec<i64> = tok.encode_window(p)?.into_iter().map(i64::from).collect();
                assert_eq!(got, w, "{dir}: {p:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn the_built_in_tokenizer_is_clips() -> Result<()> {
        let tok = ClipTokenizer::embedded_clip(false)?;
        // CLIP's well-known ids.
        assert_eq!((tok.bos, tok.eos), (49406, 49407));
        assert_eq!(tok.encode("a photo of a cat")?, vec![320, 1125, 539, 320, 2368]);
        // The byte symbols agree with the fixture vocabulary (built by transformers).
        let small = ClipTokenizer::from_dir(&fixture("tiny-sd15/tokenizer"))?;
        for s in ["!", "#", "~"] {
            assert_eq!(tok.encode(s)?, small.encode(s)?, "{s}");
        }
        assert_eq!(ClipTokenizer::embedded_clip(true)?.pad, 0);
        Ok(())
    }

    #[test]
    fn chunks_place_special_tokens_like_sd_scripts() -> Result<()> {
        let tok = ClipTokenizer::from_dir(&fixture("tiny-sd15/tokenizer"))?;
        let chunks = tok.encode_chunks("a photo of a cat", 150)?;
        assert_eq!(chunks.len(), 2);
        for c in &chunks {
            assert_eq!(c.len(), 77);
            assert_eq!(c[0], tok.bos);
        }
        // SD1.x padding: everything after the prompt is end-of-text.
        assert!(chunks[1][1..].iter().all(|&t| t == tok.eos));
        let xl = ClipTokenizer::from_dir(&fixture("tiny-sdxl/tokenizer_2"))?;
        assert_ne!(xl.pad, xl.eos);
        let chunks = xl.encode_chunks("a photo of a cat", 150)?;
        // OpenCLIP padding: the empty second window becomes `<bos> <eos> <pad>…`.
        assert_eq!(chunks[1][1], xl.eos);
        assert_eq!(chunks[1][2], xl.pad);
        assert!(tok.encode_chunks("x", 100).is_err());
        Ok(())
    }

    #[test]
    fn join_chunks_keeps_bos_inner_and_eos() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        // One sample, two windows; state value = window·100 + position.
        let v: Vec<f32> = (0..2).flat_map(|w| (0..77).map(move |p| (w * 100 + p) as f32)).collect();
        let s = candle_core::Tensor::from_vec(v, (2, 77, 1), &dev)?;
        let j: Vec<f32> = join_chunks(&s, 2)?.flatten_all()?.to_vec1()?;
        assert_eq!(j.len(), 152);
        assert_eq!(j[0], 0.0);
        assert_eq!(j[1], 1.0);
        assert_eq!(j[75], 75.0);
        assert_eq!(j[76], 101.0);
        assert_eq!(j[151], 176.0);
        Ok(())
    }
}
