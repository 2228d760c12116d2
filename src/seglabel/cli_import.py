"""``seglabel import``: flags -> ``corrections.import_corrections``; one line per image not
imported, one per reason images were left as they were (``--json`` lists each), a summary, the
exit code (0, or 3 when some images were not imported)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .cli_handler import flag, guarded, local_folder
from .errors import one_line


@guarded
def import_command(
    source: str = typer.Argument(..., help="The tool's export: a Label Studio JSON export, a CVAT Segmentation "
                                 "mask 1.1 zip (or folder), a FiftyOne export folder, a COCO JSON (or zip); or "
                                 "the name of a FiftyOne dataset.", show_default=False),
    into_text: str = typer.Option(..., "--into", help="The run folder the labels were exported from (or a new "
                                  "folder, with --labels)."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="labelstudio, cvat, fiftyone or coco (default: "
                                      "from what SOURCE holds)."),
    labels: Optional[Path] = typer.Option(None, "--labels", "-l", help="Label set of a new run (--into a folder "
                                          "that holds no run)."),
    images_text: List[str] = typer.Option([], "--images", help="Folder of the photos (a new run's, or if they moved "
                                      "since they were labelled)."),
    field: Optional[str] = typer.Option(None, "--field", help="FiftyOne dataset: its segmentation field (default: "
                                        "the only one)."),
    all_reviewed: bool = flag("--all-reviewed", help="Images the tool gives back unchanged were reviewed too: mark "
                              "them corrected (Label Studio says which were; CVAT, FiftyOne and COCO do not)."),
    dry_run: bool = flag("--dry-run", help="Check everything and list what would be imported; write nothing."),
    as_json: bool = flag("--json", help="Print the result as JSON on stdout."),
    quiet: bool = flag("--quiet", "-q", help="No summary (images not imported are still listed)."),
) -> int:
    """Bring corrections made in Label Studio, CVAT, FiftyOne or a COCO tool back into a run:
    each corrected mask is written with a record saying a person made it."""
    from . import storage
    from .corrections import import_corrections
    from .errors import UsageError
    from .writers import to_json

    if storage.is_remote(into_text):  # else a local "s3:" folder
        raise UsageError(f"--into {storage.redact(into_text)}: corrections are imported into a local run folder; "
                         "copy the run down, import, and copy it up")
    into = Path(storage.local_path(into_text) or into_text)
    images = [local_folder("--images", text, "the photos") for text in images_text]

    result = import_corrections(source, into, fmt, labels=labels, images=images, field=field,
                                all_reviewed=all_reviewed, dry_run=dry_run,
                                argv=sys.argv)
    for ref, reason in result.problems:
        typer.echo(one_line(f"not imported: {ref}: {reason}"), err=True)
    for path, reason in result.left_out:
        typer.echo(one_line(f"left out of coco.json: {path}: {reason}"), err=True)
    if as_json:
        typer.echo(to_json(result.to_dict(), indent=2))
    elif not quiet:
        by_reason: dict[str, list[str]] = {}
        for ref, reason in result.skipped:  # one line per reason: a project may hold thousands
            by_reason.setdefault(reason, []).append(ref)
        for reason, refs in by_reason.items():
            shown = f"{len(refs)} images, e.g. {refs[0]}" if len(refs) > 1 else refs[0]
            typer.echo(one_line(f"left as it was: {shown}: {reason}"), err=True)
        verb = "would be imported" if dry_run else "imported"
        kept = f", {len(result.unchanged)} already as corrected" if result.unchanged else ""
        changed = "" if dry_run else f" ({result.changed} changed)"
        typer.echo(f"{len(result.imported)} {verb}{changed}{kept}, {len(result.skipped)} skipped by the annotators "
                   f"(left as they were), {len(result.problems)} not imported -> {result.into}", err=True)
    return result.exit_code
