//! `loft lora …`: inspect and resize kohya / LyCORIS network files.
//!
//! - `loft lora inspect FILE [--json]`: algorithms, rank/alpha per module group (unet / te /
//!   te1 / te2, by block), module count, base model version and the `ss_*` metadata.
//! - `loft lora resize FILE --rank R [--dynamic sv_fro=0.9] --out FILE`: SVD rank reduction
//!   as sd-scripts' `resize_lora.py`, reporting the retained Frobenius energy per module.
//! - `loft lora convert FILE --to lora (--rank R | --energy E) [--conv-rank R] --base MODEL
//!   --out FILE`: any algorithm's modules as a plain kohya LoRA/LoCon by truncated SVD of
//!   their effective ΔW, with the retained energy per module ([`loft_worker::lora_file::convert`]).
//! - `loft lora merge --base MODEL --lora FILE[:weight] … --out PATH`: merges networks into a
//!   diffusers folder or a single-file checkpoint, writing the same layout
//!   ([`loft_worker::lora_file::merge`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;
use loft_worker::lora_file::convert::{convert, Conversion, RankChoice};
use loft_worker::lora_file::merge::{merge, parse_lora_arg, BaseModel, MergeInput};
use loft_worker::lora_file::resize::{resize, DynamicMethod};
use loft_worker::lora_file::{
    module_group, parse_save_precision, py_float, save_tensors, LoraFile, MultiplierRule,
};
use serde_json::json;

