"""The evolution loop end to end on a tiny model: trigger -> L0 (memories) -> L1 (skipped) -> L2 (LoRA) or L3
(tensor patch) -> validate -> store a skill -> the engine reuses it for a similar prompt and not for an unrelated
one; a failed validation stores nothing and leaves the engine as it was; bad skill cards are skipped with a
warning; a process killed while storing never leaves a skill that points at a half-written file."""

import json
import subprocess
import sys
import textwrap

import pytest

import _train_path  # noqa: F401
import aios_rt
from aios_rt import MemoryStore, default_embedder_path
from aios_train.evolution import EvolveConfig, Evolver
from _tiny_tokenizer import train_tiny_tokenizer

pytestmark = pytest.mark.skipif(default_embedder_path() is None, reason="all-MiniLM-L6-v2 not installed")

GENERAL = [f"The old house stood on the hill above the village number {i}, and the river ran past it." for i in range(40)]
DOMAIN = [f"Quartz zebra kettle {i}: the quartz zebra kettle hums, the zebra kettle sings quartz songs." for i in range(12)]
CFG = dict(vocab_size=300, hidden_size=64, n_layers=2, n_heads=4, cond_dim=32, max_length=64, mask_token_id=3)


@pytest.fixture()
def setup(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    tok = train_tiny_tokenizer(model / "tokenizer.json", GENERAL + DOMAIN, vocab_size=300)
    cfg_model = dict(CFG, vocab_size=tok.get_vocab_size())
    aios_rt.write_random_model(model / "model.f32.parquet", json.dumps(cfg_model), 0, "f32")
    # A threshold no generation stays under: every prompt triggers the loop.
    (model / "uncertainty.json").write_text(json.dumps(
        {"components": {"entropy": {"mean": 0.0, "std": 1.0, "weight": 1.0}}, "threshold": -1e9}))
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": t}) + "\n" for t in GENERAL))
    mem = MemoryStore(tmp_path / "memory")
    eng = aios_rt.Engine(model, threads=1, memory=mem)
    cfg = EvolveConfig(lora_steps=60, lora_lr=5e-3, lora_batch=8, general_windows=16, eval_n_t=4, gen_length=24,
                       gen_steps=8, general_bound=1.0, activate_threshold=0.5)
    return eng, mem, tmp_path, general, cfg


def test_trigger_adapt_validate_store_reuse(setup):
    eng, mem, tmp, general, cfg = setup
    ev = Evolver(engine=eng, memory=mem, skills=tmp / "skills", general_data=general, config=cfg)
    rep = ev.step("Quartz zebra kettle", DOMAIN)
    assert rep.should_evolve is True
    assert [(lv.level, lv.outcome) for lv in rep.levels] == [("L0", "refused"), ("L1", "skipped"), ("L2", "kept")]
    assert len(mem) == len(DOMAIN)  # L0 wrote the context into the memory store
    l2 = rep.levels[-1].metrics
    assert l2["context_gain"] >= cfg.improve_margin and l2["general_change"] <= cfg.general_bound
    assert rep.kept == "L2" and rep.skill and rep.skill_id is not None
    card = ev.skills.get(rep.skill_id)
    assert card.meta["level"] == "L2" and card.meta["base_fingerprint"] == eng.fingerprint
    assert card.meta["skill"] == rep.skill and len(ev.skills) == len(DOMAIN)  # a card per context document
    assert (tmp / "skills" / card.meta["file"]).is_file()
    # Reuse, in the engine: a similar prompt activates the skill's adapter for that generation only, an unrelated
    # one does not, and the engine's own active set is untouched.
    g = eng.diffuse("the quartz zebra kettle sings", length=48, steps=4)
    assert g.adapters == {rep.skill: 1.0} and g.skills == [rep.skill] and g.warnings == [] and g.patch is None
    assert eng.active_adapters == {}
    g = ev.generate("Grandma's lemon cake needs three eggs", length=48, steps=4)
    assert g.adapters == {} and g.skills == []
    # The adapter is what changes the output: the same call without skills differs, with skills=False equals it.
    a = eng.diffuse("the quartz zebra kettle sings", length=48, steps=4, seed=1)
    b = eng.diffuse("the quartz zebra kettle sings", length=48, steps=4, seed=1, skills=False)
    c = eng.diffuse("the quartz zebra kettle sings", length=48, steps=4, seed=1, skills=False,
                    adapters={rep.skill: 1.0})
    assert b.adapters == {} and c.adapters == {rep.skill: 1.0} and a.tokens == c.tokens
    # One engine serves concurrent callers: skill activation is per generation, so threads with and without a
    # matching skill get what they get alone.
    from concurrent.futures import ThreadPoolExecutor
    prompts = ["the quartz zebra kettle sings", "Grandma's lemon cake needs three eggs"] * 3
    alone = [eng.diffuse(p, length=48, steps=4, seed=i).tokens for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda ip: eng.diffuse(ip[1], length=48, steps=4, seed=ip[0]).tokens,
                                 enumerate(prompts)))
    assert together == alone
    # A later session: a new engine over the same skills folder finds it too.
    ev.close()
    assert not eng.has_skills
    skills = MemoryStore(tmp / "skills" / "cards")
    eng2 = aios_rt.Engine(eng.info["path"], threads=1, skills=skills, skill_threshold=0.5)
    assert eng2.skills_for("quartz zebra kettle")["adapters"] == {rep.skill: 1.0}
    assert eng2.skills_for("Grandma's lemon cake")["skills"] == []


