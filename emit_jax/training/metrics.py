"""What a user sees while training: a JSONL log, TensorBoard scalars, a progress bar, and plots.

``MetricWriter`` is made once per training stage and, on every ``write(step, scalars)``:

* appends one JSON line ``{"stage", "step", "time", **scalars}`` to ``STAGE_DIR/metrics.jsonl``
  (non-finite values are written as ``null`` so that every line stays valid JSON);
* adds each scalar to TensorBoard under ``"<stage>/<key>"`` in ``STAGE_DIR/tb`` (tensorboardX),
  plus ``"<stage>/tokens_per_s"``, and flushes;
* updates a tqdm bar when the stream is a terminal, or prints one plain line otherwise.

``read_metrics`` reads a metrics.jsonl back; ``plot_curves`` draws every stage's curves of a
workdir into one PNG; ``plot_table`` renders a small table (e.g. held-out accuracy per task) as a
PNG. tensorboardX, tqdm and matplotlib are imported lazily so importing this module is cheap.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from emit_jax.fileio import atomic_output, matplotlib_agg
from emit_jax.training.config import STAGES

STAGE_ORDER = STAGES
_BAR_KEYS = ("reward", "acc", "loss")


def _to_float(v) -> float | None:
    """A Python float for numbers, numpy/JAX scalars and 0-d arrays; None for anything else."""
    if isinstance(v, (str, bytes)):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _json_value(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # noqa: BLE001 - closed or exotic streams are just "not a terminal"
        return False


def _truncate_after(path: str, step: int) -> None:
    """Keep the lines of ``path`` (metrics JSONL) up to ``step``; drop later and broken ones."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        with atomic_output(path, "w") as f:
            f.write("".join(line + "\n" for line in keep))


def _has_rows(path: str) -> bool:
    try:
        return bool(read_metrics(path))
    except (OSError, ValueError):
        return False


