//! Which client applies which network exactly: one table, read by `loft lora inspect`, the job
//! page (per file, with a "convert to LoRA" action where a client falls short) and the Network
//! tab (for the current choice, before training).
//!
//! The facts, from checking the clients' own code with files Loft trained
//! (the project's reference notes on algorithms, "facts found while checking the references";
//! ComfyUI 0.3.64, diffusers 0.37):
//!
//! | | ComfyUI | A1111 / Forge | diffusers |
//! |---|---|---|---|
//! | kohya LoRA / LoCon | exact | exact | exact (LoCon: `conv_in`, `conv_out`, `time_embedding` dropped) |
//! | LyCORIS LoCon | exact | loads | as kohya LoCon; Tucker rejected |
//! | + DoRA | per output row: normalised by ‖W‖ instead of ‖W+ΔW‖; strength ≠ 1 interpolates weights | loads | `dora_scale` dropped |
//! | LoHa, DyLoRA, GLoRA, full | exact | loads | rejected |
//! | LoKr | exact, except Tucker 3×3 convs (left unpatched) | loads | rejected |
//! | IA3 | not loaded | loads | rejected |
//! | DIAG-OFT, BOFT | exact without constraint/rescale at strength 1; the constraint is read without the width factor, `rescale` ignored (DIAG-OFT), strength applied twice | DIAG-OFT loads, BOFT not | rejected |
//! | ABBA, GLoRA-Ex | no client has the keys | — | — |
//!
//! "loads" means the client has a loader for those keys, but Loft has not compared its result
//! with LyCORIS's math; it is shown as such, not as exact. A plain LoRA from `loft lora convert`
//! is exact in every client (up to the rank chosen).

use std::collections::BTreeSet;

use serde::Serialize;

use super::{FileAlgo, LoadedModule, LoraFile};
use crate::networks::{NetworkAlgo, NetworkOptions};

/// A client that loads network files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Client {
    ComfyUi,
    A1111,
    Diffusers,
}

impl Client {
    pub const ALL: [Client; 3] = [Client::ComfyUi, Client::A1111, Client::Diffusers];

    pub fn label(self) -> &'static str {
        match self {
            Client::ComfyUi => "ComfyUI",
            Client::A1111 => "A1111/Forge",
            Client::Diffusers => "diffusers",
        }
    }
}

/// How well a client applies a network, worst first when ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// The keys are not read (nothing, or only some modules, change).
    No,
    /// Read, but something differs from what training showed (the notes say what).
    Partly,
    /// The client has a loader for the keys; Loft has not compared its result.
    Loads,
    Exact,
}

impl Level {
    pub fn label(self) -> &'static str {
        match self {
            Level::No => "not applied",
            Level::Partly => "partly",
            Level::Loads => "loads (not verified)",
            Level::Exact => "exact",
        }
    }
}

/// One client's verdict and what is lost.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    pub client: Client,
    pub level: Level,
    pub notes: Vec<String>,
}

/// What decides a module's support: its algorithm and the options that change its keys or math.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traits {
    pub algo: Option<FileAlgo>,
    pub dora: bool,
    /// DoRA's magnitude per output row (LyCORIS's default).
    pub wd_on_output: bool,
    /// Tucker on a k×k conv.
    pub tucker_conv: bool,
    /// DIAG-OFT/BOFT with a norm constraint.
    pub constraint: bool,
    /// DIAG-OFT/BOFT with a trained `rescale`.
    pub rescaled: bool,
    /// A module on `conv_in`, `conv_out` or `time_embedding` (diffusers drops those).
    pub edge_module: bool,
}

fn is_edge_module(name: &str) -> bool {
    ["lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding"].iter().any(|p| name.starts_with(p))
}

impl Traits {
    pub fn of_module(m: &LoadedModule) -> Self {
        let spatial = m.weight_shape.len() == 4 && m.weight_shape[2] * m.weight_shape[3] > 1;
        Traits {
            algo: Some(m.algo),
            dora: m.dora,
            wd_on_output: m.wd_on_output.unwrap_or(true),
            tucker_conv: m.tucker && spatial,
            constraint: matches!(m.algo, FileAlgo::DiagOft | FileAlgo::Boft) && m.alpha.is_some_and(|a| a > 0.0),
            rescaled: m.tensors.contains_key("rescale"),
            edge_module: is_edge_module(&m.name),
        }
    }
}

