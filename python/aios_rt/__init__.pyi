from os import PathLike
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__version__: str
SAMPLERS: List[str]

class AiosError(Exception): ...
class FormatError(AiosError, ValueError): ...
class ConfigError(AiosError, ValueError): ...
class InputError(AiosError, ValueError): ...
class TokenizerError(AiosError): ...
class AiosIOError(AiosError, OSError): ...
class NumericError(AiosError, ArithmeticError): ...

class UsedMemory:
    id: Optional[int]
    score: Optional[float]
    text: str
    tokens: int

class Banned:
    words: List[str]
    weight: float
    def __init__(self, words: Sequence[str], weight: float = 8.0) -> None: ...

class Required:
    words: List[str]
    weight: float
    def __init__(self, words: Sequence[str], weight: float = 8.0) -> None: ...

class Brightness:
    region: Tuple[int, int, int, int]
    target: float
    weight: float
    def __init__(self, region: Tuple[int, int, int, int], target: float, weight: float = 1.0) -> None: ...

class Loudness:
    frames: Tuple[int, int]
    target_db: float
    weight: float
    def __init__(self, frames: Tuple[int, int], target_db: float, weight: float = 1.0) -> None: ...

class ValidJson:
    weight: float
    def __init__(self, weight: float = 30.0) -> None: ...

class Regex:
    pattern: str
    weight: float
    def __init__(self, pattern: str, weight: float = 30.0) -> None: ...

class ClassEnergy:
    classifier: str
    label: str
    weight: float
    def __init__(self, classifier: Union[str, PathLike[str]], label: Union[str, int], weight: float = 1.0) -> None: ...

class Generation:
    text: str
    tokens: List[int]
    confidence: List[float]
    entropy: List[float]
    given: List[bool]
    steps_run: int
    forward_passes: int
    adapters: Dict[str, float]
    timings: Dict[str, float]
    modalities: List[str]
    uncertainty: Optional[float]
    token_uncertainty: Optional[List[float]]
    uncertainty_parts: Optional[Dict[str, float]]
    should_evolve: Optional[bool]
    memories: List[UsedMemory]
    memory_tokens: int
    patch: Optional[str]
    skills: List[str]
    warnings: List[str]
    @property
    def constraints(self) -> List[Dict[str, object]]: ...
    @property
    def image(self) -> Optional[np.ndarray]: ...
    @property
    def audio(self) -> Optional[np.ndarray]: ...
    @property
    def log_mel(self) -> Optional[np.ndarray]: ...
    @property
    def sample_rate(self) -> Optional[int]: ...
    def save(self, path: Union[str, PathLike[str]]) -> None: ...

