//! What a generation runs with besides the base weights: LoRA adapters (a
//! weighted active set), tensor patches (one active at a time), fusing, and
//! skills (adapters and patches the evolution loop kept, activated per
//! generation when the prompt matches their skill cards).
//!
//! Every change builds a new immutable [`Runtime`] and swaps it in, so
//! running generations keep the one they started with.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::{Engine, Runtime};
use crate::adapter::{ActiveLora, ControlKind, ControlNet, LoraAdapter, TensorPatch};
use crate::error::{Error, Result};
use crate::format::WeightFile;
use crate::memory::store::Query;
use crate::memory::{MemoryStore, Precision};
use crate::model::Dit;

/// Skill cards searched per generation (a skill has one card per context
/// document, so several hits may name one skill).
const SKILL_SEARCH_K: usize = 16;

/// Loaded adapters and patches, and which of them are active.
pub(super) struct Adapters {
    loaded: BTreeMap<String, Arc<LoraAdapter>>,
    active: BTreeMap<String, f32>,
    /// The model as loaded from its file.
    base: Arc<Dit>,
    /// Loaded patches: name -> the base with that patch applied.
    patches: BTreeMap<String, Arc<Dit>>,
    active_patch: Option<String>,
    /// While fused: the model with the active adapters merged in
    /// (`unfuse` drops it, which restores the exact weights).
    fused: Option<Arc<Dit>>,
    /// Loaded ControlNets and the scales of the active ones.
    controlnets: BTreeMap<String, Arc<ControlNet>>,
    active_controls: BTreeMap<String, f32>,
}

impl Adapters {
    pub(super) fn new(base: Arc<Dit>) -> Self {
        Adapters {
            loaded: BTreeMap::new(),
            active: BTreeMap::new(),
            base,
            patches: BTreeMap::new(),
            active_patch: None,
            fused: None,
            controlnets: BTreeMap::new(),
            active_controls: BTreeMap::new(),
        }
    }

    /// The active ControlNets with their scales (0 = accepts an input, applies nothing).
    fn controls(&self) -> Vec<(String, Arc<ControlNet>, f32)> {
        self.active_controls
            .iter()
            .filter_map(|(n, &s)| self.controlnets.get(n).map(|c| (n.clone(), c.clone(), s)))
            .collect()
    }

    fn refuse_if_fused(&self) -> Result<()> {
        if self.fused.is_some() {
            return crate::input_err!("adapters are fused into the weights; call unfuse() before changing them");
        }
        Ok(())
    }

    fn check_loaded(&self, weights: &BTreeMap<String, f32>) -> Result<()> {
        for (name, &w) in weights {
            if !self.loaded.contains_key(name) {
                return crate::input_err!("no adapter named {name:?} is loaded (loaded: {:?})", self.loaded.keys());
            }
            check_weight(name, w)?;
        }
        Ok(())
    }

    /// The runtime for adapter weights `weights` on patch `patch` (unfused).
    fn runtime(&self, weights: &BTreeMap<String, f32>, patch: Option<&str>) -> Result<Runtime> {
        let mut set = vec![];
        for (n, &w) in weights.iter().filter(|(_, &w)| w != 0.0) {
            let Some(ad) = self.loaded.get(n) else {
                return crate::input_err!("adapter {n:?} was unloaded meanwhile");
            };
            set.push((n.clone(), ad.clone(), w));
        }
        let model = match patch {
            Some(p) => match self.patches.get(p) {
                Some(m) => m.clone(),
                None => return crate::input_err!("patch {p:?} was unloaded meanwhile"),
            },
            None => self.base.clone(),
        };
        Ok(Runtime {
            model,
            lora: Arc::new(ActiveLora::build(&set)?),
            patch: patch.map(str::to_string),
            controls: self.controls(),
        })
    }
}

/// What [`Engine::controlnets`] reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ControlNets {
    /// Name and scale of each active ControlNet (0 = loaded, not applied).
    pub active: Vec<(String, f32)>,
    /// Every loaded ControlNet and what it reads.
    pub loaded: Vec<(String, ControlKind)>,
}

/// The skill cards an engine consults on every text generation.
pub(super) struct Skills {
    store: Arc<MemoryStore>,
    threshold: f32,
}