/// One client's verdict on one module's traits.
pub fn judge(client: Client, t: &Traits) -> (Level, Vec<String>) {
    use FileAlgo as A;
    let Some(algo) = t.algo else { return (Level::Exact, vec![]) };
    let mut notes = Vec::new();
    let level = match client {
        Client::ComfyUi => match algo {
            A::Ia3 => {
                notes.push("IA3: ComfyUI has no IA3 loader (\"lora key not loaded\")".into());
                Level::No
            }
            A::Abba | A::GloraEx => {
                notes.push(format!("{}: no client reads these keys", algo.name()));
                Level::No
            }
            A::Lokr if t.tucker_conv => {
                notes.push("Tucker LoKr on 3×3 convs: ComfyUI fails on them and leaves those layers unpatched".into());
                Level::Partly
            }
            A::DiagOft | A::Boft => {
                let mut lvl = Level::Exact;
                if t.constraint {
                    notes.push(format!("{}: the constraint is read without the output-width factor", algo.name()));
                    lvl = Level::Partly;
                }
                if t.rescaled && algo == A::DiagOft {
                    notes.push("DIAG-OFT: `rescale` is ignored".into());
                    lvl = Level::Partly;
                }
                notes.push(format!("{}: exact at strength 1 only (ComfyUI applies the strength twice)", algo.name()));
                lvl
            }
            _ if t.dora => {
                let mut lvl = Level::Exact;
                if t.wd_on_output {
                    notes.push("DoRA per output row: ComfyUI normalises by ‖W‖ instead of ‖W+ΔW‖".into());
                    lvl = Level::Partly;
                }
                notes.push("DoRA at strength ≠ 1: ComfyUI interpolates weights instead of scaling the magnitude".into());
                lvl
            }
            _ => Level::Exact,
        },
        Client::A1111 => match algo {
            A::Lora | A::Locon if !t.dora => Level::Exact,
            A::Abba | A::GloraEx => {
                notes.push(format!("{}: no client reads these keys", algo.name()));
                Level::No
            }
            A::Boft => {
                notes.push("BOFT: A1111's OFT loader reads kohya OFT and DIAG-OFT blocks, not BOFT's butterfly".into());
                Level::No
            }
            _ => {
                notes.push(format!("{}: A1111/Forge has a loader; Loft has not compared its result", algo.name()));
                Level::Loads
            }
        },
        Client::Diffusers => match algo {
            A::Lora | A::Locon | A::LycorisLocon if t.tucker_conv => {
                notes.push("Tucker LoCon: diffusers rejects `lora_mid`".into());
                Level::No
            }
            A::Lora | A::Locon | A::LycorisLocon => {
                let mut lvl = Level::Exact;
                if t.edge_module {
                    notes.push("diffusers drops the conv_in, conv_out and time_embedding modules silently".into());
                    lvl = Level::Partly;
                }
                if t.dora {
                    notes.push("DoRA: diffusers drops `dora_scale` (with a warning)".into());
                    lvl = Level::Partly;
                }
                lvl
            }
            A::Norm => {
                notes.push("norm modules: diffusers does not read `w_norm`/`b_norm`".into());
                Level::No
            }
            other => {
                notes.push(format!("{}: diffusers reads only kohya LoRA/LoCon", other.name()));
                Level::No
            }
        },
    };
    (level, notes)
}

/// The worst verdict per client over a set of modules, with every note once.
fn combine(traits: impl Iterator<Item = Traits> + Clone) -> Vec<Verdict> {
    Client::ALL
        .iter()
        .map(|&client| {
            let mut level = Level::Exact;
            let mut notes = BTreeSet::new();
            let mut any_applied = false;
            let mut any = false;
            for t in traits.clone() {
                any = true;
                let (l, n) = judge(client, &t);
                any_applied |= l != Level::No;
                level = level.min(l);
                notes.extend(n);
            }
            // Some modules applied and some not: the file partly works.
            if level == Level::No && any_applied {
                level = Level::Partly;
            }
            if !any {
                level = Level::No;
            }
            Verdict { client, level, notes: notes.into_iter().collect() }
        })
        .collect()
}

/// Every client's verdict on a file.
pub fn of_file(file: &LoraFile) -> Vec<Verdict> {
    let traits: Vec<Traits> = file.modules.iter().map(Traits::of_module).collect();
    combine(traits.into_iter())
}

/// Every client's verdict on what training `algo` with `opts` will write (before training).
/// `edge_modules`: the preset adapts conv_in / conv_out / time_embedding.
pub fn of_config(algo: NetworkAlgo, opts: &NetworkOptions, edge_modules: bool) -> Vec<Verdict> {
    combine(config_traits(algo, opts, edge_modules).into_iter())
}

