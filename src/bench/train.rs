//! `loft bench train`: Loft's LoRA training steps against PyTorch + LyCORIS on the same model
//! and shapes, in the same run on the same machine: seconds per step, peak memory, ratios.
//!
//! `--model sd15-synthetic` / `sdxl-synthetic` trains the full-size architecture with random
//! weights, written once into a cache folder (nothing is downloaded); a folder path trains
//! that diffusers model; the default is the tiny fixture. Loft's steps run in a child process
//! of this binary and PyTorch's in `tests/parity/bench_train.py`, each measured alone, so
//! each peak (resident memory; on CUDA the device memory PyTorch reserves) is its own.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use loft_worker::models::synthetic;
use loft_worker::profile;
use loft_worker::train::{run, CancelToken, RunOptions, TrainConfig, TrainEvent};
use serde_json::{json, Value};

#[derive(Args, Debug, Clone)]
pub struct BenchTrainArgs {
    /// `sd15-synthetic` or `sdxl-synthetic` (full size, random weights, generated on the
    /// spot), or a diffusers folder (default: the tiny fixture model).
    #[arg(long)]
    pub model: Option<String>,
    /// Timed training steps, after warm-up (default: 3 for a full-size model, 20 otherwise).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Image side in pixels (default: 256 for a full-size model, 64 otherwise).
    #[arg(long)]
    pub resolution: Option<u32>,
    /// Images per step.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// LoRA rank (alpha = rank).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Train a LoRA on the text encoder too.
    #[arg(long)]
    pub text_encoder: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// no, fp16 or bf16 (default: what the device prefers).
    #[arg(long)]
    pub mixed_precision: Option<String>,
    /// Store the frozen model's Linear/Conv2d weights in fp8 (`fp8_base`; needs fp16/bf16).
    #[arg(long)]
    pub fp8_base: bool,
    /// Also print where Loft's step goes (forward, backward, optimizer; time per op kind).
    #[arg(long)]
    pub profile: bool,
    /// Python with torch, diffusers and lycoris-lora for the reference run (default:
    /// `.venv-parity/bin/python` if present, else `python3`).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Measure Loft only.
    #[arg(long)]
    pub no_reference: bool,
    /// Where synthetic models are written (default: the system temp folder).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Internal: run Loft's measured steps in this process and print them as JSON.
    #[arg(long, hide = true)]
    pub child: bool,
}

const WARMUP_STEPS: u64 = 2;

struct Plan {
    model_dir: PathBuf,
    label: String,
    steps: u64,
    resolution: u32,
}

fn plan(args: &BenchTrainArgs) -> Result<Plan> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (model_dir, label, full_size) = match args.model.as_deref() {
        None => (repo.join("tests/fixtures/models/tiny-sd15"), "tiny SD1.5 fixture".to_string(), false),
        Some(name) if synthetic::family_of(name).is_some() => {
            let family = synthetic::family_of(name).expect("checked");
            let dir = args.cache_dir.clone().unwrap_or_else(std::env::temp_dir).join(format!("loft-{name}"));
            if !args.child {
                let t0 = Instant::now();
                if synthetic::ensure(family, &dir)? {
                    println!("wrote the {name} model (random weights) to {} in {:.0?}", dir.display(), t0.elapsed());
                }
            }
            (dir, format!("{name} (full size, random weights)"), true)
        }
        Some(path) => {
            let p = PathBuf::from(path);
            if !p.join("model_index.json").is_file() {
                bail!("--model {path}: expected {} or a diffusers folder (with model_index.json)", synthetic::NAMES.join(", "));
            }
            (p, path.to_string(), true)
        }
    };
    Ok(Plan {
        model_dir,
        label,
        steps: args.steps.unwrap_or(if full_size { 3 } else { 20 }).max(1),
        resolution: args.resolution.unwrap_or(if full_size { 256 } else { 64 }),
    })
}