/// What a skill card's metadata says (written by `aios_train.evolution`).
#[derive(Deserialize)]
struct SkillCard {
    /// The skill's name (its adapter or patch name in the engine); cards
    /// without one are named after their id.
    #[serde(default)]
    skill: Option<String>,
    level: String,
    file: String,
    base_fingerprint: String,
}

/// The skills that matched one prompt.
#[derive(Clone, Debug, Default)]
pub struct SkillMatch {
    /// Adapter skills (level L2): name -> weight 1.
    pub adapters: BTreeMap<String, f32>,
    /// The best-scoring patch skill (level L3), if any.
    pub patch: Option<String>,
    /// ControlNet skills (level L1): applied at scale 1 with the prompt as their input.
    pub controlnets: Vec<String>,
    pub names: Vec<String>,
    /// Cards skipped and why (another base, a missing or corrupt file).
    pub warnings: Vec<String>,
}

impl Engine {
    pub(super) fn lock_adapters(&self) -> std::sync::MutexGuard<'_, Adapters> {
        self.adapters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads a LoRA file under `name` (checked against this model; on any
    /// error nothing changes). With `weight`, it is also activated.
    pub fn load_adapter(&self, path: impl AsRef<Path>, name: &str, weight: Option<f32>) -> Result<()> {
        if name.is_empty() {
            return crate::input_err!("adapter name must not be empty");
        }
        check_weight(name, weight.unwrap_or(1.0))?;
        let adapter = LoraAdapter::load(path, &self.config, self.fingerprint.as_deref())?;
        let mut a = self.lock_adapters();
        a.refuse_if_fused()?;
        if a.loaded.contains_key(name) {
            return crate::input_err!("an adapter named {name:?} is already loaded; unload it first");
        }
        a.loaded.insert(name.to_string(), Arc::new(adapter));
        if let Some(w) = weight {
            a.active.insert(name.to_string(), w);
        }
        self.publish(&a)
    }

    pub fn unload_adapter(&self, name: &str) -> Result<()> {
        let mut a = self.lock_adapters();
        a.refuse_if_fused()?;
        if a.loaded.remove(name).is_none() {
            return crate::input_err!("no adapter named {name:?} is loaded (loaded: {:?})", a.loaded.keys());
        }
        a.active.remove(name);
        self.publish(&a)
    }

    /// Replaces the active set: `y = W x + sum_i w_i s_i B_i A_i x`.
    pub fn set_adapters(&self, weights: &BTreeMap<String, f32>) -> Result<()> {
        let mut a = self.lock_adapters();
        a.refuse_if_fused()?;
        a.check_loaded(weights)?;
        a.active = weights.clone();
        self.publish(&a)
    }

    /// `(name, weight)` of the active adapters, and every loaded name.
    pub fn adapters(&self) -> (Vec<(String, f32)>, Vec<String>) {
        let a = self.lock_adapters();
        (a.active.iter().map(|(n, w)| (n.clone(), *w)).collect(), a.loaded.keys().cloned().collect())
    }

    /// Loads a tensor patch under `name`: the base file is read again with
    /// the patch's tensors in place of its own (checked against this model;
    /// on any error nothing changes). With `activate`, later generations run
    /// on it. Costs one more copy of the model in memory per loaded patch.
    pub fn load_patch(&self, path: impl AsRef<Path>, name: &str, activate: bool) -> Result<()> {
        if name.is_empty() {
            return crate::input_err!("patch name must not be empty");
        }
        let patch = TensorPatch::load(path, &self.config, self.fingerprint.as_deref())?;
        if self.lock_adapters().patches.contains_key(name) {
            return crate::input_err!("a patch named {name:?} is already loaded; unload it first");
        }
        let base = WeightFile::open(&self.info.path)?;
        if base.metadata.get("aios.fingerprint").map(String::as_str) != self.fingerprint.as_deref() {
            return Err(Error::Config(format!(
                "{}: the model file changed on disk since this engine opened it; open the engine again",
                self.info.path.display()
            )));
        }
        let patched = patch.apply(base)?;
        let model = self.pool.install(|| Dit::load(&patched, self.config.clone(), self.matmul))?;
        let mut a = self.lock_adapters();
        a.refuse_if_fused()?;
        if a.patches.contains_key(name) {
            return crate::input_err!("a patch named {name:?} is already loaded; unload it first");
        }
        a.patches.insert(name.to_string(), Arc::new(model));
        if activate {
            a.active_patch = Some(name.to_string());
        }
        self.publish(&a)
    }

    /// Makes `name` (a loaded patch) the one later generations run on, or
    /// with None goes back to the base weights.
    pub fn set_patch(&self, name: Option<&str>) -> Result<()> {
        let mut a = self.lock_adapters();
        a.refuse_if_fused()?;
        if let Some(n) = name {
            if !a.patches.contains_key(n) {
                return crate::input_err!("no patch named {n:?} is loaded (loaded: {:?})", a.patches.keys());
            }
        }
        a.active_patch = name.map(str::to_string);
        self.publish(&a)
    }

    /// Drops a loaded patch (if it was active, the base weights are back).
    pub fn unload_patch(&self, name: &str) -> Result<()> {
        let mut a = self.lock_adapters();
        a.refuse_if_fused()?;
        if a.patches.remove(name).is_none() {
            return crate::input_err!("no patch named {name:?} is loaded (loaded: {:?})", a.patches.keys());
        }
        if a.active_patch.as_deref() == Some(name) {
            a.active_patch = None;
        }
        self.publish(&a)
    }

    /// The active patch, and every loaded patch name.
    pub fn patches(&self) -> (Option<String>, Vec<String>) {
        let a = self.lock_adapters();
        (a.active_patch.clone(), a.patches.keys().cloned().collect())
    }

    /// Loads a ControlNet file under `name` (checked against this model; on
    /// any error nothing changes). With `scale`, it is also activated.
    pub fn load_controlnet(&self, path: impl AsRef<Path>, name: &str, scale: Option<f32>) -> Result<()> {
        if name.is_empty() {
            return crate::input_err!("ControlNet name must not be empty");
        }
        check_scale(name, scale.unwrap_or(1.0))?;
        let net = ControlNet::load(path, &self.config, self.fingerprint.as_deref())?;
        let mut a = self.lock_adapters();
        if a.controlnets.contains_key(name) {
            return crate::input_err!("a ControlNet named {name:?} is already loaded; unload it first");
        }
        a.controlnets.insert(name.to_string(), Arc::new(net));
        if let Some(s) = scale {
            a.active_controls.insert(name.to_string(), s);
        }
        self.publish(&a)
    }

    pub fn unload_controlnet(&self, name: &str) -> Result<()> {
        let mut a = self.lock_adapters();
        if a.controlnets.remove(name).is_none() {
            return crate::input_err!("no ControlNet named {name:?} is loaded (loaded: {:?})", a.controlnets.keys());
        }
        a.active_controls.remove(name);
        self.publish(&a)
    }

    /// Replaces the active ControlNets: name -> scale (0 = loaded, not applied).
    /// Generations already running keep the set they started with.
    pub fn set_controlnets(&self, scales: &BTreeMap<String, f32>) -> Result<()> {
        let mut a = self.lock_adapters();
        for (name, &s) in scales {
            if !a.controlnets.contains_key(name) {
                return crate::input_err!(
                    "no ControlNet named {name:?} is loaded (loaded: {:?})",
                    a.controlnets.keys()
                );
            }
            check_scale(name, s)?;
        }
        a.active_controls = scales.clone();
        self.publish(&a)
    }

    /// The active ControlNets and their scales, and every loaded one with its kind.
    pub fn controlnets(&self) -> ControlNets {
        let a = self.lock_adapters();
        ControlNets {
            active: a.active_controls.iter().map(|(n, s)| (n.clone(), *s)).collect(),
            loaded: a.controlnets.iter().map(|(n, c)| (n.clone(), c.kind)).collect(),
        }
    }

    /// Merges the active adapters into the (f32) weights: no per-layer
    /// adapter cost until [`Engine::unfuse`], which restores the exact
    /// original weights. Adapter and patch changes are refused while fused.
    pub fn fuse(&self) -> Result<()> {
        let mut a = self.lock_adapters();
        a.refuse_if_fused()?;
        let rt = self.snapshot();
        if rt.lora.is_empty() {
            return crate::input_err!("no active adapters to fuse");
        }
        let fused = self.pool.install(|| rt.model.fused(&rt.lora))?;
        a.fused = Some(Arc::new(fused));
        self.publish(&a)
    }

    pub fn unfuse(&self) -> Result<()> {
        let mut a = self.lock_adapters();
        if a.fused.take().is_none() {
            return crate::input_err!("the adapters are not fused");
        }
        self.publish(&a)
    }

    pub fn is_fused(&self) -> bool {
        self.lock_adapters().fused.is_some()
    }

    /// Builds the runtime for the state `a` and swaps it in; readers keep
    /// their old snapshot.
    fn publish(&self, a: &Adapters) -> Result<()> {
        let rt = match &a.fused {
            Some(model) => Runtime {
                model: model.clone(),
                lora: ActiveLora::empty(),
                patch: a.active_patch.clone(),
                controls: a.controls(),
            },
            None => a.runtime(&a.active, a.active_patch.as_deref())?,
        };
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rt);
        Ok(())
    }