def test_escalates_to_a_tensor_patch(setup):
    eng, mem, tmp, general, cfg = setup
    cfg.lora_steps = 0  # L2 cannot improve anything: the loop must go on to L3
    cfg.patch_steps, cfg.patch_top_k, cfg.patch_lr = 60, 2, 3e-3
    ev = Evolver(engine=eng, memory=mem, skills=tmp / "skills", general_data=general, config=cfg)
    rep = ev.step("Quartz zebra kettle", DOMAIN)
    assert [(lv.level, lv.outcome) for lv in rep.levels] == [("L0", "refused"), ("L1", "skipped"), ("L2", "refused"),
                                                             ("L3", "kept")]
    l3 = rep.levels[-1].metrics
    assert l3["context_gain"] >= cfg.improve_margin and len(l3["modules"]) == 2
    card = ev.skills.get(rep.skill_id)
    assert card.meta["level"] == "L3" and card.meta["file"].endswith(".patch.parquet")
    assert not list((tmp / "skills").glob("*.lora.parquet"))  # the refused adapter was deleted
    g = eng.diffuse("the quartz zebra kettle sings", length=48, steps=4)
    assert g.patch == rep.skill and g.skills == [rep.skill] and g.adapters == {}
    assert eng.active_patch is None  # activated for that call only
    assert eng.diffuse("Grandma's lemon cake needs three eggs", length=48, steps=4).patch is None
    # Only the chosen modules' tensors are in the patch.
    from aios_train.selective import read_patch
    tensors, pcfg = read_patch(tmp / "skills" / card.meta["file"])
    assert {n.rsplit(".", 1)[0] for n in tensors} == set(l3["modules"]) == set(pcfg["modules"])
    ev.close()


def test_failed_validation_keeps_nothing(setup):
    eng, mem, tmp, general, cfg = setup
    cfg.improve_margin = 100.0  # unreachable
    ev = Evolver(engine=eng, memory=mem, skills=tmp / "skills", general_data=general, config=cfg)
    before = (eng.loaded_adapters, eng.active_adapters)
    cfg.patch_steps = 5
    rep = ev.step("Quartz zebra kettle", DOMAIN)
    assert [(lv.level, lv.outcome) for lv in rep.levels][-2:] == [("L2", "refused"), ("L3", "refused")]
    assert rep.kept is None and all("margin" in lv.reason for lv in rep.levels[-2:])
    assert len(ev.skills) == 0 and not [p for p in (tmp / "skills").iterdir() if p.name != "cards"]
    assert (eng.loaded_adapters, eng.active_adapters, eng.loaded_patches) == before + ([],)


