"""Running the API: what the process does for itself besides serving."""

import subprocess
import sys

import pytest

# Frees an 8 MiB block (which, left alone, makes glibc keep freed blocks below 8 MiB in its heap),
# then allocates and frees 12 MiB in 1 MiB blocks: prints how much resident memory that gave back.
FREE_AND_MEASURE = """
import sys, psutil
from fluxworker.server import give_back_freed_memory
if sys.argv[1] == "api":
    give_back_freed_memory()
rss = lambda: psutil.Process().memory_info().rss
big = bytes(range(256)) * (8 * 4096)
del big
blocks = [bytes(range(256)) * 4096 for _ in range(12)]
full = rss()
del blocks
print(full - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_api_process_gives_freed_memory_back():
    def given_back(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", FREE_AND_MEASURE, mode], capture_output=True, text=True,
                              timeout=60, check=True)
        return int(done.stdout)

    assert given_back("api") >= 10 * 2**20
    # Without it, the same process keeps that memory: the test measures what it claims to.
    assert given_back("plain") < 2 * 2**20