pub fn run_bench(args: BenchTrainArgs) -> Result<()> {
    let plan = plan(&args)?;
    if args.child {
        return child(&args, &plan);
    }
    println!(
        "{}: {}×{}, batch {}, LoRA rank {} on the UNet{}, {} timed steps after {WARMUP_STEPS} warm-up, device {}",
        plan.label,
        plan.resolution,
        plan.resolution,
        args.batch_size,
        args.rank,
        if args.text_encoder { " and text encoder" } else { "" },
        plan.steps,
        args.device
    );
    // Loft, in a child process so its peak memory is its own.
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["bench", "train", "--child", "--model"]).arg(&plan.model_dir);
    cmd.args(["--steps", &plan.steps.to_string(), "--resolution", &plan.resolution.to_string()]);
    cmd.args(["--batch-size", &args.batch_size.to_string(), "--rank", &args.rank.to_string(), "--device", &args.device]);
    if args.text_encoder {
        cmd.arg("--text-encoder");
    }
    if args.profile {
        cmd.arg("--profile");
    }
    if args.fp8_base {
        cmd.arg("--fp8-base");
    }
    if let Some(mp) = &args.mixed_precision {
        cmd.args(["--mixed-precision", mp]);
    }
    let out = cmd.stderr(std::process::Stdio::inherit()).output().context("cannot run Loft's benchmark child")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let loft: Value = match text.lines().find_map(|l| l.strip_prefix("BENCH ")) {
        Some(line) if out.status.success() => serde_json::from_str(line)?,
        _ => bail!("Loft's benchmark run failed:\n{text}"),
    };
    let reference = if args.no_reference { None } else { reference(&args, &plan, &loft) };
    print_table(&args, &loft, reference.as_ref());
    if let Some(path) = &args.json_out {
        let all = json!({"model": plan.label, "resolution": plan.resolution, "batch": args.batch_size, "rank": args.rank,
            "text_encoder": args.text_encoder, "loft": loft, "pytorch": reference});
        std::fs::write(path, serde_json::to_vec_pretty(&all)?).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn reference(args: &BenchTrainArgs, plan: &Plan, loft: &Value) -> Option<Value> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = args.python.clone().unwrap_or_else(|| {
        let venv = repo.join(".venv-parity/bin/python");
        if venv.is_file() {
            venv
        } else {
            PathBuf::from("python3")
        }
    });
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let device = if loft["device"].as_str().unwrap_or("cpu").starts_with("cuda") { "cuda" } else { "cpu" };
    let dtype = match loft["mixed_precision"].as_str() {
        Some("bf16") => "bfloat16",
        Some("fp16") => "float16",
        _ => "float32",
    };
    let latent = loft["latent"].as_array().map(|a| a.iter().map(|v| v.as_u64().unwrap_or(0).to_string()).collect::<Vec<_>>()).unwrap_or_default();
    println!("PyTorch + LyCORIS: the same steps with {}…", python.display());
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(repo.join("tests/parity/bench_train.py")).arg("--model").arg(&plan.model_dir);
    cmd.args(["--steps", &plan.steps.to_string(), "--batch", &args.batch_size.to_string(), "--rank", &args.rank.to_string()]);
    cmd.arg("--latent").args(&latent);
    cmd.args(["--threads", &threads.to_string(), "--device", device, "--dtype", dtype]);
    if args.text_encoder {
        cmd.arg("--text-encoder");
    }
    match cmd.output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text.lines().last().unwrap_or("");
            match serde_json::from_str::<Value>(line) {
                Ok(v) => Some(v),
                Err(_) => {
                    println!("(reference output not understood: {line})");
                    None
                }
            }
        }
        Ok(out) if out.status.code().is_none() => {
            println!("(reference killed by a signal: out of memory? {})", out.status);
            None
        }
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let line = err.lines().rev().find(|l| l.contains("Error")).or_else(|| err.lines().rev().find(|l| !l.trim().is_empty()));
            println!("(reference failed: {})", line.unwrap_or(""));
            None
        }
        Err(e) => {
            println!("(reference not run: cannot start {}: {e}; install torch, diffusers and lycoris-lora)", python.display());
            None
        }
    }
}

