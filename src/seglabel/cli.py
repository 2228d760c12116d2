"""The ``seglabel`` command: flags -> library calls; every error -> one line and an exit code
(cli_handler.py; the codes are in exitcodes.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import exitcodes
from .cli_handler import (
    INPUTS,
    MODEL,
    OUTPUTS,
    PROTOCOL,
    RUN,
    exit_code_of,
    flag,
    guarded,
    option,
    say,
    usage_line,
)
from .errors import UsageError, one_line
from .interrupts import terminate_like_ctrl_c
from .labelset import LabelSetError, load_labelset

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Per-pixel labels for folders of images with open-vocabulary segmenters.")
labelsets_app = typer.Typer(no_args_is_help=True, help="Validate label set files.")
app.add_typer(labelsets_app, name="labelsets")

def _version(show: bool) -> None:
    if show:
        from . import __version__

        typer.echo(f"seglabel {__version__}")
        raise typer.Exit(exitcodes.OK)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar="",
                                       help="Print the version and exit.")) -> None:
    """Per-pixel labels for folders of images with open-vocabulary segmenters."""


@app.command()
@guarded
def annotate(
    inputs: List[str] = typer.Argument(None, help="Image files and folders (walked recursively), URLs of photos or of "
                                       "prefixes (s3://, gs://, az://, https://...), WebDataset .tar shards.",
                                       show_default=False),
    # -- inputs
    labels: Path = option(..., "--labels", "-l", panel=INPUTS, help="Label set YAML (see labelsets/)."),
    from_list: Optional[str] = option(None, "--from-list", panel=INPUTS, help="File with one image path per "
                                      "line (# starts a comment); - for stdin."),
    root: Optional[str] = option(None, "--root", panel=INPUTS, help="Output paths are relative to this folder (or URL prefix) "
                                  "(list entries too); without it a listed file mirrors its absolute path."),
    max_pixels: int = option(178_956_970, "--max-pixels", panel=INPUTS, help="Refuse images with more pixels."),
    # -- model
    model: str = option("maskclip:ViT-B-16", "--model", "-m", panel=MODEL, help="KIND:NAME: maskclip:ViT-B-16, "
                        "maskclip:RN50, lseg:FILE.ckpt, student:FILE.pt (`seglabel models` lists them)."),
    pretrained: str = option("openai", "--pretrained", panel=MODEL, help="open_clip pretrained tag or a local "
                             "weights file (OpenAI weights in a file: use the -quickgelu model name)."),
    model_config: Optional[Path] = option(None, "--model-config", panel=MODEL, help="open_clip model config JSON "
                                          "to register."),
    cache_dir: Optional[str] = option(None, "--cache-dir", panel=MODEL, help="Weights cache (default: the "
                                      "Hugging Face cache)."),
    method: Optional[str] = option(None, "--method", panel=MODEL, help="Training-free method of maskclip:NAME "
                                   "models: maskclip, clearclip, sclip, naclip, scclip, or with a second vision "
                                   "model proxyclip or corrclip (all but maskclip: ViT only; default: sclip on "
                                   "ViTs, maskclip on ResNets)."),
    proxy: Optional[str] = option(None, "--proxy", panel=MODEL, help="Second model of proxyclip/corrclip: "
                                  "dino:vitb8 (default), dinov2:vitb14-reg, sam:vitb, mae:vitb, ... or clip."),
    proxy_weights: Optional[str] = option(None, "--proxy-weights", panel=MODEL, help="Local weights file of "
                                          "--proxy (default: the torch hub / Hugging Face cache)."),
    regions: Optional[str] = option(None, "--regions", panel=MODEL, help="Regions of corrclip: sam2:FILE, "
                                    "sam:FILE or slic[:N] (superpixels, no weights)."),
    logit_scale: Optional[float] = option(None, "--logit-scale", panel=MODEL, help="Softmax scale of the "
                                          "confidence (default: the method's: 100, ClearCLIP 50, others 40)."),
    key_smoothing: Optional[bool] = option(None, "--key-smoothing/--no-key-smoothing", panel=MODEL, metavar="",
                                           help="MaskCLIP key smoothing (default: on for --method maskclip)."),
    prompt_denoising: Optional[bool] = option(None, "--prompt-denoising/--no-prompt-denoising", panel=MODEL,
                                              metavar="", help="MaskCLIP prompt denoising (default: on for "
                                              "--method maskclip)."),
    # -- protocol
    protocol_name: str = option("default", "--protocol", panel=PROTOCOL, help="default (short side 512, whole "
                                "image; or the model's own) or paper (the method's own); --short-side/--window "
                                "given win over either."),
    short_side: Optional[int] = option(None, "--short-side", panel=PROTOCOL, help="Resize so the short side is "
                                       "this (default: 512, or the model's own).", show_default=False),
    max_long_side: Optional[int] = option(None, "--max-long-side", panel=PROTOCOL, help="...unless the long side "
                                          "exceeds this (0: no cap; default: 2048).", show_default=False),
    window: Optional[int] = option(None, "--window", panel=PROTOCOL, help="Sliding-window size in resized pixels "
                                   "(default 0: whole image).", show_default=False),
    window_stride: Optional[int] = option(None, "--window-stride", panel=PROTOCOL, help="Sliding-window stride "
                                          "(default 0: half the window).", show_default=False),
    tta: bool = flag("--tta", panel=PROTOCOL, help="LSeg's official multi-scale + flip + 480 sliding window "
                     "(slow)."),
    pamr: bool = flag("--pamr", panel=PROTOCOL, help="Refine the upsampled logits with PAMR (NACLIP's option)."),
    # -- outputs
    out: str = option("labels", "--out", "-o", panel=OUTPUTS, help="Output folder, or a bucket prefix "
                      "(s3://bucket/labels)."),
    min_confidence: Optional[float] = option(None, "--min-confidence", panel=OUTPUTS, help="Pixels less "
                                             "confident than this (0 to 1) are written as 255."),
    overlay: bool = flag("--overlay", panel=OUTPUTS, help="Also write colour overlays (overlays/*.jpg)."),
    save_scores: bool = flag("--save-scores", panel=OUTPUTS, help="Also write per-pixel confidence "
                             "(scores/*.png)."),
    overwrite: bool = flag("--overwrite", panel=OUTPUTS, help="Relabel images that are already done."),
    # -- run
    device: str = option("auto", "--device", panel=RUN, help="auto, cpu, cuda, cuda:N (the N-th GPU) or mps."),
    batch_size: int = option(1, "--batch-size", panel=RUN, help="Images (or windows) per forward pass."),
    precision: str = option("fp32", "--precision", panel=RUN, help="fp32, fp16 or bf16 (autocast around the "
                            "model)."),
    workers: Optional[int] = option(None, "--workers", panel=RUN, help="Image loader processes (default: none on "
                                    "a CPU, up to 8 on a GPU)."),
    decode: str = option("auto", "--decode", panel=RUN, help="Where JPEGs are decoded: auto (on the GPU when "
                         "annotating on one), cpu, or device (the model's device)."),
    compile_model: bool = flag("--compile", panel=RUN, help="torch.compile the model (long GPU runs)."),
    shard: Optional[str] = option(None, "--shard", panel=RUN, help="I/N: label every N-th input from the I-th "
                                  "(default: a Slurm array's task id/count); then `seglabel merge OUT`."),
    dry_run: bool = flag("--dry-run", panel=RUN, help="Make every check a run makes before loading the model "
                         "(settings, image headers); list what would be done; write nothing."),
    as_json: bool = flag("--json", panel=RUN, help="Print a machine-readable summary on stdout."),
    quiet: bool = flag("--quiet", "-q", panel=RUN, help="No progress bar or summary on stderr."),
) -> int:
    """Label every pixel of every image with the classes of a label set."""
    from .folders import label_folders, plan_folders

    options = dict(
        model=model, from_list=from_list, root=root, shard=shard, max_pixels=max_pixels, pretrained=pretrained,
        model_config=str(model_config) if model_config else None, cache_dir=cache_dir, method=method, proxy=proxy,
        proxy_weights=proxy_weights, regions=regions, logit_scale=logit_scale, key_smoothing=key_smoothing,
        prompt_denoising=prompt_denoising, protocol=protocol_name, short_side=short_side,
        max_long_side=max_long_side, window=window, window_stride=window_stride, tta=tta or None,
        pamr=pamr or None, min_confidence=min_confidence, overlay=overlay, save_scores=save_scores,
        overwrite=overwrite, device=device, batch_size=batch_size, precision=precision, workers=workers,
        decode=decode, compile=compile_model)
    if dry_run:
        return _print_plan(plan_folders(inputs or [], labels, out, **options), as_json)
    with _Progress(bar=not (quiet or as_json), report=not quiet) as progress:
        summary = label_folders(inputs or [], labels, out, progress=False, on_start=progress.start,
                                on_image=progress.on_image, argv=sys.argv, **options)
    if as_json:
        typer.echo(_json(summary.to_dict()))
    if quiet:  # no progress and no summary, but never silent about what failed
        for path, reason in summary.failures:
            typer.echo(one_line(f"failed: {path}: {reason}"), err=True)
    elif not as_json:
        _print_summary(summary)
    return summary.exit_code


@app.command()
@guarded
def merge(out: str = typer.Argument(..., help="Output folder (or bucket prefix) the shards wrote into.")) -> int:
    """Write OUT/coco.json from every shard's records, once all shards have finished."""
    from .annotate import merge as merge_shards

    left_out: list[tuple[str, str]] = []
    n = merge_shards(out, left_out)
    _print_left_out(left_out)
    from .outputs import open_out

    typer.echo(f"{n} images -> {open_out(out).shown('coco.json')}", err=True)
    return exitcodes.FAILURES if left_out else exitcodes.OK