    /// Attaches (or with None detaches) a skills store: on every text
    /// generation with a prompt, skills whose cards score at least
    /// `threshold` (MiniLM cosine with the prompt) are activated for that
    /// generation. Card files are found in the folder that holds the store's
    /// folder (`<skills>/cards` is the store, `<skills>/<file>` the files).
    pub fn set_skills(&self, store: Option<Arc<MemoryStore>>, threshold: f32) -> Result<()> {
        if !threshold.is_finite() {
            return crate::input_err!("skill threshold must be finite, got {threshold}");
        }
        *self.skills.write().unwrap_or_else(|e| e.into_inner()) = store.map(|store| Skills { store, threshold });
        Ok(())
    }

    pub fn skills_store(&self) -> Option<Arc<MemoryStore>> {
        self.skills.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(|s| s.store.clone())
    }

    /// The stored skills that fit `prompt`, loading their files on first
    /// use. A card for another base, or whose file is missing or corrupt, is
    /// skipped with a warning: a bad card never stops a generation.
    pub fn match_skills(&self, prompt: &str) -> Result<SkillMatch> {
        let mut out = SkillMatch::default();
        let Some((store, threshold)) =
            self.skills.read().unwrap_or_else(|e| e.into_inner()).as_ref().map(|s| (s.store.clone(), s.threshold))
        else {
            return Ok(out);
        };
        if store.is_empty() || prompt.trim().is_empty() {
            return Ok(out);
        }
        let dir = store.dir().parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut best_patch = f32::NEG_INFINITY;
        for hit in store.search(Query::Text(prompt), SKILL_SEARCH_K, Precision::F32, None)? {
            if hit.score < threshold {
                break; // hits come best first
            }
            let (card, skill) = match serde_json::from_str::<SkillCard>(&hit.meta) {
                Ok(c) => {
                    let name = c.skill.clone().unwrap_or_else(|| format!("skill-card-{}", hit.id));
                    (c, name)
                }
                Err(e) => {
                    out.warnings.push(format!("skill card {}: unreadable metadata ({e})", hit.id));
                    continue;
                }
            };
            if out.names.contains(&skill) {
                continue;
            }
            if Some(card.base_fingerprint.as_str()) != self.fingerprint.as_deref() {
                out.warnings.push(format!(
                    "skill {}: made for base {}, this is {}",
                    skill,
                    card.base_fingerprint,
                    self.fingerprint.as_deref().unwrap_or("a model without a fingerprint")
                ));
                continue;
            }
            // A card names a file in the skills folder, never a path elsewhere.
            if Path::new(&card.file).file_name().and_then(|f| f.to_str()) != Some(card.file.as_str()) {
                out.warnings.push(format!("skill {skill}: file {:?} is not a name in the skills folder", card.file));
                continue;
            }
            let path = dir.join(&card.file);
            let loaded = match card.level.as_str() {
                "L2" => self.ensure_adapter(&path, &skill),
                "L3" => self.ensure_patch(&path, &skill),
                "L1" => self.ensure_controlnet(&path, &skill),
                other => Err(Error::Input(format!("level {other:?} has no file to activate"))),
            };
            if let Err(e) = loaded {
                out.warnings.push(format!("skill {}: {:?} cannot be used: {e}", skill, card.file));
                continue;
            }
            if card.level == "L2" {
                out.adapters.insert(skill.clone(), 1.0);
            } else if card.level == "L1" {
                out.controlnets.push(skill.clone());
            } else if hit.score > best_patch {
                best_patch = hit.score;
                out.patch = Some(skill.clone());
            }
            out.names.push(skill);
        }
        Ok(out)
    }

