"""The self-evolution loop: when the runtime says it does not know, adapt from the cheapest level up, check that
the adaptation helped, keep it as a skill, and reuse it for similar prompts later.

    ev = Evolver(engine=eng, memory=mem, skills="~/.aios/skills")
    report = ev.step(prompt, context_texts)     # uncertain? -> L0 -> (L1) -> L2 -> L3 -> validate -> store or discard
    g = eng.diffuse(prompt, length=64)          # the engine activates matching skills (g.skills, g.adapters, g.patch)

Levels, cheapest first:
- L0, no training: the context goes into the memory store and the prompt is generated again with memory
  conditioning (`memory_k`) and memory guidance. Kept when that generation is no longer uncertain.
- L1, ControlNet (`aios_train.controlnet`): where the context is structured records (JSON objects), a token
  ControlNet learns "the keys in the prompt -> a record with exactly those keys" (`control="records"`: the prompt is
  the key list and also the ControlNet's input, the continuation the record). Kept if, on the held-out records, the
  share of generations that are a JSON object with exactly the prompt's keys rises by at least `structure_margin`
  over the engine without it (the base is untouched by construction: a ControlNet applies only to generations it is
  activated for). Stored as an L1 skill card per record (its key list); the runtime activates it for a matching
  prompt with the prompt as its control input. Free-text context skips L1.
- L2, LoRA: `aios_train.lora.train_lora` on the context texts (bounded by `lora_steps` / `lora_minutes`). Kept only
  if the held-out part of the context improves by at least `improve_margin` nats/token and general held-out text
  (the corpus's validation windows) degrades by at most `general_bound` nats/token, both measured on the PyTorch
  reference with and without the adapter on the same windows, t-samples and seeds. A kept adapter is written to
  the skills folder with a skill card in the skills store (a MemoryStore whose text is the context, meta: level,
  metrics, file, base fingerprint); a refused one is deleted and the engine is left as it was.
- L3, selective fine-tuning (`aios_train.selective`): the `patch_top_k` block modules with the largest relative
  gradient norm on the context (Auto-RGN) are trained, the rest stay frozen, and only those tensors are written as
  a tensor patch (`aios.kind = patch`). Validated exactly like L2 (same margin and bound, the patched model against
  the base on the same windows), stored as a skill card with level L3, or deleted.

Every kept adaptation is written under a temporary name and renamed into place, then its cards are added; the
cards are the only way a skill is found, so a process killed at any point leaves at worst an unused file, never
a card pointing at a half-written one.

Reuse happens in the runtime: the Evolver attaches its skills store to the engine (`engine.set_skills`), and every
later text generation activates the skills whose cards score at least `activate_threshold` (MiniLM cosine with
the prompt), fit this base (fingerprint) and whose file loads: adapters in `g.adapters`, a patch in `g.patch`, names
in `g.skills`. Cards for another base or with a missing or corrupt file are skipped, listed in `g.warnings`.
`engine.skills_for(prompt)` says what a prompt would activate without generating.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

MAX_CARDS = 64                        # skill cards (context documents) stored per skill


@dataclass
class EvolveConfig:
    improve_margin: float = 0.05      # nats/token the context's held-out loss must drop by
    general_bound: float = 0.02       # nats/token general held-out loss may rise by, at most
    lora_steps: int = 200
    lora_minutes: float = 5.0
    lora_rank: int = 8
    lora_lr: float = 2e-3
    lora_batch: int = 16
    valid_fraction: float = 0.2       # of the context's documents, held out for validation
    general_windows: int = 64
    eval_n_t: int = 8
    memory_k: int = 3
    memory_guidance: float = 1.0
    patch_top_k: int = 4              # L3: block modules unfrozen (by relative gradient norm)
    patch_steps: int = 200
    patch_minutes: float = 5.0
    patch_lr: float = 5e-4
    levels: tuple[str, ...] = ("L0", "L1", "L2", "L3")  # levels tried, cheapest first (L1 only for records)
    controlnet_steps: int = 300       # L1: training steps (bounded by controlnet_minutes too)
    controlnet_minutes: float = 5.0
    controlnet_rank: int = 16
    controlnet_lr: float = 1e-3
    structure_margin: float = 0.2     # L1: held-out valid-record rate must rise by this much
    controlnet_init: str | None = None  # L1: start from this token ControlNet of the base (e.g. a JSON one)
    activate_threshold: float = 0.45  # skill card cosine needed to activate its adapter
    gen_length: int = 64
    gen_steps: int = 32
    threads: int = 1
    force: bool = False               # adapt even when the engine is confident (tests, demos)


@dataclass
class LevelResult:
    level: str
    outcome: str                      # "kept", "refused", "skipped"
    reason: str
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)


@dataclass
class Report:
    prompt: str
    uncertainty: float | None
    should_evolve: bool | None
    levels: list[LevelResult] = field(default_factory=list)
    kept: str | None = None           # the level whose adaptation was kept
    skill: str | None = None          # the kept skill's name (its adapter's name in the engine)
    skill_id: int | None = None       # the id of its first skill card

    def to_dict(self) -> dict:
        return asdict(self)


class Evolver:
    def __init__(self, engine, memory, skills, general_data: str | Path = "data/corpus/valid.jsonl",
                 config: EvolveConfig | None = None):
        import aios_rt
        self.engine = engine
        self.memory = memory
        self.cfg = config or EvolveConfig()
        unknown = [lv for lv in self.cfg.levels if lv not in ("L0", "L1", "L2", "L3")]
        if unknown:
            raise ValueError(f"unknown evolution levels {unknown}; choose from L0, L1, L2, L3")
        self.skills_dir = Path(skills).expanduser()
        self.skills_dir.mkdir(parents=True, exist_ok=True)
        self.skills = aios_rt.MemoryStore(self.skills_dir / "cards")
        # Holding the store's writer lock, no other Evolver works here: what is staged is a killed run's leftover.
        for stale in self.skills_dir.glob(".skill-*.partial*"):
            stale.unlink(missing_ok=True)
        engine.set_skills(self.skills, self.cfg.activate_threshold)
        self.model_path = Path(engine.info["path"])
        self.fingerprint = engine.fingerprint
        self.general_data = Path(general_data)

    # ------------------------------------------------------------------ the loop
    def step(self, prompt: str, context_texts: list[str]) -> Report:
        """One pass of the loop for `prompt` in the domain of `context_texts`."""
        if not context_texts or any(not isinstance(t, str) or not t.strip() for t in context_texts):
            raise ValueError("context_texts must be a non-empty list of non-empty strings")
        c = self.cfg
        g = self.engine.diffuse(prompt, length=c.gen_length, steps=c.gen_steps, seed=0)
        rep = Report(prompt, g.uncertainty, g.should_evolve)
        if not (g.should_evolve or c.force):
            rep.levels.append(LevelResult("none", "skipped", "the engine is confident (should_evolve is "
                                          f"{g.should_evolve}); nothing to adapt"))
            return rep
        for level, run in (("L0", lambda: self._level0(prompt, context_texts, rep)),
                           ("L1", lambda: self._level1(context_texts, rep)),
                           ("L2", lambda: self._train_level("L2", context_texts, rep)),
                           ("L3", lambda: self._train_level("L3", context_texts, rep))):
            if level not in c.levels:
                rep.levels.append(LevelResult(level, "skipped", f"not in EvolveConfig.levels {c.levels}"))
            elif run():
                return rep
        return rep

    def _level0(self, prompt: str, texts: list[str], rep: Report) -> bool:
        t0 = time.time()
        c = self.cfg
        ids = self.memory.add_many(texts)
        w = c.memory_guidance
        g = self.engine.diffuse(prompt, length=c.gen_length, steps=c.gen_steps, seed=0, memory_k=c.memory_k,
                                compose={"full": 1 + w, "no_memory": -w} if w else None)
        m = {"memories_added": len(ids), "uncertainty_before": rep.uncertainty, "uncertainty_after": g.uncertainty,
             "should_evolve_after": g.should_evolve}
        if g.should_evolve is False and not c.force:
            rep.levels.append(LevelResult("L0", "kept", "with the context as memories the engine is confident",
                                          time.time() - t0, m))
            rep.kept = "L0"
            return True
        why = ("forced on past L0" if g.should_evolve is False else "still uncertain with the context as memories")
        rep.levels.append(LevelResult("L0", "refused", why, time.time() - t0, m))
        return False

    def _level1(self, texts: list[str], rep: Report) -> bool:
        """L1 (ControlNet) for structured records: train, validate the valid-record rate, store or discard."""
        from .controlnet import ControlNetArgs, json_valid, keys_prompt, record_keys, train_controlnet
        c = self.cfg
        t0 = time.time()
        records = [t.strip() for t in texts]
        if any(record_keys(r) is None for r in records):
            rep.levels.append(LevelResult("L1", "skipped", "a ControlNet fits structured records (JSON objects); "
                                          "the context is free text"))
            return False
        if len(records) < 2:
            rep.levels.append(LevelResult("L1", "skipped", "needs at least 2 records (one held out)"))
            return False
        n_valid = max(1, int(round(len(records) * c.valid_fraction)))
        train_recs, valid_recs = records[:-n_valid], records[-n_valid:]
        max_len = json.loads(self.engine.config_json)["max_length"]
        need = max(len(self.engine.encode(keys_prompt(record_keys(r)) + " " + r)) for r in records) + 2
        length = min(max_len, need + 4)
        name = f"skill-{int(time.time() * 1000)}"
        out = self.skills_dir / f"{name}.controlnet.parquet"
        staged = self.skills_dir / f".{name}.controlnet.parquet.partial"
        previous = dict(self.engine.controlnets["active"])
        try:
            with tempfile.TemporaryDirectory() as tmp:
                r = train_controlnet(ControlNetArgs(
                    base=str(self.model_path.parent), control="records", out=str(staged), run=str(Path(tmp) / "run"),
                    records=train_recs, n_blocks=2, rank=c.controlnet_rank, lr=c.controlnet_lr,
                    steps=c.controlnet_steps, batch_size=c.lora_batch, warmup=min(20, max(1, c.controlnet_steps // 10)),
                    threads=c.threads, text_length=length, time_limit_min=c.controlnet_minutes,
                    time_limit_exports=True, init=c.controlnet_init, progress=False))
            rates = {}
            self.engine.load_controlnet(staged, name=name)
            try:
                for scale in (1.0, 0.0):
                    self.engine.set_controlnets({**previous, name: scale})
                    ok = 0
                    for rec in valid_recs:
                        keys = record_keys(rec)
                        p = keys_prompt(keys)
                        g = self.engine.diffuse(p, length=length, steps=length, temperature=0.0, seed=0, skills=False,
                                                control={name: p})
                        ok += json_valid(g.text[len(p):], keys)
                    rates[scale] = ok / len(valid_recs)
            finally:
                self.engine.unload_controlnet(name)
                self.engine.set_controlnets(previous)
            gain = rates[1.0] - rates[0.0]
            m = {"valid_rate_with": rates[1.0], "valid_rate_without": rates[0.0], "gain": gain, "steps": r["steps"],
                 "records_train": len(train_recs), "records_valid": len(valid_recs), "parameters": r["params"],
                 "train_s": round(time.time() - t0, 1)}
            if gain < c.structure_margin:
                rep.levels.append(LevelResult("L1", "refused", f"held-out valid-record rate rose by {gain:.2f} < "
                                              f"margin {c.structure_margin}", time.time() - t0, m))
                return False
            staged.replace(out)
        finally:
            staged.unlink(missing_ok=True)
        card_meta = {"skill": name, "level": "L1", "file": out.name, "base_fingerprint": self.fingerprint,
                     "control": "prompt", "metrics": m, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        # Cards hold the key lists: the prompts that ask for such a record.
        cards = list(dict.fromkeys(keys_prompt(record_keys(rec)) for rec in records))[:MAX_CARDS]
        ids = self.skills.add_many(cards, metas=[card_meta] * len(cards))
        rep.skill, rep.skill_id = name, ids[0]
        rep.levels.append(LevelResult("L1", "kept", f"valid records {rates[0.0]:.2f} -> {rates[1.0]:.2f} on held-out "
                                      "keys", time.time() - t0, m))
        rep.kept = "L1"
        return True

    def _train_level(self, level: str, texts: list[str], rep: Report) -> bool:
        """L2 (LoRA) or L3 (tensor patch): train on the context, validate, store as a skill or discard."""
        c = self.cfg
        t0 = time.time()
        docs = [t.strip() for t in texts]
        n_valid = max(1, int(round(len(docs) * c.valid_fraction)))
        if len(docs) < 2:
            rep.levels.append(LevelResult(level, "skipped", "needs at least 2 context texts (one held out)"))
            return False
        train_docs, valid_docs = docs[:-n_valid], docs[-n_valid:]
        name = f"skill-{int(time.time() * 1000)}"
        suffix = ".lora.parquet" if level == "L2" else ".patch.parquet"
        out = self.skills_dir / f"{name}{suffix}"
        staged = self.skills_dir / f".{name}{suffix}.partial"
        try:
            with tempfile.TemporaryDirectory() as tmp:
                tr, va = Path(tmp) / "train.jsonl", Path(tmp) / "valid.jsonl"
                tr.write_text("".join(json.dumps({"text": d}) + "\n" for d in train_docs))
                va.write_text("".join(json.dumps({"text": d}) + "\n" for d in valid_docs))
                if level == "L2":
                    from .lora import LoraTrainArgs, train_lora
                    r = train_lora(LoraTrainArgs(
                        base=str(self.model_path.parent), data=str(tr), valid_data=str(va), out=str(staged),
                        rank=c.lora_rank, lr=c.lora_lr, steps=c.lora_steps, batch_size=c.lora_batch,
                        warmup=min(20, max(1, c.lora_steps // 10)), threads=c.threads, time_limit_min=c.lora_minutes,
                        eval_n_t=c.eval_n_t, progress=False))
                    general = self._general_change(r["peft_model"])
                else:
                    from .selective import PatchTrainArgs, train_patch
                    r = train_patch(PatchTrainArgs(
                        base=str(self.model_path.parent), data=str(tr), valid_data=str(va), out=str(staged),
                        top_k=c.patch_top_k, lr=c.patch_lr, steps=c.patch_steps, batch_size=c.lora_batch,
                        warmup=min(20, max(1, c.patch_steps // 10)), threads=c.threads,
                        time_limit_min=c.patch_minutes, eval_n_t=c.eval_n_t, progress=False))
                    general = self._general_change(r["model"], base=True)
            ctx_gain = (r["val_nats_before"] - r["val_nats_after"]) if r["val_nats_before"] is not None else None
            m = {"context_nats_before": r["val_nats_before"], "context_nats_after": r["val_nats_after"],
                 "context_gain": ctx_gain, **general, "steps": r["steps"], "train_s": round(r["train_s"], 1)}
            if level == "L3":
                m["modules"] = r["modules"]
            ok_ctx = ctx_gain is not None and ctx_gain >= c.improve_margin
            ok_gen = general["general_change"] <= c.general_bound
            if not (ok_ctx and ok_gen):
                why = []
                if not ok_ctx:
                    why.append(f"context loss improved by {ctx_gain:.4f} < margin {c.improve_margin}")
                if not ok_gen:
                    why.append(f"general loss rose by {general['general_change']:.4f} > bound {c.general_bound}")
                rep.levels.append(LevelResult(level, "refused", "; ".join(why), time.time() - t0, m))
                return False
            staged.replace(out)  # atomic: the final name only ever holds a whole, validated file
        finally:
            staged.unlink(missing_ok=True)
        card_meta = {"skill": name, "level": level, "file": out.name, "base_fingerprint": self.fingerprint,
                     "metrics": m, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        # One card per context document (MiniLM reads 256 tokens): a prompt matches the skill when it is close to
        # any of the texts the skill was trained on. The cards go in last: until then nothing can find the file.
        ids = self.skills.add_many([d[:1000] for d in docs[:MAX_CARDS]], metas=[card_meta] * min(len(docs), MAX_CARDS))
        rep.skill, rep.skill_id = name, ids[0]
        rep.levels.append(LevelResult(level, "kept", f"context loss -{ctx_gain:.4f} nats/token, general "
                                      f"{general['general_change']:+.4f}", time.time() - t0, m))
        rep.kept = level
        return True

    def _general_change(self, model, base: bool = False) -> dict:
        """General held-out loss with the adaptation minus without it (same windows, t-samples and seeds).
        `model` is a peft model (its adapter disabled for the baseline) or, with `base`, a patched model (the
        baseline is the base reloaded from its file)."""
        from .evaluate import diffusion_nelbo
        from .tokenizer import load_tokenizer
        from .windows import windows_from_jsonl
        cfg = self.cfg
        if not self.general_data.exists():
            raise FileNotFoundError(f"{self.general_data}: general held-out text for the degradation bound "
                                    "(build it with `just data`, or pass general_data=)")
        tok = load_tokenizer(self.model_path.parent / "tokenizer.json")
        mask = self.engine.mask_token_id
        length = json.loads(self.engine.config_json)["max_length"]
        w = windows_from_jsonl(self.general_data, tok, length)[: cfg.general_windows]
        model.eval()
        with_ad = diffusion_nelbo(model, w, mask, n_t=cfg.eval_n_t, seed=0, progress=False)["nats_per_token"]
        if base:
            from .export import load_model
            ref = load_model(self.model_path)[0]
            without = diffusion_nelbo(ref, w, mask, n_t=cfg.eval_n_t, seed=0, progress=False)["nats_per_token"]
        else:
            with model.disable_adapter():
                without = diffusion_nelbo(model, w, mask, n_t=cfg.eval_n_t, seed=0, progress=False)["nats_per_token"]
        return {"general_nats_base": without, "general_nats_adapter": with_ad, "general_change": with_ad - without}

    # ------------------------------------------------------------------ reuse
    def generate(self, prompt: str, **kw):
        """`engine.diffuse(prompt, **kw)`: the engine activates the matching skills (g.skills, g.adapters, g.patch)."""
        return self.engine.diffuse(prompt, **kw)

    def close(self) -> None:
        """Detaches the skills store from the engine and releases it (one writer per store: another Evolver can
        open it afterwards)."""
        self.engine.set_skills(None)
        self.skills.close()


__all__ = ["EvolveConfig", "Evolver", "LevelResult", "Report"]
