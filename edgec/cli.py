"""The `edgec` command line: messages and progress on stderr, data on stdout.

Exit codes: 0 ok, 2 usage / bad input, 3 unsupported model/op/target,
4 parity or accuracy check failed, 5 missing optional dependency,
6 device unreachable, 130 interrupted.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from edgec.capture import Collected, third_party_output
from edgec.errors import (
    EXIT_CODES,
    EdgecError,
    UnsupportedError,
    interrupt_exit,
    missing_dependency,
    note_interrupts,
    was_interrupted,
)
from edgec.progress import Progress as Reporter
from edgec.progress import bars_closed
from edgec.targets.devices import DEFAULT_TIMEOUT_S

# torch.export internals on torch 2.13 warn about their own deprecated API on every export.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

_EPILOG = "Exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items())

app = typer.Typer(
    name="edgec",
    help="Compile trained models for edge targets with Apache TVM and ONNX Runtime.",
    epilog=_EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from edgec import __version__

        out.print(f"edgec {__version__}")
        raise typer.Exit(0)


# -1 quiet (results and errors only), 0 normal, 1 verbose (also third-party output).
_verbosity = 0


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="print edgec's version and exit"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print results and errors only (no progress)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also print what TVM, compilers and libraries wrote (hidden by default)"),
) -> None:
    """Compile trained models for edge targets with Apache TVM and ONNX Runtime.

    Put -q / -v before the command: edgec -v compile zoo:tiny-lm
    """
    global _verbosity
    if quiet and verbose:
        from edgec.errors import BadInputError

        err.print(f"[bold red]error:[/] {BadInputError('-q and -v contradict each other; give one').message}")
        raise typer.Exit(2)
    _verbosity = -1 if quiet else 1 if verbose else 0
    if _verbosity < 1:
        # Library progress bars (the GGUF reader's, the Hub's) would interleave with edgec's own.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


zoo_app = typer.Typer(help="Built-in models (zoo:NAME).", no_args_is_help=True)
targets_app = typer.Typer(help="Targets edgec compiles for.", no_args_is_help=True)
cache_app = typer.Typer(help="The cache directory (converted models, later tuning databases).", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
app.add_typer(targets_app, name="targets")
device_app = typer.Typer(
    help="Devices edgec starts itself: a stock TVM RPC server inside the emulated aarch64 user space.",
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")
app.add_typer(device_app, name="device")
analyze_app = typer.Typer(help="Look inside a model before compiling it.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")
subnet_app = typer.Typer(
    help="AmoebaLLM subnets: search a causal LM's shapes (depth x width) once, then extract any of them "
    "with `edgec compile MODEL --subnet depth=N,width=R`.",
    no_args_is_help=True,
)
app.add_typer(subnet_app, name="subnet")
gcn_app = typer.Typer(
    help="MixGCN: full-graph GCNs on several worker processes (the mixture-of-parallelism plan, training on "
    "torchrun), the graphs to train on, and GCNs compiled for a graph with `edgec compile GCN --graph G`.",
    no_args_is_help=True,
)
app.add_typer(gcn_app, name="gcn")

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(func: F) -> F:
    """User errors become one line on stderr and their exit code; no traceback. With
    `--json` the same failure is also one JSON object on stdout, for scripts."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        note_interrupts()
        collected = Collected()
        as_json = bool(kwargs.get("as_json", False))
        try:
            with third_party_output() as collected, bars_closed():
                result = func(*args, **kwargs)
            _report_third_party(collected)
            return result
        except EdgecError as exc:
            _report_third_party(collected)
            if was_interrupted():  # e.g. a run that a signal broke, reported as a failed check
                raise _failed_interrupted(as_json) from None
            raise _failed(exc.message, exc.exit_code, as_json) from None
        except KeyboardInterrupt:
            _report_third_party(collected)
            raise _failed_interrupted(as_json) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                _report_third_party(collected, everything=True)
                raise
            _report_third_party(collected)
            where = f" writing {exc.filename}" if exc.filename else ""
            raise _failed(f"no space left on the disk{where}: free some (edgec cache clean frees the cache) "
                          "or write elsewhere (-o, EDGEC_CACHE_DIR); nothing half-written was left", 2, as_json) from None
        except ModuleNotFoundError as exc:
            missing = missing_dependency(exc.name or "")
            if missing is None:  # not one of edgec's dependencies: a bug
                _report_third_party(collected, everything=True)
                raise
            _report_third_party(collected)
            raise _failed(missing.message, missing.exit_code, as_json) from None
        except Exception as exc:
            if isinstance(exc, typer.Exit):  # a command's own exit code (a failed check)
                _report_third_party(collected)
                raise
            if not was_interrupted():  # a bug: keep its traceback, and everything a library said before it
                _report_third_party(collected, everything=True)
                raise
            _report_third_party(collected)
            raise _failed_interrupted(as_json) from None

    return wrapper  # type: ignore[return-value]


# The `kind` of a failure in --json output, by exit code (EXIT_CODES has the sentences).
FAILURE_KINDS = {2: "bad-input", 3: "unsupported", 4: "check-failed", 5: "missing-dependency", 6: "device-unreachable"}


def _failed(message: str, code: int, as_json: bool) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    if as_json:
        print(json.dumps({"error": message, "exit_code": code, "kind": FAILURE_KINDS.get(code, "error")}), flush=True)
    return typer.Exit(code)


def _failed_interrupted(as_json: bool) -> typer.Exit:
    code = _interrupted()
    if as_json:
        name, _ = interrupt_exit()
        print(json.dumps({"error": f"interrupted ({name})", "exit_code": code, "kind": "interrupted"}), flush=True)
    return typer.Exit(code)


def _report_third_party(collected: Collected, everything: bool = False) -> None:
    """Third-party output held back during the command: a count, or (-v, or after a bug) each
    distinct line once with its count."""
    if not collected.total or (_verbosity < 0 and not everything):
        return
    if _verbosity > 0 or everything:
        err.print(f"[dim]third-party output ({collected.total} lines, {len(collected.counts)} distinct):[/]")
        for line in collected.lines():
            err.print(f"  {line}", style="dim", markup=False)
        return
    lines = "1 line" if collected.total == 1 else f"{collected.total} lines"
    err.print(f"[dim]{lines} of third-party output hidden ({len(collected.counts)} distinct); edgec -v ... shows them[/]")


def _interrupted() -> int:
    name, code = interrupt_exit()
    err.print(f"[bold red]interrupted ({name}):[/] stopped; nothing half-written was left")
    return code


def _note(message: str) -> None:
    """A message about the work, not its result: left out with -q."""
    if _verbosity >= 0:
        err.print(message)


def Progress() -> Reporter:  # noqa: N802 - reads as the reporter it builds
    """Timestamped progress on stderr, bars for counted work on a terminal (none with -q)."""
    return Reporter(err, quiet=_verbosity < 0)


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _limit_threads() -> None:
    # torch and TVM each size their pools to the machine; EDGEC_THREADS caps both for shared machines.
    threads = os.environ.get("EDGEC_THREADS")
    if threads:
        import torch

        if not threads.isdigit() or int(threads) < 1:
            from edgec.errors import BadInputError

            raise BadInputError(f"EDGEC_THREADS={threads!r}: give a positive whole number of threads")
        torch.set_num_threads(int(threads))
        os.environ.setdefault("TVM_NUM_THREADS", threads)


_COMPILE_EXAMPLES = "\n\n".join([
    "Examples:",
    "  edgec compile zoo:tiny-lm --target cpu --backend tvm -o artifacts/tiny --json",
    "  edgec compile ./my-llama --backend onnx --recipe recipes/int8-weights.yaml",
    "  edgec compile zoo:tiny-lm --target arm64 --target-opt mcpu=cortex-a76 --dry-run",
    "  edgec compile zoo:tiny-lm --target arm64 --sign release.key   (edgec keygen release.key makes one)",
    "  edgec compile zoo:tiny-lm --set passes=quantize-weights-int8 --set quantize-weights-int8.group_size=32 --dry-run --json",
    "  edgec compile detector.onnx --input-shape image=1x3x640x640 --target arm64 --backend onnx",
    "  edgec compile encoder.onnx --dim batch=1 --reference-inputs real-batch.npz",
    "  edgec compile zoo:tiny-lm --subnet depth=4,width=0.8 --backend onnx   (after edgec subnet search zoo:tiny-lm)",
    "  edgec compile zoo:tiny-lm --target arm64 --latency-budget-ms 80 --device rpc://127.0.0.1:9091?key=edgec-qemu-arm64",
    "  edgec compile zoo:gcn-wordnet --graph zoo:wordnet --target arm64   (a GCN is compiled for its graph)",
    "  edgec compile zoo:gcn-wordnet --graph zoo:wordnet --target sparse=cpu,dense=cuda   (aggregation on the CPU, GEMMs on the GPU)",
])