    fn ensure_controlnet(&self, path: &Path, name: &str) -> Result<()> {
        if self.lock_adapters().controlnets.contains_key(name) {
            return Ok(());
        }
        match self.load_controlnet(path, name, None) {
            Err(Error::Input(m)) if m.contains("already loaded") => Ok(()), // a concurrent generation loaded it
            r => r,
        }
    }

    fn ensure_adapter(&self, path: &Path, name: &str) -> Result<()> {
        if self.lock_adapters().loaded.contains_key(name) {
            return Ok(());
        }
        match self.load_adapter(path, name, None) {
            // Another thread loaded it meanwhile.
            Err(Error::Input(_)) if self.lock_adapters().loaded.contains_key(name) => Ok(()),
            r => r,
        }
    }

    fn ensure_patch(&self, path: &Path, name: &str) -> Result<()> {
        if self.lock_adapters().patches.contains_key(name) {
            return Ok(());
        }
        match self.load_patch(path, name, false) {
            Err(Error::Input(_)) if self.lock_adapters().patches.contains_key(name) => Ok(()),
            r => r,
        }
    }

    /// `rt`'s model (and patch) with exactly the adapter set `set`, for a
    /// composition term. Refused while fused (the base is not at hand).
    pub(super) fn runtime_with(&self, rt: &Runtime, set: &BTreeMap<String, f32>) -> Result<Runtime> {
        let a = self.lock_adapters();
        if a.fused.is_some() {
            return crate::input_err!(
                "adapters are fused into the weights; call unfuse() before composing adapter sets"
            );
        }
        a.check_loaded(set)?;
        let mut r = a.runtime(set, None)?;
        r.model = rt.model.clone();
        r.patch = rt.patch.clone();
        r.controls = rt.controls.clone();
        Ok(r)
    }

