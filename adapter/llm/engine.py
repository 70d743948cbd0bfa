"""A generation engine artifact loaded for use: ``LLMEngine.generate``."""

from __future__ import annotations

__all__ = ["TextCodec", "LLMEngine", "is_llm_artifact"]

from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapter.backends import get_backend
from adapter.core import artifact
from adapter.core.errors import ArtifactError, InputMismatchError
from adapter.core.tokenizer import encode_texts, load_tokenizer
from adapter.llm.generate import Generation, Sampling, generate
from adapter.llm.layout import DecoderLayout

KIND = "causal-lm"


def is_llm_artifact(manifest: dict[str, Any]) -> bool:
    return manifest.get("kind") == KIND


class TextCodec:
    """Text in and out through the tokenizer an artifact bundles (``manifest["tokenizer"]``
    under ``folder``): what a generation engine and a served sharded one share."""

    folder: Path
    manifest: dict[str, Any]
    _tokenizer: Any = None

    @property
    def tokenizer(self):
        """The bundled tokenizer (loaded on first use), or None."""
        name = self.manifest.get("tokenizer")
        if self._tokenizer is None and name:
            self._tokenizer = load_tokenizer(self.folder / name)
        return self._tokenizer

    def encode(self, texts: list[str]) -> list[list[int]]:
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise InputMismatchError(
                "This engine has no tokenizer (its source folder had none), so it takes token ids only.",
                "Give --prompt-ids 1,2,3 instead of --prompt.",
            )
        return encode_texts(tokenizer, texts)

    def decode(self, tokens: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(tokens, skip_special_tokens=True)


class LLMEngine(TextCodec):
    """A verified decoder engine with its layout and (when the source had one) tokenizer."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        if not is_llm_artifact(manifest):
            raise ArtifactError(
                f"'{folder}' is not a generation engine.", "Convert a causal LM with `adapter convert`."
            )
        self.folder = Path(folder)
        self.manifest = manifest
        self.layout = DecoderLayout.from_json(manifest["layout"])
        backend = get_backend(manifest["backend"]["name"])
        backend.require()
        self.backend = backend.NAME
        self.session = backend.DECODER.load(self.folder, manifest["backend"]["config"], self.layout)
        self._tokenizer = None

    @classmethod
    def load(cls, folder: Path | str, check: bool = True) -> LLMEngine:
        folder = Path(folder)
        manifest = artifact.validate(folder) if check else artifact.read_manifest(folder)
        return cls(folder, manifest)

    def generate(
        self,
        prompts: list[list[int]] | None = None,
        texts: list[str] | None = None,
        max_new_tokens: int = 32,
        sampling: Sampling = Sampling(),
        stop_at_eos: bool = True,
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> Generation:
        """Generate from token-id prompts or texts (tokenized with the bundled tokenizer)."""
        if prompts is None:
            if texts is None:
                raise InputMismatchError("Give prompts (token ids) or texts.")
            prompts = self.encode(texts)
        return generate(self.session, self.layout, prompts, max_new_tokens, sampling, stop_at_eos, on_tokens)
