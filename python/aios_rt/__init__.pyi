from os import PathLike
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__version__: str
SAMPLERS: List[str]

class AiosError(Exception): ...
class FormatError(AiosError): ...
class ConfigError(AiosError): ...
class InputError(AiosError): ...
class TokenizerError(AiosError): ...
class AiosIOError(AiosError): ...

class Generation:
    text: str
    tokens: List[int]
    confidence: List[float]
    entropy: List[float]
    given: List[bool]
    steps_run: int
    forward_passes: int
    timings: Dict[str, float]

class Engine:
    def __init__(
        self,
        path: Union[str, PathLike[str]],
        threads: Optional[int] = None,
        dtype: Optional[str] = None,
        matmul: str = "auto",
    ) -> None: ...
    def diffuse(
        self,
        prompt: str = "",
        modality: str = "text",
        length: int = 64,
        steps: int = 16,
        sampler: str = "confidence",
        seed: int = 0,
        block_length: Optional[int] = None,
        guidance: float = 0.0,
        temperature: float = 1.0,
        threshold: float = 0.9,
        suffix: Optional[str] = None,
    ) -> Generation: ...
    def diffuse_tokens(
        self,
        tokens: Sequence[int],
        steps: int = 16,
        sampler: str = "confidence",
        seed: int = 0,
        block_length: Optional[int] = None,
        guidance: float = 0.0,
        temperature: float = 1.0,
        threshold: float = 0.9,
    ) -> Generation: ...
    def logits(self, batch: Sequence[Sequence[int]], sigma: Optional[float] = None) -> np.ndarray: ...
    def logits_raw(self, batch: Sequence[Sequence[int]], sigma: Optional[float] = None) -> Tuple[bytes, List[int]]: ...
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

def quantize(values: np.ndarray, dtype: str) -> bytes: ...
def dequantize(data: bytes, shape: Sequence[int], dtype: str) -> np.ndarray: ...
def read_tensors(path: Union[str, PathLike[str]]) -> Dict[str, np.ndarray]: ...
def read_tensors_with_metadata(path: Union[str, PathLike[str]]) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]: ...
def quantize_file(input: Union[str, PathLike[str]], output: Union[str, PathLike[str]], dtype: str) -> Dict[str, object]: ...
def write_random_model(path: Union[str, PathLike[str]], config_json: str, seed: int = 0, dtype: str = "f32") -> None: ...