@app.command("eval")
@guarded
def evaluate(
    pred_text: str = typer.Option(..., "--pred", help="annotate's output folder, or a folder of mask PNGs."),
    gt_text: str = typer.Option(..., "--gt", help="Folder of ground-truth mask PNGs (same relative paths), or a run "
                                "whose corrections came back (seglabel import)."),
    labels: Optional[Path] = typer.Option(None, "--labels", "-l", help="Label set YAML the masks use (default: "
                                          "the one in --pred's run.json, else --gt's; needed for folders of mask PNGs)."),
    id_map: Optional[Path] = typer.Option(None, "--id-map", help="YAML/JSON map: ground-truth id -> class index or name."),
    map_by_name: bool = flag("--map-by-name", help="With --pred a run and -l another label set: score each of the "
                             "run's classes as the -l class of the same name (others: ignored)."),
    gt_all: bool = flag("--gt-all", help="With --gt a run: also score against its images no person corrected."),
    as_json: bool = flag("--json", help="Print the scores as JSON on stdout."),
) -> int:
    """Score predicted masks against ground truth: per-class IoU, mIoU, pixel accuracy."""
    from . import storage
    from .evaluate import EvalError, evaluate_folders, render_table

    for flag_name, text in (("--pred", pred_text), ("--gt", gt_text)):
        if storage.is_remote(text):
            raise EvalError(f"{flag_name} {storage.redact(text)}: eval reads local folders only; copy it down first "
                            "(e.g. aws s3 sync URL DIR)")
    pred, gt = (Path(storage.local_path(t) or t) for t in (pred_text, gt_text))
    labelset = load_labelset(labels) if labels else None
    result = evaluate_folders(pred, gt, labelset, id_map, map_by_name=map_by_name, gt_all=gt_all)
    if as_json:
        typer.echo(_json(result.to_dict()))
    else:
        from rich.console import Console

        Console().print(render_table(result))
    for path, reason in result.skipped:
        typer.echo(one_line(f"skipped: {path}: {reason}"), err=True)
    return exitcodes.OK


