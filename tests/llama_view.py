"""What remains of the test-only Llama adapter: prunekit now has the real one
(``prunekit.families.llama.LlamaAdapter``, registered at import). Kept only so that tests written
against the old names (``LlamaTestAdapter``, ``MappedKvAttention``, ``registered``) keep running;
new tests use the real names."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prunekit.families.llama import LlamaAdapter
from prunekit.families.remote_code.modeling_prunekit_decoder import MappedKvAttention

LlamaTestAdapter = LlamaAdapter

__all__ = ["LlamaTestAdapter", "MappedKvAttention", "registered"]


@contextmanager
def registered() -> Iterator[type[LlamaAdapter]]:
    """Llama is registered by prunekit itself now: nothing to add or take away."""
    yield LlamaAdapter
