"""Exit codes of the seglabel command (documented in the README)."""
OK = 0  # everything asked for was done
ERROR = 1  # anything unexpected (a bug, a write error such as a full disk)
USAGE = 2  # refused before anything was written: bad flags, label set, model spec, weights, device, output folder
FAILURES = 3  # the run finished, but some images could not be labelled (listed in the summary)
INTERRUPTED = 130  # stopped by Ctrl-C (SIGINT) after finishing the images in flight; rerun to resume
TERMINATED = 143  # stopped by SIGTERM (preemption, docker stop), handled like Ctrl-C; rerun to resume
