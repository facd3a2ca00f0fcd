//! The `sppo` command line. Work lives in the library; this file parses flags and reports.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use sppo::backend::cpu::CpuBackend;
use sppo::backend::Backend;
use sppo::chat::Message;
use sppo::generate::{encode_records, generate_records, DecodeWeights, GenOptions};
use sppo::logprobs::{output_line, parse_example, score, TextCodec};
use sppo::model::Llama;
use sppo::prompts::{load_prompts_limit, PromptRecord};
use sppo::run::memory::Job;
use sppo::sampling::SamplingParams;
use std::io::{BufRead, Write};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "sppo", version, about = "Self-Play Preference Optimization for Llama/Mistral models")]
struct Cli {
    /// CPU threads (default: all cores).
    #[arg(long, global = true, env = "SPPO_THREADS")]
    threads: Option<usize>,
    /// Device of `generate`, `logprobs`, `train`, `run`, `eval` and `rank`: the policy and the model
    /// oracles (similarity, reward, judge; a `command:` oracle is its own program): cpu, cuda, or
    /// auto (the GPU when usable, else the CPU with the reason printed). Without it: cuda when a
    /// usable GPU is found, else the CPU without a word (the CPU is then the expected device).
    #[arg(long, global = true, env = "SPPO_DEVICE", value_enum)]
    device: Option<DeviceArg>,
    /// CUDA kernel variants by name, `concern=variant,...` (e.g. `attention=naive`); also the
    /// SPPO_KERNELS environment variable. Unknown names are errors listing the choices.
    #[arg(long, global = true)]
    kernel: Option<String>,
    /// Storage precision on cuda: bf16 (default there: bf16 activations and parameters with f32
    /// master weights, f32 gradients, optimizer state and accumulation) or f32. The CPU computes
    /// in f32 only.
    #[arg(long, global = true, env = "SPPO_PRECISION", value_enum)]
    precision: Option<PrecisionArg>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert a GGUF file into a Hugging Face model directory.
    Convert(ConvertArgs),
    /// Generate chat responses for prompts.
    Generate(GenerateArgs),
    /// Score (prompt, response) pairs: summed response log-probs.
    Logprobs(LogprobsArgs),
    /// Rank generated responses with a preference oracle: chosen/rejected and the SPPO targets.
    Rank(RankArgs),
    /// Train π_{t+1} from π_t on ranked data (our `rank` output or the reference pipeline's Parquet).
    Train(TrainArgs),
    /// The SPPO loop: sample, rank, train for N iterations (resumable).
    Run(RunArgs),
    /// Evaluate a run's checkpoints on held-out prompts: win-rates, game exploitability, plots.
    Eval(EvalArgs),
    /// Redraw a run's plots (plots/*.png) from its metrics and evaluation.
    Plot(PlotArgs),
    /// Show the devices sppo can use.
    Info,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PrecisionArg {
    F32,
    Bf16,
}

/// The backend a command runs on (`--device`).
enum Device {
    Cpu(CpuBackend),
    Cuda(Box<sppo::backend::cuda::CudaBackend>),
}

/// Opens the backend `--device` asks for (none: `auto` without the fallback note); `auto` falls
/// back to the CPU with the reason printed,
/// `cuda` without a usable GPU is an error naming why (never a panic from a missing driver).
/// `--precision` on cuda: bf16 unless f32 is asked for; on the CPU, f32 (bf16 asked for
/// explicitly is an error for `--device cpu`, a note when `auto` falls back to the CPU).
fn open_device(device: Option<DeviceArg>, kernel: Option<&str>, threads: Option<usize>, precision: Option<PrecisionArg>) -> Result<Device> {
    use sppo::backend::cuda::{kernel_choice::KernelChoice, probe, CudaBackend};
    use sppo::backend::Precision;
    let kernels = KernelChoice::from_env(kernel)?;
    let on_gpu = match precision {
        Some(PrecisionArg::F32) => Precision::F32,
        Some(PrecisionArg::Bf16) | None => Precision::Bf16,
    };
    let cuda = |why: &str| -> Result<Device> {
        let b = CudaBackend::new(0, kernels, on_gpu).with_context(|| format!("{why}: opening GPU 0"))?;
        eprintln!("device: cuda ({}, precision {on_gpu}, kernels {})", b.device().name(), kernels.describe());
        Ok(Device::Cuda(Box::new(b)))
    };
    // No --device: cuda when usable, as `auto`, but a CPU machine stays quiet about it.
    let (device, announce_fallback) = match device {
        Some(d) => (d, true),
        None => (DeviceArg::Auto, false),
    };
    match device {
        DeviceArg::Cpu if precision == Some(PrecisionArg::Bf16) => {
            bail!("--precision bf16 is for --device cuda: the CPU backend computes in f32 only")
        }
        DeviceArg::Cpu => Ok(Device::Cpu(CpuBackend::new(threads)?)),
        DeviceArg::Cuda => match probe().unavailable_reason() {
            Some(reason) => bail!("--device cuda: {reason}"),
            None => cuda("--device cuda"),
        },
        DeviceArg::Auto => match probe().unavailable_reason() {
            None => cuda("--device auto"),
            Some(reason) => {
                if announce_fallback {
                    eprintln!("device: cpu ({reason})");
                }
                if precision == Some(PrecisionArg::Bf16) {
                    eprintln!("note: --precision bf16 applies to cuda; the CPU computes in f32");
                }
                Ok(Device::Cpu(CpuBackend::new(threads)?))
            }
        },
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
}

#[derive(Args)]
struct ConvertArgs {
    /// The GGUF file to read.
    #[arg(long = "from-gguf")]
    from_gguf: PathBuf,
    /// The Hugging Face directory to write (replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// Tensor dtype of model.safetensors (f32 keeps the exact dequantised values).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
}

#[derive(Args)]
struct GenerateArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json, chat template).
    #[arg(long)]
    model: PathBuf,
    /// A single prompt (a user message).
    #[arg(long, conflicts_with = "prompts")]
    prompt: Option<String>,
    /// Prompt file: JSONL (`prompt`, `instruction` or `messages`), Parquet, or ShareGPT JSON.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Use only the first N prompts of the file.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling threshold (1 disables).
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Keep the k most likely tokens (0 disables).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens below min_p × the top probability (0 disables).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Responses per prompt.
    #[arg(long, default_value_t = 1)]
    num_samples: u32,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Weights decoding reads: auto (a bf16 copy when exact, e.g. a bf16 checkpoint), f32, or
    /// bf16 (weights rounded to bf16: half the weight traffic of CPU decoding, bf16-rounded logits).
    #[arg(long, value_enum, default_value_t = sppo::generate::DecodeWeights::Auto)]
    decode_weights: sppo::generate::DecodeWeights,
    /// Write JSONL here instead of printing responses.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct LogprobsArgs {
    #[arg(long)]
    model: PathBuf,
    /// JSONL: `prompt_ids`+`response_ids`, `prompt`+`response`, or chat `messages`.
    #[arg(long)]
    data: PathBuf,
    /// Output JSONL (default: stdout).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Tokens per packed forward.
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
}

