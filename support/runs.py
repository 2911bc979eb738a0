"""Run plumbing shared by the scripts: torchrun set-up, autocast, the run folder (an exclusive lock, stale temporary
files, writability), checkpoint files written atomically and read without executing code, random-state capture
for exact resume, command-line flags generated from a config dataclass with one-line errors, the jsonl log with its
tqdm line, and line plots.

Nothing here knows about networks or datasets; callers pass what they need (paths, generators, rows).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import inspect
import json
import math
import os
import re
import sys
import traceback
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------
# Processes: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without it, one process.


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def setup_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world, device): one process per GPU (NCCL) under torchrun, or per CPU slot (gloo)."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device or ("cuda" if cuda else "cpu"))
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(obj: object) -> list:
    """`obj` of every rank, in rank order (a list of one without torchrun)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def autocast(device: torch.device):
    """bf16 autocast on GPU (the authors found fp16 unstable); fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------
# Errors: the project's own checks raise ValueError (or FileNotFoundError, FloatingPointError, PermissionError)
# with a message for the user; the entry point prints it as one `error: ...` line and exits 1, no traceback.

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, PermissionError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: ... (see --help)` and exit code 2, without the usage block."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def close_progress_bars() -> None:
    """Close the open tqdm bars now, so that their last line comes before ours, not after it at exit."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


class ErrorExit(SystemExit):
    """SystemExit with exit code 1 whose text is the one line already printed (what a caller in Python sees)."""

    def __init__(self, line: str):
        super().__init__(1)
        self.line = line

    def __str__(self) -> str:
        return self.line


@contextlib.contextmanager
def one_line_errors(interrupted: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn the project's errors into one `error: ...` line on stderr and exit 1 (DMD2_TRACEBACK=1 also prints
    the traceback); Ctrl-C into one line saying `interrupted()` (which checkpoint --resume continues from), exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"\ninterrupted: {interrupted() if interrupted else 'stopped'}", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as e:
        if os.environ.get("DMD2_TRACEBACK"):
            traceback.print_exc()
        close_progress_bars()
        line = f"error: {e}"
        if is_main():
            print(line, file=sys.stderr)
        raise ErrorExit(line) from None


# ----------------------------------------------------------------------------------------------------
# The run folder: one run at a time, no stale temporary files, writable before any work starts.


