"""The ``seglabel`` command: flags -> library calls; every error -> one line and an exit code
(cli_handler.py; the codes are in exitcodes.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import exitcodes
from .cli_handler import exit_code_of, guarded, say, usage_line
from .errors import UsageError, one_line
from .interrupts import terminate_like_ctrl_c
from .labelset import LabelSetError, load_labelset

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Per-pixel labels for folders of images with open-vocabulary segmenters.")
labelsets_app = typer.Typer(no_args_is_help=True, help="Validate label set files.")
app.add_typer(labelsets_app, name="labelsets")


@app.command()
@guarded
def annotate(
    ctx: typer.Context,
    inputs: List[Path] = typer.Argument(None, help="Image files and folders (walked recursively)."),
    labels: Path = typer.Option(..., "--labels", "-l", help="Label set YAML."),
    out: Path = typer.Option(Path("labels"), "--out", "-o", help="Output folder."),
    from_list: Optional[str] = typer.Option(None, "--from-list", help="File with one image path per line "
                                            "(# starts a comment); - for stdin."),
    root: Optional[Path] = typer.Option(None, "--root", help="Output paths are relative to this folder (list "
                                        "entries too); without it a listed file mirrors its absolute path."),
    model: str = typer.Option("maskclip:ViT-B-16", "--model", "-m", help="KIND:NAME, e.g. maskclip:ViT-B-16, maskclip:RN50."),
    pretrained: str = typer.Option("openai", "--pretrained", help="open_clip pretrained tag or a local weights file."),
    model_config: Optional[Path] = typer.Option(None, "--model-config", help="open_clip model config JSON to register."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Weights cache (default: the Hugging Face cache)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    batch_size: int = typer.Option(1, "--batch-size", help="Images (or windows) per forward pass."),
    short_side: int = typer.Option(512, "--short-side", help="Resize so the short side is this."),
    max_long_side: int = typer.Option(2048, "--max-long-side", help="...unless the long side exceeds this (0: no cap)."),
    window: int = typer.Option(0, "--window", help="Sliding-window size in resized pixels (0: whole image)."),
    window_stride: int = typer.Option(0, "--window-stride", help="Sliding-window stride (0: half the window)."),
    tta: bool = typer.Option(False, "--tta", help="LSeg's official multi-scale + flip + 480 sliding window (slow)."),
    method: Optional[str] = typer.Option(None, "--method", help="Training-free method of maskclip:NAME models: "
                                         "maskclip, clearclip, sclip, naclip, scclip, or with a second "
                                         "vision model proxyclip or corrclip (all but maskclip: ViT only; "
                                         "default: sclip on ViTs, maskclip on ResNets)."),
    proxy: Optional[str] = typer.Option(None, "--proxy", help="Second model of proxyclip/corrclip: dino:vitb8 "
                                        "(default), dinov2:vitb14-reg, sam:vitb, mae:vitb, ... or clip."),
    proxy_weights: Optional[str] = typer.Option(None, "--proxy-weights", help="Local weights file of --proxy "
                                                "(default: the torch hub / Hugging Face cache)."),
    regions: Optional[str] = typer.Option(None, "--regions", help="Regions of corrclip: sam2:FILE, sam:FILE "
                                          "or slic[:N] (superpixels, no weights)."),
    pamr: bool = typer.Option(False, "--pamr", help="Refine the upsampled logits with PAMR (NACLIP's option)."),
    protocol_name: str = typer.Option("default", "--protocol", help="default (short side 512, whole image) or "
                                      "paper (the method's own; --short-side/--window given too win)."),
    logit_scale: Optional[float] = typer.Option(None, "--logit-scale", help="Softmax scale of the "
                                                "confidence (default: the method's: 100, ClearCLIP 50, others 40)."),
    key_smoothing: Optional[bool] = typer.Option(None, "--key-smoothing/--no-key-smoothing",
                                                 help="MaskCLIP key smoothing (default: on for --method maskclip)."),
    prompt_denoising: Optional[bool] = typer.Option(None, "--prompt-denoising/--no-prompt-denoising",
                                                    help="MaskCLIP prompt denoising (default: on for --method maskclip)."),
    min_confidence: Optional[float] = typer.Option(None, "--min-confidence",
                                                   help="Pixels less confident than this (0 to 1) are written as 255."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write colour overlays (overlays/*.jpg)."),
    save_scores: bool = typer.Option(False, "--save-scores", help="Also write per-pixel confidence (scores/*.png)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Relabel images that are already done."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: label every N-th input from the I-th "
                                        "(default: a Slurm array's task id/count); then `seglabel merge OUT`."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Image loader processes (default: none on a CPU, up to 8 on a GPU)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or bf16 (autocast around the model)."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model (long GPU runs)."),
    decode: str = typer.Option("auto", "--decode", help="Where JPEGs are decoded: auto (on the GPU when annotating "
                               "on one), cpu, or device (the model's device)."),
    max_pixels: int = typer.Option(178_956_970, "--max-pixels", help="Refuse images with more pixels."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Make every check a run makes before loading the "
                                 "model (settings, image headers); list what would be done; write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary on stderr."),
) -> int:
    """Label every pixel of every image with the classes of a label set."""
    from .annotate import AnnotateConfig, annotate as run_annotate
    from .images import IMAGE_SUFFIXES, find_images, read_lines
    from .predict import Protocol
    from .recipe import PROTOCOL_FIELDS, Recipe, check, dry_run as plan_run, prepare
    from .runs import parse_shard, select_shard, shard_part

    if not inputs and not from_list:
        raise UsageError("give image files or folders, or --from-list")
    shard_spec = parse_shard(shard)
    config = AnnotateConfig(out=out, overwrite=overwrite, overlay=overlay, save_scores=save_scores,
                            min_confidence=min_confidence, batch_size=batch_size, max_pixels=max_pixels,
                            protocol=Protocol(short_side, max_long_side, window, window_stride, tta, pamr=pamr),
                            workers=workers, precision=precision, compile=compile_model, decode=decode,
                            part=shard_part(shard_spec))
    recipe = Recipe(labels=labels, config=config, model=model, pretrained=pretrained,
                    model_config=str(model_config) if model_config else None, cache_dir=cache_dir, device=device,
                    method=method, logit_scale=logit_scale, key_smoothing=key_smoothing,
                    prompt_denoising=prompt_denoising, protocol_name=protocol_name,
                    model_options={k: v for k, v in (("proxy", proxy), ("proxy_weights", proxy_weights),
                                                     ("regions", regions)) if v is not None},
                    explicit=frozenset(f for f in PROTOCOL_FIELDS
                                       if getattr(ctx.get_parameter_source(f), "name", "") == "COMMANDLINE"))
    checked = check(recipe)  # flags, output folder, device, label set, model spec, settings in --out
    for warning in checked.labelset.warnings:
        say(warning, "warning")
    found = find_images(inputs or [], read_lines(from_list) if from_list else [], exclude=[out], root=root)
    found.items = select_shard(found.items, shard_spec)
    if shard_spec and shard_spec[0] != 0:
        found.problems = []  # unreadable list entries are reported once, by shard 0
    if not found.items and not found.problems:
        raise UsageError("no images found (looked for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    if dry_run:
        return _print_plan(plan_run(recipe, found.items, checked), found.problems, as_json)
    ready = prepare(recipe, checked)
    with _progress(len(found.items), bar=not (quiet or as_json), report=not quiet) as on_image:
        summary = run_annotate(found.items, ready.segmenter, ready.labelset, ready.config, found.problems,
                               on_image, sys.argv)
    if as_json:
        typer.echo(_json(summary.to_dict()))
    elif not quiet:
        _print_summary(summary)
    return summary.exit_code


@app.command()
@guarded
def merge(out: Path = typer.Argument(..., help="Output folder the shards wrote into.")) -> int:
    """Write OUT/coco.json from every shard's records, once all shards have finished."""
    from .annotate import merge as merge_shards

    n = merge_shards(out)
    typer.echo(f"{n} images -> {out / 'coco.json'}", err=True)
    return exitcodes.OK