#[derive(Args)]
struct RankArgs {
    /// Oracle spec: similarity:DIR[,tau=T], reward:DIR, judge:DIR[,template=FILE],
    /// command:"CMD ARGS"[,timeout=SECONDS], game:NAME[,key=value...].
    #[arg(long)]
    oracle: String,
    /// Generations: JSONL or Parquet with `prompt` and `responses` (generate's output).
    #[arg(long = "in")]
    input: PathBuf,
    /// Ranked output, JSONL or `.parquet`; an existing partial output is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Win-rate estimator: `scores` (the reference's) or `pairwise` (direct mean of P_ij).
    #[arg(long, default_value = "scores")]
    winrate: sppo::oracle::winrate::WinRate,
    /// Prompts per oracle call (and per fsync of the output).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
}

#[derive(Args)]
struct TrainArgs {
    // `--model` (the policy to start from; also the frozen reference π_t) is one of the run keys:
    // a second definition here made clap panic.
    /// Ranked data: JSONL (`sppo rank` output) or Parquet (prompt, chosen, rejected, chosen_probs*).
    #[arg(long)]
    data: PathBuf,
    /// Output directory: the trained checkpoint (Hugging Face format) and metrics.jsonl.
    #[arg(long)]
    out: PathBuf,
    /// The run keys that apply to training (loss_type, beta/eta, learning_rate, ...).
    #[command(flatten)]
    keys: sppo::run::config::RunKeys,
    /// A TOML file with the same keys (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// A TOML file with the run keys (flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run in this directory (its config.json is reused).
    #[arg(long)]
    resume: Option<PathBuf>,
    #[command(flatten)]
    keys: sppo::run::config::RunKeys,
    /// Print errors only.
    #[arg(long, conflicts_with_all = ["verbose", "log_json"])]
    quiet: bool,
    /// Print a line per optimizer step and stage timings too.
    #[arg(long, conflicts_with = "log_json")]
    verbose: bool,
    /// Print one JSON object per event on stderr (stage start/end, step metrics, evaluation).
    #[arg(long)]
    log_json: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// The run directory (finished or partial: every completed checkpoint is evaluated).
    #[arg(long)]
    run_dir: PathBuf,
    /// Held-out prompts (default: the run's `eval_prompts` tail of its prompt file).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Judge with this oracle instead of the run's.
    #[arg(long)]
    oracle: Option<String>,
    /// Responses per prompt and policy (default: the run's `eval_num_samples`).
    #[arg(long)]
    num_samples: Option<u32>,
}