def test_confident_engine_does_nothing_and_bad_cards_are_skipped(setup):
    eng, mem, tmp, general, cfg = setup
    (tmp / "model" / "uncertainty.json").write_text(json.dumps(
        {"components": {"entropy": {"mean": 0.0, "std": 1.0, "weight": 1.0}}, "threshold": 1e9}))
    calm = aios_rt.Engine(tmp / "model", threads=1, memory=mem)
    ev = Evolver(engine=calm, memory=mem, skills=tmp / "skills", general_data=general, config=cfg)
    rep = ev.step("Quartz zebra kettle", DOMAIN)
    assert rep.should_evolve is False and [lv.outcome for lv in rep.levels] == ["skipped"] and len(mem) == 0
    with pytest.raises(ValueError):
        ev.step("x", [])
    ev.skills.add("quartz zebra kettle songs", meta={"level": "L2", "file": "gone.lora.parquet",
                                                     "base_fingerprint": calm.fingerprint})
    ev.skills.add("quartz zebra kettle hums", meta={"level": "L2", "file": "x.lora.parquet",
                                                    "base_fingerprint": "0000000000000000"})
    (tmp / "skills" / "broken.lora.parquet").write_bytes(b"PAR1 not really")
    ev.skills.add("quartz zebra kettle sings", meta={"level": "L2", "file": "broken.lora.parquet",
                                                     "base_fingerprint": calm.fingerprint})
    ev.skills.add("quartz zebra kettle whistles", meta={"level": "L2", "file": "../model/model.f32.parquet",
                                                        "base_fingerprint": calm.fingerprint})
    m = calm.skills_for("quartz zebra kettle")
    assert m["skills"] == [] and m["adapters"] == {} and m["patch"] is None
    text = " | ".join(m["warnings"])
    assert "gone.lora.parquet" in text and "made for base 0000000000000000" in text and "broken.lora.parquet" in text
    assert "not a name in the skills folder" in text
    assert len(m["warnings"]) == 4
    g = calm.diffuse("quartz zebra kettle", length=48, steps=4)  # a bad card never stops a generation
    assert g.skills == [] and len(g.warnings) == 4
    with pytest.raises(ValueError, match="unknown evolution levels"):
        Evolver(engine=calm, memory=mem, skills=tmp / "skills2", general_data=general,
                config=EvolveConfig(levels=("L0", "L9")))


KILL = textwrap.dedent("""
    import json, os, signal, sys
    sys.path[:0] = [sys.argv[1]]
    import _train_path  # noqa: F401
    import aios_rt
    from aios_train import evolution, export
    from aios_train.evolution import EvolveConfig, Evolver
    where, tmp = sys.argv[2], sys.argv[3]
    if where == "writing":      # killed halfway through writing the adapter file
        real = export.pq.write_table
        def half(table, path, **kw):
            real(table.slice(0, max(1, table.num_rows // 2)), path, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
        export.pq.write_table = half
    else:                       # killed after the file is in place, before its skill cards are stored
        real_add = aios_rt.MemoryStore.add_many
        def add_many(self, texts, *a, **kw):
            if kw.get("metas") and kw["metas"][0].get("level"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_add(self, texts, *a, **kw)
        aios_rt.MemoryStore.add_many = add_many
    mem = aios_rt.MemoryStore(tmp + "/memory")
    eng = aios_rt.Engine(tmp + "/model", threads=1, memory=mem)
    cfg = EvolveConfig(**json.loads(sys.argv[4]))
    Evolver(engine=eng, memory=mem, skills=tmp + "/skills", general_data=tmp + "/general.jsonl", config=cfg).step(
        "Quartz zebra kettle", json.loads(sys.argv[5]))
    print("not killed")
""")