@app.command("compile", epilog=_COMPILE_EXAMPLES)
@_user_errors
def compile_command(
    model: str = typer.Argument(..., help="Hugging Face model dir, .pt2 file, .onnx file, or zoo:NAME (edgec zoo list)"),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="cpu, x86_64, arm64, ... (edgec targets list), raw TVM JSON, or a target per part of a GCN: sparse=cpu,dense=cuda"),
    backend: Optional[str] = typer.Option(None, "--backend", "-b", help="tvm or onnx (default tvm)"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="recipe YAML (see recipes/)"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe key: key=value or PASS.option=value; repeatable"),
    target_opt: list[str] = typer.Option([], "--target-opt", help="override a TVM target field, e.g. mcpu=cortex-a76; repeatable"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="artifact directory (default artifacts/<model>-<target>-<backend>)"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty output directory"),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="run every check that needs no model (target, fields, passes, device, output) and print the resolved plan"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout (a failure: one JSON object with error, exit_code, kind)"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow a .pt2 MODEL (torch.export.load unpickles it)"),
    input_shape: list[str] = typer.Option(
        [], "--input-shape", help="an .onnx MODEL: fix an input's shape, NAME=1x3x320x320; repeatable (recipe: inputs.shapes)"
    ),
    dim: list[str] = typer.Option([], "--dim", help="an .onnx MODEL: fix a symbolic dimension, NAME=SIZE (batch=1); repeatable (recipe: inputs.dims)"),
    reference_inputs: Optional[Path] = typer.Option(
        None, "--reference-inputs", help="an .onnx MODEL: real inputs for the parity check, an .npz of input name -> array"
    ),
    device: Optional[str] = typer.Option(
        None, "--device", "-d",
        help="check parity and held-out perplexity on this device instead of here (as for deploy --device): "
        "how a cross-built artifact is verified before it is written",
    ),
    sign: Optional[Path] = typer.Option(
        None, "--sign", help="sign the manifest with this ed25519 private key (edgec keygen); deploy --trust KEY.pub checks it on the device"
    ),
    subnet: Optional[str] = typer.Option(
        None, "--subnet", help="a causal LM: extract the subnet depth=N,width=R of its search (edgec subnet search) first, "
        "or 'all' for every shape in one artifact (recipe: subnet)"
    ),
    latency_budget_ms: Optional[float] = typer.Option(
        None, "--latency-budget-ms", min=0.0,
        help="a searched causal LM: compile the best shape whose decode step fits this many ms, timed on --device (rpc://, tracker://) "
        "or read from --latency-table",
    ),
    latency_table: Optional[Path] = typer.Option(
        None, "--latency-table", help="shape latencies measured earlier: a manifest with latency_budget (or its table) for this target"
    ),
    graph: Optional[str] = typer.Option(
        None, "--graph", help="a GCN MODEL: the graph .npz (or zoo:wordnet) it is compiled for; parts per layer: sparse "
        "(aggregation) and dense (GEMM) (recipe: graph)"
    ),
) -> None:
    """Compile MODEL into a verified artifact: passes -> TVM or ONNX -> parity against its reference
    (torch; ONNX Runtime's CPU provider for an .onnx MODEL)."""
    from edgec.compiler import compile_model, default_output, plan_compile
    from edgec.passes import options_for
    from edgec.recipe import load_recipe, with_inputs

    sets = list(set_)
    if subnet is not None:
        sets.append(f"subnet={subnet}")
    if graph is not None:
        sets.append(f"graph={graph}")
    if target is not None:
        sets.append(f"target={target}")
    if backend is not None:
        sets.append(f"backend={backend}")
    for option in target_opt:
        if "=" not in option:
            from edgec.errors import BadInputError

            raise BadInputError(f"--target-opt {option!r}: expected key=value, e.g. mcpu=cortex-a76")
        key, value = option.split("=", 1)
        sets.append(f"target_options.{key}={value}")
    resolved = with_inputs(load_recipe(recipe, sets, options_for), input_shape, dim, reference_inputs)
    out_dir = output or default_output(model, resolved.target, resolved.backend)
    extra = None
    if latency_budget_ms is not None or latency_table is not None:
        resolved, extra = _within_budget(model, resolved, out_dir, force, latency_budget_ms, latency_table, device, dry_run)
    if dry_run:
        plan = plan_compile(model, resolved, out_dir, force, device).to_json(model, resolved)
        if sign is not None:
            from edgec.signing import load_private_key

            load_private_key(sign)
            plan["sign"] = str(sign)
        if as_json:
            _emit_json(plan)
            return
        import yaml

        err.print(f"[cyan]{plan['target_resolved']}[/]")
        err.print(f"would write {plan['output']}; every check that needs no model passed (--dry-run)")
        sys.stdout.write(yaml.safe_dump(resolved.model_dump(), sort_keys=False))
        return
    _limit_threads()
    progress = Progress()
    if extra is not None and extra["latency_budget"]["table"] is None:
        from edgec.subnet.budget import all_shapes_table, choose

        assert device is not None
        table = all_shapes_table(model, resolved, device, progress)
        chosen = choose(extra["search"], table, extra["latency_budget"]["budget_ms"])
        progress(f"latency budget: {chosen} fits {extra['latency_budget']['budget_ms']:g} ms with the lowest calibration loss")
        resolved = resolved.model_copy(update={"subnet": chosen})
        extra = {"latency_budget": {**extra["latency_budget"], "table": table, "chosen": chosen}}
    elif extra is not None:
        extra = {"latency_budget": extra["latency_budget"]}
    summary = compile_model(
        model, resolved, out_dir, force, progress, on_target=lambda t: _note(f"[cyan]{t.how}[/]"),
        trust_pickle=trust_pickle, device=device, sign=sign, extra=extra,
    )
    if extra is not None:
        summary["latency_budget"] = extra["latency_budget"]
    if as_json:
        _emit_json(summary)
        return
    parity = summary["parity"]
    status = "ok" if parity["ok"] else ("not run: " + parity["reason"] if parity["ok"] is None else "FAILED")
    out.print(f"artifact  {summary['artifact']}")
    out.print(f"target    {summary['target']} / {summary['backend']}")
    out.print(f"size      {summary['size_bytes'] / 1e6:.2f} MB")
    out.print(f"passes    {', '.join(p['name'] for p in summary['passes']) or '(none)'}")
    out.print(f"time      {time.perf_counter() - progress.start:.1f} s")
    if summary.get("signed_by"):
        out.print(f"signed    by {summary['signed_by']} (signature.json)")
    if parity["ok"] is None:
        out.print(f"parity    {status}")
    else:
        out.print(f"parity    {status} (max |diff| {parity['max_abs_diff']:.3g} <= {parity['tolerance']:.3g}){_generation_note(parity)}")
    budget = summary.get("latency_budget")
    if budget:
        decode = budget["table"]["shapes"][budget["chosen"]]["decode_ms"] if "table" in budget else None
        out.print(f"shape     {budget['chosen']}: the lowest calibration loss among the shapes whose decode step fits "
                  f"{budget['budget_ms']:g} ms on {budget['device']}" + ("" if decode is None else f" ({decode:.2f} ms)"))
    evaluation = summary.get("evaluation")
    if evaluation and "perplexity" in evaluation:
        out.print(f"held-out  perplexity {evaluation['perplexity']:.3f} over {evaluation['tokens']} tokens")
    for entry in summary["passes"]:
        layers = entry["record"].get("layers")
        if entry["name"] == "luc" and layers:
            _print_layer_table(entry["record"])
        if entry["name"] == "act":
            _print_act_record(entry["record"])


def _within_budget(model: str, recipe: Any, out_dir: Path, force: bool, budget_ms: float | None, table_path: Path | None,
                   device: str | None, dry_run: bool) -> tuple[Any, dict[str, Any]]:
    """`--latency-budget-ms`: checked before any work; with a stored table the shape is chosen
    now, otherwise after the shapes are timed on the device (compile_command)."""
    from edgec.compiler import plan_compile
    from edgec.errors import BadInputError
    from edgec.model import load_model
    from edgec.subnet.budget import choose, read_table
    from edgec.subnet.search import require_search

    if budget_ms is None:
        raise BadInputError("--latency-table needs --latency-budget-ms MS (the decode-step budget to choose a shape by)")
    if recipe.subnet is not None:
        raise BadInputError("--latency-budget-ms chooses the shape itself; drop --subnet")
    if recipe.passes:
        raise BadInputError("--latency-budget-ms times dense shapes; choose a shape first, then compile it with the recipe's passes")
    if table_path is None and (device is None or dry_run):
        raise BadInputError("--latency-budget-ms needs --latency-table FILE, or --device (rpc:// or tracker://) to time the shapes on"
                            + (" (not with --dry-run, which runs nothing)" if dry_run else ""))
    plan = plan_compile(model, recipe, out_dir, force, device)
    search = require_search(load_model(model), "--latency-budget-ms")
    record: dict[str, Any] = {"budget_ms": budget_ms, "device": device, "table": None, "chosen": None,
                              "rule": "the lowest calibration loss among the shapes whose decode step (p50) fits the budget"}
    if table_path is not None:
        table = read_table(table_path, plan.target.name, recipe.backend)
        chosen = choose(search, table, budget_ms)
        recipe = recipe.model_copy(update={"subnet": chosen})
        record.update(table=table, chosen=chosen, device=table["device"], table_file=str(table_path))
    return recipe, {"latency_budget": record, "search": search}


_FINETUNE_EXAMPLES = "\n\n".join([
    "Examples:",
    "  edgec finetune zoo:smollm2-135m --method edge-llm --recipe recipes/edge-llm-tuning.yaml -o tuned/smollm2",
    "  edgec finetune zoo:tiny-lm --method edge-llm --set finetune.options.stride=3 --set finetune.steps=20 -o tuned/tiny",
    "  edgec finetune zoo:tiny-lm --method edge-llm -o tuned/tiny --resume      (after a stop: continues the checkpoint)",
    "  edgec compile tuned/tiny --set voting.exits=[5] -o artifacts/last-exit   (vote with some exits only)",
    "  edgec subnet search zoo:tiny-lm && edgec finetune zoo:tiny-lm --method amoeba -o tuned/amoeba",
    "  edgec compile tuned/amoeba --subnet depth=4,width=0.8   (that shape's gated LoRA merged, then extracted)",
])


@app.command("finetune", epilog=_FINETUNE_EXAMPLES)
@_user_errors
def finetune_command(
    model: str = typer.Argument(..., help="Hugging Face causal-LM dir, a diffusers DiT dir (diffcr) or zoo:NAME"),
    method: str = typer.Option(..., "--method", "-m", help="edge-llm (adaptive layer tuning with voting exits), amoeba (one tuning for every subnet shape) or diffcr (token routers and learned keep ratios for a DiT)"),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="diffcr: the target mean keep ratio, in (0, 1] (finetune.options.ratio)"),
    output: Path = typer.Option(..., "--output", "-o", help="the tuned model directory to write (compile it with edgec compile)"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="recipe YAML with a finetune: section (see recipes/edge-llm-tuning.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe key, e.g. finetune.steps=20 or finetune.options.stride=3; repeatable"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUTPUT.checkpoint/ (written every finetune.checkpoint_every steps)"),
    force: bool = typer.Option(False, "--force", help="replace an earlier finetune output at OUTPUT"),
    as_json: bool = typer.Option(False, "--json", help="print the record as JSON on stdout"),
) -> None:
    """Fine-tune MODEL with a method's training procedure and write a model directory that
    `edgec compile` takes. edge-llm: exits every `stride` layers, LoRA trained one window
    below each exit at a time (the forward stops at the exit), exit heads saved; compiled,
    the exits vote (max softmax, renormalised). amoeba: a shape-aware mixture of LoRAs over the
    shapes of `edgec subnet search`, trained with in-place distillation (full model CE, two random
    shapes and the smallest with KD). Training text: the built-in train split."""
    from edgec.finetune import finetune
    from edgec.passes import options_for
    from edgec.recipe import load_recipe

    if ratio is not None:
        if method != "diffcr":
            from edgec.errors import BadInputError

            raise BadInputError(f"--ratio is a diffcr option; --method {method} does not read it")
        set_ = [*set_, f"finetune.options.ratio={ratio}"]
    resolved = load_recipe(recipe, list(set_), options_for)
    _limit_threads()
    record = finetune(model, method, resolved, output, resume, force, Progress())
    if as_json:
        _emit_json(record)
        return
    out.print(f"model     {record['output']}")
    if method == "diffcr":
        out.print(f"ratios    target {record['ratio']}, learned mean {record['mean_ratio']:.3f}, snapped to bins {record['mean_bin']:.3f} "
                  f"({len(record['table']['bins'])} layers x {record['regions']} timestep regions)")
        for layer, row in enumerate(record["table"]["bins"]):
            out.print(f"layer {layer:>3}  " + "  ".join(f"{r:.1f}" for r in row))
        if record["loss"]:
            out.print(f"loss      {record['loss']['first']:.4f} -> {record['loss']['last_10_mean']:.4f} (mean of the last 10 steps)")
        out.print(f"time      {record['seconds']:.1f} s, {record['step_ms_mean']:.0f} ms a step; peak RSS {record['peak_rss_bytes'] / 1e6:.0f} MB")
        return
    if method == "amoeba":
        out.print(f"mixture   {record['experts']} LoRA experts per projection (rank {record['rank']}, top {record['top_k']}), "
                  f"{record['trained_parameters']:,} parameters trained")
        for name, what in (("full", "full model CE"), (record["smallest_shape"], f"smallest {record['smallest_shape']} KD")):
            loss = record["loss"][name]
            out.print(f"{what:<32} {loss['first']:.3f} -> {loss['last_10_mean']:.3f} (mean of the last 10 steps)")
        others = [v for k, v in record["loss"].items() if k not in ("full", record["smallest_shape"])]
        if others:
            out.print(f"{len(others)} random shapes KD, mean over shapes: first {sum(v['first'] for v in others) / len(others):.3f}, "
                      f"last {sum(v['last'] for v in others) / len(others):.3f}")
        out.print(f"time      {record['seconds']:.1f} s, {record['step_ms_mean']:.0f} ms a step; peak RSS {record['peak_rss_bytes'] / 1e6:.0f} MB")
        return
    out.print(f"exits     after layers {', '.join(map(str, record['exits']))} (stride {record['stride']}, rank {record['rank']})")
    for exit_layer, loss in record["loss"].items():
        out.print(f"exit {exit_layer:>3}  loss {loss['first']:.3f} -> {loss['last_10_mean']:.3f} (mean of the last 10 steps)")
    out.print(f"time      {record['seconds']:.1f} s, {record['step_ms_mean']:.0f} ms a step; peak RSS {record['peak_rss_bytes'] / 1e6:.0f} MB")


def _generation_note(parity: dict[str, Any]) -> str:
    generation = parity.get("generation")
    if not generation:
        return ""
    tie = f", then a near tie at step {generation['near_tie_at']}" if "near_tie_at" in generation else ""
    return f"; greedy decode {generation['matched']}/{generation['steps']} tokens as the reference{tie}"


def _print_act_record(record: dict[str, Any]) -> None:
    """The act heads per layer, and what the search measured when there was one."""
    rule = record["rule"]
    heads = "; ".join(f"layer {row['layer']}: {', '.join(map(str, row['heads']))}" for row in record["table"]) or "none"
    out.print(f"act  {record['calibrated_heads']} heads (beta {rule['beta']}, {rule['threshold_mode']} {rule['threshold']}, "
              f"stat {rule['stat']}, phases {'+'.join(record['phases'])}): {heads}")
    search = record.get("search")
    if search:
        out.print(f"act search ({search['source']}): {search['candidates']} of {search['heads_with_hidden_sinks']} heads with "
                  f"hidden sinks tried on {', '.join(search['tasks'])} (seed {search['seed']}); calibration accuracy "
                  f"{search['baseline']['accuracy']:.3f} -> {search['calibrated']['accuracy']:.3f}")


def _print_layer_table(record: dict[str, Any]) -> None:
    """The luc policy per layer: what each layer got and why (its sensitivity)."""
    from rich.table import Table

    achieved = record["achieved"]
    size = record["budget"].get("size_bytes")
    budget = f" (size budget {size:,} bytes)" if size else ""
    table = Table(title=f"luc policy ({record['policy']}): mean {achieved['bits']:g} bits, sparsity {achieved['sparsity']:.3f}, "
                  f"weights {achieved.get('weight_bytes', 0):,} bytes{budget}", title_justify="left")
    first = record["layers"][0].get("sensitivity", {}) if record["layers"] else {}
    probe_bits = "/".join(k for k in sorted(first.get("bits", {})) if k != "8")
    probe_sparsity = "/".join(f"{float(k):g}" for k in sorted(first.get("sparsity", {})))
    for column in ("layer", "bits", "sparsity", "bytes", f"loss +Δ at {probe_bits} bits", f"loss +Δ pruned {probe_sparsity}"):
        table.add_column(column, justify="right")
    for row in record["layers"]:
        sens = row.get("sensitivity", {})
        bits = " / ".join(f"{v:.3f}" for k, v in sorted(sens.get("bits", {}).items()) if k != "8")
        pruned = " / ".join(f"{v:.3f}" for _, v in sorted(sens.get("sparsity", {}).items()))
        table.add_row(str(row["layer"]), str(row["bits"]), f"{row['measured_sparsity']:.3f}", f"{row['bytes']:,}", bits, pruned)
    out.print(table)


_TRUST_HELP = "an ed25519 public key (edgec keygen's KEY.pub): run nothing unless the artifact is signed by it, checked on the device"


def _trusted(path: Path | None) -> str | None:
    if path is None:
        return None
    from edgec.signing import trusted_key

    return trusted_key(path)


@app.command("keygen")
@_user_errors
def keygen_command(
    key: Path = typer.Argument(..., help="where to write the private key (PEM, mode 0600); the public key goes to KEY.pub"),
    force: bool = typer.Option(False, "--force", help="replace an existing key (what it signed will no longer verify)"),
    as_json: bool = typer.Option(False, "--json", help="print the paths and fingerprint as JSON"),
) -> None:
    """Make an ed25519 key pair for signing artifacts.

    \b
    Examples:
      edgec keygen ~/.edgec/release.key
      edgec compile zoo:tiny-lm --target arm64 --sign ~/.edgec/release.key -o artifacts/tiny-arm64
      edgec deploy artifacts/tiny-arm64 -d qemu-arm64 --trust ~/.edgec/release.key.pub
    """
    from edgec.signing import generate_key

    public, fingerprint = generate_key(key, force)
    if as_json:
        _emit_json({"private_key": str(key), "public_key": str(public), "fingerprint": fingerprint})
        return
    out.print(f"private key {key} (keep it secret)")
    out.print(f"public key  {public} ({fingerprint}): give it to --trust")


@app.command("sign")
@_user_errors
def sign_command(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    key: Path = typer.Option(..., "--key", "-k", help="ed25519 private key (PEM; edgec keygen or openssl genpkey -algorithm ed25519)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Sign an artifact's manifest (which lists every file's sha256) after checking the files
    against it; `verify`, `deploy` and `profile --trust KEY.pub` check the signature."""
    from edgec.artifact import check_hashes, read_manifest
    from edgec.errors import CheckFailedError
    from edgec.signing import load_private_key, sign_artifact

    private = load_private_key(key)
    manifest = read_manifest(artifact)
    hashes = check_hashes(artifact, manifest)
    if not hashes.ok:
        changed = hashes.mismatched + hashes.missing + hashes.unexpected
        raise CheckFailedError(f"{artifact} does not match its manifest ({', '.join(changed[:3])}); not signed (edgec verify {artifact})")
    signer = sign_artifact(artifact, private)
    if as_json:
        _emit_json({"artifact": str(artifact), "signed_by": signer})
        return
    out.print(f"signed    {artifact}/signature.json by {signer}")


@app.command("verify")
@_user_errors
def verify_command(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    trust: Optional[Path] = typer.Option(None, "--trust", help="an ed25519 public key (edgec keygen's KEY.pub) the artifact must be signed by"),
    as_json: bool = typer.Option(False, "--json", help="print the checks as JSON"),
) -> None:
    """Re-hash every file against the manifest and re-run the reference inputs where possible."""
    from edgec.verify import verify_artifact

    report = verify_artifact(artifact, _trusted(trust))
    if as_json:
        _emit_json(report)
    else:
        for check in report["checks"]:
            mark = {True: "[green]ok[/]", False: "[red]FAILED[/]", None: "[yellow]skipped[/]"}[check["ok"]]
            out.print(f"{check['name']:<8} {mark}  {check['detail']}")
    if not report["ok"]:
        from edgec.errors import EXIT_CHECK_FAILED

        err.print(f"[bold red]error:[/] {artifact} failed verification")
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command("report")
@_user_errors
def report_command(
    artifact: Path = typer.Argument(..., help="artifact directory (edgec compile -o DIR)"),
    output: Optional[Path] = typer.Option(None, "--out", "-o", help="report directory (default: DIR-report next to it)"),
    as_json: bool = typer.Option(False, "--json", help="print what was written as JSON"),
) -> None:
    """Write an HTML page and plots of a compiled artifact: luc bits, sparsity and
    sensitivity per layer, act heads and their search log, a DiT's token skipping (keep
    ratio per block and timestep region, the tokens the routers keep over drawn items),
    sizes, parity, perplexity, and kernel choices."""
    from edgec.report import write_report

    written = write_report(artifact, output)
    if as_json:
        _emit_json(written)
        return
    out.print(f"report  {written['report']}/report.html")
    for picture in ("policy.png", "mod_ratios.png", "keep_maps.png"):
        if picture in written["files"]:
            out.print(f"plot    {written['report']}/{picture}")


@app.command("deploy")
@_user_errors
def deploy_command(
    artifact: Path = typer.Argument(..., help="artifact directory (edgec compile -o DIR)"),
    device: str = typer.Option(
        ..., "--device", "-d",
        help="qemu-arm64 | ssh://user@host[:port]/dir[?python=P] | rpc://host:port[?key=K] | tracker://host:port?key=K",
    ),
    timeout: float = typer.Option(
        DEFAULT_TIMEOUT_S, "--timeout", min=1.0,
        help="seconds each step on a qemu-arm64 or ssh:// device may take before it is given up (exit 6); rpc:// and tracker:// take ?timeout=S",
    ),
    trust: Optional[Path] = typer.Option(None, "--trust", help=_TRUST_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Upload an artifact to a device, check its files and runtime versions there, run parity there.

    An artifact built for another architecture than the device is refused before upload.
    """
    from edgec.deploy import deploy

    result = deploy(artifact, device, Progress(), timeout, trusted=_trusted(trust))
    if as_json:
        _emit_json(result)
    else:
        parity = result["parity"]
        where = "emulated" if result["emulated"] else "real"
        out.print(f"deployed  {artifact} -> {result['device']}:{result['device_path']} ({result['machine']}, {where})")
        out.print(f"files     {result['hash_check']}")
        if result.get("signature"):
            out.print(f"signature {result['signature']}")
        out.print(f"runtime   {', '.join(f'{k} {v}' for k, v in result['versions'].items()) or 'not reported by the device'}")
        if parity["ok"]:
            out.print(f"parity    ok (max |diff| {parity['max_abs_diff']:.3g} <= {parity['tolerance']:.3g}){_generation_note(parity)}")
        else:
            out.print(f"parity    FAILED: {parity['reason']}", markup=False)
        for figure, why in result.get("unavailable", {}).items():
            out.print(f"[yellow]not available[/] {figure}: {why}")
    if not result["parity"]["ok"]:
        from edgec.errors import EXIT_CHECK_FAILED

        err.print(f"[bold red]error:[/] parity failed on {device}")
        raise typer.Exit(EXIT_CHECK_FAILED)


@app.command("profile")
@_user_errors
def profile_command(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    device: str = typer.Option(..., "--device", "-d", help="qemu-arm64 | ssh://... | rpc://... | tracker://... (see deploy --help)"),
    runs: int = typer.Option(10, "--runs", help="timed runs"),
    warmup: int = typer.Option(2, "--warmup", help="untimed runs first"),
    prompt_len: int = typer.Option(32, "--prompt-len", help="causal LMs: prompt tokens for prefill latency"),
    new_tokens: int = typer.Option(16, "--new-tokens", help="causal LMs: decode steps for tokens/s"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG bar chart of the per-op time"),
    compare_with: Optional[Path] = typer.Option(None, "--compare", help="an earlier result file: print ratios to it"),
    save: Optional[Path] = typer.Option(
        None, "--out", "-o", help="write the result file here (JSON; also partial results, marked incomplete, if the device dies)"
    ),
    timeout: float = typer.Option(
        DEFAULT_TIMEOUT_S, "--timeout", min=1.0,
        help="seconds each step on a qemu-arm64 or ssh:// device may take before it is given up (exit 6); rpc:// and tracker:// take ?timeout=S",
    ),
    trust: Optional[Path] = typer.Option(None, "--trust", help=_TRUST_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Latency p50/p90/p99, load time, peak memory, per-op time and tokens/s on a device.

    Over a stock TVM RPC server (rpc://, tracker://) only time_evaluator timings exist;
    the output lists each unavailable figure and why.
    """
    from edgec.profile import compare, plot_per_op, profile_artifact, read_baseline

    baseline = read_baseline(compare_with) if compare_with is not None else None
    result = profile_artifact(artifact, device, runs, warmup, prompt_len, new_tokens, Progress(), save, timeout, _trusted(trust))
    if plot is not None:
        if not result.get("per_op_ms"):
            raise UnsupportedError(f"--plot: {result['device']} gives no per-op times ({result.get('unavailable', {}).get('per_op_ms', 'none measured')})")
        plot_per_op(result, plot)
        _note(f"per-op chart written to {plot}")
    if baseline is not None:
        result["compare"] = compare(result, baseline)
    if as_json:
        _emit_json(result)
        return
    lat = result["latency"]
    out.print(f"[bold]{result['note']}[/]")
    out.print(f"{result['entry']:<8} p50 {lat['p50_ms']:.2f} ms  p90 {lat['p90_ms']:.2f}  p99 {lat['p99_ms']:.2f}  mean {lat['mean_ms']:.2f} +- {lat['std_ms']:.2f} ({lat['runs']} runs)")
    if result.get("parts_ms"):
        out.print("parts    " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in result["parts_ms"].items()) + " (p50 each)")
    if result.get("decode_tokens_per_s"):
        out.print(f"decode   {result['decode_tokens_per_s']:.1f} tokens/s after a {result['prompt_tokens']}-token prompt")
    if result.get("sample_ms"):
        out.print(f"sample   {result['sample_ms']:.0f} ms per image ({result['sample_steps']} steps, guided)")
    if result.get("load_ms") is not None:
        rss = result.get("peak_rss_bytes")
        memory = f"; peak RSS {rss / 1e6:.0f} MB{' (includes the emulator)' if result['emulated'] else ''}" if rss else ""
        out.print(f"load     {result['load_ms']:.0f} ms{memory}; artifact {result['size_bytes'] / 1e6:.1f} MB")
    if result.get("library_load_ms") is not None:
        out.print(f"load     {result['library_load_ms']:.0f} ms to load the libraries over RPC; artifact {result['size_bytes'] / 1e6:.1f} MB")
    for name, ms in sorted(result.get("per_op_ms", {}).items(), key=lambda kv: -kv[1])[:8]:
        out.print(f"  {ms:8.2f} ms  {name}")
    for served in result.get("devices", []):
        out.print(f"  device {served['server']}: {served['runs']} runs, p50 {served['p50_ms']:.2f} ms")
    for figure, why in result.get("unavailable", {}).items():
        out.print(f"[yellow]not available[/] {figure}: {why}")
    for key, ratio in result.get("compare", {}).items():
        out.print(f"  {key}: {ratio:.2f}x")


@app.command("run")
@_user_errors
def run_command(
    artifact: Path = typer.Argument(..., help="artifact directory (edgec compile -o DIR)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="causal LMs: text to continue (greedy)"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", min=1, help="causal LMs: tokens to generate"),
    text: list[str] = typer.Option([], "--text", "-t", help="encoders: text to embed; repeatable"),
    inputs: Optional[str] = typer.Option(None, "--inputs", help="other families: an .npz of input name -> array (default: the reference inputs)"),
    shape: Optional[str] = typer.Option(None, "--shape", help="a `--subnet all` artifact: the shape to run, depth=D,width=W (default the largest)"),
    klass: Optional[str] = typer.Option(None, "--class", help="diffusion models: the class to draw, by index or label"),
    samples: int = typer.Option(8, "--samples", min=1, help="diffusion models: images to draw (seeds --seed, --seed+1, ...)"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, max=1000, help="diffusion models: sampling steps (default the recipe's)"),
    seed: int = typer.Option(0, "--seed", min=0, help="diffusion models: seed of the first image's noise (numpy)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", min=1.0, help="diffusion models: classifier-free guidance scale (default the recipe's)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="diffusion models: write the images as a PNG grid here"),
    npz: Optional[Path] = typer.Option(None, "--npz", help="diffusion models: also save the images as an .npz (`images`: [N, C, H, W] in [-1, 1])"),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="diffusion models: draw the samples on this device (qemu-arm64, ssh://...) through edgec's agent"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Run an artifact in its own runtime, as its family's program says: a causal LM
    generates from --prompt, an encoder embeds --text, a diffusion model draws --samples
    images of --class (-o grid.png), other families run their entries on --inputs."""
    from edgec.artifact import open_runtime, read_manifest
    from edgec.families import family_named

    _limit_threads()
    manifest = read_manifest(artifact)
    family = family_named(manifest["model"]["family"])
    request = {"prompt": prompt, "max_new_tokens": max_new_tokens, "text": text, "inputs": inputs, "shape": shape,
               "class": klass, "samples": samples, "steps": steps, "seed": seed, "guidance": guidance, "output": output,
               "npz": npz, "device": device}
    if device is not None and manifest["program"]["kind"] != "sample":
        from edgec.errors import BadInputError

        raise BadInputError(f"--device: `run` draws a diffusion model's samples on a device; {artifact} is a "
                            f"{manifest['model']['family']} artifact: use `edgec deploy` / `edgec profile --device`")
    runtime = None if device is not None else open_runtime(artifact, manifest)
    result = family.run(artifact, manifest, runtime, {**request, "progress": Progress()})
    if as_json:
        _emit_json(result)
        return
    lines, note = family.describe_run(result)
    for line in lines:
        out.print(line, markup=False)
    if note:
        _note(f"[dim]{note}[/]")


@app.command("bench")
@_user_errors
def bench_command(
    artifact: Path = typer.Argument(..., help="artifact directory that runs on this machine"),
    threads: str = typer.Option(str(os.cpu_count() or 1), "--threads", "-t", help="CPU threads, a comma list to sweep (e.g. 1,2,4)"),
    batch: str = typer.Option("1", "--batch", "-b", help="rows per call (the reference rows repeated), a comma list to sweep; needs a dynamic batch axis"),
    prompt_len: str = typer.Option("64", "--prompt-len", "-p", help="causal LMs: prompt tokens, a comma list to sweep"),
    new_tokens: str = typer.Option("16", "--new-tokens", "-n", help="causal LMs: greedy decode steps, a comma list to sweep (0: prefill only)"),
    runs: int = typer.Option(5, "--runs", "-r", help="timed repetitions of each point"),
    warmup: int = typer.Option(1, "--warmup", help="untimed repetitions before them"),
    output_format: str = typer.Option("table", "--format", "-o", help="table, csv or json"),
) -> None:
    """Time an artifact on this machine over a sweep, like llama-bench: latency percentiles and decode tokens/s.

    \b
    Examples:
      edgec bench artifacts/tiny-cpu
      edgec bench artifacts/tiny-cpu -t 1,2 -p 16,64,128 -n 0,32 --format csv > sweep.csv
      edgec bench artifacts/tiny-cpu -b 1,4,8 -n 16
    """
    from edgec.bench import COLUMNS, FORMATS, HEADERS, as_csv, bench, flat_rows, parse_sweep
    from edgec.errors import BadInputError

    if output_format not in FORMATS:
        raise BadInputError(f"--format {output_format!r}: give one of {', '.join(FORMATS)}")
    sweep = (parse_sweep(threads, "--threads", 1), parse_sweep(batch, "--batch", 1), parse_sweep(prompt_len, "--prompt-len", 1), parse_sweep(new_tokens, "--new-tokens", 0))
    result = bench(artifact, *sweep, runs, warmup, Progress())
    if output_format == "json":
        _emit_json(result)
        return
    if output_format == "csv":
        sys.stdout.write(as_csv(result))
        return
    table = Table(title=f"{result['artifact']} ({result['target']} / {result['backend']}), {runs} runs after {warmup} warm-up")
    for header in HEADERS:
        table.add_column(header, justify="right")
    for row in flat_rows(result):
        table.add_row(*(f"{row[c]:.{1 if c == 'decode_tokens_per_s' else 2}f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS))
    out.print(table)


@app.command("inspect")
@_user_errors
def inspect_command(
    target_path: str = typer.Argument(..., metavar="MODEL|DIR", help="a model (as for compile) or an artifact directory"),
    as_json: bool = typer.Option(False, "--json", help="print as JSON"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow a .pt2 MODEL (torch.export.load unpickles it)"),
) -> None:
    """Family, architecture, parameters, layers and dtypes of a model; the manifest of an artifact."""
    from edgec.artifact import MANIFEST, read_manifest

    path = Path(target_path)
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        if as_json:
            _emit_json(manifest)
            return
        _print_manifest(manifest)
        return
    from edgec.model import load_model

    handle = load_model(target_path, trust_pickle)
    data = {
        "model": handle.name,
        "family": handle.family,
        "architecture": handle.architecture,
        "source": str(handle.source),
        "sha256": handle.sha256,
        **handle.info,
    }
    if as_json:
        _emit_json(data)
        return
    for key, value in data.items():
        out.print(f"{key:<24} {value}")


def _print_manifest(manifest: dict[str, Any]) -> None:
    model = manifest["model"]
    out.print(f"artifact of {model['name']} ({model['architecture']}, {model['family']})")
    out.print(f"  target   {manifest['target']['name']} ({manifest['target']['arch']}) via {manifest['backend']}")
    if manifest.get("part_targets"):
        out.print("  parts    " + ", ".join(f"{part} on {t['name']} ({t['arch']})" for part, t in manifest["part_targets"].items()))
    out.print(f"  size     {manifest['size_bytes'] / 1e6:.2f} MB in {len(manifest['files'])} files")
    out.print(f"  edgec    {manifest['edgec_version']}, built {manifest['created']}")
    parity = manifest.get("parity", {})
    out.print(f"  parity   ok={parity.get('ok')} max|diff|={parity.get('max_abs_diff')} tol={parity.get('tolerance')}")
    program = manifest["program"]
    out.print(f"  program  {program['kind']}: entries {', '.join(program['entries'])}")
    from edgec.families import family_named

    family = family_named(model["family"])
    if family.section_key is not None and family.section_key in manifest:
        out.print(f"  {family.section_key:<8} {family.describe_section(manifest[family.section_key])}", markup=False)
    table = Table(title="passes", show_edge=False)
    for column in ("pass", "changed", "seconds"):
        table.add_column(column)
    for entry in manifest["passes"]:
        table.add_row(entry["name"], str(entry["changed"]), f"{entry['seconds']:.2f}")
    if manifest["passes"]:
        out.print(table)
    for name, digest in manifest["files"].items():
        out.print(f"  {digest[:12]}  {name}")


@app.command("eval")
@_user_errors
def eval_command(
    model: str = typer.Argument(..., metavar="MODEL|ARTIFACT", help="a model (as for compile) or an artifact directory"),
    task: Optional[str] = typer.Option(
        None, "--task",
        help="causal LMs: ppl (default; perplexity and bits per byte), wordnet, shakespeare or FILE.jsonl "
        "(test-split accuracy); encoders: similarity (needs --data pairs.tsv) or retrieval (default); "
        "diffusion models: fid (default; class accuracy and FID on the Fashion-MNIST classifier's features)",
    ),
    data: Optional[str] = typer.Option(
        None, "--data", help="ppl: 'held-out' (default) or a UTF-8 .txt file; similarity: a TSV of sentence1<TAB>sentence2<TAB>score"
    ),
    tokens: int = typer.Option(32768, "--tokens", min=2, help="ppl: tokens to score"),
    window: int = typer.Option(256, "--window", min=8, help="ppl: tokens per scored window"),
    seed: int = typer.Option(0, "--seed", help="labelled tasks and retrieval: seed of the split / the sampled set"),
    samples: int = typer.Option(120, "--samples", min=4, help="labelled tasks: test prompts (balanced over the labels); retrieval: queries; fid: images drawn"),
    device: Optional[str] = typer.Option(
        None, "--device", "-d", help="ppl of an artifact: run it on this device (as for deploy --device), e.g. a cross-built one"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Evaluate a model (torch) or a compiled artifact (its runtime, here or on --device)
    with the tasks of its family: perplexity or labelled-task accuracy for causal LMs,
    embedding similarity (Spearman) or retrieval for encoders."""
    from edgec.families import EvalRequest, family_of_spec

    _limit_threads()
    family = family_of_spec(model)
    request = EvalRequest(task=task, data=data, tokens=tokens, window=window, seed=seed, samples=samples, device=device)
    result = family.eval(model, request, Progress())
    if as_json:
        _emit_json(result)
        return
    out.print(family.describe_eval(result))


@analyze_app.command("attention")
@_user_errors
def analyze_attention_command(
    model: str = typer.Argument(..., help="a causal LM: Hugging Face directory or zoo:NAME"),
    data: str = typer.Option("wordnet", "--data", help="prompts: a task's calibration split (wordnet, shakespeare) or a text file, one prompt per line"),
    samples: int = typer.Option(8, "--samples", min=1, help="prompts to analyse"),
    seed: int = typer.Option(0, "--seed", help="seed of the task split the prompts come from"),
    tau: float = typer.Option(0.1, "--tau", min=0.0, help="absolute threshold on a key's mean received attention"),
    alpha: float = typer.Option(5.0, "--alpha", min=0.0, help="relative threshold: mean received attention > alpha / N"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write attention heat maps (sinks marked) of the heads with most hidden sinks here"),
    as_json: bool = typer.Option(False, "--json", help="print every (layer, head) with its sinks as JSON"),
) -> None:
    """Attention sinks per (layer, head): keys whose mean received attention passes tau or
    alpha/N on calibration prompts, with position, token and score. "Hidden" sinks are the
    ones after a row's first: the only ones ACT (the act pass) changes."""
    from edgec.analyze import analyze_attention, check_attention_model, hidden_mass, plot_heatmaps, prompts_from
    from edgec.model import load_model

    _limit_threads()
    progress = Progress()
    handle = load_model(model)
    check_attention_model(handle)
    prompts = prompts_from(handle, data, samples, seed)
    result = analyze_attention(handle, prompts, tau, alpha, progress)
    written: list[str] = []
    if plot is not None:
        tokens = handle.tokenizer.convert_ids_to_tokens(prompts[0].ids) if handle.tokenizer is not None else []
        written = [str(p) for p in plot_heatmaps(result, tokens, plot)]
    result.pop("_maps")
    result["plots"] = written
    if as_json:
        _emit_json(result)
        return
    summary = result["summary"]
    out.print(f"{model}: {len(prompts)} prompts ({data}), tau {tau}, alpha {alpha}")
    out.print(f"sinks {summary['sinks']}: at position 0 {summary['initial_sinks']}, elsewhere {summary['non_initial_sinks']}; "
              f"hidden (after a row's first) {summary['hidden_sinks']} in {summary['heads_with_hidden_sinks']} of {summary['heads']} heads")
    table = Table(title="heads whose hidden sinks receive the most attention", title_justify="left")
    for column in ("layer", "head", "hidden", "at 0", "elsewhere", "top sink tokens (position: score)"):
        table.add_column(column, justify="right" if column != "top sink tokens (position: score)" else "left")
    ranked = sorted(result["heads"], key=lambda row: (-hidden_mass(row), row["layer"], row["head"]))[:12]
    for row in ranked:
        top = sorted((s for s in row["sinks"] if s["position"] != 0), key=lambda s: -s["score"] * s["seen_by"])[:3]
        table.add_row(str(row["layer"]), str(row["head"]), str(row["hidden"]), str(row["initial"]), str(row["non_initial"]),
                      ", ".join(f"{s['token']!r} ({s['position']}: {s['score']:.2f})" for s in top))
    out.print(table)
    for path in written:
        out.print(f"plot  {path}")


_SUBNET_EXAMPLES = "\n\n".join([
    "Examples:",
    "  edgec subnet search zoo:tiny-lm --plot subnets.png",
    "  edgec subnet search zoo:smollm2-135m --min-depth 16 --widths 1,0.8,0.65,0.5 --json",
    "  edgec compile zoo:tiny-lm --subnet depth=4,width=0.8 --target arm64",
])


@subnet_app.command("search", epilog=_SUBNET_EXAMPLES)
@_user_errors
def subnet_search_command(
    model: str = typer.Argument(..., help="a causal LM: Hugging Face directory or zoo:NAME"),
    samples: int = typer.Option(8, "--samples", min=1, help="calibration segments from the built-in train split"),
    seq_len: int = typer.Option(128, "--seq-len", min=8, help="tokens per calibration segment"),
    min_depth: Optional[int] = typer.Option(None, "--min-depth", min=1, help="shallowest subnet in the table (default half the layers)"),
    widths: str = typer.Option("1,0.9,0.8,0.7,0.6,0.5", "--widths", help="width ratios in the table: fractions of attention and MLP parameters kept"),
    force: bool = typer.Option(False, "--force", help="search again even if the cache has this search"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write calibration loss against parameters (PNG) here"),
    as_json: bool = typer.Option(False, "--json", help="print the search (depth masks, table) as JSON"),
) -> None:
    """Depth masks by dynamic programming over calibration scores, width masks by FLAP-style
    importance (nested across ratios, with compensation biases), and the table of shapes with
    parameters and calibration loss. Cached per model hash; an interrupted search resumes."""
    from edgec.errors import BadInputError
    from edgec.model import load_model
    from edgec.subnet.search import SearchOptions, plot_search, search_subnets

    try:
        ratios = [float(w) for w in widths.split(",")]
    except ValueError:
        raise BadInputError(f"--widths {widths}: give comma-separated fractions, e.g. 1,0.8,0.6") from None
    options = SearchOptions(samples=samples, seq_len=seq_len, min_depth=min_depth, widths=ratios)
    _limit_threads()
    progress = Progress()
    handle = load_model(model)
    if handle.family != "causal-lm":
        raise BadInputError(f"{model}: subnet search works on causal LMs; this is a {handle.family} model")
    search, source = search_subnets(handle, options, progress, force)
    if plot is not None:
        plot_search(search, plot)
    record = {**search.record, "source": source, "cache": str(search.directory), "plot": None if plot is None else str(plot)}
    if as_json:
        _emit_json(record)
        return
    out.print(f"{model}: {record['num_layers']} layers, {record['evaluations']} scored evaluations "
              f"({source}; {record['seconds']} s); loss = {record['score']}")
    depths = Table(title="layers kept per depth (dynamic programming)", title_justify="left")
    for column in ("depth", "removed layers", "loss"):
        depths.add_column(column, justify="right")
    for row in record["depths"]:
        depths.add_row(str(row["depth"]), ",".join(map(str, row["removed"])) or "-", f"{row['score']:.4f}")
    out.print(depths)
    table = Table(title="shapes: --subnet depth=D,width=W", title_justify="left")
    for column in ("depth", "width", "parameters", "of full", "loss", "perplexity"):
        table.add_column(column, justify="right")
    for row in record["table"]:
        table.add_row(str(row["depth"]), f"{row['width']:g}", f"{row['parameters']:,}", f"{row['fraction']:.1%}",
                      f"{row['score']:.4f}", f"{row['perplexity']:.2f}")
    out.print(table)
    if plot is not None:
        out.print(f"plot  {plot}")


@app.command("passes")
def passes_command(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Passes a recipe can name, with their options."""
    from pydantic import BaseModel
    from rich.markup import escape

    from edgec.passes import REGISTRY

    def options_of(model: type[BaseModel]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for key, field in model.model_fields.items():
            nested = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
            if nested is not None:
                # A section of options (act.search): list its own, as PASS.section.option.
                found.update({f"{key}.{k}": v for k, v in options_of(nested).items()})
            else:
                found[key] = {"default": field.get_default(call_default_factory=True), "help": field.description}
        return found

    rows = [
        {"name": name, "families": list(cls.families), "summary": cls.summary, "options": options_of(cls.Options)}
        for name, cls in REGISTRY.items()
    ]
    if as_json:
        _emit_json(rows)
        return
    for row in rows:
        out.print(f"[bold]{row['name']}[/] ({', '.join(row['families'])}): {escape(row['summary'])}")
        for option, info in row["options"].items():
            out.print(escape(f"    {option} = {info['default']!r}  {info['help'] or ''}"))


@zoo_app.command("list")
def zoo_list(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Built-in models usable as zoo:NAME."""
    from edgec.zoo import ZOO

    rows = [{"name": f"zoo:{m.name}", "description": m.description, "source": m.source} for m in ZOO.values()]
    if as_json:
        _emit_json(rows)
        return
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        out.print(f"[bold]{row['name']:<{width}}[/] {row['description']}\n{'':{width}} {row['source']}")


@device_app.command("up")
@_user_errors
def device_up(
    device: str = typer.Argument("qemu-arm64", help="qemu-arm64"),
    port: int = typer.Option(9091, "--port", "-p", help="TCP port of the RPC server"),
    key: str = typer.Option("edgec-qemu-arm64", "--key", help="RPC key (a routing label for trackers, not a password)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; anything but loopback needs --allow-remote"),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="allow a non-loopback --host: anyone who reaches it runs code"),
    tracker: Optional[str] = typer.Option(None, "--tracker", help="register with a TVM RPC tracker at HOST:PORT"),
    as_json: bool = typer.Option(False, "--json", help="print the server's state as JSON"),
) -> None:
    """Start a stock TVM RPC server inside the emulated device; then use --device rpc://127.0.0.1:PORT?key=KEY."""
    from edgec.device_server import up

    state = up(device, port, key, host, allow_remote, tracker, Progress())
    if as_json:
        _emit_json(state)
        return
    out.print(f"{device} up: pid {state['pid']}, {state['uri']}{' via tracker ' + tracker if tracker else ''} (log {state['log']})")


@device_app.command("status")
def device_status(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Servers edgec started that still have a process, and whether one listens on the port."""
    from edgec.device_server import known_servers

    servers = known_servers()
    if as_json:
        _emit_json(servers)
        return
    if not servers:
        out.print("no device is up (edgec device up qemu-arm64)")
    for state in servers:
        listening = "listening" if state["listening"] else "NOT listening"
        out.print(f"{state['device']:<12} pid {state['pid']:<8} {state['uri']}  {listening} "
                  f"({len(state['pids'])} process{'es' if len(state['pids']) > 1 else ''})")


@device_app.command("down")
@_user_errors
def device_down(
    device: str = typer.Argument("qemu-arm64", help="qemu-arm64"),
    port: Optional[int] = typer.Option(None, "--port", "-p", help="only the server on this port (default: all of this device)"),
) -> None:
    """Stop the device's RPC server(s)."""
    from edgec.device_server import down

    for state in down(device, port):
        out.print(f"{device} down: pid {state['pid']}, port {state['port']}")


@device_app.command("clean")
@_user_errors
def device_clean(
    device: str = typer.Argument("qemu-arm64", help="qemu-arm64 or ssh://user@host/dir (as given to --device)"),
    keep_mb: int = typer.Option(0, "--keep-mb", min=0, help="keep the newest uploads that fit in this many MB (0: remove all)"),
    as_json: bool = typer.Option(False, "--json", help="print what was removed as JSON"),
) -> None:
    """Remove artifacts uploaded to a device by earlier deploys (and interrupted uploads).

    Every deploy already trims the device's uploads to EDGEC_DEVICE_UPLOADS_MB (default 2048), oldest first; this frees the rest now.

    \b
    Examples:
      edgec device clean
      edgec device clean ssh://pi@board.local/home/pi/edgec --keep-mb 500
    """
    from edgec.deploy import open_device, prune_uploads
    from edgec.errors import BadInputError
    from edgec.targets.devices import DEFAULT_TIMEOUT_S, RpcEndpoint

    target = open_device(device)
    if isinstance(target, RpcEndpoint):
        raise BadInputError(f"{device}: a stock RPC server keeps each upload in a temporary directory of its session; there is nothing to clean")
    if target.local_uploads is None:
        target.install_agent()
    result = prune_uploads(target, keep_mb, DEFAULT_TIMEOUT_S)
    if as_json:
        _emit_json(result)
        return
    out.print(f"{device}: removed {len(result['removed'])} upload(s), {result['freed_bytes'] / 1e6:.1f} MB; "
              f"{len(result['kept'])} kept, {result['kept_bytes'] / 1e6:.1f} MB")


@targets_app.command("list")
def targets_list(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Targets and what each resolves to."""
    from edgec.targets.registry import TARGETS

    rows = [
        {
            "name": t.name,
            "aliases": list(t.aliases),
            "arch": t.arch,
            "backends": list(t.backends),
            "tvm_target": t.tvm_target,
            "cross_compiler": t.cross_compiler,
            "description": t.description,
        }
        for t in TARGETS
    ]
    if as_json:
        _emit_json(rows)
        return
    for row in rows:
        aliases = f" (aliases: {', '.join(row['aliases'])})" if row["aliases"] else ""
        out.print(f"[bold]{row['name']}[/]{aliases}: {row['description']}; backends {', '.join(row['backends'])}")


@targets_app.command("show")
@_user_errors
def targets_show(
    name: str = typer.Argument(..., help="a target name or alias"),
    backend: str = typer.Option("tvm", "--backend", help="tvm or onnx"),
    as_json: bool = typer.Option(False, "--json", help="print as JSON"),
) -> None:
    """What a target resolves to: TVM target, architecture, compiler, ORT provider."""
    from edgec.targets.registry import resolve_target

    resolved = resolve_target(name, backend)
    data = {**resolved.to_json(), "resolved": resolved.how, "description": resolved.spec.description, "notes": resolved.spec.notes}
    if as_json:
        _emit_json(data)
        return
    for key, value in data.items():
        out.print(f"{key:<16} {value}")


@app.command("env")
def env_command(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Versions of every dependency and the cache location, for bug reports."""
    import platform

    from edgec.artifact import tool_versions
    from edgec.cache import cache_root

    from edgec.targets.agent import cpu_flags
    from edgec.targets.registry import host_mcpu

    data = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu": {"llvm_mcpu": host_mcpu(), "flags": sorted(cpu_flags())},
        "cache_dir": str(cache_root()),
        "versions": tool_versions(),
        "tools": _tool_versions_on_path(),
    }
    if as_json:
        _emit_json(data)
        return
    out.print(f"platform   {data['platform']} ({data['machine']}, {data['cpu_count']} cpus)")
    out.print(f"cpu        LLVM mcpu {data['cpu']['llvm_mcpu']}; flags {' '.join(data['cpu']['flags']) or 'unknown'}")
    out.print(f"cache      {data['cache_dir']}")
    for package, version in {**data["versions"], **data["tools"]}.items():
        out.print(f"{package:<16} {version}")


def _tool_versions_on_path() -> dict[str, str]:
    """LLVM (as TVM links it), the compilers, the emulator and the GPU, for bug reports."""
    import shutil
    import subprocess

    found: dict[str, str] = {}
    try:
        from tvm.target import codegen

        found["llvm (tvm)"] = str(codegen.llvm_version_major())
    except Exception as exc:  # a TVM without LLVM still runs ONNX artifacts
        found["llvm (tvm)"] = f"unavailable ({type(exc).__name__})"
    commands = {
        "g++": ["g++", "--version"],
        "aarch64 g++": ["aarch64-linux-gnu-g++", "--version"],
        "qemu-aarch64": ["qemu-aarch64-static", "--version"],
        "gpu": ["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
    }
    for name, argv in commands.items():
        if shutil.which(argv[0]) is None:
            found[name] = "not found"
            continue
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            found[name] = (result.stdout.strip().splitlines() or ["?"])[0]
        except (OSError, subprocess.TimeoutExpired) as exc:
            found[name] = f"failed ({exc})"
    return found


@cache_app.command("list")
def cache_list(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Entries in the cache directory and their sizes."""
    from edgec.cache import cache_root, list_entries

    rows = [{"kind": e.kind, "key": e.key, "path": str(e.path), "size_bytes": e.size_bytes} for e in list_entries()]
    if as_json:
        _emit_json({"cache_dir": str(cache_root()), "entries": rows})
        return
    out.print(f"cache: {cache_root()}")
    for row in rows:
        out.print(f"  {row['kind']}/{row['key']}  {row['size_bytes'] / 1e6:.1f} MB")


@cache_app.command("clean")
def cache_clean(kind: Optional[str] = typer.Option(None, "--kind", help="only this kind (e.g. models)")) -> None:
    """Remove cached entries (they are rebuilt on next use)."""
    from edgec.cache import clean, in_use

    busy = in_use()
    removed = clean(kind)
    err.print(f"removed {len(removed)} entries ({sum(e.size_bytes for e in removed) / 1e6:.1f} MB)")
    if busy and (kind is None or kind in busy):
        err.print(f"kept {', '.join(sorted(busy))}: a device edgec started is running (edgec device status; device down first)")

_GCN_EXAMPLES = "\n\n".join([
    "Examples:",
    "  edgec gcn graph wordnet -o wordnet.npz",
    "  edgec gcn graph sbm --nodes 1000000 --power-law 2.5 -o big.npz",
    "  edgec gcn plan MODEL_DIR --graph wordnet.npz --world-size 4 --chunks 4 -o plan.json",
    "  edgec gcn train wordnet.npz --plan mop --world-size 4 --chunks 2 -o gcn-wordnet",
    "  edgec gcn train wordnet.npz --plan partition -P 4 -o gcn-metis   # the METIS baseline",
    "  edgec gcn train wordnet.npz --plan single -o gcn-single           # the one-process reference",
    "  edgec gcn import pyg_gcn.pt --graph wordnet.npz -o gcn-from-pyg      # a trained PyG GCN",
    "  edgec compile zoo:gcn-wordnet --graph zoo:wordnet --target arm64   # sparse + dense parts per layer",
])


@gcn_app.command("graph", epilog=_GCN_EXAMPLES)
@_user_errors
def gcn_graph_command(
    kind: str = typer.Argument(..., help="wordnet (Debian wordnet-base's noun synsets) or sbm (a synthetic block model)"),
    output: Path = typer.Option(..., "-o", "--output", help="the graph .npz to write"),
    nodes: int = typer.Option(2000, "--nodes", min=2, help="sbm: nodes"),
    classes: int = typer.Option(8, "--classes", min=2, help="sbm: blocks, which are the labels"),
    degree: float = typer.Option(10.0, "--degree", help="sbm: average degree"),
    intra: float = typer.Option(0.8, "--intra", help="sbm: share of edges inside a block"),
    power_law: Optional[float] = typer.Option(None, "--power-law", help="sbm: degree exponent gamma > 2 (default: Poisson degrees)"),
    features: int = typer.Option(64, "--features", min=1, help="feature width (wordnet: SVD dimensions of the gloss TF-IDF)"),
    seed: int = typer.Option(0, "--seed", help="edges, features and the train / val / test split"),
    as_json: bool = typer.Option(False, "--json", help="print the graph's summary as JSON"),
) -> None:
    """Write a graph .npz made offline: the WordNet noun graph, or a block model of any size.

    Fields: edge_index, features, labels, train / val / test masks."""
    from edgec.errors import BadInputError
    from edgec.gcn.graph import write_graph

    progress = Progress()
    if kind == "wordnet":
        from edgec.gcn.wordnet import wordnet_graph

        graph = wordnet_graph(features, seed, progress)
    elif kind == "sbm":
        from edgec.gcn.synthetic import block_model

        graph = block_model(nodes, classes, degree, intra, power_law, features, seed=seed)
    else:
        raise BadInputError(f"graph kind {kind!r}: give wordnet or sbm")
    write_graph(graph, output)
    summary = {"output": str(output), "name": graph.name, "nodes": graph.num_nodes, "edges": graph.num_edges,
               "features": int(graph.features.shape[1]), "classes": graph.num_classes, "sha256": graph.sha256()}
    if as_json:
        _emit_json(summary)
        return
    out.print(graph.describe())
    out.print(f"wrote {output}")


@gcn_app.command("plan", epilog=_GCN_EXAMPLES)
@_user_errors
def gcn_plan_command(
    model: str = typer.Argument(..., help="a GCN model directory (config.json + model.safetensors), or zoo:gcn-wordnet"),
    graph_spec: str = typer.Option(..., "--graph", help="the graph .npz it runs on, or zoo:wordnet"),
    world_size: int = typer.Option(..., "--world-size", "-P", help="workers (processes) P"),
    chunks: int = typer.Option(1, "--chunks", min=1, help="pipeline chunks per worker's rows"),
    partition: bool = typer.Option(True, "--partition/--no-partition", help="also plan the METIS partition-parallel baseline"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="write the plan (JSON) here"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """The mixture-of-parallelism plan for P workers, and what each layer sends.

    Aggregation on column slices, the update on row shards, one all-to-all per layout switch,
    the order per layer that switches the fewest elements, nodes renumbered for balance; the
    elements each layer sends (forward and backward) next to partition parallelism's halos."""
    from edgec.gcn.graph import graph_path, read_graph
    from edgec.gcn.model import gcn_model_dir, load_gcn
    from edgec.gcn.plan import ELEMENT_BYTES, mop_plan, write_plan

    config = load_gcn(gcn_model_dir(model)).config
    graph = read_graph(graph_path(graph_spec, progress=Progress()))
    plan = mop_plan(graph, config, world_size, chunks, partition)
    if output is not None:
        write_plan(plan, output)
    if as_json:
        _emit_json(plan.model_dump())
        return
    out.print(f"{graph.describe()}\nGCN widths {plan.widths}, P = {world_size}, {chunks} chunk(s) per worker; "
              f"balance: aggregation {plan.aggregation_balance:.3f}, update {plan.update_balance:.3f} (max / mean)")
    table = Table(title="mixture of parallelism: elements switched per step (all workers)", title_justify="left")
    for column in ("layer", "order", "layouts", "switches", "forward", "backward"):
        table.add_column(column, justify="right" if column in ("layer", "forward", "backward") else "left")
    for layer in plan.layers:
        switches = "; ".join(f"{s.at} -> {s.to} ({s.width} wide)" for s in layer.switches) or "-"
        table.add_row(str(layer.layer), layer.order, f"{layer.input_layout} -> {layer.output_layout}", switches,
                      f"{layer.forward_elements:,}", f"{layer.backward_elements:,}")
    if plan.final_switch is not None:
        table.add_row("loss", "", "columns -> rows", plan.final_switch.at, f"{plan.final_switch.elements:,}", f"{plan.final_switch.elements:,}")
    out.print(table)
    total = plan.forward_elements() + plan.backward_elements()
    out.print(f"MoP: {total:,} elements ({total * ELEMENT_BYTES / 1e6:.2f} MB) per training step, "
              f"plus {plan.gradient_allreduce_elements:,} gradient elements all-reduced")
    if plan.partition is not None:
        halo = plan.partition
        baseline = sum(layer.forward_elements + layer.backward_elements for layer in halo.layers)
        out.print(f"partition parallelism ({halo.method}): halos {halo.halo_sizes}, {baseline:,} elements per step "
                  f"({baseline / total:.2f}x MoP); balance: aggregation {halo.aggregation_balance:.3f}, "
                  f"update {halo.update_balance:.3f}" if total else
                  f"partition parallelism ({halo.method}): {baseline:,} elements per step")
    if output is not None:
        out.print(f"wrote {output}")


@gcn_app.command("import", epilog=_GCN_EXAMPLES)
@_user_errors
def gcn_import_command(
    state: Path = typer.Argument(..., help="a PyTorch Geometric GCN's state dict: torch.save(model.state_dict(), 'gcn.pt') or .safetensors"),
    output: Path = typer.Option(..., "-o", "--output", help="the model directory to write"),
    graph_spec: Optional[str] = typer.Option(None, "--graph", help="the graph it was trained on (.npz or zoo:wordnet), recorded"),
    as_json: bool = typer.Option(False, "--json", help="print the model's config as JSON"),
) -> None:
    """A trained PyTorch Geometric GCN as an edgec GCN model directory.

    torch_geometric.nn.models.GCN (GCNConv layers, nothing else): the same tensors under
    PyG's names, read without unpickling."""
    from edgec.gcn.graph import graph_path, read_graph
    from edgec.gcn.model import import_pyg

    graph = read_graph(graph_path(graph_spec)) if graph_spec is not None else None
    model = import_pyg(state, output, graph)
    if as_json:
        _emit_json({"output": str(output), **model.config.model_dump()})
        return
    out.print(f"GCN of widths {model.config.widths()} ({sum(p.numel() for p in model.parameters()):,} parameters) -> {output}")


@gcn_app.command("train", epilog=_GCN_EXAMPLES)
@_user_errors
def gcn_train_command(
    graph_spec: str = typer.Argument(..., help="the graph .npz (edgec gcn graph makes one), or zoo:wordnet"),
    output: Path = typer.Option(..., "-o", "--output", help="the model directory to write (config, weights, train.json)"),
    plan: str = typer.Option("mop", "--plan", help="mop (mixture of parallelism), partition (METIS, halo exchange), "
                             "single (one process), or a plan .json from `edgec gcn plan`"),
    world_size: int = typer.Option(1, "--world-size", "-P", help="worker processes (torchrun, gloo on 127.0.0.1)"),
    chunks: int = typer.Option(1, "--chunks", min=1, help="mop: pipeline chunks per worker (all-to-all overlapped with compute)"),
    hidden: int = typer.Option(64, "--hidden", min=1, help="hidden width"),
    layers: int = typer.Option(2, "--layers", min=1, help="GCN layers"),
    dropout: float = typer.Option(0.5, "--dropout", help="dropout after each hidden layer"),
    self_loops: bool = typer.Option(True, "--self-loops/--no-self-loops", help="A + I before normalising (as PyG's GCNConv)"),
    epochs: int = typer.Option(200, "--epochs", min=1, help="full-graph epochs (one optimizer step each)"),
    lr: float = typer.Option(0.01, "--lr", help="Adam learning rate"),
    weight_decay: float = typer.Option(5e-4, "--weight-decay", help="Adam weight decay"),
    seed: int = typer.Option(0, "--seed", help="initial weights and dropout masks (every plan draws the same)"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUTPUT.checkpoint (written after every epoch)"),
    force: bool = typer.Option(False, "--force", help="replace an earlier gcn train output"),
    spec_only: Optional[Path] = typer.Option(None, "--spec-only", help="write the plan and the workers' spec into this directory "
                                             "and print the torchrun command (several machines: torchrun's rendezvous)"),
    as_json: bool = typer.Option(False, "--json", help="print the record (history, bytes per rank and layer) as JSON"),
) -> None:
    """Full-graph GCN training on P processes (torchrun, gloo), MoP or METIS partitions.

    MoP: column-sliced aggregation, row-sharded update, all-to-all switches, chunked
    pipeline. Every collective is counted (bytes per rank, layer and epoch, in train.json);
    a checkpoint is written after every epoch (--resume). A worker that fails stops all of
    them; the exit code is 100 + its rank."""
    from edgec.gcn.graph import graph_path
    from edgec.gcn.launch import train
    from edgec.gcn.plan import ELEMENT_BYTES
    from edgec.gcn.train import TrainOptions

    progress = Progress()
    plan_path = Path(plan) if plan.endswith(".json") or Path(plan).is_file() else None
    kind = "mop" if plan_path is not None else plan
    options = TrainOptions(epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed)
    record = train(graph_path(graph_spec, progress), output, kind, world_size, chunks, plan_path,
                   {"hidden": hidden, "num_layers": layers, "dropout": dropout, "self_loops": self_loops}, options, resume, force,
                   progress, spec_only)
    if spec_only is not None:
        if as_json:
            _emit_json(record)
            return
        out.print(f"wrote {record['spec']}; on one machine:\n  {record['one_node']}\nacross N machines (the spec's paths on each):"
                  f"\n  {record['nodes']}")
        return
    last = record["history"][-1]
    summary = {"output": str(output), "kind": record["kind"], "world_size": record["world_size"], "epochs": last["epoch"],
               "loss": last["loss"], "train_acc": last["train_acc"], "val_acc": last["val_acc"], "test_acc": last["test_acc"]}
    if "communication" in record:
        sent = [sum(r["bytes"] for r in rank["sent"] if r["phase"] in ("forward", "backward") and r["layer"] >= 0)
                for rank in record["communication"][-1]["ranks"]]
        summary["activation_bytes_per_epoch"] = sum(sent)
        summary["bytes_per_rank"] = sent
        summary["peak_rss_bytes"] = record["peak_rss_bytes"]
    if as_json:
        _emit_json({**summary, "record": record})
        return
    out.print(f"{record['kind']} on {record['world_size']} worker(s), {last['epoch']} epochs: loss {last['loss']:.4f}, "
              f"accuracy train {last['train_acc']:.3f} / val {last['val_acc']:.3f} / test {last['test_acc']:.3f}")
    if "activation_bytes_per_epoch" in summary:
        elements = summary["activation_bytes_per_epoch"] // ELEMENT_BYTES
        out.print(f"sent per training step: {elements:,} activation / gradient elements "
                  f"({summary['activation_bytes_per_epoch'] / 1e6:.2f} MB; per rank {[f'{b / 1e6:.2f}' for b in sent]} MB), "
                  f"peak RSS per rank {[f'{m / 1e6:.0f}' for m in record['peak_rss_bytes']]} MB")
    out.print(f"wrote {output}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