#[derive(Args)]
struct PlotArgs {
    #[arg(long)]
    run_dir: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        // Distinct statuses for a NaN/Inf stop (3), too little memory (4), a full disk (5).
        std::process::exit(sppo::run::exit_code(&e));
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Convert(a) => {
            let dtype = match a.dtype {
                DtypeArg::F32 => sppo::formats::convert::OutDtype::F32,
                DtypeArg::Bf16 => sppo::formats::convert::OutDtype::Bf16,
            };
            let report = sppo::formats::convert::convert_gguf_to_hf(&a.from_gguf, &a.out, dtype)?;
            eprintln!("wrote {} ({} tensors)", a.out.display(), report.tensors.len());
            Ok(())
        }
        Cmd::Generate(a) => match open_device(cli.device, cli.kernel.as_deref(), cli.threads, cli.precision)? {
            Device::Cpu(b) => cmd_generate(&b, a),
            Device::Cuda(b) => cmd_generate(&*b, a),
        },
        Cmd::Logprobs(a) => match open_device(cli.device, cli.kernel.as_deref(), cli.threads, cli.precision)? {
            Device::Cpu(b) => cmd_logprobs(&b, a),
            Device::Cuda(b) => cmd_logprobs(&*b, a),
        },
        Cmd::Rank(a) => cmd_rank(a, cli.threads, cli.device, cli.kernel.as_deref(), cli.precision),
        Cmd::Train(a) => cmd_train(a, cli.threads, cli.device, cli.kernel.as_deref(), cli.precision),
        Cmd::Run(a) => cmd_run(a, cli.threads, cli.device, cli.kernel.as_deref(), cli.precision),
        Cmd::Eval(a) => cmd_eval(a, cli.threads, cli.device, cli.kernel.as_deref(), cli.precision),
        Cmd::Plot(a) => {
            for p in sppo::run::plots::write_plots(&a.run_dir)? {
                eprintln!("wrote {}", p.display());
            }
            Ok(())
        }
        Cmd::Info => {
            println!("cpu: {} threads", rayon::current_num_threads());
            println!("cuda: {}", sppo::backend::cuda::probe());
            Ok(())
        }
    }
}

fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(&format!("{{spinner}} {what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}, {{per_sec}}]"))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

