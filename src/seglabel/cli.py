"""The ``seglabel`` command: flags -> library calls, errors -> one line and an exit code."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from . import exitcodes
from .labelset import LabelSetError, load_labelset

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Per-pixel labels for folders of images with open-vocabulary segmenters.")
labelsets_app = typer.Typer(no_args_is_help=True, help="Validate label set files.")
app.add_typer(labelsets_app, name="labelsets")


def fail(message: str, code: int = exitcodes.USAGE) -> None:
    typer.echo(f"seglabel: error: {message}", err=True)
    raise typer.Exit(code)


# Errors that mean "nothing was done, fix the input": exit 2. Looked up only in modules already
# imported (an error cannot come from a module that never loaded), so no command pays for torch.
_USAGE_ERRORS = (("seglabel.checkpoints", "CheckpointError"), ("seglabel.evaluate", "EvalError"),
                 ("seglabel.images", "ImageError"), ("seglabel.annotate", "SettingsMismatch"),
                 ("seglabel.models.clip", "WeightsUnavailable"))


def run_guarded(fn: Callable[[], int]) -> None:
    """Map library errors to one line on stderr and the documented exit codes."""
    try:
        code = fn()
    except typer.Exit:
        raise  # fail() inside fn: already reported
    except KeyboardInterrupt:
        fail("interrupted", exitcodes.INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line
        usage = (LabelSetError, ValueError, FileNotFoundError) + tuple(
            getattr(sys.modules[m], name) for m, name in _USAGE_ERRORS if m in sys.modules)
        if isinstance(e, usage):
            fail(str(e), exitcodes.USAGE)
        fail(f"{type(e).__name__}: {e}", exitcodes.ERROR)
    raise typer.Exit(code)


@app.command()
def annotate(
    ctx: typer.Context,
    inputs: List[Path] = typer.Argument(None, help="Image files and folders (walked recursively)."),
    labels: Path = typer.Option(..., "--labels", "-l", help="Label set YAML."),
    out: Path = typer.Option(Path("labels"), "--out", "-o", help="Output folder."),
    from_list: Optional[str] = typer.Option(None, "--from-list", help="File with one image path per line; - for stdin."),
    model: str = typer.Option("maskclip:ViT-B-16", "--model", "-m", help="KIND:NAME, e.g. maskclip:ViT-B-16, maskclip:RN50."),
    pretrained: str = typer.Option("openai", "--pretrained", help="open_clip pretrained tag or a local weights file."),
    model_config: Optional[Path] = typer.Option(None, "--model-config", help="open_clip model config JSON to register."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Weights cache (default: the Hugging Face cache)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Images (or windows) per forward pass."),
    short_side: int = typer.Option(512, "--short-side", min=1, help="Resize so the short side is this."),
    max_long_side: int = typer.Option(2048, "--max-long-side", min=0, help="...unless the long side exceeds this (0: no cap)."),
    window: int = typer.Option(0, "--window", min=0, help="Sliding-window size in resized pixels (0: whole image)."),
    window_stride: int = typer.Option(0, "--window-stride", min=0, help="Sliding-window stride (0: half the window)."),
    tta: bool = typer.Option(False, "--tta", help="LSeg's official multi-scale + flip + 480 sliding window (slow)."),
    method: Optional[str] = typer.Option(None, "--method", help="Training-free method of maskclip:NAME models: "
                                         "maskclip, clearclip, sclip, naclip or scclip (the last four: ViT "
                                         "only; default: sclip on ViTs, maskclip on ResNets)."),
    pamr: bool = typer.Option(False, "--pamr", help="Refine the upsampled logits with PAMR (NACLIP's option)."),
    protocol_name: str = typer.Option("default", "--protocol", help="default (short side 512, whole image) or "
                                      "paper (the method's own; --short-side/--window given too win)."),
    logit_scale: Optional[float] = typer.Option(None, "--logit-scale", min=0.0, help="Softmax scale of the "
                                                "confidence (default: the method's: 100, ClearCLIP 50, others 40)."),
    key_smoothing: Optional[bool] = typer.Option(None, "--key-smoothing/--no-key-smoothing",
                                                 help="MaskCLIP key smoothing (default: on for --method maskclip)."),
    prompt_denoising: Optional[bool] = typer.Option(None, "--prompt-denoising/--no-prompt-denoising",
                                                    help="MaskCLIP prompt denoising (default: on for --method maskclip)."),
    min_confidence: Optional[float] = typer.Option(None, "--min-confidence", min=0.0, max=1.0,
                                                   help="Pixels less confident than this are written as 255."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write colour overlays (overlays/*.jpg)."),
    save_scores: bool = typer.Option(False, "--save-scores", help="Also write per-pixel confidence (scores/*.png)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Relabel images that are already done."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: label every N-th input from the I-th "
                                        "(default: a Slurm array's task id/count); then `seglabel merge OUT`."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Image loader processes (default: none on a CPU, up to 8 on a GPU)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or bf16 (autocast around the model)."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model (long GPU runs)."),
    max_pixels: int = typer.Option(178_956_970, "--max-pixels", min=1, help="Refuse images with more pixels."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be done; load no model."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary on stderr."),
) -> None:
    """Label every pixel of every image with the classes of a label set."""

    def run() -> int:
        from .annotate import AnnotateConfig, annotate as run_annotate, plan
        from .images import IMAGE_SUFFIXES, find_images, read_lines
        from .models.registry import load_segmenter
        from .predict import Protocol, resolve_device
        from .runs import parse_shard, select_shard, shard_part

        if not inputs and not from_list:
            fail("give image files or folders, or --from-list")
        labelset = load_labelset(labels)
        found = find_images(inputs or [], read_lines(from_list) if from_list else [], exclude=[out])
        shard_spec = parse_shard(shard)
        found.items = select_shard(found.items, shard_spec)
        if shard_spec and shard_spec[0] != 0:
            found.problems = []  # unreadable list entries are reported once, by shard 0
        if not found.items and not found.problems:
            fail("no images found (looked for " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
        if dry_run:
            todo, done = plan(found.items, out, overwrite)
            return _print_plan(todo, done, found.problems, as_json)
        if tta and window:
            fail("--tta and --window are two different protocols: give one")
        if method is not None and not model.startswith("maskclip:"):
            raise ValueError(f"--method {method} applies to maskclip:NAME models")
        if protocol_name not in ("default", "paper"):
            raise ValueError(f"--protocol {protocol_name}: choose default or paper")
        protocol = Protocol(short_side, max_long_side, window, window_stride, tta, pamr=pamr)
        if precision not in ("fp32", "fp16", "bf16"):
            fail(f"--precision {precision}: choose fp32, fp16 or bf16")
        config = AnnotateConfig(out=out, overwrite=overwrite, overlay=overlay, save_scores=save_scores,
                                min_confidence=min_confidence, batch_size=batch_size, max_pixels=max_pixels,
                                protocol=protocol, workers=workers, precision=precision, compile=compile_model,
                                part=shard_part(shard_spec))
        segmenter = load_segmenter(
            model, labelset, pretrained=pretrained, cache_dir=cache_dir, device=resolve_device(device),
            model_config=str(model_config) if model_config else None,
            method=method or "auto", logit_scale=logit_scale,  # refinements None: on for maskclip only
            key_smoothing=key_smoothing, prompt_denoising=prompt_denoising)
        if protocol_name == "paper":  # the method is known once the tower is
            config.protocol = _paper_protocol(ctx, getattr(segmenter, "method", "maskclip"), protocol)
        elif getattr(segmenter, "short_side", None) and not _given(ctx, "short_side"):
            import dataclasses  # a student labels at the scale it learnt at, unless told otherwise

            config.protocol = dataclasses.replace(config.protocol, short_side=segmenter.short_side)
        with _progress(len(found.items), bar=not (quiet or as_json), report=not quiet) as on_image:
            summary = run_annotate(found.items, segmenter, labelset, config, found.problems, on_image, sys.argv)
        if as_json:
            typer.echo(json.dumps(summary.to_dict(), indent=2))
        elif not quiet:
            _print_summary(summary)
        return summary.exit_code

    run_guarded(run)


def _given(ctx: typer.Context, name: str) -> bool:
    return getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"


def _paper_protocol(ctx: typer.Context, method: str, given):
    """``--protocol paper``: the method's own short side, window and stride (models/trainingfree.py);
    --short-side, --max-long-side, --window, --window-stride given on the command line win."""
    import dataclasses

    from .models.trainingfree import paper_protocol

    fields = ("short_side", "max_long_side", "window", "window_stride")
    explicit = {f: getattr(given, f) for f in fields
                if getattr(ctx.get_parameter_source(f), "name", "") == "COMMANDLINE"}
    if "window" in explicit and "window_stride" not in explicit:
        explicit["window_stride"] = given.window_stride  # half the given window, not the paper's stride
    return dataclasses.replace(paper_protocol(method), tta=given.tta, pamr=given.pamr, **explicit)


@app.command()
def merge(out: Path = typer.Argument(..., help="Output folder the shards wrote into.")) -> None:
    """Write OUT/coco.json from every shard's records, once all shards have finished."""

    def run() -> int:
        from .annotate import merge as merge_shards

        n = merge_shards(out)
        typer.echo(f"{n} images -> {out / 'coco.json'}", err=True)
        return exitcodes.OK

    run_guarded(run)