@labelsets_app.command("check")
@guarded
def labelsets_check(
    files: List[Path] = typer.Argument(..., help="Label set YAML files."),
    model: str = typer.Option("maskclip:ViT-B-16", "--model", "-m", help="maskclip:NAME whose tokenizer decides "
                              "which prompts are the same text to the model (CLIP's, cut at 77 tokens, by default)."),
    model_config: Optional[Path] = typer.Option(None, "--model-config", help="open_clip model config JSON of "
                                                "--model to register."),
) -> int:
    """Validate label sets; each error names the file, the line and the problem. Classes the
    model's tokenizer cannot tell apart are warned about."""
    from .text import indistinct_warnings, labelset_templates

    tokenize = _tokenizer(model, model_config)
    bad = 0
    for f in files:
        try:
            ls = load_labelset(f)
            typer.echo(f"{f}: ok, {len(ls)} classes, {len(ls.prompts)} prompts")
            for warning in ls.warnings:
                say(warning, "warning")
            for warning in indistinct_warnings(ls, tokenize, labelset_templates(ls), f"{model}'s text encoder"):
                say(warning, "warning")
        except LabelSetError as e:
            say(str(e))
            bad += 1
    return exitcodes.USAGE if bad else exitcodes.OK


def _tokenizer(model: str, model_config: Optional[Path]):
    """The tokenizer of a ``maskclip:NAME`` model (open_clip's; no weights are read)."""
    kind, _, name = model.partition(":")
    if kind != "maskclip" or not name:
        raise UsageError(f"--model {model}: labelsets check reads the tokenizer of maskclip:NAME models "
                         "(LSeg and students use CLIP's, the default)")
    import open_clip

    from .models.clip import register_model_config

    if model_config is not None:
        register_model_config(model_config)
    if name not in open_clip.list_models():
        raise UsageError(f"--model {model}: unknown open_clip model {name!r} (give --model-config for your own)")
    try:
        return open_clip.get_tokenizer(name)
    except Exception as e:  # noqa: BLE001 - a tokenizer that must be downloaded, offline: one line
        raise UsageError(f"--model {model}: cannot load its tokenizer ({type(e).__name__}: {e})") from None