@app.command("eval")
@guarded
def evaluate(
    pred: Path = typer.Option(..., "--pred", help="annotate's output folder, or a folder of mask PNGs."),
    gt: Path = typer.Option(..., "--gt", help="Folder of ground-truth mask PNGs (same relative paths)."),
    labels: Path = typer.Option(..., "--labels", "-l", help="Label set YAML the masks use."),
    id_map: Optional[Path] = typer.Option(None, "--id-map", help="YAML/JSON map: ground-truth id -> class index or name."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON on stdout."),
) -> int:
    """Score predicted masks against ground truth: per-class IoU, mIoU, pixel accuracy."""
    from .evaluate import evaluate_folders, load_id_map, render_table

    labelset = load_labelset(labels)
    mapping = load_id_map(id_map, labelset) if id_map else None
    result = evaluate_folders(pred, gt, labelset, mapping)
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
def labelsets_check(files: List[Path] = typer.Argument(..., help="Label set YAML files.")) -> int:
    """Validate label sets; each error names the file, the line and the problem."""
    bad = 0
    for f in files:
        try:
            ls = load_labelset(f)
            typer.echo(f"{f}: ok, {len(ls)} classes, {len(ls.prompts)} prompts")
            for warning in ls.warnings:
                say(warning, "warning")
        except LabelSetError as e:
            say(str(e))
            bad += 1
    return exitcodes.USAGE if bad else exitcodes.OK


@app.command("models")
@guarded
def models() -> int:
    """List the model specs --model accepts."""
    from .models.registry import list_models

    for spec in list_models():
        typer.echo(spec)
    return exitcodes.OK


# -- output helpers -------------------------------------------------------------------------------
def _json(obj) -> str:
    from .writers import to_json

    return to_json(obj, indent=2)


def _print_plan(plan, input_problems, as_json: bool) -> int:
    """What a dry run found: images to label, done, and every problem a run would report."""
    problems = list(input_problems) + plan.problems
    if as_json:
        typer.echo(_json({"todo": [str(i.path) for i in plan.todo], "done": [str(i.path) for i in plan.done],
                          "problems": [{"path": p.path, "reason": p.reason} for p in problems]}))
    else:
        for item in plan.todo:
            typer.echo(one_line(f"label  {item.path}"))
        for item in plan.done:
            typer.echo(one_line(f"skip   {item.path}"))
        for p in problems:
            typer.echo(one_line(f"error  {p}"))
        typer.echo(f"{len(plan.todo)} to label, {len(plan.done)} done, {len(problems)} problems", err=True)
    return exitcodes.FAILURES if problems else exitcodes.OK


class _progress:
    """A rich progress bar on stderr when it is a terminal (``bar``); failures as lines (``report``)."""

    def __init__(self, total: int, bar: bool, report: bool) -> None:
        self.total, self.show_bar, self.report, self.bar = total, bar, report, None

    def __enter__(self):
        if self.show_bar and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("labelling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=self.total)
        return self.on_image

    def on_image(self, item, error) -> None:
        if error and self.report:
            line = one_line(f"failed: {item.path}: {error}")
            if self.bar:
                self.bar.console.print(line, markup=False, highlight=False)
            else:
                typer.echo(line, err=True)
        if self.bar:
            self.bar.advance(self.task)

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
    typer.echo(f"{summary.labelled} labelled, {summary.skipped} already done, {len(summary.failures)} failed"
               f"{rate} -> {summary.out}" + _interrupted(summary), err=True)
    for path, reason in summary.failures:
        typer.echo(one_line(f"  failed: {path}: {reason}"), err=True)


@app.command("preview")
@guarded
def preview(
    out: Path = typer.Argument(..., help="annotate's output folder."),
    images: List[Path] = typer.Option([], "--images", help="Folder the photos were labelled from (if not where run.json says)."),
    per_page: int = typer.Option(100, "--per-page", min=1, help="Cards per HTML page."),
    jobs: int = typer.Option(0, "--jobs", "-j", min=0, help="Processes drawing overlays (0: one per CPU)."),
    open_browser: bool = typer.Option(False, "--open", help="Open the contact sheet in the browser."),
) -> int:
    """Write OUT/preview/index.html: every image under its labels, least confident first."""
    import webbrowser

    from .review import build_preview

    result = build_preview(out, images, per_page=per_page, jobs=jobs)
    if result.missing_photos:
        typer.echo(one_line(f"{len(result.missing_photos)} photos not found, drawn on grey (first: "
                            f"{result.missing_photos[0]}); pass --images DIR"), err=True)
    typer.echo(f"{result.images} images on {result.pages} pages ({result.drawn} drawn) -> {result.index}", err=True)
    typer.echo(str(result.index))
    if open_browser:
        webbrowser.open(result.index.resolve().as_uri())
    return exitcodes.OK


@app.command("export")
@guarded
def export(
    out: Path = typer.Argument(..., help="annotate's output folder."),
    fmt: str = typer.Option(..., "--format", "-f", help="cvat, labelstudio or fiftyone."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Output folder (default: OUT/export/FORMAT)."),
    images: List[Path] = typer.Option([], "--images", help="Folder the photos were labelled from (if not where run.json says)."),
    document_root: Optional[Path] = typer.Option(None, "--document-root",
                                                 help="labelstudio: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; image paths relative to it."),
) -> int:
    """Export the labels for review in CVAT, Label Studio or FiftyOne."""
    from .exports import export as run_export

    result = run_export(out, fmt, dest, images, document_root)
    for note in result.notes:
        typer.echo(one_line(note), err=True)
    typer.echo(f"{result.images} images -> {result.dest}", err=True)
    typer.echo(str(result.dest))
    return exitcodes.OK


from .cli_distill import distill  # noqa: E402  (its heavy imports are inside the command)

app.command("distill")(distill)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: list[str] | None = None) -> int:
    """Parse and run one command; every refusal of the parser is one line too (exit 2)."""
    args = sys.argv[1:] if argv is None else list(argv)
    terminate_like_ctrl_c()
    command = typer.main.get_command(app)
    try:
        _refuse_values_of_flags(command, args)
        code = command.main(args=args, prog_name="seglabel", standalone_mode=False)
    except _PARSER_ERROR as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `seglabel` alone: the help
            typer.echo(e.ctx.get_help())
            return exitcodes.USAGE
        say(usage_line(e, args))
        return getattr(e, "exit_code", exitcodes.USAGE)
    except BaseException as e:  # noqa: BLE001 - outside any command (parsing): one line too
        if isinstance(e, SystemExit):
            raise
        return exit_code_of(e)
    return code if isinstance(code, int) else exitcodes.OK


# click's ClickException (typer's own copy of click, or click itself in older typer versions)
_PARSER_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _refuse_values_of_flags(command, args: list[str]) -> None:
    """``--overlay true``: a flag takes no value, and the word would be read as an input path."""
    rest = list(args)
    while rest and rest[0] in getattr(command, "commands", {}):
        command, rest = command.commands[rest[0]], rest[1:]
    flags = {o for p in command.params if getattr(p, "is_flag", False) for o in [*p.opts, *p.secondary_opts]}
    for flag, word in zip(rest, rest[1:]):
        if flag == "--":
            return
        if flag in flags and word.lower() in _BOOLEAN_WORDS and not os.path.exists(word):
            raise UsageError(f"{flag} {word}: {flag} is a flag and takes no value; give {flag} alone, or leave it out")


if __name__ == "__main__":
    main()
