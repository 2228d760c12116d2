"""Exit codes of the seglabel command (documented in the README)."""
OK = 0  # everything asked for was done
ERROR = 1  # anything unexpected (a bug, a write error such as a full disk)
USAGE = 2  # bad flags, label set, model spec, weights or output folder: nothing was labelled
FAILURES = 3  # the run finished, but some images could not be labelled (listed in the summary)
INTERRUPTED = 130  # stopped by Ctrl-C; rerun the same command to resume
