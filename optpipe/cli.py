"""The `optpipe` command line (click). Errors are one line plus a hint: exit 2 for bad usage or
input, 1 for a failed pass, verification or target check. `--json` prints one JSON document on
stdout and nothing else there; progress and messages go to stderr."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
import traceback
import types
import typing
import warnings
from collections.abc import Callable

import click

from .errors import OptpipeError, OptpipeWarning, UsageError, first_line
from .runtime.train_config import TrainConfig

EPILOG = "Docs: README.md. Pipeline language: pass{opt=value,...},pass — see `optpipe passes`."


class Progress:
    """Steps on stderr: a spinner while running (on a terminal), a line for steps over a second."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=True)  # a line stays one line
        self.quiet = quiet

    @contextlib.contextmanager
    def __call__(self, label: str):
        """A step named `label` (plain text: paths and pipelines such as `skip=[lm_head]` are shown
        as written, never read as rich markup)."""
        start = time.perf_counter()
        if self.quiet:
            yield _Status(None)
            return
        with self.console.status(escape(label)) as status:
            yield _Status(status)
        seconds = time.perf_counter() - start
        if seconds > 1.0:
            self.console.print(f"[green]✓[/] {escape(label)} [dim]({seconds:.1f}s)[/]")

    def say(self, text: str) -> None:
        """`text` is rich markup: `escape()` every user or pipeline text put into it."""
        if not self.quiet:
            self.console.print(text)


def escape(text: object) -> str:
    """`text` as literal text inside rich markup (`[lm_head]` would otherwise be eaten as a tag)."""
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))


class _Status:
    def __init__(self, status):
        self.status = status

    def update(self, label: str) -> None:
        if self.status is not None:
            self.status.update(escape(label))


def _debug() -> bool:
    return os.environ.get("OPTPIPE_DEBUG", "").strip() not in ("", "0")


def _fail(e: OptpipeError):
    if _debug():  # the whole story: where it was raised and every chained cause (a target's own error)
        traceback.print_exception(e, file=sys.stderr)
    click.echo(f"optpipe: error: {e.one_line()}", err=True)
    sys.exit(e.exit_code)


