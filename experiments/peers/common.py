"""What the peer measurements share (imported by the peers only, in their own torch environment)."""

import argparse
import re


def parser(new_tokens: int) -> argparse.ArgumentParser:
    """The flags every peer takes: the model, the prompts, the group and the torch threads."""
    flags = argparse.ArgumentParser()
    flags.add_argument("--gguf", required=True)
    flags.add_argument("--prompts", required=True)
    flags.add_argument("--group_size", type=int, default=8)
    flags.add_argument("--new_tokens", type=int, default=new_tokens)
    flags.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return flags


def peak_mib() -> float:
    """This process's peak resident memory (VmHWM: its own, not inherited from the process that started
    it, as getrusage's maxrss is)."""
    with open("/proc/self/status", encoding="utf-8") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) / 1024
