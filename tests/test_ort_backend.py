"""The ONNX Runtime backend on the one exported graph: the preallocated KV cache written in place
through IOBinding (a decode step copies only the new rows, allocates no output), equal to PyTorch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")

from tokenskip.deploy.runtime.ort_backend import OrtBackend  # noqa: E402
from tokenskip.deploy.runtime.torch_backend import TorchBackend  # noqa: E402
from tokenskip.deploy.runtime.generation import Sampling, generate_tokens, left_pad  # noqa: E402
from tokenskip.deploy.runtime.kv_cache import KVCache  # noqa: E402
from tokenskip.export.wrappers import to_seq_major  # noqa: E402

PROMPTS = [[5, 9, 17, 3, 44, 8, 21, 60, 2, 7, 19, 33, 12, 4, 80, 6, 11, 70, 25, 9],
           [40, 2, 77, 31, 9, 10, 58, 61, 3, 22, 15, 90, 7]]


def test_decode_writes_the_cache_in_place(tiny_export, one_thread, monkeypatch):
    """After a prefill sized by check_length, decode steps never move the cache, never call the
    copying path (KVCache.write), reuse one logits buffer, and leave exactly PyTorch's cache."""
    routed, out = tiny_export
    backend = OrtBackend(out, threads=1)
    ids, mask = left_pad(PROMPTS, 0)
    backend.check_length(ids.shape[1], 6)
    logits, cache = backend.prefill(ids, mask)
    ref_logits, ref_cache = TorchBackend(routed).prefill(ids, mask)
    addresses = {li: cache.buffers[li]["key"].data_ptr() for li in cache.layers}
    prefill_lengths = dict(cache.length)
    assert prefill_lengths == {0: 20, 1: 10, 2: 14, 3: 8}  # kept rows only under kv_policy=skip

    def no_copy(*a, **k):
        raise AssertionError("a decode step went through KVCache.write (a copy)")

    monkeypatch.setattr(KVCache, "write", no_copy)
    logits_buffers = set()
    tok, ref_tok = logits.argmax(-1, keepdim=True), ref_logits.argmax(-1, keepdim=True)
    pos = mask.sum(-1, keepdim=True)
    for step in range(6):
        logits, cache = backend.decode(tok, pos + step, cache)
        ref_logits, ref_cache = TorchBackend(routed).decode(ref_tok, pos + step, ref_cache)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
        logits_buffers.add(cache.extra["logits"].data_ptr())
        tok, ref_tok = logits.argmax(-1, keepdim=True), ref_logits.argmax(-1, keepdim=True)
    assert len(logits_buffers) == 1
    assert {li: cache.buffers[li]["key"].data_ptr() for li in cache.layers} == addresses  # never reallocated
    assert cache.length == {li: n + 6 for li, n in prefill_lengths.items()}
    for li in cache.layers:  # the rows ORT wrote in place are PyTorch's cache, row for row
        want = to_seq_major(ref_cache[li])
        got = cache.past(li)
        torch.testing.assert_close(got["key"], want[0], rtol=0, atol=1e-4)
        assert torch.equal(got["pos"], want[2]) and torch.equal(got["valid"], want[3])
    assert backend.cache_nbytes(cache) == TorchBackend.cache_nbytes(ref_cache) > 0


def test_generation_with_cache_growth_equals_torch(tiny_export, one_thread):
    """With a one-row reserve the cache grows (x2) during generation: same tokens and logits."""
    routed, out = tiny_export
    backend = OrtBackend(out, threads=1)
    from test_deploy import Recorder

    class Reserve1(Recorder):
        """Records the logits; the cache gets a one-row reserve whatever the loop announces."""

        def expect_new_tokens(self, new):
            self.inner.expect_new_tokens(new)
            self.inner.new_tokens = 1

    got, ref = Reserve1(backend), Reserve1(TorchBackend(routed))
    a = generate_tokens(got, PROMPTS, Sampling(10), pad_id=0).tokens
    b = generate_tokens(ref, PROMPTS, Sampling(10), pad_id=0).tokens
    assert a == b
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(ref.logits), rtol=0, atol=1e-4)


def test_routed_cache_holds_fewer_bytes_than_dense(tiny_export, one_thread):
    """kv_policy=skip: the routed layers cache only their kept prompt tokens (what a server can use
    to admit more sequences); cache_nbytes reports it for every backend."""
    from tokenskip.config import build_routed

    routed, out = tiny_export
    ids, mask = left_pad(PROMPTS, 0)
    _, cache = OrtBackend(out, threads=1).prefill(ids, mask)
    dense, _ = build_routed(routed.model, router="dense")
    _, dense_cache = TorchBackend(dense).prefill(ids, mask)
    per_token = sum(t.nbytes for t in (dense_cache[0].key, dense_cache[0].value, dense_cache[0].pos,
                                       dense_cache[0].valid)) // ids.shape[1]
    assert OrtBackend.cache_nbytes(None, cache) == per_token * (20 + 10 + 14 + 8)
    assert TorchBackend.cache_nbytes(dense_cache) == per_token * 20 * 4


def test_chunked_prefill_equals_torch(tiny_export, one_thread):
    """The server's chunked prefill (each chunk routed over itself, attending to the cache) runs the
    same function on ONNX Runtime as on PyTorch: logits, kept rows and the next decode step."""
    routed, out = tiny_export
    ort, ref = OrtBackend(out, threads=1), TorchBackend(routed)
    prompt = torch.tensor([PROMPTS[0]])  # [1,20]
    first, rest = prompt[:, :8], prompt[:, 8:]  # [1,8], [1,12]
    positions = torch.arange(8, 20).unsqueeze(0)  # [1,12]
    logits, cache = ort.prefill(first, torch.ones_like(first))
    ref_logits, ref_cache = ref.prefill(first, torch.ones_like(first))
    logits, cache = ort.prefill_chunk(rest, positions, cache)
    ref_logits, ref_cache = ref.prefill_chunk(rest, positions, ref_cache)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
    whole, _ = ort.prefill(prompt, torch.ones_like(prompt))
    assert not torch.allclose(logits, whole, atol=1e-3)  # a different routing function than one whole prefill
    for li in cache.layers:
        want = to_seq_major(ref_cache[li])
        got = cache.past(li)
        assert torch.equal(got["pos"], want[2]) and torch.equal(got["valid"], want[3])
        torch.testing.assert_close(got["key"], want[0], rtol=0, atol=1e-4)
    tok = logits.argmax(-1, keepdim=True)
    step, _ = ort.decode(tok, torch.tensor([[20]]), cache)
    ref_step, _ = ref.decode(tok, torch.tensor([[20]]), ref_cache)
    torch.testing.assert_close(step, ref_step, rtol=0, atol=1e-4)
