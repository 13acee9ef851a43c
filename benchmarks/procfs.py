"""Memory figures the kernel reports per process, for the benchmarks that sum them over Ray's processes."""

from __future__ import annotations

from pathlib import Path


def kib_field(pid: int, file: str, field: str) -> int:
    """Bytes of a `Field:   N kB` line of /proc/<pid>/<file> (0 when the process is gone or the kernel omits it).

    status RssAnon: private memory (no file or shared-memory pages); smaps_rollup Pss_Shmem: the process's
    proportional share of shared-memory mappings, such as Ray's object store in /dev/shm."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
