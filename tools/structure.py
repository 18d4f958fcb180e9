"""``python tools/structure.py [--trace]``: the figures issue 26 asks for, measured on the tree.

- upward imports: a project import from a module to one in a higher layer (see ``LAYERS``), or
  of a command-line module by anything but another command-line module; imports under
  ``if TYPE_CHECKING:`` do not count (they never run);
- cycles among modules (imports at any depth in a module, TYPE_CHECKING left out);
- function-local project imports against module-level ones;
- the largest module and README.md's lines;
- ``--trace``: the project files whose code runs during one GRPO step of the main job's tiny
  smoke config (the step function and everything it calls: data, sampler, rewards, advantages,
  loss, update, metrics, checkpoint), counted with ``sys.setprofile``.
"""
from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "emit_jax"

#: lowest first; a module belongs to the first prefix that matches (dotted names under emit_jax)
LAYERS = [
    ("errors", 0), ("limits", 0), ("fileio", 0), ("faults", 0), ("rl", 0), ("parallel", 0),
    ("data", 1), ("configs", 1),
    ("ops", 2),
    ("models", 3),
    ("checkpoint", 4), ("hf", 4), ("internvl_chat", 4), ("eval", 4),
    ("training", 5),
    ("experiments", 6),
]
#: command-line modules: the top; nothing else may import them
CLIS = {"cli", "train", "evaluate", "convert", "export", "visualize", "demo", "data.build",
        "data.embedded.__main__", "experiments.table1", "experiments.adfm_compare",
        "experiments.fresh_images", "experiments.heatmap_auroc", "experiments.heatmap_parts",
        "experiments.feature_probes", "experiments.pointer", "experiments.restated_answers",
        "experiments.vit_pretrain", "experiments.vit_asset", "experiments.eval_batch",
        "experiments.dl_ceiling", "experiments.zoom_crops",
        "plan.command", "plan.__main__", "aot.command", "aot.__main__", "__main__",
        # the package's own __init__: its only code is the ``python -m emit_jax.<command>``
        # start-up hook (cli's early interrupt, stderr and JAX-environment checks), run
        # before any command's modules load
        ""}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(mod: str) -> int:
    if mod in CLIS or any(mod.startswith(c + ".") for c in CLIS if "." not in c and c in ("cli",)):
        return 9
    for prefix, lv in LAYERS:
        if mod == prefix or mod.startswith(prefix + "."):
            return lv
    return 7   # anything else at the package root sits under the CLIs


def _type_checking(node: ast.AST) -> bool:
    t = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING")
        or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"))


