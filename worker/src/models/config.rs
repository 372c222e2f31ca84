//! Serde structs for the diffusers / transformers `config.json` files, with the defaults that
//! older configs (e.g. SD1.5's, written before most keys existed) leave out.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// A config value diffusers accepts either as one number for every block or as a list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for each of `n` blocks.
    pub fn expand(&self, n: usize) -> Vec<usize> {
        match self {
            PerBlock::One(v) => vec![*v; n],
            PerBlock::Each(v) => v.clone(),
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_silu() -> String {
    "silu".into()
}
fn d_one() -> usize {
    1
}
fn d_three() -> usize {
    3
}
fn d_four() -> usize {
    4
}
fn d_groups() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_f64_one() -> f64 {
    1.0
}
fn d_heads() -> PerBlock {
    PerBlock::One(8)
}
fn d_layers() -> PerBlock {
    PerBlock::One(1)
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}

/// `unet/config.json` of `UNet2DConditionModel` (the keys SD1.x, SD2.x and SDXL use).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_four")]
    pub in_channels: usize,
    #[serde(default = "d_four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_f64_one")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock,
    #[serde(default = "d_layers")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    /// diffusers reads this as the number of heads when `num_attention_heads` is null.
    #[serde(default = "d_heads")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_f64_one")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// `"text_time"` for SDXL.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

/// `text_encoder/config.json` of `CLIPTextModel` / `CLIPTextModelWithProjection`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "d_77")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub architectures: Vec<String>,
}

fn d_77() -> usize {
    77
}
fn d_quick_gelu() -> String {
    "quick_gelu".into()
}
fn d_eos() -> u32 {
    2
}

/// `vae/config.json` of `AutoencoderKL`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d_three")]
    pub in_channels: usize,
    #[serde(default = "d_three")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_four")]
    pub latent_channels: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn d_scaling() -> f64 {
    0.18215
}

/// Reads and parses a JSON config, naming the file in errors.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> candle_core::Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::Msg(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| candle_core::Error::Msg(format!("bad config {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD1.5's own unet config (runwayml), which predates most keys.
    #[test]
    fn sd15_unet_config_defaults() {
        let cfg: UNetConfig = serde_json::from_str(
            r#"{"_class_name":"UNet2DConditionModel","act_fn":"silu","attention_head_dim":8,
            "block_out_channels":[320,640,1280,1280],"center_input_sample":false,"cross_attention_dim":768,
            "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
            "downsample_padding":1,"flip_sin_to_cos":true,"freq_shift":0,"in_channels":4,"layers_per_block":2,
            "mid_block_scale_factor":1,"norm_eps":1e-05,"norm_num_groups":32,"out_channels":4,"sample_size":64,
            "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"]}"#,
        )
        .unwrap();
        assert_eq!(cfg.attention_head_dim, PerBlock::One(8));
        assert_eq!(cfg.layers_per_block.expand(4), vec![2; 4]);
        assert_eq!(cfg.mid_block_type.as_deref(), Some("UNetMidBlock2DCrossAttn"));
        assert!(!cfg.use_linear_projection);
        let cfg: UNetConfig = serde_json::from_str(
            r#"{"attention_head_dim":[5,10,20,20],"block_out_channels":[320,640,1280,1280],
            "cross_attention_dim":1024,"use_linear_projection":true,
            "down_block_types":["CrossAttnDownBlock2D"],"up_block_types":["UpBlock2D"]}"#,
        )
        .unwrap();
        assert_eq!(cfg.attention_head_dim.expand(4), vec![5, 10, 20, 20]);
    }
}