class _Group(click.Group):
    def invoke(self, ctx):
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except OptpipeError as e:
                _fail(e)
            except KeyboardInterrupt:
                click.echo("optpipe: interrupted; nothing was written", err=True)
                sys.exit(130)
            except (click.exceptions.Exit, click.ClickException, SystemExit):
                raise
            except Exception as e:  # a bug: still one line, with a way to see more
                if _debug():
                    raise
                click.echo(
                    f"optpipe: internal error: {first_line(e)} (hint: rerun with OPTPIPE_DEBUG=1 for the traceback)",
                    err=True,
                )
                sys.exit(1)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """optpipe's own warnings (a version drift in an OUT's manifest) as one line on stderr; others
    as Python prints them."""
    if issubclass(category, OptpipeWarning):
        click.echo(f"optpipe: warning: {message}", err=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@click.group(cls=_Group, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="optpipe")
def main():
    """optpipe: capture a PyTorch model, rewrite it with verified passes, lower it to a target."""


def _model_options(f):
    f = click.option(
        "--input",
        "inputs",
        multiple=True,
        metavar="SPEC",
        help="Example input, e.g. input_ids:int64[batch=1,seq=128] (repeatable; a named dim is dynamic).",
    )(f)
    f = click.option("--arch", metavar="SPEC", help="Model factory (file.py:fn) for a .pt/.safetensors state dict.")(f)
    f = click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled module (runs arbitrary code).")(f)
    return f


def _load(model: str, inputs, arch, trust_pickle):
    from .inputs import parse_input_spec
    from .loading import load_model

    specs = [parse_input_spec(s) for s in inputs] or None
    return load_model(model, inputs=specs, arch=arch, trust_pickle=trust_pickle)


@main.command()
@click.argument("model")
@click.option("--target", "-t", default="cpu", show_default=True, help="cpu, cuda, onnxruntime, tvm or tvm-cuda.")
@click.option("--pipeline", "-p", metavar="S", help="Pipeline, e.g. fuse-attention,dce")
@click.option("--preset", metavar="NAME", help="A named pipeline (see `optpipe passes`).")
@click.option("--recipe", metavar="FILE", type=click.Path(dir_okay=False), help="TOML recipe file.")
@_model_options
@click.option("-o", "--out", required=True, metavar="OUT", help="Output folder (written atomically).")
@click.option("--dump-ir", metavar="DIR", help="Write NNN_<pass>.before.py/.after.py/.diff for every pass.")
@click.option("--print-ir-after-change", is_flag=True, help="Print the graph after every pass that changed it.")
@click.option("--no-verify", is_flag=True, help="Skip numerical verification after each pass.")
@click.option(
    "--budget", multiple=True, metavar="K=V", help="Quality budget for lossy passes: sqnr=DB, cosine=X, top1=X."
)
@click.option(
    "--mode",
    type=click.Choice(["auto", "eager", "compile"]),
    default="auto",
    show_default=True,
    help="torch targets: eager, torch.compile, or whichever is faster.",
)
@click.option(
    "--tune",
    type=click.IntRange(min=0),
    default=0,
    metavar="N",
    help="tvm targets: tuning trials (MetaSchedule; dlight schedules for cuda). 0: untuned.",
)
@click.option(
    "--calibration-data",
    metavar="FILE",
    help="Text/JSONL that calibrating passes (int8-static, wanda) measure activations on.",
)
@click.option("--calibration-batches", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing OUT that optpipe did not write.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json on stdout.")
def optimize(
    model,
    target,
    pipeline,
    preset,
    recipe,
    inputs,
    arch,
    trust_pickle,
    out,
    dump_ir,
    print_ir_after_change,
    no_verify,
    budget,
    mode,
    tune,
    calibration_data,
    calibration_batches,
    force,
    as_json,
):
    """Optimize MODEL with a pipeline of verified passes for a target; write OUT."""
    from .instruments import DumpIR, PassTiming, PrintAfterChange
    from .optimization import optimize as run_optimize
    from .optimization import resolve_pipeline
    from .outdir import check_writable
    from .pipeline import Pipeline
    from .report import pass_remarks
    from .verify import Budget

    check_writable(out, force)  # before any work
    text, extras = resolve_pipeline(pipeline, preset, recipe)
    Pipeline.parse(text).check_own_order()  # an order the passes forbid, before loading the model
    if (
        extras.get("target")
        and target == "cpu"
        and click.get_current_context().get_parameter_source("target").name == "DEFAULT"
    ):
        target = extras["target"]
    budget_obj = Budget.parse(budget) if budget else (Budget(**extras["budget"]) if extras.get("budget") else None)
    progress = Progress(quiet=False)
    instruments = [PassTiming(sys.stderr)] if not as_json else []
    if dump_ir:
        instruments.append(DumpIR(dump_ir))
    if print_ir_after_change:
        instruments.append(PrintAfterChange(sys.stderr))
    with progress(f"load {model}"):
        program = _load(model, inputs, arch, trust_pickle)
    progress.say(
        f"captured output: {escape(program.meta.get('output', 'tensor'))}; dynamic dims: {escape(_dims_text(program))}"
    )
    calibration = None
    if calibration_data:
        from .runtime.data import calibration_batches as read_calibration

        with progress(f"read calibration data {calibration_data}"):
            calibration = read_calibration(calibration_data, program, batches=calibration_batches)
    res = run_optimize(
        program,
        pipeline=text,
        target=target,
        verify=not no_verify,
        budget=budget_obj,
        instruments=instruments,
        target_options=_target_options(mode, tune, extras),
        progress=progress,
        calibration=calibration,
    )
    with progress(f"write {out}"):
        res.save(out, force=force, dump_ir=dump_ir)
    for line in pass_remarks(res.report["passes"]):
        click.echo(line, err=True)
    if as_json:
        click.echo(json.dumps(res.report, default=str))
    else:
        progress.say(summary_markup(out, target, res.report))


def _target_options(mode: str, tune: int, recipe: dict) -> dict:
    """--mode / --tune, where not given on the command line the recipe's."""
    ctx = click.get_current_context()
    given = {"mode": mode, "tune": tune}
    for key, value in recipe.get("target_options", {}).items():
        if ctx.get_parameter_source(key).name == "DEFAULT":
            given[key] = value
    return given


def summary_markup(out: str, target: str, r: dict) -> str:
    """The closing line of `optimize` as rich markup; the paths and the pipeline in it are escaped
    (`quantize{skip=[lm_head]}` is shown as written)."""
    m = r["model"]
    return (
        f"[bold]wrote {escape(out)}[/]: pipeline {escape(r['pipeline'])} → {escape(target)} "
        f"({escape(r['target_info'].get('mode', ''))}); params {m['params_before']:,} → {m['params_after']:,} "
        f"({_mb(m.get('bytes_before'))} → {_mb(m.get('bytes_after'))}); "
        f"target check max-abs {r['target_check']['max_abs']:.2e}"
    )


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.2f} MB"


def _dims_text(program) -> str:
    parts = []
    for name, spec in zip(program.input_names, program.dynamic_shapes or []):
        if spec:
            parts.append(f"{name}[{', '.join(f'{d}:{n}' for d, n in sorted(spec.items()))}]")
    return ", ".join(parts) or "none (static shapes)"


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
def passes(name, as_json):
    """List passes, or describe pass NAME (options, defaults, help)."""
    from .presets import PRESETS
    from .registry import all_passes, get_pass

    if name:
        info = get_pass(name)
        data = {
            "name": info.name,
            "exact": info.exact,
            "summary": info.summary,
            "doc": info.doc,
            "module": info.module,
            "options": info.options(),
            "order": info.order.to_dict(),
        }
        if as_json:
            click.echo(json.dumps(data, default=str))
            return
        click.echo(f"{info.name}  ({'exact' if info.exact else 'lossy'})  [{info.module}]\n")
        click.echo(info.doc or info.summary)
        click.echo("\noptions:" if data["options"] else "\noptions: none")
        for o in data["options"]:
            click.echo(f"  {o['name']:<18} {o['type']:<14} default {o['default']!s:<10} {o['help']}")
        order = [f"  {k:<8} {', '.join(v) if isinstance(v, list) else v}" for k, v in data["order"].items() if v]
        click.echo("\norder:\n" + "\n".join(order) if order else "\norder: may run anywhere")
        return
    infos = all_passes()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "passes": [{"name": i.name, "exact": i.exact, "summary": i.summary} for i in infos],
                    "presets": {k: v[0] for k, v in PRESETS.items()},
                }
            )
        )
        return
    click.echo("passes:")
    for i in infos:
        click.echo(f"  {i.name:<18} {'exact' if i.exact else 'lossy':<6} {i.summary}")
    click.echo("\npresets:")
    for k, (pipe, desc) in PRESETS.items():
        click.echo(f"  {k:<18} {pipe}  — {desc}")