@app.command("eval")
def evaluate(
    pred: Path = typer.Option(..., "--pred", help="annotate's output folder, or a folder of mask PNGs."),
    gt: Path = typer.Option(..., "--gt", help="Folder of ground-truth mask PNGs (same relative paths)."),
    labels: Path = typer.Option(..., "--labels", "-l", help="Label set YAML the masks use."),
    id_map: Optional[Path] = typer.Option(None, "--id-map", help="YAML/JSON map: ground-truth id -> class index or name."),
    as_json: bool = typer.Option(False, "--json", help="Print the scores as JSON on stdout."),
) -> None:
    """Score predicted masks against ground truth: per-class IoU, mIoU, pixel accuracy."""

    def run() -> int:
        from .evaluate import evaluate_folders, load_id_map, render_table

        labelset = load_labelset(labels)
        mapping = load_id_map(id_map, labelset) if id_map else None
        result = evaluate_folders(pred, gt, labelset, mapping)
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2, allow_nan=False))
        else:
            from rich.console import Console

            Console().print(render_table(result))
        for path, reason in result.skipped:
            typer.echo(f"skipped: {path}: {reason}", err=True)
        return exitcodes.OK

    run_guarded(run)


@labelsets_app.command("check")
def labelsets_check(files: List[Path] = typer.Argument(..., help="Label set YAML files.")) -> None:
    """Validate label sets; each error names the file, the line and the problem."""
    bad = 0
    for f in files:
        try:
            ls = load_labelset(f)
            typer.echo(f"{f}: ok, {len(ls)} classes, {len(ls.prompts)} prompts")
        except LabelSetError as e:
            typer.echo(f"seglabel: error: {e}", err=True)
            bad += 1
    raise typer.Exit(exitcodes.USAGE if bad else exitcodes.OK)