#[derive(Subcommand, Debug)]
pub enum LoraCommand {
    /// Show what a LoRA / LyCORIS file holds: algorithms, ranks, alphas, modules, metadata.
    Inspect {
        /// The .safetensors file.
        file: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Reduce the rank of a LoRA / LoCon file by SVD (as sd-scripts' resize_lora.py).
    Resize {
        /// The .safetensors file to resize.
        file: PathBuf,
        /// New rank; with --dynamic, the largest rank allowed.
        #[arg(long)]
        rank: usize,
        /// Pick each module's rank: sv_ratio=X, sv_fro=X or sv_cumulative=X.
        #[arg(long)]
        dynamic: Option<String>,
        /// Where to write the resized file.
        #[arg(long)]
        out: PathBuf,
        /// Precision of the saved tensors: float, fp16 or bf16.
        #[arg(long, default_value = "float")]
        save_precision: String,
        /// Print the per-module report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rewrite any network file (LoHa, LoKr, IA3, OFT, BOFT, GLoRA, ABBA, DoRA, full, …) as a
    /// plain kohya LoRA/LoCon that every client reads: each module's effective ΔW at
    /// multiplier 1, truncated by SVD (exact near full rank, randomised otherwise).
    Convert {
        /// The network file to convert.
        file: PathBuf,
        /// The target format (only `lora`: kohya lora_down / lora_up / alpha).
        #[arg(long, default_value = "lora")]
        to: String,
        /// Rank of every module (capped by its full rank).
        #[arg(long, conflicts_with = "energy", required_unless_present = "energy")]
        rank: Option<usize>,
        /// Pick each module's rank: the smallest that keeps this fraction of ‖ΔW‖² (e.g. 0.99).
        #[arg(long)]
        energy: Option<f64>,
        /// Rank of the k×k convolutions, if it should differ from --rank.
        #[arg(long, requires = "rank")]
        conv_rank: Option<usize>,
        /// The base model the network was trained on (diffusers folder or single file):
        /// OFT, IA3, DoRA and GLoRA change the weight in a way that depends on it, and it
        /// gives every conv layer its kernel shape.
        #[arg(long)]
        base: PathBuf,
        /// For a single-file base whose sizes break the family rules: its configs' folder.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where to write the LoRA; must not exist.
        #[arg(long)]
        out: PathBuf,
        /// Precision of the saved tensors: float, fp16 or bf16.
        #[arg(long, default_value = "float")]
        save_precision: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Merge LoRA / LyCORIS files into a model's UNet and text encoder weights.
    Merge {
        /// The base model: a diffusers folder or a single-file .safetensors checkpoint.
        #[arg(long)]
        base: PathBuf,
        /// A network file, optionally with its strength (FILE:0.7); repeat for several. The
        /// strength follows LyCORIS's definition: inside DoRA's weight norm and the DIAG-OFT/BOFT
        /// rotation, a plain scale of ΔW for every other algorithm.
        #[arg(long = "lora", required = true)]
        loras: Vec<String>,
        /// Scale every file's ΔW(1) by its strength instead (what ComfyUI's strength slider
        /// does); differs from the default only for DoRA, DIAG-OFT and BOFT at strengths ≠ 1.
        #[arg(long)]
        linear_multiplier: bool,
        /// Where to write the merged model (a folder for a diffusers base, a .safetensors
        /// file for a single file); must not exist.
        #[arg(long)]
        out: PathBuf,
        /// For a single-file base whose sizes break the family rules: a diffusers folder
        /// whose config.json files describe it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: LoraCommand) -> Result<()> {
    match cmd {
        LoraCommand::Inspect { file, json } => {
            let report = inspect(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", inspect_table(&report));
            }
            Ok(())
        }
        LoraCommand::Resize {
            file,
            rank,
            dynamic,
            out,
            save_precision,
            json,
        } => {
            let dtype = parse_save_precision(&save_precision)?;
            let dynamic = dynamic.as_deref().map(DynamicMethod::parse).transpose()?;
            let f = LoraFile::load(&file)?;
            let r = resize(&f, rank, dynamic, dtype)?;
            save_tensors(&out, &r.tensors, &r.metadata)?;
            if json {
                let v = json!({
                    "file": file.display().to_string(),
                    "out": out.display().to_string(),
                    "old_max_rank": r.old_max_rank,
                    "mean_fro_retained": r.mean_fro_retained(),
                    "modules": r.modules,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<72} {:>5} {:>5} {:>9} {:>9} {:>9}",
                    "module", "old", "new", "alpha", "fro kept", "sum kept"
                );
                for m in &r.modules {
                    if m.resized {
                        println!(
                            "{:<72} {:>5} {:>5} {:>9} {:>8.2}% {:>8.2}%",
                            m.name,
                            m.old_rank.unwrap_or(0),
                            m.new_rank.unwrap_or(0),
                            py_float(m.new_alpha.unwrap_or(0.0)),
                            100.0 * m.fro_retained.unwrap_or(f64::NAN),
                            100.0 * m.sum_retained.unwrap_or(f64::NAN),
                        );
                    } else {
                        println!(
                            "{:<72} skipped: {}",
                            m.name,
                            m.note.as_deref().unwrap_or("")
                        );
                    }
                }
                if let Some(mean) = r.mean_fro_retained() {
                    println!("average Frobenius norm retained: {:.2}%", 100.0 * mean);
                }
                println!("wrote {}", out.display());
            }
            Ok(())
        }
        LoraCommand::Convert { file, to, rank, energy, conv_rank, base, config, out, save_precision, json } => {
            if to != "lora" {
                anyhow::bail!("--to {to:?}: the only target is `lora` (kohya LoRA/LoCon)");
            }
            if out.exists() {
                anyhow::bail!("{} already exists; convert writes a new file", out.display());
            }
            let choice = match (rank, energy) {
                (Some(linear), None) => RankChoice::Rank { linear, conv: conv_rank },
                (None, Some(e)) => RankChoice::Energy(e),
                _ => anyhow::bail!("give exactly one of --rank or --energy"),
            };
            let dtype = parse_save_precision(&save_precision)?;
            let f = LoraFile::load(&file)?;
            let model = BaseModel::open(&base, config.as_deref())?;
            let c = convert(&f, choice, dtype, &|m| model.layer_for(m))?;
            save_tensors(&out, &c.tensors, &c.metadata)?;
            if json {
                let v = json!({
                    "file": file.display().to_string(),
                    "out": out.display().to_string(),
                    "retained_energy": c.overall_energy(),
                    "rel_error": c.overall_rel_error(),
                    "modules": c.modules,
                    "skipped": c.skipped,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", convert_table(&c));
                println!("wrote {}", out.display());
            }
            Ok(())
        }
        LoraCommand::Merge { base, loras, out, config, json, linear_multiplier } => {
            let rule = if linear_multiplier { MultiplierRule::Linear } else { MultiplierRule::Lycoris };
            let inputs = loras
                .iter()
                .map(|arg| {
                    let (path, multiplier) = parse_lora_arg(arg);
                    Ok(MergeInput { file: LoraFile::load(&path)?, multiplier, rule })
                })
                .collect::<Result<Vec<_>>>()?;
            let r = merge(&base, &inputs, &out, config.as_deref())?;
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("base:    {} ({}, {})", base.display(), r.family.name(), r.layout.replace('_', "-"));
                for f in &r.files {
                    println!(
                        "merged:  {} × {} ({} modules{})",
                        f.path.display(),
                        py_float(f.multiplier),
                        f.matched,
                        if f.unmatched.is_empty() { String::new() } else { format!(", {} skipped", f.unmatched.len()) }
                    );
                }
                println!("changed: {} tensors", r.tensors_changed);
                println!("wrote {}", r.out.display());
            }
            Ok(())
        }
    }
}

/// The per-module report of a conversion and its overall figures.
pub fn convert_table(c: &Conversion) -> String {
    let mut out = format!(
        "{:<72} {:<14} {:>5} {:>5} {:>10} {:>10}  {}\n",
        "module", "from", "full", "rank", "energy", "rel err", "svd"
    );
    for m in &c.modules {
        out += &format!(
            "{:<72} {:<14} {:>5} {:>5} {:>9.4}% {:>10.3e}  {}\n",
            m.name,
            m.algo,
            m.full_rank,
            m.rank,
            100.0 * m.energy,
            m.rel_error,
            m.svd
        );
        for d in &m.dropped {
            out += &format!("    left out: {d}\n");
        }
    }
    for s in &c.skipped {
        out += &format!("{:<72} {:<14} skipped: {}\n", s.name, s.algo, s.reason);
    }
    out += &format!(
        "overall: {} modules, retained energy {:.4}%, relative error {:.3e}\n",
        c.modules.len(),
        100.0 * c.overall_energy(),
        c.overall_rel_error()
    );
    out
}

fn fmt_set<T: ToString>(v: &BTreeSet<T>) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The inspect report (what `--json` prints).
pub fn inspect(path: &Path) -> Result<serde_json::Value> {
    let f = LoraFile::load(path)?;
    #[derive(Default)]
    struct G {
        count: usize,
        algos: BTreeSet<String>,
        ranks: BTreeSet<usize>,
        alphas: BTreeSet<String>,
    }
    let mut groups: BTreeMap<(String, String), G> = BTreeMap::new();
    let mut modules = Vec::new();
    for m in &f.modules {
        let (part, block) = module_group(&m.name);
        let g = groups.entry((part.clone(), block.clone())).or_default();
        g.count += 1;
        g.algos.insert(m.algo.name().to_string());
        if let Some(r) = m.rank {
            g.ranks.insert(r);
        }
        if let Some(a) = m.alpha {
            g.alphas.insert(py_float(a));
        }
        modules.push(json!({
            "name": m.name,
            "part": part,
            "block": block,
            "algo": m.algo.name(),
            "rank": m.rank,
            "alpha": m.alpha,
            "tucker": m.tucker,
            "dora": m.dora,
            "wd_on_output": m.wd_on_output,
            "weight_shape": m.weight_shape,
        }));
    }
    let groups: Vec<serde_json::Value> = groups
        .into_iter()
        .map(|((part, block), g)| {
            json!({
                "part": part, "block": block, "modules": g.count,
                "algorithms": g.algos, "ranks": g.ranks, "alphas": g.alphas,
            })
        })
        .collect();
    let algos: BTreeSet<&str> = f.modules.iter().map(|m| m.algo.name()).collect();
    let mut parts: BTreeMap<String, usize> = BTreeMap::new();
    for m in &f.modules {
        *parts.entry(module_group(&m.name).0).or_default() += 1;
    }
    // Each verdict with its display labels, so the table below needs no second mapping.
    let clients: Vec<serde_json::Value> = loft_worker::lora_file::compat::of_file(&f)
        .into_iter()
        .map(|v| {
            json!({
                "client": v.client, "client_label": v.client.label(),
                "level": v.level, "level_label": v.level.label(), "notes": v.notes,
            })
        })
        .collect();
    Ok(json!({
        "file": path.display().to_string(),
        "clients": clients,
        "needs_conversion": loft_worker::lora_file::compat::file_needs_conversion(&f),
        "algorithms": algos,
        "module_count": f.modules.len(),
        "modules_per_part": parts,
        "base_model_version": f.base_model_version(),
        "network_module": f.metadata.get("ss_network_module"),
        "network_dim": f.metadata.get("ss_network_dim"),
        "network_alpha": f.metadata.get("ss_network_alpha"),
        "network_args": f.network_args(),
        "groups": groups,
        "modules": modules,
        "metadata": f.metadata,
    }))
}

fn s(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "unknown".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The human-readable form of [`inspect`].
pub fn inspect_table(r: &serde_json::Value) -> String {
    let mut out = String::new();
    let list = |v: &serde_json::Value| -> String {
        let items: BTreeSet<String> = v
            .as_array()
            .map(|a| a.iter().map(s).collect())
            .unwrap_or_default();
        fmt_set(&items)
    };
    out += &format!("file:            {}\n", s(&r["file"]));
    out += &format!("algorithm(s):    {}\n", list(&r["algorithms"]));
    out += &format!("modules:         {}", r["module_count"]);
    if let Some(p) = r["modules_per_part"].as_object() {
        let parts: Vec<String> = p.iter().map(|(k, v)| format!("{k} {v}")).collect();
        out += &format!(" ({})", parts.join(", "));
    }
    out += "\n";
    out += &format!("base model:      {}\n", s(&r["base_model_version"]));
    out += &format!("network module:  {}\n", s(&r["network_module"]));
    out += &format!(
        "dim / alpha:     {} / {}\n\n",
        s(&r["network_dim"]),
        s(&r["network_alpha"])
    );
    out += "clients:\n";
    for v in r["clients"].as_array().into_iter().flatten() {
        out += &format!("  {:<12} {}\n", s(&v["client_label"]), s(&v["level_label"]));
        for n in v["notes"].as_array().into_iter().flatten() {
            out += &format!("               - {}\n", s(n));
        }
    }
    if r["needs_conversion"] == true {
        out += "  → `loft lora convert FILE --to lora --energy 0.999 --base MODEL --out OUT` makes a plain LoRA every client applies exactly.\n";
    }
    out += "\n";
    out += &format!(
        "{:<8} {:<20} {:>7}  {:<16} {:<10} {:<10}\n",
        "part", "block", "modules", "algorithm", "rank", "alpha"
    );
    for g in r["groups"].as_array().into_iter().flatten() {
        out += &format!(
            "{:<8} {:<20} {:>7}  {:<16} {:<10} {:<10}\n",
            s(&g["part"]),
            s(&g["block"]),
            g["modules"],
            list(&g["algorithms"]),
            list(&g["ranks"]),
            list(&g["alphas"]),
        );
    }
    if let Some(meta) = r["metadata"].as_object() {
        if !meta.is_empty() {
            out += "\nmetadata:\n";
            for (k, v) in meta {
                let mut v = s(v);
                if v.chars().count() > 200 {
                    v = v.chars().take(200).collect::<String>() + "…";
                }
                out += &format!("  {k} = {v}\n");
            }
        }
    }
    out
}