@main.command()
@click.argument("model")
@_model_options
@click.option("--json", "as_json", is_flag=True)
def inspect(model, inputs, arch, trust_pickle, as_json):
    """Ops, parameters, attention sites, FLOPs and memory per module of MODEL."""
    from .inspection import format_inspect, inspect_program

    program = _load(model, inputs, arch, trust_pickle)
    data = inspect_program(program)
    click.echo(json.dumps(data, default=str) if as_json else format_inspect(data))


@main.command()
@click.argument("a")
@click.argument("b")
@_model_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--html", "html_path", metavar="FILE", help="Write a self-contained HTML page of the diff.")
def diff(a, b, inputs, arch, trust_pickle, as_json, html_path):
    """Semantic graph diff of two models / programs / OUT folders, keyed by module path."""
    from .graph_diff import diff_programs
    from .outdir import write_text_atomic

    pa = _load(a, inputs, arch, trust_pickle)
    pb = _load(b, inputs, arch, trust_pickle)
    d = diff_programs(pa, pb)
    if html_path:
        write_text_atomic(html_path, d.to_html())
    click.echo(json.dumps(d.to_dict(), default=str) if as_json else d.to_text())


@main.command()
@click.argument("out")
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="SPEC",
    help="name=@file.pt, name=[[1,2,3]] (JSON), or name:dtype[dims] for random values.",
)
@click.option("--json", "as_json", is_flag=True)
def run(out, inputs, as_json):
    """Run the artifact in OUT on its target."""
    import torch
    import torch.utils._pytree as pytree

    program, target, tgt, compiled = _load_out(out)
    args = _run_inputs(program, inputs)
    prepared = tgt.prepare_inputs(args)
    if compiled.info.get("mode") == "compile":
        with torch.no_grad():
            compiled(*prepared)  # compile on a warm-up call; time the real one
    start = time.perf_counter()
    with torch.no_grad():
        result = compiled(*prepared)
    seconds = time.perf_counter() - start
    leaves = [t.detach().cpu() for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
    if as_json:
        click.echo(json.dumps({"outputs": [_tensor_json(t) for t in leaves], "seconds": round(seconds, 6)}))
    else:
        for i, t in enumerate(leaves):
            click.echo(
                f"output[{i}]: {str(t.dtype).replace('torch.', '')}{list(t.shape)}  "
                f"mean {t.float().mean():.6g}  first {t.flatten()[:5].tolist()}"
            )
        click.echo(f"ran on {target} in {seconds * 1000:.1f} ms", err=True)


def _load_out(out: str):
    """(program, target name, Target, Compiled) of an OUT folder, its manifest checked first."""
    from .errors import TargetError
    from .loading import load_out
    from .registry import get_target
    from .target import load_compiled

    program, target = load_out(out)
    tgt = get_target(target)
    try:
        compiled = load_compiled(tgt, out, program)
    except OptpipeError:
        raise
    except Exception as e:
        raise TargetError(
            f"{out}: the {target} artifact does not load: {first_line(e)}",
            "rerun with OPTPIPE_DEBUG=1 for the traceback, or write OUT again with `optpipe optimize`",
        ) from e
    return program, target, tgt, compiled


def _data_option(what: str):
    """`--data FILE` (repeatable) of the commands that read a corpus."""
    return click.option(
        "--data", "data", multiple=True, required=True, metavar="FILE",
        help=f"Text or JSONL file(s) or folders (repeatable); {what}.",
    )  # fmt: skip


@main.command("eval")
@click.argument("model", metavar="MODEL|OUT")
@_data_option("scored on train's validation split")
@click.option("--reference", metavar="MODEL", help="Compare with this model (default for an OUT: its source).")
@click.option("--target", "-t", default=None, help="Where a MODEL runs (default cpu, eager); an OUT runs on its own.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None, help="Window length (default: the example's).")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Causal LMs: step between windows.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Score at most about this many tokens.")
@click.option("--val-fraction", type=float, default=0.05, show_default=True, help="As given to train (0: all text).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the mlm masks and the timing input.")
@click.option("--mask-rate", type=float, default=0.15, show_default=True, help="Masked LMs: share of tokens masked.")
@click.option("--iters", type=click.IntRange(min=1), default=20, show_default=True, help="Timed calls.")
@click.option("--text-key", default="text", show_default=True, help="JSONL field holding the text.")
@click.option("--tokenizer", metavar="FILE", help="A tokenizer.json (default: the model's own, else bytes).")
@click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled module (runs arbitrary code).")
@click.option("--json", "as_json", is_flag=True)
def eval_command(model, data, reference, target, seq_len, stride, batch, max_tokens, val_fraction, seed, **options):
    """Quality on real data (perplexity, masked accuracy or embedding cosine) and cost on the target."""
    from .runtime.evaluation import evaluate

    as_json, iters = options.pop("as_json"), options.pop("iters")
    progress = Progress()
    with progress(f"evaluating {model}") as status:
        doc = evaluate(
            model,
            list(data),
            reference=reference,
            target=target,
            seq_len=seq_len,
            stride=stride,
            batch=batch,
            max_tokens=max_tokens,
            val_fraction=val_fraction,
            seed=seed,
            latency_iters=iters,
            progress=status.update,
            **options,
        )
    if as_json:
        click.echo(json.dumps(doc))
        return
    _print_eval(doc)


def _print_eval(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    q, c, d = doc["quality"], doc["cost"], doc["data"]
    table = Table(title=f"{escape(q['model'])} on {escape(doc['target'])} ({q['task']})", show_header=False)
    shown = ("ppl", "mlm_accuracy", "cosine", "top1_agreement", "kl", "ref_ppl", "tokens")
    for key in shown:
        if key in q:
            table.add_row(key, "-" if q[key] is None else f"{q[key]:.6g}")
    for key in ("latency_ms_p50", "latency_ms_p90", "tokens_per_s", "peak_mem_mb", "size_mb"):
        table.add_row(key, "-" if c.get(key) is None else f"{c[key]:.6g}")
    Console(highlight=False).print(table)
    ref = f"reference {escape(q['reference'])}" if q.get("reference") else escape(q.get("note") or "no reference")
    click.echo(
        f"{d['split']} split: {d['documents']} documents, {d['windows']} windows of {d['seq_len']} "
        f"(stride {d['stride']}), batch {d['batch']}, tokenizer {d['tokenizer']}; {ref}",
        err=True,
    )


@main.command()
@click.argument("out")
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    metavar="TEXT",
    help="Prompt text (repeatable: a batch), tokenized with OUT's tokenizer.json.",
)
@click.option(
    "--prompt-ids", "prompt_ids", multiple=True, metavar="IDS", help="Prompt token ids, e.g. 1,2,3 (repeatable)."
)
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0: off.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="1: off.")
@click.option("--seed", type=int, default=None, help="Seed of the sampler.")
@click.option(
    "--stop-token",
    "stop_tokens",
    multiple=True,
    type=int,
    metavar="ID",
    help="Stop a row at this token (repeatable; default: the model's eos token).",
)
@click.option("--ignore-eos", is_flag=True, help="Do not stop at the model's eos token.")
@click.option("--draft", metavar="OUT2", help="Speculative decoding with this smaller optimized program.")
@click.option(
    "--draft-tokens",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Tokens the draft proposes per target step.",
)
@click.option("--json", "as_json", is_flag=True)
def generate(
    out,
    prompts,
    prompt_ids,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    stop_tokens,
    ignore_eos,
    draft,
    draft_tokens,
    as_json,
):
    """Generate tokens from the (kv-cache) program in OUT on its target."""
    from .inputs import check_token_ids
    from .runtime.generation import Sampling, target_functions, target_step_function
    from .runtime.generation import generate as run_generate

    if bool(prompts) == bool(prompt_ids):
        raise UsageError("give --prompt TEXT or --prompt-ids IDS (one of them)", "e.g. --prompt-ids 1,2,3")
    program, target, tgt, compiled = _load_out(out)
    tokenizer = _tokenizer(out, program) if prompts or not prompt_ids else _tokenizer(out, program, required=False)
    rows = [tokenizer.encode(p).ids for p in prompts] if prompts else [_parse_ids(t) for t in prompt_ids]
    check_token_ids(program, rows, where="--prompt" if prompts else "--prompt-ids")
    stops = list(stop_tokens)
    eos = (program.meta.get("config") or {}).get("eos_token_id")
    if not stops and not ignore_eos and eos is not None:
        stops = list(eos) if isinstance(eos, list) else [eos]
    options = {}
    if draft:
        d_program, _, d_tgt, d_compiled = _load_out(draft)
        check_token_ids(d_program, rows, where=f"--draft {draft}: the prompt")
        options = {
            "draft": d_program,
            "draft_step": target_step_function(d_tgt, d_compiled),
            "draft_tokens": draft_tokens,
        }
    result = run_generate(
        program,
        rows,
        max_new_tokens,
        sampling=Sampling(temperature, top_k, top_p, seed),
        stop_tokens=stops,
        **target_functions(tgt, compiled, program),
        **options,
    )
    if tokenizer is not None:
        result.text = [tokenizer.decode(r) for r in result.new_ids]
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    for i, row in enumerate(result.new_ids):
        click.echo(result.text[i] if result.text else " ".join(map(str, row)))
    extra = ""
    if result.proposed:
        extra = f"; draft acceptance {result.acceptance_rate:.1%} over {result.steps} target steps"
    click.echo(
        f"{result.new_tokens} new tokens on {target} in {result.seconds:.2f} s "
        f"({result.tokens_per_s:.1f} tokens/s){extra}",
        err=True,
    )


def _config_option(f: dataclasses.Field, annotation) -> Callable:
    """The click option of TrainConfig field `f` (optpipe.runtime.train_config: name, type, default,
    and the metadata's help, min, choices, metavar)."""
    meta = f.metadata
    flag = "--" + f.name.replace("_", "-")
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)  # `int | None`: an int
    kind = next(t for t in typing.get_args(annotation) if t is not type(None)) if optional else annotation
    if kind is bool:
        return click.option(flag, f.name, is_flag=True, help=meta.get("help") or None)
    options = {"default": f.default, "show_default": True, "help": meta.get("help") or None}
    if "choices" in meta:
        options["type"] = click.Choice(list(meta["choices"]))
    elif kind is int and "min" in meta:
        options["type"] = click.IntRange(min=meta["min"])
    elif kind in (int, float):
        options["type"] = kind
    if typing.get_origin(kind) is tuple:  # a list of names, given comma-separated
        options["default"] = ",".join(f.default)
    if "metavar" in meta:
        options["metavar"] = meta["metavar"]
    return click.option(flag, f.name, **options)


def _train_config_options(command: Callable) -> Callable:
    """Every TrainConfig field that is a CLI option, in the order of the fields."""
    annotations = typing.get_type_hints(TrainConfig)
    fields = [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]
    for f in reversed(fields):  # click lists the options applied last first
        command = _config_option(f, annotations[f.name])(command)
    return command


@main.command()
@click.argument("model", metavar="OUT")
@_data_option("tokenized with OUT's tokenizer, else bytes")
@_train_config_options
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Data-parallel ranks (torchrun; gloo on CPU, NCCL on CUDA).",
)
@click.option(
    "--stages",
    type=click.IntRange(min=2),
    default=None,
    help="Pipeline-parallel training over this many ranks (torch.distributed.pipelining).",
)
@click.option(
    "--microbatches",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Micro-batches per step with --stages.",
)
@click.option(
    "--schedule",
    type=click.Choice(["1f1b", "gpipe"]),
    default="1f1b",
    show_default=True,
    help="Pipeline schedule with --stages.",
)
@click.option(
    "--tensor-parallel",
    type=click.IntRange(min=2),
    default=None,
    metavar="N",
    help="Shard every attention and MLP block over N ranks (DTensor); --nproc replicas of that.",
)
@click.option(
    "--sequence-parallel",
    type=click.IntRange(min=2),
    default=None,
    metavar="N",
    help="Split every sequence over N ranks (ring / halo / prefix-scan attention); --nproc replicas of that.",
)
@click.option("--resume", is_flag=True, help="Continue the run in OUT2 from its latest checkpoint.")
@click.option("--force", is_flag=True, help="Replace an existing OUT2.")
@click.option("-o", "--out", "out", required=True, metavar="OUT2")
@click.option("--json", "as_json", is_flag=True)
def train(
    model,
    data,
    nproc,
    stages,
    microbatches,
    schedule,
    tensor_parallel,
    sequence_parallel,
    resume,
    force,
    out,
    as_json,
    **config,
):
    """Train (pre-train, fine-tune, or heal by distillation) the program in OUT; write OUT2."""
    from .runtime.training import train as run_train

    config["clip"] = config["clip"] or None  # --clip 0: no clipping
    result = run_train(
        model,
        list(data),
        out,
        resume=resume,
        force=force,
        nproc=nproc,
        stages=stages,
        microbatches=microbatches,
        schedule=schedule,
        tensor_parallel=tensor_parallel,
        sequence_parallel=sequence_parallel,
        **config,
    )
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    val = f", validation perplexity {result.val_ppl:.2f}" if result.val_ppl is not None else ""
    click.echo(
        f"trained {result.steps} steps: loss {result.final_loss:.4f}{val}; "
        f"{result.tokens_per_s:.0f} tokens/s; wrote {out}",
        err=True,
    )