@app.command("models")
def models() -> None:
    """List the model specs --model accepts."""
    from .models.registry import list_models

    for spec in list_models():
        typer.echo(spec)


# -- output helpers -------------------------------------------------------------------------------
def _print_plan(todo, done, problems, as_json: bool) -> int:
    if as_json:
        typer.echo(json.dumps({"todo": [str(i.path) for i in todo], "done": [str(i.path) for i in done],
                               "problems": [{"path": p.path, "reason": p.reason} for p in problems]}, indent=2))
    else:
        for item in todo:
            typer.echo(f"label  {item.path}")
        for item in done:
            typer.echo(f"skip   {item.path}")
        for p in problems:
            typer.echo(f"error  {p}")
        typer.echo(f"{len(todo)} to label, {len(done)} done, {len(problems)} problems", err=True)
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
            (self.bar.console.print if self.bar else lambda m: typer.echo(m, err=True))(f"failed: {item.path}: {error}")
        if self.bar:
            self.bar.advance(self.task)

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()


def _print_summary(summary) -> None:
    rate = f", {summary.labelled / summary.seconds:.2f} images/s" if summary.seconds and summary.labelled else ""
    typer.echo(f"{summary.labelled} labelled, {summary.skipped} already done, {len(summary.failures)} failed"
               f"{rate} -> {summary.out}" + (" (interrupted)" if summary.interrupted else ""), err=True)
    for path, reason in summary.failures:
        typer.echo(f"  failed: {path}: {reason}", err=True)


@app.command("preview")
def preview(
    out: Path = typer.Argument(..., help="annotate's output folder."),
    images: List[Path] = typer.Option([], "--images", help="Folder the photos were labelled from (if not where run.json says)."),
    per_page: int = typer.Option(100, "--per-page", min=1, help="Cards per HTML page."),
    jobs: int = typer.Option(0, "--jobs", "-j", min=0, help="Processes drawing overlays (0: one per CPU)."),
    open_browser: bool = typer.Option(False, "--open", help="Open the contact sheet in the browser."),
) -> None:
    """Write OUT/preview/index.html: every image under its labels, least confident first."""

    def run() -> int:
        import webbrowser

        from .review import build_preview

        result = build_preview(out, images, per_page=per_page, jobs=jobs)
        if result.missing_photos:
            typer.echo(f"{len(result.missing_photos)} photos not found, drawn on grey (first: "
                       f"{result.missing_photos[0]}); pass --images DIR", err=True)
        typer.echo(f"{result.images} images on {result.pages} pages ({result.drawn} drawn) -> {result.index}", err=True)
        typer.echo(str(result.index))
        if open_browser:
            webbrowser.open(result.index.resolve().as_uri())
        return exitcodes.OK

    run_guarded(run)


@app.command("export")
def export(
    out: Path = typer.Argument(..., help="annotate's output folder."),
    fmt: str = typer.Option(..., "--format", "-f", help="cvat, labelstudio or fiftyone."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Output folder (default: OUT/export/FORMAT)."),
    images: List[Path] = typer.Option([], "--images", help="Folder the photos were labelled from (if not where run.json says)."),
    document_root: Optional[Path] = typer.Option(None, "--document-root",
                                                 help="labelstudio: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; image paths relative to it."),
) -> None:
    """Export the labels for review in CVAT, Label Studio or FiftyOne."""

    def run() -> int:
        from .exports import export as run_export

        result = run_export(out, fmt, dest, images, document_root)
        for note in result.notes:
            typer.echo(note, err=True)
        typer.echo(f"{result.images} images -> {result.dest}", err=True)
        typer.echo(str(result.dest))
        return exitcodes.OK

    run_guarded(run)


from .cli_distill import distill  # noqa: E402  (its heavy imports are inside the command)

app.command("distill")(distill)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
