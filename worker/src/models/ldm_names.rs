//! Module names in the original (LDM / SGM) UNet layout.
//!
//! sd-scripts names SD 1.x/2.x LoRA modules after the diffusers UNet
//! (`lora_unet_down_blocks_1_attentions_0_…`) but SDXL modules after the original SGM UNet
//! (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), because its SDXL trainer runs
//! that model. Loft's UNet uses diffusers paths, so an SDXL file needs this mapping both ways.

use super::config::UNetConfig;

/// Which diffusers up blocks have attention, and how many resnets a down block has: all the
/// mapping needs from a UNet config.
#[derive(Debug, Clone)]
pub struct UNetLayout {
    pub layers_per_block: usize,
    pub up_block_has_attention: Vec<bool>,
}

impl UNetLayout {
    pub fn from_config(config: &UNetConfig) -> UNetLayout {
        UNetLayout {
            layers_per_block: config.layers_per_block.expand(config.down_block_types.len())[0],
            up_block_has_attention: config.up_block_types.iter().map(|t| t.contains("CrossAttn")).collect(),
        }
    }
}

/// A resnet's inner layer names: diffusers → LDM.
const RESNET_PARTS: &[(&str, &str)] = &[
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
];

fn resnet_part(rest: &str) -> Option<String> {
    RESNET_PARTS.iter().find(|(d, _)| *d == rest).map(|(_, l)| l.to_string())
}

/// Splits `"3.rest.of.path"` into `(3, "rest.of.path")`.
fn index_and_rest(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// The LDM path of a diffusers UNet module path, or None when the path is not a UNet layer this
/// mapping knows.
pub fn unet_ldm_path(path: &str, layout: &UNetLayout) -> Option<String> {
    let per = layout.layers_per_block + 1;
    let fixed: &[(&str, &str)] = &[
        ("conv_in", "input_blocks.0.0"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ];
    if let Some((_, ldm)) = fixed.iter().find(|(d, _)| *d == path) {
        return Some(ldm.to_string());
    }
    if let Some(rest) = path.strip_prefix("down_blocks.") {
        let (block, rest) = index_and_rest(rest)?;
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (j, part) = index_and_rest(rest)?;
            return Some(format!("input_blocks.{}.0.{}", per * block + j + 1, resnet_part(part)?));
        }
        if let Some(rest) = rest.strip_prefix("attentions.") {
            let (j, inner) = index_and_rest(rest)?;
            return Some(format!("input_blocks.{}.1.{inner}", per * block + j + 1));
        }
        if rest == "downsamplers.0.conv" {
            return Some(format!("input_blocks.{}.0.op", per * (block + 1)));
        }
        return None;
    }
    if let Some(rest) = path.strip_prefix("mid_block.") {
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (j, part) = index_and_rest(rest)?;
            return Some(format!("middle_block.{}.{}", j * 2, resnet_part(part)?));
        }
        if let Some(inner) = rest.strip_prefix("attentions.0.") {
            return Some(format!("middle_block.1.{inner}"));
        }
        return None;
    }
    if let Some(rest) = path.strip_prefix("up_blocks.") {
        let (block, rest) = index_and_rest(rest)?;
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (j, part) = index_and_rest(rest)?;
            return Some(format!("output_blocks.{}.0.{}", per * block + j, resnet_part(part)?));
        }
        if let Some(rest) = rest.strip_prefix("attentions.") {
            let (j, inner) = index_and_rest(rest)?;
            return Some(format!("output_blocks.{}.1.{inner}", per * block + j));
        }
        if rest == "upsamplers.0.conv" {
            let slot = if *layout.up_block_has_attention.get(block)? { 2 } else { 1 };
            return Some(format!("output_blocks.{}.{slot}.conv", per * block + per - 1));
        }
        return None;
    }
    None
}

/// The kohya module name sd-scripts' SDXL trainer writes for a diffusers UNet path.
pub fn sdxl_kohya_unet_name(path: &str, layout: &UNetLayout) -> Option<String> {
    unet_ldm_path(path, layout).map(|p| super::kohya_name("lora_unet", &p))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real SDXL base layout: 2 resnets per down block, attention in up blocks 0 and 1.
    fn sdxl() -> UNetLayout {
        UNetLayout { layers_per_block: 2, up_block_has_attention: vec![true, true, false] }
    }

    #[test]
    fn sdxl_names_match_sd_scripts() {
        let cases = [
            ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
            ("down_blocks.2.attentions.1.proj_out", "lora_unet_input_blocks_8_1_proj_out"),
            ("down_blocks.0.resnets.0.conv1", "lora_unet_input_blocks_1_0_in_layers_2"),
            ("down_blocks.1.resnets.0.conv_shortcut", "lora_unet_input_blocks_4_0_skip_connection"),
            ("down_blocks.0.resnets.1.time_emb_proj", "lora_unet_input_blocks_2_0_emb_layers_1"),
            ("down_blocks.0.downsamplers.0.conv", "lora_unet_input_blocks_3_0_op"),
            ("down_blocks.1.downsamplers.0.conv", "lora_unet_input_blocks_6_0_op"),
            ("mid_block.attentions.0.transformer_blocks.3.ff.net.2", "lora_unet_middle_block_1_transformer_blocks_3_ff_net_2"),
            ("mid_block.resnets.1.conv2", "lora_unet_middle_block_2_out_layers_3"),
            ("up_blocks.0.resnets.2.conv1", "lora_unet_output_blocks_2_0_in_layers_2"),
            ("up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k", "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_k"),
            ("up_blocks.0.upsamplers.0.conv", "lora_unet_output_blocks_2_2_conv"),
            ("up_blocks.1.upsamplers.0.conv", "lora_unet_output_blocks_5_2_conv"),
            ("up_blocks.2.resnets.0.conv_shortcut", "lora_unet_output_blocks_6_0_skip_connection"),
            ("time_embedding.linear_1", "lora_unet_time_embed_0"),
            ("add_embedding.linear_2", "lora_unet_label_emb_0_2"),
            ("conv_in", "lora_unet_input_blocks_0_0"),
            ("conv_out", "lora_unet_out_2"),
        ];
        for (diffusers, kohya) in cases {
            assert_eq!(sdxl_kohya_unet_name(diffusers, &sdxl()).as_deref(), Some(kohya), "{diffusers}");
        }
        assert_eq!(unet_ldm_path("down_blocks.0.nonsense", &sdxl()), None);
    }
}