/// The module traits training `algo` with `opts` gives.
pub fn config_traits(algo: NetworkAlgo, opts: &NetworkOptions, edge_modules: bool) -> Vec<Traits> {
    // At the config level a conv rank means the k×k convs are adapted (as LoCon modules).
    let file_algo = FileAlgo::written_by(algo, opts.conv_dim.is_some());
    let dora_algos = matches!(algo, NetworkAlgo::LycorisLocon | NetworkAlgo::Loha | NetworkAlgo::Lokr | NetworkAlgo::Abba);
    let main = Traits {
        algo: Some(file_algo),
        dora: opts.dora_wd && dora_algos,
        wd_on_output: opts.wd_on_output,
        tucker_conv: opts.use_tucker && matches!(algo, NetworkAlgo::LycorisLocon | NetworkAlgo::Loha | NetworkAlgo::Lokr),
        constraint: matches!(algo, NetworkAlgo::DiagOft | NetworkAlgo::Boft) && opts.constraint > 0.0,
        rescaled: matches!(algo, NetworkAlgo::DiagOft | NetworkAlgo::Boft) && opts.rescaled,
        edge_module: false,
    };
    let mut traits = vec![main];
    if edge_modules {
        traits.push(Traits { edge_module: true, ..main });
    }
    if opts.train_norm {
        traits.push(Traits { algo: Some(FileAlgo::Norm), ..Traits::default() });
    }
    traits
}

/// Whether converting to a plain LoRA would help: some client falls short and some module is
/// not already a plain LoRA/LoCon (diffusers dropping conv_in of a plain LoCon is not fixed by
/// converting it again).
pub fn needs_conversion(verdicts: &[Verdict], traits: &[Traits]) -> bool {
    let plain = |t: &Traits| {
        matches!(t.algo, Some(FileAlgo::Lora | FileAlgo::Locon | FileAlgo::LycorisLocon)) && !t.dora && !t.tucker_conv
    };
    verdicts.iter().any(|v| v.level < Level::Loads) && !traits.iter().all(plain)
}

/// Whether [`needs_conversion`] holds for a file.
pub fn file_needs_conversion(file: &LoraFile) -> bool {
    let traits: Vec<Traits> = file.modules.iter().map(Traits::of_module).collect();
    needs_conversion(&of_file(file), &traits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(v: &[Verdict], c: Client) -> Level {
        v.iter().find(|x| x.client == c).unwrap().level
    }

    #[test]
    fn the_table_says_what_the_clients_do() {
        let o = NetworkOptions::default();
        let lora = of_config(NetworkAlgo::Lora, &o, false);
        assert!(Client::ALL.iter().all(|&c| level(&lora, c) == Level::Exact));
        assert!(!needs_conversion(&lora, &config_traits(NetworkAlgo::Lora, &o, false)));

        let ia3 = of_config(NetworkAlgo::Ia3, &o, false);
        assert_eq!(level(&ia3, Client::ComfyUi), Level::No);
        assert_eq!(level(&ia3, Client::Diffusers), Level::No);
        assert!(needs_conversion(&ia3, &config_traits(NetworkAlgo::Ia3, &o, false)));

        let abba = of_config(NetworkAlgo::Abba, &o, false);
        assert!(Client::ALL.iter().all(|&c| level(&abba, c) == Level::No));

        let dora = of_config(NetworkAlgo::LycorisLocon, &NetworkOptions { dora_wd: true, wd_on_output: true, ..o.clone() }, false);
        assert_eq!(level(&dora, Client::ComfyUi), Level::Partly);
        assert!(dora[0].notes.iter().any(|n| n.contains("‖W+ΔW‖")), "{dora:?}");
        assert_eq!(level(&dora, Client::Diffusers), Level::Partly);

        let locon_edges = of_config(NetworkAlgo::Lora, &NetworkOptions { conv_dim: Some(4), ..o.clone() }, true);
        assert_eq!(level(&locon_edges, Client::ComfyUi), Level::Exact);
        assert_eq!(level(&locon_edges, Client::Diffusers), Level::Partly);
        let edge_traits = config_traits(NetworkAlgo::Lora, &NetworkOptions { conv_dim: Some(4), ..o.clone() }, true);
        assert!(!needs_conversion(&locon_edges, &edge_traits), "a plain LoCon is already what convert writes");

        let oft = of_config(NetworkAlgo::DiagOft, &NetworkOptions { constraint: 1e-3, ..o.clone() }, false);
        assert_eq!(level(&oft, Client::ComfyUi), Level::Partly);
        let loha = of_config(NetworkAlgo::Loha, &o, false);
        assert_eq!(level(&loha, Client::ComfyUi), Level::Exact);
        assert_eq!(level(&loha, Client::A1111), Level::Loads);
        assert_eq!(level(&loha, Client::Diffusers), Level::No);
    }
}