def prepare_run_folder(folder: str | Path) -> Path:
    """Create the run folder (or check it), refusing a file or a folder it cannot write to."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file, not a run folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"--out {folder}: cannot write there ({e.strerror or e})") from None
    return folder


class RunLock:
    """An exclusive lock on a run folder (RUN/.lock, fcntl.flock): a second run on the same folder refuses at once,
    naming the process that holds it. The kernel releases the lock when its process dies, however it dies, so a
    lock file left by a killed run is simply taken over. Taking it also removes the temporary files that a kill
    during a checkpoint write left behind (`*.tmp<pid>`): with the lock held, no other writer exists."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".lock"
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ValueError(f"{folder} is in use by process {holder} (a run on the same --out); wait for it to "
                             f"finish or choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        self.removed = [f for f in glob.glob(str(Path(folder) / "*.tmp[0-9]*")) if re.search(r"\.tmp\d+$", f)]
        for f in self.removed:
            os.remove(f)

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


@contextlib.contextmanager
def locked(folder: str | Path) -> Iterator[RunLock | None]:
    """Hold the run folder's lock (rank 0; the other ranks write nothing there) for the duration of a run."""
    lock = RunLock(folder) if is_main() else None
    barrier()  # no rank writes before rank 0 holds the lock and has removed stale temporary files
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def checkpoint_note(path: str | Path) -> str:
    """Which step `--resume` would continue from (read lazily from the file, without loading its tensors)."""
    if not Path(path).is_file():
        return "no checkpoint was written yet"
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:
        return f"{path} is not readable"
    return f"--resume continues from {path} (iteration {step})"


# ----------------------------------------------------------------------------------------------------
# Checkpoint files: plain dicts of tensors, numbers, strings and containers, so that they load with
# torch.load(weights_only=True), which never runs code from the file.


def save_atomic(obj: object, path: str | Path) -> None:
    """torch.save to a temporary file, flushed to disk, then renamed: a kill mid-write leaves the previous file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_file(path: str | Path, what: str, map_location: torch.device | str = "cpu", mmap: bool = False) -> dict:
    """torch.load(weights_only=True) of a file this project wrote, with a one-line error for anything else
    (a truncated or foreign file, or one whose objects would need code to rebuild)."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:  # truncated, random bytes, or refused by the weights-only unpickler
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable {what} ({type(e).__name__}: {reason[:200]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a {what} (it holds a {type(obj).__name__})")
    return obj


def stream_seed(seed: int, role: str, *index: int) -> int:
    """The seed of one random stream: a run's `seed`, the stream's role ("noise", "eval", "data", ...) and indices
    (a rank, an epoch) mixed by numpy's SeedSequence, so that no two seeds, roles or ranks share a stream (a plain
    seed * 1000 + rank would give seed s's training noise to seed s - 1's evaluation). The number of indices is mixed
    in too: SeedSequence pads with zeros, so (seed, role, 0) would otherwise be the stream of (seed, role)."""
    words = [seed, zlib.crc32(role.encode())] + ([len(index), *index] if index else [])
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def weights_digest(*states: dict) -> str:
    """sha256 (16 hex digits) of state dicts' names and values: the same weights, the same digest."""
    h = hashlib.sha256()
    for state in states:
        for k in sorted(state):
            h.update(k.encode() + state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def code_digest(script: str) -> str:
    """sha256 (16 hex digits) of the code a run executes: dmd2.py, support/*.py and the script."""
    root = Path(__file__).resolve().parents[1]
    files = [root / "dmd2.py", *sorted((root / "support").glob("*.py")), Path(script).resolve()]
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()[:16]


def rng_state(gens: dict[str, torch.Generator]) -> dict:
    """The named generators' states, torch's global CPU state and, on a GPU machine, every CUDA device's."""
    s = {k: g.get_state() for k, g in gens.items()} | {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(gens: dict[str, torch.Generator], s: dict) -> None:
    for k, g in gens.items():
        g.set_state(s[k])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        cuda = s["cuda"]
        torch.cuda.set_rng_state_all(cuda) if isinstance(cuda, list | tuple) else torch.cuda.set_rng_state(cuda)


def load_state(obj: object, state: dict) -> None:
    """obj.load_state_dict(state); an optimizer's one saved parameter group (the critic's before --head-lr) split
    into its current groups, each with the saved hyper-parameters."""
    groups, saved = getattr(obj, "param_groups", None), state.get("param_groups")
    if groups is not None and len(saved) == 1 < len(groups):
        ends = np.cumsum([0] + [len(g["params"]) for g in groups])
        state = state | {"param_groups": [saved[0] | {"params": saved[0]["params"][a:b]}
                                          for a, b in zip(ends[:-1], ends[1:], strict=True)]}
    obj.load_state_dict(state)


def check_finite(named: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """FloatingPointError naming the first non-finite tensor (weights are never written with a NaN)."""
    bad = [n for n, p in named if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"non-finite weights ({bad[0]}{', ...' if len(bad) > 1 else ''}) {where}")


# ----------------------------------------------------------------------------------------------------
# Command line: every field of a config dataclass is a flag, with the comment after the field as its help, in
# the --help group of the `# title` comment line above it.


def field_help(cls: type) -> dict[str, tuple[str, str]]:
    """`# group` and `name: type = default  # help` lines of a dataclass -> {name: (group, help)}."""
    out, group = {}, ""
    for line in inspect.getsource(cls).splitlines():
        if m := re.match(r"^ +# (.+)$", line):
            group = m[1]
        elif m := re.match(r"^ +(\w+): [^=]+=[^#]*(?:# (.+))?$", line):
            out[m[1]] = (group, m[2] or "")
    return out


def add_config_flags(p: argparse.ArgumentParser, cls: type, choices: dict | None = None,
                     default_note: str = "") -> dict[str, argparse._ArgumentGroup]:
    """One flag per field (`--eval-samples`), default None so that `given_flags` sees what the user typed, in
    argument groups named by the dataclass's comment lines (returned by title, for the script's other flags).
    bool fields get --x / --no-x."""
    helps, groups = field_help(cls), {}
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type).split(" ")[0]
        title, h = helps.get(f.name, ("", ""))
        if title not in groups:
            groups[title] = p.add_argument_group(title or None)
        group = groups[title]
        if default_note:
            h = f"{h} (default: {f.default!r}{default_note})"
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=h)
        else:
            group.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=None, help=h,
                               choices=(choices or {}).get(f.name))
    return groups


def given_flags(args: argparse.Namespace, cls: type) -> dict:
    """The config fields set on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resumed_config(cls: type, saved: dict, step: int, given: dict, fixed: tuple[str, ...]):
    """The run's own settings (a checkpoint's config at `step`) with what the command line changes, refusing
    changes to the `fixed` fields (they define the networks in the checkpoint) and an --iters below `step`."""
    changed = [k for k in fixed if k in given and given[k] != saved.get(k)]
    if changed:
        raise ValueError(f"a resumed run cannot change {flag(changed[0])} (the run has {saved.get(changed[0])!r}); "
                         f"start a new run with another --out")
    if given.get("iters", saved.get("iters", step)) < step:
        raise ValueError(f"--iters {given['iters']} is below the checkpoint's iteration {step}")
    names = {f.name for f in dataclasses.fields(cls)}  # saved fields this version no longer has are dropped
    return cls(**{k: v for k, v in (saved | given).items() if k in names})


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    """ema <- beta ema + (1 - beta) model, all parameters in one fused call."""
    pe, p = list(ema.parameters()), list(model.parameters())
    if len(pe) != len(p):
        raise ValueError(f"EMA has {len(pe)} parameters, the model {len(p)}")
    torch._foreach_lerp_(pe, p, 1 - beta)


def warmup_cosine(warmup: int, decay_iters: int, final: float):
    """Learning-rate factor at iteration i (for LambdaLR): linear warm-up over `warmup` iterations, then a cosine
    decay to `final` (a fraction of the peak) at `decay_iters`; final = 1: constant."""
    def f(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        p = min((i - warmup) / max(decay_iters - warmup, 1), 1)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def require(ok: bool, message: str) -> None:
    """A ValueError with `message` unless `ok`: one line per check in a script's validation."""
    if not ok:
        raise ValueError(message)


def check_numbers(cfg: object, at_least_one: tuple[str, ...] = (), positive: tuple[str, ...] = ()) -> None:
    """Every int / float field finite and >= 0; `at_least_one` fields >= 1; `positive` fields > 0."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, int | float) and not isinstance(v, bool) and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{flag(f.name)} must be a finite number >= 0, got {v}")
    for name in at_least_one:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{flag(name)} must be >= 1, got {getattr(cfg, name)}")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{flag(name)} must be > 0, got {getattr(cfg, name)}")


# ----------------------------------------------------------------------------------------------------
# The log: one json object per logging interval in RUN/log.jsonl, and the same row as a line under tqdm.


class Log:
    """log.jsonl of a run folder. `restart(history)` rewrites it from a checkpoint's rows, so that a resumed run
    neither repeats nor loses a line; `write(row)` appends one row (rank 0 only)."""

    def __init__(self, folder: str | Path):
        self.path = os.path.join(folder, "log.jsonl")

    def restart(self, history: list[dict]) -> None:
        if is_main():
            with open(self.path, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in history)

    def write(self, row: dict) -> None:
        if not is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write(" | ".join(f"{k} {_fmt(v)}" for k, v in row.items()))


class Averages:
    """Means of the logged values over a logging interval, across ranks (one all_reduce per interval)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
            self.counts[k] = self.counts.get(k, 0) + 1

    def state_dict(self) -> dict:
        """The open interval's sums and counts (this rank's), so that a resumed run logs the same means."""
        return {k: [float(v), self.counts[k]] for k, v in self.sums.items()}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {k: s for k, (s, _) in state.items()}
        self.counts = {k: n for k, (_, n) in state.items()}

    def pop(self) -> dict[str, float]:
        """The interval's means (rounded to 6 digits), and a fresh interval."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        means = [self.sums[k] / self.counts[k] for k in keys]  # tensors, or floats restored from a checkpoint
        device = next((m.device for m in means if isinstance(m, torch.Tensor)), torch.device("cpu"))
        vals = torch.stack([torch.as_tensor(m, dtype=torch.float32, device=device) for m in means])
        if dist.is_initialized():
            dist.all_reduce(vals)
            vals /= dist.get_world_size()
        self.sums, self.counts = {}, {}
        return {k: round(v, 6) for k, v in zip(keys, vals.tolist(), strict=True)}


class NonFinite:
    """Watches every iteration's losses for inf / NaN without waiting on the device (no host sync in the loop): the
    first bad iteration of each loss stays on the device until `check` (one sync, at log intervals and before
    checkpoints) stops every process, naming the losses and the iteration, and the last checkpoint written."""

    def __init__(self):
        self.first: dict[str, torch.Tensor] = {}  # loss -> the first iteration it was not finite (inf: none yet)

    def add(self, logs: dict[str, torch.Tensor], step: int) -> None:
        for k, v in logs.items():
            bad = torch.where(torch.isfinite(v.detach().float()), float("inf"), float(step))
            self.first[k] = torch.minimum(self.first[k], bad) if k in self.first else bad

    def check(self, last: str) -> None:
        if not self.first:
            return
        firsts = torch.stack(list(self.first.values()))
        if dist.is_initialized():  # every rank logs the same losses, in the same order
            dist.all_reduce(firsts, op=dist.ReduceOp.MIN)
        step = firsts.min().item()
        if math.isfinite(step):
            bad = [k for k, f in zip(self.first, firsts.tolist(), strict=True) if f == step]
            hint = " (the teacher or the fake score predicts inf/NaN, or G diverged)" if "loss_dmd" in bad else ""
            raise FloatingPointError(f"non-finite {', '.join(bad)} at iteration {int(step)}{hint}; last good "
                                     f"checkpoint: {last}")


def nonfinite(row: dict) -> bool:
    return not all(math.isfinite(v) for v in row.values() if isinstance(v, int | float))


def plot(path: str | Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str = "",
         yscale: str = "linear") -> None:
    """Line plot of {label: (xs, ys)} as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4) if len(series) > 1 else (6, 3.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, yscale=yscale)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_history(folder: str | Path, history: list[dict]) -> None:
    """brightness.png (G's mean output brightness, Fig. 8) and steps_fd.png (each step's periodic FD) from log rows."""
    rows = [r for r in history if "brightness" in r]
    if rows:
        plot(Path(folder) / "brightness.png", {"G": ([r["it"] for r in rows], [r["brightness"] for r in rows])},
             "iteration", "mean sample brightness", "generator output brightness (Fig. 8)")
    rows = [r for r in history if "eval_step_fd" in r]
    if rows:
        plot(Path(folder) / "steps_fd.png", {f"step {k + 1}": ([r["it"] for r in rows], [r["eval_step_fd"][k] for r in
             rows]) for k in range(len(rows[0]["eval_step_fd"]))}, "iteration", "Frechet distance", yscale="log")


def finished(folder: str | Path, identity: dict, reuse: bool) -> dict | None:
    """The folder's metrics.json if `reuse` and it holds `identity` (a finished run of the same inputs); otherwise
    none, and the file goes: no result of another run stays beside a run that (re)starts."""
    path = Path(folder) / "metrics.json"
    saved = json.loads(path.read_text()) if path.exists() else None
    if saved and reuse and saved.get("identity") == identity:
        return saved
    if saved and is_main():
        path.unlink()


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else f"[{', '.join(map(_fmt, v))}]" if isinstance(v, list) else str(v)


def print_results(results: dict, step: int | None = None) -> None:
    """Evaluation results as lines under the tqdm bar (rank 0)."""
    if not is_main():
        return
    head = f"[eval @ {step}] " if step is not None else ""
    for k, v in results.items():
        if k == "teacher":
            for nfe, r in v.items():
                tqdm.write(f"{head}teacher {nfe:>2} NFE ({r['sampler']}, {r['nfe']}): " +
                           ", ".join(f"{a} {b:.4g}" for a, b in r.items() if isinstance(b, float)))
        elif isinstance(v, dict) and k != "identity":
            tqdm.write(f"{head}{k}: " + ", ".join(f"{a} {_fmt(b)}" for a, b in v.items()))