@main.command()
@click.argument("model")
@click.option("--target", "-t", default="cpu", show_default=True, help="cpu, cuda, onnxruntime, tvm or tvm-cuda.")
@click.option("--data", required=True, metavar="FILE", help="Text or JSONL; its held-out split judges quality.")
@click.option(
    "--budget", multiple=True, required=True, metavar="K=V", help="Quality to keep: ppl=+3%, cosine=0.99, top1=0.95."
)
@click.option("--objective", type=click.Choice(["latency", "throughput", "size"]), default="latency", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=2), default=None, help="Default: the model's example length.")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True, help="Candidates to measure.")
@click.option("--time-budget", metavar="T", help="Stop starting trials after T (e.g. 20m); one trial may overrun.")
@click.option("--space", "space_file", metavar="FILE", help="TOML: the choices per dimension (see README).")
@click.option(
    "--heal-steps", type=click.IntRange(min=0), default=0, show_default=True, help="Distillation steps per candidate."
)
@click.option("--sampler", type=click.Choice(["tpe", "nsga2", "random"]), default="tpe", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-tokens", type=click.IntRange(min=1), default=4096, show_default=True, help="Tokens judged.")
@_model_options
@click.option("--storage", metavar="URL", help="Study database shared by several workers (default TUNE_OUT/study.db).")
@click.option("--resume", is_flag=True, help="Continue the study in TUNE_OUT.")
@click.option("--force", is_flag=True, help="Replace an existing TUNE_OUT.")
@click.option("-o", "--out", required=True, metavar="TUNE_OUT")
@click.option("--json", "as_json", is_flag=True, help="Print tune.json on stdout.")
def tune(
    model,
    target,
    data,
    budget,
    objective,
    batch,
    seq_len,
    trials,
    time_budget,
    space_file,
    heal_steps,
    sampler,
    seed,
    eval_tokens,
    inputs,
    arch,
    trust_pickle,
    storage,
    resume,
    force,
    out,
    as_json,
):
    """Search pipelines for MODEL on a target, measured there and judged on DATA; write TUNE_OUT."""
    from .runtime.tuning import TuneSettings, check_out
    from .runtime.tuning import tune as run_tune
    from .runtime.tuning_space import QualityBudget, SearchSpace, parse_duration

    settings = TuneSettings(
        target=target,
        budget=QualityBudget.parse(budget),
        objective=objective,
        batch=batch,
        seq_len=seq_len,
        trials=trials,
        time_budget=parse_duration(time_budget),
        heal_steps=heal_steps,
        seed=seed,
        sampler=sampler,
        eval_tokens=eval_tokens,
    )
    space = SearchSpace.from_toml(space_file, target) if space_file else None
    check_out(out, resume, force, storage)  # before any work
    progress = Progress(quiet=False)
    with progress(f"load {model}"):
        program = _load(model, inputs, arch, trust_pickle)
    result = run_tune(
        model,
        data,
        out,
        budget=settings.budget,
        settings=settings,
        space=space,
        storage=storage,
        resume=resume,
        force=force,
        program=program,
        say=lambda text: progress.say(escape(text)),
    )
    if as_json:
        with open(os.path.join(out, "tune.json")) as f:
            click.echo(f.read().strip())
        return
    _print_front(result)
    progress.say(f"{escape(result.recommendation)}\nwrote {escape(out)}: best.toml, best/, trials.jsonl, report.html")


def _print_front(result) -> None:
    from rich.console import Console
    from rich.table import Table

    from .runtime.tuning_report import FRONT_HEADER, front_rows

    table = Table(title="Pareto front (cost vs quality; * recommended)", title_justify="left")
    for name in FRONT_HEADER:
        table.add_column(name, overflow="fold")
    for row in front_rows(result.front, result.baseline, result.best):
        table.add_row(*[escape(x) for x in row])
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=160)  # a log or a pipe: room for the pipelines on one line
    console.print(table)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", ",").split(",") if t]
    except ValueError:
        raise UsageError(
            f"bad --prompt-ids {text!r}", "comma-separated token ids, e.g. --prompt-ids 464,2068,318"
        ) from None
    if not ids:
        raise UsageError("--prompt-ids is empty", "e.g. --prompt-ids 464,2068,318")
    return ids