    /// The runtime one text generation runs with: the engine's, or with the
    /// call's own adapter set (`adapters`) and the matched skills on top.
    pub(super) fn runtime_for(
        &self,
        adapters: Option<&BTreeMap<String, f32>>,
        skills: &mut SkillMatch,
    ) -> Result<Arc<Runtime>> {
        if adapters.is_none() && skills.adapters.is_empty() && skills.patch.is_none() && skills.controlnets.is_empty() {
            return Ok(self.snapshot());
        }
        let a = self.lock_adapters();
        if a.fused.is_some() {
            if adapters.is_some() {
                return crate::input_err!(
                    "adapters are fused into the weights; call unfuse() before choosing them per call"
                );
            }
            skills.warnings.push("skills are not applied while adapters are fused (call unfuse())".into());
            skills.adapters.clear();
            skills.patch = None;
            skills.controlnets.clear();
            skills.names.clear();
            drop(a);
            return Ok(self.snapshot());
        }
        let mut weights = match adapters {
            Some(w) => {
                a.check_loaded(w)?;
                w.clone()
            }
            None => a.active.clone(),
        };
        for (name, w) in &skills.adapters {
            weights.entry(name.clone()).or_insert(*w);
        }
        let patch = skills.patch.clone().or_else(|| a.active_patch.clone());
        let mut rt = a.runtime(&weights, patch.as_deref())?;
        for name in &skills.controlnets {
            if let (Some(net), false) = (a.controlnets.get(name), rt.controls.iter().any(|c| &c.0 == name)) {
                rt.controls.push((name.clone(), net.clone(), 1.0));
            }
        }
        Ok(Arc::new(rt))
    }
}

fn check_scale(name: &str, s: f32) -> Result<()> {
    if !s.is_finite() {
        return crate::input_err!("ControlNet {name:?}: scale {s} is not finite");
    }
    Ok(())
}

fn check_weight(name: &str, w: f32) -> Result<()> {
    if !w.is_finite() {
        return crate::input_err!("adapter {name:?}: weight {w} is not finite");
    }
    Ok(())
}