@app.command("models")
@guarded
def models(as_json: bool = flag("--json", help="Print the catalogue as JSON on stdout."),
           every: bool = flag("--all", help="Also list architectures without pretrained weights.")) -> int:
    """List what --model accepts: each kind with an example, and every maskclip architecture with
    its pretrained tags (the one to use first)."""
    from .models.registry import model_catalog

    catalog = model_catalog()
    for kind in catalog:
        if "models" in kind and not every:
            kind["models"] = [m for m in kind["models"] if m["pretrained"]]
    if as_json:
        typer.echo(_json(catalog))
        return exitcodes.OK
    for kind in catalog:
        typer.echo(f"{kind['spec']}: {kind['about']}")
        typer.echo(f"  e.g. --model {kind['example']}")
        for m in kind.get("models", []):
            tags = [f"{t}*" if t == m["recommended"] else t for t in m["pretrained"]]
            typer.echo(f"  {m['spec']:<36} {', '.join(tags) or '(no pretrained weights: --pretrained FILE)'}")
    typer.echo("* recommended tag. With a tag, name the plain architecture (ViT-B-16): the tag sets the "
               "activation its weights were trained with (QuickGELU for openai). For a weights FILE trained "
               "with QuickGELU (OpenAI, MetaCLIP, DFN), name the -quickgelu architecture "
               "(--model maskclip:ViT-B-16-quickgelu --pretrained FILE).")
    return exitcodes.OK


# -- output helpers -------------------------------------------------------------------------------
def _json(obj) -> str:
    from .writers import to_json

    return to_json(obj, indent=2)


