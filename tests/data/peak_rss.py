"""Run a command and write its peak resident set size (bytes) to a file.

usage: python peak_rss.py OUT_FILE PROGRAM [ARGS...]

Why a separate, small launcher: on Linux a child's ru_maxrss starts from the resident size of
the process it was forked from (exec records the old address space's high-water mark), so a
command started straight from a pytest process that has grown to 1.4 GiB reports at least
1.4 GiB. Started from this interpreter (about 10 MiB) the number is the command's own. The
command's stdin/stdout/stderr and exit status pass through unchanged.
"""
import os
import sys

out_file, program, *args = sys.argv[1:]
pid = os.fork()
if pid == 0:
    os.execvp(program, [program, *args])
_, status, usage = os.wait4(pid, 0)
with open(out_file, "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
