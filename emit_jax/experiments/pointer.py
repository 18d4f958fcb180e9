"""Can the tiny LLM learn to read four shuffled options? Synthetic text tasks, from scratch.

``python -m emit_jax.experiments.pointer --task lookup|copy|enumerate|restate [--steps N]``

A randomly initialised Qwen2 decoder of the ``tiny`` architecture (its width and depth by flag),
with the vocabulary of a tiny tokenizer folder (``--tokenizer``, default: trained here on the
embedded default's texts), is trained on one of three synthetic tasks and evaluated every 100
steps on 256 fresh questions. Words are single tokens of the tokenizer (``--words`` of them), so
only the option order is new at evaluation, as in the embedded default's questions.

- ``lookup``: ``A. w1.\\nB. w2.\\nC. w3.\\nD. w4.\\n`` then ``w3=C w1=A ...``: the letter
  *before* a word, the pointer a four-option answer needs. Accuracy over the four lookups
  (0.52 = elimination alone: the last lookup is given by the other three).
- ``copy``: ``x1 .. x12 \\n\\n x1 .. x12``: copying (induction); mixed 1:1 with ``lookup``.
- ``enumerate``: a stated fact (a word of another list, mapped one to one to the option words,
  as "nut" is to "Nut."), the options, then the answer as a rationale that goes through the
  options in order, ``A. w1. no`` ... up to the one that matches, ``C. w3. yes``, then the
  letter. Reports the answer accuracy with the rationale given (teacher forcing), the yes / no
  verdicts' accuracy and the share of questions whose whole rationale and letter are predicted
  right.
- ``restate``: the same question, answered by restating the options word then letter
  (``A w1 A`` ...), then the fact's option word and the letter that followed it there (an
  induction copy; ``data.rationale=restate`` of the training data). Reports the accuracy of
  that letter. ``restate+copy`` mixes it 1:1 with ``copy``.

``--same-words`` states the fact with the option's own word instead of a word mapped to it.

docs/training.md ("Reading four options") records what each reaches on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import tempfile
import time

import numpy as np

from emit_jax import cli
from emit_jax.errors import ConfigError
from emit_jax.limits import MAX_BATCH, MAX_LAYERS, MAX_MATRIX_SIDE


def _tokenizer(path: str):
    from emit_jax.data.tokenizer import load_tokenizer
    from emit_jax.training.data import tokenizer_for

    if path:
        return load_tokenizer(path)
    from emit_jax.data.embedded import ensure_cached

    with tempfile.TemporaryDirectory(prefix="pointer-tok-") as work:  # loaded into memory: the
        return tokenizer_for(work, ensure_cached(seed=0))  # folder goes (it was left in /tmp)


class Tasks:
    """Sequences ``(ids, labels)`` (labels -1 where there is no loss) of one task."""

    def __init__(self, tok, n_words: int, seed: int = 0, same_words: bool = False):
        t = lambda s: tok(s)["input_ids"]  # noqa: E731
        words = sorted(w for w in tok.get_vocab() if w.startswith("\u0120") and w[1:].isalpha()
                       and len(w) > 3)
        random.Random(seed).shuffle(words)
        if len(words) < 2 * n_words:
            raise ConfigError(f"--words {n_words}: needs {2 * n_words} single-token words; "
                              f"the tokenizer has {len(words)} (at most --words "
                              f"{len(words) // 2})")
        ids = [tok.convert_tokens_to_ids(w) for w in words]
        self.options, self.facts = ids[:n_words], ids[n_words:2 * n_words]
        if same_words:  # the fact names the option's own token (identity match, not a mapping)
            self.facts = self.options
        self.letters = [t(c)[0] for c in "ABCD"]
        self.dot, self.nl, self.eq, self.sep = t("."), t(".\n"), t("="), t("\n\n")
        self.yes, self.no, self.line = t(" yes"), t(" no"), t("\n")
        self.head, self.question = t("The thing is"), t(".\nQuestion: Which?\n")
        self.tags = [tok.convert_tokens_to_ids(x) for x in ("<think>", "</think>", "<answer>")]
        self.pad = tok.pad_token_id

    def _option_block(self, words):
        ids = []
        for i, w in enumerate(words):
            ids += [self.letters[i]] + self.dot + [w] + self.nl
        return ids

    def lookup(self, rng):
        words = rng.sample(self.options, 4)
        ids = self._option_block(words)
        labels = [-1] * len(ids)
        for i in rng.sample(range(4), 4):
            ids += [words[i]] + self.eq + [self.letters[i]]
            labels += [-1] * (1 + len(self.eq)) + [self.letters[i]]
        return ids, labels

    def copy(self, rng, n: int = 12):
        s = [rng.choice(self.options) for _ in range(n)]
        return s + self.sep + s, [-1] * (n + len(self.sep)) + s

    def _question(self, rng):
        """``(k, order, j, prompt)``: the fact's option ``k``, the four options' ``order``
        (``k`` among them, at ``j``) and the prompt: the stated fact, then the options."""
        k = rng.randrange(len(self.options))
        order = rng.sample([i for i in range(len(self.options)) if i != k], 3) + [k]
        rng.shuffle(order)
        prompt = self.head + [self.facts[k]] + self.question + \
            self._option_block([self.options[o] for o in order])
        return k, order, order.index(k), prompt

    def enumerate(self, rng):
        k, order, j, prompt = self._question(rng)
        think, end, answer = self.tags
        target = [think]
        for i, o in enumerate(order[:j + 1]):
            target += [self.letters[i]] + self.dot + [self.options[o]] + self.dot + \
                (self.yes if i == j else self.no) + self.line
        target += [end, answer, self.letters[j]]
        return prompt + target, [-1] * len(prompt) + target

    def restate(self, rng):
        """The options restated word-then-letter (``A w1 A.`` ...), then the fact word and the
        letter that followed it in the restatement: every step a copy, the last an induction."""
        k, order, j, prompt = self._question(rng)
        think, end, answer = self.tags
        target = [think]
        for i, o in enumerate(order):
            target += [self.letters[i], self.options[o], self.letters[i]] + self.line
        target += self.head + [self.options[k], self.letters[j], end, answer, self.letters[j]]
        return prompt + target, [-1] * len(prompt) + target


def batch(tasks: Tasks, task: str, rng, n: int):
    """``ids [n, T]``, ``labels [n, T]``, ``mask [n, T]``, ``answer_pos [n]`` (right-padded)."""
    if task == "copy":
        rows = [tasks.copy(rng) if i % 2 == 0 else tasks.lookup(rng) for i in range(n)]
    elif task == "restate+copy":  # the induction the restatement's last step needs, on its own
        rows = [tasks.copy(rng) if i % 2 == 0 else tasks.restate(rng) for i in range(n)]
    else:
        rows = [getattr(tasks, task)(rng) for _ in range(n)]
    width = max(len(r[0]) for r in rows)
    ids = np.full((n, width), tasks.pad, np.int32)
    labels = np.full((n, width), -1, np.int32)
    mask = np.zeros((n, width), np.int32)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(x)], mask[i, :len(x)] = x, y, 1
    return ids, labels, mask, np.asarray([len(r[0]) - 1 for r in rows], np.int32)


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m emit_jax.experiments.pointer", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["lookup", "copy", "enumerate", "restate", "restate+copy"], default="enumerate")
    p.add_argument("--steps", type=cli.positive_int, default=800)
    p.add_argument("--batch", type=cli.int_in(1, MAX_BATCH), default=32)
    p.add_argument("--lr", type=cli.positive_float, default=3e-3)
    p.add_argument("--hidden", type=cli.int_in(1, MAX_MATRIX_SIDE), default=128)
    p.add_argument("--layers", type=cli.int_in(1, MAX_LAYERS), default=4)
    p.add_argument("--rope-theta", type=cli.positive_float, default=1e6)
    p.add_argument("--words", type=cli.int_at_least(4), default=30)
    p.add_argument("--tokenizer", default="", help="a tiny tokenizer folder (a workdir's "
                   "tokenizer/); default: trained on the embedded default's texts")
    p.add_argument("--same-words", action="store_true", help="enumerate: state the fact with "
                   "the option's own word (an identity match) instead of a word mapped to it")
    p.add_argument("--seed", type=cli.nonneg_int, default=0)
    a = p.parse_args(argv)
    if a.lr > 0.1:  # as train says it (twenty-sixth probe PT4: --lr 1e9 without a word)
        print(f"warning: --lr {a.lr:g} is above 0.1: almost surely not meant (the default is "
              "3e-3)", file=sys.stderr)

    import jax.numpy as jnp
    import optax
    from flax import nnx

    from emit_jax.models import architectures
    from emit_jax.models.internvl import InternVL

    tok = _tokenizer(a.tokenizer)
    tasks = Tasks(tok, a.words, a.seed, same_words=a.same_words)
    cfg = architectures.get_config("tiny")
    cfg = cfg.replace(text=dataclasses.replace(
        cfg.text, vocab_size=len(tok) - 1, hidden_size=a.hidden, intermediate_size=3 * a.hidden,
        num_hidden_layers=a.layers, rope_theta=a.rope_theta),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    model = InternVL(cfg.validate(), rngs=nnx.Rngs(a.seed))
    sched = optax.warmup_cosine_decay_schedule(0.0, a.lr, max(1, min(30, a.steps // 4)), a.steps + 1)
    opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        sched, b2=0.95, weight_decay=0.01)), wrt=nnx.Param)

    def loss_fn(model, ids, labels, mask):
        logits = model.forward(ids[:, :-1], None, mask[:, :-1]).logits
        y = labels[:, 1:]
        m = y >= 0
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))
        return (nll * m).sum() / m.sum(), logits

    @nnx.jit
    def step(model, opt, ids, labels, mask):
        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, ids, labels, mask)
        opt.update(model, grads)
        return loss

    @nnx.jit
    def scores(model, ids, labels, mask, answer_pos):
        _, logits = loss_fn(model, ids, labels, mask)
        pred = jnp.argmax(logits, -1)
        y = labels[:, 1:]
        rows = jnp.arange(ids.shape[0])
        token_acc = ((pred == y) & (y >= 0)).sum() / (y >= 0).sum()
        answer = (pred[rows, answer_pos - 1] == ids[rows, answer_pos]).mean()
        whole = ((pred == y) | (y < 0)).all(-1).mean()
        verdict = (y == tasks.yes[0]) | (y == tasks.no[0])  # the yes / no after each option
        verdict_acc = ((pred == y) & verdict).sum() / jnp.maximum(verdict.sum(), 1)
        # restate: the letter that follows the fact word (the induction step)
        pointer = (pred[rows, answer_pos - 4] == ids[rows, answer_pos - 3]).mean()
        return token_acc, answer, whole, verdict_acc, pointer

    evals = {name: tuple(map(jnp.asarray, batch(tasks, name, random.Random(1000 + i), 256)))
             for i, name in enumerate({"copy": ["lookup", "copy"], "restate+copy": ["restate"]}
                                      .get(a.task, [a.task]))}
    rng, t0, times = random.Random(a.seed + 1), time.time(), []
    for s in range(1, a.steps + 1):
        ids, labels, mask, _ = batch(tasks, a.task, rng, a.batch)
        ts = time.time()
        loss = float(step(model, opt, jnp.asarray(ids), jnp.asarray(labels), jnp.asarray(mask)))
        times.append(time.time() - ts)
        if not math.isfinite(loss):  # (PT4: "loss nan" was printed as a result, exit 0)
            print(f"{p.prog}: error: step {s}: the loss is {loss}; the run diverged (try a "
                  "smaller --lr)", file=sys.stderr)
            return 3
        if s % 100 == 0 or s == a.steps:
            parts = []
            for name, e in evals.items():
                token_acc, answer, whole, verdict, pointer = (float(x) for x in scores(model, *e))
                parts.append(f"{name}: supervised-token acc {token_acc:.3f}" + (
                    f", answer (rationale given) {answer:.3f}, " + (
                        f"verdicts {verdict:.3f}, " if name == "enumerate" else
                        f"letter after the fact {pointer:.3f}, ") + f"all right {whole:.3f}"
                    if name in ("enumerate", "restate") else ""))
            print(f"step {s} loss {loss:.3f} | " + " | ".join(parts) +
                  f" | {np.median(times[-50:]):.3f} s/step, {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    cli.command(main, prog="python -m emit_jax.experiments.pointer")