def _print_plan(plan, as_json: bool) -> int:
    """What a dry run found: images to label, done, and every problem a run would report."""
    problems = plan.problems
    if as_json:
        typer.echo(_json({"todo": [str(i.path) for i in plan.todo], "done": [str(i.path) for i in plan.done],
                          "kept": [str(i.path) for i in plan.kept],
                          "problems": [{"path": p.path, "reason": p.reason} for p in problems]}))
    else:
        for item in plan.todo:
            typer.echo(one_line(f"label  {item.path}"))
        for item in plan.done:
            typer.echo(one_line(f"skip   {item.path}"))
        for item in plan.kept:
            typer.echo(one_line(f"keep   {item.path}"))
        for p in problems:
            typer.echo(one_line(f"error  {p}"))
        typer.echo(f"{len(plan.todo)} to label, {len(plan.done)} done, {len(problems)} problems", err=True)
    return exitcodes.FAILURES if problems else exitcodes.OK


class _Progress:
    """A rich progress bar on stderr when it is a terminal (``bar``), from ``start(total)``;
    failures as lines (``report``)."""

    def __init__(self, bar: bool, report: bool) -> None:
        self.show_bar, self.report, self.bar = bar, report, None

    def start(self, total: int) -> None:
        if self.show_bar and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("labelling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=total)

    def on_image(self, item, error) -> None:
        if error and self.report:
            line = one_line(f"failed: {item.path}: {error}")
            if self.bar:
                self.bar.console.print(line, markup=False, highlight=False)
            else:
                typer.echo(line, err=True)
        if self.bar:
            self.bar.advance(self.task)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()


def _interrupted(summary) -> str:
    if not summary.interrupted:
        return ""
    by = " by SIGTERM" if summary.exit_code == exitcodes.TERMINATED else ""
    return f" (interrupted{by}; run the same command to finish)"


def _print_summary(summary) -> None:
    rate = f", {summary.labelled / summary.seconds:.2f} images/s" if summary.seconds and summary.labelled else ""
    kept = f", {summary.kept} kept as corrected" if summary.kept else ""
    typer.echo(f"{summary.labelled} labelled, {summary.skipped} already done{kept}, {len(summary.failures)} failed"
               f"{rate} -> {summary.out}" + _interrupted(summary), err=True)
    if summary.skipped_outputs:
        shown = ", ".join(summary.skipped_outputs[:3]) + (", ..." if len(summary.skipped_outputs) > 3 else "")
        typer.echo(one_line(f"  {len(summary.skipped_outputs)} seglabel output folders under the inputs were "
                            f"skipped (never labelled as photos): {shown}"), err=True)
    for path, reason in summary.failures:
        typer.echo(one_line(f"  failed: {path}: {reason}"), err=True)


def _print_left_out(left_out) -> None:
    """Images a reader of a run left out (their mask cannot be used), one line each."""
    for path, reason in left_out:
        typer.echo(one_line(f"left out: {path}: {reason}"), err=True)


@app.command("preview")
@guarded
def preview(
    out: str = typer.Argument(..., help="annotate's output folder, or its bucket prefix (s3://...)."),
    images: List[str] = typer.Option([], "--images", help="Folder the photos were labelled from (if not where run.json says)."),
    dest: Optional[str] = typer.Option(None, "--dest", help="Folder to write the pages into (default: OUT/preview; "
                                        "needed for a run in a bucket)."),
    per_page: int = typer.Option(100, "--per-page", min=1, help="Cards per HTML page."),
    jobs: int = typer.Option(0, "--jobs", "-j", min=0, help="Processes drawing overlays (0: one per CPU)."),
    open_browser: bool = flag("--open", help="Open the contact sheet in a web browser."),
) -> int:
    """Write OUT/preview/index.html: every image under its labels, least confident first."""
    import webbrowser

    from .preview import build_preview

    result = build_preview(out, images, per_page=per_page, jobs=jobs, dest=dest)
    _print_left_out(result.left_out)
    if result.missing_photos:
        typer.echo(one_line(f"{len(result.missing_photos)} photos not found, drawn on grey (first: "
                            f"{result.missing_photos[0]}); pass --images DIR"), err=True)
    typer.echo(f"{result.images} images on {result.pages} pages ({result.drawn} drawn) -> {result.index}", err=True)
    typer.echo(str(result.index))
    if open_browser and not webbrowser.open(result.index.resolve().as_uri()):
        say(f"--open: no web browser found on this machine; open {result.index.resolve().as_uri()} in one "
            f"(or copy {result.index.parent} to a machine that has one)", "warning")
    return exitcodes.FAILURES if result.left_out else exitcodes.OK


@app.command("export")
@guarded
def export(
    out: str = typer.Argument(..., help="annotate's output folder, or its bucket prefix (s3://...)."),
    fmt: str = typer.Option(..., "--format", "-f", help="cvat, labelstudio, fiftyone, hf (Hugging Face dataset) or webdataset."),
    dest: Optional[str] = typer.Option(None, "--dest", help="Output folder (default: OUT/export/FORMAT; needed for a "
                                        "run in a bucket)."),
    images: List[str] = typer.Option([], "--images", help="Folder the photos were labelled from (if not where run.json says)."),
    document_root: Optional[Path] = typer.Option(None, "--document-root", help="labelstudio: "
                                                 "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; image paths relative to it."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", min=1, help="hf, webdataset: images per shard "
                                             "(default 1000; shards also stop near 500 MB)."),
) -> int:
    """Export the labels for review in CVAT, Label Studio or FiftyOne, or as a training data set
    (Hugging Face dataset, WebDataset shards)."""
    from .exports import export as run_export

    result = run_export(out, fmt, dest, images, document_root, shard_size=shard_size)
    _print_left_out(result.left_out)
    for note in result.notes:
        typer.echo(one_line(note), err=True)
    typer.echo(f"{result.images} images -> {result.dest}", err=True)
    typer.echo(str(result.dest))
    return exitcodes.FAILURES if result.left_out else exitcodes.OK


from .cli_distill import distill  # noqa: E402  (its heavy imports are inside the command)

app.command("distill")(distill)

from .cli_serve import serve_command  # noqa: E402  (annotate's model flags, the same objects)

app.command("serve")(serve_command(annotate))

from .cli_import import import_command  # noqa: E402  (`import` is a keyword: the function has another name)

app.command("import")(import_command)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: list[str] | None = None) -> int:
    """Parse and run one command; every refusal of the parser is one line too (exit 2)."""
    args = sys.argv[1:] if argv is None else list(argv)
    terminate_like_ctrl_c()
    command = typer.main.get_command(app)
    _help_as_a_flag(command)
    try:
        _refuse_values_of_flags(command, args)
        code = command.main(args=args, prog_name="seglabel", standalone_mode=False)
    except _PARSER_ERROR as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `seglabel` alone: the help
            typer.echo(e.ctx.get_help())
            return exitcodes.USAGE
        say(usage_line(e, args))
        return getattr(e, "exit_code", exitcodes.USAGE)
    except BaseException as e:  # outside any command (parsing): one line too
        if isinstance(e, SystemExit):
            raise
        return exit_code_of(e)
    return code if isinstance(code, int) else exitcodes.OK


def _help_as_a_flag(command) -> None:
    """``--help`` is listed without a value type, like the other flags."""
    option = command.get_help_option(typer.Context(command))
    if option is not None:
        option.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _help_as_a_flag(sub)


# click's ClickException (typer's own copy of click, or click itself in older typer versions)
_PARSER_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _refuse_values_of_flags(command, args: list[str]) -> None:
    """``--overlay true``: a flag takes no value, and the word would be read as an input path."""
    rest = list(args)
    while rest and rest[0] in getattr(command, "commands", {}):
        command, rest = command.commands[rest[0]], rest[1:]
    flags = {o for p in command.params if getattr(p, "is_flag", False) for o in [*p.opts, *p.secondary_opts]}
    for given, word in zip(rest, rest[1:]):
        if given == "--":
            return
        if given in flags and word.lower() in _BOOLEAN_WORDS and not os.path.exists(word):
            raise UsageError(f"{given} {word}: {given} is a flag and takes no value; give {given} alone, or leave it out")


if __name__ == "__main__":
    main()