def imports(path: Path):
    """(target module, lineno, local) for each project import in ``path``; a file that cannot be
    read or parsed exits with one line naming it."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as e:
        what = (f"line {e.lineno}: {e.msg}" if isinstance(e, SyntaxError)
                else getattr(e, "strerror", None) or str(e))
        sys.exit(f"structure.py: error: {path}: cannot read it as Python ({what})")
    me = module_name(path)
    pkg_parts = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    out = []

    def visit(node, depth):
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            local = depth > 0
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, depth + 1)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name == "emit_jax" or a.name.startswith("emit_jax."):
                        out.append((a.name[len("emit_jax."):] if "." in a.name else "",
                                    child.lineno, local))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = pkg_parts[:len(pkg_parts) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                elif child.module and (child.module == "emit_jax"
                                       or child.module.startswith("emit_jax.")):
                    mod = child.module[len("emit_jax."):] if "." in child.module else ""
                else:
                    continue
                for a in child.names:
                    sub = f"{mod}.{a.name}" if mod else a.name
                    out.append((sub if (PKG / (sub.replace(".", "/") + ".py")).exists()
                                or (PKG / sub.replace(".", "/")).is_dir() else mod,
                                child.lineno, local))
            visit(child, depth)

    visit(tree, 0)
    return sorted({(t, ln, loc) for t, ln, loc in out if t}, key=lambda x: x[1])


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python tools/structure.py",
                                description=__doc__.split("\n", 1)[0].strip("`"),
                                epilog="Run from anywhere: it reads the tree it lies in.")
    p.add_argument("--trace", action="store_true",
                   help="also list the files whose code runs in one GRPO step (about a minute)")
    args = p.parse_args(argv)
    files = sorted(p for p in PKG.rglob("*.py") if not p.is_dir())
    graph: dict[str, set[str]] = {}
    upward, local_n, top_n = [], set(), set()
    for p in files:
        me = module_name(p)
        graph[me] = set()
        for t, ln, loc in imports(p):
            if t == me or me.startswith(t + ".") and p.name == "__init__.py":
                continue
            graph[me].add(t)
            (local_n if loc else top_n).add((me, ln))
            lt, lm = layer(t), layer(me)
            if (lt == 9 and lm != 9) or (lt > lm and lt != 9):
                upward.append(f"{p.relative_to(ROOT)}:{ln} -> {t}")
    # cycles: strongly connected components of size > 1
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def strong(v):
        index[v] = low[v] = counter[0]; counter[0] += 1
        stack.append(v); on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strong(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    sizes = sorted(((len(p.read_text().splitlines()), str(p.relative_to(ROOT))) for p in files),
                   reverse=True)
    print(f"upward imports: {len(upward)}")
    for u in upward:
        print("  ", u)
    print(f"import cycles: {len(sccs)}", *("   " + " <-> ".join(c) for c in sccs), sep="\n")
    print(f"project import statements: {len(top_n)} module-level, {len(local_n)} function-local")
    print("largest modules: " + ", ".join(f"{f} {n}" for n, f in sizes[:3]))
    print(f"README.md lines: {len((ROOT / 'README.md').read_text().splitlines())}")
    if args.trace:
        trace()


def trace() -> None:
    """Files whose Python functions run in one GRPO step of the main job's smoke config once its
    programs are compiled: ``train`` with the GRPO stage alone for 3 steps (log and checkpoint
    every step, no evaluation or export), counting from the return of the step-1 metrics record
    (``MetricWriter.write``) to the return of step 2's: fetching the batch, sampling, the
    reference pass, rewards, advantages, the update, metrics and the checkpoint. Also the files
    whose functions run anywhere in that command (set-up, data and first-step tracing included)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    import tempfile
    every: set[str] = set()
    step: set[str] = set()
    writes = [0]
    pkg = str(PKG)

    def prof(frame, event, arg):
        code = frame.f_code
        if code.co_name == "<module>" or not code.co_filename.startswith(pkg):
            return
        f = os.path.relpath(code.co_filename, ROOT)
        if event == "call":
            every.add(f)
            if writes[0] == 1:
                step.add(f)
        elif event == "return" and code.co_name == "write" and f.endswith("training/metrics.py"):
            writes[0] += 1
            if writes[0] == 2:
                step.add(f)

    import shutil

    from emit_jax import train
    if not train.__file__.startswith(str(PKG)):  # (another emit_jax first on sys.path)
        sys.exit(f"structure.py: error: --trace imports emit_jax from {train.__file__}, not "
                 f"from this tree ({PKG}); run it with this tree's environment")
    work = tempfile.mkdtemp(prefix="emit-jax-structure-")
    argv = ["train", "--config=" + str(ROOT / "configs/grpo.py:smoke"), "--workdir", work,
            "--config.stages=('grpo',)", "--config.grpo.steps=3", "--config.grpo.iterations=1",
            "--config.checkpoint_every=1", "--config.log_every=1", "--config.export_hf=False",
            "--config.eval_limit=0", "--config.eval_unseen=0"]
    train.parse_flags(argv)
    sys.setprofile(prof)
    status = 0
    try:
        train.main(argv)
    except SystemExit as e:
        status = e.code or 0
    finally:
        sys.setprofile(None)
        shutil.rmtree(work, ignore_errors=True)  # (before: a smoke workdir left per run)
    if status:  # the lists would be of a failed run
        sys.exit(f"structure.py: error: the traced training run failed (exit {status})")
    print(f"files on one GRPO step's path (functions run in step 2 of 3): {len(step)}")
    for h in sorted(step):
        print("  ", h)
    print(f"files whose functions run in that whole command: {len(every)}")
    print("   " + " ".join(sorted(every)))


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # `... | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
