"""The self-evolution loop: when the runtime says it does not know, adapt from the cheapest level up, check that
the adaptation helped, keep it as a skill, and reuse it for similar prompts later.

    ev = Evolver(engine=eng, memory=mem, skills="~/.aios/skills")
    report = ev.step(prompt, context_texts)     # uncertain? -> L0 -> (L1) -> L2 -> validate -> store or discard
    g = ev.generate(prompt, length=64)          # activates the matching skills' adapters (g.adapters)

Levels, cheapest first:
- L0, no training: the context goes into the memory store and the prompt is generated again with memory
  conditioning (`memory_k`) and memory guidance. Kept when that generation is no longer uncertain.
- L1, ControlNet: not available yet (arrives with the ControlNet work); reported as skipped.
- L2, LoRA: `aios_train.lora.train_lora` on the context texts (bounded by `lora_steps` / `lora_minutes`). Kept only
  if the held-out part of the context improves by at least `improve_margin` nats/token and general held-out text
  (the corpus's validation windows) degrades by at most `general_bound` nats/token, both measured on the PyTorch
  reference with and without the adapter on the same windows, t-samples and seeds. A kept adapter is written to
  the skills folder with a skill card in the skills store (a MemoryStore whose text is the context, meta: level,
  metrics, file, base fingerprint); a refused one is deleted and the engine is left as it was.
- L3, selective fine-tuning with a tensor patch: not available yet; reported as skipped.

Reuse: `adapters_for(prompt)` searches the skill cards with the prompt and returns every skill whose card scores
at least `activate_threshold` (MiniLM cosine), fits this base (fingerprint) and whose adapter file loads;
`generate` activates exactly those for one generation. Cards for another base or with a missing or corrupt file
are skipped and listed in `warnings`.
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
        self.skills_dir = Path(skills).expanduser()
        self.skills_dir.mkdir(parents=True, exist_ok=True)
        self.skills = aios_rt.MemoryStore(self.skills_dir / "cards")
        self.model_path = Path(engine.info["path"])
        self.fingerprint = engine.fingerprint
        self.general_data = Path(general_data)
        self.warnings: list[str] = []

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
        if self._level0(prompt, context_texts, rep):
            return rep
        rep.levels.append(LevelResult("L1", "skipped", "ControlNet adaptation is not available yet"))
        if self._level2(context_texts, rep):
            return rep
        rep.levels.append(LevelResult("L3", "skipped", "selective fine-tuning (tensor patches) is not available yet"))
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

    def _level2(self, texts: list[str], rep: Report) -> bool:
        from .lora import LoraTrainArgs, train_lora
        c = self.cfg
        t0 = time.time()
        docs = [t.strip() for t in texts]
        n_valid = max(1, int(round(len(docs) * c.valid_fraction)))
        if len(docs) < 2:
            rep.levels.append(LevelResult("L2", "skipped", "needs at least 2 context texts (one held out)"))
            return False
        train_docs, valid_docs = docs[:-n_valid], docs[-n_valid:]
        name = f"skill-{int(time.time() * 1000)}"
        out = self.skills_dir / f"{name}.lora.parquet"
        with tempfile.TemporaryDirectory() as tmp:
            tr, va = Path(tmp) / "train.jsonl", Path(tmp) / "valid.jsonl"
            tr.write_text("".join(json.dumps({"text": d}) + "\n" for d in train_docs))
            va.write_text("".join(json.dumps({"text": d}) + "\n" for d in valid_docs))
            r = train_lora(LoraTrainArgs(base=str(self.model_path.parent), data=str(tr), valid_data=str(va),
                                         out=str(out), rank=c.lora_rank, lr=c.lora_lr, steps=c.lora_steps,
                                         batch_size=c.lora_batch, warmup=min(20, max(1, c.lora_steps // 10)),
                                         threads=c.threads, time_limit_min=c.lora_minutes, eval_n_t=c.eval_n_t,
                                         progress=False))
        general = self._general_change(r["peft_model"])
        ctx_gain = (r["val_nats_before"] - r["val_nats_after"]) if r["val_nats_before"] is not None else None
        m = {"context_nats_before": r["val_nats_before"], "context_nats_after": r["val_nats_after"],
             "context_gain": ctx_gain, **general, "lora_steps": r["steps"], "train_s": round(r["train_s"], 1)}
        ok_ctx = ctx_gain is not None and ctx_gain >= c.improve_margin
        ok_gen = general["general_change"] <= c.general_bound
        if not (ok_ctx and ok_gen):
            out.unlink(missing_ok=True)
            why = []
            if not ok_ctx:
                why.append(f"context loss improved by {ctx_gain:.4f} < margin {c.improve_margin}")
            if not ok_gen:
                why.append(f"general loss rose by {general['general_change']:.4f} > bound {c.general_bound}")
            rep.levels.append(LevelResult("L2", "refused", "; ".join(why), time.time() - t0, m))
            return False
        card_meta = {"skill": name, "level": "L2", "file": out.name, "base_fingerprint": self.fingerprint,
                     "metrics": m, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        # One card per context document (MiniLM reads 256 tokens): a prompt matches the skill when it is close to
        # any of the texts the skill was trained on.
        ids = self.skills.add_many([d[:1000] for d in docs[:MAX_CARDS]], metas=[card_meta] * min(len(docs), MAX_CARDS))
        rep.skill, rep.skill_id = name, ids[0]
        rep.levels.append(LevelResult("L2", "kept", f"context loss -{ctx_gain:.4f} nats/token, general "
                                      f"{general['general_change']:+.4f}", time.time() - t0, m))
        rep.kept = "L2"
        return True

    def _general_change(self, peft_model) -> dict:
        """General held-out loss with the adapter minus without it (same windows, t-samples and seeds)."""
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
        peft_model.eval()
        with_ad = diffusion_nelbo(peft_model, w, mask, n_t=cfg.eval_n_t, seed=0, progress=False)["nats_per_token"]
        with peft_model.disable_adapter():
            base = diffusion_nelbo(peft_model, w, mask, n_t=cfg.eval_n_t, seed=0, progress=False)["nats_per_token"]
        return {"general_nats_base": base, "general_nats_adapter": with_ad, "general_change": with_ad - base}

    # ------------------------------------------------------------------ reuse
    def adapters_for(self, prompt: str) -> dict[str, float]:
        """name -> weight of the stored skills that fit `prompt` (loaded into the engine on first use)."""
        if len(self.skills) == 0:
            return {}
        out: dict[str, float] = {}
        for hit in self.skills.search(prompt, k=16):
            if hit.score < self.cfg.activate_threshold:
                continue
            meta = hit.meta or {}
            name = str(meta.get("skill", f"skill{hit.id}"))
            if name in out:
                continue
            if meta.get("base_fingerprint") != self.fingerprint:
                self._warn(f"skill {name}: made for base {meta.get('base_fingerprint')}, this is {self.fingerprint}")
                continue
            if name not in self.engine.loaded_adapters:
                try:
                    self.engine.load_adapter(self.skills_dir / str(meta.get("file")), name=name, weight=None)
                except Exception as e:  # a missing or corrupt adapter file: skip the skill, keep going
                    self._warn(f"skill {name}: adapter {meta.get('file')!r} cannot be loaded: {e}")
                    continue
            out[name] = 1.0
        return out

    def generate(self, prompt: str, **kw):
        """`engine.diffuse(prompt, **kw)` with exactly the matching skills' adapters active (g.adapters)."""
        self.engine.set_adapters(self.adapters_for(prompt))
        return self.engine.diffuse(prompt, **kw)

    def close(self) -> None:
        """Releases the skills store (one writer per store: another Evolver can open it afterwards)."""
        self.skills.close()

    def _warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)


__all__ = ["EvolveConfig", "Evolver", "LevelResult", "Report"]