fn print_table(args: &BenchTrainArgs, loft: &Value, reference: Option<&Value>) {
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let mem_label = if loft["device"].as_str().unwrap_or("").starts_with("cuda") { "peak VRAM GB" } else { "peak RSS GB" };
    let mem = |v: &Value| if f(v, "peak_vram_mb") > 0.0 { f(v, "peak_vram_mb") / 1024.0 } else { f(v, "peak_rss_mb") / 1024.0 };
    println!();
    println!("| engine            | s/step  | {mem_label:<12} |");
    println!("|-------------------|---------|--------------|");
    println!("| Loft ({:<11}) | {:>7.3} | {:>12.2} |", loft["device"].as_str().unwrap_or("?"), f(loft, "s_per_step"), mem(loft));
    if f(loft, "step_rss_mb") > 0.0 {
        println!(
            "  Loft: mixed precision {}{}, resident memory at the end of a step {:.2} GB (at most, over the steps)",
            loft["mixed_precision"].as_str().unwrap_or("?"),
            if loft["fp8_base"].as_bool() == Some(true) { " with an fp8 base" } else { "" },
            f(loft, "step_rss_mb") / 1024.0
        );
    }
    if let Some(r) = reference {
        println!("| PyTorch + LyCORIS | {:>7.3} | {:>12.2} |", f(r, "s_per_step"), mem(r));
        println!();
        println!(
            "Loft / PyTorch: step time {:.2}× (speed {:.2}×), peak memory {:.2}×  (torch {}, lycoris {})",
            f(loft, "s_per_step") / f(r, "s_per_step"),
            f(r, "s_per_step") / f(loft, "s_per_step"),
            mem(loft) / mem(r),
            r["torch"].as_str().unwrap_or("?"),
            r["lycoris"].as_str().unwrap_or("?")
        );
    }
    if args.profile {
        if let Some(rows) = loft["profile"].as_array() {
            let steps = (f(loft, "steps")).max(1.0);
            println!();
            println!("Where Loft's step goes (seconds per step; op rows are inside the phases):");
            for r in rows {
                println!("  {:<28} {:>8.3}", r["what"].as_str().unwrap_or("?"), r["seconds"].as_f64().unwrap_or(0.0) / steps);
            }
        }
    }
}

/// The measured run (in the child process): one folder of `batch` generated pictures, the
/// training loop with kohya LoRA, step times after the warm-up.
fn child(args: &BenchTrainArgs, plan: &Plan) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("loft-bench-{}", std::process::id()));
    let data = tmp.join("data/100_bench");
    std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    let side = plan.resolution;
    for i in 0..args.batch_size as u32 {
        let img = image::RgbImage::from_fn(side, side, |x, y| image::Rgb([(x * 255 / side) as u8, (y * 255 / side) as u8, (40 * i % 255) as u8]));
        img.save(data.join(format!("{i}.png")))?;
        std::fs::write(data.join(format!("{i}.txt")), "a photo of a shape")?;
    }
    let config = TrainConfig {
        model_family: family_of_folder(&plan.model_dir)?,
        pretrained_model_name_or_path: plan.model_dir.clone(),
        train_data_dir: tmp.join("data"),
        output_dir: tmp.join("out"),
        resolution: side,
        min_bucket_reso: 16.min(side),
        max_bucket_reso: side.max(64),
        bucket_reso_steps: 8,
        train_batch_size: args.batch_size,
        network_dim: args.rank,
        network_alpha: args.rank as f64,
        network_train_unet_only: !args.text_encoder,
        learning_rate: 1e-4,
        max_grad_norm: 1.0,
        max_train_epochs: 0,
        max_train_steps: plan.steps + WARMUP_STEPS,
        save_every_n_epochs: 0,
        device: args.device.clone(),
        mixed_precision: args.mixed_precision.clone().unwrap_or_else(|| "auto".into()),
        fp8_base: args.fp8_base,
        ..TrainConfig::default()
    };
    let mut stamps: Vec<Instant> = vec![];
    let mut losses = vec![];
    let mut info = vec![];
    let profile_on = args.profile;
    // Resident memory while the steps run: the model, adapters, optimizer and activations
    // (the peak can be the load, when a checkpoint is read and converted).
    let mut step_rss_kib = 0u64;
    let mut sink = |e: TrainEvent| match e {
        TrainEvent::Step { step, loss, .. } => {
            stamps.push(Instant::now());
            losses.push(loss);
            release_freed_memory();
            step_rss_kib = step_rss_kib.max(vm_kib("VmRSS:"));
            if profile_on && step == WARMUP_STEPS {
                profile::enable();
            }
        }
        TrainEvent::Log { message, .. } => info.push(message),
        _ => {}
    };
    let outcome = run(&config, &RunOptions::default(), &mut sink, &CancelToken::new());
    std::fs::remove_dir_all(&tmp).ok();
    outcome?;
    let secs = stamps[stamps.len() - 1].duration_since(stamps[WARMUP_STEPS as usize - 1]).as_secs_f64();
    let peak_rss_mb = vm_kib("VmHWM:") as f64 / 1024.0;
    let step_rss_mb = step_rss_kib as f64 / 1024.0;
    let device = info.iter().find_map(|m| m.strip_prefix("device: ")).unwrap_or("cpu").to_string();
    let mixed = info.iter().find_map(|m| m.strip_prefix("mixed precision: ")).unwrap_or("no").to_string();
    let latent_side = side as usize / 8;
    let mut profile_rows = vec![];
    if args.profile {
        for (kind, s) in profile::totals() {
            profile_rows.push(json!({"what": kind.label(), "seconds": s}));
        }
    }
    let result = json!({
        "steps": plan.steps, "seconds": secs, "s_per_step": secs / plan.steps as f64, "peak_rss_mb": peak_rss_mb,
        "step_rss_mb": step_rss_mb, "fp8_base": args.fp8_base, "peak_vram_mb": 0.0, "device": device, "mixed_precision": mixed, "latent": [latent_side, latent_side],
        "losses": losses, "profile": profile_rows,
    });
    println!("BENCH {result}");
    Ok(())
}

