"""Joint fidelity against every speed knob (issue 19): what fewer MaskGIT passes or fewer bits do to whole futures and
to rare ones, measured through the engine (the serving path), on held-out states of the stochastic world.

A knob setting is a string: a precision (fp32 | bf16 | int8 | fp8), decoding knobs of a frame-head model
(passes=P, decode_temperature=T, schedule=cosine|sequential, confidence=sampled|max, choice_noise=X), the sampler
of a denoising model (denoise_steps=S: Euler steps of its probability-flow ODE a frame), or several joined by '+'
("bf16+passes=4"). `configure` gives the model as the server would run it under that setting; every
figure then comes from K futures per state through `Engine` (maskgit_fidelity.joint_fidelity / rare_rate with an
engine). Per setting:
- right ball count at steps 1 and 4, configuration TV at steps 1 and 4 with the world-vs-world floor at the same K;
- rare collisions (true p <= 5 %): the sampled rate / the world's (from world_k independent simulator futures).
A setting HOLDS when count(1) >= 95 %, count(4) >= 90 %, TV(1) <= 0.25 and the rare rate is within +-20 % of the
world's (the point estimate; its 95 % interval is printed beside it). The cheapest setting that holds (fewest model
calls a frame, then fewest bits) is the one to serve.

    worldserve fidelity models/maskgit --knobs default --baseline models/dynamic --states 12 --k 64
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

from .maskgit_fidelity import joint_fidelity, rare_rate, rare_states, world_side

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "fp8")
BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "fp8": 8}
DECODE_KNOBS = {"passes": int, "decode_temperature": float, "schedule": str, "confidence": str, "choice_noise": float,
                "denoise_steps": int}
DENOISE_STEPS = (1, 2, 3, 5)  # the denoising-steps rows of a denoiser's table
SELECT_K = 64  # simulator futures that pick the rare states (p in (0, 5 %] needs K >= 20 to be seen at all)
GOALS = {"count1": 0.95, "count4": 0.90, "tv1": 0.25, "rare_rel": 0.20}


def default_knobs(model) -> list[str]:
    """The table's rows for a model: passes 1, 2, 4, 8, 16 and its default (frame-head models), then bf16 and int8;
    a denoiser: denoising steps 1, 2, 3, 5 and its default, then bf16 (it serves eager at fp32 / fp16 / bf16)."""
    if is_denoiser(model):
        steps = sorted({*DENOISE_STEPS, model.cfg.denoise_steps})
        return [f"denoise_steps={n}" for n in steps] + ["bf16"]
    if model.spec.decoding == "parallel":
        return ["fp32", "bf16", "int8"]
    passes = sorted({1, 2, 4, 8, 16, model.spec.passes})
    return [f"passes={p}" for p in passes] + ["bf16", "int8"]


def is_denoiser(model) -> bool:
    """A model that samples its frames by denoising (its config names the number of steps)."""
    return hasattr(getattr(model, "cfg", None), "denoise_steps")


def parse(name: str) -> tuple[str, dict]:
    """'bf16+passes=4' -> ("bf16", {"passes": 4}); raises ValueError naming what it does not know."""
    precision, changes = "fp32", {}
    for part in filter(None, name.split("+")):
        if part in PRECISIONS:
            precision = part
            continue
        key, eq, val = part.partition("=")
        if not eq or key not in DECODE_KNOBS:
            raise ValueError(f"unknown knob {part!r} in {name!r}: a precision {PRECISIONS} or one of "
                             f"{tuple(DECODE_KNOBS)}=value, joined by '+'")
        changes[key] = DECODE_KNOBS[key](val)
    return precision, changes


def configure(model, name: str):
    """The model as served under the knob setting `name` (fp32 and no decoding knob: the model itself)."""
    from ..runtime.loader import with_precision

    precision, changes = parse(name)
    if changes:
        own = {f.name for f in dataclasses.fields(model.cfg)} if dataclasses.is_dataclass(model.cfg) else set()
        if (model.spec.decoding == "parallel" and not is_denoiser(model)) or not set(changes) <= own:
            kind = ("denoises a frame" if is_denoiser(model) else
                    "decodes a frame in one parallel pass" if model.spec.decoding == "parallel" else
                    f"decodes a frame in {model.spec.decoding} passes")
            raise ValueError(f"{name!r}: {model.spec.name} {kind}; it has no "
                             f"{'/'.join(sorted(set(changes) - own) or changes)} knob")
        model = copy.copy(model)  # the same weights; only the spec (from cfg) changes
        model.cfg = dataclasses.replace(model.cfg, **changes)
        if hasattr(model.cfg, "validate"):
            model.cfg.validate()
    return with_precision(model, precision)


def label(model, name: str) -> str:
    """'maskgit: 4 passes, bf16' (other decoding knobs appended)."""
    precision, changes = parse(name)
    sp = model.spec
    if is_denoiser(model):
        return f"{sp.name}: {changes.get('denoise_steps', model.cfg.denoise_steps)} denoising steps, {precision}"
    if sp.decoding == "parallel":
        return f"{sp.name}: parallel, {precision}"
    extra = "".join(f", {key} {val}" for key, val in changes.items() if key != "passes")
    return f"{sp.name}: {changes.get('passes', sp.passes)} passes{extra}, {precision}"


def calls_per_frame(model, name: str) -> int:
    """Model calls a frame costs: the trunk once, then one frame-head pass each (engine/frames.py); a denoiser: one
    denoiser call per Euler step (its heads ride on the last); parallel: 1."""
    _, changes = parse(name)
    if is_denoiser(model):
        return changes.get("denoise_steps", model.cfg.denoise_steps)
    if model.spec.decoding == "parallel":
        return 1
    return 1 + changes.get("passes", model.spec.passes)


@dataclass
class KnobRow:
    name: str
    label: str
    calls: int  # model calls a frame
    bits: int
    count: dict[int, float]  # step -> fraction of futures with the world's number of balls
    tv: dict[int, float]  # step -> configuration TV
    floor: dict[int, float]
    rare: float  # sampled rare-collision rate
    ci: tuple[float, float]
    world: float  # the world's rate on the same states
    seconds: float

    @property
    def rare_ratio(self) -> float:
        return self.rare / self.world if self.world else float("nan")

    def rare_ok(self, rel: float = GOALS["rare_rel"]) -> bool:
        return (1 - rel) * self.world <= self.rare <= (1 + rel) * self.world

    def holds(self) -> bool:
        return (self.count[1] >= GOALS["count1"] and self.count[4] >= GOALS["count4"] and self.tv[1] <= GOALS["tv1"]
                and self.rare_ok())


def rare_verdict(name: str, rate: float, ci: tuple[float, float], world: float,
                 rel: float = GOALS["rare_rel"]) -> tuple[bool, str]:
    """-> (inside +-rel of the world's rate, a line naming the rates)."""
    ok = (1 - rel) * world <= rate <= (1 + rel) * world
    ratio = f"x{rate / world:.2f}" if world else "(the world has none)"
    return ok, (f"rare collisions under {name}: sampled rate {rate:.4f} (95 % interval {ci[0]:.4f} – {ci[1]:.4f}) vs "
                f"the world's {world:.4f}: {ratio} the world's, {'inside' if ok else 'OUTSIDE'} +-{rel:.0%} -> "
                f"{'PASS' if ok else 'FAIL'}")


def rare_check(model, name: str, n_states: int = 8, k: int = 256, world_k: int = 1024, seed: int = 0):
    """`worldserve eval --variant NAME` on the stochastic world: -> (ok, verdict line, KnobRow)."""
    states, world = rare_states(n_states, max(k, SELECT_K), world_k=world_k, seed=seed)
    if not states:
        raise ValueError(f"no held-out state with a rare collision (world p in (0, 5 %]) among {8 * n_states}")
    row = measure(model, name, [], states, world, k, seed)
    ok, line = rare_verdict(name, row.rare, row.ci, world)
    return ok, line, row


def measure(model, name: str, worlds, rare: list, world_rate: float, k: int, seed: int = 0,
            rare_k: int = 0) -> KnobRow:
    """One knob setting through the engine: joint fidelity on `worlds` (maskgit_fidelity.world_side) and the rare
    rate on `rare` states."""
    from ..engine.engine import Engine
    from ..settings import EngineSettings

    t0 = time.time()
    m = configure(model, name)
    rare_k = rare_k or k
    slots = max(k, rare_k)
    eng = Engine(m, EngineSettings(max_slots=slots, max_queue=4, max_candidates=slots))
    nan = float("nan")
    f = joint_fidelity(m, worlds, k, seed=seed, engine=eng) if worlds else {"count": {1: nan, 4: nan},
                                                                          "tv": {1: nan, 4: nan},
                                                                          "floor": {1: nan, 4: nan}}
    r, ci = rare_rate(m, rare, rare_k, seed=seed, engine=eng) if rare else (nan, (nan, nan))
    return KnobRow(name, label(model, name), calls_per_frame(model, name), BITS[parse(name)[0]], f["count"], f["tv"],
                   f["floor"], r, ci, world_rate, time.time() - t0)


_WORK: list = []  # the rows of a knob_table with jobs > 1, inherited by its forked workers (states hold simulators)


def _measure_in_worker(i: int) -> KnobRow:
    import torch

    torch.set_num_threads(1)
    return measure(*_WORK[i])


def knob_table(models: dict, n_states: int, k: int, rare_n: int, world_k: int = 1024, seed: int = 0,
               log=None, rare_k: int = 0, jobs: int = 1) -> list[KnobRow]:
    """models: {model: [knob settings]} (e.g. the parallel baseline's ["fp32"] and a MaskGIT model's default_knobs);
    the same states and world side for every row. jobs > 1: the rows in that many worker processes (one torch thread
    each; every row is measured alone on the same states, so the figures are those of jobs=1)."""
    from .fidelity import heldout_states

    log = log or (lambda line: print(line, flush=True))
    t0 = time.time()
    worlds = world_side(heldout_states(n_states, 4), k, (1, 4), seed)
    rare_k = rare_k or k
    rare, world = rare_states(rare_n, max(k, SELECT_K), world_k=world_k, seed=seed) if rare_n else ([], float("nan"))
    log(f"world side: {time.time() - t0:.0f} s; {n_states} states, {len(rare)} rare states (world rate {world:.4f} "
        f"over {world_k} futures each), K = {k}, {rare_k} on rare states")
    work = [(model, name, worlds, rare, world, k, seed, rare_k) for model, names in models.items() for name in names]
    if jobs <= 1:
        rows = []
        for w in work:
            rows.append(measure(*w))
            log(row_line(rows[-1]))
        return rows
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    _WORK[:] = work
    try:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
            futs = {pool.submit(_measure_in_worker, i): i for i in range(len(work))}
            done = {}
            for f in as_completed(futs):  # each row logged as it comes; the table keeps the rows' order
                done[futs[f]] = f.result()
                log(row_line(done[futs[f]]))
    finally:
        _WORK.clear()
    return [done[i] for i in range(len(work))]


HEADER = ("| setting (through the engine) | model calls a frame | right count step 1 | right count step 4 | config TV "
          "step 1 (floor) | config TV step 4 (floor) | rare collisions (95 % CI) | / world's | holds |\n"
          "|---|---|---|---|---|---|---|---|---|")


def row_line(r: KnobRow) -> str:
    return (f"| {r.label} | {r.calls} | {100 * r.count[1]:.1f}% | {100 * r.count[4]:.1f}% | {r.tv[1]:.3f} "
            f"({r.floor[1]:.3f}) | {r.tv[4]:.3f} ({r.floor[4]:.3f}) | {r.rare:.4f} ({r.ci[0]:.4f} – {r.ci[1]:.4f}) | "
            f"x{r.rare_ratio:.2f} | {'yes' if r.holds() else 'no'} |")


def cheapest(rows: list[KnobRow]) -> KnobRow | None:
    """The cheapest setting that holds: fewest model calls a frame, then fewest bits."""
    ok = [r for r in rows if r.holds()]
    return min(ok, key=lambda r: (r.calls, r.bits)) if ok else None


def table_text(rows: list[KnobRow], n_states: int, k: int, rare_n: int, world_k: int, command: str,
               rare_k: int = 0) -> str:
    best = cheapest(rows)
    world = rows[0].world if rows else float("nan")
    lines = [HEADER, *map(row_line, rows), "",
             f"{n_states} held-out states x K = {k} futures at temperature 1 (configuration TV: whole sets of "
             "ball cells; floor: the world against itself at the same K); rare collisions: "
             f"{rare_n} states where the world's collision probability within 4 steps is in (0, 5 %], "
             f"K = {rare_k or k} each, the world's rate {world:.4f} from {world_k} simulator futures per state. "
             "Holds: right count >= 95 % at step 1 and >= 90 % at step 4, TV at step 1 <= 0.25, rare rate within "
             f"+-20 % of the world's (point estimate; the interval shows how much K allows). Measured by `{command}`.",
             "",
             f"Cheapest setting that holds: **{best.label}**." if best else
             "No setting holds every goal at this K (see the rows: which goal each misses)."]
    return "\n".join(lines)


def knobs_dir(model_dir, knobs: list[str] | None, baseline_dir, n_states: int, k: int, rare_n: int, world_k: int,
              write_card: bool, command: str, rare_k: int = 0, jobs: int = 1) -> str:
    """`worldserve fidelity --knobs`: the table, printed and written into the model's card (and the baseline's)."""
    from pathlib import Path

    from ..model.io import load_model_dir
    from .card import write_card_table

    model = load_model_dir(model_dir)
    models = {}
    if baseline_dir:
        models[load_model_dir(baseline_dir)] = ["fp32"]
    models[model] = knobs or default_knobs(model)
    rows = knob_table(models, n_states, k, rare_n, world_k, rare_k=rare_k, jobs=jobs)
    text = table_text(rows, n_states, k, rare_n, world_k, command, rare_k)
    print(text)
    if write_card:
        for d in [model_dir] + ([baseline_dir] if baseline_dir else []):
            write_card_table(Path(d), text, "knobs")
    return text
