"""Seconds from starting a command to its first byte of output, and to its exit (a cold process each time).

    python scripts/time_to_first_output.py specdec generate --max-new-tokens 32 --raw "def fib(n):"

What a user waits for the first token of `specdec generate`: imports, model load, prefill and the first step
(the CLI streams text as tokens are accepted).
"""

import subprocess
import sys
import time

if __name__ == "__main__":
    start = time.perf_counter()
    proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.read(1)
    first = time.perf_counter() - start
    proc.stdout.read()
    proc.wait()
    print(f"first output byte after {first:.2f} s, exit after {time.perf_counter() - start:.2f} s "
          f"(exit status {proc.returncode})")
