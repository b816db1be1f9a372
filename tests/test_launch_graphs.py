"""Decode CUDA graphs per batch and context bucket: the buckets, and on a GPU (skipped without CUDA) the same
logits as eager decode for several batch sizes at the bucket edges, reading only the picked context bucket."""

from __future__ import annotations

import pytest
import torch

from prestage.stages.launch.model_runner import batch_buckets, context_buckets


def test_launch_buckets_cover_every_batch_and_context():
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert context_buckets(4096) == [256, 512, 1024, 2048, 4096]
    assert context_buckets(3000) == [256, 512, 1024, 2048, 3000]
    assert context_buckets(100) == [100]
    for longest in (1, 255, 256, 257, 1000, 2049, 3000):  # a step reads at most ~2x the longest sequence
        ctx = next(c for c in context_buckets(3000) if c >= longest)
        assert longest <= ctx <= max(2 * longest, 256)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_launch_graph_decode_equals_eager_at_bucket_edges():
    from prestage.stages.launch.model_runner import ModelRunner
    from prestage.stages.launch.models.decoder import DecoderArgs, DecoderForCausalLM
    from prestage.stages.launch.scheduler import Sequence

    args = DecoderArgs(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = DecoderForCausalLM(args, dtype=torch.float32, device="cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.1, 0.1)
    graphs = ModelRunner(model, "cuda", 9, 1024, torch.float32, cuda_graphs=True)
    assert graphs.graphs is not None
    gen = torch.Generator().manual_seed(0)
    for n, longest in [(1, 10), (2, 256), (3, 257), (8, 600), (9, 1000)]:
        seqs = []
        for i in range(n):
            length = longest if i == 0 else int(torch.randint(2, longest + 1, (1,), generator=gen))
            seqs.append(Sequence(i, list(range(1, length)), None, None, None, output=[7], slot=8 - i))
        with torch.inference_mode():
            cache = model.kv_cache.clone()
            got = graphs.decode(seqs)  # [n, V]
            assert graphs.last_attend_len == next(c for c in context_buckets(1024) if c >= longest)
            model.kv_cache.copy_(cache)
            want = model.decode(
                torch.tensor([7] * n, device="cuda"),
                torch.tensor([s.length - 1 for s in seqs], device="cuda"),
                [s.slot for s in seqs],
            )
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