class Engine:
    def __init__(
        self,
        path: Union[str, PathLike[str]],
        threads: Optional[int] = None,
        dtype: Optional[str] = None,
        matmul: str = "auto",
        memory: Optional[MemoryStore] = None,
        skills: Optional[MemoryStore] = None,
        skill_threshold: float = 0.45,
    ) -> None: ...
    def set_memory(self, memory: Optional[MemoryStore]) -> None: ...
    @property
    def has_memory(self) -> bool: ...
    def set_skills(self, skills: Optional[MemoryStore], threshold: float = 0.45) -> None: ...
    def skills_for(self, prompt: str) -> Dict[str, object]: ...
    @property
    def has_skills(self) -> bool: ...
    def diffuse(
        self,
        prompt: str = "",
        modality: Union[str, Sequence[str]] = "text",
        length: Optional[int] = None,
        steps: Optional[int] = None,
        sampler: str = "confidence",
        seed: Optional[int] = None,
        block_length: Optional[int] = None,
        guidance: float = 0.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        threshold: float = 0.9,
        suffix: Optional[str] = None,
        image: Optional[np.ndarray] = None,
        image_mask: Optional[np.ndarray] = None,
        audio: Optional[np.ndarray] = None,
        audio_mask: Optional[np.ndarray] = None,
        text_length: Optional[int] = None,
        eta: float = 0.0,
        likelihood_samples: Optional[int] = None,
        memory_k: Optional[int] = None,
        memories: Optional[Sequence[str]] = None,
        compose: Optional[Dict[str, float]] = None,
        adapters: Optional[Dict[str, float]] = None,
        skills: bool = True,
        constraints: Optional[Sequence[Union[Banned, Required, ValidJson, Regex, Brightness, ClassEnergy, Loudness]]] = None,
        control: Optional[Dict[str, Union[str, np.ndarray]]] = None,
    ) -> Generation: ...
    def forward_canvas(
        self,
        tokens: Sequence[Sequence[int]],
        image: Optional[np.ndarray] = None,
        t_image: Optional[Sequence[float]] = None,
        audio: Optional[np.ndarray] = None,
        t_audio: Optional[Sequence[float]] = None,
        control: Optional[Dict[str, Union[str, np.ndarray]]] = None,
    ) -> Dict[str, np.ndarray]: ...
    def diffuse_tokens(
        self,
        tokens: Sequence[int],
        steps: int = 16,
        sampler: str = "confidence",
        seed: int = 0,
        block_length: Optional[int] = None,
        guidance: float = 0.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        threshold: float = 0.9,
        likelihood_samples: Optional[int] = None,
        compose: Optional[Dict[str, float]] = None,
    ) -> Generation: ...
    def logits(
        self, batch: Sequence[Sequence[int]], sigma: Optional[float] = None, control: Optional[Dict[str, str]] = None
    ) -> np.ndarray: ...
    def logits_raw(
        self, batch: Sequence[Sequence[int]], sigma: Optional[float] = None, control: Optional[Dict[str, str]] = None
    ) -> Tuple[bytes, List[int]]: ...
    def encode(self, text: str) -> List[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    @property
    def config_json(self) -> str: ...
    @property
    def mask_token_id(self) -> int: ...
    @property
    def threads(self) -> int: ...
    @property
    def info(self) -> Dict[str, object]: ...
    def load_adapter(
        self, path: Union[str, PathLike[str]], name: Optional[str] = None, weight: Optional[float] = 1.0
    ) -> str: ...
    def unload_adapter(self, name: str) -> None: ...
    def set_adapters(self, weights: Dict[str, float]) -> None: ...
    @property
    def active_adapters(self) -> Dict[str, float]: ...
    @property
    def loaded_adapters(self) -> List[str]: ...
    def load_patch(
        self, path: Union[str, PathLike[str]], name: Optional[str] = None, activate: bool = True
    ) -> str: ...
    def set_patch(self, name: Optional[str]) -> None: ...
    def unload_patch(self, name: str) -> None: ...
    @property
    def active_patch(self) -> Optional[str]: ...
    @property
    def loaded_patches(self) -> List[str]: ...
    def load_controlnet(
        self, path: Union[str, PathLike[str]], name: Optional[str] = None, scale: Optional[float] = None
    ) -> str: ...
    def set_controlnets(self, scales: Dict[str, float]) -> None: ...
    def unload_controlnet(self, name: str) -> None: ...
    @property
    def controlnets(self) -> Dict[str, Dict[str, object]]: ...
    def fuse(self) -> None: ...
    def unfuse(self) -> None: ...
    @property
    def fused(self) -> bool: ...
    @property
    def fingerprint(self) -> Optional[str]: ...

def quantize(values: np.ndarray, dtype: str) -> bytes: ...
def dequantize(data: bytes, shape: Sequence[int], dtype: str) -> np.ndarray: ...
def read_tensors(path: Union[str, PathLike[str]]) -> Dict[str, np.ndarray]: ...
def read_tensors_with_metadata(path: Union[str, PathLike[str]]) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]: ...
def quantize_file(input: Union[str, PathLike[str]], output: Union[str, PathLike[str]], dtype: str) -> Dict[str, object]: ...
def write_random_lora(
    path: Union[str, PathLike[str]],
    config_json: str,
    base_fingerprint: str,
    modules: Sequence[str],
    rank: int = 4,
    alpha: float = 8.0,
    use_rslora: bool = False,
    seed: int = 0,
) -> None: ...
def write_random_model(path: Union[str, PathLike[str]], config_json: str, seed: int = 0, dtype: str = "f32") -> None: ...

PathArg = Union[str, PathLike[str]]
VectorLike = Union[Sequence[float], np.ndarray]

def default_embedder_path() -> Optional[str]: ...

class Hit:
    id: int
    score: float
    text: str
    meta: Dict[str, object]
    created_ms: int
    def __init__(self, id: int, score: float, text: str, meta: Dict[str, object] = ..., created_ms: int = ...) -> None: ...

class MemoryStore:
    path: str
    def __init__(
        self,
        path: PathArg,
        *,
        dim: Optional[int] = None,
        embedder: Optional[PathArg] = None,
        read_only: bool = False,
        threads: Optional[int] = None,
        recover: bool = False,
    ) -> None: ...
    def add(self, text: str, meta: Optional[Dict[str, object]] = None, vector: Optional[VectorLike] = None) -> int: ...
    def add_many(
        self,
        texts: Sequence[str],
        metas: Optional[Sequence[Optional[Dict[str, object]]]] = None,
        vectors: Optional[Union[np.ndarray, Sequence[Sequence[float]]]] = None,
    ) -> List[int]: ...
    def search(
        self,
        query: Union[str, VectorLike],
        k: int = 5,
        *,
        filter: Optional[Dict[str, object]] = None,
        precision: str = "f32",
    ) -> List[Hit]: ...
    def get(self, id: int) -> Optional[Hit]: ...
    def delete(self, ids: Union[int, Sequence[int]]) -> None: ...
    def compact(self) -> int: ...
    def refresh(self) -> bool: ...
    def embed(self, texts: Union[str, Sequence[str]]) -> np.ndarray: ...
    def stats(self) -> Dict[str, object]: ...
    def close(self) -> None: ...
    def __enter__(self) -> "MemoryStore": ...
    def __exit__(self, *exc: object) -> None: ...
    @property
    def warnings(self) -> List[str]: ...
    @property
    def dim(self) -> Optional[int]: ...
    def __len__(self) -> int: ...

class Embedder:
    path: str
    def __init__(self, path: Optional[PathArg] = None, *, threads: Optional[int] = None) -> None: ...
    @property
    def dim(self) -> int: ...
    @property
    def fingerprint(self) -> str: ...
    def embed(self, texts: Union[str, Sequence[str]]) -> np.ndarray: ...