@pytest.mark.parametrize("where", ["writing", "storing"])
def test_sigkill_while_storing_never_activates_a_half_written_skill(setup, where):
    eng, mem, tmp, general, cfg = setup
    mem.close()
    here = str(__import__("pathlib").Path(__file__).parent)
    cfg_json = json.dumps({k: getattr(cfg, k) for k in ("lora_steps", "lora_lr", "lora_batch", "general_windows",
                                                          "eval_n_t", "gen_length", "gen_steps", "general_bound")}
                          | {"levels": ["L2"]})
    r = subprocess.run([sys.executable, "-c", KILL, here, where, str(tmp), cfg_json, json.dumps(DOMAIN)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, r.stdout + r.stderr  # SIGKILL
    files = sorted(p.name for p in (tmp / "skills").iterdir() if p.name != "cards")
    if where == "writing":
        # Only the staged file, under a name nothing looks for.
        assert files and not any(f.endswith((".lora.parquet", ".patch.parquet")) for f in files), files
    else:
        assert len(files) == 1 and files[0].endswith(".lora.parquet"), files  # whole file, no card yet
    skills = MemoryStore(tmp / "skills" / "cards")
    assert len(skills) == 0
    fresh = aios_rt.Engine(tmp / "model", threads=1, skills=skills)
    m = fresh.skills_for("quartz zebra kettle")
    assert m["skills"] == [] and m["warnings"] == []
    # The next Evolver on the folder clears what a killed one staged.
    skills.close()
    Evolver(engine=fresh, memory=MemoryStore(tmp / "memory"), skills=tmp / "skills", general_data=general,
            config=cfg).close()
    assert not [p for p in (tmp / "skills").iterdir() if ".partial" in p.name]


RECORDS = [json.dumps({"name": n, "age": 20 + i}) for i, n in enumerate(["Anna", "Ben", "Clara", "David", "Emma",
                                                                            "Felix", "Grace", "Henry"])]


def test_structured_records_take_level_one_and_the_engine_reuses_the_controlnet(setup):
    eng, mem, tmp, general, cfg = setup
    cfg.controlnet_steps, cfg.controlnet_rank = 30, 4
    cfg.structure_margin = -1.0  # the wiring is under test here; bench/evolution_loop.py --records measures learning
    ev = Evolver(engine=eng, memory=mem, skills=tmp / "skills", general_data=general, config=cfg)
    rep = ev.step("name, age", RECORDS)
    assert [(lv.level, lv.outcome) for lv in rep.levels] == [("L0", "refused"), ("L1", "kept")]
    m = rep.levels[-1].metrics
    assert set(m) >= {"valid_rate_with", "valid_rate_without", "gain", "steps", "parameters"} and m["steps"] == 30
    card = ev.skills.get(rep.skill_id)
    assert card.meta["level"] == "L1" and card.meta["file"].endswith(".controlnet.parquet")
    assert card.text == "name, age" and len(ev.skills) == 1  # one card per distinct key list
    assert eng.controlnets == {"active": {}, "loaded": {}}  # validation left the engine as it was
    # Reuse: a matching prompt activates the ControlNet for that generation, with the prompt as its input.
    assert eng.skills_for("name, age")["controlnets"] == [rep.skill]
    assert eng.skills_for("Grandma's lemon cake needs three eggs")["controlnets"] == []
    a = eng.diffuse("name, age", length=40, steps=8, seed=0)
    b = eng.diffuse("name, age", length=40, steps=8, seed=0, skills=False)
    assert a.skills == [rep.skill] and b.skills == [] and a.tokens != b.tokens
    assert eng.controlnets["active"] == {}  # activated for that call only
    ev.close()


def test_level_one_refused_and_free_text_skips_it(setup):
    eng, mem, tmp, general, cfg = setup
    cfg.controlnet_steps, cfg.controlnet_rank, cfg.structure_margin = 5, 2, 2.0  # unreachable
    cfg.levels = ("L0", "L1")
    ev = Evolver(engine=eng, memory=mem, skills=tmp / "skills", general_data=general, config=cfg)
    rep = ev.step("name, age", RECORDS)
    assert [(lv.level, lv.outcome) for lv in rep.levels] == [("L0", "refused"), ("L1", "refused"),
                                                             ("L2", "skipped"), ("L3", "skipped")]
    assert rep.kept is None and len(ev.skills) == 0
    assert not [p for p in (tmp / "skills").iterdir() if p.name != "cards"]
    rep = ev.step("Quartz zebra kettle", DOMAIN)
    l1 = next(lv for lv in rep.levels if lv.level == "L1")
    assert l1.outcome == "skipped" and "free text" in l1.reason
    ev.close()