fn cmd_generate<B: Backend>(b: &B, a: GenerateArgs) -> Result<()> {
    let records: Vec<PromptRecord> = match (&a.prompt, &a.prompts) {
        (Some(p), None) => vec![PromptRecord { id: "0".into(), messages: vec![Message { role: "user".into(), content: p.clone() }], reference: None }],
        (None, Some(path)) => load_prompts_limit(path, a.limit)?,
        _ => bail!("give --prompt TEXT or --prompts FILE"),
    };
    let cfg = sppo::config::ModelConfig::from_model_dir(&a.model)?;
    let codec = TextCodec::from_model_dir(&a.model, cfg.vocab_size)?.with_context(|| format!("{}: generation needs tokenizer.json", a.model.display()))?;
    // Encoded before the weights load: the memory check needs the prompts' lengths.
    let prompt_ids = encode_records(&codec, &records)?;
    let lengths: Vec<usize> = prompt_ids.iter().map(Vec::len).collect();
    // The CPU keeps a bf16 copy of the weights while generating: on request, or (auto) when the
    // checkpoint is bf16 so the copy is exact.
    let decode_copy = b.device_memory()?.is_none() && (a.decode_weights == DecodeWeights::Bf16 || (a.decode_weights == DecodeWeights::Auto && cfg.stored_dtype == "bfloat16"));
    let job = Job::Generation {
        batch: a.batch_size.min(records.len() * a.num_samples as usize).max(1),
        longest_prompt: lengths.iter().copied().max().unwrap_or(0),
        prompt_tokens: lengths.iter().sum::<usize>() * a.num_samples as usize,
        new_tokens: a.max_new_tokens,
        decode_copy,
    };
    sppo::run::check_memory_job(b, &cfg, &a.model, job)?;
    let mut model = Llama::load(b, &a.model)?;
    let sampling = SamplingParams { temperature: a.temperature, top_p: a.top_p, top_k: a.top_k, min_p: a.min_p };
    let opts = GenOptions {
        sampling,
        max_new_tokens: a.max_new_tokens,
        eos_ids: vec![],
        seed: a.seed,
        iteration: 0,
        batch_size: a.batch_size,
        max_prefill_tokens: sppo::run::memory::PACKED_TOKENS,
        weights: a.decode_weights,
    };
    let pb = progress_bar((records.len() * a.num_samples as usize * a.max_new_tokens) as u64, "tokens");
    let start = std::time::Instant::now();
    let (lines, total) = generate_records(b, &mut model, &codec, &a.model, &records, &prompt_ids, a.num_samples, opts, |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    eprintln!("generated {total} tokens in {:.1} s ({:.1} tokens/s)", start.elapsed().as_secs_f64(), total as f64 / start.elapsed().as_secs_f64());

    match &a.out {
        Some(path) => {
            let mut text = String::new();
            for l in &lines {
                text.push_str(&l.to_string());
                text.push('\n');
            }
            sppo::io::write_atomic(path, text.as_bytes())?;
            eprintln!("wrote {}", path.display());
        }
        None => {
            let mut out = std::io::stdout().lock();
            for l in &lines {
                writeln!(out, "### {}", l["prompt"].as_str().unwrap_or_default())?;
                for r in l["responses"].as_array().into_iter().flatten() {
                    writeln!(out, "{}\n", r.as_str().unwrap_or_default())?;
                }
            }
        }
    }
    Ok(())
}

fn cmd_logprobs<B: Backend>(b: &B, a: LogprobsArgs) -> Result<()> {
    let cfg = sppo::config::ModelConfig::from_model_dir(&a.model)?;
    sppo::run::check_memory_job(b, &cfg, &a.model, Job::Scoring { tokens: a.batch_tokens })?;
    let mut model = Llama::load(b, &a.model)?;
    let codec = TextCodec::from_model_dir(&a.model, model.cfg.vocab_size)?;
    let f = std::fs::File::open(&a.data).with_context(|| format!("{}: cannot open", a.data.display()))?;
    let mut examples = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read", a.data.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("{}:{}: malformed JSON", a.data.display(), i + 1))?;
        examples.push(parse_example(&v, i + 1, &a.data, codec.as_ref())?);
    }
    let pb = progress_bar(examples.len() as u64, "examples");
    let scored = score(b, &mut model, &examples, a.batch_tokens, |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    let mut text = String::new();
    for s in &scored {
        text.push_str(&output_line(s).to_string());
        text.push('\n');
    }
    match &a.out {
        Some(path) => sppo::io::write_atomic(path, text.as_bytes())?,
        None => std::io::stdout().lock().write_all(text.as_bytes())?,
    }
    Ok(())
}

fn cmd_rank(a: RankArgs, threads: Option<usize>, device: Option<DeviceArg>, kernel: Option<&str>, precision: Option<PrecisionArg>) -> Result<()> {
    let spec = sppo::oracle::OracleSpec::parse(&a.oracle)?;
    // Only a model oracle runs on the device: `command:` and `game:` open none.
    let built = if spec.is_model() {
        match open_device(device, kernel, threads, precision)? {
            Device::Cpu(b) => spec.build_on(&b),
            Device::Cuda(b) => spec.build_on(&*b),
        }
    } else {
        spec.build()
    };
    let mut oracle = built.with_context(|| format!("building oracle `{}`", a.oracle))?;
    let opts = sppo::rank::RankOptions { winrate: a.winrate, batch_size: a.batch_size, progress: true };
    let s = sppo::rank::rank_file(oracle.as_mut(), &a.input, &a.out, &opts)?;
    if s.ranked == 0 {
        eprintln!("{}: already complete ({} prompts)", a.out.display(), s.prompts);
    } else {
        eprintln!(
            "ranked {} prompts ({} resumed) with {} in {:.1} s ({:.1} pairs/s); wrote {}",
            s.ranked,
            s.resumed,
            oracle.name(),
            s.seconds,
            s.pairs as f64 / s.seconds.max(1e-9),
            a.out.display()
        );
    }
    Ok(())
}

fn cmd_train(a: TrainArgs, threads: Option<usize>, device: Option<DeviceArg>, kernel: Option<&str>, precision: Option<PrecisionArg>) -> Result<()> {
    use sppo::run::config::{RunConfig, RunKeys};
    let file_keys = match &a.config {
        Some(p) => RunKeys::from_toml_file(p)?,
        None => RunKeys::default(),
    };
    let model_dir = a.keys.model.clone().or_else(|| file_keys.model.clone()).context("`--model DIR` is required")?;
    // `model`, `prompts`, `oracle`, `run_dir` are not used by `train`: fill them so the shared
    // resolver validates the training keys.
    let placeholder = RunKeys {
        model: Some(model_dir.clone()),
        prompts: Some(a.data.clone()),
        oracle: Some("-".into()),
        run_dir: Some(a.out.clone()),
        ..Default::default()
    };
    let cfg = RunConfig::resolve(&placeholder.overridden_by(&file_keys).overridden_by(&a.keys))?;
    match open_device(device, kernel, threads, precision)? {
        Device::Cpu(b) => train_with(&b, &a, &cfg, &model_dir),
        Device::Cuda(b) => train_with(&*b, &a, &cfg, &model_dir),
    }
}

/// `sppo train` on the chosen backend: reference log-probs, the optimizer steps, the checkpoint.
fn train_with<B: Backend>(b: &B, a: &TrainArgs, cfg: &sppo::run::config::RunConfig, model_dir: &std::path::Path) -> Result<()> {
    use sppo::run::config::TrainOn;
    use sppo::train::data::{Selection, Tokenization};
    use sppo::train::trainer::{response_logprobs, TrainSettings, Trainer};
    // Refuse a plan that cannot fit before loading anything (GPU memory on cuda).
    sppo::run::check_memory_for(b, cfg, false)?;
    let mut model = Llama::load(b, model_dir)?;
    let codec = TextCodec::from_model_dir(model_dir, model.cfg.vocab_size)?.with_context(|| format!("{}: training on text needs tokenizer.json", model_dir.display()))?;
    let tok = Tokenization {
        tokenizer: &codec.tokenizer,
        template: &codec.template,
        end_of_turn: codec.end_of_turn,
        max_length: cfg.max_length,
        max_prompt_length: cfg.max_prompt_length,
    };
    let selection = match cfg.train_on {
        TrainOn::BestWorst => Selection::BestWorst,
        TrainOn::All => Selection::All,
    };
    let records = sppo::train::data::read_records(&a.data)?;
    let examples = records
        .iter()
        .map(|(where_, rec)| tok.example(rec, selection).with_context(|| where_.clone()))
        .collect::<Result<Vec<_>>>()?;
    eprintln!("{} training examples from {}", examples.len(), a.data.display());
    let pb = progress_bar(examples.len() as u64, "reference log-probs");
    let reference = response_logprobs(b, &mut model, &examples, 4096, |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    let settings = TrainSettings::from_run_config(cfg)?;
    let mut trainer = Trainer::new(b, &model, settings, examples.len())?;
    let pb = progress_bar(trainer.total_steps as u64, "steps");
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut metrics = String::new();
    trainer.run(b, &mut model, &examples, &reference, |m, _, _| {
        metrics.push_str(&serde_json::to_string(m)?);
        metrics.push('\n');
        sppo::io::write_atomic(&a.out.join("metrics.jsonl"), metrics.as_bytes())?;
        pb.set_message(format!("loss {:.4e} grad {:.3e}", m.loss, m.grad_norm));
        pb.inc(1);
        Ok(())
    })?;
    pb.finish_and_clear();
    let dtype = if cfg.save_dtype == "bf16" { sppo::model::weights::SaveDtype::Bf16 } else { sppo::model::weights::SaveDtype::F32 };
    // The checkpoint replaces the directory atomically; the metrics are written back into it.
    model.save_pretrained(b, &a.out, Some(model_dir), dtype)?;
    sppo::io::write_atomic(&a.out.join("metrics.jsonl"), metrics.as_bytes())?;
    eprintln!("checkpoint and metrics.jsonl: {}", a.out.display());
    Ok(())
}

fn cmd_run(a: RunArgs, threads: Option<usize>, device: Option<DeviceArg>, kernel: Option<&str>, precision: Option<PrecisionArg>) -> Result<()> {
    use sppo::run::config::{RunConfig, RunKeys};
    let mut keys = match &a.config {
        Some(p) => RunKeys::from_toml_file(p)?,
        None => RunKeys::default(),
    };
    if let Some(dir) = &a.resume {
        // The stored resolved config is the source of truth; flags may not change it.
        let p = dir.join("config.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read (is {} a run directory?)", p.display(), dir.display()))?;
        keys = serde_json::from_str(&text).with_context(|| format!("{}: not a run configuration", p.display()))?;
    }
    let cfg = RunConfig::resolve(&keys.overridden_by(&a.keys))?;
    use sppo::run::report::{LogMode, Reporter};
    let mode = match (a.quiet, a.verbose, a.log_json) {
        (true, _, _) => LogMode::Quiet,
        (_, _, true) => LogMode::Json,
        (_, true, _) => LogMode::Verbose,
        _ => LogMode::Normal,
    };
    let report = Reporter::new(mode);
    let last = match open_device(device, kernel, threads, precision)? {
        Device::Cpu(b) => sppo::run::run_on(&b, &cfg, a.resume.is_some(), &report)?,
        Device::Cuda(b) => sppo::run::run_on(&*b, &cfg, a.resume.is_some(), &report)?,
    };
    report.info(&format!("done: last checkpoint {}\nmetrics: {}", last.display(), cfg.run_dir.join("metrics.jsonl").display()));
    Ok(())
}

fn cmd_eval(a: EvalArgs, threads: Option<usize>, device: Option<DeviceArg>, kernel: Option<&str>, precision: Option<PrecisionArg>) -> Result<()> {
    use sppo::run::eval::eval_run_on;
    let (prompts, oracle) = (a.prompts.as_deref(), a.oracle.as_deref());
    let report = match open_device(device, kernel, threads, precision)? {
        Device::Cpu(b) => eval_run_on(&b, &a.run_dir, prompts, oracle, a.num_samples)?,
        Device::Cuda(b) => eval_run_on(&*b, &a.run_dir, prompts, oracle, a.num_samples)?,
    };
    let pct = |iv: &Option<sppo::run::eval::Interval>| iv.map_or("-".to_string(), |iv| format!("{:.3} [{:.3}, {:.3}]", iv.mean, iv.lo, iv.hi));
    println!("{} prompts × {} samples, judged by {}; {}", report.prompts, report.num_samples, report.oracle, report.interval);
    for p in &report.policies {
        let mut line = format!("iteration {}: win-rate vs base {}, vs previous {}", p.iteration, pct(&p.win_rate_vs_base), pct(&p.win_rate_vs_previous));
        if let Some(g) = &p.game {
            line.push_str(&format!("; exploitability {:.4} (mixture {:.4})", g.exploitability, g.mixture_exploitability));
        }
        println!("{line}");
    }
    eprintln!("wrote {} and {}", a.run_dir.join("eval.json").display(), a.run_dir.join("alpaca_eval").display());
    Ok(())
}