class MetricWriter:
    """Per-stage metric sink: ``STAGE_DIR/metrics.jsonl``, TensorBoard (``STAGE_DIR/tb``) and a
    progress display on ``stream`` (default ``sys.stderr``).

    ``total_steps`` is the stage's last step; ``start_step`` the step a (resumed) run starts from,
    used for the bar's origin and the ETA. The JSONL file is opened in append mode, so a resumed
    run continues it from ``start_step``: lines of later steps (written after the checkpoint it
    resumes from, before a kill) and a cut-off last line are dropped first, so each step appears
    once. ``write(..., tokens=n)`` adds ``n`` tokens processed since the previous
    write (``add_tokens`` may be used in between); tokens/s is their sum over the wall time since
    the previous write. Usable as a context manager.
    """

    def __init__(self, stage_dir: str, *, stage: str, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, stream=None):
        self.stage, self.total, self.start = stage, int(total_steps), int(start_step)
        self.stream = sys.stderr if stream is None else stream
        import jax

        # in a multi-process run only process 0 writes (the others run the same steps)
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            self._log = self._tb = self._bar = None
            return
        os.makedirs(stage_dir, exist_ok=True)
        self.path = os.path.join(stage_dir, "metrics.jsonl")
        _truncate_after(self.path, self.start)
        if self.start > 0 and not _has_rows(self.path):  # emptied or removed since
            print(f"note: {stage} resumes at step {self.start + 1}, and {self.path} holds no "
                  f"row of the steps before it (emptied or removed since): its curves start "
                  "there", file=self.stream, flush=True)
        self._log = open(self.path, "a", encoding="utf-8")
        self._t0 = self._t_last = time.time()
        self._tokens = 0
        self._tb = None
        if tensorboard:
            import logging

            from tensorboardX import SummaryWriter

            # a skipped non-finite step's NaN loss (already a warning of ours) drew its
            # "NaN or Inf found in input tensor" line from tensorboardX on every step
            logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
            self._tb = SummaryWriter(logdir=os.path.join(stage_dir, "tb"))
        self._bar = None
        self._plain = progress
        if progress and _is_tty(self.stream):
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, initial=self.start, file=self.stream,
                             desc=stage, dynamic_ncols=True, leave=True)
            self._plain = False

    def add_tokens(self, n: int) -> None:
        """Count ``n`` more tokens towards the next write's tokens/s."""
        self._tokens += int(n)

    def write(self, step: int, scalars: dict, *, tokens: int = 0, show=None) -> None:
        """Log ``scalars`` (name -> number) at ``step``; non-numeric values are ignored.
        ``show``: the keys the plain progress line prints (default all)."""
        if not self.enabled:
            return
        step = int(step)
        vals = {k: f for k, f in ((str(k), _to_float(v)) for k, v in scalars.items())
                if f is not None}
        now = time.time()
        self._tokens += int(tokens)
        tps = self._tokens / max(now - self._t_last, 1e-9) if self._tokens > 0 else None
        self._tokens, self._t_last = 0, now

        rec = {"stage": self.stage, "step": step, "time": now,
               **{k: _json_value(v) for k, v in vals.items()}}
        self._log.write(json.dumps(rec, allow_nan=False) + "\n")
        self._log.flush()

        if self._tb is not None:
            for k, v in vals.items():
                self._tb.add_scalar(f"{self.stage}/{k}", v, step)
            if tps is not None:
                self._tb.add_scalar(f"{self.stage}/tokens_per_s", tps, step)
            self._tb.flush()

        if self._bar is not None:
            post = {"step": step, **{k: f"{vals[k]:.4g}" for k in _BAR_KEYS if k in vals}}
            if tps is not None:
                post["tok/s"] = f"{tps:.0f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(max(step - self._bar.n, 0))
            self._bar.refresh()
        elif self._plain:
            done = step - self.start
            eta = (self.total - step) * (now - self._t0) / done if done > 0 else float("nan")
            shown = "".join(f" {k} {v:.4g}" for k, v in vals.items() if show is None or k in show)
            rate = f" {tps:.0f} tok/s" if tps is not None else ""
            eta_s = f"{eta:.0f}s" if math.isfinite(eta) else "?"
            print(f"[{self.stage}] step {step}/{self.total}{shown}{rate} eta {eta_s}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        """Flush and close the log, the TensorBoard writer and the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._log is not None and not self._log.closed:
            self._log.close()

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl. A truncated last line (a killed writer) is skipped; a
    corrupt line elsewhere (not JSON, or not UTF-8) raises ``ValueError`` naming the file and
    the line number."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    out = []
    for j, (lineno, ln) in enumerate(numbered):
        try:  # line by line: bytes that are not UTF-8 are one corrupt line (twenty-eighth
            # probe C5: a UnicodeDecodeError traceback after the evaluation, results.json unwritten)
            rec = json.loads(ln.decode("utf-8"))
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if j == len(numbered) - 1:
                break  # truncated tail of an interrupted write
            raise ValueError(f"{os.fspath(path)}:{lineno}: corrupt metrics line: {e}") from None
        out.append(rec)
    return out


def _save_atomic(fig, out_path: str) -> str:
    """Save ``fig`` as PNG via a temp file in the target directory and ``os.replace``."""
    with atomic_output(out_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return out_path


def _stages(workdir: str) -> list[str]:
    """Stage subfolders of ``workdir`` with a metrics.jsonl, in training order."""
    found = sorted(n for n in os.listdir(workdir)
                   if os.path.isfile(os.path.join(workdir, n, "metrics.jsonl")))
    return [s for s in STAGE_ORDER if s in found] + [s for s in found if s not in STAGE_ORDER]


def _series(recs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``; null -> NaN (a gap). For a resumed run that re-logged steps,
    the last record of each step wins."""
    by_step = {}
    for r in recs:
        if key in r and "step" in r:
            v = r[key]
            by_step[int(r["step"])] = float("nan") if v is None else float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_curves(workdir: str, out_path: str) -> str | None:
    """One PNG with a row of panels: per stage the "loss" curve and, for stages logging
    "reward", the reward curve and the "acc" curve (with any "acc/<task>" curves, legended).
    A stage with neither loss nor reward gets one panel of all its scalars. x = step, no
    smoothing. Returns ``out_path``, or None when ``workdir`` holds no metrics."""
    if not os.path.isdir(workdir):
        return None
    panels = []  # (title, [(label, steps, values)])
    for stage in _stages(workdir):
        try:
            recs = read_metrics(os.path.join(workdir, stage, "metrics.jsonl"))
        except ValueError as e:  # a damaged log costs its panel, not the run's results.json
            print(f"note: {e}; the {stage} stage's curves are not drawn", file=sys.stderr,
                  flush=True)
            continue
        keys = list(dict.fromkeys(k for r in recs for k in r if k not in ("stage", "step", "time")))
        if "loss" in keys:
            panels.append((f"{stage}: loss", [("loss", *_series(recs, "loss"))]))
        if "reward" in keys:
            panels.append((f"{stage}: reward", [("reward", *_series(recs, "reward"))]))
            accs = [k for k in keys if k == "acc" or k.startswith("acc/")]
            if accs:
                panels.append((f"{stage}: accuracy", [(k, *_series(recs, k)) for k in accs]))
        if "loss" not in keys and "reward" not in keys and keys:
            panels.append((stage, [(k, *_series(recs, k)) for k in keys]))
    if not panels:
        return None

    matplotlib_agg()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, curves) in zip(axes, panels):
        for label, xs, ys in curves:
            ax.plot(xs, ys, label=label, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_atomic(fig, out_path)


def plot_table(summary_rows: list[list[str]], header: list[str], out_path: str,
               title: str = "") -> str:
    """Render ``summary_rows`` under ``header`` as a PNG table (``ax.table``); returns the path."""
    matplotlib_agg()
    from matplotlib.figure import Figure

    rows = [[str(c) for c in r] for r in summary_rows]
    width = max(4.0, 1.6 * len(header))
    fig = Figure(figsize=(width, 0.8 + 0.35 * (len(rows) + 1)))
    ax = fig.subplots()
    ax.axis("off")
    table = ax.table(cellText=rows or [[""] * len(header)], colLabels=[str(h) for h in header],
                     loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.3)
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e8e8e8")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save_atomic(fig, out_path)