/// The family of a diffusers folder, from its model index and first text encoder's config.
fn family_of_folder(dir: &Path) -> Result<loft_worker::models::ModelFamily> {
    let read = |rel: &str| -> Result<Value> {
        let path = dir.join(rel);
        serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?)
            .with_context(|| format!("{} is not JSON", path.display()))
    };
    let index = read("model_index.json")?;
    let te = read("text_encoder/config.json")?;
    let second = index.get("text_encoder_2").is_some_and(|v| v.is_array() && !v[0].is_null());
    Ok(loft_worker::models::ModelFamily::of_diffusers(if second { 2 } else { 1 }, te["hidden_act"].as_str().unwrap_or("")))
}

/// A `/proc/self/status` memory figure (`VmHWM:`) in KiB (0 where there is no /proc).
/// Hands memory the allocator keeps after frees back to the system, so the resident size
/// measures live data (glibc keeps freed heap pages, e.g. a checkpoint's weights after they
/// were converted to fp8).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: glibc's malloc_trim only releases free pages; it takes no pointers.
        unsafe {
            malloc_trim(0);
        }
    }
}

fn vm_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix(field).and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())))
        .unwrap_or(0)
}

/// `loft bench check-device`: the ops and the fixture models' gradients on `spec` against the
/// CPU reference; fails when any case is beyond its tolerance.
pub fn check_device(spec: &str, fixtures: &Path) -> Result<()> {
    use loft_worker::networks::NetworkAlgo;
    use loft_worker::ops::check;
    let (device, line) = loft_worker::device::select(spec).map_err(|e| anyhow::anyhow!("--device: {e:#}"))?;
    println!("{line}");
    // f32 everywhere; a GPU's libraries sum in other orders than the CPU's.
    let (op_tol, model_tol) = if device.is_cpu() { (1e-5, 2e-4) } else { (1e-4, 2e-3) };
    let mut failed = 0;
    println!("| case | max relative difference | within |");
    println!("|---|---|---|");
    for r in check::check_ops(&device)? {
        let ok = r.rel_diff <= op_tol;
        failed += usize::from(!ok);
        println!("| {} | {:.2e} | {} |", r.name, r.rel_diff, if ok { format!("{op_tol:e}") } else { "NO".into() });
    }
    for name in ["tiny-sd15", "tiny-sdxl"] {
        for algo in [NetworkAlgo::Lora, NetworkAlgo::Locon, NetworkAlgo::Full] {
            let t0 = Instant::now();
            let (n, worst) = check::check_model_gradients(&fixtures.join(name), algo, &device)
                .with_context(|| format!("{name} {}", algo.name()))?;
            let ok = worst <= model_tol;
            failed += usize::from(!ok);
            println!(
                "| {name} {} gradients ({n} tensors, {:.1?}) | {worst:.2e} | {} |",
                algo.name(),
                t0.elapsed(),
                if ok { format!("{model_tol:e}") } else { "NO".into() }
            );
        }
    }
    if failed > 0 {
        bail!("{failed} case(s) beyond tolerance on {}", loft_worker::device::describe(&device));
    }
    println!("all cases within tolerance on {}", loft_worker::device::describe(&device));
    Ok(())
}
