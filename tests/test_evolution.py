"""The evolution loop end to end on a tiny model: trigger -> L0 (memories) -> L1 (skipped) -> L2 (LoRA) ->
validate -> store a skill -> reuse it for a similar prompt and not for an unrelated one; a failed validation
stores nothing and leaves the engine as it was; bad skill cards are skipped with a warning."""

import json

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
    # Reuse: a similar prompt activates the skill's adapter, an unrelated one does not.
    g = ev.generate("the quartz zebra kettle sings", length=48, steps=4)
    assert g.adapters == {rep.skill: 1.0}
    g = ev.generate("Grandma's lemon cake needs three eggs", length=48, steps=4)
    assert g.adapters == {}
    # A new Evolver over the same skills folder (a later session) finds it too.
    ev.close()
    ev2 = Evolver(engine=aios_rt.Engine(eng.info["path"], threads=1, memory=mem), memory=mem, skills=tmp / "skills",
                  general_data=general, config=cfg)
    assert ev2.adapters_for("quartz zebra kettle") == {rep.skill: 1.0}


def test_failed_validation_keeps_nothing(setup):
    eng, mem, tmp, general, cfg = setup
    cfg.improve_margin = 100.0  # unreachable
    ev = Evolver(engine=eng, memory=mem, skills=tmp / "skills", general_data=general, config=cfg)
    before = (eng.loaded_adapters, eng.active_adapters)
    rep = ev.step("Quartz zebra kettle", DOMAIN)
    assert rep.levels[-1].level == "L3" and rep.kept is None
    l2 = next(lv for lv in rep.levels if lv.level == "L2")
    assert l2.outcome == "refused" and "margin" in l2.reason
    assert len(ev.skills) == 0 and not list((tmp / "skills").glob("*.lora.parquet"))
    assert (eng.loaded_adapters, eng.active_adapters) == before


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
    assert ev.adapters_for("quartz zebra kettle") == {}
    text = " | ".join(ev.warnings)
    assert "gone.lora.parquet" in text and "made for base 0000000000000000" in text and "broken.lora.parquet" in text
    assert len(ev.warnings) == 3