def _tokenizer(out: str, program, required: bool = True):
    """OUT/tokenizer.json (copied from the model folder at optimize time), via `tokenizers`."""
    candidates = [os.path.join(out, "tokenizer.json")]
    if program.meta.get("tokenizer"):
        candidates.append(os.path.join(program.meta["tokenizer"], "tokenizer.json"))
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        if required:
            raise UsageError(f"{out} has no tokenizer.json for --prompt", "give token ids with --prompt-ids")
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UsageError(
            "--prompt needs the `tokenizers` package", "pip install tokenizers, or use --prompt-ids"
        ) from None
    return Tokenizer.from_file(path)


def _run_inputs(program, texts) -> tuple:
    """The program's example inputs, with those named on the command line replaced, checked
    against what the program takes (names, dtypes, shapes, token ids) before anything runs."""
    from .inputs import InputValue, check_inputs, make_example_inputs, parse_input_arg, program_inputs

    given = {}
    expected = {p.name: p for p in program_inputs(program)}
    dtypes = {n: x.dtype for n, x in zip(program.input_names, program.example_inputs) if hasattr(x, "dtype")}
    fallback_vocab = (program.meta.get("config") or {}).get("vocab_size") or program.meta.get("vocab_size")
    for text in texts:
        name = text.split("=", 1)[0].split(":", 1)[0].strip()
        if name not in program.input_names:
            raise UsageError(
                f"--input {name!r}: the program has no such input", f"it takes: {', '.join(program.input_names)}"
            )
        arg = parse_input_arg(text, default_dtype=dtypes.get(name))
        if isinstance(arg, InputValue):
            given[arg.name] = arg.tensor
        else:
            vocab = expected[name].vocab if name in expected else None
            given.update(make_example_inputs([arg], vocab_size=vocab or fallback_vocab))
    args = tuple(given.get(n, x) for n, x in zip(program.input_names, program.example_inputs))
    check_inputs(program, args, where="--input")
    return args


def _tensor_json(t):
    import torch

    if t.numel() <= 4096:
        return t.tolist()
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype).replace("torch.", ""),
        "sha256": hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest(),
    }


if __name__ == "__main__":
    main()
